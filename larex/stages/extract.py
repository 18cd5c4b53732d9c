"""Extract stage: per split, run the planned producers and stream their arrays to safetensors shards.

Output (see :mod:`larex.layout`): ``extract-<hash>/<split>/<producer>-<hash>/shard-*.safetensors + manifest.json``
and ``extract-<hash>/model/<producer>-<hash>.safetensors`` for model-axis keys (the head). The plan comes from
the selected methods (``Postprocessor.fit_requires`` / ``requires`` / ``extraction_params``): only what they read
is extracted. A part whose manifest is complete and whose shards verify (size + sha256) is skipped; a missing or
corrupt shard is recomputed, nothing else. Two jobs needing the same split wait for each other (a claim lock).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import BasePredictionWriter

from larex import features, io
from larex.layout import claim
from larex.stages import common


def _progress_callbacks(cfg: DictConfig) -> list:
    if not cfg.progress:
        return []
    from pytorch_lightning.callbacks import RichProgressBar

    return [RichProgressBar(leave=True)]


def check_layers(cfg: DictConfig, run: common.Run | None = None) -> None:
    """Fail before any compute when a planned producer names a layer (hooked layer, head, NAC layer) that the
    model does not have; the error lists the closest module names."""
    from larex.extraction.module import FeatureExtractor
    from larex.stages.train import build_model, with_mc_layer

    run = run or common.prepare(cfg)
    FeatureExtractor(with_mc_layer(cfg, build_model(cfg)), producers=run.plan.producers)


def shard_size(cfg: DictConfig) -> int:
    """Shard rows rounded up to a whole number of batches (a batch never spans two shards)."""
    b = int(cfg.extract.batch_size)
    return max(1, -(-int(cfg.extract.shard_size) // b)) * b


class _ShardRouter(BasePredictionWriter):
    """Collect each batch's arrays per part and write a part's shard as soon as its rows are complete."""

    def __init__(self, writers: dict, shard_rows: int):
        super().__init__(write_interval="batch")
        self.writers = writers  # producer -> ShardWriter
        self.shard_rows = shard_rows
        self.pending: dict[tuple[int, int], list[dict]] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        index = torch.as_tensor(batch[2]).reshape(-1)
        shard = int(index[0]) // self.shard_rows
        for j, (producer, writer) in enumerate(self.writers.items()):
            if shard not in writer.todo:
                continue
            buf = self.pending.setdefault((j, shard), [])
            buf.append((len(index), {k: prediction[k] for k in producer.keys}))
            if sum(n for n, _ in buf) == len(writer.shard_rows(shard)):  # image rows of the shard complete
                writer.write_shard(shard, {k: np.concatenate([io.to_numpy(a[k]) for _, a in buf])
                                           for k in producer.keys})
                del self.pending[(j, shard)]


def run(cfg: DictConfig, run: common.Run | None = None, splits: list[str] | None = None) -> Path:
    from larex.extraction.module import FeatureExtractor
    from larex.stages.train import load_model

    common.quiet_lightning()
    run = run or common.prepare(cfg)
    layout, plan = run.layout, run.plan
    splits = splits or run.splits
    row_producers = [p for p in plan.producers if any(not features.is_model_key(k) for k in p.keys)]
    model_producers = [p for p in plan.producers if p not in row_producers]

    def todo_of(split: str) -> list:
        return [p for p in row_producers if cfg.force or not io.is_complete(
            layout.part_dir(split, p.part), run.part_hash(split, p.part), verify="sha256")]

    todo = {s: t for s in splits if (t := todo_of(s))}
    missing_model = [p for p in model_producers if cfg.force or not layout.model_file(p.part).is_file()]
    if not todo and not missing_model:
        common.log("extract", f"up to date: {layout.extract_dir} ({plan.describe()})")
        return layout.extract_dir
    device = common.resolve_device(cfg.device)
    model = load_model(cfg).to(device)
    extractor = FeatureExtractor(model, producers=plan.producers)  # validates layer names before any compute
    for p in missing_model:
        io.save_arrays(layout.model_file(p.part), p.model_arrays(model), metadata={"producer": repr(p)})
    datasets = {s: common.build_dataset(cfg, s, task=run.task) for s in todo}  # fails early on a missing data root
    rows = shard_size(cfg)
    for split in todo:
        with claim(layout.split_dir(split), "larex-extract",
                   on_wait=lambda who, s=split: common.log("extract", f"{s}: waiting for {who}")):
            producers = todo_of(split)  # another job may have written it while we waited
            if producers:
                _extract_split(cfg, run, split, datasets[split], producers, extractor, rows, device)
    layout.record("extract", layout.extract_dir, layout.extract_hash,
                  {"overrides": common.overrides(), "plan": plan.describe()})
    common.log("extract", f"wrote {', '.join(todo) or 'model arrays'} -> {layout.extract_dir}")
    return layout.extract_dir


def _extract_split(cfg, run, split, ds, producers, extractor, rows, device) -> None:
    layout = run.layout
    writers = {}
    for p in producers:
        w = io.ShardWriter(layout.part_dir(split, p.part), run.part_hash(split, p.part), shard_size=rows,
                           total=len(ds), resume=not cfg.force)
        w.todo = set(w.missing_shards())
        writers[p] = w
    shards = sorted(set().union(*(w.todo for w in writers.values())))
    index = [r for i in shards for r in range(i * rows, min((i + 1) * rows, len(ds)))]
    if len(index) < len(ds):
        common.log("extract", f"{split}: resuming: {len(index)} of {len(ds)} rows (shards {shards}) to compute")
    what = ", ".join(f"{p.name}[{','.join(p.keys)}]" for p in producers)
    common.log("extract", f"{split}: {len(ds)} rows, {what} on {device}")

    def active(batch_index):
        shard = int(torch.as_tensor(batch_index).reshape(-1)[0]) // rows
        return [p for p, w in writers.items() if shard in w.todo]

    extractor.select = active
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, index), batch_size=int(cfg.extract.batch_size),
                                         shuffle=False, num_workers=int(cfg.extract.num_workers),
                                         collate_fn=run.task.collate)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=bool(cfg.progress),
                         callbacks=[_ShardRouter(writers, rows), *_progress_callbacks(cfg)],
                         **common.lightning_accelerator(device))
    try:
        if index:
            trainer.predict(extractor, dataloaders=loader, return_predictions=False)
    finally:
        extractor.select = None
    for p, w in writers.items():
        w.close(extra={"split": split, "producer": repr(p)})
