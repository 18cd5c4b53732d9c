"""torchvision Faster R-CNN (larex.models.detection.torchvision_rcnn): detect() reproduces torchvision's own
post-processing and returns each box's class logits; MobileNetV3-FPN and ResNet-50-FPN through the console
scripts on the generated shapes set (random init, calibrated BatchNorm: tests/_detection_rcnn.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file

from _cli import cli
from _detection_rcnn import FAST, calibrated_rcnn, calibrated_rcnn_weights, shapes_batch

SIZE = 128


@pytest.fixture(scope="module")
def mobilenet():
    return calibrated_rcnn("mobilenet_v3_large_fpn", image_size=SIZE, min_size=SIZE, max_size=SIZE, **FAST)


def _torchvision_detections(m, x, conf, iou, max_det):
    heads = m.model.roi_heads
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = conf, iou, max_det
    with torch.no_grad():
        return m.model(list(x))  # torchvision's whole path: transform, backbone, rpn, roi_heads, postprocess


def test_transform_leaves_fixed_size_inputs_unchanged(mobilenet):
    x = shapes_batch(2, SIZE, seed=3)
    images, _ = mobilenet.model.transform(list(x))
    assert torch.equal(images.tensors, x) and images.image_sizes == [(SIZE, SIZE)] * 2
    with pytest.raises(ValueError, match="multiples of 32"):
        mobilenet(torch.zeros(1, 3, SIZE + 8, SIZE))


@pytest.mark.parametrize("conf,iou,max_det", [(0.05, 0.5, 20), (None, 0.3, 100)])
def test_detect_equals_torchvision_postprocessing(mobilenet, conf, iou, max_det):
    x = shapes_batch(4, SIZE, seed=7)
    if conf is None:  # a threshold that drops about half of the candidates, so max_det does not bind
        conf = float(mobilenet.detect(x, conf=0.0, iou=iou, max_det=100).scores.median())
    det = mobilenet.detect(x, conf=conf, iou=iou, max_det=max_det)
    ref = _torchvision_detections(mobilenet, x, conf, iou, max_det)
    counts = torch.bincount(det.image_index, minlength=len(x))
    assert counts.tolist() == [len(r["boxes"]) for r in ref] and len(det) > 0
    assert (counts < max_det).any() or conf == 0.05  # the second case filters by score, not by max_det
    for i, r in enumerate(ref):
        own = det.image_index == i
        torch.testing.assert_close(det.boxes[own], r["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(det.scores[own], r["scores"])
        assert torch.equal(det.labels[own] + 1, r["labels"])  # torchvision's label 0 is the background
    assert det.logits.shape == (len(det), 3) and (det.scores > conf).all()
    # non-degenerate: boxes and scores differ between images
    assert not torch.allclose(det.boxes[det.image_index == 0][:3], det.boxes[det.image_index == 1][:3])
    assert det.scores.std() > 1e-4

    # each logits row is its proposal's cls_score row without the background; softmax over all C + 1 logits
    # (background included) gives the box's score at its label
    with torch.no_grad():
        out = mobilenet(x)
    full = out["class_logits"]
    match = (full[None, :, 1:] == det.logits[:, None, :]).all(-1)  # [K, P]
    assert match.any(1).all()
    row = full[match.float().argmax(1)]
    probs = torch.softmax(row, -1)
    torch.testing.assert_close(probs.gather(1, det.labels[:, None] + 1)[:, 0], det.scores)


# -------------------------------------------------------------------------------------------- console scripts
DET = ["task=detection", "dataset=shapes", "progress=false", f"dataset.image_size={SIZE}", "task.boxes.max_det=5",
       "task.boxes.nms_iou=0.5", "extract.batch_size=4", "hooked_layer.mc_samples=4", "postprocessor.lared.pca=4",
       "postprocessor.larem.pca=4", "device=cpu", "+ood=[shapes_near]", "baselines=[msp]",
       *(f"model.net.{k}={v}" for k, v in FAST.items())]


def _parts(split_dir, name):
    return {k: v for p in split_dir.glob(f"{name}-*") for f in sorted(p.glob("shard-*.safetensors"))
            for k, v in load_file(str(f)).items()}


def test_faster_rcnn_mobilenet_through_the_console_scripts(tmp_path):
    weights = calibrated_rcnn_weights("mobilenet_v3_large_fpn", tmp_path / "rcnn.safetensors", image_size=SIZE)
    out = tmp_path / "out"
    args = [*DET, f"output_root={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", "model=faster_rcnn_mobilenet",
            "hooked_layer=faster_rcnn_mobilenet_last_conv", f"model.net.weights={weights}", "limit.fit=16",
            "limit.val=8", "limit.test=8", "limit.ood=8", "task.boxes.predict_conf=0.3",
            "baselines=[msp,vim,react]", "baselines.vim.dim=8"]
    cli("larex-run", *args, cwd=tmp_path)  # one process for the stages (the YOLOv8 test runs them one by one)
    layer = out / "detection" / "shapes" / "faster_rcnn_mobilenet" / "last_conv"
    extract = next(layer.glob("extract-*"))
    seen = {}
    for split, n in (("fit", 16), ("val", 8), ("test", 8), ("ood/shapes_near", 8)):
        boxes, mc = _parts(extract / split, "boxes"), _parts(extract / split, "mc")
        m = len(boxes["box_scores"])
        assert boxes["no_object"].shape == (n,) and len(boxes["image_index"]) == len(boxes["boxes"]) == m
        assert boxes["roi_latent"].shape == (m, 4, 960)  # boxes x S x the last conv's 960 channels
        assert boxes["box_logits"].shape == (m, 3) and (boxes["box_scores"] > 0.3).all()
        assert (boxes["boxes"] >= 0).all() and (boxes["boxes"] <= 160).all()  # original 160-px frame
        has = np.zeros(n, bool)
        has[boxes["image_index"]] = True  # image_index: the image's row in the split
        assert np.array_equal(boxes["no_object"] == 0, has)  # no-object flags = images without box rows
        assert m == 0 or np.bincount(boxes["image_index"]).max() <= 5  # max_det
        assert mc["latent"].shape == (n, 4, 960)
        assert np.ptp(mc["latent"], axis=1).max() > 0  # the inserted DropBlock varies the MC samples
        seen[split] = boxes["no_object"]
        # the box head's input: the box predictor's cls_score (without the background) maps it to box_logits
        head = load_file(str(next(extract.rglob("box_head-*.safetensors"))))
        np.testing.assert_allclose(boxes["box_penultimate"] @ head["box_head.weight"].T + head["box_head.bias"],
                                   boxes["box_logits"], rtol=1e-4, atol=1e-4)
        assert boxes["box_penultimate"].shape == (m, 1024) and head["box_head.weight"].shape == (3, 1024)
    flags = np.concatenate(list(seen.values()))
    assert 0 < flags.mean() < 1  # images with and without boxes above predict_conf
    df = pd.read_csv(layer / "latest" / "metrics.csv")
    assert set(df["method"]) == {f"{lv}.{m}" for lv in ("box", "image") for m in ("lared", "larem", "msp", "vim",
                                                                                  "react")}
    rows = df[df["ood"] == "shapes_near"]
    assert rows["auroc"].between(0, 1).all() and np.isfinite(rows["threshold"]).all()
    # no-object images are counted, not dropped: the table's shares are those of the stored flags
    assert rows["id_no_object_share"].iloc[0] == pytest.approx(seen["test"].mean())
    assert rows["ood_no_object_share"].iloc[0] == pytest.approx(seen["ood/shapes_near"].mean())


@pytest.mark.slow  # ResNet-50-FPN: the MobileNetV3 test above covers the family in make test
def test_faster_rcnn_resnet50_extracts_box_and_image_features(tmp_path):
    weights = calibrated_rcnn_weights("resnet50_fpn", tmp_path / "rcnn.safetensors", image_size=SIZE)
    out = tmp_path / "out"
    args = [*DET, f"output_root={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", "model=faster_rcnn",
            "hooked_layer=faster_rcnn_layer4", f"model.net.weights={weights}", "task.boxes.predict_conf=0",
            "limit.fit=4", "limit.val=4", "limit.test=4", "limit.ood=4", "extract.batch_size=2"]
    cli("larex-extract", *args, cwd=tmp_path)
    extract = next((out / "detection" / "shapes" / "faster_rcnn" / "layer4").glob("extract-*"))
    boxes, mc = _parts(extract / "test", "boxes"), _parts(extract / "test", "mc")
    assert boxes["roi_latent"].shape == (20, 4, 2048)  # 4 images x max_det 5, layer4's 2048 channels
    assert boxes["box_logits"].shape == (20, 3) and (boxes["no_object"] == 0).all()
    assert mc["latent"].shape == (4, 4, 2048) and np.ptp(mc["latent"], axis=1).max() > 0


def test_fpn_levels_give_concatenated_image_features_and_level0_box_features():
    """hooked_layer=faster_rcnn_fpn: one DropBlock per FPN level; the image latent = the per-level channel means
    concatenated (3 x 256 for MobileNetV3-FPN), the shared-prefix MC equals S full passes, an image alone equals
    the same image in a batch; box features RoIAlign level "0"."""
    import copy

    from larex.extraction.mc import mc_modules
    from larex.extraction.producers.boxes import Boxes
    from larex.extraction.producers.monte_carlo import MonteCarlo
    from larex.models.detection.base import insert_mc_layer

    m = insert_mc_layer(copy.deepcopy(calibrated_rcnn("mobilenet_v3_large_fpn", image_size=SIZE, min_size=SIZE,
                                                      max_size=SIZE, **FAST)), "model.backbone.fpn", levels=3).eval()
    assert len(mc_modules(m)) == 3
    x = shapes_batch(3, SIZE)
    idx = torch.arange(3)
    shared = MonteCarlo("model.backbone.fpn", 4, keys=("latent",), seed=1).produce(m, x, None, idx)["latent"]
    full = MonteCarlo("model.backbone.fpn", 4, keys=("latent",), seed=1, share_prefix=False).produce(
        m, x, None, idx)["latent"]
    alone = MonteCarlo("model.backbone.fpn", 4, keys=("latent",), seed=1).produce(m, x[1:2], None, idx[:1])["latent"]
    assert shared.shape == (3, 4, 768)
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone[0], shared[1], rtol=0, atol=1e-5)
    with torch.no_grad():
        levels = m.model.backbone(x)  # eval: the inserted layers are the identity
    want = torch.cat([v.mean((2, 3)) for v in levels.values()], 1)
    plain = MonteCarlo("model.backbone.fpn", 2, keys=("latent",), seed=1, drop_prob=0.0).produce(
        m, x, None, idx)["latent"]  # no drop: every sample = the levels' channel means, in level order
    torch.testing.assert_close(plain, want[:, None].expand_as(plain), rtol=0, atol=1e-5)
    assert float(shared.std(1).mean()) > 0  # the levels' masks vary the samples
    boxes = Boxes("model.backbone.fpn", keys=("roi_features", "roi_latent"), predict_conf=0.0, max_det=5,
                  mc_samples=4)
    boxes.setup(m)
    y = [{"transform": torch.tensor([1.0, 1.0, 0.0, 0.0, SIZE, SIZE], dtype=torch.float64)}] * 3
    out = boxes.produce(m, x, y, idx)
    assert out["roi_features"].shape[1] == 256 and out["roi_latent"].shape[1:] == (4, 256)
