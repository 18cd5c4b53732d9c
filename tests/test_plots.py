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
