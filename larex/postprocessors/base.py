"""Postprocessor base class: the contract every OOD detector (LaRED, LaREM, baselines) implements.

A postprocessor reads a :data:`FeatureSet` (feature name -> array, see ``DESIGN.md`` "Data contract"),
is fitted on the ID ``fit`` split (``val`` may be used only to choose hyperparameters) and scores
rows: **higher score = more in-distribution**. No I/O, Hydra or MLflow here.

Declared needs (class attributes, or instance attributes set in ``__init__`` when they depend on
parameters, as NAC-UE's ``nac.<layer>`` keys):

* ``requires``: the keys :meth:`Postprocessor.score` reads (never ``labels``: OOD splits have none). The
  non-model keys among them share one row axis (:attr:`Postprocessor.score_axis`, e.g. ``"image"``): one
  score per row of that axis.
* ``fit_requires``: the keys :meth:`Postprocessor.fit` reads on the fit split (default: ``requires``), e.g.
  ``("penultimate", "labels")``. The ``val`` split (ID, labels not guaranteed) is checked for ``requires``
  only and passed to ``_fit`` with only those keys.
* :meth:`Postprocessor.extraction_params`: per key, the parameters its producer needs from this method
  (e.g. ODIN's temperature and epsilon for ``odin_logits``): the extraction plan is derived from the
  selected methods' needs and these parameters.

Keys are looked up in the feature registry (:mod:`larex.features`) for their rank, row axis and producer
(named in :class:`MissingFeatureError`); a key no module registers is allowed (no rank check; give one with
``feature_ndim``).

Subclasses normally set ``requires`` (and ``fit_requires``) and ``name`` and implement
``_fit(arrays, val_arrays)`` (optional: fit-free methods set ``needs_fit = False``) and ``_score(arrays)``;
the public :meth:`Postprocessor.fit` and :meth:`Postprocessor.score` validate inputs
(:meth:`Postprocessor.check_features`) around them. A subclass may instead override ``fit``/``score`` itself
and call ``check_features`` directly; if it overrides ``fit`` but keeps the inherited ``score``, it must call
``_mark_fitted`` at the end of ``fit``.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Self

import numpy as np

from larex import features

FeatureSet = Mapping[str, np.ndarray]
"""One split's features: name -> array, e.g. ``{"entropy": [N, D], "logits": [N, C]}``."""


class MissingFeatureError(KeyError):
    """A feature key that a postprocessor requires is absent from the feature set."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class FeatureError(ValueError):
    """A feature array is unusable (NaN/Inf, wrong rank, empty, shape differs from the fit split)."""


class NotFittedError(RuntimeError):
    """``score`` (or ``fitted_state``) was called before ``fit``."""


class _FitRequires:
    """``fit_requires`` descriptor: the keys ``fit`` reads, ``requires`` unless a class or instance sets it.

    A subclass may set ``fit_requires = (...)`` as a class attribute (which replaces this descriptor for it)
    or assign ``self.fit_requires`` in ``__init__``; reading it on a class or instance always gives a tuple.
    """

    def __get__(self, obj: Any, cls: type | None = None) -> tuple[str, ...]:
        if obj is None:
            return tuple(cls.requires) if isinstance(cls.requires, (tuple, list)) else cls.requires
        own = obj.__dict__.get("_fit_requires")
        return tuple(obj.requires) if own is None else own

    def __set__(self, obj: Any, value: Sequence[str] | None) -> None:
        obj.__dict__["_fit_requires"] = None if value is None else tuple(value)


class Postprocessor:
    """Base class of all OOD detectors. See the module docstring for the subclassing protocol."""

    requires: ClassVar[tuple[str, ...]] = ()
    """Keys read by :meth:`score` (never ``labels``)."""
    fit_requires = _FitRequires()
    """Keys read by :meth:`fit` on the fit split (default: :attr:`requires`)."""
    name: ClassVar[str] = "postprocessor"
    needs_fit: ClassVar[bool] = True
    feature_ndim: ClassVar[Mapping[str, int]] = {}
    """Per-key rank overrides on top of the registry's ranks (:func:`larex.features.rank`)."""

    # ------------------------------------------------------------------ public API
    def fit(self, fit: FeatureSet, val: FeatureSet | None = None) -> Self:
        """Fit on the ID ``fit`` split (keys ``fit_requires``); ``val`` (ID validation, keys ``requires``; it
        need not hold labels) only selects hyperparameters."""
        self._check_declaration()
        arrays = self.check_features(fit, split="fit", shapes={}, keys=self.fit_requires)
        shapes = _sample_shapes(arrays)
        val_arrays = None if val is None else self.check_features(val, split="val", shapes=shapes)
        self._fit(arrays, val_arrays)
        self._mark_fitted(arrays)
        return self

    def score(self, feats: FeatureSet) -> np.ndarray:
        """Score rows: float64 array, one value per row of :attr:`score_axis`; higher = more in-distribution.

        Reads only the keys in ``requires`` (extra keys, such as ``labels``, are ignored)."""
        self._check_declaration()
        if self.needs_fit and not self.is_fitted:
            raise NotFittedError(
                f"{type(self).__name__} ({self.name!r}) is not fitted: call .fit(fit_feats, val=val_feats) "
                "before .score()"
            )
        arrays = self.check_features(feats, split="score")
        scores = np.asarray(self._score(arrays), dtype=np.float64)
        n = _num_samples(arrays, self.name)
        if scores.shape != (n,):
            raise RuntimeError(f"{type(self).__name__}._score returned shape {scores.shape}, expected ({n},)")
        return scores

    @property
    def score_axis(self) -> str:
        """Row axis of the scores: the axis shared by the non-model keys of ``requires`` (e.g. ``"image"``);
        the primary axis when none of them is registered."""
        return _common_axis(self.requires, self.name, "score")

    def extraction_params(self) -> dict[str, dict[str, Any]]:
        """Feature key -> the parameters the producer of that key needs from this method (``{}``: none).

        Every key of ``fit_requires`` and ``requires`` is listed; the extraction plan collects these from the
        selected methods (so producer settings live in the method's YAML)."""
        return {k: {} for k in dict.fromkeys((*self.fit_requires, *self.requires))}

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
        keys: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Validate ``feats`` for this postprocessor and return ``{key: array}`` for ``keys``
        (default ``requires``; ``fit`` passes ``fit_requires`` for the fit split).

        Checks: every key present (else :class:`MissingFeatureError` naming the producer that writes it);
        arrays numeric, non-empty, of the expected rank (``feature_ndim``, else the registry's), finite
        (count of NaN/Inf reported), the per-row keys of one row axis with one common row count; per-row
        shape equal to ``shapes`` (default: the shapes seen at fit time, if fitted). Arrays are not copied or
        modified.
        """
        keys = tuple(self.requires if keys is None else keys)
        if not isinstance(feats, Mapping):
            raise TypeError(
                f"{self.name}: features must be a mapping name -> array, got {type(feats).__name__}"
            )
        missing = [k for k in keys if k not in feats]
        if missing:
            hints = "; ".join(f"{k!r}: {features.producer_hint(k)}" for k in missing)
            extra = ""
            if "labels" in missing and split == "fit":
                extra = (f" {self.name} reads class labels to fit: fit it on an ID split with known labels "
                         f"(it reads {list(keys)} to fit and {list(self.requires)} to score).")
            raise MissingFeatureError(
                f"{self.name} needs feature(s) {missing} in the {split} split, which has {sorted(feats)}. "
                f"{hints}.{extra}"
            )
        axis = _common_axis(keys, self.name, "fit" if split == "fit" else "score")
        if shapes is None:
            shapes = getattr(self, "input_shapes_", None) or {}
        arrays: dict[str, np.ndarray] = {}
        for key in keys:
            arr = np.asarray(feats[key])
            where = f"{self.name}: feature {key!r} of the {split} split"
            if arr.dtype.kind not in "biuf":
                raise FeatureError(f"{where} has dtype {arr.dtype}; expected a numeric array")
            ndim = self.feature_ndim.get(key)
            if ndim is None:
                spec = features.lookup(key)
                ndim = None if spec is None else spec.rank
            if ndim is not None and arr.ndim != ndim:
                raise FeatureError(f"{where} has shape {arr.shape}; expected a {ndim}-D array")
            if arr.size == 0:
                raise FeatureError(f"{where} is empty (shape {arr.shape}); it needs at least one row")
            if arr.dtype.kind == "f":
                finite = np.isfinite(arr)
                if not finite.all():
                    n_nan = int(np.isnan(arr).sum())
                    n_inf = int(np.isinf(arr).sum())
                    raise FeatureError(
                        f"{where} contains {n_nan} NaN and {n_inf} Inf values (of {arr.size}); "
                        "repair or drop those samples before fitting/scoring"
                    )
            if not features.is_model_key(key) and key in shapes and tuple(arr.shape[1:]) != tuple(shapes[key]):
                raise FeatureError(
                    f"{where}: mismatched shapes: per-row shape {tuple(arr.shape[1:])} differs from "
                    f"{tuple(shapes[key])} seen when fitting; use features from the same model, hooked "
                    "layer and aggregation as the fit split"
                )
            arrays[key] = arr
        counts = {k: a.shape[0] for k, a in arrays.items() if not features.is_model_key(k)}
        if len(set(counts.values())) > 1:
            raise FeatureError(
                f"{self.name}: features of the {split} split have different row counts {counts} (all are rows "
                f"of the {axis!r} axis)"
            )
        return arrays

    # ------------------------------------------------------------------ subclass hooks
    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        """Fit from validated arrays (``fit_requires`` of fit, ``requires`` of val); default: nothing."""

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Score validated arrays; every concrete subclass implements this or overrides ``score``."""
        raise TypeError(f"{type(self).__name__} must implement `_score(self, arrays)` or override `score`")

    def _fitted_state(self) -> dict[str, np.ndarray]:
        return {}

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no fitted arrays but got {sorted(state)}")

    def _mark_fitted(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Record per-row input shapes of the score keys; marks the instance as fitted."""
        score_keys = set(self.requires)
        self.input_shapes_ = _sample_shapes({k: a for k, a in arrays.items() if k in score_keys})

    def _check_declaration(self) -> None:
        if "labels" in self.requires:
            raise TypeError(
                f"{type(self).__name__} ({self.name!r}) lists 'labels' in requires, the keys read to score; OOD "
                "splits have no labels. Read labels only to fit: list them in fit_requires"
            )

    def __repr__(self) -> str:
        try:
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        except AttributeError:
            args = "..."
        return f"{type(self).__name__}({args})"


def _common_axis(keys: Sequence[str], name: str, what: str) -> str:
    """The row axis shared by the registered non-model ``keys`` (primary axis when there is none)."""
    by_axis: dict[str, list[str]] = {}
    for k in keys:
        spec = features.lookup(k)
        if spec is not None and spec.axis != "model":
            by_axis.setdefault(spec.axis, []).append(k)
    if len(by_axis) > 1:
        raise FeatureError(
            f"{name}: the keys it reads to {what} are rows of different axes {by_axis}; a method gives one "
            "score per row of one axis, so all its per-row keys must share that axis (model keys such as "
            "head.weight excepted)"
        )
    return next(iter(by_axis), features.PRIMARY_AXIS)


def _sample_shapes(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in np.shape(a)[1:]) for k, a in arrays.items() if not features.is_model_key(k)}


def _num_samples(arrays: Mapping[str, np.ndarray], name: str = "postprocessor") -> int:
    """Row count of the per-row arrays (all share one axis and count, see ``check_features``)."""
    for k, a in arrays.items():
        if not features.is_model_key(k):
            return int(np.shape(a)[0])
    raise ValueError(f"{name} reads no per-row feature (only model keys): it has no rows to score")
