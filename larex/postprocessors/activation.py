"""Activation / weight shaping baselines: the penultimate features (or the final layer) are modified, the
final linear layer is re-applied and the energy ``logsumexp(logits)`` is the score (higher = more ID).

``react`` (clipping), ``ash`` (pruning + shaping), ``scale`` (scaling) and ``dice`` (weight
sparsification). Percentiles are percentages in [0, 100). ASH and SCALE assume non-negative (post-ReLU)
activations, as in their papers.
"""
from __future__ import annotations

import numpy as np

from larex.postprocessors._features import check_percentile, energy, f64, head
from larex.postprocessors.base import Postprocessor


def _energy_of(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return energy(x @ w.T + b)


def kept_count(n_features: int, percentile: float) -> int:
    """Activations kept per sample by ASH / SCALE: ``F - round(F * p / 100)`` (reference code rounding)."""
    return n_features - int(np.round(n_features * percentile / 100.0))


def top_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest entries of each row of ``x`` [N, F] (ties broken arbitrarily)."""
    idx = np.argpartition(x, x.shape[1] - k, axis=1)[:, x.shape[1] - k:]
    mask = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def _check_kept(n_features: int, percentile: float, name: str) -> int:
    k = kept_count(n_features, percentile)
    if k < 1:
        raise ValueError(f"{name}: percentile={percentile} keeps no activation of F={n_features}; lower percentile")
    return k


def _ratio(s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """s1 / s2 with 0 where s2 == 0 (an all-zero activation vector: its scale factor is irrelevant)."""
    return np.divide(s1, s2, out=np.zeros_like(s1), where=s2 != 0)


class ReAct(Postprocessor):
    """ReAct (Sun et al., NeurIPS 2021): ``score(x) = logsumexp(W min(x, c) + b)``, c the ``percentile``-th
    percentile of all fit-split penultimate activations (90, the paper's default).

    Fitted: ``threshold_``.
    """

    requires = ("penultimate", "head.weight", "head.bias")
    name = "react"

    def __init__(self, percentile: float = 90.0) -> None:
        self.percentile = check_percentile(percentile, self.name)

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        head(arrays, self.name)
        self.threshold_ = float(np.percentile(f64(arrays["penultimate"]), self.percentile))

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        w, b = head(arrays, self.name)
        return _energy_of(np.minimum(f64(arrays["penultimate"]), self.threshold_), w, b)

    def _fitted_state(self) -> dict[str, np.ndarray]:
        return {"threshold": np.array([self.threshold_])}

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        if "threshold" not in state:
            raise ValueError(f"ReAct state needs 'threshold', got {sorted(state)}")
        self.threshold_ = float(np.asarray(state["threshold"]).reshape(-1)[0])


class ASH(Postprocessor):
    """Activation SHaping (Djurisic et al., ICLR 2023), per sample on the penultimate features: keep the
    top ``F - round(F p / 100)`` activations, zero the rest, then

    * ``ash-p``: keep them as they are;
    * ``ash-b``: set each kept one to ``s1 / k`` (s1 = sum of all activations, k = number kept);
    * ``ash-s``: multiply the kept ones by ``exp(s1 / s2)`` (s2 = sum of the kept activations);

    and score ``logsumexp(W a + b)``. Defaults: ASH-S at p = 90 (the paper's recommended setting).
    Fit-free.
    """

    requires = ("penultimate", "head.weight", "head.bias")
    name = "ash"
    needs_fit = False
    VARIANTS = ("ash-p", "ash-b", "ash-s")

    def __init__(self, variant: str = "ash-s", percentile: float = 90.0) -> None:
        if variant not in self.VARIANTS:
            raise ValueError(f"ash: variant must be one of {self.VARIANTS}, got {variant!r}")
        self.variant = variant
        self.percentile = check_percentile(percentile, self.name)

    def shape(self, x: np.ndarray) -> np.ndarray:
        """Shaped activations [N, F] (float64)."""
        x = f64(x)
        k = _check_kept(x.shape[1], self.percentile, self.name)
        mask = top_mask(x, k)
        pruned = np.where(mask, x, 0.0)
        if self.variant == "ash-p":
            return pruned
        s1 = x.sum(axis=1)
        if self.variant == "ash-b":
            return np.where(mask, (s1 / k)[:, None], 0.0)
        return pruned * np.exp(_ratio(s1, pruned.sum(axis=1)))[:, None]

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        w, b = head(arrays, self.name)
        return _energy_of(self.shape(arrays["penultimate"]), w, b)


class SCALE(Postprocessor):
    """SCALE (Xu et al., ICLR 2024): ``score(x) = logsumexp(W x exp(s1 / s2) + b)``, s1 the sum of all
    activations of x, s2 the sum of its top ``F - round(F p / 100)`` ones; nothing is pruned.
    Default p = 85 (the paper's ImageNet setting, also OpenOOD's). Fit-free.
    """

    requires = ("penultimate", "head.weight", "head.bias")
    name = "scale"
    needs_fit = False

    def __init__(self, percentile: float = 85.0) -> None:
        self.percentile = check_percentile(percentile, self.name)

    def factor(self, x: np.ndarray) -> np.ndarray:
        """Per-sample scale factor ``exp(s1 / s2)`` [N]."""
        x = f64(x)
        k = _check_kept(x.shape[1], self.percentile, self.name)
        s2 = np.where(top_mask(x, k), x, 0.0).sum(axis=1)
        return np.exp(_ratio(x.sum(axis=1), s2))

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        w, b = head(arrays, self.name)
        x = f64(arrays["penultimate"])
        return _energy_of(x * self.factor(x)[:, None], w, b)


class DICE(Postprocessor):
    """DICE (Sun & Li, ECCV 2022): keep only the weights whose contribution ``mean_fit(x)_j * W_cj`` exceeds
    the ``percentile``-th percentile of all C x F contributions (sparsity p = 90, the paper's value), and
    score ``logsumexp(W_masked x + b)``.

    Fitted: ``mask_`` [C, F] (bool), ``mean_activation_`` [F].
    """

    requires = ("penultimate", "head.weight", "head.bias")
    name = "dice"

    def __init__(self, percentile: float = 90.0) -> None:
        self.percentile = check_percentile(percentile, self.name)

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        w, _ = head(arrays, self.name)
        self.mean_activation_ = f64(arrays["penultimate"]).mean(axis=0)
        contrib = self.mean_activation_[None, :] * w
        self.mask_ = contrib > np.percentile(contrib, self.percentile)

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        w, b = head(arrays, self.name)
        if w.shape != self.mask_.shape:
            raise ValueError(
                f"dice: head.weight {w.shape} differs from the fitted mask {self.mask_.shape}; score with the "
                "head of the model the detector was fitted on"
            )
        return _energy_of(f64(arrays["penultimate"]), w * self.mask_, b)

    def _fitted_state(self) -> dict[str, np.ndarray]:
        return {"mask": self.mask_.astype(np.uint8), "mean_activation": self.mean_activation_}

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        missing = [k for k in ("mask", "mean_activation") if k not in state]
        if missing:
            raise ValueError(f"DICE state lacks {missing} (has {sorted(state)}); export it with fitted_state()")
        self.mask_ = np.asarray(state["mask"]).astype(bool)
        self.mean_activation_ = f64(state["mean_activation"])
