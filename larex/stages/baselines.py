"""Baselines stage: fit and score every selected baseline (``baselines=[msp,energy,vim]`` or ``baselines=all``)
on every split; scores go to ``<run_dir>/scores/<method>.parquet`` and are reused by larex-evaluate."""
from __future__ import annotations

from omegaconf import DictConfig
from rich.table import Table

from larex.stages import common
from larex.stages.evaluate import baseline_specs, score_methods


def run(cfg: DictConfig) -> dict:
    specs = baseline_specs(cfg)
    if not specs:
        raise common.ConfigError("no baseline selected: use baselines=[msp,energy,...] or baselines=all "
                                 f"(available: {[n for n in common.packaged_options('baselines') if n != 'all']})")
    scores, timings = score_methods(cfg, specs)
    t = Table(title=f"baselines scored -> {common.run_dir(cfg) / 'scores'}")
    t.add_column("method")
    t.add_column("seconds (fit + score)", justify="right")
    for name in scores:
        t.add_row(name, f"{timings[name]:.2f}")
    common.console.print(t)
    return scores
