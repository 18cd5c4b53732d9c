"""Helpers shared by the stages: output layout, config hashes, datasets per split, device, console.

This is the only layer (with the stage modules) that reads Hydra/OmegaConf configs; everything it hands
down to ``data``, ``models``, ``extraction`` and ``postprocessors`` is plain Python objects.
"""
from __future__ import annotations

import importlib.resources
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from larex import io

console = Console(stderr=False, highlight=False)


def log(stage: str, message: str) -> None:
    """One progress line of a stage, e.g. ``[extract] fit: 10000 images``."""
    from rich.markup import escape

    console.print(f"\\[{stage}] {escape(message)}")


ID_SPLITS = ("fit", "val", "test")


class ConfigError(ValueError):
    """A configuration value is missing or invalid."""


def quiet_lightning() -> None:
    """Keep the console for larex's own lines: no Lightning/MLflow info chatter or known deprecations."""
    import warnings

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(spec: str) -> torch.device:
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec} but no CUDA device is available; use device=cpu or device=auto")
    return dev


def lightning_accelerator(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0]}
    return {"accelerator": "cpu", "devices": 1}


def plain(node: Any) -> Any:
    """Resolved plain-Python copy of a config node."""
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def sweep_info() -> dict[str, str] | None:
    """Sweep directory, job number and overrides when running as one job of a Hydra multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not launched by Hydra (tests, notebooks)
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return {"dir": str(Path(hc.sweep.dir).resolve()), "job": str(hc.job.num),
            "overrides": " ".join(hc.overrides.task)}


# ---------------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------------
def output_root(cfg: DictConfig) -> Path:
    return Path(str(cfg.output_root)).expanduser().resolve()


def model_dir(cfg: DictConfig) -> Path:
    """``<root>/<task>/<dataset>/<model>``: the trained checkpoint lives here (shared by hooked layers)."""
    return output_root(cfg) / cfg.task.name / cfg.dataset.name / cfg.model.name


def run_dir(cfg: DictConfig) -> Path:
    return io.run_dir(output_root(cfg), cfg.task.name, cfg.dataset.name, cfg.model.name, cfg.hooked_layer.name)


# ---------------------------------------------------------------------------------------------------
# splits and datasets
# ---------------------------------------------------------------------------------------------------
def packaged_options(group: str) -> list[str]:
    """Names of the YAML options of a config group shipped with the package."""
    d = importlib.resources.files("larex.configs") / group
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml")) if d.is_dir() else []


def load_packaged_option(group: str, name: str) -> DictConfig:
    """Load ``configs/<group>/<name>.yaml`` from the installed package (dataset.default_ood, baselines=all)."""
    res = importlib.resources.files("larex.configs") / group / f"{name}.yaml"
    if not res.is_file():
        raise ConfigError(f"unknown {group} config {name!r}; available: {packaged_options(group)}")
    return OmegaConf.create(res.read_text())


def ensure_ood(cfg: DictConfig) -> DictConfig:
    """Make ``cfg.ood`` hold the OOD sets: the ``+ood=[...]`` selection, else ``dataset.default_ood``."""
    if cfg.get("ood"):
        return cfg
    names = list(cfg.dataset.get("default_ood") or [])
    if not names:
        raise ConfigError("no OOD sets: add +ood=[name,...] (see configs/ood/) or set dataset.default_ood")
    with open_dict(cfg):
        cfg.ood = {n: load_packaged_option("ood", n) for n in names}
    return cfg


def ood_names(cfg: DictConfig) -> list[str]:
    return list(ensure_ood(cfg).ood.keys())


def all_splits(cfg: DictConfig) -> list[str]:
    return [*ID_SPLITS, *(f"ood/{n}" for n in ood_names(cfg))]


def split_spec(cfg: DictConfig, split: str) -> DictConfig:
    if split in ID_SPLITS:
        return cfg.dataset.splits[split]
    if split.startswith("ood/"):
        return ensure_ood(cfg).ood[split[4:]]
    raise ConfigError(f"unknown split {split!r}; expected one of {all_splits(cfg)}")


def split_limit(cfg: DictConfig, split: str, stage: str = "extract") -> int | None:
    """Subsample size of a split: ``train.limit.<split>`` for training, ``limit.<split>`` for extraction."""
    key = "ood" if split.startswith("ood/") else split
    limits = cfg.train.limit if stage == "train" else cfg.limit
    return limits.get(key)


def build_dataset(cfg: DictConfig, split: str, stage: str = "extract"):
    """Instantiate a split's dataset, subsample it (``limit``) and convert it to the model's input format."""
    from larex.data.base import ModelInput, Subsample

    spec = split_spec(cfg, split)
    try:
        ds = instantiate(spec)
    except Exception as err:  # Hydra wraps constructor errors; surface the original message
        cause = err
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        if cause is not err and isinstance(cause, (FileNotFoundError, ValueError)):
            raise type(cause)(f"split {split}: {cause}") from err
        raise
    limit = split_limit(cfg, split, stage)
    if limit is not None:
        ds = Subsample(ds, int(limit), seed=int(cfg.seed))
    d = cfg.dataset
    return ModelInput(ds, channels=int(d.channels), image_size=int(d.image_size),
                      mean=list(d.mean), std=list(d.std))


# ---------------------------------------------------------------------------------------------------
# config hashes (what each stage's outputs depend on)
# ---------------------------------------------------------------------------------------------------
def _dataset_identity(cfg: DictConfig) -> dict:
    d = plain(cfg.dataset)
    d.pop("default_ood", None)
    return d


def common_limits(node) -> dict:
    return {k: node.get(k) for k in ("fit", "val")}


def train_hash(cfg: DictConfig) -> str:
    return io.config_hash({
        "task": plain(cfg.task), "dataset": _dataset_identity(cfg), "model": plain(cfg.model),
        "seed": cfg.seed, "limit": common_limits(cfg.train.limit),
        "checkpoint": cfg.train.checkpoint,
    })


def extract_hash(cfg: DictConfig, split: str) -> str:
    ex = plain(cfg.extract)
    ex.pop("num_workers", None)
    return io.config_hash({
        "train": train_hash(cfg), "hooked_layer": plain(cfg.hooked_layer), "extract": ex,
        "split": plain(split_spec(cfg, split)), "limit": split_limit(cfg, split), "seed": cfg.seed,
        "image": [cfg.dataset.channels, cfg.dataset.image_size, plain(cfg.dataset.mean), plain(cfg.dataset.std)],
    })


def aggregate_hash(cfg: DictConfig, split: str) -> str:
    return io.config_hash({"extract": extract_hash(cfg, split), "k": cfg.aggregate.k,
                           "min_dist": cfg.aggregate.min_dist})
