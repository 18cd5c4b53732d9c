"""Class-conditional Gaussian baselines on penultimate features: Mahalanobis (``mdist``), Relative
Mahalanobis (``rmd``) and DDU's Gaussian discriminant analysis (``ddu``).

All statistics come from the ID ``fit`` split and its labels (``fit_requires``); scores read only
``penultimate`` (``requires``), so OOD splits need no labels.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from scipy.linalg import pinvh
from scipy.special import logsumexp

from larex.postprocessors._features import chunks, class_means, f64, fit_labels
from larex.postprocessors.base import Postprocessor

_ROWS = 8192  # samples scored per chunk: bounds the [rows, classes] distance block


def _sym(a: np.ndarray) -> np.ndarray:
    return 0.5 * (a + a.T)


def sq_mahalanobis(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances ``(x_i - mu_k)^T P (x_i - mu_k)``, [N, F] x [K, F] -> [N, K]."""
    mp = means @ precision
    m_sq = np.einsum("kf,kf->k", mp, means)
    out = np.empty((x.shape[0], means.shape[0]), dtype=np.float64)
    for s in chunks(x.shape[0], _ROWS):
        xs = x[s]
        xp = xs @ precision
        d = np.einsum("nf,nf->n", xp, xs)[:, None] - 2.0 * (xp @ means.T) + m_sq[None, :]
        out[s] = np.maximum(d, 0.0)
    return out


def _fit_class_gaussian(x: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class means [K, F] of the K classes present, their labels [K], and the tied (pooled, 1/N) covariance."""
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 fit samples to estimate a covariance, got {x.shape[0]}")
    classes, inv = np.unique(labels, return_inverse=True)
    means, _ = class_means(x, inv, len(classes))
    centered = x - means[inv]
    cov = centered.T @ centered / x.shape[0]
    return means, classes, cov


class Mahalanobis(Postprocessor):
    """Mahalanobis distance to the closest class mean with a tied covariance (Lee et al., NeurIPS 2018),
    without input preprocessing or feature ensembles:

    ``score(x) = -min_k (x - mu_k)^T Sigma^+ (x - mu_k)``,

    mu_k the fit-split class means, Sigma the pooled within-class covariance (1/N normalisation, as
    sklearn ``EmpiricalCovariance`` in the reference code) and ``+`` the pseudo-inverse (dead / constant
    units do not make it singular).

    Fitted: ``means_`` [K, F], ``classes_`` [K], ``precision_`` [F, F].
    """

    requires = ("penultimate",)
    fit_requires = ("penultimate", "labels")
    name = "mdist"

    def __init__(self) -> None:
        pass

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        x = f64(arrays["penultimate"])
        means, classes, cov = _fit_class_gaussian(x, fit_labels(arrays["labels"], self.name), self.name)
        self.means_, self.classes_ = means, classes
        self.precision_ = _sym(pinvh(cov))

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return -sq_mahalanobis(f64(arrays["penultimate"]), self.means_, self.precision_).min(axis=1)

    def _fitted_state(self) -> dict[str, np.ndarray]:
        return {"means": self.means_, "classes": self.classes_, "precision": self.precision_}

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        _require(state, ("means", "classes", "precision"), type(self).__name__)
        self.means_, self.precision_ = f64(state["means"]), f64(state["precision"])
        self.classes_ = np.asarray(state["classes"], dtype=np.int64)


class RelativeMahalanobis(Mahalanobis):
    """Relative Mahalanobis distance (Ren et al., 2021, "A Simple Fix to Mahalanobis Distance"):

    ``score(x) = -min_k [MD_k(x) - MD_0(x)]``,

    MD_k the squared Mahalanobis distance of :class:`Mahalanobis` and MD_0 the one to a single
    "background" Gaussian fitted to all fit samples (mean and 1/N covariance, pseudo-inverted).

    Fitted: as :class:`Mahalanobis` plus ``background_mean_`` [F], ``background_precision_`` [F, F].
    """

    name = "rmd"

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        super()._fit(arrays, val)
        x = f64(arrays["penultimate"])
        self.background_mean_ = x.mean(axis=0)
        centered = x - self.background_mean_
        self.background_precision_ = _sym(pinvh(centered.T @ centered / x.shape[0]))

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        x = f64(arrays["penultimate"])
        md_k = sq_mahalanobis(x, self.means_, self.precision_)
        md_0 = sq_mahalanobis(x, self.background_mean_[None, :], self.background_precision_)[:, 0]
        return md_0 - md_k.min(axis=1)

    def _fitted_state(self) -> dict[str, np.ndarray]:
        state = super()._fitted_state()
        state.update(background_mean=self.background_mean_, background_precision=self.background_precision_)
        return state

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        _require(state, ("background_mean", "background_precision"), type(self).__name__)
        super()._set_fitted_state({k: v for k, v in state.items() if not k.startswith("background_")})
        self.background_mean_ = f64(state["background_mean"])
        self.background_precision_ = f64(state["background_precision"])


class DDU(Postprocessor):
    """Feature density of Deep Deterministic Uncertainty (Mukhoti et al., CVPR 2023): Gaussian
    discriminant analysis with one full covariance per class,

    ``score(x) = log q(x) = logsumexp_k [log N(x; mu_k, Sigma_k + j I) + log pi_k]``,

    Sigma_k the unbiased (1/(N_k - 1)) class covariance as in the reference code, j the jitter and
    pi_k the class prior. Post-hoc here: the features need not come from DDU's spectrally normalised net.

    Args:
        jitter: diagonal jitter. None (default) = the reference code's ladder: the smallest of
            0, 1e-15, 1e-14, ..., 1 (times the mean per-dimension class variance, so the choice does not
            depend on the feature scale) for which every Sigma_k + j I has a Cholesky factor.
            A float: that jitter, absolute.
        class_prior: "empirical" (pi_k = N_k / N, the paper's q(z) = sum_y q(z|y) q(y)) or "uniform"
            (pi_k = 1/K: the reference code's plain logsumexp of the class log-densities, up to a constant).

    Fitted: ``means_`` [K, F], ``classes_`` [K], ``chol_inv_`` [K, F, F] (inverse Cholesky factors),
    ``log_norm_`` [K] (log pi_k - log det(Sigma_k + j I) / 2 - F log(2 pi) / 2), ``jitter_``.
    Memory: K F^2 float64 values (e.g. 100 classes x 512 features = 210 MB).
    """

    requires = ("penultimate",)
    fit_requires = ("penultimate", "labels")
    name = "ddu"

    def __init__(self, jitter: float | None = None, class_prior: str = "empirical") -> None:
        if jitter is not None and (isinstance(jitter, bool) or not isinstance(jitter, numbers.Real) or not jitter >= 0):
            raise ValueError(f"ddu: jitter must be null (automatic ladder) or a float >= 0, got {jitter!r}")
        if class_prior not in ("empirical", "uniform"):
            raise ValueError(f"ddu: class_prior must be 'empirical' or 'uniform', got {class_prior!r}")
        self.jitter = None if jitter is None else float(jitter)
        self.class_prior = class_prior

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        x = f64(arrays["penultimate"])
        labels = fit_labels(arrays["labels"], self.name)
        classes, inv = np.unique(labels, return_inverse=True)
        k, f = len(classes), x.shape[1]
        means, counts = class_means(x, inv, k)
        if counts.min() < 2:
            bad = classes[counts < 2].tolist()
            raise ValueError(
                f"ddu needs at least 2 fit samples per class for a class covariance; classes {bad} have fewer. "
                "Fit on a larger ID split"
            )
        order = np.argsort(inv, kind="stable")
        ends = np.cumsum(counts)
        covs = np.empty((k, f, f), dtype=np.float64)
        for c in range(k):  # one [F, F] product per class; samples and dimensions stay vectorized
            centered = x[order[ends[c] - counts[c]:ends[c]]] - means[c]
            covs[c] = _sym(centered.T @ centered) / (counts[c] - 1)
        chol, self.jitter_ = self._cholesky(torch.from_numpy(covs))
        self.chol_inv_ = torch.linalg.solve_triangular(chol, torch.eye(f, dtype=chol.dtype), upper=False).numpy()
        log_det = 2.0 * np.log(np.diagonal(chol.numpy(), axis1=1, axis2=2)).sum(axis=1)
        log_prior = np.log(counts / counts.sum()) if self.class_prior == "empirical" else np.full(k, -math.log(k))
        self.log_norm_ = log_prior - 0.5 * log_det - 0.5 * f * math.log(2.0 * math.pi)
        self.means_, self.classes_ = means, classes

    def _cholesky(self, covs: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Batched Cholesky factors of ``covs + j I`` for the first jitter j of the ladder that works for all."""
        eye = torch.eye(covs.shape[1], dtype=covs.dtype)
        if self.jitter is not None:
            ladder = [self.jitter]
        else:
            scale = float(torch.diagonal(covs, dim1=1, dim2=2).mean())
            scale = scale if scale > 0 else 1.0
            ladder = [0.0] + [scale * 10.0**e for e in range(-15, 1)]
        for j in ladder:
            chol, info = torch.linalg.cholesky_ex(covs + j * eye)
            if not bool(info.any()):
                return chol, j
        raise ValueError(
            f"ddu: a class covariance is not positive definite even with jitter {ladder[-1]:.3g}; "
            "set a larger jitter or check the fit features for NaN-free, non-degenerate values"
        )

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        x = f64(arrays["penultimate"])
        log_p = np.empty((x.shape[0], len(self.classes_)), dtype=np.float64)
        for c in range(len(self.classes_)):  # per class: [N, F] @ [F, F], vectorized over samples
            z = (x - self.means_[c]) @ self.chol_inv_[c].T
            log_p[:, c] = self.log_norm_[c] - 0.5 * np.einsum("nf,nf->n", z, z)
        return logsumexp(log_p, axis=1)

    def _fitted_state(self) -> dict[str, np.ndarray]:
        return {"means": self.means_, "classes": self.classes_, "chol_inv": self.chol_inv_,
                "log_norm": self.log_norm_, "jitter": np.array([self.jitter_])}

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        _require(state, ("means", "classes", "chol_inv", "log_norm", "jitter"), type(self).__name__)
        self.means_, self.chol_inv_ = f64(state["means"]), f64(state["chol_inv"])
        self.log_norm_, self.jitter_ = f64(state["log_norm"]), float(np.asarray(state["jitter"]).reshape(-1)[0])
        self.classes_ = np.asarray(state["classes"], dtype=np.int64)


def _require(state: dict[str, np.ndarray], keys: tuple[str, ...], cls: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{cls} state lacks {missing} (has {sorted(state)}); export it with fitted_state()")
