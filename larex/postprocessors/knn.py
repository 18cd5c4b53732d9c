"""Nearest-neighbour baselines on penultimate features: deep kNN (``knn``) and NNGuide (``nnguide``).

Both search a bank built from the ID ``fit`` split with an exact, chunked inner-product top-k in torch
float64: peak memory is ``batch_size x bank_chunk`` similarities, never the full [N, M] matrix.
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


def topk_inner(queries: np.ndarray, bank: np.ndarray, k: int, batch_size: int = 1024, bank_chunk: int = 16384,
               device: str = "cpu") -> np.ndarray:
    """The k largest inner products of each query row with the bank rows, descending: [N, F] x [M, F] -> [N, k].

    Exact; computed ``batch_size`` queries x ``bank_chunk`` bank rows at a time, merging per-chunk top-k.
    """
    if bank.shape[0] < k:
        raise ValueError(f"top-k search needs k <= bank size, got k={k} and {bank.shape[0]} bank rows")
    dev = torch.device(device)
    q_all = torch.from_numpy(np.ascontiguousarray(f64(queries)))
    b_all = torch.from_numpy(np.ascontiguousarray(f64(bank)))
    bank_parts = [b_all[s].to(dev) for s in chunks(b_all.shape[0], bank_chunk)]
    out = np.empty((q_all.shape[0], k), dtype=np.float64)
    with torch.no_grad():
        for qs in chunks(q_all.shape[0], batch_size):
            q = q_all[qs].to(dev)
            top = None
            for b in bank_parts:
                sims = q @ b.T
                if top is not None:
                    sims = torch.cat([top, sims], dim=1)
                top = sims.topk(min(k, sims.shape[1]), dim=1, sorted=True).values
            out[qs] = top.cpu().numpy()
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
