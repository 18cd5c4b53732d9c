"""Shared helpers of the feature-based baselines: float64 conversion, head / label checks, energy,
class means and chunking. Private: import from the baseline modules, not from user code."""
from __future__ import annotations

import numbers
from collections.abc import Iterator

import numpy as np
from scipy.special import logsumexp

from larex.postprocessors.base import FeatureError


def f64(a: np.ndarray) -> np.ndarray:
    """``a`` as float64 (no copy when it already is)."""
    return np.asarray(a, dtype=np.float64)


def energy(logits: np.ndarray) -> np.ndarray:
    """Negative free energy ``logsumexp_c logits_c`` (T = 1; higher = more ID), [N, C] -> [N]."""
    return logsumexp(logits, axis=1)


def head(arrays: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """``head.weight`` [C, F] and ``head.bias`` [C] as float64, checked against ``penultimate`` [N, F]."""
    w, b = f64(arrays["head.weight"]), f64(arrays["head.bias"])
    f = arrays["penultimate"].shape[1]
    if w.shape[1] != f or b.shape[0] != w.shape[0]:
        raise FeatureError(
            f"{name}: head.weight {w.shape} / head.bias {b.shape} do not fit penultimate features with F={f} "
            "(expected [C, F] and [C]); store the final linear layer of the model that produced the features"
        )
    return w, b


def check_logits_classes(logits: np.ndarray, n_classes: int, name: str) -> None:
    if logits.shape[1] != n_classes:
        raise FeatureError(
            f"{name}: logits have {logits.shape[1]} classes but head.weight has {n_classes} rows; "
            "use logits and head of the same model"
        )


def fit_labels(labels: np.ndarray, name: str, n_classes: int | None = None) -> np.ndarray:
    """ID class indices of the fit split as int64; rejects negative (OOD/unknown) or fractional labels."""
    lab = np.asarray(labels)
    if lab.dtype.kind == "f":
        if not np.all(lab == np.round(lab)):
            raise FeatureError(f"{name}: fit labels must be integer class indices, got fractional values")
    lab = lab.astype(np.int64)
    if lab.min() < 0:
        raise FeatureError(
            f"{name}: the fit split has {int((lab < 0).sum())} samples with a negative (unknown) label; "
            "fit on ID samples with known class labels only"
        )
    if n_classes is not None and lab.max() >= n_classes:
        raise FeatureError(
            f"{name}: fit label {int(lab.max())} is out of range for {n_classes} classes; labels must index "
            "the model's classes"
        )
    return lab


def class_means(x: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sums -> means [n_classes, F] and counts [n_classes] (classes without samples: mean 0)."""
    sums = np.zeros((n_classes, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=n_classes)
    means = sums / np.maximum(counts, 1)[:, None]
    return means, counts


def check_percentile(p: float, name: str, arg: str = "percentile") -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 100:
        raise ValueError(f"{name}: {arg} must be a number in [0, 100) (a percentage), got {p!r}")
    return float(p)


def check_positive_int(v: int, name: str, arg: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name}: {arg} must be a positive integer, got {v!r}")
    return int(v)


LAREX_FEATURES = ("entropy", "latent_mean")
"""Feature keys LaRED / LaREM may model (``features: [entropy, latent_mean]`` concatenates them)."""


def check_feature_set(features, name: str) -> tuple[str, ...]:
    """``features`` as a tuple of distinct keys among :data:`LAREX_FEATURES`, or ValueError."""
    if isinstance(features, str):
        features = (features,)
    keys = tuple(str(k) for k in features)
    if not keys or len(set(keys)) != len(keys) or not set(keys) <= set(LAREX_FEATURES):
        raise ValueError(f"{name}: features must be a non-empty list of distinct keys among {LAREX_FEATURES} "
                         f"(concatenated per row); got {list(features)}")
    return keys


def stacked(arrays: dict[str, np.ndarray], keys: tuple[str, ...]) -> np.ndarray:
    """The arrays of ``keys`` side by side, [N, sum D_k] float64 (one key: no copy when already float64)."""
    if len(keys) == 1:
        return f64(arrays[keys[0]])
    return np.concatenate([f64(arrays[k]) for k in keys], axis=1)


def chunks(n: int, size: int) -> Iterator[slice]:
    """Row slices of at most ``size`` rows covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
