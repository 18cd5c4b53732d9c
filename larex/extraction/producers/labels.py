"""``labels`` [N]: the ID class label of every row (-1 for OOD / unknown), from the data pipeline."""
from __future__ import annotations

import torch

from larex.extraction.producers.base import Producer


class Labels(Producer):
    name = "labels"
    provides = ("labels",)

    def __init__(self, keys=("labels",)):
        super().__init__(("labels",))

    def produce(self, model, x, y, index):
        return {"labels": torch.as_tensor(y).detach().to(device="cpu", dtype=torch.int64)}
