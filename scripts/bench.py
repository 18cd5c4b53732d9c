"""larex benchmark (``make bench``): larex side by side with the reference implementations it replaces.

Every row is measured in this run; speed rows time larex and its reference on the same inputs (the
``memory`` and ``stages`` rows describe larex alone):

* ``entropy/*``   :func:`larex.entropy.knn_entropy` vs the LaREx reference computation (per image, per
  dimension ``entropy_estimators.continuous.get_h(x.reshape(-1, 1), k, norm="max", min_dist=1e-5)`` in a
  Python loop), float64 and float32, plus a linear-scaling check (time at N and 4N).
* ``scoring/*``   LaRED (Gaussian KDE) vs ``sklearn.neighbors.KernelDensity``; LaREM vs
  ``sklearn.covariance.EmpiricalCovariance.mahalanobis``.
* ``baselines/*`` every logits/feature baseline YAML in ``configs/baselines`` (instantiated with Hydra)
  vs its pytorch-ood 0.4 counterpart, compared after the documented sign/scale conversion.
* ``mc/*``        MC extraction with the shared deterministic prefix (``FeatureExtractor(share_prefix=True)``:
  the layers before the first dropout/DropBlock layer run once per image) vs S full passes
  (``share_prefix=False``), S=16, on a random-init ResNet-18 (hooked at ``dropblock``, 32x32) and SmallCNN
  (28x28, hooked at ``dropblock`` as in the default config and at ``block3``), with keys ``latent`` and
  ``latent + mc_logits``; same seed, so the latents must agree to 1e-6.
* ``memory/*``    peak RSS of the extraction stage (``Trainer.predict`` streaming to safetensors shards)
  at N and 10N images, each in a fresh process: the goal is <20% growth.
* ``stages/*``    (last; about 3 minutes of the run on 2 cores) per-stage wall time of
  ``larex-run experiment=fmnist_demo`` (tiny overrides with --quick), read from its "stage times" table;
  needs Debian's Fashion-MNIST in /usr/share/datasets/fashion-mnist (a row says so when it is missing).

Default groups (plain ``make bench``): all of them, about 7 minutes on 2 CPU cores (the baseline rows fit on
50k rows and score 10k, so that the whole table, demo included, stays under 10 minutes).

Prints one Rich table and writes it atomically as ``<out>/bench.csv`` and ``<out>/bench.md``.
Timing: ``time.perf_counter``; every call runs once as warm-up, calls faster than ``FAST_S`` are then
repeated and the median is reported (``mc`` rows: the median of ``REPEATS`` calls after the warm-up, however
long they take). Slow references are timed on a subset and scaled linearly (the
row's note says so). A row that fails reports the error in its note; the others still run.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import io
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from larex.io import write_text

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("row", "inputs", "larex_s", "reference_s", "ratio", "goal", "met", "max_abs_err", "note")
GROUPS = ("entropy", "scoring", "baselines", "mc", "memory", "stages")
DEFAULT_GROUPS = GROUPS  # plain `make bench`: every group, the demo's stages last
FAST_S = 1.0  # calls faster than this are repeated (median of REPEATS) after the warm-up
REPEATS = 3
REF_LIMIT_S = 30.0  # pytorch-ood scoring estimated slower than this (from a pilot) is timed on a subset, scaled


# ----------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    entropy_shapes: tuple[tuple[int, int, int], ...]  # (N, S, D): "small", "large"
    entropy_ref_images: int  # images the get_h loop runs on (scaled to N)
    kde_fit: int
    kde_query: int
    kde_dim: int
    kde_ref_queries: int  # sklearn KDE / brute force run on this many queries (scaled to kde_query)
    base_fit: int
    base_test: int
    base_features: int
    base_classes: int
    base_pilot: int  # pytorch-ood scoring pilot size (decides full run vs subset + scaling)
    base_methods: tuple[str, ...] | None  # None = every eligible YAML
    mc_resnet: tuple[int, int] = (8, 2)  # (images per batch, batches) of the ResNet-18 MC rows
    mc_cnn: tuple[int, int] = (64, 2)  # (images per batch, batches) of the SmallCNN MC rows
    mem_images: int = 1_000  # N of the memory rows (and 10 N)
    mem_batch: int = 256  # their batch size (extract.batch_size default); N holds several batches
    stages_quick: bool = False  # stages: tiny overrides instead of the full fmnist_demo


DEFAULT = Sizes(((200, 16, 512), (200, 32, 2048)), 5, 50_000, 50_000, 64, 500,
                50_000, 10_000, 512, 100, 2_000, None)
QUICK = Sizes(((12, 16, 64), (12, 32, 128)), 2, 1_000, 1_000, 16, 100,
              1_000, 1_000, 32, 5, 500,
              ("msp", "gen", "kl_matching", "mdist", "ddu", "knn", "vim", "react", "she"),
              mc_resnet=(1, 1), mc_cnn=(16, 1), mem_images=160, mem_batch=40, stages_quick=True)


# ----------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    row: str
    inputs: str
    larex_s: float = math.nan
    reference_s: float = math.nan
    ratio: float = math.nan
    goal: str = ""
    met: bool | None = None
    max_abs_err: float = math.nan
    note: str = ""

    def fmt(self) -> dict[str, str]:
        return {
            "row": self.row,
            "inputs": self.inputs,
            "larex_s": _fmt_s(self.larex_s),
            "reference_s": _fmt_s(self.reference_s),
            "ratio": "" if math.isnan(self.ratio) else f"{self.ratio:.1f}x",
            "goal": self.goal,
            "met": {True: "yes", False: "NO", None: "-"}[self.met],
            "max_abs_err": "" if math.isnan(self.max_abs_err) else f"{self.max_abs_err:.2e}",
            "note": self.note,
        }

    def raw(self) -> dict[str, str]:
        out = self.fmt()
        for key in ("larex_s", "reference_s", "ratio", "max_abs_err"):
            v = getattr(self, key)
            out[key] = "" if math.isnan(v) else repr(float(v))
        out["met"] = {True: "yes", False: "no", None: ""}[self.met]
        return out


def _fmt_s(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.4g}"


def error_row(name: str, inputs: str, goal: str, exc: BaseException) -> Row:
    traceback.print_exception(exc, file=sys.stderr)
    msg = " ".join(str(exc).split())
    return Row(name, inputs, goal=goal, note=f"error: {type(exc).__name__}: {msg[:300]}")


# ----------------------------------------------------------------------------------------------- timing
@dataclass
class Ctx:
    device: torch.device
    sizes: Sizes
    quick: bool
    seed: int = 0
    log: Callable[[str], None] = field(default=print)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any], sync: bool = False, repeats: int = REPEATS) -> tuple[float, Any]:
        """Seconds of one call of ``fn`` and its result: one warm-up call; if it took < FAST_S, the median
        of ``repeats`` further calls (1 with --quick), else the warm-up time (slow calls are not repeated).
        ``sync``: wait for the accelerator before reading the clock (larex calls on --device cuda)."""
        wait = self.sync if sync else (lambda: None)
        t0 = time.perf_counter()
        out = fn()
        wait()
        first = time.perf_counter() - t0
        if first >= FAST_S:
            return first, out
        times = []
        for _ in range(1 if self.quick else repeats):
            t0 = time.perf_counter()
            out = fn()
            wait()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out


# ----------------------------------------------------------------------------------------------- entropy
def make_latents(n: int, s: int, d: int, seed: int) -> np.ndarray:
    """MC latents [N, S, D]: per-image/dimension location, per-dimension scale; every 4th dimension is
    post-ReLU (many exact zeros, so the min_dist clipping path is exercised). float32-representable
    float64 values, so float32 and float64 runs see the same numbers."""
    rng = np.random.default_rng(seed)
    loc = rng.normal(0.0, 1.0, size=(n, 1, d))
    scale = rng.lognormal(-1.0, 0.5, size=(1, 1, d))
    x = loc + scale * rng.standard_normal((n, s, d))
    relu = np.arange(d) % 4 == 0
    x[:, :, relu] = np.maximum(x[:, :, relu], 0.0)
    return x.astype(np.float32).astype(np.float64)


def reference_entropy(x: np.ndarray, k: int) -> np.ndarray:
    """LaREx reference: ``get_h`` per image and per dimension in a Python loop, [n, S, D] -> [n, D]."""
    from entropy_estimators import continuous

    n, _, d = x.shape
    out = np.empty((n, d), dtype=np.float64)
    for i in range(n):
        for j in range(d):
            out[i, j] = continuous.get_h(x[i, :, j].reshape(-1, 1), k=k, norm="max", min_dist=1e-5)
    return out


def jit_warmup(x: torch.Tensor, compiled: dict[torch.dtype, float]) -> str:
    """Compile the numba CPU kernel for ``x``'s dtype on a tiny input, outside the timed calls; words for the
    note. The compile happens once per process and dtype (numba's on-disk cache is not used: it pickles)."""
    from larex.entropy import knn_entropy

    if x.device.type != "cpu":
        return "torch path (not CPU)"
    if x.dtype not in compiled:
        t0 = time.perf_counter()
        knn_entropy(torch.rand(2, x.shape[1], 3, dtype=x.dtype))
        compiled[x.dtype] = time.perf_counter() - t0
        return f"numba kernel; its JIT compile ({compiled[x.dtype]:.1f} s, once per process and dtype) is not timed"
    return f"numba kernel (compiled earlier in this run, {compiled[x.dtype]:.1f} s, not timed)"


def entropy_rows(ctx: Ctx) -> list[Row]:
    from larex.entropy import default_k, knn_entropy

    rows: list[Row] = []
    compiled: dict[torch.dtype, float] = {}
    specs = ((torch.float64, "f64", 100.0, 1e-9), (torch.float32, "f32", 300.0, 1e-4))
    for label, (n, s, d) in zip(("small", "large"), ctx.sizes.entropy_shapes):
        try:
            x = make_latents(n, s, d, ctx.seed + s + d)
            k = default_k(s)
            m = min(ctx.sizes.entropy_ref_images, n)
            ctx.log(f"entropy {label}: reference get_h loop on {m} images x {d} dims")
            t_sub, ref = ctx.time(lambda: reference_entropy(x[:m], k))
            t_ref = t_sub * n / m
        except Exception as exc:  # noqa: BLE001 - reported in the table
            for _, tag, goal, tol in specs:
                rows.append(error_row(f"entropy/{tag}/{label}", f"N={n} S={s} D={d}", f">={goal:g}x, err<={tol:g}",
                                      exc))
            continue
        for dtype, tag, goal, tol in specs:
            name, inputs = f"entropy/{tag}/{label}", f"N={n} S={s} D={d} {tag}, k={k}"
            goal_s = f">={goal:g}x, err<={tol:g}"
            try:
                xt = torch.from_numpy(x).to(device=ctx.device, dtype=dtype)
                jit = jit_warmup(xt, compiled)
                ctx.log(f"entropy {label} {tag}: knn_entropy")
                t, h = ctx.time(lambda: knn_entropy(xt, k=None), sync=True, repeats=9)
                err = float(np.abs(h[:m].double().cpu().numpy() - ref).max())
                ratio = t_ref / t
                rows.append(Row(name, inputs, t, t_ref, ratio, goal_s, ratio >= goal and err <= tol, err,
                                f"reference timed on {m} of {n} images ({m * d} get_h calls), scaled x{n / m:g} "
                                f"(linear in N*D); err vs the float64 get_h values; {jit}"))
            except Exception as exc:  # noqa: BLE001
                rows.append(error_row(name, inputs, goal_s, exc))
    # linear scaling: same shape as "large", N and 4N images, float64
    n, s, d = ctx.sizes.entropy_shapes[-1]
    name, inputs, goal_s = "entropy/scaling", f"N={n} vs {4 * n}, S={s} D={d} f64", "t(4N)/t(N) in 3-5.5"
    try:
        x4 = torch.from_numpy(make_latents(4 * n, s, d, ctx.seed + 7)).to(ctx.device)
        x1 = x4[:n].contiguous()
        ctx.log("entropy scaling: N and 4N")
        # tens of milliseconds each: the median of 9 calls, so one noisy call cannot move the ratio
        t1, h1 = ctx.time(lambda: knn_entropy(x1), sync=True, repeats=9)
        t4, h4 = ctx.time(lambda: knn_entropy(x4), sync=True, repeats=9)
        err = float((h4[:n] - h1).abs().max())
        r = t4 / t1
        rows.append(Row(name, inputs, t4, t1, r, goal_s, 3.0 <= r <= 5.5 and err == 0.0, err,
                        "here larex_s = t(4N), reference_s = t(N), ratio = t(4N)/t(N); err = max|H_4N[:N] - H_N| "
                        "(first N images of the 4N input)"))
    except Exception as exc:  # noqa: BLE001
        rows.append(error_row(name, inputs, goal_s, exc))
    return rows


# ----------------------------------------------------------------------------------------------- scoring
def make_entropy_features(n: int, d: int, seed: int, basis_seed: int = 1234) -> np.ndarray:
    """Entropy-like features [n, d]: strongly correlated dimensions (rank-8 structure plus noise)."""
    basis = np.random.default_rng(basis_seed).normal(size=(8, d))
    rng = np.random.default_rng(seed)
    return 0.5 * rng.normal(size=(n, 8)) @ basis + 0.1 * rng.normal(size=(n, d)) + 2.0


def brute_kde(queries: np.ndarray, points: np.ndarray, h: float, block: int = 100) -> np.ndarray:
    """Exact Gaussian-KDE log-density in float64 numpy (direct differences, no expansion), blocked."""
    from scipy.spatial.distance import cdist
    from scipy.special import logsumexp

    n, d = points.shape
    out = np.empty(queries.shape[0], dtype=np.float64)
    for s in range(0, queries.shape[0], block):
        d2 = cdist(queries[s:s + block], points, "sqeuclidean")
        out[s:s + block] = logsumexp(-d2 / (2.0 * h * h), axis=1)
    return out - math.log(n) - 0.5 * d * math.log(2.0 * math.pi * h * h)


def scoring_rows(ctx: Ctx) -> list[Row]:
    from sklearn.covariance import EmpiricalCovariance
    from sklearn.neighbors import KernelDensity

    from larex.postprocessors.lared import LaRED, scott_bandwidth
    from larex.postprocessors.larem import LaREM

    sz = ctx.sizes
    n, q, d = sz.kde_fit, sz.kde_query, sz.kde_dim
    inputs = f"fit {n} x query {q} x {d}"
    rows: list[Row] = []
    x = make_entropy_features(n, d, ctx.seed + 1)
    xq = make_entropy_features(q, d, ctx.seed + 2)  # same distribution: in-distribution queries

    name, goal_s, tol = "scoring/lared", ">=10x, err<=1e-6", 1e-6
    try:
        h = float(scott_bandwidth(x))
        dev = "cuda" if ctx.device.type == "cuda" else "cpu"
        ctx.log(f"scoring: LaRED {n} x {q} x {d}")
        t_ours, ours = ctx.time(
            lambda: LaRED(pca=None, bandwidth=h, standardize=False, device=dev).fit({"entropy": x})
            .score({"entropy": xq}))
        m = min(sz.kde_ref_queries, q)
        ctx.log(f"scoring: sklearn KernelDensity on {m} queries")
        t_fit, kde = ctx.time(lambda: KernelDensity(kernel="gaussian", bandwidth=h).fit(x))
        t_sub, theirs = ctx.time(lambda: kde.score_samples(xq[:m]))
        t_ref = t_fit + t_sub * q / m
        err_sk = float(np.abs(ours[:m] - theirs).max())
        brute = brute_kde(xq[:m], x, h)
        err_bf = float(np.abs(ours[:m] - brute).max())
        sk_own = float(np.abs(theirs - brute).max())
        note = (f"h={h:.4g} (Scott, fixed); sklearn fit full, score_samples timed on {m} of {q} queries and "
                f"scaled x{q / m:g}; errors on those {m}: ")
        if sk_own > tol:
            err = err_bf
            note += (f"sklearn's tree KDE is itself off by {sk_own:.2e} from the exact float64 brute-force "
                     f"logsumexp, so max_abs_err is vs brute force ({err_bf:.2e}); vs sklearn {err_sk:.2e}")
        else:
            err = err_sk
            note += f"vs sklearn {err_sk:.2e}, vs brute-force float64 logsumexp {err_bf:.2e}"
        ratio = t_ref / t_ours
        rows.append(Row(name, inputs, t_ours, t_ref, ratio, goal_s, ratio >= 10 and err <= tol, err, note))
    except Exception as exc:  # noqa: BLE001
        rows.append(error_row(name, inputs, goal_s, exc))

    name, goal_s = "scoring/larem", "err<=1e-6 (abs)"
    try:
        ctx.log(f"scoring: LaREM {n} x {q} x {d}")
        t_ours, ours = ctx.time(lambda: LaREM(pca=None, shrinkage=None).fit({"entropy": x}).score({"entropy": xq}))
        t_ref, theirs = ctx.time(lambda: -EmpiricalCovariance().fit(x).mahalanobis(xq))
        err = float(np.abs(ours - theirs).max())
        rel = err / float(np.abs(theirs).max())
        rows.append(Row(name, inputs, t_ours, t_ref, t_ref / t_ours, goal_s, err <= 1e-6, err,
                        f"vs -EmpiricalCovariance().fit(X).mahalanobis(Q) (squared distances); relative err "
                        f"{rel:.1e} of max|score|={np.abs(theirs).max():.3g}; no speed goal"))
    except Exception as exc:  # noqa: BLE001
        rows.append(error_row(name, inputs, goal_s, exc))
    return rows


# ----------------------------------------------------------------------------------------------- baselines
@dataclass
class ClassifierData:
    fit: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    n_classes: int


def make_classifier_data(n_fit: int, n_test: int, f: int, c: int, seed: int) -> ClassifierData:
    """Penultimate features of a linear classifier: non-negative (post-ReLU-like) features around C class
    centres; the test split is 80% ID draws and 20% a low-norm cluster off the centres (OOD-like).
    Head weights/bias are float32-representable; logits = pen @ W.T + b."""
    rng = np.random.default_rng(seed)
    centers = 2.0 * rng.uniform(0.0, 1.0, size=(c, f)) ** 2
    w = 0.06 * math.sqrt(512 / f) * (centers - centers.mean(axis=0)) + rng.normal(0.0, 0.02, size=(c, f))
    w = w.astype(np.float32).astype(np.float64)
    b = rng.normal(0.0, 0.1, size=c).astype(np.float32).astype(np.float64)
    ood_centre = np.abs(rng.normal(0.0, 0.5, size=f))

    def draw(n: int, ood_frac: float) -> dict[str, np.ndarray]:
        labels = rng.integers(0, c, size=n)
        pen = np.abs(centers[labels] + rng.normal(0.0, 0.6, size=(n, f)))
        n_ood = int(round(ood_frac * n))
        if n_ood:
            pen[-n_ood:] = np.abs(ood_centre + rng.normal(0.0, 0.6, size=(n_ood, f)))
            labels[-n_ood:] = -1
        return {"penultimate": pen, "logits": pen @ w.T + b, "labels": labels, "head.weight": w, "head.bias": b}

    fit = draw(n_fit, 0.0)
    return ClassifierData(fit, draw(n_test, 0.2), c)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _linear(w: np.ndarray, b: np.ndarray, dtype: torch.dtype) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0]).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.copy_(torch.from_numpy(b))
    return lin


def _batched(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> np.ndarray:
    return torch.cat([predict(x[s:s + batch]).detach() for s in range(0, x.shape[0], batch)]).double().cpu().numpy()


@dataclass
class RefSpec:
    """A pytorch-ood counterpart: ``fit()`` returns a detector, ``predict(det, rows)`` its outlier scores
    (numpy) for test rows ``rows``; ours ~ ``convert(theirs)``; compared by max abs error with tolerance
    ``tol`` (absolute, or relative to max|ours| when ``relative``) or, when ``spearman``, by rank
    (Spearman >= ``tol``). ``valid(rows)``: boolean mask of the rows where both compute the same quantity."""

    fit: Callable[[], Any]
    predict: Callable[[Any, slice], np.ndarray]
    convert: Callable[[np.ndarray], np.ndarray]
    tol: float
    relative: bool = False
    spearman: bool = False
    doc: str = ""
    valid: Callable[[slice], np.ndarray] | None = None  # rows where the two are comparable (default: all)
    valid_doc: str = ""
    abs_err: bool = True  # also report max abs error when compared by rank


def reference_specs(pp: Any, data: ClassifierData) -> dict[str, RefSpec]:
    """pytorch-ood 0.4 counterparts, built as in tests/test_baselines_{logits,features}.py."""
    import pytorch_ood.detector as pod

    fit, test = data.fit, data.test
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    pf, yf, lf = t(fit["penultimate"]), t(fit["labels"]), t(fit["logits"])
    pt, lt = t(test["penultimate"]), t(test["logits"])
    w, b = fit["head.weight"], fit["head.bias"]
    n_fit, c = pf.shape[0], data.n_classes
    neg = lambda s: -s  # noqa: E731
    np_ = lambda x: x.detach().double().cpu().numpy()  # noqa: E731
    lin64 = _linear(w, b, torch.float64)
    flat_head = lambda z: lin64(z.flatten(1))  # noqa: E731
    ga = getattr
    ddu_reg = float(ga(pp, "jitter_", 0.0) or 1e-9)

    def unclamped(rows: slice, hi: float) -> np.ndarray:
        """Rows whose softmax probabilities all lie in [1e-7, hi] (pytorch-ood's clamp changes nothing)."""
        from scipy.special import softmax

        prob = softmax(test["logits"][rows], axis=1)
        return (prob.min(axis=1) >= 1e-7) & (prob.max(axis=1) <= hi)
    specs: dict[str, Callable[[], RefSpec]] = {
        "msp": lambda: RefSpec(lambda: pod.MaxSoftmax(None, t=1.0), lambda d, r: np_(d.predict_logits(lt[r])), neg,
                               1e-9, doc="ours = -MaxSoftmax"),
        "maxlogit": lambda: RefSpec(lambda: pod.MaxLogit(None), lambda d, r: np_(d.predict_logits(lt[r])), neg,
                                    1e-9, doc="ours = -MaxLogit"),
        "energy": lambda: RefSpec(lambda: pod.EnergyBased(None, t=pp.temperature),
                                  lambda d, r: np_(d.predict_logits(lt[r])), neg, 1e-9, doc="ours = -EnergyBased"),
        "entropy": lambda: RefSpec(lambda: pod.Entropy(None), lambda d, r: np_(d.predict_logits(lt[r])), neg, 1e-9,
                                   doc="ours = -Entropy", valid=lambda r: unclamped(r, 1.0),
                                   valid_doc="pytorch-ood clips p to [1e-7, 1]"),
        "gen": lambda: RefSpec(lambda: pod.GEN(None, gamma=pp.gamma, M=pp.M),
                               lambda d, r: np_(d.predict_logits(lt[r])), lambda s: -min(pp.M, c) * s, 1e-9,
                               doc=f"pytorch-ood averages the top-M terms: ours = -min(M, C) * GEN = "
                                   f"-{min(pp.M, c)} * GEN",
                               valid=lambda r: unclamped(r, 1.0 - 1e-7),
                               valid_doc="pytorch-ood clamps p to [1e-7, 1 - 1e-7]"),
        "odin": lambda: RefSpec(lambda: pod.ODIN(torch.nn.Identity(), eps=0.0, temperature=pp.temperature),
                                lambda d, r: np_(d.predict(lt[r])), neg, 1e-9,
                                doc="ours = -ODIN(identity model on the logits, eps=0)"),
        "kl_matching": lambda: RefSpec(lambda: pod.KLMatching(None).fit_logits(lf),
                                       lambda d, r: np_(d.predict_logits(lt[r])), neg, 1e-9,
                                       doc="ours = -KLMatching"),
        "mdist": lambda: RefSpec(lambda: _f64(lambda: pod.Mahalanobis(None).fit_features(pf, yf)),
                                 lambda d, r: _f64(lambda: np_(d.predict_features(pt[r]))),
                                 lambda s: -2.0 * n_fit * s, 1e-6, relative=True,
                                 doc="pytorch-ood in float64; its covariance is not divided by N and it halves "
                                     "the distance (plus a 1e-6 ridge): ours = -2N * Mahalanobis"),
        "rmd": lambda: RefSpec(lambda: _f64(lambda: pod.RMD(None).fit_features(pf, yf)),
                               lambda d, r: _f64(lambda: np_(d.predict_features(pt[r]))),
                               lambda s: -float(n_fit) * s, 1e-6, relative=True,
                               doc="pytorch-ood in float64, covariances not divided by N (+1e-6 ridge): "
                                   "ours = -N * RMD"),
        "ddu": lambda: RefSpec(lambda: pod.GMM(None, reg=ddu_reg).fit_features(pf, yf),
                               lambda d, r: _batched(d.predict_features, pt[r], 500), neg, 0.999, spearman=True,
                               abs_err=False,
                               doc=f"vs GMM(reg={ddu_reg:.3g}, our jitter_ or 1e-9): 1/N_k vs DDU's 1/(N_k-1) "
                                   "covariances, so compared by rank; GMM scored in batches of 500 (its [K, B, F] "
                                   "intermediate)"),
        "knn": lambda: RefSpec(lambda: pod.KNN(None, k=pp.k).fit_features(pf, yf),
                               lambda d, r: np_(d.predict_features(pt[r])), neg, 1e-7,
                               doc="ours = -KNN (sklearn NearestNeighbors, n_jobs=-1)"),
        "nnguide": lambda: RefSpec(
            lambda: pod.NNGuide(None, head=_linear(w, b, torch.float32), k=pp.k).fit_features(pf.float(), yf),
            lambda d, r: _batched(d.predict_features, pt[r].float(), 2048), neg, 1e-5, relative=True,
            doc="pytorch-ood keeps its bank in float32; scored in query batches of 2048"),
        "vim": lambda: RefSpec(lambda: pod.ViM(None, d=pp.dim_, w=t(w), b=t(b)).fit_features(pf, yf),
                               lambda d, r: np_(d.predict_features(pt[r])), neg, 0.999, spearman=True,
                               doc=f"pytorch-ood ViM(d={ga(pp, 'dim_', '?')}) computes in float32 (eigh of the "
                                   "second-moment matrix included), so compared by rank; abs err for information"),
        "react": lambda: RefSpec(
            lambda: pod.ReAct(backbone=None, head=lin64, percentile=pp.percentile / 100).fit_feature_maps(pf, yf),
            lambda d, r: np_(d.predict_feature_maps(pt[r])), neg, 1e-10, relative=True, doc="ours = -ReAct"),
        "ash": lambda: RefSpec(
            lambda: pod.ASH(backbone=None, head=flat_head, variant=pp.variant, percentile=pp.percentile / 100),
            lambda d, r: np_(d.predict_feature_maps(pt[r][:, :, None, None])), neg, 1e-10, relative=True,
            doc=f"ours = -ASH({pp.variant if hasattr(pp, 'variant') else ''}) on [N, F, 1, 1] maps"),
        "scale": lambda: RefSpec(
            lambda: pod.SCALE(backbone=None, head=flat_head, percentile=pp.percentile / 100),
            lambda d, r: np_(d.predict_feature_maps(pt[r][:, :, None, None])), neg, 1e-10, relative=True,
            doc="ours = -SCALE on [N, F, 1, 1] maps"),
        "dice": lambda: RefSpec(
            lambda: pod.DICE(None, w=t(w), b=t(b), p=pp.percentile / 100).fit_features(pf, yf),
            lambda d, r: _batched(d.predict_features, pt[r], 2000), neg, 1e-10, relative=True,
            doc="ours = -DICE; pytorch-ood scored in query batches of 2000 (its [B, C, F] intermediate)"),
        "she": lambda: RefSpec(lambda: pod.SHE(None, head=lin64).fit_features(pf, yf),
                               lambda d, r: np_(d.predict_features(pt[r])), neg, 1e-10, relative=True,
                               doc="ours = -SHE"),
        "gradnorm": lambda: RefSpec(
            lambda: pod.GradNorm(lin64, param_filter=lambda nm: nm == "weight", temperature=pp.temperature),
            lambda d, r: np_(d.predict(pt[r])), neg, 1e-10, relative=True,
            doc="ours (closed form) = -GradNorm (per-sample autograd via vmap, micro-batches of 32)"),
    }
    return specs


def _f64(fn: Callable[[], Any]) -> Any:
    with default_dtype(torch.float64):
        return fn()


def baseline_configs() -> list[tuple[str, Any]]:
    """(name, OmegaConf config) of every YAML in configs/baselines with a ``_target_``, sorted by name."""
    from omegaconf import OmegaConf

    out = []
    for path in sorted((REPO / "configs" / "baselines").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        if "_target_" in cfg:  # method YAMLs may interpolate the model config (nac_ue: ${model.nac_layers})
            out.append((path.stem, OmegaConf.create({"model": {"nac_layers": ["block3"]}, "m": cfg}).m))
    return out


def baseline_rows(ctx: Ctx) -> list[Row]:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    sz = ctx.sizes
    data = make_classifier_data(sz.base_fit, sz.base_test, sz.base_features, sz.base_classes, ctx.seed + 3)
    inputs = f"fit {sz.base_fit}, score {sz.base_test} x F={sz.base_features}, C={sz.base_classes}"
    rows: list[Row] = []
    n_test = sz.base_test
    for name, cfg in baseline_configs():
        if sz.base_methods is not None and name not in sz.base_methods:
            continue
        row_name = f"baselines/{name}"
        try:
            if "device" in cfg:
                cfg = OmegaConf.merge(cfg, {"device": "cuda" if ctx.device.type == "cuda" else "cpu"})
            pp = instantiate(cfg)
            if "mc_logits" in pp.requires:
                continue  # needs MC-dropout logits: not a logits/feature baseline
            other = [k for k in dict.fromkeys((*pp.fit_requires, *pp.requires)) if k not in data.fit]
            if other:
                rows.append(Row(row_name, inputs, goal="-",
                                note=f"skipped: needs {other}, not a logits/penultimate feature"))
                continue
            fit = {k: data.fit[k] for k in pp.fit_requires}
            test = {k: data.test[k] for k in pp.requires}
            ctx.log(f"baselines: {name} (larex)")
            t_ours, ours = ctx.time(lambda: pp.fit(fit).score(test))
            spec_fn = reference_specs(pp, data).get(name)
            if spec_fn is None:
                rows.append(Row(row_name, inputs, t_ours, goal="-", note="no pytorch-ood counterpart"))
                continue
            spec = spec_fn()
            ctx.log(f"baselines: {name} (pytorch-ood)")
            row = _compare_baseline(ctx, row_name, inputs, t_ours, ours, spec)
            rows.append(row)
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row(row_name, inputs, "", exc))
    return rows


def _compare_baseline(ctx: Ctx, name: str, inputs: str, t_ours: float, ours: np.ndarray, spec: RefSpec) -> Row:
    """Time pytorch-ood (fit at full size; scoring in full when a pilot predicts <= REF_LIMIT_S, else the
    pilot scaled) and compare its converted scores with ours on the rows it scored."""
    from scipy.stats import spearmanr

    n, pilot = ctx.sizes.base_test, ctx.sizes.base_pilot

    t_fit, det = ctx.time(spec.fit)
    m = min(pilot, n)
    t_pilot, theirs = ctx.time(lambda: spec.predict(det, slice(0, m)))
    note = spec.doc
    if m < n and t_pilot * n / m <= REF_LIMIT_S:
        t_pred, theirs = ctx.time(lambda: spec.predict(det, slice(0, n)))
        m = n
    elif m < n:
        t_pred = t_pilot * n / m
        note += f"; pytorch-ood scoring timed on {m} of {n} queries and scaled x{n / m:g} (> {REF_LIMIT_S:g} s)"
    else:
        t_pred = t_pilot
    t_ref = t_fit + t_pred
    mine, conv = ours[:m], spec.convert(theirs)
    ratio = t_ref / t_ours
    rho = float(spearmanr(mine, conv).statistic)
    diff = np.abs(mine - conv)
    err = float(diff.max())
    if spec.valid is not None:
        mask = spec.valid(slice(0, m))
        note += (f"; err on the {int(mask.sum())} of {m} rows where {spec.valid_doc} changes nothing "
                 f"(all rows: {err:.1e})")
        err = float(diff[mask].max()) if mask.any() else math.nan
    top = float(np.abs(mine).max())
    rel = err / top if top > 0 else math.nan
    if spec.spearman:
        goal = f">=1x, spearman>={spec.tol:g}"
        met = bool(ratio >= 1 and rho >= spec.tol)
        if not spec.abs_err:
            return Row(name, inputs, t_ours, t_ref, ratio, goal, met, math.nan, f"{note}; spearman {rho:.6f}")
        return Row(name, inputs, t_ours, t_ref, ratio, goal, met, err, f"{note}; rel err {rel:.1e}; spearman {rho:.6f}")
    tol = spec.tol * (top if spec.relative else 1.0)
    goal = f">=1x, err<={spec.tol:g}" + ("*max|s|" if spec.relative else "")
    met = bool(ratio >= 1 and err <= tol)  # NaN err (no comparable row) -> not met
    return Row(name, inputs, t_ours, t_ref, ratio, goal, met, err, f"{note}; rel err {rel:.1e}; spearman {rho:.6f}")


# ----------------------------------------------------------------------------------------------- mc
MC_SAMPLES = 16
MC_ERR_TOL = 1e-6


@dataclass(frozen=True)
class McCase:
    name: str
    build: Callable[[], torch.nn.Module]
    hooked_layer: str
    mc_layer: str  # the first dropout/DropBlock layer: the shared prefix ends at its input
    prefix: str  # words for the prefix, for the note
    shape: tuple[int, int, int]
    drop_prob: float  # as in configs/hooked_layer
    speed_goal: float | None  # latent-only goal (x); None = only ">=1x"
    why: str  # why the goal is what it is


def mc_cases(ctx: Ctx) -> list[tuple[McCase, tuple[int, int]]]:
    from larex.models.resnet import ResNet18
    from larex.models.small_cnn import SmallCNN

    resnet = McCase("resnet18", lambda: ResNet18(num_classes=10, in_channels=3, dropblock_prob=0.1,
                                                 dropblock_after="layer3"),
                    "dropblock", "dropblock", "stem..layer3", (3, 32, 32), 0.3, 5.0,
                    "goal >=5x: the prefix stem..layer3 is most of the compute and layer4 is skipped")
    cnn = McCase("small_cnn", lambda: SmallCNN(in_channels=1, num_classes=8), "dropblock", "dropblock",
                 "block1..block2", (1, 28, 28), 0.5, 5.0,
                 "goal >=5x: the default hooked layer (small_cnn_dropblock) is the DropBlock output, so only "
                 "the mask runs S times and block3 + the head are skipped")
    cnn_block3 = McCase("small_cnn_block3", lambda: SmallCNN(in_channels=1, num_classes=8), "block3", "dropblock",
                        "block1..block2", (1, 28, 28), 0.5, None,
                        "no speed goal beyond >=1x: hooked after block3, which runs S times; the prefix is only "
                        "{macs:.0%} of this net's conv MACs but {time:.0%} of the pass time here (its "
                        "full-resolution maps: memory-bound BN/max-pool), so the gain depends on the hardware")
    return [(resnet, ctx.sizes.mc_resnet), (cnn, ctx.sizes.mc_cnn), (cnn_block3, ctx.sizes.mc_cnn)]


class _StopPass(Exception):
    """Raised by a bench hook to end a forward pass early."""


def pass_cost(model: torch.nn.Module, x: torch.Tensor, mc_layer: torch.nn.Module,
              stop: torch.nn.Module | None) -> tuple[int, int]:
    """Conv/linear multiply-accumulates of one eval forward of ``x``: (before ``mc_layer``'s input,
    until ``stop``'s output or the end when ``stop`` is None)."""
    macs, state = [0, 0], {"prefix": True}

    def count(m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        per_out = (m.in_channels // m.groups * math.prod(m.kernel_size) if isinstance(m, torch.nn.Conv2d)
                   else m.in_features)
        n = out.numel() * per_out
        macs[1] += n
        if state["prefix"]:
            macs[0] += n

    def at_mc(*_: Any) -> None:
        state["prefix"] = False

    def end(*_: Any) -> None:
        raise _StopPass

    with contextlib.ExitStack() as stack:
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                stack.callback(m.register_forward_hook(count).remove)
        stack.callback(mc_layer.register_forward_pre_hook(at_mc).remove)
        if stop is not None:
            stack.callback(stop.register_forward_hook(end).remove)
        with torch.inference_mode(), contextlib.suppress(_StopPass):
            model(x)
    return macs[0], macs[1]


def time_pass(ctx: Ctx, model: torch.nn.Module, x: torch.Tensor, module: torch.nn.Module | None,
              before: bool, repeats: int) -> float:
    """Median seconds (after one warm-up) of an eval forward of ``x`` that ends at ``module``'s input
    (``before``) or output, or runs to the end (``module`` None)."""
    def end(*_: Any) -> None:
        raise _StopPass

    def call() -> None:
        with contextlib.ExitStack() as stack:
            if module is not None:
                hook = module.register_forward_pre_hook(end) if before else module.register_forward_hook(end)
                stack.callback(hook.remove)
            with torch.inference_mode(), contextlib.suppress(_StopPass):
                model(x)
        ctx.sync()

    return median_time(call, call, repeats)[0]


def median_time(fn: Callable[[], Any], warmup: Callable[[], Any] | None, repeats: int) -> tuple[float, Any]:
    """``warmup()`` once (unless None), then the median seconds of ``repeats`` calls of ``fn`` and its last
    result."""
    if warmup is not None:
        warmup()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def mc_rows(ctx: Ctx) -> list[Row]:
    from larex.extraction.hooks import resolve_module
    from larex.extraction.module import FeatureExtractor

    rows: list[Row] = []
    repeats = 1 if ctx.quick else REPEATS
    s = MC_SAMPLES
    for case, (b, n_batches) in mc_cases(ctx):
        inputs = (f"{b * n_batches} image(s) {'x'.join(map(str, case.shape))} in {n_batches} batch(es) of {b}, "
                  f"S={s}")
        try:
            torch.manual_seed(ctx.seed)
            model = case.build().eval().to(ctx.device)
            gen = torch.Generator().manual_seed(ctx.seed + 11)
            batches = [(torch.rand(b, *case.shape, generator=gen).to(ctx.device),
                        torch.randint(0, 8, (b,), generator=gen), torch.arange(i * b, (i + 1) * b))
                       for i in range(n_batches)]
            mc_layer, hooked = resolve_module(model, case.mc_layer), resolve_module(model, case.hooked_layer)
            rep = batches[0][0].repeat_interleave(s, dim=0)  # pass-time model: one batch as S-fold rows
            ctx.log(f"mc {case.name}: prefix share")
            t_pre = time_pass(ctx, model, rep, mc_layer, True, repeats)
        except Exception as exc:  # noqa: BLE001
            for tag in ("latent", "latent+mc_logits"):
                rows.append(error_row(f"mc/{case.name}/{tag}", inputs, "", exc))
            continue
        for keys in (("latent",), ("latent", "mc_logits")):
            tag = "+".join(keys)
            name = f"mc/{case.name}/{tag}"
            goal = case.speed_goal if keys == ("latent",) else None
            goal_s = f">={goal or 1:g}x, err<={MC_ERR_TOL:g}"
            try:
                stop = hooked if keys == ("latent",) else None
                macs_pre, macs_all = pass_cost(model, batches[0][0][:1], mc_layer, stop)
                t_stop = time_pass(ctx, model, rep, stop, False, repeats)
                t_pre_stop = min(t_pre, t_stop)  # the prefix is part of the pass (timing noise aside)
                ideal = t_stop / (t_pre_stop / s + t_stop - t_pre_stop)

                def run(share: bool) -> tuple[float, list[dict[str, torch.Tensor]]]:
                    ext = FeatureExtractor(model, hooked_layer=case.hooked_layer, head="fc", mc_samples=s,
                                           keys=keys, seed=ctx.seed, drop_prob=case.drop_prob,
                                           share_prefix=share)

                    def call() -> list[dict[str, torch.Tensor]]:
                        out = [ext.predict_step(batch, i) for i, batch in enumerate(batches)]
                        ctx.sync()
                        return out

                    warm = None if ctx.quick else (lambda: ext.predict_step(batches[0], 0))
                    return median_time(call, warm, repeats)

                ctx.log(f"mc {case.name} {tag}: share_prefix=True")
                t_shared, shared = run(True)
                ctx.log(f"mc {case.name} {tag}: share_prefix=False (S full passes)")
                t_full, full = run(False)
                errs = {k: max(float((a[k] - c[k]).abs().max()) for a, c in zip(shared, full)) for k in keys}
                err = max(errs.values())
                ratio = t_full / t_shared
                stop_words = f"{case.hooked_layer} (pass stops there)" if stop is not None else "the logits"
                note = (f"larex_s = share_prefix=True ({case.prefix} once per image, the rest on the S-fold "
                        f"batch), reference_s = share_prefix=False (S full passes), ratio = full/shared; "
                        f"drop_prob={case.drop_prob:g}, seed {ctx.seed}, "
                        + ("one call, no warm-up (--quick)" if ctx.quick else f"warm-up, median of {repeats}")
                        + f"; prefix = "
                        f"{t_pre_stop / t_stop:.0%} of the time of a pass up to {stop_words} "
                        f"({macs_pre / macs_all:.0%} of its conv/linear MACs), so a prefix-once, rest-S-times "
                        f"time model predicts {ideal:.1f}x; err = max|shared - full| of "
                        + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
                if keys == ("latent",):
                    note += "; " + case.why.format(macs=macs_pre / macs_all, time=t_pre_stop / t_stop)
                else:
                    note += "; mc_logits: the tail after the MC layer runs S times in both, so no speed goal"
                met = bool(ratio >= (goal or 1.0) and err <= MC_ERR_TOL)
                rows.append(Row(name, inputs, t_shared, t_full, ratio, goal_s, met, err, note))
            except Exception as exc:  # noqa: BLE001
                rows.append(error_row(name, inputs, goal_s, exc))
    return rows


# ----------------------------------------------------------------------------------------------- memory
MEM_GROWTH = 1.2  # goal: peak RSS at 10x the images < 1.2 x peak RSS at 1x


class LazyImages(torch.utils.data.Dataset):
    """``n`` deterministic 1x28x28 images made on demand from their index (memory does not grow with n):
    items ``(x, y, index)``."""

    def __init__(self, n: int, shape: tuple[int, ...] = (1, 28, 28), classes: int = 8) -> None:
        self.n, self.shape, self.classes = n, shape, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        g = torch.Generator().manual_seed(int(i))
        return torch.rand(self.shape, generator=g), int(i) % self.classes, int(i)


def _peak_rss_mib() -> float:
    """This process's peak resident set size in MiB: ``VmHWM`` of /proc/self/status (Linux), else
    ``ru_maxrss``. (On Linux ``ru_maxrss`` survives exec: a child would report its parent's peak.)"""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    import resource

    scale = 1.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024.0


def memory_child(n: int, batch: int, directory: Path) -> dict[str, float]:
    """Extraction of ``n`` lazy images as in the extract stage (SmallCNN, every feature key, S=16,
    shards of 1024 rows): peak RSS (MiB) after set-up and at the end, wall seconds of predict + close."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from larex.extraction.module import KNOWN_KEYS, FeatureExtractor
    from larex.extraction.writer import ShardPredictionWriter
    from larex.io import ShardWriter
    from larex.models.small_cnn import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=8).eval()
    ext = FeatureExtractor(model, hooked_layer="block3", head="fc", mc_samples=MC_SAMPLES, keys=KNOWN_KEYS,
                           seed=0, drop_prob=0.5)
    loader = DataLoader(LazyImages(n), batch_size=batch, shuffle=False, num_workers=0)
    writer = ShardWriter(directory, "bench", shard_size=1024, total=n)
    callback = ShardPredictionWriter(writer)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(directory), callbacks=[callback])
    setup = _peak_rss_mib()
    t0 = time.perf_counter()
    trainer.predict(ext, loader, return_predictions=False)
    writer.close()
    wall = time.perf_counter() - t0
    if callback.rows != n:
        raise RuntimeError(f"the writer got {callback.rows} rows, expected {n}")
    return {"n": n, "batch": batch, "setup_mib": setup, "peak_mib": _peak_rss_mib(), "wall_s": wall}


def run_memory_child(n: int, batch: int, timeout: float) -> dict[str, float]:
    """``memory_child(n, batch)`` in a fresh interpreter (so its peak RSS is its own), shards in a temp folder."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="larex-bench-mem-") as tmp:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", str(n), str(batch), tmp],
                              cwd=tmp, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " ".join(proc.stderr.split()[-60:])
        raise RuntimeError(f"memory child (N={n}) exited with {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def memory_rows(ctx: Ctx) -> list[Row]:
    n = ctx.sizes.mem_images
    name, goal_s = "memory/extract", f"<{MEM_GROWTH:g} (growth <{MEM_GROWTH - 1:.0%})"
    inputs = f"N={n} vs {10 * n} images 1x28x28, batch {ctx.sizes.mem_batch}"
    try:
        ctx.log(f"memory: extraction of {n} images (subprocess)")
        one = run_memory_child(n, ctx.sizes.mem_batch, timeout=600)
        ctx.log(f"memory: extraction of {10 * n} images (subprocess)")
        ten = run_memory_child(10 * n, ctx.sizes.mem_batch, timeout=1800)
    except Exception as exc:  # noqa: BLE001
        return [error_row(name, inputs, goal_s, exc)]
    ratio = ten["peak_mib"] / one["peak_mib"]
    inputs += f"; peak RSS {one['peak_mib']:.0f} MiB vs {ten['peak_mib']:.0f} MiB"
    growth = [r["peak_mib"] - r["setup_mib"] for r in (one, ten)]
    note = (f"SmallCNN FeatureExtractor (every feature key, S={MC_SAMPLES}, batch {ctx.sizes.mem_batch}) in "
            f"pl.Trainer.predict(return_predictions=False) + ShardPredictionWriter (shards of 1024 rows), images "
            f"made per index, each size in a fresh process; peak RSS (VmHWM) {one['peak_mib']:.1f} MiB at "
            f"1x, {ten['peak_mib']:.1f} MiB at 10x, of which set-up (imports, model) {one['setup_mib']:.1f} / "
            f"{ten['setup_mib']:.1f} MiB and extraction {growth[0]:.1f} / {growth[1]:.1f} MiB; ratio = peak "
            f"RSS(10x)/peak RSS(1x); larex_s = wall time of predict + close at 10x, reference_s = the same at 1x")
    return [Row(name, inputs, ten["wall_s"], one["wall_s"], ratio, goal_s, ratio < MEM_GROWTH, math.nan, note)]


# ----------------------------------------------------------------------------------------------- stages
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = tuple(f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))
STAGES = ("train", "extract", "aggregate", "evaluate")
STAGES_QUICK = ("train.limit.fit=512", "train.limit.val=128", "model.train.epochs=1", "limit.fit=200",
                "limit.val=100", "limit.test=100", "limit.ood=50", "hooked_layer.mc_samples=6",
                "baselines=[msp,energy]")
STAGES_TIMEOUT_S = 1800.0


def parse_stage_times(text: str) -> dict[str, float]:
    """Seconds per stage from the "stage times" table ``larex-run`` prints (any box characters)."""
    import re

    start = text.rfind("stage times")
    if start < 0:
        raise ValueError("larex-run printed no 'stage times' table")
    pattern = re.compile(r"^\W*(" + "|".join(STAGES) + r")\W+([0-9]+(?:\.[0-9]+)?)\W*$")
    times = {}
    for line in text[start:].splitlines():
        m = pattern.match(line.strip())
        if m:
            times[m.group(1)] = float(m.group(2))
    missing = [s for s in STAGES if s not in times]
    if missing:
        raise ValueError(f"the 'stage times' table of larex-run lacks the stage(s) {missing}")
    return times


def stages_rows(ctx: Ctx) -> list[Row]:
    import tempfile

    quick = ctx.sizes.stages_quick
    inputs = "experiment=fmnist_demo" + (" + tiny overrides (--quick)" if quick else "")
    missing = [f for f in FMNIST_FILES if not (FMNIST_DIR / f).is_file()]
    if missing:
        return [Row("stages/fmnist_demo", inputs, goal="-",
                    note=f"skipped: Fashion-MNIST files not found in {FMNIST_DIR} ({', '.join(missing)}); "
                         "`apt-get install dataset-fashion-mnist` provides them")]
    exe = Path(sys.executable).parent / "larex-run"
    try:
        if not exe.is_file():
            raise FileNotFoundError(f"console script {exe} not found next to {sys.executable}; "
                                    "`pip install -e .` in this environment installs it")
        with tempfile.TemporaryDirectory(prefix="larex-bench-stages-") as tmp:
            cmd = [str(exe), "experiment=fmnist_demo", f"output_root={tmp}/outputs", "progress=false",
                   f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"device={ctx.device.type}",
                   *(STAGES_QUICK if quick else ())]
            env = {"HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                   **os.environ, "COLUMNS": "120"}
            ctx.log(f"stages: {' '.join(cmd[1:])}")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=STAGES_TIMEOUT_S)
            wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = " ".join((proc.stderr + proc.stdout).split()[-60:])
            raise RuntimeError(f"larex-run exited with {proc.returncode}: {tail}")
        times = parse_stage_times(proc.stdout)
    except Exception as exc:  # noqa: BLE001
        return [error_row(f"stages/{s}", inputs, "-", exc) for s in STAGES]
    total = sum(times.values())
    slowest = max(times, key=times.__getitem__)
    rows = []
    for s in STAGES:
        note = f"{times[s] / total:.0%} of the {total:.1f} s of the four stages"
        if s == slowest:
            note += " (slowest stage)"
        if s == STAGES[0]:
            note += f"; larex-run wall time {wall:.1f} s (start-up included), device {ctx.device.type}"
        rows.append(Row(f"stages/{s}", inputs, times[s], goal="-", note=note))
    return rows


# ----------------------------------------------------------------------------------------------- output
def machine_info(device: torch.device) -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    dev = str(device)
    if device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)})"
    try:
        load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "device": dev,
        "git_commit": commit,
        "load_avg_start": load,
    }


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r.raw())
    return buf.getvalue()


def to_markdown(rows: list[Row], info: dict[str, str], argv: list[str], wall: float) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [
        "# larex benchmark",
        "",
        f"- date: {info['date']}",
        f"- machine: {info['platform']}, {info['cpus']} CPUs (torch threads {info['torch_threads']}), "
        f"torch {info['torch']}, device {info['device']}",
        f"- git commit: {info['git_commit']}",
        f"- load average at start (1/5/15 min): {info['load_avg_start']}",
        f"- command: `{' '.join(['scripts/bench.py', *argv])}`; total wall time {wall:.0f} s",
        "- ratio = reference_s / larex_s (except `entropy/scaling`: t(4N)/t(N); `memory/extract`: peak RSS "
        "at 10N / at N); times in seconds, "
        "warm-up once, median of a few repeats for calls under 1 s",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        f = r.fmt()
        lines.append("| " + " | ".join(esc(f[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[Row], info: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"larex benchmark - {info['device']}, {info['cpus']} CPUs, torch {info['torch']}, "
                        f"commit {info['git_commit']}")
    for c in COLUMNS:
        table.add_column(c, overflow="fold", no_wrap=c in ("row", "larex_s", "reference_s", "ratio", "met"))
    for r in rows:
        f = r.fmt()
        table.add_row(*(f[c] for c in COLUMNS))
    Console(width=max(160, Console().width)).print(table)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds; used by tests/test_bench.py)")
    p.add_argument("--tracking-uri", default=None,
                   help="also log the table to this MLflow tracking URI (e.g. sqlite:///outputs/mlflow.db)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="device for the larex side (references always run on CPU); auto = cuda if available")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "bench", help="folder for bench.csv / bench.md")
    p.add_argument("--rows", default=",".join(DEFAULT_GROUPS),
                   help=f"comma-separated subset of {','.join(GROUPS)} (default: {','.join(DEFAULT_GROUPS)}; "
                        "stages runs the whole fmnist_demo, about 3 minutes on 2 CPU cores)")
    p.add_argument("--memory-child", nargs=3, metavar=("N", "BATCH", "DIR"), help=argparse.SUPPRESS)  # memory rows' worker
    p.add_argument("overrides", nargs="*", metavar="tracking.uri=URI",
                   help="larex-style override, same as --tracking-uri (so `make bench ARGS=tracking.uri=...` works)")
    args = p.parse_args(argv)
    if args.memory_child:
        return args
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if key != "tracking.uri" or not sep or not value:
            p.error(f"unknown override {item!r}: the only one is tracking.uri=URI (e.g. "
                    "tracking.uri=sqlite:///outputs/mlflow.db); other settings are --options, see --help")
        if args.tracking_uri and args.tracking_uri != value:
            p.error(f"--tracking-uri {args.tracking_uri} and tracking.uri={value} disagree; give one")
        args.tracking_uri = value
    groups = [g.strip() for g in args.rows.split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        p.error(f"--rows: unknown group(s) {bad or groups}; choose a comma-separated subset of {','.join(GROUPS)}")
    args.groups = groups
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine; use --device cpu (or auto)")
    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                               else ("cpu" if args.device == "auto" else args.device))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_child:
        import json

        print(json.dumps(memory_child(int(args.memory_child[0]), int(args.memory_child[1]), Path(args.memory_child[2]))), flush=True)
        return 0
    t0 = time.perf_counter()
    info = machine_info(args.device)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    ctx = Ctx(device=args.device, sizes=QUICK if args.quick else DEFAULT, quick=args.quick, log=log)
    builders = {"entropy": entropy_rows, "scoring": scoring_rows, "baselines": baseline_rows, "mc": mc_rows,
                "memory": memory_rows, "stages": stages_rows}
    rows: list[Row] = []
    for group in args.groups:
        try:
            rows.extend(builders[group](ctx))
        except Exception as exc:  # noqa: BLE001 - e.g. an import failing: one row for the whole group
            rows.append(error_row(f"{group}/*", "", "", exc))
    wall = time.perf_counter() - t0
    print_table(rows, info)
    out: Path = args.out
    write_text(out / "bench.csv", to_csv(rows))
    write_text(out / "bench.md", to_markdown(rows, info, argv, wall))
    print(f"wrote {out / 'bench.csv'} and {out / 'bench.md'} ({wall:.0f} s)")
    if args.tracking_uri:
        log_to_mlflow(args.tracking_uri, rows, info, out, wall)
    return 0


def log_to_mlflow(uri: str, rows: list[Row], info: dict[str, str], out: Path, wall: float) -> None:
    """One MLflow run in experiment ``larex-bench``: ratios/times/errors as metrics, the tables as artifacts."""
    from larex.tracking import Tracker

    tracker = Tracker(uri, "larex-bench")
    metrics = {"wall_s": wall}
    for r in rows:
        for field in ("larex_s", "reference_s", "ratio", "max_abs_err"):
            v = getattr(r, field)
            if isinstance(v, float) and math.isfinite(v):
                metrics[f"{r.row}/{field}"] = v
        if r.met is not None:
            metrics[f"{r.row}/met"] = float(r.met)
    with tracker.start_run(run_name=f"bench {info.get('git_commit', '')}".strip(), tags={"larex.stage": "bench"}):
        tracker.log_params(info)
        tracker.log_metrics(metrics)
        tracker.log_artifact(out / "bench.csv")
        tracker.log_artifact(out / "bench.md")
    print(f"logged to MLflow {uri} (experiment larex-bench, run {tracker.run_id})")


if __name__ == "__main__":
    sys.exit(main())
