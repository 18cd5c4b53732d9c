"""Aggregate stage: the Task's aggregation steps per split (classification: LaREx entropy of the MC latents by
the configured estimator, and their MC mean).

Input: the extracted parts holding the steps' inputs (``latent`` [N, S, D]). Output:
``aggregate-<hash>/<split>.safetensors`` with the needed steps' outputs (``entropy`` [N, D] float64,
``latent_mean`` [N, D]) and the config hash
in the file's metadata. Shards are processed one at a time, so memory is bounded by the shard size. A corrupt
input shard fails with the file named and the command that repairs it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from rich.progress import Progress

from larex import io
from larex.layout import claim
from larex.stages import common


def split_outputs(run: common.Run, split: str, steps) -> dict[str, np.ndarray]:
    """Every step's output for one split, shard by shard, concatenated."""
    layout = run.layout
    out: dict[str, list[np.ndarray]] = {}
    for step in steps:
        parts = {layout.parts[k] for k in step.inputs}
        if len(parts) != 1:
            raise RuntimeError(f"aggregation step {step.output}: inputs {step.inputs} come from several parts {parts}")
        directory = layout.part_dir(split, parts.pop())
        for shard in io.iter_shards(directory, list(step.inputs)):
            out.setdefault(step.output, []).append(np.asarray(step.fn(shard)))
        if step.output not in out:  # an empty split: the step on zero rows of the recorded shape
            m = io.read_manifest(directory) or {}
            shape = m.get("keys", {}).get(step.inputs[0], {}).get("shape") or [0, 2, 0]
            out[step.output] = [np.asarray(step.fn({k: np.zeros((0, *shape[1:])) for k in step.inputs}))]
    return {k: np.concatenate(v) for k, v in out.items()}


def run(cfg: DictConfig, run: common.Run | None = None, splits: list[str] | None = None) -> Path:
    run = run or common.prepare(cfg)
    layout = run.layout
    needed = run.derived_needed()
    if not needed:
        common.log("aggregate", "nothing to aggregate: no selected method reads an aggregated feature")
        return layout.aggregate_dir
    steps = [s for s in run.task.aggregation_steps(common.aggregate_params(cfg)) if s.output in needed]
    splits = splits or run.splits
    todo = [s for s in splits if cfg.force or not io.has_config_hash(layout.aggregate_file(s), run.aggregate_split_hash(s))]
    if not todo:
        common.log("aggregate", f"up to date: {layout.aggregate_dir}")
        return layout.aggregate_dir
    for s in todo:
        for step in steps:
            for k in step.inputs:
                part = layout.parts[k]
                if not io.is_complete(layout.part_dir(s, part), run.part_hash(s, part)):
                    raise FileNotFoundError(f"features {k!r} of split {s}: {common.part_problem(layout.part_dir(s, part))}"
                                            "; run larex-extract with the same overrides first (it recomputes only "
                                            "what is missing or corrupt)")
    with Progress(console=common.console, disable=not cfg.progress, transient=True) as progress:
        bar = progress.add_task(f"[aggregate] {', '.join(s.output for s in steps)}", total=len(todo))
        for s in todo:
            path = layout.aggregate_file(s)
            with claim(path, "larex-aggregate"):
                if cfg.force or not io.has_config_hash(path, run.aggregate_split_hash(s)):
                    io.save_arrays(path, split_outputs(run, s, steps),
                                   metadata={"config_hash": run.aggregate_split_hash(s), "split": s})
            progress.advance(bar)
    layout.record("aggregate", layout.aggregate_dir, layout.aggregate_hash,
                  {"overrides": common.overrides()})
    common.log("aggregate", f"{', '.join(s.output for s in steps)} of {', '.join(todo)} -> {layout.aggregate_dir}")
    return layout.aggregate_dir
