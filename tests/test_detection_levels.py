"""Box- and image-level views of the postprocessors, the box -> image reductions, the no-object policy, and COCO
mAP on hand-made detections."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from larex.postprocessors.logits import MSP
from larex.postprocessors.lared import LaRED
from larex.tasks.detection import Detection
from larex.tasks.detection.levels import BoxView, ImageFromBoxes, reduce_boxes
from larex.tasks.detection.map import coco_map


def _boxes(rng, n_images, no_object=(), c=3):
    counts = rng.integers(1, 5, size=n_images)
    counts[list(no_object)] = 0
    idx = np.repeat(np.arange(n_images), counts)
    return {"image_index": idx, "box_logits": rng.normal(size=(len(idx), c)) * 3,
            "box_scores": rng.uniform(0.1, 1, size=len(idx)),
            "no_object": (counts == 0).astype(np.uint8)}


@pytest.mark.parametrize("reduction", ["min", "mean", "max", "score_weighted"])
def test_reduce_boxes_matches_a_groupby(reduction):
    rng = np.random.default_rng(0)
    f = _boxes(rng, 12, no_object=(3, 7))
    s = rng.normal(size=len(f["image_index"]))
    got, has = reduce_boxes(s, f["image_index"], 12, reduction, f["box_scores"])
    df = pd.DataFrame({"i": f["image_index"], "s": s, "w": f["box_scores"]})
    if reduction == "score_weighted":
        ref = df.assign(ws=df.s * df.w).groupby("i").apply(lambda g: g.ws.sum() / g.w.sum(), include_groups=False)
    else:
        ref = getattr(df.groupby("i").s, reduction)()
    np.testing.assert_array_equal(has, f["no_object"] == 0)
    np.testing.assert_allclose(got[has], ref.to_numpy(), rtol=1e-12)
    assert (got[~has] == 0).all()


def test_box_view_renames_keys_and_scores_every_box():
    rng = np.random.default_rng(1)
    fit, test = _boxes(rng, 20), _boxes(rng, 8)
    view = BoxView(MSP()).fit(fit)
    assert view.requires == ("box_logits",) and view.score_axis == "box" and view.name == "box.msp"
    ref = MSP().fit({"logits": fit["box_logits"]}).score({"logits": test["box_logits"]})
    np.testing.assert_array_equal(view.score(test), ref)
    lared = BoxView(LaRED(pca=None, bandwidth=1.0))
    assert lared.requires == ("box_entropy",)


def test_image_from_boxes_no_object_policies():
    rng = np.random.default_rng(2)
    fit, val, test = _boxes(rng, 30), _boxes(rng, 10, no_object=(4,)), _boxes(rng, 9, no_object=(0, 5))
    img = ImageFromBoxes(BoxView(MSP()), "min", "val_min").fit(fit, val)
    box_val = MSP().fit({"logits": fit["box_logits"]}).score({"logits": val["box_logits"]})
    val_img = pd.Series(box_val).groupby(val["image_index"]).min()
    assert img.no_object_value_ == pytest.approx(val_img.min())  # images with boxes only
    s = img.score(test)
    assert s.shape == (9,) and s[0] == s[5] == img.no_object_value_
    box_test = MSP().fit({"logits": fit["box_logits"]}).score({"logits": test["box_logits"]})
    ref = pd.Series(box_test).groupby(test["image_index"]).min()
    np.testing.assert_allclose(s[ref.index.to_numpy()], ref.to_numpy())
    fixed = ImageFromBoxes(BoxView(MSP()), "mean", "fixed", -7.5).fit(fit, val)
    assert fixed.score(test)[[0, 5]].tolist() == [-7.5, -7.5]
    with pytest.raises(ValueError, match="no_object_score"):
        ImageFromBoxes(BoxView(MSP()), "mean", "fixed")
    with pytest.raises(ValueError, match="reduction"):
        ImageFromBoxes(BoxView(MSP()), "median")


def test_detection_task_expands_each_method_to_box_and_image_level():
    task = Detection()
    views = task.expand_methods({"lared": LaRED(), "msp": MSP()},
                                lambda n: {"lared": LaRED, "msp": MSP}[n]())
    assert list(views) == ["box.lared", "image.lared", "box.msp", "image.msp"]
    assert views["image.lared"][0].requires == ("entropy",)  # the image-level MC features (LaREx protocol)
    assert isinstance(views["image.msp"][0], ImageFromBoxes)
    assert {base for _, base in views.values()} == {"lared", "msp"}
    from larex.postprocessors.mc_dropout import MCDEntropy

    with pytest.raises(ValueError, match="mc_logits"):
        task.expand_methods({"mcd": MCDEntropy()}, lambda n: MCDEntropy())


def test_coco_map_on_hand_made_detections():
    gt_idx = np.array([0, 0, 1])
    gt_boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 25, 25]], dtype=np.float64)
    gt_labels = np.array([0, 1, 0])
    perfect = coco_map(2, gt_idx, gt_boxes, np.ones(3), gt_labels, gt_idx, gt_boxes, gt_labels)
    assert perfect == pytest.approx({"map": 1.0, "map50": 1.0, "map75": 1.0})
    # class 0: one of its two objects found (the other box is far off) -> AP 0.5 on the 101-point recall grid
    # (precision 1 up to recall 0.5: 51 of 101 points); class 1 found exactly -> AP 1; mean 0.752475...
    boxes = gt_boxes.copy()
    boxes[2] = [60, 60, 80, 80]
    half = coco_map(2, gt_idx, boxes, np.array([0.9, 0.8, 0.7]), gt_labels, gt_idx, gt_boxes, gt_labels)
    assert half["map50"] == pytest.approx((51 / 101 + 1) / 2)
    # unknown objects (-1) are not scored
    unk = coco_map(2, gt_idx[:2], gt_boxes[:2], np.ones(2), gt_labels[:2], gt_idx, gt_boxes, np.array([0, 1, -1]))
    assert unk["map50"] == pytest.approx(1.0)


def test_box_view_fits_on_a_seeded_subset_of_at_most_fit_boxes():
    rng = np.random.default_rng(3)
    fit, test = _boxes(rng, 40), _boxes(rng, 5)
    n = len(fit["image_index"])
    capped = BoxView(LaRED(pca=None, bandwidth=1.0, standardize=False), fit_boxes=20, seed=4)
    feats = {"box_entropy": rng.normal(size=(n, 3))}
    capped.fit(feats)
    keep = np.sort(np.random.default_rng(4).choice(n, size=20, replace=False))
    ref = LaRED(pca=None, bandwidth=1.0, standardize=False).fit({"entropy": feats["box_entropy"][keep]})
    q = {"box_entropy": rng.normal(size=(7, 3))}
    np.testing.assert_allclose(capped.score(q), ref.score({"entropy": q["box_entropy"]}))
    with pytest.raises(ValueError, match="fit_boxes"):
        Detection(fit_boxes=0)


def test_scoring_settings_change_method_hashes_not_the_extraction():
    from hydra import compose, initialize_config_module

    from larex.stages.common import prepare

    base = ["task=detection", "dataset=shapes", "model=yolov8", "hooked_layer=yolov8_sppf", "baselines=[msp]"]
    with initialize_config_module(config_module="larex.configs", version_base="1.3"):
        runs = [prepare(compose("run", overrides=base + extra)) for extra in
                ([], ["task.image_score.reduction=mean"], ["task.boxes.predict_conf=0.1"])]
    assert runs[0].layout.extract_hash == runs[1].layout.extract_hash == runs[2].layout.extract_hash
    assert runs[0].method_hash("image.msp") != runs[1].method_hash("image.msp")  # rescored, not re-extracted
    assert runs[0].plan.parts["boxes"] == runs[1].plan.parts["boxes"] != runs[2].plan.parts["boxes"]
    assert runs[0].method_hash("box.msp") != runs[2].method_hash("box.msp")


def test_whole_image_policy_scores_no_object_images_on_their_whole_image_box():
    from larex.postprocessors.knn import KNN

    rng = np.random.default_rng(5)
    fit, val, test = _boxes(rng, 30), _boxes(rng, 10), _boxes(rng, 9, no_object=(2, 6))
    for f in (fit, val, test):
        f["roi_features"] = rng.normal(size=(len(f["image_index"]), 4))
        f["whole_roi_features"] = rng.normal(size=(len(f["no_object"]), 4))
    img = ImageFromBoxes(BoxView(KNN(k=3)), "mean", "whole_image").fit(fit, val)
    assert "whole_roi_features" in img.requires and "whole_roi_features" not in img.fit_requires
    s = img.score(test)
    ref = KNN(k=3).fit({"penultimate": fit["roi_features"]})
    np.testing.assert_allclose(s[[2, 6]], ref.score({"penultimate": test["whole_roi_features"][[2, 6]]}))
    box = pd.Series(ref.score({"penultimate": test["roi_features"]})).groupby(test["image_index"]).mean()
    np.testing.assert_allclose(s[box.index.to_numpy()], box.to_numpy())
    with pytest.raises(ValueError, match="whole_image"):
        ImageFromBoxes(BoxView(MSP()), "min", "whole_image")


def test_head_methods_read_the_detectors_head_and_its_input_per_box():
    """ViM at box level = ViM on (box_penultimate, box_logits, box_head.*): the detector's own head, whose input
    maps to the box logits; fit_boxes subsets the box rows, never the head; box_features=head moves the other
    feature methods onto box_penultimate too; the whole-image box (RoI features) is refused for head methods."""
    from larex.postprocessors.mahalanobis import Mahalanobis
    from larex.postprocessors.vim import ViM

    rng = np.random.default_rng(5)
    w, b = rng.normal(size=(3, 12)), rng.normal(size=3)

    def split(n_images, shift=0.0):
        f = _boxes(rng, n_images)
        f["box_penultimate"] = rng.normal(size=(len(f["image_index"]), 12)) + shift
        f["box_logits"] = f["box_penultimate"] @ w.T + b
        f["roi_features"] = rng.normal(size=(len(f["image_index"]), 5))
        return {**f, "box_head.weight": w, "box_head.bias": b}

    fit, test = split(60), split(10, shift=3.0)
    view = BoxView(ViM(dim=4), fit_boxes=50, seed=1)
    assert view.requires == ("box_penultimate", "box_logits", "box_head.weight", "box_head.bias")
    view.fit(fit)
    keep = np.sort(np.random.default_rng(1).choice(len(fit["image_index"]), size=50, replace=False))
    ref = ViM(dim=4).fit({"penultimate": fit["box_penultimate"][keep], "logits": fit["box_logits"][keep],
                          "head.weight": w, "head.bias": b})
    want = ref.score({"penultimate": test["box_penultimate"], "logits": test["box_logits"], "head.weight": w,
                      "head.bias": b})
    np.testing.assert_allclose(view.score(test), want, rtol=1e-12)
    np.testing.assert_allclose(view.inner.origin_, -np.linalg.pinv(w) @ b)  # the head's own origin

    assert BoxView(Mahalanobis()).requires == ("roi_features",)
    assert BoxView(Mahalanobis(), features="head").requires == ("box_penultimate",)
    with pytest.raises(ValueError, match="box_features"):
        Detection(box_features="penultimate")
    with pytest.raises(ValueError, match="whole_image"):
        ImageFromBoxes(BoxView(ViM()), "min", "whole_image")
    with pytest.raises(ValueError, match="whole_image"):
        ImageFromBoxes(BoxView(Mahalanobis(), features="head"), "min", "whole_image")
