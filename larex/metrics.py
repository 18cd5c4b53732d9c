"""OOD-detection metrics and thresholds (numpy only).

Conventions (../shared/DESIGN.md, "Metrics"): scores are HIGHER = MORE in-distribution, and an input is accepted as ID when
``score >= t``. Labels are never flipped, so a detector worse than chance gets ``auroc < 0.5``.

* ``auroc``, ``aupr_in``, ``fpr95``: ID is the positive class. ``fpr95`` = FPR on OOD at 95% TPR on ID.
* ``aupr_out``: OOD is the positive class, scored by the negated scores.
* ``fpr95_ood``: OpenOOD / pytorch-ood convention: OOD positive with negated scores, i.e. the fraction of ID
  inputs flagged as OOD when 95% of OOD inputs are flagged.

``roc_curve`` and ``average_precision`` reproduce ``sklearn.metrics.roc_curve(drop_intermediate=False)`` and
``sklearn.metrics.average_precision_score`` exactly, ties included (tied scores form one threshold).

FPR at TPR (``fpr_at_tpr``): the FPR of the first ROC point, scanning thresholds from high to low, whose TPR
is ``>= tpr``. Because FPR can only grow as the threshold falls, this is the smallest FPR among all thresholds
reaching the target TPR, and it equals ``rates_at_threshold(pos, neg, threshold_at_tpr(pos, tpr))["fpr"]``.
It is computed on the full ROC curve; sklearn's default ``drop_intermediate=True`` (used by OpenOOD) may drop
a collinear point and then report a slightly larger FPR.
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

__all__ = [
    "roc_curve",
    "auroc",
    "average_precision",
    "aupr",
    "fpr_at_tpr",
    "ood_metrics",
    "threshold_at_tpr",
    "rates_at_threshold",
    "zscore_thresholds",
    "METRIC_NAMES",
]

#: Keys returned by :func:`ood_metrics`, in order.
METRIC_NAMES = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_ood")


def _as_scores(x, name: str) -> np.ndarray:
    """Validate a score array: 1-D, non-empty, real, finite; returns float64."""
    arr = np.asarray(x)
    if arr.dtype == object or np.iscomplexobj(arr) or not (
        np.issubdtype(arr.dtype, np.number) or arr.dtype == bool
    ):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per input), got shape {arr.shape}; flatten it first")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; at least one score is needed")
    n_nan = int(np.isnan(arr).sum())
    n_inf = int(np.isinf(arr).sum())
    if n_nan or n_inf:
        raise ValueError(
            f"{name} contains {n_nan} NaN and {n_inf} Inf value(s) out of {arr.size}; "
            "fix the detector producing them or drop those inputs before computing metrics"
        )
    return arr


def _check_rate(value: float, name: str) -> float:
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def _binary_counts(y_true: np.ndarray, scores: np.ndarray):
    """Cumulative TP/FP counts at each distinct score, thresholds descending (ties grouped)."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    s = scores[order]
    y = y_true[order]
    distinct = np.flatnonzero(np.diff(s))
    idx = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y)[idx]
    fps = 1.0 + idx - tps
    return fps, tps, s[idx]


def _labels_and_scores(y_true, scores):
    y = np.asarray(y_true)
    s = _as_scores(scores, "scores")
    if y.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"y_true must be 1-D with the shape of scores {s.shape}, got {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must contain only 0/1 (or False/True); 1 marks the positive class")
    y = y.astype(np.float64)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError("y_true must contain both classes (at least one 0 and one 1)")
    return y, s


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve (positive = ``y_true == 1``, predicted positive when ``score >= threshold``).

    Returns ``(fpr, tpr, thresholds)`` with thresholds strictly decreasing, starting at ``+inf`` (the
    empty-acceptance point ``(0, 0)``); identical to ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    y, s = _labels_and_scores(y_true, scores)
    fps, tps, thr = _binary_counts(y, s)
    fps = np.r_[0.0, fps]
    tps = np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thr]


def _pos_neg(pos_scores, neg_scores, pos_name: str, neg_name: str):
    pos = _as_scores(pos_scores, pos_name)
    neg = _as_scores(neg_scores, neg_name)
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    return y, np.r_[pos, neg]


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve with ID positive (trapezoidal, ties count half). 1 = perfect, 0 = reversed."""
    y, s = _pos_neg(id_scores, ood_scores, "id_scores", "ood_scores")
    fpr, tpr, _ = roc_curve(y, s)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def average_precision(y_true, scores) -> float:
    """Step-wise average precision ``sum_n (R_n - R_{n-1}) P_n``, as ``sklearn.metrics.average_precision_score``."""
    y, s = _labels_and_scores(y_true, scores)
    fps, tps, _ = _binary_counts(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr(id_scores, ood_scores, positive: str = "id") -> float:
    """Area under the precision-recall curve (average precision).

    ``positive="id"`` gives AUPR-In (ID positive, scores as is); ``positive="ood"`` gives AUPR-Out
    (OOD positive, scored by ``-score``).
    """
    if positive == "id":
        y, s = _pos_neg(id_scores, ood_scores, "id_scores", "ood_scores")
    elif positive == "ood":
        y, s = _pos_neg(ood_scores, id_scores, "ood_scores", "id_scores")
        s = -s
    else:
        raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}")
    return average_precision(y, s)


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """FPR on ``ood_scores`` at the first ROC point whose TPR on ``id_scores`` is ``>= tpr``.

    The first argument is the positive class. For the OpenOOD convention (OOD positive) call
    ``fpr_at_tpr(-ood_scores, -id_scores, tpr)``.
    """
    tpr = _check_rate(tpr, "tpr")
    y, s = _pos_neg(id_scores, ood_scores, "id_scores", "ood_scores")
    fpr_c, tpr_c, _ = roc_curve(y, s)
    return float(fpr_c[np.argmax(tpr_c >= tpr)])


def ood_metrics(id_scores, ood_scores, tpr: float = 0.95) -> dict[str, float]:
    """All reported metrics: keys ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr95``, ``fpr95_ood``.

    ``fpr95``/``fpr95_ood`` are taken at ``tpr`` (0.95 unless changed; the key names stay fixed).
    """
    id_s = _as_scores(id_scores, "id_scores")
    ood_s = _as_scores(ood_scores, "ood_scores")
    return {
        "auroc": auroc(id_s, ood_s),
        "aupr_in": aupr(id_s, ood_s, positive="id"),
        "aupr_out": aupr(id_s, ood_s, positive="ood"),
        "fpr95": fpr_at_tpr(id_s, ood_s, tpr),
        "fpr95_ood": fpr_at_tpr(-ood_s, -id_s, tpr),
    }


def threshold_at_tpr(id_val_scores, tpr: float = 0.95) -> float:
    """Largest threshold ``t`` with ``mean(id_val_scores >= t) >= tpr`` (exact with ties).

    ``t`` is the m-th largest score, ``m`` the smallest count with ``m / n >= tpr``; it is always one of the
    scores. Accept an input as ID when ``score >= t``.
    """
    tpr = _check_rate(tpr, "tpr")
    s = np.sort(_as_scores(id_val_scores, "id_val_scores"))[::-1]
    m = int(np.argmax(np.arange(1, s.size + 1) / s.size >= tpr))
    return float(s[m])


def rates_at_threshold(id_scores, ood_scores, threshold: float) -> dict[str, float]:
    """``tpr`` = fraction of ID with ``score >= threshold``; ``fpr`` = same fraction on OOD."""
    id_s = _as_scores(id_scores, "id_scores")
    ood_s = _as_scores(ood_scores, "ood_scores")
    t = float(threshold)
    if np.isnan(t):
        raise ValueError("threshold is NaN; compute it with threshold_at_tpr on finite ID val scores")
    return {"tpr": float(np.mean(id_s >= t)), "fpr": float(np.mean(ood_s >= t))}


def zscore_thresholds(id_val_scores, percentiles=(90, 95, 99)) -> dict[str, float]:
    """Gaussian (z-score) thresholds on ID val scores, one per percentile ``p`` (key ``"z_p{p:g}"``).

    Treating the standardized scores ``z = (s - mean) / std`` (population std) as standard normal,
    ``p`` percent of ID lies above the ``(100 - p)``-th normal percentile ``z_p = Phi^-1(1 - p/100)``;
    mapped back to raw scores: ``t_p = mean + z_p * std`` (= ``mean - 1.645 std`` for p=95). This is the
    parametric alternative to :func:`threshold_at_tpr`, which is the exact empirical one.
    """
    s = _as_scores(id_val_scores, "id_val_scores")
    mean = float(np.mean(s))
    std = float(np.std(s))
    if std == 0.0:
        raise ValueError("id_val_scores are all equal (std 0); z-score thresholds need spread, use threshold_at_tpr")
    out: dict[str, float] = {}
    normal = NormalDist()
    for p in percentiles:
        p = float(p)
        if not (0.0 < p < 100.0):
            raise ValueError(f"percentiles must be in (0, 100), got {p}")
        out[f"z_p{p:g}"] = mean + normal.inv_cdf(1.0 - p / 100.0) * std
    return out
