"""Monte-Carlo-dropout baselines on ``mc_logits`` [N, S, C] (S stochastic passes; Gal & Ghahramani, ICML 2016).

With ``p_s = softmax(mc_logits[:, s])`` and ``p_bar = mean_s p_s``:

* ``mcd_entropy``: ``-H(p_bar)`` (negative predictive entropy),
* ``mcd_mi``: ``-(H(p_bar) - mean_s H(p_s))`` (negative mutual information / BALD; Houlsby et al. 2011,
  Gal et al., ICML 2017),
* ``mcd_var``: ``-mean_c Var_s(p_{s,c})`` with the unbiased (Bessel, ``S - 1``) sample variance, the
  Bayesian SegNet variant (Kendall et al., BMVC 2017) that pytorch-ood's ``MCD(mode="var")`` uses.

Entropies are in nats, computed in float64 from log-softmax; ``log p_bar`` uses logsumexp over S.
Higher score = more in-distribution.
"""
from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, logsumexp

from larex.postprocessors.base import Postprocessor
from larex.postprocessors.logits import row_blocks


class _MCScore(Postprocessor):
    """Fit-free score of ``mc_logits`` [N, S, C], computed block-wise in float64."""

    requires = ("mc_logits",)
    needs_fit = False
    min_samples = 1

    def _check_samples(self, x: np.ndarray) -> None:
        if x.shape[1] < self.min_samples:
            raise ValueError(
                f"{self.name} needs at least {self.min_samples} MC samples per input, but mc_logits has "
                f"shape {x.shape} (S={x.shape[1]}); re-run the extraction with at least "
                f"{self.min_samples} MC-dropout passes (hooked_layer.mc_samples)"
            )

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        self._check_samples(arrays["mc_logits"])

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        x = arrays["mc_logits"]
        self._check_samples(x)
        out = np.empty(x.shape[0], dtype=np.float64)
        for sl in row_blocks(x.shape[0], 3 * x.shape[1] * x.shape[2]):
            out[sl] = self._score_block(log_softmax(np.asarray(x[sl], dtype=np.float64), axis=2))
        return out

    def _score_block(self, logp: np.ndarray) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} must implement `_score_block(self, log_probs)`")


def _neg_predictive_entropy(logp: np.ndarray) -> np.ndarray:
    """``sum_c p_bar_c log p_bar_c`` for log-probabilities [B, S, C]."""
    log_mean = logsumexp(logp, axis=1) - np.log(logp.shape[1])
    return (np.exp(log_mean) * log_mean).sum(axis=1)


class MCDEntropy(_MCScore):
    """Negative predictive entropy ``-H(mean_s softmax(mc_logits[:, s]))``."""

    name = "mcd_entropy"

    def _score_block(self, logp: np.ndarray) -> np.ndarray:
        return _neg_predictive_entropy(logp)


class MCDMutualInfo(_MCScore):
    """Negative mutual information (BALD) ``-(H(p_bar) - mean_s H(p_s))``.

    The mutual information is non-negative (Jensen); rounding below 0 is clipped to 0. Needs S >= 2.
    """

    name = "mcd_mi"
    min_samples = 2

    def _score_block(self, logp: np.ndarray) -> np.ndarray:
        mean_entropy = -(np.exp(logp) * logp).sum(axis=2).mean(axis=1)
        mi = -_neg_predictive_entropy(logp) - mean_entropy
        return -np.maximum(mi, 0.0)


class MCDVariance(_MCScore):
    """Negative class-averaged variance ``-(1/C) sum_c Var_s(p_{s,c})`` of the softmax over the S passes.

    ``Var_s`` is the unbiased sample variance (divides by ``S - 1``), as in Bayesian SegNet and
    pytorch-ood ``MCD(mode="var")``; for a fixed S the ranking equals that of the biased variant. Needs S >= 2.
    """

    name = "mcd_var"
    min_samples = 2

    def _score_block(self, logp: np.ndarray) -> np.ndarray:
        return -np.exp(logp).var(axis=1, ddof=1).mean(axis=1)
