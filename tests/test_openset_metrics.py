"""Open-set detection metrics (larex.openset_metrics) on hand-built images with counted answers."""
from __future__ import annotations

import math

import torch

from larex.openset_metrics import match, openset_metrics


def _t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def test_greedy_matching_by_score():
    gt = _t([[0, 0, 10, 10], [100, 100, 110, 110]])
    preds = _t([[1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]])
    # the higher-scored prediction takes the object even with the lower IoU; the other stays unmatched
    assert match(preds, _t([0.9, 0.5, 0.99]), gt).tolist() == [0, -1]
    assert match(preds, _t([0.5, 0.9, 0.99]), gt).tolist() == [1, -1]
    assert match(preds, _t([0.5, 0.9, 0.99]), gt, iou=0.99).tolist() == [1, -1]  # IoU 1.0 still matches
    assert match(preds[:0], _t([]), gt).tolist() == [-1, -1]
    assert match(preds, _t([1, 2, 3]), gt[:0]).tolist() == []


def test_openset_figures_on_a_counted_example():
    known_only = {  # two known objects; one right prediction, one wrong label, one flagged background box
        "gt_boxes": _t([[0, 0, 10, 10], [20, 20, 30, 30]]), "gt_labels": _t([0, 1], torch.int64),
        "gt_known": _t([True, True], torch.bool),
        "pred_boxes": _t([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]]),
        "pred_labels": _t([0, 0, 1], torch.int64), "pred_scores": _t([0.9, 0.8, 0.2])}
    mixed = {  # unknown taken for known (A-OSE), a known hit, an unknown flagged, an accepted background box
        "gt_boxes": _t([[0, 0, 10, 10], [40, 40, 50, 50], [70, 70, 80, 80]]), "gt_labels": _t([5, 1, 6], torch.int64),
        "gt_known": _t([False, True, False], torch.bool),
        "pred_boxes": _t([[0, 0, 10, 10], [40, 40, 50, 50], [70, 70, 80, 80], [90, 90, 99, 99]]),
        "pred_labels": _t([0, 1, 2, 0], torch.int64), "pred_scores": _t([0.7, 0.95, 0.1, 0.6])}
    m = openset_metrics([known_only, mixed], threshold=0.5)
    assert m["a_ose"] == 1 and m["unknown_recall"] == 0.5 and (m["n_unknown"], m["n_known"]) == (2, 3)
    assert m["precision_known_images"] == 0.5 and m["precision_all_images"] == 2 / 5
    assert math.isclose(m["wilderness_impact"], 0.5 / 0.4 - 1)
    # a stricter threshold flags the unknown-object hit as well: no open-set error, full unknown recall
    strict = openset_metrics([known_only, mixed], threshold=0.75)
    assert strict["a_ose"] == 0 and strict["unknown_recall"] == 1.0
    # known-only images: 1 of 2 accepted right (the wrong label stays); all images: 2 of 3
    assert strict["precision_known_images"] == 0.5 and math.isclose(strict["precision_all_images"], 2 / 3)
    assert math.isclose(strict["wilderness_impact"], 0.5 / (2 / 3) - 1)
    none = openset_metrics([known_only], threshold=0.5)
    assert math.isnan(none["unknown_recall"]) and none["wilderness_impact"] == 0.0


def test_images_without_predictions_count_their_objects_as_missed():
    empty = {"gt_boxes": _t([[0, 0, 10, 10], [20, 20, 30, 30]]), "gt_labels": _t([-1, 0], torch.int64),
             "gt_known": _t([False, True], torch.bool), "pred_boxes": torch.zeros(0, 4),
             "pred_labels": torch.zeros(0, dtype=torch.int64), "pred_scores": torch.zeros(0)}
    hit = {"gt_boxes": _t([[0, 0, 10, 10]]), "gt_labels": _t([-1], torch.int64), "gt_known": _t([False], torch.bool),
           "pred_boxes": _t([[0, 0, 10, 10]]), "pred_labels": _t([0], torch.int64), "pred_scores": _t([0.1])}
    m = openset_metrics([empty, hit], threshold=0.5)
    assert (m["n_unknown"], m["n_known"], m["a_ose"]) == (2, 1, 0)
    assert m["unknown_recall"] == 0.5  # the flagged hit; the object of the empty image is missed
