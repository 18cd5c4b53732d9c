"""Lightning callback that streams ``predict_step`` outputs into safetensors shards (bounded memory)."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

from larex.io import ShardWriter


class ShardPredictionWriter(BasePredictionWriter):
    """Hand each batch's feature dict to a :class:`~larex.io.ShardWriter` as soon as it is computed.

    Use with ``Trainer.predict(..., return_predictions=False)`` so no prediction is kept in memory.
    """

    def __init__(self, writer: ShardWriter):
        super().__init__(write_interval="batch")
        self.writer = writer
        self.rows = 0

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.writer.write(prediction)
        self.rows += len(next(iter(prediction.values())))
