"""Detection dataset wrappers shared by every detection source (generated shapes, COCO-format folders)."""
from __future__ import annotations

import torch

from larex.data.base import AsOOD


class UnknownObjects(AsOOD):
    """A detection dataset used as OOD: same images and boxes, every object's label ``-1`` (an unknown class),
    image-level target -1. ``known`` (class indices of the wrapped set) keeps those objects' labels instead, for
    OOD images that also hold ID objects (map their labels to the ID classes in the wrapped set's config)."""

    def __init__(self, dataset, known: list[int] | None = None):
        super().__init__(dataset)
        self.known = tuple(int(k) for k in (known or ()))

    def __getitem__(self, i: int):
        image, target = self.dataset[i]
        labels = torch.as_tensor(target["labels"])
        keep = torch.isin(labels, torch.tensor(self.known, dtype=labels.dtype)) if self.known else \
            torch.zeros_like(labels, dtype=torch.bool)
        return image, {**target, "labels": torch.where(keep, labels, torch.full_like(labels, -1))}
