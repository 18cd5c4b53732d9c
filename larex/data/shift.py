"""Synthetic covariate shift: Gaussian blur then additive Gaussian noise, deterministic per index."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from larex.data.base import WrapsTargets

__all__ = ["gaussian_blur", "CovariateShift", "SEVERITY_TABLE"]

# severity -> (blur sigma in pixels of a 32-px image, noise std on the [0, 1] scale). The values are the
# CIFAR-10-C `gaussian_blur` and `gaussian_noise` magnitudes (Hendrycks & Dietterich, 2019); the sigma is
# rescaled by (image side / 32) at use, e.g. severity 3 on 28 px: sigma 0.6125 px, std 0.08.
SEVERITY_TABLE: dict[int, tuple[float, float]] = {
    1: (0.4, 0.04),
    2: (0.6, 0.06),
    3: (0.7, 0.08),
    4: (0.8, 0.09),
    5: (1.0, 0.10),
}


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[C, H, W]`` or ``[N, C, H, W]`` images; reflect padding, radius ceil(3σ)."""
    if sigma <= 0:
        return images
    single = images.ndim == 3
    x = images[None] if single else images
    n, c, h, w = x.shape
    radius = max(1, min(int(math.ceil(3.0 * sigma)), h - 1, w - 1))
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (k / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0] if single else x


class CovariateShift(WrapsTargets):
    """``dataset`` with Gaussian blur (``blur_sigma`` px) then additive Gaussian noise (``noise_std``), clipped
    to [0, 1]. ``severity`` 1..5 picks both from :data:`SEVERITY_TABLE`; explicit values override. The noise
    of item ``i`` comes from a generator seeded with ``seed + i``. Labels are kept."""

    def __init__(self, dataset, severity: int = 3, blur_sigma: float | None = None,
                 noise_std: float | None = None, seed: int = 0):
        if int(severity) not in SEVERITY_TABLE:
            raise ValueError(f"CovariateShift: severity must be 1..5, got {severity!r}")
        if blur_sigma is not None and blur_sigma < 0 or noise_std is not None and noise_std < 0:
            raise ValueError(f"CovariateShift: blur_sigma/noise_std must be >= 0, got {blur_sigma!r}/{noise_std!r}")
        self.dataset = dataset
        self.severity = int(severity)
        self.blur_sigma = blur_sigma
        self.noise_std = noise_std
        self.seed = int(seed)

    def params(self, image_side: int) -> tuple[float, float]:
        """(blur sigma in px, noise std) used for images whose shorter side is ``image_side``."""
        sigma32, std = SEVERITY_TABLE[self.severity]
        sigma = float(self.blur_sigma) if self.blur_sigma is not None else sigma32 * image_side / 32.0
        return sigma, float(self.noise_std) if self.noise_std is not None else std

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        sigma, std = self.params(min(image.shape[-2:]))
        x = gaussian_blur(image.float(), sigma)
        if std > 0:
            g = torch.Generator().manual_seed(self.seed + int(i))
            x = x + std * torch.randn(x.shape, generator=g, dtype=x.dtype)
        return x.clamp(0.0, 1.0), label
