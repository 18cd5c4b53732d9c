"""PNG plots a person would rather look at: ROC curves and score histograms (matplotlib, Agg)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
OWN_PANEL_FRACTION = 0.05
"""An OOD set with at least this fraction of its scores outside its ID-vs-OOD panel also gets a panel on its own
bulk, so that its distribution can be seen too (the ID scores are counted there)."""


@dataclass(frozen=True)
class HistogramPanel:
    """One panel of :func:`score_histogram`: the ID scores and OOD set ``ood`` on ``[lo, hi]``; ``own`` panels are
    on the OOD set's own bulk (for a set far from the ID scores), the others on :func:`histogram_range`."""

    ood: str
    lo: float
    hi: float
    own: bool = False


def _finite(v: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError(f"score_histogram needs at least one ID and one OOD score per panel; {what} is empty")
    f = v[np.isfinite(v)]
    if f.size == 0:
        raise ValueError(f"score_histogram: {what} has no finite score ({v.size} scores)")
    return f


def _bulk(v: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(v, [BULK_QUANTILE, 100 - BULK_QUANTILE])
    return float(lo), float(hi)


def _width(lo: float, hi: float) -> float:
    """Width of a bulk, never zero (a constant series gets a small range around its value)."""
    return hi - lo if hi > lo else max(abs(lo), 1.0) * 1e-3


def _padded(lo: float, hi: float, width: float) -> tuple[float, float]:
    if not hi > lo:
        lo, hi = lo - 0.5 * width, hi + 0.5 * width
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def histogram_range(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[float, float]:
    """x range of one panel (ID vs one OOD set): the union of both bulks, but at most ``REACH`` ID-bulk widths
    beyond the ID bulk on either side, padded by 5%."""
    ids, oods = _finite(id_scores, "the ID series"), _finite(ood_scores, "the OOD series")
    ilo, ihi = _bulk(ids)
    olo, ohi = _bulk(oods)
    width = _width(ilo, ihi)
    lo = max(min(ilo, olo), ilo - REACH * width)
    hi = min(max(ihi, ohi), ihi + REACH * width)
    return _padded(lo, hi, width)


def own_range(scores: np.ndarray) -> tuple[float, float]:
    """x range of a series on its own: its bulk, padded by 5%."""
    lo, hi = _bulk(_finite(scores, "the series"))
    return _padded(lo, hi, _width(lo, hi))


def outside_counts(v: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    """Scores below ``lo`` and above ``hi`` (drawn as counts, not as bars; -inf/+inf count as below/above)."""
    v = np.asarray(v, dtype=np.float64)
    return int((v < lo).sum()), int((v > hi).sum())


def histogram_panels(series: Mapping[str, np.ndarray]) -> list[HistogramPanel]:
    """The panels of :func:`score_histogram` in order: per OOD set (every entry after the first, which is the ID
    test set) the ID scores vs that set on :func:`histogram_range`, followed, when ``OWN_PANEL_FRACTION`` or more
    of that set lies outside it, by a panel on the set's own bulk."""
    names = list(series)
    if len(names) < 2:
        raise ValueError("score_histogram needs the ID scores first and at least one OOD set; got "
                         f"{len(names)} series {names}")
    ids = series[names[0]]
    _finite(ids, f"the ID series {names[0]!r}")
    panels = []
    for name in names[1:]:
        ood = np.asarray(series[name], dtype=np.float64)
        _finite(ood, f"the OOD series {name!r}")
        lo, hi = histogram_range(ids, ood)
        panels.append(HistogramPanel(name, lo, hi))
        if sum(outside_counts(ood, lo, hi)) >= OWN_PANEL_FRACTION * ood.size:
            panels.append(HistogramPanel(name, *own_range(ood), own=True))
    return panels


def histogram_ranges(series: Mapping[str, np.ndarray]) -> list[tuple[float, float]]:
    """``(lo, hi)`` x limits of each panel of :func:`score_histogram` (see :func:`histogram_panels`)."""
    return [(p.lo, p.hi) for p in histogram_panels(series)]


def _edge_note(ax, text: str, side: str, row: int, color: str) -> None:
    """``text`` inside the left or right edge of ``ax``, on line ``row`` from the top (under the legend)."""
    x, ha = (0.01, "left") if side == "left" else (0.99, "right")
    ax.text(x, 0.70 - 0.085 * row, text, transform=ax.transAxes, ha=ha, va="top", fontsize=7, color=color,
            fontweight="bold", bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "alpha": 0.85, "lw": 0.6})


def _histogram_figure(series: Mapping[str, np.ndarray], title: str, threshold: float | None,
                      threshold_label: str):
    """The figure of :func:`score_histogram` (its axes in :func:`histogram_panels` order; unused grid cells off)."""
    plt = _pyplot()
    panels = histogram_panels(series)
    names = list(series)
    id_name, ids = names[0], np.asarray(series[names[0]], dtype=np.float64)
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.6 * rows), squeeze=False, layout="constrained")
    for ax, panel in zip(axes.ravel(), panels):
        ood = np.asarray(series[panel.ood], dtype=np.float64)
        lo, hi = panel.lo, panel.hi
        bins = np.linspace(lo, hi, 50)
        notes = {"left": 0, "right": 0}
        for label, v, color in ((id_name, ids, "tab:blue"), (panel.ood, ood, "tab:orange")):
            inside = v[(v >= lo) & (v <= hi)]
            ax.hist(inside, bins=bins, alpha=0.5, color=color, label=f"{label} (n={len(v)})",
                    weights=np.full(len(inside), 1.0 / max(len(v), 1)))
            below, above = outside_counts(v, lo, hi)
            for side, count, text in (("left", below, f"\u2190 {label}: {below} below"),
                                      ("right", above, f"{label}: {above} above \u2192")):
                if count:
                    _edge_note(ax, text, side, notes[side], color)
                    notes[side] += 1
        if threshold is not None and np.isfinite(threshold):
            if lo <= threshold <= hi:
                ax.axvline(threshold, color="black", lw=1, ls="--", label=f"{threshold_label}: {threshold:.4g}")
            else:
                side = "left" if threshold < lo else "right"
                text = (f"\u2190 {threshold_label}: {threshold:.4g}" if side == "left"
                        else f"{threshold_label}: {threshold:.4g} \u2192")
                _edge_note(ax, text, side, notes[side], "black")
        heading = (f"{panel.ood} on its own range (far from ID)" if panel.own else f"{id_name} vs {panel.ood}")
        ax.set(xlabel="score (higher = more in-distribution)", ylabel="fraction of the set", title=heading,
               xlim=(lo, hi))
        ax.set_ylim(0, ax.get_ylim()[1] * 1.05)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    return fig


def score_histogram(series: Mapping[str, np.ndarray], title: str, path: str | Path,
                    threshold: float | None = None, threshold_label: str | None = None) -> Path:
    """Score histograms of the ID test set (first entry of ``series``) against each OOD set, one panel per set on
    the robust bulk of both (:func:`histogram_range`), plus a panel on its own bulk for a set far from the ID
    scores (:func:`histogram_panels`); scores outside a panel are counted at its edges ("<- n below",
    "n above ->"), the decision threshold is drawn, or named at the edge when off the range. Written atomically."""
    plt = _pyplot()
    fig = _histogram_figure(series, title, threshold, threshold_label or "threshold")
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def boxes_figure(panels, title: str, path: str | Path, threshold: float | None = None,
                 limits: tuple[float, float] | None = None) -> Path:
    """A grid of images with their boxes coloured by OOD score (viridis: yellow = most ID); a box scored below
    ``threshold`` (flagged OOD) is drawn dashed. ``panels``: ``(image [3, H, W] in [0, 1], boxes [K, 4] xyxy,
    scores [K], caption)``; ``limits``: the colour scale (default: the scores' range)."""
    plt = _pyplot()
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    panels = list(panels)
    if not panels:
        raise ValueError("boxes_figure needs at least one image")
    allscores = np.concatenate([np.asarray(p[2], dtype=np.float64).reshape(-1) for p in panels])
    if limits is None:
        limits = (float(allscores.min()), float(allscores.max())) if allscores.size else (0.0, 1.0)
    lo, hi = limits
    norm = Normalize(lo, hi if hi > lo else lo + 1.0)
    cmap = plt.get_cmap("viridis")
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (image, boxes, scores, caption) in zip(axes.ravel(), panels):
        img = np.asarray(image, dtype=np.float64)
        ax.imshow(np.clip(img.transpose(1, 2, 0) if img.ndim == 3 else img, 0, 1))
        for (x0, y0, x1, y1), s in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(scores).reshape(-1)):
            flagged = threshold is not None and s < threshold
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.6, color=cmap(norm(s)),
                                   ls="--" if flagged else "-"))
        ax.set_title(caption, fontsize=8)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=axes.ravel().tolist(), shrink=0.6, label="OOD score (higher = more ID)")
    fig.suptitle(title + ("" if threshold is None else "  (dashed: below the ID-val threshold)"), fontsize=10)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
