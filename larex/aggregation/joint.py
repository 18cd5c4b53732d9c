"""Joint kNN entropy of the whole latent vector, as the LaREx reference's ``get_dl_h_z`` also returns.

For input i, the S MC samples are S points in D dims; the Kozachenko-Leonenko estimate with the max-norm is

    H_joint = -digamma(k) + digamma(S) + (D / S) * sum_p log(2 * max(d_k(p), min_dist)),

``d_k(p)`` the Chebyshev distance from sample p to its k-th nearest other sample: the value of
``entropy_estimators.continuous.get_h(samples[i], k=k, norm="max", min_dist=min_dist)``. Computed for all
inputs at once from the [n, S, S] Chebyshev distance matrices (``torch.cdist(p=inf)``, chunked over inputs). With ``marginals`` (the
default) the output is the per-dimension kNN entropy with the joint one appended, ``[N, D + 1]``; without,
``[N, 1]``.
"""
from __future__ import annotations

import torch
from scipy.special import digamma

from larex.aggregation.base import Estimator, check_min
from larex.aggregation.knn import check_k, resolve_k
from larex.entropy import knn_entropy

_CHUNK_ELEMENTS = 64 * 1024 * 1024  # input elements (n * S * D) per cdist call


def joint_knn_entropy(latent: torch.Tensor, k: int, min_dist: float = 1e-5) -> torch.Tensor:
    """``[N]`` joint max-norm kNN entropy of each input's S samples in D dims (``latent`` [N, S, D])."""
    n, s, d = latent.shape
    if not 1 <= k < s:
        raise ValueError(f"joint kNN entropy needs 1 <= k < S={s}; got k={k}")
    out = torch.empty(n, dtype=latent.dtype, device=latent.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, s * max(s, d)))
    const = float(-digamma(k) + digamma(s))
    for i0 in range(0, n, step):
        x = latent[i0:i0 + step]
        cheb = torch.cdist(x, x, p=float("inf"))  # [n, S, S] max-norm distances, 0 on the diagonal
        # row p in ascending order: p itself first (distance 0, as are duplicates), then its k-th other neighbour
        dk = torch.kthvalue(cheb, k + 1, dim=-1).values.clamp_min(min_dist)
        out[i0:i0 + step] = const + (d / s) * torch.log(2.0 * dk).sum(dim=1)
    if not torch.isfinite(out).all():  # NaN/Inf samples give NaN/Inf distances
        raise ValueError("joint kNN entropy: the MC latents hold NaN/Inf; check the model and the hooked layer")
    return out


class JointKNNEntropy(Estimator):
    """Per-dimension kNN entropy ++ joint kNN entropy of the latent vector (``marginals``), or the joint alone.

    Args: k (null = reference default, int, or "sqrt"), min_dist, marginals (append to the per-dim entropy).
    """

    name = "joint"

    def __init__(self, k: int | str | None = None, min_dist: float = 1e-5, marginals: bool = True):
        self.k = check_k(k)
        self.min_dist = check_min("joint kNN entropy min_dist", min_dist, 0.0)
        self.marginals = bool(marginals)

    def params(self):
        return {"k": self.k, "min_dist": self.min_dist, "marginals": self.marginals}

    def compute(self, latent: torch.Tensor) -> torch.Tensor:
        k = resolve_k(self.k, latent.shape[1])
        joint = joint_knn_entropy(latent, k, self.min_dist)[:, None]
        if not self.marginals:
            return joint
        return torch.cat([knn_entropy(latent, k=k, min_dist=self.min_dist), joint], dim=1)
