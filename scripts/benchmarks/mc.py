"""``mc/*`` rows: MC extraction with the shared deterministic prefix (``FeatureExtractor(share_prefix=True)``)
vs S full passes (``share_prefix=False``) on a random-init ResNet-18 and SmallCNN; same seed, so the
latents must agree to ``MC_ERR_TOL``."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common import MC_SAMPLES, REPEATS, Ctx, Row, error_row, median_time

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
