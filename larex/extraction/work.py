"""The extraction's work -- which shards of which splits each producer still needs -- split over Lightning ranks.

One ``Trainer.predict`` runs all of it. The unit of work is a whole shard ``(split, shard)``: rank ``r`` of ``W``
takes units ``r, r + W, ...`` (no ``DistributedSampler``: it would spread a shard's rows over ranks and pad with
repeated rows), computes their rows in batches that never span two shards, and writes each shard file itself.
Rank 0 decides the work (it holds the split claims and reads the manifests) and broadcasts it when the process
group is up (:meth:`WorkData.setup`); after the prediction each rank reports the shards it wrote and rank 0 checks
and records them and completes the manifests. An image's arrays depend only on the image and the seed, so every
shard is byte-identical to the one a single process writes.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from larex import io

Work = dict[str, dict[int, list[int]]]
"""split -> position of the producer in the plan -> indices of the shards it still has to write."""


def units(work: Work) -> list[tuple[str, int]]:
    """Every ``(split, shard)`` some producer needs, splits in the work's order, shards ascending."""
    return [(split, shard) for split, per in work.items()
            for shard in sorted(set().union(*map(set, per.values())) if per else ())]


def rank_units(work: Work, rank: int, world: int) -> list[tuple[str, int]]:
    """The units of rank ``rank`` of ``world``: every ``world``-th, so the ranks get about the same rows."""
    return units(work)[rank::world]


class _Rows(torch.utils.data.Dataset):
    """The rows of a rank's units, one flat index space: unit ``u`` covers ``[offsets[u], offsets[u + 1])``."""

    def __init__(self, datasets: Mapping[str, Any], spans: Sequence[tuple[str, range]]):
        self.datasets = datasets
        self.spans = list(spans)
        self.offsets = np.concatenate([[0], np.cumsum([len(r) for _, r in self.spans])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        u = bisect.bisect_right(self.offsets, i) - 1
        split, rows = self.spans[u]
        return self.datasets[split][rows[i - int(self.offsets[u])]]


class _Batches(torch.utils.data.Sampler):
    """Batches of at most ``batch_size`` rows inside one unit each (shard sizes are whole batches)."""

    def __init__(self, offsets: np.ndarray, batch_size: int):
        self.bounds = [(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:])]
        self.batch_size = batch_size

    def __iter__(self):
        for a, b in self.bounds:
            for i in range(a, b, self.batch_size):
                yield list(range(i, min(i + self.batch_size, b)))

    def __len__(self) -> int:
        return sum(-(-(b - a) // self.batch_size) for a, b in self.bounds)

    def unit_of_batch(self) -> list[int]:
        """Unit index of every batch, in the order the sampler yields them."""
        return [u for u, (a, b) in enumerate(self.bounds) for _ in range(-(-(b - a) // self.batch_size))]


class WorkData(pl.LightningDataModule):
    """The predict loader of this rank's share of ``work`` (rank 0's, broadcast to the others at set-up).

    Args: work (rank 0: the work; other ranks: None), dataset (split -> its dataset), shard_rows (split, shard ->
    image rows of the shard), batch_size, num_workers, collate."""

    def __init__(self, work: Work | None, dataset: Callable[[str], Any], shard_rows: Callable[[str, int], range],
                 batch_size: int, num_workers: int, collate: Callable):
        super().__init__()
        self.work = work
        self.dataset = dataset
        self.shard_rows = shard_rows
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.collate = collate
        self.spans: list[tuple[str, int]] = []
        self.batch_units: list[int] = []
        self.on_work: Callable[[Work], None] | None = None  # called with the agreed work (writers are opened)

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer.world_size > 1:
            self.work = trainer.strategy.broadcast(self.work if trainer.global_rank == 0 else None, src=0)
        if self.on_work is not None:
            self.on_work(self.work)
        self.spans = rank_units(self.work, trainer.global_rank, trainer.world_size)

    def predict_dataloader(self):
        rows = _Rows({s: self.dataset(s) for s in dict.fromkeys(s for s, _ in self.spans)},
                     [(s, self.shard_rows(s, i)) for s, i in self.spans])
        sampler = _Batches(rows.offsets, self.batch_size)
        self.batch_units = sampler.unit_of_batch()
        return torch.utils.data.DataLoader(rows, batch_sampler=sampler, num_workers=self.num_workers,
                                           collate_fn=self.collate)

    def unit(self, batch_idx: int) -> tuple[str, int]:
        """``(split, shard)`` of this rank's batch ``batch_idx``."""
        return self.spans[self.batch_units[batch_idx]]


class ShardRouter(BasePredictionWriter):
    """Collect each batch's arrays per producer and write a shard as soon as its rows are complete.

    ``writers``: split -> producer -> :class:`~larex.io.ShardWriter` (their ``todo``: the shards to write)."""

    def __init__(self, data: WorkData, writers: dict[str, dict[Any, io.ShardWriter]]):
        super().__init__(write_interval="batch")
        self.data = data
        self.writers = writers
        self.pending: dict[tuple[str, int, int], list] = {}

    def active(self, split: str, shard: int) -> list:
        return [p for p, w in self.writers[split].items() if shard in w.todo]

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        split, shard = self.data.unit(batch_idx)
        n = len(torch.as_tensor(batch[2]).reshape(-1))
        for j, (producer, writer) in enumerate(self.writers[split].items()):
            if shard not in writer.todo:
                continue
            buf = self.pending.setdefault((split, j, shard), [])
            buf.append((n, {k: prediction[k] for k in producer.keys}))
            if sum(m for m, _ in buf) == len(writer.shard_rows(shard)):  # image rows of the shard complete
                writer.write_shard(shard, {k: np.concatenate([io.to_numpy(a[k]) for _, a in buf])
                                           for k in producer.keys})
                del self.pending[(split, j, shard)]
