"""scikit-learn's bundled 8×8 handwritten digits (offline), upsampled to the ID image size."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["SklearnDigits"]


class SklearnDigits(Dataset):
    """The 1797 images of ``sklearn.datasets.load_digits``: values 0..16 scaled to [0, 1], resized once
    (bilinear) to ``image_size``×``image_size``. Items: ``([1, S, S] float32, digit)``."""

    def __init__(self, image_size: int = 28):
        from sklearn.datasets import load_digits

        if int(image_size) < 1:
            raise ValueError(f"SklearnDigits: image_size must be >= 1, got {image_size!r}")
        bunch = load_digits()
        x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8]
        if int(image_size) != 8:
            x = F.interpolate(x, size=(int(image_size), int(image_size)), mode="bilinear",
                              align_corners=False, antialias=True)
        self.data = x.clamp_(0.0, 1.0).contiguous()
        self.targets = np.asarray(bunch.target, dtype=np.int64)
        self.classes = [str(d) for d in range(10)]
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.data[i], int(self.targets[i])
