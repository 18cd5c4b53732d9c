"""The feature registry: every feature key a split can hold, declared once.

A split's features are a mapping key -> array (see ``../shared/DESIGN.md``, "Data contract"). Each key has
a **row axis** (what one row is: an ``image``, a ``box``, a ``pixel``, a ``token``, or ``model`` for arrays
stored once per model such as the head weights), a **rank** (number of dimensions, row axis included) and a
**producer** (the extraction producer class, or the stage, that writes it). Rows of a secondary axis
(``box``, ``pixel``, ``token``) carry the index of the ``image`` row they belong to in their axis's
**link key** (``image_index`` for boxes), so one split can hold image rows and box rows side by side.

Families: a key ending in ``.`` (e.g. ``nac.``) declares every key with that prefix (``nac.block3``).

Adding a feature = :func:`register` one :class:`FeatureSpec` in the module that produces it (a producer
module, or a baseline module that brings its own producer); nothing else lists keys.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

AXES = ("image", "box", "gt", "pixel", "token", "model")
"""Row axes. ``image`` is the primary axis (shards split by image rows); ``box`` = a predicted box, ``gt`` = a
ground-truth object (detection); ``model`` arrays have no rows."""

PRIMARY_AXIS = "image"

LINK_KEYS: dict[str, str] = {"box": "image_index", "gt": "gt_image_index", "pixel": "image_index",
                             "token": "image_index"}
"""Secondary axis -> key holding each row's (global) image row index."""


class UnknownFeatureError(KeyError):
    """A feature key that no module registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class FeatureSpec:
    """One feature key (or key family, when ``name`` ends with ``.``).

    Attributes:
        name: the key, e.g. ``"latent"``, or a family prefix ``"nac."``.
        axis: row axis, one of :data:`AXES`.
        rank: number of array dimensions including the row axis (for ``model`` keys: the array's ndim).
        producer: dotted path of the producer class that writes it, or ``"stage:<name>"`` for a stage.
        doc: one line: what the array holds (shown in error messages).
        tasks: names of the tasks whose models have this output (``None`` = any task, e.g. a hooked layer's
            activations); the plan checks it against the run's task before any compute.
    """

    name: str
    axis: str
    rank: int
    producer: str
    doc: str
    tasks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise ValueError(f"feature {self.name!r}: axis {self.axis!r} is not one of {AXES}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"feature {self.name!r}: rank must be a positive integer, got {self.rank!r}")

    @property
    def family(self) -> bool:
        return self.name.endswith(".")


_REGISTRY: dict[str, FeatureSpec] = {}


def register(spec: FeatureSpec, *, replace: bool = False) -> FeatureSpec:
    """Declare a key (idempotent for an identical spec; a different spec for a known key needs ``replace``)."""
    old = _REGISTRY.get(spec.name)
    if old is not None and old != spec and not replace:
        raise ValueError(f"feature {spec.name!r} is already registered as {old}; choose another key name")
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> dict[str, FeatureSpec]:
    """A copy of the registry: key (or family prefix) -> spec."""
    return dict(_REGISTRY)


def lookup(key: str) -> FeatureSpec | None:
    """The spec of ``key`` (exact key first, then the longest matching family prefix), or None."""
    if key in _REGISTRY:
        return _REGISTRY[key]
    best = None
    for name, spec in _REGISTRY.items():
        if spec.family and key.startswith(name) and len(key) > len(name):
            if best is None or len(name) > len(best.name):
                best = spec
    return best


def spec(key: str) -> FeatureSpec:
    """The spec of ``key``; :class:`UnknownFeatureError` listing close names when nobody registered it."""
    found = lookup(key)
    if found is None:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=5, cutoff=0.5)
        raise UnknownFeatureError(
            f"unknown feature key {key!r}: no module registers it"
            + (f"; close keys: {close}" if close else f"; known keys: {sorted(_REGISTRY)}")
            + ". A new key is declared with larex.features.register(FeatureSpec(...)) in the module that produces it")
    return found


def axis(key: str) -> str:
    return spec(key).axis


def rank(key: str) -> int:
    return spec(key).rank


def is_model_key(key: str) -> bool:
    """True for arrays stored once per model (no row axis), e.g. ``head.weight``."""
    found = lookup(key)
    return found is not None and found.axis == "model"


def producer_hint(key: str) -> str:
    """Who writes ``key``, for error messages."""
    found = lookup(key)
    if found is None:
        return "no larex module registers it; check the key spelling"
    who = found.producer[len("stage:"):] + " stage" if found.producer.startswith("stage:") \
        else f"producer {found.producer.rsplit('.', 1)[-1]}"
    return f"{found.doc} (written by the {who})"


# --------------------------------------------------------------------------------------------------
# built-in keys (classification core; detection, segmentation and LLM tasks register theirs)
# --------------------------------------------------------------------------------------------------
_P = "larex.extraction.producers"
_CLS = ("classification",)
for _spec in (
    FeatureSpec("latent", "image", 3, f"{_P}.monte_carlo.MonteCarlo",
                "hooked-layer activations of the S MC passes [N, S, D]"),
    FeatureSpec("mc_logits", "image", 3, f"{_P}.monte_carlo.MonteCarlo", "logits of the S MC passes [N, S, C]",
                _CLS),
    FeatureSpec("logits", "image", 2, f"{_P}.deterministic.Deterministic", "deterministic (eval-mode) logits [N, C]",
                _CLS),
    FeatureSpec("penultimate", "image", 2, f"{_P}.deterministic.Deterministic",
                "input of the final linear layer [N, F]", _CLS),
    FeatureSpec("labels", "image", 1, f"{_P}.labels.Labels", "ID class labels [N] (-1 for OOD / unknown)", _CLS),
    FeatureSpec("nac.", "image", 2, f"{_P}.nac.NAC", "raw NAC neuron statistics of layer <path> [N, D_layer]", _CLS),
    FeatureSpec("odin_logits", "image", 2, f"{_P}.odin.ODIN", "logits of ODIN-perturbed inputs [N, C]", _CLS),
    FeatureSpec("head.weight", "model", 2, f"{_P}.head.Head", "final linear layer weight [C, F]", _CLS),
    FeatureSpec("head.bias", "model", 1, f"{_P}.head.Head", "final linear layer bias [C]", _CLS),
    FeatureSpec("entropy", "image", 2, "stage:aggregate",
                "LaREx entropy of latent over the S samples [N, D] (estimator: configs/estimator)"),
    FeatureSpec("latent_mean", "image", 2, "stage:aggregate", "MC mean of latent over the S samples [N, D]"),
):
    register(_spec)

# detection (larex.tasks.detection): predicted boxes (box rows, with image_index), ground truth (gt rows) and the
# image rows' no-object flag; the box producer writes one deterministic forward's boxes and RoI features
_DET = ("detection",)
_B = f"{_P}.boxes.Boxes"
for _spec in (
    FeatureSpec("image_index", "box", 1, _B, "image row of each box row [M]"),
    FeatureSpec("boxes", "box", 2, _B, "predicted boxes, xyxy pixels of the original image [M, 4]", _DET),
    FeatureSpec("box_scores", "box", 1, _B, "detector confidence of each box [M]", _DET),
    FeatureSpec("box_labels", "box", 1, _B, "predicted class of each box [M]", _DET),
    FeatureSpec("box_logits", "box", 2, _B, "per-class logits of each box [M, C]", _DET),
    FeatureSpec("roi_features", "box", 2, _B, "RoIAlign of the box over the hooked map, channel means [M, D]",
                _DET),
    FeatureSpec("roi_latent", "box", 3, _B, "S DropBlock samples of the box's RoI features, channel means "
                "[M, S, D]", _DET),
    FeatureSpec("box_penultimate", "box", 2, _B, "input of the detector's linear class head for each box (Faster "
                "R-CNN box-head output, DETR last decoder state) [M, F]", _DET),
    FeatureSpec("box_head.weight", "model", 2, f"{_P}.boxes.BoxHead", "the detector's linear class head over "
                "box_penultimate, weight [C, F]", _DET),
    FeatureSpec("box_head.bias", "model", 1, f"{_P}.boxes.BoxHead", "the detector's linear class head, bias [C]",
                _DET),
    FeatureSpec("no_object", "image", 1, _B, "1 where the image has no box above predict_conf [N]", _DET),
    FeatureSpec("whole_roi_features", "image", 2, _B, "roi_features of the whole-image box (the image's content "
                "in the input, padding excluded) [N, D]", _DET),
    FeatureSpec("whole_roi_latent", "image", 3, _B, "roi_latent of the whole-image box [N, S, D]", _DET),
    FeatureSpec("whole_box_entropy", "image", 2, "stage:aggregate", "LaREx entropy of whole_roi_latent [N, D]",
                _DET),
    FeatureSpec("whole_box_latent_mean", "image", 2, "stage:aggregate", "MC mean of whole_roi_latent [N, D]", _DET),
    FeatureSpec("box_entropy", "box", 2, "stage:aggregate", "LaREx entropy of roi_latent over the S samples "
                "[M, D]", _DET),
    FeatureSpec("box_latent_mean", "box", 2, "stage:aggregate", "MC mean of roi_latent [M, D]", _DET),
    FeatureSpec("gt_image_index", "gt", 1, f"{_P}.ground_truth.GroundTruth", "image row of each ground-truth "
                "object [G]", _DET),
    FeatureSpec("gt_boxes", "gt", 2, f"{_P}.ground_truth.GroundTruth", "ground-truth boxes, xyxy pixels of the "
                "original image [G, 4]", _DET),
    FeatureSpec("gt_labels", "gt", 1, f"{_P}.ground_truth.GroundTruth", "ground-truth ID class of each object, "
                "-1 = an unknown (OOD) object [G]", _DET),
):
    register(_spec)
del _spec, _CLS, _DET, _B
