"""Open-set detection metrics: what happens to objects of classes the detector never learned.

Every image holds predictions (boxes, a known-class label, an OOD score: higher = more in-distribution) and
ground truth (boxes, labels, and whether each object's class is known). A prediction is *accepted* as a known
object when its OOD score is at least the threshold (chosen on ID val), else *flagged* unknown.

* Matching (:func:`match`): per image, predictions in descending OOD score each take the still-unmatched ground
  truth with the highest IoU >= ``iou`` (greedy, as COCO evaluation matches).
* ``a_ose`` (absolute open-set error, Miller et al., ICRA 2018): unknown objects matched by an accepted
  prediction -- an unknown object taken for a known class.
* ``unknown_recall``: unknown objects matched by a flagged prediction, over all unknown objects (the U-Recall
  of open-world detection).
* ``wilderness_impact`` (Dhamija et al., WACV 2020): ``P_K / P_KU - 1``, the precision of accepted predictions
  on the known-only images (``P_K``: true positive = matches a known object of its label) over that precision on
  all images (``P_KU``: accepted predictions on unknown objects or background are false positives too).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchvision.ops import box_iou


def match(pred_boxes: torch.Tensor, order_scores: torch.Tensor, gt_boxes: torch.Tensor, iou: float = 0.5
          ) -> torch.Tensor:
    """Index of the prediction matched to each ground-truth box ([G] int64, -1 = unmatched), greedy in
    descending ``order_scores`` (ties: the earlier prediction), each prediction taking the unmatched ground truth
    of highest IoU >= ``iou``."""
    g = gt_boxes.shape[0]
    out = torch.full((g,), -1, dtype=torch.int64)
    if g == 0 or pred_boxes.shape[0] == 0:
        return out
    ious = box_iou(pred_boxes.double(), gt_boxes.double())  # [P, G]
    order = torch.argsort(-order_scores.double(), stable=True)
    taken = torch.zeros(g, dtype=torch.bool)
    for p in order.tolist():  # per image: a few dozen predictions, each one pass over the G ground truths
        cand = ious[p].masked_fill(taken, -1.0)
        best = int(torch.argmax(cand))
        if cand[best] >= iou:
            taken[best] = True
            out[best] = p
    return out


def openset_metrics(images: Sequence[Mapping[str, torch.Tensor]], threshold: float, iou: float = 0.5
                    ) -> dict[str, float]:
    """Open-set figures over ``images``, each a mapping with ``pred_boxes`` [P, 4], ``pred_labels`` [P],
    ``pred_scores`` [P] (OOD score, higher = more ID), ``gt_boxes`` [G, 4], ``gt_labels`` [G] and ``gt_known``
    [G] bool. An image with no unknown object counts as known-only for ``P_K``.

    Returns ``a_ose``, ``unknown_recall`` (NaN without unknown objects), ``wilderness_impact`` (NaN when a
    precision is undefined), ``n_unknown``, ``n_known``, ``precision_known_images``, ``precision_all_images``."""
    a_ose = flagged_hits = n_unknown = n_known = 0
    tp_k = acc_k = tp_all = acc_all = 0
    for im in images:
        pb, pl, ps = im["pred_boxes"], im["pred_labels"].long(), im["pred_scores"].double()
        gb, gl, gk = im["gt_boxes"], im["gt_labels"].long(), im["gt_known"].bool()
        if not (pb.shape[0] == pl.shape[0] == ps.shape[0]) or not (gb.shape[0] == gl.shape[0] == gk.shape[0]):
            raise ValueError("openset_metrics: every image needs pred_boxes/pred_labels/pred_scores of one length "
                             "and gt_boxes/gt_labels/gt_known of one length")
        accepted = ps >= threshold
        m = match(pb, ps, gb, iou)
        hit = m >= 0
        unknown = ~gk
        n_unknown += int(unknown.sum())
        n_known += int(gk.sum())
        if pb.shape[0]:  # per ground-truth object: is its matched prediction accepted, and of its label?
            acc_m, same = accepted[m.clamp(min=0)], pl[m.clamp(min=0)] == gl
        else:  # no prediction: nothing matched
            acc_m = same = torch.zeros(gb.shape[0], dtype=torch.bool)
        a_ose += int((unknown & hit & acc_m).sum())
        flagged_hits += int((unknown & hit & ~acc_m).sum())
        # true positives: accepted predictions matched to a known object of their own label
        tp = int((gk & hit & acc_m & same).sum())
        acc = int(accepted.sum())
        tp_all += tp
        acc_all += acc
        if not bool(unknown.any()):
            tp_k += tp
            acc_k += acc
    p_k = tp_k / acc_k if acc_k else float("nan")
    p_ku = tp_all / acc_all if acc_all else float("nan")
    wi = p_k / p_ku - 1.0 if acc_k and acc_all and p_ku > 0 else float("nan")
    return {"a_ose": float(a_ose), "unknown_recall": flagged_hits / n_unknown if n_unknown else float("nan"),
            "wilderness_impact": float(wi), "n_unknown": float(n_unknown), "n_known": float(n_known),
            "precision_known_images": float(p_k), "precision_all_images": float(p_ku)}


__all__ = ["match", "openset_metrics"]
