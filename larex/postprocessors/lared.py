"""LaRED: Gaussian kernel density of the LaREx entropy features, fitted on ID data.

score(x) = log p(x),  log p(x) = logsumexp_i(-||x - x_i||^2 / (2 h^2)) - log n - (d/2) log(2 pi h^2),

the log-density of an isotropic Gaussian KDE over the n (z-scored, PCA-reduced) ID fit points x_i in
d dims -- the same value as ``sklearn.neighbors.KernelDensity(kernel="gaussian", bandwidth=h)
.score_samples``. Computed exactly in torch float64, in blocks of ``chunk_size`` queries x
``chunk_size`` fit points, so memory stays O(chunk_size^2) whatever n.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from larex.postprocessors._features import check_feature_set, stacked
from larex.postprocessors.base import Postprocessor
from larex.postprocessors.pca import PCAReducer

DEFAULT_BANDWIDTH_GRID: tuple[float, ...] = tuple(float(v) for v in np.geomspace(0.25, 4.0, 9))
"""Default multipliers of Scott's bandwidth tried by ``bandwidth="auto"`` (0.25 ... 4, x sqrt(2) steps)."""


class LaRED(Postprocessor):
    """Kernel density estimate of LaREx entropy features (higher log-density = more in-distribution).

    Args:
        pca: PCA size after z-scoring: None (keep all dims), int, variance fraction in (0, 1), or
            "auto" (PPCA likelihood on the ID val split; see :class:`PCAReducer`).
        bandwidth: float h > 0; "scott" = s * n^(-1/(d+4)) with s the root mean per-dimension variance
            of the (preprocessed) fit points, i.e. n^(-1/(d+4)) on standardized data; "auto" = the value
            among Scott x ``bandwidth_grid`` maximising the mean log-density of the ID val split.
        bandwidth_grid: multipliers of Scott's rule tried by "auto" (default :data:`DEFAULT_BANDWIDTH_GRID`).
        device: torch device for the KDE sums ("cpu", "cuda", ...).
        chunk_size: block size (queries and fit points) of the pairwise-distance computation.
        standardize: z-score each entropy dimension with fit-split mean/std before PCA/KDE. The entropy
            of different channels lives on different scales (it shifts by log of the activation scale),
            and an isotropic kernel would otherwise be dominated by the widest dimensions.
        features: the feature keys modelled, concatenated per row: ``entropy`` (LaREx), ``latent_mean`` (MC
            mean of the latent), or both.
        pca_candidates: sizes tried by ``pca="auto"`` (default grid of :class:`PCAReducer`).
        whiten: divide the PCA components by their standard deviation (the LaREx reference recipe; no effect
            without PCA).

    Fitted: ``reducer_``, ``bandwidth_``, ``bandwidth_selection_`` ({h: mean val log-density}, "auto" only).
    """

    requires = ("entropy",)
    name = "lared"

    def __init__(
        self,
        pca: int | float | str | None = None,
        bandwidth: float | str = "auto",
        bandwidth_grid: Sequence[float] | None = None,
        device: str = "cpu",
        chunk_size: int = 4096,
        standardize: bool = True,
        pca_candidates: Sequence[int] | None = None,
        features: Sequence[str] = ("entropy",),
        whiten: bool = False,
    ) -> None:
        self.features = check_feature_set(features, "LaRED")
        self.requires = self.features
        if isinstance(bandwidth, str):
            if bandwidth not in ("auto", "scott"):
                raise ValueError(f"bandwidth must be a float > 0, 'scott' or 'auto', got {bandwidth!r}")
        elif isinstance(bandwidth, bool) or not isinstance(bandwidth, numbers.Real) or not (
            math.isfinite(bandwidth) and bandwidth > 0
        ):
            raise ValueError(f"bandwidth must be a float > 0, 'scott' or 'auto', got {bandwidth!r}")
        else:
            bandwidth = float(bandwidth)
        if bandwidth_grid is not None:
            bandwidth_grid = [float(m) for m in bandwidth_grid]
            if not bandwidth_grid or not all(math.isfinite(m) and m > 0 for m in bandwidth_grid):
                raise ValueError(f"bandwidth_grid must be non-empty positive multipliers, got {bandwidth_grid}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.pca = pca
        self.bandwidth = bandwidth
        self.bandwidth_grid = bandwidth_grid
        self.device = str(device)
        self.chunk_size = int(chunk_size)
        self.standardize = bool(standardize)
        self.pca_candidates = None if pca_candidates is None else [int(k) for k in pca_candidates]
        self.whiten = bool(whiten)
        self._new_reducer()  # validates pca / pca_candidates early

    def _new_reducer(self) -> PCAReducer:
        return PCAReducer(n_components=self.pca, candidates=self.pca_candidates, standardize=self.standardize,
                          whiten=self.whiten)

    # ------------------------------------------------------------------ fit / score
    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        needs_val = [p for p, v in (("pca", self.pca), ("bandwidth", self.bandwidth)) if v == "auto"]
        if needs_val and val is None:
            raise ValueError(
                f"LaRED({', '.join(f'{p}=auto' for p in needs_val)}) chooses hyperparameters on the ID "
                "validation split: call fit(fit_feats, val=val_feats), or set fixed values "
                "(pca: int/null, bandwidth: float/'scott')"
            )
        x, x_val = stacked(arrays, self.features), None if val is None else stacked(val, self.features)
        self.reducer_ = self._new_reducer().fit(x, val=x_val if self.pca == "auto" else None)
        points = self.reducer_.transform(x)
        self._set_points(points)
        self.bandwidth_selection_: dict[float, float] = {}
        if isinstance(self.bandwidth, float):
            self.bandwidth_ = self.bandwidth
            return
        scott = scott_bandwidth(points)
        if self.bandwidth == "scott":
            self.bandwidth_ = scott
            return
        grid = [scott * m for m in (self.bandwidth_grid or DEFAULT_BANDWIDTH_GRID)]
        ll = self._log_density(self.reducer_.transform(x_val), grid).mean(axis=0)
        self.bandwidth_selection_ = {float(h): float(v) for h, v in zip(grid, ll)}
        self.bandwidth_ = float(grid[int(np.argmax(ll))])

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return self._log_density(self.reducer_.transform(stacked(arrays, self.features)), [self.bandwidth_])[:, 0]

    # ------------------------------------------------------------------ KDE core
    def _set_points(self, points: np.ndarray) -> None:
        dev = torch.device(self.device)
        self.points_ = np.ascontiguousarray(points, dtype=np.float64)
        # centre on the fit mean (translation-invariant) to limit cancellation in |x|^2 + |y|^2 - 2xy
        self._center = torch.as_tensor(self.points_.mean(axis=0), device=dev)
        self._points_t = torch.as_tensor(self.points_, device=dev) - self._center
        self._points_sq = (self._points_t * self._points_t).sum(dim=1)

    def _log_density(self, queries: np.ndarray, bandwidths: Sequence[float]) -> np.ndarray:
        """Gaussian-KDE log-density of ``queries`` [M, d] for each bandwidth: array [M, len(bandwidths)]."""
        pts, pts_sq, c = self._points_t, self._points_sq, self.chunk_size
        n, d = pts.shape
        h = torch.as_tensor(np.asarray(bandwidths, dtype=np.float64), device=pts.device)
        neg_inv_two_h2 = -0.5 / h**2
        q_all = torch.as_tensor(np.asarray(queries, dtype=np.float64), device=pts.device) - self._center
        out = torch.empty((q_all.shape[0], h.shape[0]), dtype=torch.float64, device=pts.device)
        buf = None
        for qs in range(0, q_all.shape[0], c):
            q = q_all[qs : qs + c]
            q_sq = (q * q).sum(dim=1)
            acc = torch.full((q.shape[0], h.shape[0]), -math.inf, dtype=torch.float64, device=pts.device)
            for ps in range(0, n, c):
                p = pts[ps : ps + c]
                # ||q||^2 + ||p||^2 - 2 q.p with one fused matmul and in-place passes (no extra c x c buffers)
                d2 = torch.addmm(pts_sq[None, ps : ps + c], q, p.T, alpha=-2.0).add_(q_sq[:, None]).clamp_min_(0.0)
                # logsumexp_i(-d2_i / 2h^2) = -dmin / 2h^2 + log sum_i exp(-(d2_i - dmin) / 2h^2): the shift is the
                # row minimum of d2, shared by every bandwidth, so each bandwidth costs one mul, exp and sum pass
                dmin = d2.amin(dim=1)
                d2.sub_(dmin[:, None])
                for j in range(h.shape[0]):  # loop over candidate bandwidths only
                    if h.shape[0] == 1:
                        e = d2.mul_(neg_inv_two_h2[j])
                    else:
                        if buf is None or buf.shape != d2.shape:
                            buf = torch.empty_like(d2)
                        e = torch.mul(d2, neg_inv_two_h2[j], out=buf)
                    lse = torch.log(e.exp_().sum(dim=1)).add_(dmin * neg_inv_two_h2[j])
                    acc[:, j] = torch.logaddexp(acc[:, j], lse)
            out[qs : qs + c] = acc
        out = out - math.log(n) - 0.5 * d * torch.log(2.0 * math.pi * h**2)
        return out.cpu().numpy()

    # ------------------------------------------------------------------ state
    def _fitted_state(self) -> dict[str, np.ndarray]:
        state = {f"reducer.{k}": v for k, v in self.reducer_.fitted_state().items()}
        state["points"] = self.points_
        state["bandwidth"] = np.asarray([self.bandwidth_], dtype=np.float64)
        return state

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        if "points" not in state or "bandwidth" not in state:
            raise ValueError(f"LaRED state needs 'points' and 'bandwidth', got {sorted(state)}")
        red = {k[len("reducer."):]: v for k, v in state.items() if k.startswith("reducer.")}
        self.reducer_ = self._new_reducer().set_fitted_state(red)
        self._set_points(np.asarray(state["points"], dtype=np.float64))
        self.bandwidth_ = float(np.asarray(state["bandwidth"]).reshape(-1)[0])
        self.bandwidth_selection_ = {}


def scott_bandwidth(points: np.ndarray) -> float:
    """Scott's rule s * n^(-1/(d+4)), s = sqrt(mean per-dimension variance, ddof=0) of ``points`` [n, d]."""
    n, d = points.shape
    s = float(np.sqrt(np.mean(np.var(points, axis=0))))
    if not s > 0:
        raise ValueError("LaRED: fit features have zero variance; Scott's bandwidth is undefined, set bandwidth")
    return s * n ** (-1.0 / (d + 4))
