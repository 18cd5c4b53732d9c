"""Baselines stage: fit and score every selected baseline (``baselines=[msp,energy,vim]`` or ``baselines=all``)
on every split; scores go to ``<hooked_layer>/scores/<method>-<hash>.parquet`` and are reused by larex-evaluate."""
from __future__ import annotations

from omegaconf import DictConfig
from rich.table import Table

from larex.stages import common, evaluate


def run(cfg: DictConfig, run: common.Run | None = None) -> dict:
    run = run or common.prepare(cfg)
    names = list(common.baseline_specs(cfg))
    if not names:
        raise common.ConfigError("no baseline selected: use baselines=[msp,energy,...] or baselines=all "
                                 f"(available: {[n for n in common.packaged_options('baselines') if n != 'all']})")
    scores, timings = evaluate.score(cfg, run, {n: run.methods[n] for n in names})
    t = Table(title=f"baselines scored -> {run.layout.scores_dir}")
    t.add_column("method")
    t.add_column("seconds (fit + score)", justify="right")
    for name in scores:
        t.add_row(name, f"{timings[name]:.2f}")
    common.console.print(t)
    return scores
