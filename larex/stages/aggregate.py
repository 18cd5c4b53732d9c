"""Aggregate stage: LaREx entropy of each split's MC latent samples.

Input: ``extract/<split>`` shards with ``latent`` [N, S, D]. Output: ``aggregate/<split>.safetensors`` with
``entropy`` [N, D] (float64), ``labels`` [N] when extracted, and the config hash in the file's metadata.
Shards are processed one at a time, so memory is bounded by the shard size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import Progress
from safetensors import safe_open

from larex import io
from larex.entropy import knn_entropy
from larex.stages import common
from larex.stages.extract import extract_dir


def aggregate_dir(cfg: DictConfig) -> Path:
    return common.run_dir(cfg) / "aggregate"


def aggregate_path(cfg: DictConfig, split: str) -> Path:
    return aggregate_dir(cfg) / f"{split}.safetensors"


def is_current(path: Path, cfg_hash: str) -> bool:
    if not path.is_file():
        return False
    with safe_open(str(path), framework="numpy") as f:
        return (f.metadata() or {}).get("config_hash") == cfg_hash


def split_entropy(directory: Path, k: int | None, min_dist: float, device: torch.device) -> dict[str, np.ndarray]:
    """Entropy of every shard of one extracted split, concatenated."""
    m = io.read_manifest(directory) or {}
    keys = ["latent"] + (["labels"] if "labels" in m.get("keys", {}) else [])
    ent, labels = [], []
    for shard in io.iter_shards(directory, keys):
        lat = torch.from_numpy(shard["latent"]).to(device=device, dtype=torch.float64)
        ent.append(knn_entropy(lat, k=k, min_dist=min_dist).cpu().numpy())
        if "labels" in shard:
            labels.append(shard["labels"])
    d = int(m["keys"]["latent"]["shape"][2]) if ent == [] else ent[0].shape[1]
    out = {"entropy": np.concatenate(ent) if ent else np.zeros((0, d))}
    if labels:
        out["labels"] = np.concatenate(labels)
    return out


def run(cfg: DictConfig, splits: list[str] | None = None) -> Path:
    splits = splits or common.all_splits(cfg)
    src, out = extract_dir(cfg), aggregate_dir(cfg)
    device = common.resolve_device(cfg.aggregate.device)
    todo = [s for s in splits if cfg.force or not is_current(aggregate_path(cfg, s), common.aggregate_hash(cfg, s))]
    if not todo:
        common.log("aggregate", f"up to date: {out}")
        return out
    for s in todo:
        if not io.is_complete(src / s, common.extract_hash(cfg, s)):
            raise FileNotFoundError(f"features of split {s} at {src / s} are missing, incomplete or from another "
                                    "config: run larex-extract with the same overrides first")
    k = cfg.aggregate.k
    with Progress(console=common.console, disable=not cfg.progress, transient=True) as progress:
        task = progress.add_task("[aggregate] LaREx entropy", total=len(todo))
        for s in todo:
            feats = split_entropy(src / s, None if k is None else int(k), float(cfg.aggregate.min_dist), device)
            io.save_arrays(aggregate_path(cfg, s), feats, metadata={"config_hash": common.aggregate_hash(cfg, s),
                                                                   "split": s})
            progress.advance(task)
    common.log("aggregate", f"entropy of {', '.join(todo)} -> {out}")
    return out
