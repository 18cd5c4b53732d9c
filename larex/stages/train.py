"""Train stage: fit the classifier on the ID ``fit`` split (Lightning), save weights as safetensors.

Output: ``<root>/<task>/<dataset>/<model>/checkpoint-<hash>/model.safetensors`` + ``manifest.json`` (the folder is
keyed by the training config's hash, so sweeps over model settings keep every model). Skipped when the manifest is
complete, or when ``train.checkpoint`` points at given weights. Two jobs that need the same model train it once
(a claim lock; the second waits and reuses it).
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import save

from larex import io
from larex.stages import common

CHECKPOINT = common.CHECKPOINT
checkpoint_dir = common.checkpoint_dir
checkpoint_path = common.checkpoint_path


def build_model(cfg: DictConfig) -> torch.nn.Module:
    from larex.models.loading import build_network

    return build_network(cfg.model.net)


def with_mc_layer(cfg: DictConfig, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with the MC layer of ``hooked_layer.insert`` (:func:`larex.models.loading.with_mc_layer`)."""
    from larex.models.loading import with_mc_layer as insert

    return insert(model, common.plain(cfg.hooked_layer))


def load_model(cfg: DictConfig) -> torch.nn.Module:
    """The trained network (``train.checkpoint`` if given, else this config's train output), in eval mode."""
    from larex.models.loading import load_network

    return load_network(cfg.model.net, common.plain(cfg.hooked_layer), checkpoint_path(cfg),
                        f"model={cfg.model.name}")


def run(cfg: DictConfig, run=None) -> Path:
    from larex.layout import claim

    common.quiet_lightning()
    if cfg.train.get("checkpoint"):
        load_model(cfg)  # validates the given weights early
        common.log("train", f"using given weights {cfg.train.checkpoint}")
        return Path(str(cfg.train.checkpoint))
    if cfg.model.get("train") is None:
        common.log("train", f"model.train is null: {cfg.model.name} is used as built (its model.net weights, or "
                            "random init); nothing to train")
        return None
    run = run or common.prepare(cfg)
    out = checkpoint_dir(cfg)
    h = common.train_hash(cfg)
    if io.is_complete(out, h) and not cfg.force:
        return _up_to_date(out)
    with claim(out, "larex-train", on_wait=lambda who: common.log("train", f"waiting for {who} to train {out}")):
        if io.is_complete(out, h) and not cfg.force:  # another job trained it while we waited
            return _up_to_date(out)
        path = _train(cfg, out, h)
    run.layout.record("train", out, h, {"overrides": common.overrides()})
    return path


def _figures(info: dict) -> str:
    """``val accuracy 0.9123, val map50 0.6012`` from a training record's ``val_*`` figures."""
    return ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in info.items()
                     if k.startswith("val_") and isinstance(v, float))


def _up_to_date(out: Path) -> Path:
    m = io.read_manifest(out)
    recorded = {k: v for k, v in m.items() if k.startswith("val_") and isinstance(v, float)}
    common.log("train", f"up to date: {out} ({', '.join(f'{k}={v:.4f}' for k, v in recorded.items())})")
    return out / CHECKPOINT


def _train(cfg: DictConfig, out: Path, h: str) -> Path:
    common.seed_everything(int(cfg.seed))
    device = common.resolve_device(cfg.device)
    task = common.build_task(cfg)
    model = build_model(cfg)
    settings = {**common.plain(cfg.model.train), "seed": int(cfg.seed), "progress": bool(cfg.progress),
                "num_workers": int(cfg.train.num_workers), "image_size": common.plain(cfg.dataset.image_size),
                "names": [str(c) for c in (cfg.dataset.get("classes") or [])]}
    common.log("train", f"{cfg.model.name} on {cfg.dataset.name}: {settings.get('epochs')} epochs on {device}")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="larex-train-") as work:
        model, info = task.train_model(model, lambda split, raw=False: common.build_dataset(
            cfg, split, stage="train", task=task, raw=raw), settings, device, Path(work))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    io.write_bytes(out / CHECKPOINT, save(state))
    io.write_json(out / io.MANIFEST, {"complete": True, "config_hash": h, **info, "model": cfg.model.name,
                                      "dataset": cfg.dataset.name, "epochs": settings.get("epochs")})
    common.log("train", f"{_figures(info)} -> {out / CHECKPOINT}")
    return out / CHECKPOINT
