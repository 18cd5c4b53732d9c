"""LaREx kNN entropy per latent dimension (:func:`larex.entropy.knn_entropy`), with a fixed k or a rule of S.

``k: null`` is the reference default (5, or S - 1 when S <= 5) and reproduces the LaREx reference exactly;
the rules ``k: sqrt`` (``round(sqrt(S))``: 3 / 4 / 6 at S = 8 / 16 / 32, the usual bias/variance compromise for
kNN entropy estimates from few points) and ``k: half`` (``S // 2``: 4 / 8 / 16) grow with S, clipped to
``[1, S - 1]``; a fixed int must be below S.
"""
from __future__ import annotations

import math

import torch

from larex.aggregation.base import Estimator, check_min
from larex.entropy import default_k, knn_entropy

K_RULES = ("sqrt", "half")


def resolve_k(k: int | str | None, num_samples: int) -> int:
    """The neighbour order for S = ``num_samples``: ``None`` -> :func:`default_k`, ``"sqrt"`` -> round(sqrt(S)),
    ``"half"`` -> S // 2 (both in [1, S - 1]), an int as given (checked against S by :func:`knn_entropy`)."""
    if k is None:
        return default_k(num_samples)
    if k in K_RULES:
        if num_samples < 2:
            default_k(num_samples)  # raises the clear S >= 2 error
        value = round(math.sqrt(num_samples)) if k == "sqrt" else num_samples // 2
        return max(1, min(num_samples - 1, value))
    return int(k)


def check_k(k) -> int | str | None:
    if k is None or k in K_RULES:
        return k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"kNN entropy k must be null (reference default), an integer >= 1 or one of {K_RULES}; "
                         f"got {k!r}")
    return k


class KNNEntropy(Estimator):
    """Kozachenko-Leonenko entropy (max-norm) of each latent dimension over the S MC samples: ``[N, D]``.

    Args:
        k: neighbour order: null (reference default), an int in [1, S), "sqrt" (round(sqrt(S))) or "half" (S // 2).
        min_dist: floor of the k-th neighbour distance (the reference's 1e-5).
    """

    name = "knn"

    def __init__(self, k: int | str | None = None, min_dist: float = 1e-5):
        self.k = check_k(k)
        self.min_dist = check_min("kNN entropy min_dist", min_dist, 0.0)

    def params(self):
        return {"k": self.k, "min_dist": self.min_dist}

    def compute(self, latent: torch.Tensor) -> torch.Tensor:
        return knn_entropy(latent, k=resolve_k(self.k, latent.shape[1]), min_dist=self.min_dist)
