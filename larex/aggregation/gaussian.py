"""Gaussian entropy per latent dimension: ``H_j = 1/2 log(2 pi e sigma_j^2)`` of the S MC samples.

``sigma_j`` is the sample standard deviation (``ddof=1``) of dimension j over the S passes, floored at
``min_std`` (a dimension that the masks never change has sigma 0; its entropy is then ``1/2 log(2 pi e
min_std^2)`` instead of ``-inf``). Exact for Gaussian samples and, unlike the kNN estimate, uses every sample
of every dimension: with S = 16 it has much less variance. It is the log of the MC std plus a constant, so
LaRED/LaREM on it model the per-dimension MC spread.
"""
from __future__ import annotations

import math

import torch

from larex.aggregation.base import Estimator, check_min


class GaussianEntropy(Estimator):
    """Args: min_std: floor of the per-dimension std (> 0); ddof: 1 (unbiased variance) or 0."""

    name = "gaussian"

    def __init__(self, min_std: float = 1e-5, ddof: int = 1):
        self.min_std = check_min("gaussian entropy min_std", min_std, 0.0)
        if self.min_std <= 0:
            raise ValueError("gaussian entropy min_std must be > 0 (it replaces sigma = 0, whose log is -inf)")
        if ddof not in (0, 1):
            raise ValueError(f"gaussian entropy ddof must be 0 or 1; got {ddof!r}")
        self.ddof = int(ddof)

    def params(self):
        return {"min_std": self.min_std, "ddof": self.ddof}

    def compute(self, latent: torch.Tensor) -> torch.Tensor:
        s = latent.shape[1]
        if s <= self.ddof:
            raise ValueError(f"gaussian entropy with ddof={self.ddof} needs at least {self.ddof + 1} MC samples; "
                             f"got S={s}")
        centred = latent - latent.mean(dim=1, keepdim=True)  # two-pass variance, one temporary, reductions
        var = centred.mul_(centred).sum(dim=1).div_(s - self.ddof)  # along S over contiguous rows of D
        if not torch.isfinite(var).all():  # a NaN/Inf sample makes its variance NaN/Inf (cheaper than scanning all)
            raise ValueError("gaussian entropy: the MC latents hold NaN/Inf; check the model and the hooked layer")
        return 0.5 * math.log(2.0 * math.pi * math.e) + torch.log(var.clamp_min(self.min_std ** 2)) * 0.5
