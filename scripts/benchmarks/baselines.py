"""``baselines/*`` rows: every logits/feature baseline YAML in ``configs/baselines`` (instantiated with Hydra)
vs its pytorch-ood 0.4 counterpart, compared after the documented sign/scale conversion."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.common import REPO, Ctx, Row, error_row

REF_LIMIT_S = 30.0  # pytorch-ood scoring estimated slower than this (from a pilot) is timed on a subset, scaled


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
