"""Extract stage: per split, run the planned producers and stream their arrays to safetensors shards.

Output (see :mod:`larex.layout`): ``extract-<hash>/<split>/<producer>-<hash>/shard-*.safetensors + manifest.json``
and ``extract-<hash>/model/<producer>-<hash>.safetensors`` for model-axis keys (the head). The plan comes from
the selected methods (``Postprocessor.fit_requires`` / ``requires`` / ``extraction_params``): only what they read
is extracted. A part whose manifest is complete and whose shards verify (size + sha256) is skipped; a missing or
corrupt shard is recomputed, nothing else. Two jobs needing the same split wait for each other (a claim lock).
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

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


def trainer_settings(cfg: DictConfig, device: torch.device) -> dict:
    """Lightning's accelerator, devices, nodes and strategy from ``device`` and ``extract.devices`` /
    ``extract.num_nodes`` / ``extract.strategy`` (``auto``: ``ddp`` when there is more than one process)."""
    ex = cfg.extract
    devices, nodes = ex.get("devices", 1), int(ex.get("num_nodes", 1) or 1)
    strategy = str(ex.get("strategy", "auto") or "auto")
    if devices in (1, "1") and nodes == 1 and strategy == "auto":
        return common.lightning_accelerator(device)  # one process on the selected device
    if nodes < 1:
        raise common.ConfigError(f"extract.num_nodes={nodes}: use an integer >= 1")
    if strategy in SPAWNING:
        raise common.ConfigError(
            f"extract.strategy={strategy} is not supported: every rank writes its shards from the stage's own "
            "process. Use extract.strategy=ddp (Lightning starts one process per device by re-running the "
            "command) or start one process per device yourself (srun / torchrun) with extract.strategy=ddp")
    accelerator = {"cuda": "gpu"}.get(device.type, device.type)
    return {"accelerator": accelerator, "devices": devices, "num_nodes": nodes,
            "strategy": "ddp" if strategy == "auto" else strategy}


SPAWNING = ("ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_spawn_find_unused_parameters_true",
            "ddp_fork_find_unused_parameters_true")


def _check_launch(trainer: pl.Trainer) -> None:
    """Lightning starts the other ranks by re-running the command line; under a Hydra multirun that would run the
    whole sweep again in each of them. (Ranks started by the cluster, srun / torchrun, are fine.)"""
    launcher = getattr(trainer.strategy, "launcher", None)
    env = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.world_size == 1 or launcher is None or env is None or env.creates_processes_externally:
        return
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise common.ConfigError(
            f"extract.devices / num_nodes > 1 in a multirun: Lightning would re-run the sweep in every rank. Run "
            "the multi-device extraction as a single run first (larex-extract extract.devices=N ...), then the "
            "sweep reuses it; or let the cluster start the ranks (hydra/launcher=slurm with "
            "hydra.launcher.tasks_per_node=N)")


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
    trainer_kw = trainer_settings(cfg, device)
    callbacks = _progress_callbacks(cfg)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=bool(cfg.progress), use_distributed_sampler=False,
                         callbacks=callbacks, **trainer_kw)
    _check_launch(trainer)
    rank, world = trainer.global_rank, trainer.world_size
    model = load_model(cfg).to(device)
    extractor = FeatureExtractor(model, producers=plan.producers)  # validates layer names before any compute
    if rank == 0:
        for p in missing_model:
            io.save_arrays(layout.model_file(p.part), p.model_arrays(model), metadata={"producer": repr(p)})
    if todo:
        datasets = {s: common.build_dataset(cfg, s, task=run.task) for s in todo}  # fails early on a missing data root
        with ExitStack() as claims:
            work, opened = None, {}
            if rank == 0:  # rank 0 claims the splits (sorted: two jobs never wait on each other) and decides
                for split in sorted(todo):
                    claims.enter_context(claim(layout.split_dir(split), "larex-extract", on_wait=lambda who, s=split:
                                               common.log("extract", f"{s}: waiting for {who}")))
                work, opened = _work(cfg, run, {s: todo_of(s) for s in todo}, datasets, row_producers)
            if work or world > 1:  # every rank enters the prediction, even with nothing left to do
                _predict(cfg, run, trainer, extractor, work, opened, datasets, row_producers, rank, world)
    if rank > 0:  # a rank Lightning (or the cluster) started for the extraction: its part is done
        raise SystemExit(0)
    layout.record("extract", layout.extract_dir, layout.extract_hash,
                  {"overrides": common.overrides(), "plan": plan.describe()})
    common.log("extract", f"wrote {', '.join(todo) or 'model arrays'}" + (f" ({world} ranks)" if world > 1 else "")
               + f" -> {layout.extract_dir}")
    return layout.extract_dir


def _writers(cfg, run, split, ds, producers, coordinator: bool) -> dict:
    """producer -> the ShardWriter of its part of ``split`` (``coordinator``: this rank owns the manifests)."""
    return {p: io.ShardWriter(run.layout.part_dir(split, p.part), run.part_hash(split, p.part),
                              shard_size=shard_size(cfg), total=len(ds), resume=not cfg.force, manifest=coordinator)
            for p in producers}


def _work(cfg, run, todo: dict, datasets: dict, row_producers: list) -> tuple[dict, dict]:
    """Rank 0: open the parts (resume: verified shards are kept) and list the shards each producer still needs;
    returns the work and the opened writers."""
    work: dict[str, dict[int, list[int]]] = {}
    opened: dict[str, dict] = {}
    rows = shard_size(cfg)
    for split, producers in todo.items():
        if not producers:  # another job wrote it while we waited on the claim
            continue
        ds = datasets[split]
        writers = opened[split] = _writers(cfg, run, split, ds, producers, coordinator=True)
        work[split] = {row_producers.index(p): w.missing_shards() for p, w in writers.items()}
        shards = sorted(set().union(*map(set, work[split].values())))
        n = sum(len(range(i * rows, min((i + 1) * rows, len(ds)))) for i in shards)
        if n < len(ds):
            common.log("extract", f"{split}: resuming: {n} of {len(ds)} rows (shards {shards}) to compute")
        what = ", ".join(f"{p.name}[{','.join(p.keys)}]" for p in producers)
        common.log("extract", f"{split}: {len(ds)} rows, {what} on {common.resolve_device(cfg.device)}")
    return work, opened


def _predict(cfg, run, trainer, extractor, work, opened, datasets, row_producers, rank, world) -> None:
    """One predict over the agreed work; each rank writes its own shards, rank 0 records every rank's and
    completes the manifests."""
    from larex.extraction.work import ShardRouter, WorkData

    rows = shard_size(cfg)
    writers: dict[str, dict] = {}

    def dataset(split):
        if split not in datasets:
            datasets[split] = common.build_dataset(cfg, split, task=run.task)
        return datasets[split]

    def open_writers(agreed):
        for split, per in agreed.items():
            ws = opened.get(split) or _writers(cfg, run, split, dataset(split), [row_producers[j] for j in per],
                                               coordinator=rank == 0)
            for j, w in zip(per, ws.values()):
                w.todo = set(per[j])
            writers[split] = ws

    data = WorkData(work, dataset, lambda split, i: range(i * rows, min((i + 1) * rows, len(dataset(split)))),
                    int(cfg.extract.batch_size), int(cfg.extract.num_workers), run.task.collate)
    data.on_work = open_writers
    router = ShardRouter(data, writers)
    trainer.callbacks.append(router)
    extractor.select = lambda index, batch_idx: router.active(*data.unit(batch_idx))
    try:
        trainer.predict(extractor, datamodule=data, return_predictions=False)
    finally:
        extractor.select = None
        trainer.callbacks.remove(router)
    if router.pending:
        raise RuntimeError(f"extraction ended with incomplete shards {sorted(router.pending)}")
    if world > 1:
        import torch.distributed as dist

        mine = {(s, j): w.written for s, ws in writers.items() for j, w in enumerate(ws.values())}
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank > 0:
            return
        for other in gathered[1:]:
            for (s, j), written in other.items():
                list(writers[s].values())[j].add_written(written)
    for split, ws in writers.items():
        for p, w in ws.items():
            w.close(extra={"split": split, "producer": repr(p)})
