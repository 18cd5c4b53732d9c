"""larex.metrics against scikit-learn, hand-computed values and the sign conventions of DESIGN.md."""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
from sklearn import metrics as skm

from larex.metrics import (
    METRIC_NAMES,
    auroc,
    average_precision,
    fpr_at_tpr,
    ood_metrics,
    rates_at_threshold,
    roc_curve,
    threshold_at_tpr,
    zscore_thresholds,
)


def _sk_fpr_at_tpr(y, s, tpr=0.95):
    fpr, tpr_c, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return fpr[np.argmax(tpr_c >= tpr)]


def _sk_metrics(id_s, ood_s):
    y_id = np.r_[np.ones(id_s.size), np.zeros(ood_s.size)]
    s = np.r_[id_s, ood_s]
    return {
        "auroc": skm.roc_auc_score(y_id, s),
        "aupr_in": skm.average_precision_score(y_id, s),
        "aupr_out": skm.average_precision_score(1 - y_id, -s),
        "fpr95": _sk_fpr_at_tpr(y_id, s),
        "fpr95_ood": _sk_fpr_at_tpr(1 - y_id, -s),
    }


@pytest.mark.parametrize("seed", range(8))
def test_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(5, 300, size=2)
    id_s = rng.integers(0, 12, size=n_id).astype(float)  # integer-valued: many ties
    ood_s = rng.integers(-3, 9, size=n_ood).astype(float)
    got = ood_metrics(id_s, ood_s)
    assert tuple(got) == METRIC_NAMES
    assert all(isinstance(v, float) for v in got.values())
    ref = _sk_metrics(id_s, ood_s)
    for key in METRIC_NAMES:
        assert abs(got[key] - ref[key]) <= 1e-12, key


def test_roc_curve_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=200)
    s = rng.integers(0, 20, size=200) / 4.0
    fpr, tpr, thr = roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)
    np.testing.assert_array_equal(thr, sk_thr)
    assert abs(average_precision(y, s) - skm.average_precision_score(y, s)) <= 1e-12


def test_continuous_scores_match_sklearn():
    rng = np.random.default_rng(4)
    id_s = rng.normal(1.0, 1.0, size=500)
    ood_s = rng.normal(0.0, 1.5, size=400)
    got = ood_metrics(id_s, ood_s)
    ref = _sk_metrics(id_s, ood_s)
    for key in METRIC_NAMES:
        assert abs(got[key] - ref[key]) <= 1e-12, key


def test_hand_computed_example():
    # ID: 3, 2, 2 ; OOD: 2, 1.  Pairs (id > ood) = 1+1+1 + 0.5*2 (ties at 2) + ... :
    # vs ood 2: 3>2 (1), 2=2 (0.5), 2=2 (0.5); vs ood 1: 1, 1, 1 -> 5 / 6.
    id_s = np.array([3.0, 2.0, 2.0])
    ood_s = np.array([2.0, 1.0])
    m = ood_metrics(id_s, ood_s)
    assert m["auroc"] == pytest.approx(5 / 6, abs=1e-15)
    # Thresholds 3 (TP1,FP0), 2 (TP3,FP1), 1 (TP3,FP2): AP_in = 1/3*1 + 2/3*3/4 = 5/6.
    assert m["aupr_in"] == pytest.approx(5 / 6, abs=1e-15)
    # OOD positive, -s: thresholds -1 (TP1,FP0), -2 (TP2,FP2), -3 (TP2,FP3): AP_out = 1/2*1 + 1/2*1/2 = 3/4.
    assert m["aupr_out"] == pytest.approx(3 / 4, abs=1e-15)
    # 95% of ID needs t = 2 -> OOD accepted: {2} -> 1/2.
    assert m["fpr95"] == 0.5
    # 95% of OOD flagged needs -s >= -2 -> ID flagged: {2, 2} -> 2/3.
    assert m["fpr95_ood"] == pytest.approx(2 / 3, abs=1e-15)
    fpr, tpr, thr = roc_curve(np.r_[1, 1, 1, 0, 0], np.r_[id_s, ood_s])
    np.testing.assert_array_equal(thr, [np.inf, 3.0, 2.0, 1.0])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])


def test_perfect_and_reversed_separation():
    id_s = np.arange(10, 20, dtype=float)
    ood_s = np.arange(0, 10, dtype=float)
    m = ood_metrics(id_s, ood_s)
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0, "fpr95_ood": 0.0}
    r = ood_metrics(ood_s, id_s)  # ID scored lower than OOD: no label flipping
    assert r["auroc"] == 0.0
    assert r["fpr95"] == 1.0 and r["fpr95_ood"] == 1.0
    assert r["aupr_in"] < 0.5 and r["aupr_out"] < 0.5


def test_threshold_at_tpr_with_ties():
    s = np.array([5.0, 4.0, 4.0, 4.0, 3.0, 2.0, 2.0, 1.0, 1.0, 0.0])
    # keep >= 95% of 10 -> all 10 -> t = 0; 90% -> 9 -> t = 1; 70% -> 7 -> t = 2 (8 of 10 are >= 2).
    assert threshold_at_tpr(s, 0.95) == 0.0
    assert threshold_at_tpr(s, 0.90) == 1.0
    assert threshold_at_tpr(s, 0.70) == 2.0
    assert threshold_at_tpr(s, 0.30) == 4.0  # 4 of 10 are >= 4
    assert threshold_at_tpr(s, 0.10) == 5.0
    rng = np.random.default_rng(9)
    for _ in range(20):
        v = rng.integers(0, 6, size=rng.integers(1, 40)).astype(float)
        q = float(rng.uniform(0.05, 1.0))
        t = threshold_at_tpr(v, q)
        assert np.mean(v >= t) >= q
        higher = v[v > t]
        if higher.size:  # any larger candidate threshold keeps too few
            assert np.mean(v >= higher.min()) < q


def test_fpr_at_tpr_consistent_with_threshold():
    rng = np.random.default_rng(12)
    id_s = rng.integers(0, 30, size=157).astype(float)
    ood_s = rng.integers(-10, 20, size=93).astype(float)
    for q in (0.5, 0.8, 0.95, 1.0):
        t = threshold_at_tpr(id_s, q)
        rates = rates_at_threshold(id_s, ood_s, t)
        assert rates["tpr"] >= q
        assert fpr_at_tpr(id_s, ood_s, q) == rates["fpr"]
    assert rates_at_threshold(np.array([1.0, 2.0, 3.0]), np.array([2.0, 0.0]), 2.0) == {"tpr": 2 / 3, "fpr": 0.5}


def test_zscore_thresholds():
    rng = np.random.default_rng(2)
    s = rng.normal(3.0, 2.0, size=1000)
    th = zscore_thresholds(s)
    assert set(th) == {"z_p90", "z_p95", "z_p99"}
    mean, std = s.mean(), s.std()
    assert th["z_p95"] == pytest.approx(mean - 1.6448536269514722 * std, abs=1e-12)
    assert th["z_p99"] == pytest.approx(mean + NormalDist().inv_cdf(0.01) * std, abs=1e-12)
    assert th["z_p99"] < th["z_p95"] < th["z_p90"]
    # Gaussian data: the kept fraction is close to the nominal one.
    assert abs(np.mean(s >= th["z_p90"]) - 0.90) < 0.03
    assert math.isclose(zscore_thresholds(s, percentiles=(97.5,))["z_p97.5"], mean - 1.959963984540054 * std)


def test_input_errors():
    good = np.array([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"ood_scores contains 1 NaN and 0 Inf"):
        ood_metrics(good, np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match=r"id_scores contains 0 NaN and 2 Inf"):
        auroc(np.array([np.inf, -np.inf, 1.0]), good)
    with pytest.raises(ValueError, match="id_scores is empty"):
        ood_metrics(np.array([]), good)
    with pytest.raises(ValueError, match="1-D"):
        ood_metrics(good[None, :], good)
    with pytest.raises(ValueError, match="id_val_scores is empty"):
        threshold_at_tpr([], 0.95)
    with pytest.raises(ValueError, match="tpr"):
        threshold_at_tpr(good, 0.0)
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(np.ones(3), good)
    with pytest.raises(ValueError, match="std 0"):
        zscore_thresholds(np.ones(5))
