"""Synthetic far-OOD images: uniform noise, Gaussian noise, or blobs."""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from larex.data.base import image_hw
from larex.data.shift import gaussian_blur

__all__ = ["NoiseImages"]

_KINDS = ("uniform", "gaussian", "blobs")


class NoiseImages(Dataset):
    """``n`` images ``[channels, H, W]`` in [0, 1], label -1 (no class); ``image_size`` is an int ``S``
    (``H = W = S``) or a pair ``[H, W]``. Item ``i`` comes from a generator seeded with ``seed + i``
    (deterministic, independent of access order).

    kinds: ``uniform`` U(0, 1); ``gaussian`` N(0.5, 0.25²) clipped; ``blobs`` (Hendrycks et al., Outlier
    Exposure): Bernoulli(0.7) pixels, Gaussian blur σ = 1.5·side/32 (side = min(H, W)), values below 0.75
    set to 0.
    """

    def __init__(self, n: int = 2000, channels: int = 1, image_size: int | Sequence[int] = 28,
                 kind: str = "uniform", seed: int = 0):
        if kind not in _KINDS:
            raise ValueError(f"NoiseImages: kind must be one of {_KINDS}, got {kind!r}")
        if int(n) < 0 or int(channels) < 1:
            raise ValueError(f"NoiseImages: need n >= 0, channels >= 1; got n={n}, channels={channels}")
        self.size = image_hw(image_size, "NoiseImages: image_size (set from dataset.image_size)", min_side=2)
        self.n, self.channels = int(n), int(channels)
        self.image_size = int(image_size) if isinstance(image_size, numbers.Integral) else self.size  # as given
        self.kind, self.seed = kind, int(seed)
        self.targets = np.full(self.n, -1, dtype=np.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not -self.n <= i < self.n:
            raise IndexError(f"NoiseImages index {i} out of range for {self.n} images")
        i = int(i) % self.n
        g = torch.Generator().manual_seed(self.seed + i)
        shape = (self.channels, *self.size)
        if self.kind == "uniform":
            x = torch.rand(shape, generator=g)
        elif self.kind == "gaussian":
            x = 0.5 + 0.25 * torch.randn(shape, generator=g)
        else:
            x = torch.bernoulli(torch.full(shape, 0.7), generator=g)
            x = gaussian_blur(x, 1.5 * min(self.size) / 32.0)
            x = torch.where(x < 0.75, torch.zeros_like(x), x)
        return x.clamp(0.0, 1.0), -1
