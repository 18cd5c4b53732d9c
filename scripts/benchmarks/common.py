"""Shared by every benchmark group: the run's sizes, the table row, the timing context."""
from __future__ import annotations

import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ("row", "inputs", "larex_s", "reference_s", "ratio", "goal", "met", "max_abs_err", "note")
GROUPS = ("entropy", "estimators", "scoring", "baselines", "mc", "detection", "detector", "memory", "stages")  # each a module benchmarks.<group>
DEFAULT_GROUPS = GROUPS  # plain `make bench`: every group, the demo's stages last
FAST_S = 1.0  # calls faster than this are repeated (median of REPEATS) after the warm-up
REPEATS = 3
MC_SAMPLES = 16  # S of the mc rows and of the memory rows' extractor


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


def alternating(ctx: Ctx, reference, larex, repeats: int = 7):
    """Median seconds of ``reference`` and of ``larex`` over ``repeats`` alternating calls after one warm-up of
    each (alternating, so load changes on the machine hit both alike), and larex's last result."""
    reference(), larex()
    t_ref, t_larex, out = [], [], None
    for _ in range(1 if ctx.quick else repeats):
        t0 = time.perf_counter()
        reference()
        ctx.sync()
        t_ref.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = larex()
        ctx.sync()
        t_larex.append(time.perf_counter() - t0)
    return statistics.median(t_ref), statistics.median(t_larex), out
