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
    of ``box`` / ``image`` to evaluate), fit_boxes (box-level methods fit on at most this many ID fit boxes, a
    seeded random subset; null = all), box_features (what ``penultimate`` is per box: ``roi`` = the RoI features
    of the hooked map, or ``head`` = the detector's own class-head input ``box_penultimate``; methods that read
    a head -- ViM, ReAct, ASH, DICE -- always use the head's input and the head)."""

    name = "detection"
    scoring_settings = ("image_score", "levels", "fit_boxes", "box_features")
    producer_settings = ("boxes",)  # in the box producer's part hash
    always_keys = ("boxes", "gt_boxes")  # mAP, the no-object counts and the open-set figures read them
    summary_requires = ("no_object", "image_index", "boxes", "box_scores", "box_labels", "gt_image_index",
                        "gt_boxes", "gt_labels")
    split_requires = ("no_object",)

    def __init__(self, name: str | None = None, boxes: Mapping[str, Any] | None = None,
                 image_score: Mapping[str, Any] | None = None, input: Mapping[str, Any] | None = None,
                 levels=("box", "image"), fit_boxes: int | None = None, box_features: str = "roi"):
        super().__init__(name)
        from larex.tasks.detection.levels import BOX_FEATURES

        if box_features not in BOX_FEATURES:
            raise ValueError(f"task.box_features={box_features!r} is unknown; use one of {BOX_FEATURES}")
        self.box_features = str(box_features)
        if fit_boxes is not None and (isinstance(fit_boxes, bool) or int(fit_boxes) < 1):
            raise ValueError(f"task.fit_boxes must be a positive integer or null; got {fit_boxes!r}")
        self.fit_boxes = None if fit_boxes is None else int(fit_boxes)
        self.boxes = {**DEFAULT_BOXES, **dict(boxes or {})}
        self.image_score = {**DEFAULT_IMAGE_SCORE, **dict(image_score or {})}
        self.input = {**DEFAULT_INPUT, **dict(input or {})}
        self.levels = tuple(levels)
        bad = [lv for lv in self.levels if lv not in ("box", "image")] or ([] if self.levels else ["(none)"])
        if bad:
            raise ValueError(f"task.levels {list(self.levels)}: use a non-empty subset of [box, image]")

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
        model.check_trainable()  # before the datasets are built
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
                             "entropy, latent_mean, logits, penultimate, labels and head.* (box rows: box_entropy, "
                             "box_latent_mean, box_logits, roi_features or box_penultimate, box_labels, box_head.*)")
        out = {}
        for n, pp in methods.items():
            if "box" in self.levels:
                out[f"box.{n}"] = (BoxView(pp, self.fit_boxes, features=self.box_features), n)
            if "image" in self.levels:
                if image_native(pp):
                    out[f"image.{n}"] = (build(n), n)
                else:
                    s = self.image_score
                    box = BoxView(build(n), self.fit_boxes, features=self.box_features)
                    out[f"image.{n}"] = (ImageFromBoxes(box, str(s["reduction"]), str(s["no_object"]),
                                                        s.get("no_object_score")), n)
        return out

    # ------------------------------------------------------------------ aggregation
    def aggregation_steps(self, params):
        from larex.aggregation.mean import LatentMean
        from larex.tasks.classification import entropy_estimator, estimator_step

        device = str(params.get("device") or "cpu")
        estimator = entropy_estimator(params)
        mean = LatentMean()
        return [estimator_step(estimator, device), estimator_step(mean, device),
                _renamed_step(estimator, "roi_latent", "box_entropy", device),
                _renamed_step(mean, "roi_latent", "box_latent_mean", device),
                _renamed_step(estimator, "whole_roi_latent", "whole_box_entropy", device),
                _renamed_step(mean, "whole_roi_latent", "whole_box_latent_mean", device)]

    # ------------------------------------------------------------------ metrics
    def summary_metrics(self, feats):
        if not set(self.summary_requires) <= set(feats):
            return {}
        from larex.tasks.detection.map import coco_map

        n = int(np.asarray(feats["no_object"]).shape[0])
        return coco_map(n, feats["image_index"], feats["boxes"], feats["box_scores"], feats["box_labels"],
                        feats["gt_image_index"], feats["gt_boxes"], feats["gt_labels"])

    method_requires = ("image_index", "boxes", "box_labels", "no_object", "gt_image_index", "gt_boxes", "gt_labels")

    def method_metrics(self, method, scores, feats, oods, threshold):
        """Open-set figures of a box-level method (:mod:`larex.openset_metrics`) per OOD set, on ID test + that
        set's images: boxes accepted as known when their score >= the ID-val threshold; unknown objects are the
        OOD set's ground-truth objects labelled -1 (``a_ose``, ``unknown_recall``, ``wilderness_impact``)."""
        if getattr(method, "score_axis", None) != "box":
            return {}
        from larex.openset_metrics import openset_metrics

        test = _images(feats("test"), scores["test"])
        out = {}
        for ood in oods:
            figs = openset_metrics(test + _images(feats(f"ood/{ood}"), scores[f"ood/{ood}"]), float(threshold),
                                   float(self.boxes.get("match_iou", 0.5)))
            out[ood] = {k: figs[k] for k in ("a_ose", "unknown_recall", "wilderness_impact")}
        return out

    def plots(self, directory, all_scores, feats, images, oods, thresholds, per_split: int = 4):
        """Per box-level method, ``boxes_<method>.png``: ``per_split`` images of ID test and of each OOD set (the
        first images with boxes) with their boxes coloured by the method's score, dashed below its threshold."""
        from pathlib import Path

        from larex import plots

        out = []
        for name, scores in all_scores.items():
            if not name.startswith("box."):
                continue
            panels = []
            for split in ["test", *(f"ood/{o}" for o in oods)]:
                f = feats(split)
                idx = np.asarray(f["image_index"])
                rows = [int(r) for r in np.unique(idx)[:per_split]]
                for r, img in zip(rows, images(split, rows)):
                    sel = idx == r
                    panels.append((img, np.asarray(f["boxes"])[sel], np.asarray(scores[split])[sel],
                                   f"{split} #{r}"))
            if panels:
                val = np.asarray(scores["val"], dtype=np.float64)
                limits = (float(np.quantile(val, 0.01)), float(val.max())) if val.size else None
                out.append(plots.boxes_figure(panels, f"{name}: boxes by OOD score", Path(directory) /
                                              f"boxes_{name}.png", thresholds.get(name), limits))
        return out

    report_keys = ("image_index", "boxes", "box_scores", "box_labels", "no_object")

    def blank_target(self):
        import torch

        return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}

    def report_columns(self, feats):
        """Box rows: the image (position in the batch), xyxy in the original image's pixels, predicted class and
        confidence; image rows: their box count and the no-object flag."""
        boxes = np.asarray(feats["boxes"]).reshape(-1, 4)
        idx = np.asarray(feats["image_index"], dtype=np.int64)
        n = int(np.asarray(feats["no_object"]).shape[0])
        return {"box": {"image": idx, "x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3],
                        "label": np.asarray(feats["box_labels"], dtype=np.int64),
                        "confidence": np.asarray(feats["box_scores"], dtype=np.float64)},
                "image": {"boxes": np.bincount(idx, minlength=n), "no_object": np.asarray(feats["no_object"]) > 0}}

    def split_metrics(self, feats):
        """Count and share of the split's images without a box above ``predict_conf``."""
        if "no_object" not in feats:
            return {}
        no = np.asarray(feats["no_object"]).astype(bool)
        return {"no_object_images": float(no.sum()), "no_object_share": float(no.mean()) if len(no) else float("nan")}


def _images(feats, box_scores) -> list[dict]:
    """Per image of a split, its predictions (boxes, labels, OOD scores) and ground truth, for the open-set
    figures (box rows are stored in image order; the split is cut at each image's first row)."""
    import torch

    n = int(np.asarray(feats["no_object"]).shape[0])
    cut = lambda idx: np.searchsorted(np.asarray(idx), np.arange(1, n))  # noqa: E731  (rows link to 0..n-1)
    pb, pl = np.split(np.asarray(feats["boxes"]), cut(feats["image_index"])), \
        np.split(np.asarray(feats["box_labels"]), cut(feats["image_index"]))
    ps = np.split(np.asarray(box_scores, dtype=np.float64), cut(feats["image_index"]))
    gb, gl = np.split(np.asarray(feats["gt_boxes"]), cut(feats["gt_image_index"])), \
        np.split(np.asarray(feats["gt_labels"]), cut(feats["gt_image_index"]))
    return [{"pred_boxes": torch.as_tensor(b).reshape(-1, 4), "pred_labels": torch.as_tensor(lab),
             "pred_scores": torch.as_tensor(sc), "gt_boxes": torch.as_tensor(g).reshape(-1, 4),
             "gt_labels": torch.as_tensor(gla), "gt_known": torch.as_tensor(gla >= 0)}
            for b, lab, sc, g, gla in zip(pb, pl, ps, gb, gl)]
