"""Ground-truth objects of a detection split (``gt`` rows): original-frame boxes and ID labels (-1 = unknown)."""
from __future__ import annotations

import torch

from larex.extraction.producers.base import Producer


class GroundTruth(Producer):
    name = "gt"
    provides = ("gt_image_index", "gt_boxes", "gt_labels")

    def __init__(self, keys=provides):
        super().__init__(self.provides)

    def produce(self, model, x, y, index):
        counts = torch.tensor([len(t["labels"]) for t in y], dtype=torch.int64)
        boxes = [torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4) for t in y]
        labels = [torch.as_tensor(t["labels"], dtype=torch.int64).reshape(-1) for t in y]
        return {"gt_image_index": index.cpu().to(torch.int64).repeat_interleave(counts),
                "gt_boxes": torch.cat(boxes) if boxes else torch.zeros(0, 4),
                "gt_labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)}
