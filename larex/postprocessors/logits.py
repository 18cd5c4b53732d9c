"""Logit-based OOD baselines: MSP, MaxLogit, Energy, Entropy, GEN, KL-Matching, ODIN (temperature only).

All scores are computed in float64 from log-softmax / logsumexp, so logits of magnitude 1e3 and more
neither overflow nor underflow into NaN. Samples are processed in row blocks of bounded memory; every
block is fully vectorized. Higher score = more in-distribution.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterator

import numpy as np
from scipy.special import log_softmax, logsumexp

from larex.postprocessors.base import Postprocessor

ODIN_KEY = "odin_logits"
"""Feature key of the logits of ODIN-perturbed inputs (written by the ODIN producer)."""

BLOCK_ELEMENTS = 1 << 18
"""float64 elements (2 MiB) per row block of a temporary array: cache-sized blocks whose temporaries are reused
by the allocator; 32 MiB blocks were 2-3x slower (every block's fresh temporaries page-faulted)."""


def row_blocks(n: int, row_elements: int) -> Iterator[slice]:
    """Consecutive row slices of ``range(n)`` whose temporaries hold at most ~:data:`BLOCK_ELEMENTS`."""
    step = max(1, BLOCK_ELEMENTS // max(1, int(row_elements)))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def log1m_softmax(x: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """``log(1 - softmax(x))`` row-wise, accurate also where ``p`` rounds to 1.

    ``log1p(-p)`` is exact for ``p <= 1/2``; only the arg-max entry can exceed 1/2, and for it
    ``log(1 - p_i) = logsumexp_{j != i} x_j - logsumexp_j x_j`` is used instead.
    """
    with np.errstate(divide="ignore"):
        out = np.log1p(-np.exp(logp))
        rows = np.arange(x.shape[0])
        top = x.argmax(axis=1)
        others = x.copy()
        others[rows, top] = -np.inf
        if x.shape[1] == 1:
            out[:, 0] = -np.inf
        else:
            out[rows, top] = logsumexp(others, axis=1) - logsumexp(x, axis=1)
    return out


class _LogitScore(Postprocessor):
    """Fit-free score of a ``[N, C]`` logit array, computed block-wise in float64."""

    requires = ("logits",)
    needs_fit = False

    @property
    def _key(self) -> str:
        return self.requires[0]

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        x = arrays[self._key]
        out = np.empty(x.shape[0], dtype=np.float64)
        for sl in row_blocks(x.shape[0], 2 * x.shape[1]):
            out[sl] = self._score_block(np.asarray(x[sl], dtype=np.float64))
        return out

    def _score_block(self, x: np.ndarray) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} must implement `_score_block(self, logits)`")


class MSP(_LogitScore):
    """Maximum softmax probability ``max_c softmax(x)_c`` (Hendrycks & Gimpel, ICLR 2017)."""

    name = "msp"

    def _score_block(self, x: np.ndarray) -> np.ndarray:
        return np.exp(log_softmax(x, axis=1).max(axis=1))


class MaxLogit(_LogitScore):
    """Maximum logit ``max_c x_c`` (Hendrycks et al., "Scaling OOD detection...", ICML 2022)."""

    name = "maxlogit"

    def _score_block(self, x: np.ndarray) -> np.ndarray:
        return x.max(axis=1)


class Energy(_LogitScore):
    """Negative free energy ``T * logsumexp(x / T)`` (Liu et al., NeurIPS 2020).

    Args:
        temperature: ``T`` (paper: 1).
    """

    name = "energy"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _positive(temperature, "Energy temperature")

    def _score_block(self, x: np.ndarray) -> np.ndarray:
        t = self.temperature
        return t * logsumexp(x / t, axis=1)


class Entropy(_LogitScore):
    """Negative Shannon entropy of the softmax, ``sum_c p_c log p_c`` (nats)."""

    name = "entropy"

    def _score_block(self, x: np.ndarray) -> np.ndarray:
        logp = log_softmax(x, axis=1)
        return (np.exp(logp) * logp).sum(axis=1)


class GEN(_LogitScore):
    """Generalized entropy (Liu et al., "GEN", CVPR 2023), negated:

    ``score = -sum_{j in top-M} p_j^gamma (1 - p_j)^gamma`` over the ``M`` largest softmax probabilities
    (a sum, as in the paper and its code; ``M`` is clamped to the number of classes ``C``).
    ``(1 - p)^gamma`` is computed from :func:`log1m_softmax`, so confident samples with ``1 - p``
    below float64 resolution keep their ordering.

    Args:
        gamma: exponent (paper: 0.1).
        M: number of top classes (paper: 100).
    """

    name = "gen"

    def __init__(self, gamma: float = 0.1, M: int = 100) -> None:
        self.gamma = _positive(gamma, "GEN gamma")
        if isinstance(M, bool) or not isinstance(M, numbers.Integral) or M < 1:
            raise ValueError(f"GEN M (number of top classes) must be a positive integer, got {M!r}")
        self.M = int(M)

    def _score_block(self, x: np.ndarray) -> np.ndarray:
        c = x.shape[1]
        m = min(self.M, c)
        logp = log_softmax(x, axis=1)
        log_terms = self.gamma * (logp + log1m_softmax(x, logp))
        top = np.argpartition(logp, c - m, axis=1)[:, c - m:]
        return -np.exp(np.take_along_axis(log_terms, top, axis=1)).sum(axis=1)


class KLMatching(Postprocessor):
    """KL matching (Hendrycks et al., "Scaling OOD detection...", ICML 2022).

    Fit: for every class ``k`` predicted (arg-max) on the ID fit split, the template ``d_k`` is the mean
    softmax of the samples predicted as ``k`` (labels are not used; never-predicted classes get no
    template). Score: ``-min_k KL(p || d_k)``, ``KL(p || d) = sum_c p_c (log p_c - log d_c)``.
    Templates are kept as ``log d_k`` (computed with logsumexp), so no probability underflows to a log of 0.

    Fitted: ``classes_`` [K] (int64), ``log_templates_`` [K, C].
    """

    requires = ("logits",)
    name = "kl_matching"

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        x = arrays["logits"]
        n, c = x.shape
        log_sums = np.full((c, c), -np.inf)
        counts = np.zeros(c, dtype=np.int64)
        for sl in row_blocks(n, 3 * c):
            logp = log_softmax(np.asarray(x[sl], dtype=np.float64), axis=1)
            pred = logp.argmax(axis=1)
            order = np.argsort(pred, kind="stable")
            cls, starts, cnt = np.unique(pred[order], return_index=True, return_counts=True)
            grouped = logp[order]
            peak = np.maximum.reduceat(grouped, starts, axis=0)
            total = np.add.reduceat(np.exp(grouped - np.repeat(peak, cnt, axis=0)), starts, axis=0)
            log_sums[cls] = np.logaddexp(log_sums[cls], peak + np.log(total))
            counts[cls] += cnt
        seen = counts > 0
        self.classes_ = np.flatnonzero(seen).astype(np.int64)
        self.log_templates_ = log_sums[seen] - np.log(counts[seen])[:, None]

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        x = arrays["logits"]
        log_d = self.log_templates_
        out = np.empty(x.shape[0], dtype=np.float64)
        for sl in row_blocks(x.shape[0], 2 * x.shape[1] + log_d.shape[0]):
            logp = log_softmax(np.asarray(x[sl], dtype=np.float64), axis=1)
            p = np.exp(logp)
            kl = (p * logp).sum(axis=1, keepdims=True) - p @ log_d.T
            out[sl] = -kl.min(axis=1)
        return out

    def _fitted_state(self) -> dict[str, np.ndarray]:
        return {"classes": self.classes_, "log_templates": self.log_templates_}

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        if set(state) != {"classes", "log_templates"}:
            raise ValueError(f"KLMatching state needs exactly 'classes' and 'log_templates', got {sorted(state)}")
        log_d = np.asarray(state["log_templates"], dtype=np.float64)
        classes = np.asarray(state["classes"], dtype=np.int64)
        if log_d.ndim != 2 or classes.shape != (log_d.shape[0],):
            raise ValueError(
                f"KLMatching state: log_templates must be [K, C] and classes [K], got {log_d.shape} and "
                f"{classes.shape}"
            )
        self.classes_, self.log_templates_ = classes, log_d


class ODIN(_LogitScore):
    """ODIN's temperature-scaled maximum softmax ``max_c softmax(x / T)_c`` (Liang et al., ICLR 2018).

    The input perturbation (a gradient step on the input) needs the model, so it happens at extraction: the
    ``odin_logits`` producer writes the logits of the perturbed inputs, and with ``key="odin_logits"`` this
    method scores them. The extraction is planned from the method's YAML: :meth:`extraction_params` hands
    ``temperature`` and ``epsilon`` to that producer. With ``key="logits"`` this is ODIN with ``epsilon = 0``
    (``epsilon`` is then unused).

    Args:
        temperature: ``T`` (paper: 1000).
        key: feature key of the ``[N, C]`` logits to read (``"logits"`` or ``"odin_logits"``).
        epsilon: perturbation step size requested from the ``odin_logits`` producer (paper: 0.0014, in units
            of the normalized model input); used only for the extraction request, never in the score.
    """

    name = "odin"

    def __init__(self, temperature: float = 1000.0, key: str = "logits", epsilon: float = 0.0014) -> None:
        self.temperature = _positive(temperature, "ODIN temperature")
        if not isinstance(key, str) or not key:
            raise ValueError(f"ODIN key must be a feature name such as 'logits' or 'odin_logits', got {key!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not np.isfinite(epsilon) \
                or epsilon < 0:
            raise ValueError(f"ODIN epsilon must be a finite number >= 0, got {epsilon!r}")
        self.key = key
        self.epsilon = float(epsilon)
        self.requires = (key,)
        self.feature_ndim = {key: 2}

    def extraction_params(self) -> dict[str, dict]:
        """``odin_logits`` carries this method's ``temperature`` and ``epsilon`` to its producer."""
        params = super().extraction_params()
        if self.key == ODIN_KEY:
            params[ODIN_KEY] = {"temperature": self.temperature, "epsilon": self.epsilon}
        return params

    def _score_block(self, x: np.ndarray) -> np.ndarray:
        return np.exp(log_softmax(x / self.temperature, axis=1).max(axis=1))
