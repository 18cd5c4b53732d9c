"""PNG plots a person would rather look at: ROC curves and score histograms (matplotlib, Agg)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from larex import io
from larex.metrics import roc_curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    io.write_bytes(path, buf.getvalue())
    return path


def _roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, path: str | Path) -> Path:
    """One ROC curve (ID positive) per entry ``label -> (id_scores, ood_scores)``, AUROC in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, (ids, oods) in curves.items():
        y = np.r_[np.ones(len(ids)), np.zeros(len(oods))]
        fpr, tpr, _ = roc_curve(y, np.r_[ids, oods])
        ax.plot(fpr, tpr, label=f"{label} (AUROC {np.trapezoid(tpr, fpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.axhline(0.95, color="grey", lw=0.6, ls=":")
    ax.set(xlabel="FPR (OOD accepted)", ylabel="TPR (ID accepted)", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def roc_plot(id_scores: np.ndarray, ood_scores: Mapping[str, np.ndarray], title: str, path: str | Path) -> Path:
    """ROC curves of one method against each OOD set."""
    return _roc_figure({name: (id_scores, s) for name, s in ood_scores.items()}, title, path)


def methods_roc_plot(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, path: str | Path) -> Path:
    """ROC curves of several methods on one OOD set: ``curves[method] = (id_scores, ood_scores)``."""
    return _roc_figure(curves, title, path)


def score_histogram(scores: Mapping[str, np.ndarray], title: str, path: str | Path,
                    threshold: float | None = None, threshold_label: str = "threshold") -> Path:
    """Overlaid score histograms (ID test and each OOD set), with the decision threshold if given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    allv = np.concatenate([np.asarray(v, dtype=np.float64) for v in scores.values()])
    lo, hi = np.percentile(allv, [0.5, 99.5]) if allv.size else (0.0, 1.0)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 60)
    for name, v in scores.items():
        ax.hist(np.clip(v, lo, hi), bins=bins, alpha=0.45, density=True, label=f"{name} (n={len(v)})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="black", lw=1, ls="--", label=threshold_label)
    ax.set(xlabel="score (higher = more in-distribution)", ylabel="density", title=title)
    ax.legend(fontsize=8)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
