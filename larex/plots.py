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


BULK_QUANTILE = 0.5
"""Percent cut from each end of a series to find its bulk (robust to a few extreme scores)."""
REACH = 3.0
"""A panel extends past the ID bulk by at most this many ID-bulk widths, so a far-away OOD set cannot squeeze the
ID distribution into one bar; its scores outside are counted instead."""


def _bulk(v: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(v, [BULK_QUANTILE, 100 - BULK_QUANTILE])
    return float(lo), float(hi)


def histogram_range(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[float, float]:
    """x range of one panel (ID vs one OOD set): the union of both bulks, but at most ``REACH`` ID-bulk widths
    beyond the ID bulk on either side, padded by 5%."""
    ids, oods = np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    if ids.size == 0 or oods.size == 0:
        raise ValueError("score_histogram needs at least one ID and one OOD score per panel; got "
                         f"{ids.size} ID and {oods.size} OOD scores")
    ilo, ihi = _bulk(ids)
    olo, ohi = _bulk(oods)
    width = ihi - ilo
    if not width > 0:
        width = max(abs(ilo), 1.0) * 1e-3
    lo = max(min(ilo, olo), ilo - REACH * width)
    hi = min(max(ihi, ohi), ihi + REACH * width)
    if not hi > lo:
        lo, hi = lo - 0.5 * width, hi + 0.5 * width
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def outside_counts(v: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    """Scores below ``lo`` and above ``hi`` (drawn as counts, not as bars)."""
    v = np.asarray(v, dtype=np.float64)
    return int((v < lo).sum()), int((v > hi).sum())


def score_histogram(scores: Mapping[str, np.ndarray], title: str, path: str | Path,
                    threshold: float | None = None, threshold_label: str = "threshold") -> Path:
    """One panel per OOD set: the ID scores (first entry of ``scores``) against that set, each panel on the range
    of :func:`histogram_range`; scores outside it are counted in the legend, the decision threshold is drawn."""
    names = list(scores)
    if len(names) < 2:
        raise ValueError("score_histogram needs the ID scores first and at least one OOD set")
    id_name, ids = names[0], np.asarray(scores[names[0]], dtype=np.float64)
    oods = names[1:]
    plt = _pyplot()
    cols = min(2, len(oods))
    rows = -(-len(oods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    for ax, name in zip(axes.ravel(), oods):
        ood = np.asarray(scores[name], dtype=np.float64)
        lo, hi = histogram_range(ids, ood)
        bins = np.linspace(lo, hi, 50)
        for label, v, color in ((id_name, ids, "tab:blue"), (name, ood, "tab:orange")):
            below, above = outside_counts(v, lo, hi)
            extra = "".join([f", {below} below" if below else "", f", {above} above" if above else ""])
            inside = v[(v >= lo) & (v <= hi)]
            ax.hist(inside, bins=bins, alpha=0.5, color=color, label=f"{label} (n={len(v)}{extra})",
                    weights=np.full(len(inside), 1.0 / max(len(v), 1)))
        if threshold is not None and np.isfinite(threshold):
            if lo <= threshold <= hi:
                ax.axvline(threshold, color="black", lw=1, ls="--", label=threshold_label)
            else:
                ax.annotate(f"{threshold_label}: {threshold:.4g} (off the range)", (0.02, 0.95),
                            xycoords="axes fraction", fontsize=7, va="top")
        ax.set(xlabel="score (higher = more in-distribution)", ylabel="fraction of the set", title=f"ID vs {name}",
               xlim=(lo, hi))
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(oods):]:
        ax.axis("off")
    fig.suptitle(title)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
