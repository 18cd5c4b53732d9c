"""Extract stage: per split, stream latents / logits / MC logits / penultimate / labels to safetensors shards.

Output: ``<run_dir>/extract/<split>/shard-*.safetensors + manifest.json`` and ``<run_dir>/extract/head.safetensors``.
A split whose manifest is complete with the same config hash is skipped; an interrupted split resumes at
its first missing shard (per-batch MC seeds depend only on the seed and the batch's first row, and shards
are a whole number of batches, so the resumed shards equal an uninterrupted run's).
"""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from larex import io
from larex.stages import common


def extract_dir(cfg: DictConfig) -> Path:
    return common.run_dir(cfg) / "extract"


def _progress_callbacks(cfg: DictConfig) -> list:
    if not cfg.progress:
        return []
    from pytorch_lightning.callbacks import RichProgressBar

    return [RichProgressBar(leave=True)]


def build_extractor(cfg: DictConfig, model: torch.nn.Module):
    from larex.extraction.module import FeatureExtractor

    hl = cfg.hooked_layer
    return FeatureExtractor(model, hooked_layer=str(hl.path), head=cfg.model.get("head"),
                            mc_samples=int(hl.mc_samples), keys=tuple(cfg.extract.features), seed=int(cfg.seed),
                            drop_prob=hl.get("drop_prob"), block_size=hl.get("block_size"),
                            mc_batch=cfg.extract.get("mc_batch"),
                            nac_layers=_nac_layers(cfg), odin=_odin(cfg))


def _odin(cfg: DictConfig) -> dict | None:
    """``extract.odin`` (optional, ``{temperature, epsilon}``) as a plain dict, or None when unset."""
    odin = cfg.extract.get("odin")
    return OmegaConf.to_container(odin, resolve=True) if isinstance(odin, DictConfig) else odin


def _nac_layers(cfg: DictConfig) -> tuple[str, ...]:
    """``extract.nac_layers`` (optional) as a tuple of dotted paths; a single string is one layer."""
    layers = cfg.extract.get("nac_layers") or ()
    return (str(layers),) if isinstance(layers, str) else tuple(str(p) for p in layers)


def check_layers(cfg: DictConfig) -> None:
    """Fail before any compute when ``hooked_layer.path`` or ``model.head`` names no module of the model."""
    from larex.extraction.hooks import resolve_module
    from larex.stages.train import build_model

    net = build_model(cfg)
    resolve_module(net, str(cfg.hooked_layer.path))
    if cfg.model.get("head"):
        resolve_module(net, str(cfg.model.head))


def shard_size(cfg: DictConfig) -> int:
    """Shard rows rounded up to a whole number of batches (keeps resumed shards identical)."""
    b = int(cfg.extract.batch_size)
    return max(1, -(-int(cfg.extract.shard_size) // b)) * b


def run(cfg: DictConfig, splits: list[str] | None = None) -> Path:
    from larex.extraction.writer import ShardPredictionWriter
    from larex.stages.train import load_model

    common.quiet_lightning()
    splits = splits or common.all_splits(cfg)
    out = extract_dir(cfg)
    todo = [s for s in splits if cfg.force or not io.is_complete(out / s, common.extract_hash(cfg, s))]
    if not todo:
        common.log("extract", f"up to date: {out}")
        return out
    device = common.resolve_device(cfg.device)
    check_layers(cfg)
    model = load_model(cfg)
    extractor = build_extractor(cfg, model)  # validates hooked layer / head names before any compute
    datasets = {s: common.build_dataset(cfg, s) for s in todo}  # fails early on a missing data root
    if extractor.head is not None:
        io.save_arrays(out / "head.safetensors", extractor.head_weights())
    for split in todo:
        ds = datasets[split]
        h = common.extract_hash(cfg, split)
        writer = io.ShardWriter(out / split, h, shard_size=shard_size(cfg), total=len(ds), resume=not cfg.force)
        start = writer.resume_row
        if start:
            common.log("extract", f"{split}: resuming at row {start}/{len(ds)}")
        subset = torch.utils.data.Subset(ds, range(start, len(ds))) if start else ds
        loader = torch.utils.data.DataLoader(subset, batch_size=int(cfg.extract.batch_size), shuffle=False,
                                             num_workers=int(cfg.extract.num_workers))
        common.log("extract", f"{split}: {len(ds)} images, S={cfg.hooked_layer.mc_samples} MC samples "
                             f"of {cfg.hooked_layer.path} on {device}")
        cb = ShardPredictionWriter(writer)
        trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False,
                             enable_progress_bar=bool(cfg.progress), callbacks=[cb, *_progress_callbacks(cfg)],
                             **common.lightning_accelerator(device))
        if len(subset):
            trainer.predict(extractor, dataloaders=loader, return_predictions=False)
        writer.close(extra={"split": split, "images": len(ds), "mc_samples": int(cfg.hooked_layer.mc_samples),
                            "hooked_layer": str(cfg.hooked_layer.path)})
    common.log("extract", f"wrote {', '.join(todo)} -> {out}")
    return out
