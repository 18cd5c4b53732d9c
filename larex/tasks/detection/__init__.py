"""Object detection: per image, the boxes a detector keeps; OOD scores per box and per image.

* Inputs (:mod:`.inputs`): each image letterboxed to the network input (``task.input``), its ground truth in
  the original frame with the transform between the two (:mod:`.geometry`); batches keep targets as a list.
* Features: the box producer (``larex.extraction.producers.boxes``) runs one deterministic forward, keeps the
  detections (``task.boxes``: ``predict_conf``, ``nms_iou``, ``max_det``), maps them onto the hooked map and
  RoIAligns them (``roi_features``), and draws S DropBlock masks on the RoI features (``roi_latent``, no extra
  forward); image-level MC latents of the hooked map (``latent``) come from the MonteCarlo producer as for
  classification; ground truth from the ground-truth producer.
* Aggregation: LaREx entropy + MC mean of the image latents (``entropy``, ``latent_mean``) and of the RoI
  latents (``box_entropy``, ``box_latent_mean``), by the configured estimator.
* Methods (:mod:`.levels`): every selected method runs at box level (``box.<name>``) and image level
  (``image.<name>``: image-level MC features for LaRED/LaREM, else the box scores reduced per image with the
  no-object policy of ``task.image_score``).
* Summary: COCO mAP on ID test (:mod:`.map`), and per split the count and share of no-object images.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from larex.tasks.base import AggregationStep, Task

DEFAULT_BOXES = {"predict_conf": 0.25, "nms_iou": 0.7, "max_det": 100, "roi_output_size": 7, "sampling_ratio": 2,
                 "aligned": True}
DEFAULT_IMAGE_SCORE = {"reduction": "min", "no_object": "val_min", "no_object_score": None}
DEFAULT_INPUT = {"resize": "letterbox", "stride": None, "fill": 114 / 255}


def _renamed_step(estimator, inp: str, out: str, device: str) -> AggregationStep:
    """``estimator`` (which reads ``latent``) on ``inp``, written as ``out``."""
    return AggregationStep(out, (inp,), lambda arrays: estimator({estimator.inputs[0]: arrays[inp]}, device),
                           {**estimator.identity(), "output": out, "input": inp})


class Detection(Task):
    """Args: boxes (box selection and RoIAlign settings, see :data:`DEFAULT_BOXES`), image_score (reduction
    and no-object policy, :data:`DEFAULT_IMAGE_SCORE`), input (resize mode, stride, padding fill), levels (which
    of ``box`` / ``image`` to evaluate)."""

    name = "detection"
    always_keys = ("boxes", "gt_boxes")  # mAP, the no-object counts and the open-set figures read them
    summary_requires = ("no_object", "image_index", "boxes", "box_scores", "box_labels", "gt_image_index",
                        "gt_boxes", "gt_labels")
    split_requires = ("no_object",)

    def __init__(self, name: str | None = None, boxes: Mapping[str, Any] | None = None,
                 image_score: Mapping[str, Any] | None = None, input: Mapping[str, Any] | None = None,
                 levels=("box", "image")):
        super().__init__(name)
        self.boxes = {**DEFAULT_BOXES, **dict(boxes or {})}
        self.image_score = {**DEFAULT_IMAGE_SCORE, **dict(image_score or {})}
        self.input = {**DEFAULT_INPUT, **dict(input or {})}
        self.levels = tuple(levels)
        bad = [lv for lv in self.levels if lv not in ("box", "image")] or ([] if self.levels else ["(none)"])
        if bad:
            raise ValueError(f"task.levels {list(self.levels)}: use a non-empty subset of [box, image]")
        from larex.tasks.detection.levels import ImageFromBoxes, BoxView  # noqa: F401  (validates the settings)

    # ------------------------------------------------------------------ inputs
    def input_dataset(self, dataset, input_spec):
        from larex.tasks.detection.inputs import DetectionInput

        return DetectionInput(dataset, input_spec["image_size"], channels=int(input_spec["channels"]),
                              mean=list(input_spec["mean"]), std=list(input_spec["std"]),
                              resize=str(self.input["resize"]), stride=self.input["stride"],
                              fill=float(self.input["fill"]))

    def collate(self, items):
        from larex.tasks.detection.inputs import collate

        return collate(items)

    # ------------------------------------------------------------------ training
    def train_model(self, model, dataset, settings, device, workdir):
        """The adapter's own trainer (ultralytics for YOLO / RT-DETR) on the raw ``fit`` / ``val`` images."""
        info = model.train_detector(dataset("fit", raw=True), dataset("val", raw=True), dict(settings), device,
                                    workdir)
        return model.eval(), info

    # ------------------------------------------------------------------ methods
    def expand_methods(self, methods, build):
        """``box.<name>`` and ``image.<name>`` views of every selected method (``build(name)`` makes a fresh
        instance); returns name -> (postprocessor, selected name)."""
        from larex.tasks.detection.levels import BoxView, ImageFromBoxes, image_native, unsupported_keys

        bad = {n: unsupported_keys(pp) for n, pp in methods.items() if unsupported_keys(pp)}
        if bad:
            raise ValueError(f"detection has no per-box feature(s) for method(s) {bad}; detection methods read "
                             "entropy, latent_mean, logits, penultimate and labels (box rows: box_entropy, "
                             "box_latent_mean, box_logits, roi_features, box_labels)")
        out = {}
        for n, pp in methods.items():
            if "box" in self.levels:
                out[f"box.{n}"] = (BoxView(pp), n)
            if "image" in self.levels:
                if image_native(pp):
                    out[f"image.{n}"] = (build(n), n)
                else:
                    s = self.image_score
                    out[f"image.{n}"] = (ImageFromBoxes(BoxView(build(n)), str(s["reduction"]),
                                                        str(s["no_object"]), s.get("no_object_score")), n)
        return out

    # ------------------------------------------------------------------ aggregation
    def aggregation_steps(self, params):
        from larex.aggregation.knn import KNNEntropy
        from larex.aggregation.mean import LatentMean
        from larex.tasks.classification import estimator_step

        device = str(params.get("device") or "cpu")
        estimator = params.get("estimator") or KNNEntropy()
        if estimator.output != "entropy":
            raise ValueError(f"the entropy estimator {estimator!r} writes {estimator.output!r}, not 'entropy'")
        mean = LatentMean()
        return [estimator_step(estimator, device), estimator_step(mean, device),
                _renamed_step(estimator, "roi_latent", "box_entropy", device),
                _renamed_step(mean, "roi_latent", "box_latent_mean", device)]

    # ------------------------------------------------------------------ metrics
    def summary_metrics(self, feats):
        if not set(self.summary_requires) <= set(feats):
            return {}
        from larex.tasks.detection.map import coco_map

        n = int(np.asarray(feats["no_object"]).shape[0])
        return coco_map(n, feats["image_index"], feats["boxes"], feats["box_scores"], feats["box_labels"],
                        feats["gt_image_index"], feats["gt_boxes"], feats["gt_labels"])

    def split_metrics(self, feats):
        """Count and share of the split's images without a box above ``predict_conf``."""
        if "no_object" not in feats:
            return {}
        no = np.asarray(feats["no_object"]).astype(bool)
        return {"no_object_images": float(no.sum()), "no_object_share": float(no.mean()) if len(no) else float("nan")}
