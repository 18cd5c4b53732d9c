"""``latent_mean`` [N, D]: the MC mean of the hooked layer's latents over the S passes."""
from __future__ import annotations

import torch

from larex.aggregation.base import Estimator


class LatentMean(Estimator):
    """Mean over the S MC samples of each latent dimension (an MC estimate of the dropout-averaged activation)."""

    name = "mean"
    output = "latent_mean"

    def compute(self, latent: torch.Tensor) -> torch.Tensor:
        mean = latent.mean(dim=1)
        if not torch.isfinite(mean).all():  # a NaN/Inf sample makes its mean NaN/Inf
            raise ValueError("latent_mean: the MC latents hold NaN/Inf; check the model and the hooked layer")
        return mean
