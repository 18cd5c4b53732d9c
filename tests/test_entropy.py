"""larex.entropy.knn_entropy against the reference entropy_estimators.continuous.get_h (KD-tree, max-norm)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from entropy_estimators.continuous import get_h

from larex.entropy import default_k, knn_entropy


def _reference(samples: np.ndarray, k: int, min_dist: float) -> np.ndarray:
    n, _, d = samples.shape
    out = np.empty((n, d))
    for i in range(n):
        for j in range(d):
            out[i, j] = get_h(samples[i, :, j].reshape(-1, 1), k=k, norm="max", min_dist=min_dist)
    return out


def _data(n: int, s: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, s, d)) * rng.uniform(0.01, 3.0, size=(n, 1, d))
    return x


@pytest.mark.parametrize(
    ("n", "s", "d", "k"),
    [(7, 16, 5, None), (7, 4, 5, None), (5, 32, 3, 5), (4, 32, 3, 1), (3, 9, 2, 8), (3, 2, 4, None)],
)
def test_matches_reference_float64(n, s, d, k):
    x = _data(n, s, d, seed=s * 100 + d)
    k_used = default_k(s) if k is None else k
    got = knn_entropy(torch.from_numpy(x), k=k)
    assert got.dtype == torch.float64 and got.shape == (n, d)
    ref = _reference(x, k_used, 1e-5)
    assert np.max(np.abs(got.numpy() - ref)) <= 1e-9


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_reference_with_ties_and_min_dist(k):
    rng = np.random.default_rng(11)
    x = np.round(rng.normal(size=(6, 20, 4)), 1)  # many duplicate values
    x[:, :, 2] = 0.7  # all-equal column: every distance is 0 -> min_dist
    x[1, :, 3] = np.repeat([1.0, 2.0, 3.0, 4.0], 5)  # tied blocks of 5 values
    x[2, :10, 0] = x[2, 10:, 0]  # every value duplicated
    ref = _reference(x, k, 1e-5)
    got = knn_entropy(x, k=k).numpy()
    assert np.max(np.abs(got - ref)) <= 1e-9
    const_col = -_digamma_int(k) + _digamma_int(20) + np.log(2e-5)
    np.testing.assert_allclose(got[:, 2], const_col, rtol=0, atol=1e-12)


def _digamma_int(m: int) -> float:
    # digamma(m) = -euler_gamma + sum_{i<m} 1/i for positive integers.
    return -np.euler_gamma + sum(1.0 / i for i in range(1, m))


def test_min_dist_zero_and_large():
    x = _data(3, 12, 2, seed=5)
    for md in (0.0, 0.5):
        got = knn_entropy(x, k=3, min_dist=md).numpy()
        assert np.max(np.abs(got - _reference(x, 3, md))) <= 1e-9


def test_float32_stays_float32():
    x = _data(5, 24, 4, seed=3)
    got = knn_entropy(torch.from_numpy(x.astype(np.float32)))
    assert got.dtype == torch.float32
    ref = _reference(x.astype(np.float32).astype(np.float64), 5, 1e-5)
    assert np.max(np.abs(got.numpy().astype(np.float64) - ref)) <= 1e-4


def test_numpy_input_and_chunking():
    x = _data(13, 10, 3, seed=8)
    full = knn_entropy(x)
    assert isinstance(full, torch.Tensor)
    for chunk in (1, 4, 13, 100):
        torch.testing.assert_close(knn_entropy(x, chunk_size=chunk), full, rtol=0, atol=0)


def test_default_k():
    assert [default_k(s) for s in (2, 3, 4, 5, 6, 10, 64)] == [1, 2, 3, 4, 5, 5, 5]
    with pytest.raises(ValueError, match="at least 2"):
        default_k(1)


def test_gaussian_known_value():
    sigma = 2.5
    x = np.random.default_rng(0).normal(scale=sigma, size=(1, 20000, 1))
    got = float(knn_entropy(x)[0, 0])
    assert abs(got - 0.5 * np.log(2 * np.pi * np.e * sigma**2)) < 0.05


def test_errors():
    x = torch.from_numpy(_data(2, 6, 3, seed=1))
    with pytest.raises(ValueError, match="1 <= k < S"):
        knn_entropy(x, k=6)
    with pytest.raises(ValueError, match="1 <= k < S"):
        knn_entropy(x, k=0)
    with pytest.raises(ValueError, match="3-D"):
        knn_entropy(x[0])
    with pytest.raises(ValueError, match="at least 2"):
        knn_entropy(x[:, :1])
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    bad[1, 2, 1] = float("inf")
    with pytest.raises(ValueError, match="2 NaN/Inf"):
        knn_entropy(bad)
    with pytest.raises(ValueError, match="min_dist"):
        knn_entropy(x, min_dist=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        knn_entropy(x, chunk_size=0)
