"""Optional z-scoring + PCA reduction fitted on ID features (a reusable step, not a detector).

The size can be fixed, an explained-variance fraction, or chosen on the ID validation split by the
average log-likelihood of the probabilistic PCA model (Tipping & Bishop, 1999). The PPCA likelihood of
every candidate size is computed in closed form from one SVD of the fit split (no refit per candidate):
with eigenvalues l_1 >= ... >= l_D of the fit covariance (ddof=1, zero-padded to D) and z = U^T (x - mu),

    sigma2_k = sum_{j>k} l_j / (D - k)
    log p_k(x) = -1/2 [ D log(2 pi) + sum_{j<=k} log l_j + (D - k) log sigma2_k
                        + sum_{j<=k} z_j^2 / l_j + (||x - mu||^2 - sum_{j<=k} z_j^2) / sigma2_k ]

which equals ``sklearn.decomposition.PCA(k).fit(fit).score(val)`` when n_fit > D.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Self

import numpy as np

_STD_RTOL = 1e-12  # a feature whose std is below this times its magnitude counts as constant


class PCAReducer:
    """Z-score (optional) and PCA-reduce [N, D] arrays with statistics of the ID fit split.

    Args:
        n_components: ``None`` = no reduction (identity, after optional z-scoring); int = that many
            components; float in (0, 1) = smallest size explaining that fraction of variance;
            ``"auto"`` = the candidate maximising the mean PPCA log-likelihood of the ID val split.
        candidates: sizes tried by ``"auto"`` (default: every size up to 10, then a geometric grid
            up to ``min(n_fit - 1, D)``).
        whiten: divide components by their standard deviation.
        standardize: z-score each feature with fit-split mean/std first (constant features keep scale 1).

    Fitted attributes: ``n_features_in_``, ``n_components_``, ``selection_`` ({size: mean val
    log-likelihood}, only for ``"auto"``), ``shift_``/``scale_`` (z-scoring), ``mean_``,
    ``components_`` [k, D], ``explained_variance_`` [k], ``explained_variance_ratio_`` [k].
    """

    def __init__(
        self,
        n_components: int | float | str | None = None,
        candidates: Sequence[int] | None = None,
        whiten: bool = False,
        standardize: bool = False,
    ) -> None:
        self.n_components = _check_n_components(n_components)
        self.candidates = None if candidates is None else _check_candidates(candidates)
        self.whiten = bool(whiten)
        self.standardize = bool(standardize)
        self.selection_: dict[int, float] = {}

    # ------------------------------------------------------------------ fit / transform
    def fit(self, X: np.ndarray, val: np.ndarray | None = None) -> Self:
        """Fit on the ID fit array [N, D]; ``val`` [M, D] (ID validation) is used only by ``"auto"``."""
        X = _as_2d(X, "fit")
        n, d = X.shape
        self._reset()
        self.n_features_in_ = d
        if self.standardize or self.n_components is not None:
            if n < 2:
                raise ValueError(f"PCAReducer needs at least 2 fit samples to estimate statistics, got {n}")
        if self.standardize:
            shift = X.mean(axis=0)
            std = X.std(axis=0)
            constant = std <= _STD_RTOL * np.maximum(np.abs(shift), 1.0)
            self.shift_ = shift
            self.scale_ = np.where(constant, 1.0, std)
            X = (X - self.shift_) / self.scale_
        if self.n_components is None:
            self.n_components_ = d
            return self

        mean = X.mean(axis=0)
        _, s, vt = np.linalg.svd(X - mean, full_matrices=False)
        # deterministic signs: the largest-magnitude loading of each component is positive
        signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
        signs[signs == 0] = 1.0
        vt = vt * signs[:, None]
        eigvals = s**2 / (n - 1)
        total = float(eigvals.sum())
        max_k = min(n, d)

        if self.n_components == "auto":
            if val is None:
                raise ValueError(
                    "PCAReducer(n_components='auto') chooses the size on the ID validation split: pass "
                    "val=..., or set n_components to an int, a variance fraction or None"
                )
            val = _as_2d(val, "val")
            if val.shape[1] != d:
                raise ValueError(f"mismatched shapes: val has {val.shape[1]} features, fit has {d}")
            if self.standardize:
                val = (val - self.shift_) / self.scale_
            max_auto = min(n - 1, d)
            ks = np.asarray(self.candidates if self.candidates is not None else default_candidates(max_auto))
            if ks.max() > max_auto:
                raise ValueError(
                    f"PCA candidates {sorted(ks.tolist())} exceed min(n_fit - 1, D) = {max_auto}; "
                    "remove the larger sizes"
                )
            ll = ppca_loglik(val, mean, vt, eigvals, d, ks)
            self.selection_ = {int(k): float(v) for k, v in zip(ks, ll)}
            if not np.isfinite(ll).any():
                raise ValueError(
                    f"PPCA likelihood is degenerate for every candidate {sorted(ks.tolist())} (zero noise "
                    "variance: fit features are (near) constant or rank-deficient); set pca to an int"
                )
            best = max(self.selection_.items(), key=lambda kv: (kv[1], -kv[0]))  # ties: smaller k
            k = best[0]
        elif isinstance(self.n_components, float):
            if total <= 0:
                raise ValueError("fit features have zero variance: a variance fraction is undefined")
            cum = np.cumsum(eigvals) / total
            k = int(min(np.searchsorted(cum, self.n_components, side="right") + 1, max_k))
        else:
            k = int(self.n_components)
            if k > max_k:
                raise ValueError(
                    f"n_components={k} exceeds min(n_fit, D) = {max_k}; choose a smaller size"
                )
        self.mean_ = mean
        self.components_ = np.ascontiguousarray(vt[:k])
        self.explained_variance_ = eigvals[:k].copy()
        self.explained_variance_ratio_ = eigvals[:k] / total if total > 0 else np.zeros(k)
        self.n_components_ = k
        if self.whiten and np.any(self.explained_variance_ <= 0):
            raise ValueError(f"cannot whiten: some of the {k} kept components have zero variance; use fewer")
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Apply the fitted z-scoring and projection; returns a new float64 array [N, n_components_]."""
        if not hasattr(self, "n_features_in_"):
            raise RuntimeError("PCAReducer is not fitted: call .fit(X) before .transform()")
        X = _as_2d(X, "input")
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"mismatched shapes: input has {X.shape[1]} features, the reducer was fitted on "
                f"{self.n_features_in_}"
            )
        if self.standardize:
            X = (X - self.shift_) / self.scale_
        if self.components_ is None:
            return np.array(X, dtype=np.float64, copy=True)
        Z = (X - self.mean_) @ self.components_.T
        if self.whiten:
            Z /= np.sqrt(self.explained_variance_)
        return Z

    def fit_transform(self, X: np.ndarray, val: np.ndarray | None = None) -> np.ndarray:
        return self.fit(X, val).transform(X)

    # ------------------------------------------------------------------ state
    def fitted_state(self) -> dict[str, np.ndarray]:
        """Arrays needed by :meth:`transform`."""
        if not hasattr(self, "n_features_in_"):
            raise RuntimeError("PCAReducer is not fitted: nothing to export")
        state = {"n_features_in": np.asarray([self.n_features_in_], dtype=np.int64)}
        if self.standardize:
            state.update(shift=self.shift_, scale=self.scale_)
        if self.components_ is not None:
            state.update(mean=self.mean_, components=self.components_, explained_variance=self.explained_variance_)
        return {k: np.ascontiguousarray(v) for k, v in state.items()}

    def set_fitted_state(self, state: Mapping[str, np.ndarray]) -> Self:
        """Restore arrays from :meth:`fitted_state` (the instance must have the same parameters)."""
        need = {"n_features_in"}
        if self.standardize:
            need |= {"shift", "scale"}
        if self.n_components is not None:
            need |= {"mean", "components", "explained_variance"}
        if set(state) != need:
            raise ValueError(f"PCAReducer state has keys {sorted(state)}, expected {sorted(need)} for {self!r}")
        self._reset()
        self.n_features_in_ = int(np.asarray(state["n_features_in"]).reshape(-1)[0])
        if self.standardize:
            self.shift_ = np.asarray(state["shift"], dtype=np.float64)
            self.scale_ = np.asarray(state["scale"], dtype=np.float64)
        if self.n_components is not None:
            self.mean_ = np.asarray(state["mean"], dtype=np.float64)
            self.components_ = np.asarray(state["components"], dtype=np.float64)
            self.explained_variance_ = np.asarray(state["explained_variance"], dtype=np.float64)
            self.n_components_ = self.components_.shape[0]
        else:
            self.n_components_ = self.n_features_in_
        return self

    def _reset(self) -> None:
        self.selection_ = {}
        self.shift_ = self.scale_ = self.mean_ = self.components_ = None
        self.explained_variance_ = self.explained_variance_ratio_ = None

    def __repr__(self) -> str:
        return (
            f"PCAReducer(n_components={self.n_components!r}, candidates={self.candidates!r}, "
            f"whiten={self.whiten!r}, standardize={self.standardize!r})"
        )


def default_candidates(max_k: int) -> list[int]:
    """Every size 1..min(10, max_k), then a 16-point geometric grid from 10 to ``max_k``."""
    if max_k < 1:
        raise ValueError("PCA 'auto' needs at least 2 fit samples and 1 feature")
    ks = set(range(1, min(10, max_k) + 1))
    if max_k > 10:
        ks |= {int(round(v)) for v in np.geomspace(10, max_k, 16)}
    return sorted(ks)


def ppca_loglik(
    val: np.ndarray, mean: np.ndarray, vt: np.ndarray, eigvals: np.ndarray, d: int, ks: np.ndarray
) -> np.ndarray:
    """Mean PPCA log-likelihood of ``val`` for each size in ``ks`` (see module docstring).

    ``vt`` [r, D] and ``eigvals`` [r] are the fit split's principal axes and covariance eigenvalues
    (r = min(N, D)); eigenvalues beyond r are zero. Degenerate sizes (zero eigenvalue or zero noise
    variance) get ``-inf``.
    """
    ks = np.asarray(ks, dtype=np.int64)
    kmax = int(ks.max())
    lam = np.zeros(d)
    lam[: eigvals.shape[0]] = eigvals
    xc = val - mean
    z2 = (xc @ vt[:kmax].T) ** 2  # [M, kmax]
    sq = np.einsum("ij,ij->i", xc, xc)
    with np.errstate(divide="ignore", invalid="ignore"):
        cum_z2 = np.cumsum(z2, axis=1)
        cum_quad = np.cumsum(z2 / lam[:kmax], axis=1)
        cum_loglam = np.cumsum(np.log(lam[:kmax]))
        tail = np.cumsum(lam[::-1])[::-1]  # tail[j] = sum_{i >= j} lam_i
        out = np.full(ks.shape, -np.inf)
        for i, k in enumerate(ks):  # loop over candidate sizes only
            if lam[k - 1] <= 0:
                continue
            ll = d * np.log(2 * np.pi) + cum_loglam[k - 1] + cum_quad[:, k - 1]
            if k < d:
                sigma2 = tail[k] / (d - k)
                if not sigma2 > 0:
                    continue
                resid = np.maximum(sq - cum_z2[:, k - 1], 0.0)
                ll = ll + (d - k) * np.log(sigma2) + resid / sigma2
            out[i] = -0.5 * float(np.mean(ll))
    return out


def _as_2d(X: np.ndarray, split: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"PCAReducer expects a non-empty [N, D] array for {split}, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"PCAReducer: {split} array contains {int((~np.isfinite(X)).sum())} NaN/Inf values")
    return X


def _check_n_components(n: int | float | str | None) -> int | float | str | None:
    if n is None or n == "auto":
        return n
    if isinstance(n, bool):
        raise ValueError(f"pca/n_components must be None, 'auto', an int >= 1 or a float in (0, 1), got {n!r}")
    if isinstance(n, numbers.Integral):
        if n < 1:
            raise ValueError(f"pca/n_components must be >= 1, got {n}")
        return int(n)
    if isinstance(n, numbers.Real):
        if not 0.0 < float(n) < 1.0:
            raise ValueError(
                f"pca/n_components as a float is a variance fraction in (0, 1), got {n}; use an int for a size"
            )
        return float(n)
    raise ValueError(f"pca/n_components must be None, 'auto', an int >= 1 or a float in (0, 1), got {n!r}")


def _check_candidates(candidates: Sequence[int]) -> list[int]:
    ks = []
    for k in candidates:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"PCA candidates must be ints >= 1, got {list(candidates)!r}")
        ks.append(int(k))
    if not ks:
        raise ValueError("PCA candidates must not be empty")
    return sorted(set(ks))
