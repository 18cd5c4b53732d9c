"""SHE: Simplified Hopfield Energy (Zhang et al., ICLR 2023) on penultimate features."""
from __future__ import annotations

import numpy as np

from larex.postprocessors._features import class_means, f64, fit_labels
from larex.postprocessors.base import Postprocessor


class SHE(Postprocessor):
    """Simplified Hopfield Energy: ``score(x) = <x, m_yhat>``, yhat = argmax logits(x) and m_c the mean
    penultimate feature of the fit samples of class c that the model classifies correctly (the stored
    pattern). A class with no correctly classified fit sample falls back to the mean of all its fit samples.
Labels are read only to fit; scoring reads ``penultimate`` and ``logits``.

    Fitted: ``patterns_`` [C, F].
    """

    requires = ("penultimate", "logits")
    fit_requires = ("penultimate", "logits", "labels")
    name = "she"

    def __init__(self) -> None:
        pass

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        x, logits = f64(arrays["penultimate"]), arrays["logits"]
        n_classes = logits.shape[1]
        labels = fit_labels(arrays["labels"], self.name, n_classes)
        correct = logits.argmax(axis=1) == labels
        patterns, n_correct = class_means(x[correct], labels[correct], n_classes)
        fallback, n_all = class_means(x, labels, n_classes)
        if (n_all == 0).any():
            missing = np.flatnonzero(n_all == 0).tolist()
            raise ValueError(
                f"she: classes {missing[:10]}{'...' if len(missing) > 10 else ''} have no sample in the fit "
                "split, so they have no stored pattern; fit on a split covering all classes"
            )
        self.patterns_ = np.where((n_correct > 0)[:, None], patterns, fallback)

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        logits = arrays["logits"]
        if logits.shape[1] != self.patterns_.shape[0]:
            raise ValueError(
                f"she: logits have {logits.shape[1]} classes but the detector was fitted with "
                f"{self.patterns_.shape[0]}; use logits of the same model"
            )
        m = self.patterns_[logits.argmax(axis=1)]
        return np.einsum("nf,nf->n", f64(arrays["penultimate"]), m)

    def _fitted_state(self) -> dict[str, np.ndarray]:
        return {"patterns": self.patterns_}

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        if "patterns" not in state:
            raise ValueError(f"SHE state needs 'patterns', got {sorted(state)}")
        self.patterns_ = f64(state["patterns"])
