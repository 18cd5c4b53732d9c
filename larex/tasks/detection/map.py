"""COCO mAP of a split's detections with pycocotools (the detector's own ID accuracy, like classification's
accuracy): ``map`` (AP at IoU 0.50:0.95), ``map50``, ``map75``. Inputs are the flat box and ground-truth rows of a
split (original-image xyxy pixels); objects labelled -1 (unknown) are not scored."""
from __future__ import annotations

import contextlib
import io

import numpy as np


def coco_map(n_images: int, image_index: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
             gt_image_index: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray) -> dict[str, float]:
    """``{"map", "map50", "map75"}`` (NaN without a known ground-truth object)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    known = np.asarray(gt_labels) >= 0
    if not known.any():
        return {"map": float("nan"), "map50": float("nan"), "map75": float("nan")}

    def xywh(b):
        b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
        return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)

    gb, gl, gi = xywh(gt_boxes)[known], np.asarray(gt_labels)[known], np.asarray(gt_image_index)[known]
    classes = sorted(set(gl.tolist()) | set(np.asarray(labels).tolist()))
    gt = {"images": [{"id": int(i)} for i in range(n_images)],
          "categories": [{"id": int(c) + 1} for c in classes],
          "annotations": [{"id": k + 1, "image_id": int(gi[k]), "category_id": int(gl[k]) + 1,
                           "bbox": gb[k].tolist(), "area": float(gb[k, 2] * gb[k, 3]), "iscrowd": 0}
                          for k in range(len(gl))]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if len(scores) == 0:
            return {"map": 0.0, "map50": 0.0, "map75": 0.0}
        pb = xywh(boxes)
        dets = np.column_stack([np.asarray(image_index, dtype=np.float64), pb, np.asarray(scores, np.float64),
                                np.asarray(labels, dtype=np.float64) + 1])
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.maxDets = [1, 10, max(100, int(np.bincount(np.asarray(image_index, np.int64)).max()))]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": float(max(ev.stats[0], 0.0)), "map50": float(max(ev.stats[1], 0.0)),
            "map75": float(max(ev.stats[2], 0.0))}
