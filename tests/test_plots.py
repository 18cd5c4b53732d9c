"""Score histograms are readable: one panel per OOD set on the bulk of its scores, far outliers counted."""
from __future__ import annotations

import numpy as np
import pytest

from larex import plots


def _demo_like(seed=0):
    rng = np.random.default_rng(seed)
    return {"ID test": rng.normal(-20, 5, 8000), "near": rng.normal(-25, 6, 2000), "far": rng.normal(-4000, 800, 2000)}


def test_panel_ranges_cover_the_id_bulk_and_not_a_far_set():
    s = _demo_like()
    ids = s["ID test"]
    lo, hi = plots.histogram_range(ids, s["near"])
    assert lo < np.percentile(ids, 1) and hi > np.percentile(ids, 99)
    assert lo < np.percentile(s["near"], 1)  # the near set's bulk is in its panel
    lo_far, hi_far = plots.histogram_range(ids, s["far"])
    id_width = np.subtract(*np.percentile(ids, [99.5, 0.5]))
    assert lo_far > -20 - 5 * id_width and hi_far - lo_far < 6 * id_width  # not stretched to -4000
    assert plots.outside_counts(s["far"], lo_far, hi_far) == (int((s["far"] < lo_far).sum()), 0) == (2000, 0)
    below, above = plots.outside_counts(ids, lo, hi)
    assert below == int((ids < lo).sum()) and above == int((ids > hi).sum()) and below + above < 0.02 * len(ids)


def test_histogram_png_and_edge_cases(tmp_path):
    path = plots.score_histogram(_demo_like(), "lared scores", tmp_path / "hist.png", threshold=-28.0,
                                 threshold_label="threshold (95% TPR on ID val)")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    const = {"ID": np.full(50, 3.0), "same": np.full(20, 3.0), "one": np.array([7.0])}
    lo, hi = plots.histogram_range(const["ID"], const["same"])
    assert lo < 3.0 < hi and np.isfinite([lo, hi]).all()
    plots.score_histogram(const, "constant", tmp_path / "c.png", threshold=1e9)  # threshold off the range
    with pytest.raises(ValueError, match="at least one ID and one OOD"):
        plots.histogram_range(np.ones(3), np.array([]))
    with pytest.raises(ValueError, match="at least one OOD set"):
        plots.score_histogram({"ID": np.ones(3)}, "x", tmp_path / "x.png")


def _figure(series, threshold=None):
    import matplotlib.pyplot as plt

    fig = plots._histogram_figure(series, "t", threshold, "threshold")
    axes = [ax for ax in fig.axes if ax.axison]
    return plt, fig, axes


def test_far_set_gets_its_own_panel_and_the_figure_uses_the_ranges():
    s = _demo_like()
    ids, far = s["ID test"], s["far"]
    panels = plots.histogram_panels(s)
    assert [(p.ood, p.own) for p in panels] == [("near", False), ("far", False), ("far", True)]
    ranges = plots.histogram_ranges(s)
    assert ranges == [(p.lo, p.hi) for p in panels]
    id_bulk = np.percentile(ids, [0.5, 99.5])
    far_bulk = np.percentile(far, [0.5, 99.5])
    for lo, hi in ranges[:2]:  # the ID panels: the whole ID bulk, nothing of the far set's
        assert lo < id_bulk[0] and hi > id_bulk[1] and lo > far_bulk[1]
    lo, hi = ranges[2]  # the far set on its own bulk, not stretched to the ID scores
    assert lo < far_bulk[0] and far_bulk[1] < hi < id_bulk[0]
    assert plots.outside_counts(ids, lo, hi) == (0, ids.size)

    plt, fig, axes = _figure(s, threshold=-28.0)
    try:
        assert np.allclose([ax.get_xlim() for ax in axes], ranges, rtol=1e-12, atol=0)
        # clipped scores are counted at the panel edges, as numpy counts them
        for ax, (name, (lo, hi)) in zip(axes, zip(["near", "far", "far"], ranges)):
            texts = {t.get_text() for t in ax.texts}
            for label, v in (("ID test", ids), (name, s[name])):
                below, above = int((v < lo).sum()), int((v > hi).sum())
                assert (f"\u2190 {label}: {below} below" in texts) == (below > 0), (label, texts)
                assert (f"{label}: {above} above \u2192" in texts) == (above > 0), (label, texts)
        assert "\u2190 far: 2000 below" in {t.get_text() for t in axes[1].texts}
        # the threshold is a line where it lies in the range, named at the edge where it does not
        assert any(np.allclose(line.get_xdata(), -28.0) for line in axes[0].lines)
        assert not axes[2].lines and "threshold: -28 \u2192" in {t.get_text() for t in axes[2].texts}
        # the bars of a series hold its scores inside the range, as a fraction of the whole set
        id_bars = axes[1].patches[:49]  # ID test's 49 bars come first
        inside = int(((ids >= ranges[1][0]) & (ids <= ranges[1][1])).sum())
        assert sum(b.get_height() for b in id_bars) == pytest.approx(inside / ids.size)
    finally:
        plt.close(fig)


def test_near_sets_share_no_extra_panel_and_counts_match_numpy():
    rng = np.random.default_rng(1)
    s = {"ID": rng.normal(0, 1, 5000), "a": rng.normal(1, 1.5, 3000), "b": rng.normal(-2, 1, 1000)}
    panels = plots.histogram_panels(s)
    assert [(p.ood, p.own) for p in panels] == [("a", False), ("b", False)]
    for p in panels:
        for v in (s["ID"], s[p.ood]):
            below, above = plots.outside_counts(v, p.lo, p.hi)
            assert (below, above) == (int(np.sum(v < p.lo)), int(np.sum(v > p.hi)))
            assert below + above <= 0.01 * v.size  # the bulk of both is drawn
    v = np.array([-np.inf, 0.0, 1.0, np.inf])
    assert plots.outside_counts(v, -1.0, 2.0) == (1, 1)


def test_edge_cases(tmp_path):
    one = {"ID": np.array([5.0]), "ood": np.array([5.0])}
    ((lo, hi),) = plots.histogram_ranges(one)
    assert lo < 5.0 < hi and np.isfinite([lo, hi]).all()
    assert plots.score_histogram(one, "one", tmp_path / "one.png").stat().st_size > 1000
    big = {"ID": np.full(10, 1e6), "ood": np.full(10, 1e6 + 1e4)}  # constant sets: small ranges, own panel
    assert [p.own for p in plots.histogram_panels(big)] == [False, True]
    assert plots.score_histogram(big, "big", tmp_path / "big.png", threshold=np.nan).is_file()
    with_inf = {"ID": np.r_[np.random.default_rng(2).normal(size=100), -np.inf], "ood": np.arange(50.0)}
    ranges = plots.histogram_ranges(with_inf)
    assert all(np.isfinite(r).all() for r in ranges)
    for bad, match in (({"ID": np.ones(3), "ood": np.array([])}, "'ood' is empty"),
                       ({"ID": np.array([]), "ood": np.ones(3)}, "'ID' is empty"),
                       ({"ID": np.ones(3), "ood": np.full(4, np.nan)}, "no finite score"),
                       ({}, "at least one OOD set")):
        with pytest.raises(ValueError, match=match):
            plots.histogram_panels(bad)
        with pytest.raises(ValueError, match=match):
            plots.score_histogram(bad, "x", tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
