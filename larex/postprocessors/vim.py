"""ViM: Virtual-logit Matching (Wang et al., CVPR 2022) on penultimate features and logits."""
from __future__ import annotations

import numbers

import numpy as np

from larex.postprocessors._features import check_logits_classes, energy, f64, head
from larex.postprocessors.base import Postprocessor


def default_dim(n_features: int) -> int:
    """Principal-subspace size of the reference code: 1000 if F >= 2048, 512 if F >= 768, else F // 2."""
    if n_features >= 2048:
        return 1000
    if n_features >= 768:
        return 512
    return n_features // 2


class ViM(Postprocessor):
    """Virtual-logit matching:

    ``score(x) = logsumexp(logits(x)) - alpha * || (x - u) R R^T ||``,

    with origin u = -pinv(W) b (W, b the final linear layer), R the eigenvectors of the (uncentred, 1/N)
    second-moment matrix of the shifted fit features outside its top-``dim`` principal subspace, and
    alpha = mean max-logit / mean residual norm over the fit split.

    Args:
        dim: principal-subspace size D (< F), or "auto": the reference code's rule
            (1000 if F >= 2048, 512 if F >= 768, else F // 2; e.g. 64 for F = 128, 256 for F = 512).

    Fitted: ``origin_`` [F], ``residual_basis_`` [F, F - D], ``alpha_``.
    """

    requires = ("penultimate", "logits", "head.weight", "head.bias")
    name = "vim"

    def __init__(self, dim: int | str = "auto") -> None:
        if not (dim == "auto" or (isinstance(dim, numbers.Integral) and not isinstance(dim, bool) and dim >= 1)):
            raise ValueError(f"vim: dim must be a positive integer or 'auto', got {dim!r}")
        self.dim = dim if dim == "auto" else int(dim)

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        w, b = head(arrays, self.name)
        logits = f64(arrays["logits"])
        check_logits_classes(logits, w.shape[0], self.name)
        x = f64(arrays["penultimate"])
        f = x.shape[1]
        d = default_dim(f) if self.dim == "auto" else self.dim
        if not 1 <= d < f:
            raise ValueError(f"vim: dim={d} must be in [1, F) for F={f} features; lower dim (or use 'auto')")
        self.origin_ = -np.linalg.pinv(w) @ b
        xc = x - self.origin_
        _, vecs = np.linalg.eigh(xc.T @ xc / x.shape[0])  # ascending eigenvalues
        self.residual_basis_ = np.ascontiguousarray(vecs[:, : f - d])
        residual = np.linalg.norm(xc @ self.residual_basis_, axis=1).mean()
        if not residual > 0:
            raise ValueError(
                f"vim: the fit features have no component outside the top-{d} principal subspace; lower dim"
            )
        self.alpha_ = float(logits.max(axis=1).mean() / residual)
        self.dim_ = d

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        logits = f64(arrays["logits"])
        check_logits_classes(logits, arrays["head.weight"].shape[0], self.name)
        residual = np.linalg.norm((f64(arrays["penultimate"]) - self.origin_) @ self.residual_basis_, axis=1)
        return energy(logits) - self.alpha_ * residual

    def _fitted_state(self) -> dict[str, np.ndarray]:
        return {"origin": self.origin_, "residual_basis": self.residual_basis_,
                "alpha": np.array([self.alpha_])}

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        missing = [k for k in ("origin", "residual_basis", "alpha") if k not in state]
        if missing:
            raise ValueError(f"ViM state lacks {missing} (has {sorted(state)}); export it with fitted_state()")
        self.origin_, self.residual_basis_ = f64(state["origin"]), f64(state["residual_basis"])
        self.alpha_ = float(np.asarray(state["alpha"]).reshape(-1)[0])
        self.dim_ = self.origin_.shape[0] - self.residual_basis_.shape[1]
