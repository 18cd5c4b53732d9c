"""LaREM: Mahalanobis distance of the LaREx entropy features to their ID distribution.

score(x) = -(x - mu)^T P (x - mu)  (negative squared Mahalanobis distance; higher = more ID),

with mu the fit-split mean and P the (pseudo-)inverse of a shrunk covariance, after optional z-scoring
and PCA fitted on the ID fit split.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
from scipy.linalg import pinvh
from sklearn.covariance import EmpiricalCovariance, LedoitWolf, ShrunkCovariance

from larex.postprocessors._features import check_feature_set, stacked
from larex.postprocessors.base import Postprocessor
from larex.postprocessors.pca import PCAReducer


class LaREM(Postprocessor):
    """Gaussian (Mahalanobis) model of LaREx entropy features.

    Args:
        pca: PCA size before the Gaussian fit: None, int, variance fraction in (0, 1) or "auto"
            (PPCA likelihood on the ID val split; see :class:`PCAReducer`).
        standardize: z-score each dimension with fit-split statistics before PCA. The Mahalanobis
            distance itself is scale-invariant; this only changes which directions PCA keeps.
        shrinkage: "ledoit_wolf" (sklearn ``LedoitWolf``, data-driven coefficient), a fixed
            coefficient in [0, 1] (sklearn ``ShrunkCovariance``), or None (empirical covariance).
        features: the feature keys modelled, concatenated per row: ``entropy`` (LaREx), ``latent_mean`` (MC
            mean of the latent), or both.
        pca_candidates: sizes tried by ``pca="auto"``.

    Fitted: ``reducer_``, ``location_`` [k], ``covariance_`` [k, k], ``precision_`` [k, k],
    ``shrinkage_`` (the coefficient used; 0 for the empirical covariance).
    """

    requires = ("entropy",)
    name = "larem"

    def __init__(
        self,
        pca: int | float | str | None = None,
        standardize: bool = False,
        shrinkage: str | float | None = "ledoit_wolf",
        pca_candidates: Sequence[int] | None = None,
        features: Sequence[str] = ("entropy",),
    ) -> None:
        self.features = check_feature_set(features, "LaREM")
        self.requires = self.features
        if isinstance(shrinkage, str):
            if shrinkage != "ledoit_wolf":
                raise ValueError(f"shrinkage must be 'ledoit_wolf', a float in [0, 1] or None, got {shrinkage!r}")
        elif shrinkage is not None:
            if isinstance(shrinkage, bool) or not isinstance(shrinkage, numbers.Real) or not 0 <= shrinkage <= 1:
                raise ValueError(f"shrinkage must be 'ledoit_wolf', a float in [0, 1] or None, got {shrinkage!r}")
            shrinkage = float(shrinkage)
        self.pca = pca
        self.standardize = bool(standardize)
        self.shrinkage = shrinkage
        self.pca_candidates = None if pca_candidates is None else [int(k) for k in pca_candidates]
        self._new_reducer()  # validates pca / pca_candidates early

    def _new_reducer(self) -> PCAReducer:
        return PCAReducer(n_components=self.pca, candidates=self.pca_candidates, standardize=self.standardize)

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        if self.pca == "auto" and val is None:
            raise ValueError(
                "LaREM(pca=auto) chooses the PCA size on the ID validation split: call "
                "fit(fit_feats, val=val_feats), or set pca to an int, a variance fraction or null"
            )
        x = stacked(arrays, self.features)
        if x.shape[0] < 2:
            raise ValueError(f"LaREM needs at least 2 fit samples to estimate a covariance, got {x.shape[0]}")
        self.reducer_ = self._new_reducer().fit(x, val=stacked(val, self.features) if self.pca == "auto" else None)
        z = self.reducer_.transform(x)
        if self.shrinkage == "ledoit_wolf":
            est = LedoitWolf(store_precision=False).fit(z)
            self.shrinkage_ = float(est.shrinkage_)
        elif self.shrinkage is None:
            est = EmpiricalCovariance(store_precision=False).fit(z)
            self.shrinkage_ = 0.0
        else:
            est = ShrunkCovariance(store_precision=False, shrinkage=self.shrinkage).fit(z)
            self.shrinkage_ = self.shrinkage
        self.location_ = np.asarray(est.location_, dtype=np.float64)
        self.covariance_ = np.asarray(est.covariance_, dtype=np.float64)
        prec = pinvh(self.covariance_)
        self.precision_ = 0.5 * (prec + prec.T)

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        diff = self.reducer_.transform(stacked(arrays, self.features)) - self.location_
        return -np.einsum("ij,ij->i", diff @ self.precision_, diff)

    def _fitted_state(self) -> dict[str, np.ndarray]:
        state = {f"reducer.{k}": v for k, v in self.reducer_.fitted_state().items()}
        state.update(location=self.location_, precision=self.precision_)
        return state

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        if "location" not in state or "precision" not in state:
            raise ValueError(f"LaREM state needs 'location' and 'precision', got {sorted(state)}")
        red = {k[len("reducer."):]: v for k, v in state.items() if k.startswith("reducer.")}
        self.reducer_ = self._new_reducer().set_fitted_state(red)
        self.location_ = np.asarray(state["location"], dtype=np.float64)
        self.precision_ = np.asarray(state["precision"], dtype=np.float64)
