"""Fused CPU kernel for :func:`larex.entropy.knn_entropy` (numba, compiled on first use).

One pass per tile of ``[S, w]`` values (one input, ``w`` consecutive dimensions), everything in cache:

1. copy the tile out of ``x[i, :, t0:t0 + w]`` (and flag non-finite values: ``v - v`` is NaN only for them);
2. sort each column with a fixed Batcher merge-exchange network: each comparator is an element-wise
   min/max of two rows, so all ``w`` columns are sorted at once with SIMD instructions;
3. for each sorted position ``p`` take the k-th neighbour distance as the smallest width of the k+1
   windows ``[a, a + k]`` that contain ``p`` (same formula as the torch path);
4. add ``log(2 * max(d_k, min_dist))``, taking one ``log`` per group of up to 8 factors (a product in
   float64); a group whose running product leaves [1e-300, 1e300] (possible only for extreme distances)
   is summed factor by factor instead, so every group is exact to a few ulps.

Float32 and float64 inputs are handled in their own precision for steps 1-3 and in float64 for step 4.
Tiles are independent (no cross-tile reduction), so the result does not depend on the thread count
(``threads`` Python threads run contiguous tile ranges; the compiled kernel releases the GIL).
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numba
import numpy as np

__all__ = ["entropy_tiles", "sorting_network", "tile_width"]

LOG_GROUP = 8  # factors multiplied before one log
MIN_ELEMENTS_PER_THREAD = 1 << 16  # smaller inputs run on the calling thread
_PROD_LO, _PROD_HI = 1e-300, 1e300  # a running product outside this range takes the factor-by-factor path
_FASTMATH = {"nsz", "contract"}  # no reassociation, no NaN/Inf assumptions: results equal the plain formula


@lru_cache(maxsize=None)
def sorting_network(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Comparator pairs ``(lo[c], hi[c])`` of Batcher's merge-exchange sort (Knuth, TAOCP 5.2.2, Algorithm M)
    for ``n`` keys: applying ``min``/``max`` to each pair in order sorts any sequence ascending.
    ``n=16`` takes 63 comparators, ``n=32`` 191 (vs ``n(n-1)/2`` for insertion)."""
    if n < 1:
        raise ValueError(f"sorting network needs n >= 1, got {n}")
    lo: list[int] = []
    hi: list[int] = []
    if n > 1:
        t = (n - 1).bit_length()
        p = 1 << (t - 1)
        while p > 0:
            q, r, d = 1 << (t - 1), 0, p
            while d > 0:
                for i in range(n - d):
                    if i & p == r:
                        lo.append(i)
                        hi.append(i + d)
                d, q, r = q - p, q >> 1, p
            p >>= 1
    return np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)


def tile_width(s: int, d: int) -> int:
    """Columns per tile: about 8K values (64 KiB in float64) per tile, 16..512 columns, at most ``d``."""
    return max(1, min(d, max(16, min(512, (8192 // s) // 16 * 16))))


@numba.njit(fastmath=_FASTMATH, nogil=True, cache=False)
def _kernel(x, lo, hi, k, min_dist, const, tile, out, bad, job_start, job_stop):  # pragma: no cover - compiled
    n, s, d = x.shape
    n_tiles = (d + tile - 1) // tile
    for job in range(job_start, job_stop):
        i = job // n_tiles
        t0 = (job % n_tiles) * tile
        w = min(d, t0 + tile) - t0
        buf = np.empty((s, w), dtype=x.dtype)
        check = np.zeros(w, dtype=x.dtype)
        for r in range(s):
            src = x[i, r, t0:t0 + w]
            dst = buf[r]
            for t in range(w):
                v = src[t]
                dst[t] = v
                check[t] += v - v  # stays 0 for finite values, becomes NaN at the first NaN or +-Inf
        if np.sum(check) != 0.0:  # NaN != 0.0 is True
            bad[job] = 1
            continue
        for c in range(lo.shape[0]):  # sorting network: every column of the tile at once
            ra = buf[lo[c]]
            rb = buf[hi[c]]
            for t in range(w):
                u = ra[t]
                v = rb[t]
                ra[t] = u if u < v else v
                rb[t] = v if u < v else u
        acc = np.zeros(w, dtype=np.float64)
        prod = np.ones(w, dtype=np.float64)
        n_out = np.zeros(w, dtype=np.float64)  # running products of this group outside [_PROD_LO, _PROD_HI]
        group = np.empty((LOG_GROUP, w), dtype=np.float64)
        # Two buffers for the running minimum, alternated per window: ``best[t] = min(best[t], m)`` in place
        # compiles to masked AVX-512 stores, which are ~5x slower here (AMD Zen 4) than plain stores.
        best_a = np.empty(w, dtype=x.dtype)
        best_b = np.empty(w, dtype=x.dtype)
        g = 0
        for p in range(s):
            rp = buf[p]
            cur = best_a
            nxt = best_b
            cur[:] = np.inf
            for j in range(k + 1):  # window [p - j, p - j + k]
                a = p - j
                if a < 0 or a + k > s - 1:
                    continue
                ra = buf[a]
                rk = buf[a + k]
                for t in range(w):
                    left = rp[t] - ra[t]
                    right = rk[t] - rp[t]
                    m = left if left > right else right
                    b = cur[t]
                    nxt[t] = m if m < b else b
                cur, nxt = nxt, cur
            gv = group[g]
            for t in range(w):
                v = np.float64(cur[t])
                v = 2.0 * (v if v > min_dist else min_dist)
                gv[t] = v
                q = prod[t] * v
                prod[t] = q
                n_out[t] += 0.0 if (q >= _PROD_LO and q <= _PROD_HI) else 1.0
            g += 1
            if g == LOG_GROUP or p == s - 1:
                for t in range(w):
                    if n_out[t] == 0.0:
                        acc[t] += math.log(prod[t])
                    else:
                        for e in range(g):
                            acc[t] += math.log(group[e, t])
                    prod[t] = 1.0
                    n_out[t] = 0.0
                g = 0
        row = out[i]
        for t in range(w):
            row[t0 + t] = acc[t] / s + const


def entropy_tiles(x: np.ndarray, k: int, min_dist: float, const: float, out: np.ndarray, threads: int = 1) -> int:
    """Fill ``out[N, D]`` with the kNN entropy of C-contiguous float32/float64 ``x[N, S, D]``.

    ``threads`` > 1 splits the tiles into contiguous ranges run by a process-wide pool of Python threads (the
    kernel releases the GIL). Plain threads rather than numba's ``parallel=True``: its OpenMP layer aborts a
    forked child that calls the kernel again, its workqueue layer aborts on concurrent calls, and TBB is not
    loadable from a pip install. Returns the number of tiles that held a NaN/Inf (their ``out`` entries are left unset).
    """
    n, s, d = x.shape
    lo, hi = sorting_network(s)
    tile = tile_width(s, d)
    n_jobs = n * ((d + tile - 1) // tile)
    bad = np.zeros(n_jobs, dtype=np.uint8)
    args = (x, lo, hi, int(k), float(min_dist), float(const), tile, out, bad)
    threads = max(1, min(int(threads), n_jobs, x.size // MIN_ELEMENTS_PER_THREAD))
    if threads == 1:
        _kernel(*args, 0, n_jobs)
    else:
        bounds = np.linspace(0, n_jobs, 4 * threads + 1).astype(np.int64)  # 4 ranges per thread: balance
        pool = _pool(threads)
        for f in [pool.submit(_kernel, *args, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]:
            f.result()
    return int(bad.sum())


_POOLS: dict[int, ThreadPoolExecutor] = {}  # by thread count; kept for the process (idle threads just wait)
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide executor with ``threads`` workers (starting threads per call cost ~1 ms)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="larex-entropy")
        return pool


def _forget_pools_after_fork() -> None:
    """A forked child has none of the parent's worker threads: start fresh pools (and a fresh lock)."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)
