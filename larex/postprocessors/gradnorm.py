"""GradNorm (Huang et al., NeurIPS 2021) in closed form from penultimate features and logits."""
from __future__ import annotations

import numbers

import numpy as np
from scipy.special import softmax

from larex.postprocessors._features import f64
from larex.postprocessors.base import Postprocessor


class GradNorm(Postprocessor):
    """L1 norm of the gradient of KL(u || softmax(logits / T)) w.r.t. the final layer's weight W:

    with L = -(1/C) sum_c log softmax(f / T)_c and f = W x + b, dL/dW = (p - u) x^T / T, hence

    ``score(x) = (1/T) * sum_c |p_c - 1/C| * sum_j |x_j|``,  p = softmax(logits / T)

    (higher = more ID; the reference code uses only the weight gradient, T = 1). Fit-free.
    """

    requires = ("penultimate", "logits")
    name = "gradnorm"
    needs_fit = False

    def __init__(self, temperature: float = 1.0) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"gradnorm: temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        logits = f64(arrays["logits"])
        p = softmax(logits / self.temperature, axis=1)
        g = np.abs(p - 1.0 / logits.shape[1]).sum(axis=1)
        return g * np.abs(f64(arrays["penultimate"])).sum(axis=1) / self.temperature
