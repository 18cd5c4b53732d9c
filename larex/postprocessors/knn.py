"""Nearest-neighbour baselines on penultimate features: deep kNN (``knn``) and NNGuide (``nnguide``).

Both search a bank built from the ID ``fit`` split with an exact, chunked inner-product top-k: float32
candidates, float64 values, certified by a rounding-error bound (:func:`topk_inner`); peak memory is
``batch_size x bank_chunk`` similarities, never the full [N, M] matrix.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from larex.postprocessors._features import check_positive_int, chunks, energy, f64
from larex.postprocessors.base import Postprocessor


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), float64."""
    x = f64(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _float32_error_bound(n_features: int) -> float:
    """``c`` with ``|fl32(a . b) - a . b| <= c * ||a|| * ||b||`` for float64 vectors rounded to float32 and
    multiplied in float32 with any summation order: input rounding (2u) plus the dot-product bound
    ``gamma_F = F u / (1 - F u)`` (Higham, Accuracy and Stability, 3.1), u = 2^-24, written as gamma_{F+3}."""
    u = float(np.finfo(np.float32).eps) / 2.0
    n = n_features + 3
    if n * u >= 0.5:
        return math.inf  # no useful bound: every query takes the float64 path
    return n * u / (1.0 - n * u)


def _exact_topk(q: torch.Tensor, bank_parts: list[torch.Tensor], k: int) -> torch.Tensor:
    """Float64 top-k inner products of ``q`` [B, F] with the bank (a list of row chunks), merged per chunk."""
    top = None
    for b in bank_parts:
        sims = q @ b.T
        if top is not None:
            sims = torch.cat([top, sims], dim=1)
        top = sims.topk(min(k, sims.shape[1]), dim=1, sorted=True).values
    return top


def topk_inner(queries: np.ndarray, bank: np.ndarray, k: int, batch_size: int = 1024, bank_chunk: int = 16384,
               device: str = "cpu") -> np.ndarray:
    """The k largest inner products of each query row with the bank rows, descending: [N, F] x [M, F] -> [N, k].

    Exact (float64 values). Computed ``batch_size`` queries x ``bank_chunk`` bank rows at a time in two steps:

    1. candidates: the ``k + max(k // 4, 16)`` largest float32 inner products (float32 GEMM, about twice as fast
       as float64 on CPU), merged over bank chunks;
    2. the candidates' inner products recomputed in float64; their k largest are the answer when the k-th
       is at least ``t + c ||q|| max_j ||b_j||``, t the smallest float32 candidate value and c the rigorous
       float32 error bound (:func:`_float32_error_bound`): then no other bank row can reach the top k.
       Queries where that certificate fails (near-ties at the boundary) are searched again in float64.
    """
    if bank.shape[0] < k:
        raise ValueError(f"top-k search needs k <= bank size, got k={k} and {bank.shape[0]} bank rows")
    dev = torch.device(device)
    q_all = torch.from_numpy(np.ascontiguousarray(f64(queries)))
    b_all = torch.from_numpy(np.ascontiguousarray(f64(bank)))
    m, f = b_all.shape
    n_cand = min(m, k + max(k // 4, 16))
    out = np.empty((q_all.shape[0], k), dtype=np.float64)
    slices = list(chunks(m, bank_chunk))
    bank64 = b_all.to(dev)
    parts64 = [bank64[s] for s in slices]
    if n_cand >= m:  # the whole bank is the candidate set: plain float64 search
        with torch.no_grad():
            for qs in chunks(q_all.shape[0], batch_size):
                out[qs] = _exact_topk(q_all[qs].to(dev), parts64, k).cpu().numpy()
        return out
    parts32 = [p.float() for p in parts64]
    slack = _float32_error_bound(f) * float(torch.linalg.vector_norm(bank64, dim=1).max())
    gather_rows = max(1, (1 << 23) // (n_cand * f))  # queries per float64 rescoring block (~64 MiB gathered)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 / bf16 GEMM: the error bound assumes float32
    try:
        with torch.no_grad():
            for qs in chunks(q_all.shape[0], batch_size):
                q = q_all[qs].to(dev)
                q32 = q.float()
                vals = idx = None
                for s, b in zip(slices, parts32):
                    sims = q32 @ b.T
                    top = sims.topk(min(n_cand, sims.shape[1]), dim=1, sorted=False)
                    v, i = top.values, top.indices + s.start
                    if vals is not None:
                        v, i = torch.cat([vals, v], dim=1), torch.cat([idx, i], dim=1)
                        sel = v.topk(min(n_cand, v.shape[1]), dim=1, sorted=False).indices
                        v, i = v.gather(1, sel), i.gather(1, sel)
                    vals, idx = v, i
                exact = torch.empty((q.shape[0], k), dtype=torch.float64, device=dev)
                for r in chunks(q.shape[0], gather_rows):
                    cand = torch.einsum("bf,bcf->bc", q[r], bank64[idx[r]])
                    exact[r] = cand.topk(k, dim=1, sorted=True).values
                bound = vals.min(dim=1).values.double() + slack * torch.linalg.vector_norm(q, dim=1)
                redo = torch.nonzero(exact[:, k - 1] < bound).flatten()
                if redo.numel():
                    exact[redo] = _exact_topk(q[redo], parts64, k)
                out[qs] = exact.cpu().numpy()
    finally:
        torch.set_float32_matmul_precision(previous)
    return out


def _bank_rows(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ceil(fraction * n) fit rows (all rows when fraction = 1)."""
    if fraction >= 1.0:
        return np.arange(n)
    size = max(1, math.ceil(fraction * n))
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


class _BankSearch(Postprocessor):
    """Common constructor/state of the bank-based detectors."""

    def __init__(self, k: int, bank_fraction: float, seed: int, batch_size: int, bank_chunk: int,
                 device: str) -> None:
        self.k = check_positive_int(k, self.name, "k")
        if isinstance(bank_fraction, bool) or not isinstance(bank_fraction, numbers.Real) \
                or not 0 < bank_fraction <= 1:
            raise ValueError(f"{self.name}: bank_fraction must be in (0, 1], got {bank_fraction!r}")
        self.bank_fraction = float(bank_fraction)
        self.seed = int(seed)
        self.batch_size = check_positive_int(batch_size, self.name, "batch_size")
        self.bank_chunk = check_positive_int(bank_chunk, self.name, "bank_chunk")
        torch.device(device)  # validates the device string
        self.device = str(device)

    def _select(self, n: int) -> np.ndarray:
        rows = _bank_rows(n, self.bank_fraction, self.seed)
        if rows.size < self.k:
            raise ValueError(
                f"{self.name}: the bank has {rows.size} fit samples (bank_fraction={self.bank_fraction}) but "
                f"k={self.k}; lower k or fit on more ID samples"
            )
        return rows

    def _topk(self, queries: np.ndarray) -> np.ndarray:
        return topk_inner(queries, self.bank_, self.k, self.batch_size, self.bank_chunk, self.device)

    def _fitted_state(self) -> dict[str, np.ndarray]:
        return {"bank": self.bank_}

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        if "bank" not in state:
            raise ValueError(f"{type(self).__name__} state needs 'bank', got {sorted(state)}")
        self.bank_ = np.array(state["bank"], dtype=np.float64)


class KNN(_BankSearch):
    """Deep nearest neighbours (Sun et al., ICML 2022):

    ``score(x) = -|| z - z_(k) ||_2``,  z = x / ||x||,

    z_(k) the k-th nearest L2-normalised fit feature. Distances come from inner products of unit vectors,
    ``||a - b||^2 = 2 - 2 <a, b>``.

    Args:
        k: neighbour rank; 50 is the paper's CIFAR-10 value (1000 on ImageNet with the full train set).
        bank_fraction: fraction of the fit split kept in the bank (seeded random subset; the paper's
            alpha, 1 = all). seed: seed of that subset.
        batch_size / bank_chunk: query rows / bank rows per similarity block (memory bound).
        device: torch device of the search ("cpu", "cuda", ...).

    Fitted: ``bank_`` [M, F] (normalised fit features).
    """

    requires = ("penultimate",)
    name = "knn"

    def __init__(self, k: int = 50, bank_fraction: float = 1.0, seed: int = 0, batch_size: int = 1024,
                 bank_chunk: int = 16384, device: str = "cpu") -> None:
        super().__init__(k, bank_fraction, seed, batch_size, bank_chunk, device)

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        x = arrays["penultimate"]
        self.bank_ = l2_normalize(x[self._select(x.shape[0])])

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        s_k = self._topk(l2_normalize(arrays["penultimate"]))[:, self.k - 1]
        return -np.sqrt(np.maximum(2.0 - 2.0 * s_k, 0.0))


class NNGuide(_BankSearch):
    """Nearest Neighbor Guidance (Park et al., ICCV 2023):

    ``score(x) = E(x) * mean_{top-k} < x/||x||, E(z) z/||z|| >``,  E = logsumexp(logits),

    the mean over the k bank entries z (fit features scaled by their energy) with the largest inner
    product, as in the reference code (faiss inner-product search).

    Args:
        k: number of neighbours (100, the paper's / OpenOOD value).
        bank_fraction: fraction of the fit split in the bank (the paper uses 0.01 on ImageNet; default 1).
        seed, batch_size, bank_chunk, device: as for :class:`KNN`.

    Fitted: ``bank_`` [M, F] (energy-scaled normalised fit features).
    """

    requires = ("penultimate", "logits")
    name = "nnguide"

    def __init__(self, k: int = 100, bank_fraction: float = 1.0, seed: int = 0, batch_size: int = 1024,
                 bank_chunk: int = 16384, device: str = "cpu") -> None:
        super().__init__(k, bank_fraction, seed, batch_size, bank_chunk, device)

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        rows = self._select(arrays["penultimate"].shape[0])
        x, logits = arrays["penultimate"][rows], f64(arrays["logits"][rows])
        self.bank_ = l2_normalize(x) * energy(logits)[:, None]

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        guidance = self._topk(l2_normalize(arrays["penultimate"])).mean(axis=1)
        return energy(f64(arrays["logits"])) * guidance
