"""larex.entropy.knn_entropy against the reference entropy_estimators.continuous.get_h (KD-tree, max-norm).

Both implementations are checked: the fused numba CPU kernel (``backend="numba"``, the CPU default) and the
chunked torch tensor path (``backend="torch"``, used on GPUs), against get_h and against each other."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from entropy_estimators.continuous import get_h

from larex._entropy_numba import sorting_network, tile_width
from larex.entropy import default_k, knn_entropy

BACKENDS = pytest.mark.parametrize("backend", ["numba", "torch"])


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
@BACKENDS
def test_matches_reference_float64(n, s, d, k, backend):
    x = _data(n, s, d, seed=s * 100 + d)
    k_used = default_k(s) if k is None else k
    got = knn_entropy(torch.from_numpy(x), k=k, backend=backend)
    assert got.dtype == torch.float64 and got.shape == (n, d)
    ref = _reference(x, k_used, 1e-5)
    assert np.max(np.abs(got.numpy() - ref)) <= 1e-9


@pytest.mark.parametrize("k", [1, 3, 5])
@BACKENDS
def test_matches_reference_with_ties_and_min_dist(k, backend):
    rng = np.random.default_rng(11)
    x = np.round(rng.normal(size=(6, 20, 4)), 1)  # many duplicate values
    x[:, :, 2] = 0.7  # all-equal column: every distance is 0 -> min_dist
    x[1, :, 3] = np.repeat([1.0, 2.0, 3.0, 4.0], 5)  # tied blocks of 5 values
    x[2, :10, 0] = x[2, 10:, 0]  # every value duplicated
    ref = _reference(x, k, 1e-5)
    got = knn_entropy(x, k=k, backend=backend).numpy()
    assert np.max(np.abs(got - ref)) <= 1e-9
    const_col = -_digamma_int(k) + _digamma_int(20) + np.log(2e-5)
    np.testing.assert_allclose(got[:, 2], const_col, rtol=0, atol=1e-12)


def _digamma_int(m: int) -> float:
    # digamma(m) = -euler_gamma + sum_{i<m} 1/i for positive integers.
    return -np.euler_gamma + sum(1.0 / i for i in range(1, m))


@BACKENDS
def test_min_dist_zero_and_large(backend):
    x = _data(3, 12, 2, seed=5)
    for md in (0.0, 0.5):
        got = knn_entropy(x, k=3, min_dist=md, backend=backend).numpy()
        assert np.max(np.abs(got - _reference(x, 3, md))) <= 1e-9


@BACKENDS
def test_float32_stays_float32(backend):
    x = _data(5, 24, 4, seed=3)
    got = knn_entropy(torch.from_numpy(x.astype(np.float32)), backend=backend)
    assert got.dtype == torch.float32
    ref = _reference(x.astype(np.float32).astype(np.float64), 5, 1e-5)
    assert np.max(np.abs(got.numpy().astype(np.float64) - ref)) <= 1e-4


@BACKENDS
def test_numpy_input_and_chunking(backend):
    x = _data(13, 10, 3, seed=8)
    full = knn_entropy(x, backend=backend)
    assert isinstance(full, torch.Tensor)
    for chunk in (1, 4, 13, 100):
        torch.testing.assert_close(knn_entropy(x, chunk_size=chunk, backend=backend), full, rtol=0, atol=0)


def test_default_k():
    assert [default_k(s) for s in (2, 3, 4, 5, 6, 10, 64)] == [1, 2, 3, 4, 5, 5, 5]
    with pytest.raises(ValueError, match="at least 2"):
        default_k(1)


@BACKENDS
def test_gaussian_known_value(backend):
    sigma = 2.5
    x = np.random.default_rng(0).normal(scale=sigma, size=(1, 20000, 1))
    got = float(knn_entropy(x, backend=backend)[0, 0])
    assert abs(got - 0.5 * np.log(2 * np.pi * np.e * sigma**2)) < 0.05


@BACKENDS
def test_errors(backend):
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
        knn_entropy(bad, backend=backend)
    with pytest.raises(ValueError, match="min_dist"):
        knn_entropy(x, min_dist=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        knn_entropy(x, chunk_size=0)
    with pytest.raises(ValueError, match="backend must be"):
        knn_entropy(x, backend="cuda")


# ----------------------------------------------------------------------------------- numba kernel details
@pytest.mark.parametrize("n", range(1, 13))
def test_sorting_network_sorts_every_binary_sequence(n):
    # 0-1 principle: a comparator network that sorts all 2^n binary sequences sorts every sequence.
    lo, hi = sorting_network(n)
    seqs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.int8)  # [2^n, n], every 0/1 pattern
    for a, b in zip(lo, hi):
        seqs[:, [a, b]] = np.sort(seqs[:, [a, b]], axis=1)
    assert (np.diff(seqs, axis=1) >= 0).all()


def test_sorting_network_sizes_and_random_sequences():
    # Batcher merge-exchange comparator counts (Knuth TAOCP 5.3.4): 63 for n=16, 191 for n=32.
    assert len(sorting_network(16)[0]) == 63 and len(sorting_network(32)[0]) == 191
    rng = np.random.default_rng(0)
    for n in (13, 17, 31, 33, 64, 100):
        lo, hi = sorting_network(n)
        x = rng.normal(size=(50, n))
        for a, b in zip(lo, hi):
            x[:, [a, b]] = np.sort(x[:, [a, b]], axis=1)
        np.testing.assert_array_equal(x, np.sort(x, axis=1))


@pytest.mark.parametrize("s", [2, 3, 6, 16, 17, 32, 40])
def test_numba_equals_torch_path(s):
    # many dims so that several tiles (and a ragged last tile) are used
    rng = np.random.default_rng(s)
    d = tile_width(s, 10_000) * 2 + 5
    x = rng.normal(size=(3, s, d)) * rng.uniform(0.01, 3.0, size=(3, 1, d))
    x[:, :, ::7] = np.round(x[:, :, ::7], 1)  # ties
    for k in sorted({1, default_k(s), s - 1}):
        a = knn_entropy(x, k=k, backend="numba").numpy()
        b = knn_entropy(x, k=k, backend="torch").numpy()
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_numba_extreme_distances_take_the_exact_path():
    # distances ~1e-200 (min_dist=0) and ~1e200: the grouped product of 8 factors would under/overflow,
    # so those groups must be summed factor by factor; compare with get_h and the torch path.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 20, 3))
    x[:, :, 0] *= 1e-200
    x[:, :, 1] *= 1e200
    for md in (0.0, 1e-5):
        got = knn_entropy(x, k=3, min_dist=md, backend="numba").numpy()
        np.testing.assert_allclose(got, knn_entropy(x, k=3, min_dist=md, backend="torch").numpy(), rtol=1e-14)
        np.testing.assert_allclose(got, _reference(x, 3, md), rtol=1e-12)
    assert got[0, 0] == pytest.approx(-_digamma_int(3) + _digamma_int(20) + np.log(2e-5), abs=1e-12)
    zero = np.zeros((1, 10, 2))
    zero[0, :, 1] = np.arange(10.0)
    got = knn_entropy(zero, k=2, min_dist=0.0, backend="numba").numpy()
    assert got[0, 0] == -np.inf and np.isfinite(got[0, 1])


def test_numba_input_layouts_and_dtypes():
    x = _data(4, 12, 70, seed=4)
    ref = knn_entropy(x, backend="torch")
    strided = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1))).transpose(1, 2)  # non-contiguous view
    torch.testing.assert_close(knn_entropy(strided, backend="numba"), ref, rtol=0, atol=1e-12)
    h16 = torch.from_numpy(x).half()
    got16 = knn_entropy(h16, backend="numba", chunk_size=1)
    assert got16.dtype == torch.float32
    torch.testing.assert_close(got16, knn_entropy(h16.float(), backend="torch"), rtol=0, atol=1e-5)
    ints = np.round(x * 10).astype(np.int64)
    got_int = knn_entropy(ints, backend="numba")
    assert got_int.dtype == torch.float64
    torch.testing.assert_close(got_int, knn_entropy(ints.astype(np.float64), backend="torch"), rtol=0, atol=1e-12)
    assert knn_entropy(np.zeros((0, 5, 3)), backend="numba").shape == (0, 3)


def test_numba_result_does_not_depend_on_thread_count():
    from scipy.special import digamma

    from larex._entropy_numba import entropy_tiles

    x = _data(9, 16, 3000, seed=9)
    ref = knn_entropy(x, backend="torch").numpy()
    const = float(-digamma(5) + digamma(16))
    for threads in (1, 2, 3, 8):
        out = np.empty((9, 3000))
        assert entropy_tiles(x, 5, 1e-5, const, out, threads=threads) == 0
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = knn_entropy(x, backend="numba")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, knn_entropy(x, backend="numba"), rtol=0, atol=0)


def _entropy_in_child(queue) -> None:
    queue.put(knn_entropy(_data(3, 8, 5000, seed=2), backend="numba").sum().item())


def test_numba_kernel_works_in_a_forked_child_and_from_threads():
    # numba's OpenMP layer would abort a forked child ("fork() called from a process already using GNU
    # OpenMP") and its workqueue layer aborts on concurrent calls; the kernel uses plain Python threads.
    import multiprocessing as mp
    from concurrent.futures import ThreadPoolExecutor

    x = _data(3, 8, 5000, seed=2)
    expected = knn_entropy(x, backend="numba").sum().item()  # the parent has run the kernel on threads
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_entropy_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=120) == expected
    finally:
        child.join(timeout=30)
    assert child.exitcode == 0
    with ThreadPoolExecutor(4) as pool:
        sums = list(pool.map(lambda _: knn_entropy(x, backend="numba").sum().item(), range(8)))
    assert sums == [expected] * 8
