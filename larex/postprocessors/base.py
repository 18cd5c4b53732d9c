"""Postprocessor base class: the contract every OOD detector (LaRED, LaREM, baselines) implements.

A postprocessor reads a :data:`FeatureSet` (feature name -> array, see docs/DESIGN.md "Data contract"),
is fitted on the ID ``fit`` split (``val`` may be used only to choose hyperparameters) and scores
samples: **higher score = more in-distribution**. No I/O, Hydra or MLflow here.

Subclasses normally set ``requires`` and ``name`` and implement ``_fit(arrays, val_arrays)`` (optional:
fit-free methods set ``needs_fit = False``) and ``_score(arrays)``; the public :meth:`Postprocessor.fit`
and :meth:`Postprocessor.score` validate inputs (:meth:`Postprocessor.check_features`) around them.
A subclass may instead override ``fit``/``score`` itself and call ``check_features`` directly; if it
overrides ``fit`` but keeps the inherited ``score``, it must call ``_mark_fitted`` at the end of ``fit``.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import numpy as np

FeatureSet = Mapping[str, np.ndarray]
"""One split's features: name -> array, e.g. ``{"entropy": [N, D], "logits": [N, C]}``."""

FEATURE_SOURCES: dict[str, str] = {
    "latent": "`larex-extract` writes it (hooked-layer activations of the MC passes)",
    "entropy": "`larex-aggregate` writes it from the extracted `latent`; run larex-aggregate "
    "(after larex-extract) for this split",
    "logits": "`larex-extract` writes it (deterministic logits)",
    "mc_logits": "`larex-extract` writes it (logits of the MC-dropout passes)",
    "penultimate": "`larex-extract` writes it (input of the final linear layer)",
    "labels": "`larex-extract` writes it for ID splits with known labels",
    "head.weight": "`larex-extract` writes it once per model (final linear layer weight)",
    "head.bias": "`larex-extract` writes it once per model (final linear layer bias)",
}
"""Feature key -> which stage produces it (used in :class:`MissingFeatureError` messages)."""

FEATURE_NDIM: dict[str, int] = {
    "latent": 3,
    "entropy": 2,
    "logits": 2,
    "mc_logits": 3,
    "penultimate": 2,
    "labels": 1,
    "head.weight": 2,
    "head.bias": 1,
}
"""Expected number of dimensions per feature key (data contract)."""

MODEL_KEYS: frozenset[str] = frozenset({"head.weight", "head.bias"})
"""Keys stored once per model, not per sample (no sample axis, no shape check against fit)."""


class MissingFeatureError(KeyError):
    """A feature key that a postprocessor requires is absent from the feature set."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class FeatureError(ValueError):
    """A feature array is unusable (NaN/Inf, wrong rank, empty, shape differs from the fit split)."""


class NotFittedError(RuntimeError):
    """``score`` (or ``fitted_state``) was called before ``fit``."""


class Postprocessor:
    """Base class of all OOD detectors. See the module docstring for the subclassing protocol."""

    requires: ClassVar[tuple[str, ...]] = ()
    name: ClassVar[str] = "postprocessor"
    needs_fit: ClassVar[bool] = True
    feature_ndim: ClassVar[Mapping[str, int]] = {}
    """Per-key rank overrides on top of :data:`FEATURE_NDIM`."""

    # ------------------------------------------------------------------ public API
    def fit(self, fit: FeatureSet, val: FeatureSet | None = None) -> Self:
        """Fit on the ID ``fit`` split; ``val`` (ID validation) only selects hyperparameters."""
        arrays = self.check_features(fit, split="fit", shapes={})
        shapes = _sample_shapes(arrays)
        val_arrays = None if val is None else self.check_features(val, split="val", shapes=shapes)
        self._fit(arrays, val_arrays)
        self._mark_fitted(arrays)
        return self

    def score(self, feats: FeatureSet) -> np.ndarray:
        """Score samples: float64 array [N], higher = more in-distribution."""
        if self.needs_fit and not self.is_fitted:
            raise NotFittedError(
                f"{type(self).__name__} ({self.name!r}) is not fitted: call .fit(fit_feats, val=val_feats) "
                "before .score()"
            )
        arrays = self.check_features(feats, split="score")
        scores = np.asarray(self._score(arrays), dtype=np.float64)
        n = _num_samples(arrays)
        if scores.shape != (n,):
            raise RuntimeError(f"{type(self).__name__}._score returned shape {scores.shape}, expected ({n},)")
        return scores

    @property
    def is_fitted(self) -> bool:
        return getattr(self, "input_shapes_", None) is not None

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments (read from attributes of the same name)."""
        params = {}
        for p in inspect.signature(type(self).__init__).parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if not hasattr(self, p.name):
                raise AttributeError(
                    f"{type(self).__name__} must store constructor argument {p.name!r} as self.{p.name} "
                    "for get_params()"
                )
            params[p.name] = getattr(self, p.name)
        return params

    def fitted_state(self) -> dict[str, np.ndarray]:
        """Arrays needed to score (for saving as safetensors); restore with :meth:`set_fitted_state`."""
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted: nothing to export; call .fit() first")
        state = {k: np.ascontiguousarray(v) for k, v in self._fitted_state().items()}
        for key, shape in self.input_shapes_.items():
            state[f"input_shape.{key}"] = np.asarray(shape, dtype=np.int64)
        return state

    def set_fitted_state(self, state: Mapping[str, np.ndarray]) -> Self:
        """Restore a state from :meth:`fitted_state` into an instance built with the same parameters."""
        shapes = {
            k[len("input_shape."):]: tuple(int(d) for d in np.asarray(v).reshape(-1))
            for k, v in state.items()
            if k.startswith("input_shape.")
        }
        rest = {k: np.asarray(v) for k, v in state.items() if not k.startswith("input_shape.")}
        self._set_fitted_state(rest)
        self.input_shapes_ = shapes
        return self

    # ------------------------------------------------------------------ validation
    def check_features(
        self,
        feats: FeatureSet,
        *,
        split: str = "input",
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Validate ``feats`` for this postprocessor and return ``{key: array}`` for ``requires``.

        Checks: every required key present (else :class:`MissingFeatureError` naming the stage that
        writes it); arrays numeric, non-empty, of the expected rank, finite (count of NaN/Inf reported),
        with one common sample count; per-sample shape equal to ``shapes`` (default: the shapes seen at
        fit time, if fitted). Arrays are not copied or modified.
        """
        if not isinstance(feats, Mapping):
            raise TypeError(
                f"{self.name}: features must be a mapping name -> array, got {type(feats).__name__}"
            )
        missing = [k for k in self.requires if k not in feats]
        if missing:
            hints = "; ".join(
                f"{k!r}: {FEATURE_SOURCES.get(k, 'no larex stage writes it; check the key spelling')}"
                for k in missing
            )
            raise MissingFeatureError(
                f"{self.name} needs feature(s) {missing} in the {split} split, which has {sorted(feats)}. "
                f"{hints}."
            )
        if shapes is None:
            shapes = getattr(self, "input_shapes_", None) or {}
        arrays: dict[str, np.ndarray] = {}
        for key in self.requires:
            arr = np.asarray(feats[key])
            where = f"{self.name}: feature {key!r} of the {split} split"
            if arr.dtype.kind not in "biuf":
                raise FeatureError(f"{where} has dtype {arr.dtype}; expected a numeric array")
            ndim = {**FEATURE_NDIM, **self.feature_ndim}.get(key)
            if ndim is not None and arr.ndim != ndim:
                raise FeatureError(f"{where} has shape {arr.shape}; expected a {ndim}-D array")
            if arr.size == 0:
                raise FeatureError(f"{where} is empty (shape {arr.shape}); it needs at least one sample")
            if arr.dtype.kind == "f":
                finite = np.isfinite(arr)
                if not finite.all():
                    n_nan = int(np.isnan(arr).sum())
                    n_inf = int(np.isinf(arr).sum())
                    raise FeatureError(
                        f"{where} contains {n_nan} NaN and {n_inf} Inf values (of {arr.size}); "
                        "repair or drop those samples before fitting/scoring"
                    )
            if key not in MODEL_KEYS and key in shapes and tuple(arr.shape[1:]) != tuple(shapes[key]):
                raise FeatureError(
                    f"{where}: mismatched shapes: per-sample shape {tuple(arr.shape[1:])} differs from "
                    f"{tuple(shapes[key])} seen when fitting; use features from the same model, hooked "
                    "layer and aggregation as the fit split"
                )
            arrays[key] = arr
        counts = {k: a.shape[0] for k, a in arrays.items() if k not in MODEL_KEYS}
        if len(set(counts.values())) > 1:
            raise FeatureError(f"{self.name}: features of the {split} split have different sample counts {counts}")
        return arrays

    # ------------------------------------------------------------------ subclass hooks
    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        """Fit from validated arrays; the default does nothing (fit-free methods)."""

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Score validated arrays; every concrete subclass implements this or overrides ``score``."""
        raise TypeError(f"{type(self).__name__} must implement `_score(self, arrays)` or override `score`")

    def _fitted_state(self) -> dict[str, np.ndarray]:
        return {}

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no fitted arrays but got {sorted(state)}")

    def _mark_fitted(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Record per-sample input shapes; marks the instance as fitted."""
        self.input_shapes_ = _sample_shapes(arrays)

    def __repr__(self) -> str:
        try:
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        except AttributeError:
            args = "..."
        return f"{type(self).__name__}({args})"


def _sample_shapes(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in np.shape(a)[1:]) for k, a in arrays.items() if k not in MODEL_KEYS}


def _num_samples(arrays: Mapping[str, np.ndarray]) -> int:
    for k, a in arrays.items():
        if k not in MODEL_KEYS:
            return int(np.shape(a)[0])
    raise ValueError("no per-sample feature to count samples from")
