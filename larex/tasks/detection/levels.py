"""Any postprocessor at box level and at image level, through the usual fit/score API.

* :class:`BoxView`: the method on box rows -- its keys renamed to their box counterparts (``entropy`` ->
  ``box_entropy``, ``logits`` -> ``box_logits``, ``penultimate`` -> ``roi_features``, ``labels`` ->
  ``box_labels``, the predicted classes), one score per box. A method that reads a linear head (``head.weight``:
  ViM, ReAct, ASH, DICE) runs on the detector's own head: ``penultimate`` -> ``box_penultimate`` (the head's
  input per box), ``head.*`` -> ``box_head.*``, so features, logits and head agree; ``features="head"`` makes every
  method read ``box_penultimate`` for ``penultimate``.
* :class:`ImageFromBoxes`: image scores from a :class:`BoxView`'s box scores by a reduction (``min``: the
  least-ID box decides; ``mean``; ``score_weighted``: mean weighted by the detector's confidence; ``max``).
  Images without a box above ``predict_conf`` (``no_object``) get the no-object score: ``val_min`` (default;
  the lowest image score of ID ``val``, chosen at fit time, never on test), ``fixed`` (``no_object_score``) or
  ``whole_image`` (the method's score of one box covering the image's content: feature methods only).

Image-level methods that read only image-level MC features (``entropy``, ``latent_mean`` of the hooked map: the
LaREx paper's protocol) run on image rows unchanged (:func:`image_native`).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from larex.postprocessors.base import Postprocessor

BOX_KEYS = {"entropy": "box_entropy", "latent_mean": "box_latent_mean", "logits": "box_logits",
            "penultimate": "roi_features", "labels": "box_labels"}
"""Method key -> its box-row counterpart."""
WHOLE_IMAGE_KEYS = {"entropy": "whole_box_entropy", "latent_mean": "whole_box_latent_mean",
                    "penultimate": "whole_roi_features"}
"""Method key -> its counterpart on the whole-image box (image rows; the ``whole_image`` no-object policy)."""
HEAD_KEYS = {"penultimate": "box_penultimate", "head.weight": "box_head.weight", "head.bias": "box_head.bias"}
"""Method key -> its box counterpart for methods that read a head (and for all with ``features="head"``)."""
BOX_FEATURES = ("roi", "head")
IMAGE_NATIVE_KEYS = ("entropy", "latent_mean")
REDUCTIONS = ("min", "mean", "score_weighted", "max")
NO_OBJECT = ("val_min", "fixed", "whole_image")


def unsupported_keys(pp: Postprocessor) -> list[str]:
    return [k for k in dict.fromkeys((*pp.fit_requires, *pp.requires)) if k not in BOX_KEYS and k not in HEAD_KEYS]


def box_keys(pp: Postprocessor, features: str = "roi") -> dict[str, str]:
    """``pp``'s key -> box-row key map (see the module docstring)."""
    if features not in BOX_FEATURES:
        raise ValueError(f"task.box_features={features!r} is unknown; use one of {BOX_FEATURES}")
    reads_head = any(k.startswith("head.") for k in (*pp.fit_requires, *pp.requires))
    return {**BOX_KEYS, **(HEAD_KEYS if reads_head or features == "head" else {})}


def image_native(pp: Postprocessor) -> bool:
    return all(k in IMAGE_NATIVE_KEYS for k in (*pp.fit_requires, *pp.requires))


class BoxView(Postprocessor):
    """``inner`` on box rows (see the module docstring). Fit on the ID ``fit`` boxes (at most ``fit_boxes`` of
    them, a ``seed``ed random subset), ``val`` boxes for its hyperparameters. ``features``: ``roi`` (the hooked
    map's RoI features stand for ``penultimate``, except for methods reading a head) or ``head``
    (``box_penultimate`` for every method)."""

    def __init__(self, inner: Postprocessor, fit_boxes: int | None = None, seed: int = 0, features: str = "roi"):
        bad = unsupported_keys(inner)
        if bad:
            raise ValueError(f"{type(inner).__name__} reads {bad}, which detection models do not produce per box; "
                             f"box-level methods read {sorted({**BOX_KEYS, **HEAD_KEYS})}")
        self.inner, self.fit_boxes, self.seed = inner, fit_boxes, int(seed)
        self.name = f"box.{inner.name}"
        self._keys = box_keys(inner, features)
        self.requires = tuple(self._keys[k] for k in inner.requires)
        self.fit_requires = tuple(self._keys[k] for k in inner.fit_requires)
        self._back = {v: k for k, v in self._keys.items()}

    def _rename(self, feats: Mapping[str, np.ndarray], keys) -> dict[str, np.ndarray]:
        return {self._back[k]: feats[k] for k in keys if k in feats}

    def extraction_params(self):
        return {self._keys[k]: v for k, v in self.inner.extraction_params().items()}

    @property
    def score_axis(self) -> str:
        return "box"

    @property
    def is_fitted(self) -> bool:
        return self.inner.is_fitted

    def fit(self, fit, val=None):
        arrays = self._rename(fit, self.fit_requires)
        rows = [k for k in arrays if not k.startswith("head.")]  # head.* are the model's arrays, not box rows
        n = len(arrays[rows[0]]) if rows else 0
        if self.fit_boxes is not None and n > self.fit_boxes:  # a seeded subset of the fit boxes (memory of KDE/kNN)
            keep = np.sort(np.random.default_rng(self.seed).choice(n, size=self.fit_boxes, replace=False))
            arrays = {k: np.asarray(v)[keep] if k in rows else v for k, v in arrays.items()}
        self.inner.fit(arrays, None if val is None else self._rename(val, self.requires))
        return self

    def score(self, feats) -> np.ndarray:
        return self.inner.score(self._rename(feats, self.requires))

    def fitted_state(self) -> dict[str, np.ndarray]:
        return self.inner.fitted_state()

    def set_fitted_state(self, state):
        self.inner.set_fitted_state(state)
        return self


def reduce_boxes(box_scores: np.ndarray, image_index: np.ndarray, n_images: int, reduction: str,
                 weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the ``reduction`` of its boxes' scores; returns ``(scores [N], has_box [N] bool)`` (scores of
    images without a box are 0). Vectorized (scatter-reduce over the box rows)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"image_score.reduction={reduction!r} is unknown; use one of {REDUCTIONS}")
    s = torch.as_tensor(np.asarray(box_scores, dtype=np.float64))
    idx = torch.as_tensor(np.asarray(image_index, dtype=np.int64))
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_images):
        raise ValueError(f"box rows link to images outside 0..{n_images - 1}")
    counts = torch.bincount(idx, minlength=n_images)
    out = torch.zeros(n_images, dtype=torch.float64)
    if reduction in ("min", "max"):
        out = out.scatter_reduce(0, idx, s, reduce="amin" if reduction == "min" else "amax", include_self=False)
    elif reduction == "mean":
        out = out.scatter_add(0, idx, s) / counts.clamp(min=1)
    else:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64)).clamp(min=0)
        num = torch.zeros(n_images, dtype=torch.float64).scatter_add(0, idx, w * s)
        den = torch.zeros(n_images, dtype=torch.float64).scatter_add(0, idx, w)
        mean = torch.zeros(n_images, dtype=torch.float64).scatter_add(0, idx, s) / counts.clamp(min=1)
        out = torch.where(den > 0, num / den.clamp(min=1e-300), mean)  # all-zero weights: the plain mean
    has = counts > 0
    return torch.where(has, out, torch.zeros_like(out)).numpy(), has.numpy()


class ImageFromBoxes(Postprocessor):
    """Image scores from the box scores of ``box`` (a :class:`BoxView`); see the module docstring."""

    LINK = ("image_index", "box_scores", "no_object")

    def __init__(self, box: BoxView, reduction: str = "min", no_object: str = "val_min",
                 no_object_score: float | None = None):
        if reduction not in REDUCTIONS:
            raise ValueError(f"image_score.reduction={reduction!r} is unknown; use one of {REDUCTIONS}")
        if no_object not in NO_OBJECT:
            raise ValueError(f"image_score.no_object={no_object!r} is unknown; use one of {NO_OBJECT}")
        if no_object == "fixed" and (no_object_score is None or not np.isfinite(float(no_object_score))):
            raise ValueError("image_score.no_object=fixed needs a finite image_score.no_object_score")
        whole = ()
        if no_object == "whole_image":
            bad = [k for k in box.inner.requires  # the whole-image box has RoI features, not the head's
                   if k not in WHOLE_IMAGE_KEYS or box._keys.get(k) == "box_penultimate"]
            if bad:
                raise ValueError(f"image_score.no_object=whole_image scores a whole-image box, which has no {bad} "
                                 f"(method {box.inner.name}); it works for methods reading {sorted(WHOLE_IMAGE_KEYS)}"
                                 "; use no_object=val_min or fixed for the others")
            whole = tuple(WHOLE_IMAGE_KEYS[k] for k in box.inner.requires)
        self.box, self.reduction, self.no_object = box, reduction, no_object
        self.no_object_score = None if no_object_score is None else float(no_object_score)
        self.name = f"image.{box.inner.name}"
        self.requires = tuple(dict.fromkeys((*box.requires, *self.LINK, *whole)))
        self.fit_requires = tuple(dict.fromkeys((*box.fit_requires, *self.LINK)))
        self._whole = dict(zip(whole, box.inner.requires))
        self.no_object_value_: float | None = None

    def extraction_params(self):
        return self.box.extraction_params()

    @property
    def score_axis(self) -> str:
        return "image"

    @property
    def is_fitted(self) -> bool:
        return self.no_object_value_ is not None

    def fit(self, fit, val=None):
        self.box.fit(fit, val)
        if self.no_object == "whole_image":
            self.no_object_value_ = float("nan")  # not used: no-object images are scored on their whole-image box
        elif self.no_object == "fixed":
            self.no_object_value_ = float(self.no_object_score)
        else:
            ref = val if val is not None else fit
            s, has = self._reduce(ref)
            if not has.any():
                raise ValueError(f"{self.name}: no ID {'val' if val is not None else 'fit'} image has a box above "
                                 "predict_conf, so no no-object score can be chosen; lower task.boxes.predict_conf "
                                 "or set image_score.no_object=fixed")
            self.no_object_value_ = float(s[has].min())
        return self

    def fitted_state(self) -> dict[str, np.ndarray]:
        """The box view's state (``box.<key>``) and the chosen no-object score."""
        if not self.is_fitted:
            from larex.postprocessors.base import NotFittedError

            raise NotFittedError(f"{self.name} is not fitted: nothing to export; call .fit() first")
        return {**{f"box.{k}": v for k, v in self.box.fitted_state().items()},
                "no_object_value": np.asarray(self.no_object_value_, dtype=np.float64)}

    def set_fitted_state(self, state):
        if "no_object_value" not in state:
            raise ValueError(f"{self.name}: the state has no 'no_object_value' (keys {sorted(state)})")
        self.box.set_fitted_state({k[4:]: v for k, v in state.items() if k.startswith("box.")})
        self.no_object_value_ = float(np.asarray(state["no_object_value"]).reshape(-1)[0])
        return self

    def _reduce(self, feats) -> tuple[np.ndarray, np.ndarray]:
        n = int(np.asarray(feats["no_object"]).shape[0])
        box_scores = self.box.score(feats) if len(feats["image_index"]) else np.zeros(0)
        return reduce_boxes(box_scores, feats["image_index"], n, self.reduction, feats["box_scores"])

    def score(self, feats) -> np.ndarray:
        if not self.is_fitted:
            from larex.postprocessors.base import NotFittedError

            raise NotFittedError(f"{self.name} is not fitted: call .fit() before .score()")
        s, has = self._reduce(feats)
        if self.no_object == "whole_image":
            if (~has).any():
                rows = np.flatnonzero(~has)
                whole = {inner: np.asarray(feats[key])[rows] for key, inner in self._whole.items()}
                s = s.copy()
                s[rows] = self.box.inner.score(whole)
            return s
        return np.where(has, s, self.no_object_value_)
