"""scikit-learn's bundled 8×8 handwritten digits (offline), upsampled to the ID image size."""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from larex.data.base import image_hw

__all__ = ["SklearnDigits"]


class SklearnDigits(Dataset):
    """The 1797 images of ``sklearn.datasets.load_digits``: values 0..16 scaled to [0, 1], resized once
    (bilinear, antialiased, as :class:`~larex.data.base.ModelInput` would) to ``image_size``: an int ``S``
    (``S``×``S``) or a pair ``[H, W]`` (stretched; pass ``image_size=8`` to keep the native 8×8 and let
    ``ModelInput`` letterbox). Items: ``([1, H, W] float32, digit)``."""

    def __init__(self, image_size: int | Sequence[int] = 28):
        from sklearn.datasets import load_digits

        size = image_hw(image_size, "SklearnDigits: image_size (set from dataset.image_size)")
        bunch = load_digits()
        x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8]
        if size != (8, 8):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        self.data = x.clamp_(0.0, 1.0).contiguous()
        self.targets = np.asarray(bunch.target, dtype=np.int64)
        self.classes = [str(d) for d in range(10)]
        self.image_size = int(image_size) if isinstance(image_size, numbers.Integral) else size  # as given

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.data[i], int(self.targets[i])
