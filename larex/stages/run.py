"""Run stage: train -> extract -> aggregate -> evaluate on one run context (task, methods, plan and layout built
once), each stage skipped when its outputs are complete (``force=true`` reruns everything). Prints stage times."""
from __future__ import annotations

import time

import pandas as pd
from omegaconf import DictConfig
from rich.table import Table

from larex.stages import aggregate, common, evaluate, extract, train


def run(cfg: DictConfig, ctx: common.Run | None = None) -> pd.DataFrame:
    ctx = evaluate.check_requirements(cfg, ctx)  # config errors before any compute
    extract.check_layers(cfg, ctx)
    timings: dict[str, float] = {}
    result = None
    for name, stage in (("train", train.run), ("extract", extract.run), ("aggregate", aggregate.run),
                        ("evaluate", evaluate.run)):
        t0 = time.perf_counter()
        result = stage(cfg, ctx)
        timings[name] = time.perf_counter() - t0
    t = Table(title="stage times")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    for k, v in timings.items():
        t.add_row(k, f"{v:.1f}")
    common.console.print(t)
    return result
