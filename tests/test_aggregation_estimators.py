"""Aggregation estimators (larex.aggregation): each against an independent computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from entropy_estimators import continuous
from scipy import stats

from larex.aggregation.gaussian import GaussianEntropy
from larex.aggregation.joint import JointKNNEntropy, joint_knn_entropy
from larex.aggregation.knn import KNNEntropy, resolve_k
from larex.aggregation.mean import LatentMean
from larex.entropy import knn_entropy


def _latents(n=40, s=16, d=6, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, s, d)) * rng.uniform(0.1, 3.0, size=(1, 1, d))
    if ties:  # dropout-like: some samples of some dims are exactly 0, one dim constant
        x[rng.random(x.shape) < 0.3] = 0.0
        x[:, :, 0] = 1.5
    return x


def test_knn_k_rule_of_s():
    assert [resolve_k("sqrt", s) for s in (2, 3, 8, 16, 32, 100)] == [1, 2, 3, 4, 6, 10]
    assert [resolve_k("half", s) for s in (2, 3, 8, 16, 32)] == [1, 1, 4, 8, 16]
    assert resolve_k(None, 16) == 5 and resolve_k(None, 4) == 3 and resolve_k(7, 16) == 7
    x = _latents()
    np.testing.assert_array_equal(KNNEntropy()({"latent": x}), knn_entropy(torch.from_numpy(x)).numpy())
    np.testing.assert_array_equal(KNNEntropy(k="sqrt")({"latent": x}), knn_entropy(torch.from_numpy(x), k=4).numpy())
    # the reference per column (entropy_estimators.get_h, max-norm), k = sqrt rule
    got = KNNEntropy(k="sqrt")({"latent": x[:3]})
    ref = [[continuous.get_h(x[i, :, j][:, None], k=4, norm="max", min_dist=1e-5) for j in range(6)] for i in range(3)]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    for bad in (0, -1, 2.5, True, "cube"):
        with pytest.raises(ValueError, match="k must be"):
            KNNEntropy(k=bad)


@pytest.mark.parametrize("ddof", [1, 0])
def test_gaussian_entropy_is_half_log_2_pi_e_var(ddof):
    x = _latents(ties=True)
    got = GaussianEntropy(min_std=1e-3, ddof=ddof)({"latent": x})
    sd = np.maximum(x.std(axis=1, ddof=ddof), 1e-3)
    np.testing.assert_allclose(got, stats.norm(scale=sd).entropy(), rtol=1e-12)
    assert np.all(got[:, 0] == pytest.approx(0.5 * math.log(2 * math.pi * math.e * 1e-6)))  # constant dim: floor
    # Gaussian samples: the estimate converges to the true entropy, with less spread than kNN at S = 16
    rng = np.random.default_rng(1)
    g = rng.normal(scale=2.0, size=(4000, 16, 1))
    true = 0.5 * math.log(2 * math.pi * math.e * 4.0)
    h_g, h_k = GaussianEntropy()({"latent": g})[:, 0], KNNEntropy()({"latent": g})[:, 0]
    assert abs(h_g.mean() - true) < 0.05 and h_g.std() < h_k.std()
    with pytest.raises(ValueError, match="min_std"):
        GaussianEntropy(min_std=0.0)
    bad = np.ones((2, 4, 3))
    bad[1, 2, 0] = np.inf
    for est in (GaussianEntropy(), LatentMean(), JointKNNEntropy(k=2)):
        with pytest.raises(ValueError, match="NaN"):
            est({"latent": bad})
        bad[1, 2, 0] = np.nan


@pytest.mark.parametrize("ties", [False, True])
def test_joint_knn_entropy_matches_entropy_estimators(ties):
    x = _latents(n=12, s=16, d=5, ties=ties)
    got = joint_knn_entropy(torch.from_numpy(x), k=5)
    ref = [continuous.get_h(x[i], k=5, norm="max", min_dist=1e-5) for i in range(12)]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)
    both = JointKNNEntropy()({"latent": x})
    assert both.shape == (12, 6)
    np.testing.assert_array_equal(both[:, :5], KNNEntropy()({"latent": x}))
    np.testing.assert_allclose(both[:, 5], ref, rtol=1e-12, atol=1e-12)
    alone = JointKNNEntropy(k="sqrt", marginals=False)({"latent": x})
    ref4 = [continuous.get_h(x[i], k=4, norm="max", min_dist=1e-5) for i in range(12)]
    assert alone.shape == (12, 1)
    np.testing.assert_allclose(alone[:, 0], ref4, rtol=1e-12, atol=1e-12)
    # chunking over inputs does not change the values
    import larex.aggregation.joint as joint_mod
    old = joint_mod._CHUNK_ELEMENTS
    try:
        joint_mod._CHUNK_ELEMENTS = 16 * 16 * 3
        np.testing.assert_array_equal(joint_knn_entropy(torch.from_numpy(x), k=5).numpy(), got.numpy())
    finally:
        joint_mod._CHUNK_ELEMENTS = old


def test_latent_mean_and_step_identities():
    x = _latents()
    np.testing.assert_allclose(LatentMean()({"latent": x}), x.mean(axis=1), rtol=0, atol=1e-15)
    assert LatentMean().output == "latent_mean"
    ids = {KNNEntropy().identity()["estimator"], GaussianEntropy().identity()["estimator"],
           JointKNNEntropy().identity()["estimator"]}
    assert ids == {"knn", "gaussian", "joint"}
    assert KNNEntropy(k=5).identity() != KNNEntropy(k=10).identity()
    with pytest.raises(ValueError, match=r"\[N, S, D\]"):
        KNNEntropy()({"latent": np.zeros((3, 4))})


def test_estimators_are_row_independent():
    x = _latents(n=30)
    for est in (KNNEntropy(), GaussianEntropy(), JointKNNEntropy(), LatentMean()):
        full = est({"latent": x})
        parts = np.concatenate([est({"latent": x[i:i + 7]}) for i in range(0, 30, 7)])
        np.testing.assert_array_equal(parts, full)


def test_classification_steps_from_the_configured_estimator():
    from larex.tasks.classification import Classification

    task = Classification()
    assert task.derived_keys() == {"entropy": ("latent",), "latent_mean": ("latent",)}
    x = _latents()
    steps = {s.output: s for s in task.aggregation_steps({"estimator": GaussianEntropy(), "device": "cpu"})}
    np.testing.assert_array_equal(steps["entropy"].fn({"latent": x}), GaussianEntropy()({"latent": x}))
    assert steps["entropy"].identity["estimator"] == "gaussian"
    with pytest.raises(ValueError, match="not 'entropy'"):
        task.aggregation_steps({"estimator": LatentMean()})
