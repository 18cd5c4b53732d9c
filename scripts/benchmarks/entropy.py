"""``entropy/*`` rows: :func:`larex.entropy.knn_entropy` vs the LaREx reference ``get_h`` loop, float64 and
float32, plus a linear-scaling check (time at N and 4N)."""
from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.common import Ctx, Row, error_row


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
