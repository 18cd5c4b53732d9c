"""The generated detection set (larex.data.shapes): deterministic per item, boxes valid and apart, OOD variants."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from larex.data.shapes import SHAPES, ShapesDetection


def test_items_depend_on_seed_and_index_only():
    ds = ShapesDetection(length=20, seed=3)
    a_img, a_t = ds[7]
    b_img, b_t = ShapesDetection(length=50, seed=3)[7]  # another length, same item
    assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"]) and a_t["image_id"] == 7
    assert not torch.equal(ShapesDetection(length=20, seed=4)[7][0], a_img)
    assert a_img.shape == (3, 160, 160) and a_img.dtype == torch.float32
    assert float(a_img.min()) >= 0.0 and float(a_img.max()) <= 1.0
    with pytest.raises(IndexError):
        ds[20]


@pytest.mark.parametrize("background", ["texture", "stripes", "flat"])
def test_boxes_inside_apart_and_labelled(background):
    ds = ShapesDetection(length=40, classes=("circle", "square", "triangle"), background=background,
                         image_size=96, objects=(1, 4), max_iou=0.2, seed=0)
    counts = []
    for i in range(len(ds)):
        img, t = ds[i]
        b, lab = t["boxes"], t["labels"]
        counts.append(len(b))
        assert b.shape == (len(lab), 4) and lab.dtype == torch.int64
        assert ((lab >= 0) & (lab < 3)).all()
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 96).all() and (b[:, 3] <= 96).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        if len(b) > 1:  # torchvision's IoU, an independent implementation of the placement rule
            iou = box_iou(b, b).fill_diagonal_(0)
            assert float(iou.max()) <= 0.2 + 1e-6
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1


def test_circle_box_is_tight_on_a_flat_background():
    ds = ShapesDetection(length=10, classes=("circle",), background="flat", objects=(1, 1), image_size=128, seed=1)
    for i in range(len(ds)):
        img, t = ds[i]
        x0, y0, x1, y1 = t["boxes"][0].long().tolist()
        # the object is one flat colour: the pixels equal to the box-centre colour span exactly the box
        centre = img[:, (y0 + y1) // 2, (x0 + x1) // 2]
        same = (img - centre[:, None, None]).abs().amax(0) < 1e-6
        ys, xs = np.nonzero(same.numpy())
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        ratio = same.sum().item() / ((x1 - x0) * (y1 - y0))
        assert abs(ratio - np.pi / 4) < 0.06  # a disc fills pi/4 of its box


def test_ood_variants_and_errors():
    near = ShapesDetection(length=5, classes=("star", "cross", "ring"), seed=0)
    assert near[0][1]["labels"].max() < 3 and set(near.classes) <= set(SHAPES)
    far = ShapesDetection(length=5, background="stripes", seed=0)
    assert not torch.equal(far[0][0], ShapesDetection(length=5, seed=0)[0][0])
    for bad in (dict(classes=("hexagon",)), dict(classes=()), dict(background="sky"), dict(objects=(3, 1)),
                dict(size=(0.2, 0.6))):
        with pytest.raises(ValueError):
            ShapesDetection(**bad)


def test_coco_round_trip_of_the_generated_set(tmp_path):
    from larex.data.coco import CocoDetection, write_coco

    ds = ShapesDetection(length=6, classes=("circle", "square", "triangle"), image_size=64, seed=2)
    path = write_coco(ds, tmp_path, ds.classes)
    coco = CocoDetection(tmp_path)
    assert len(coco) == 6 and coco.classes == ds.classes
    for i in range(6):
        img, t = ds[i]
        got, gt = coco[i]
        np.testing.assert_allclose(got.numpy(), np.floor(img.numpy() * 255 + 0.5) / 255, atol=1e-6)  # 8-bit PNG
        assert torch.equal(gt["boxes"], t["boxes"]) and torch.equal(gt["labels"], t["labels"])
        assert gt["image_id"] == t["image_id"]
    # classes select and reorder categories; others are dropped
    sub = CocoDetection(tmp_path, classes=["triangle", "circle"])
    for i in range(6):
        _, t = ds[i]
        keep = t["labels"] != 1
        want = torch.tensor([{2: 0, 0: 1}[v] for v in t["labels"][keep].tolist()], dtype=torch.int64)
        assert torch.equal(sub[i][1]["labels"], want)
    with pytest.raises(ValueError, match="not categories"):
        CocoDetection(tmp_path, classes=["hexagon"])
    with pytest.raises(FileNotFoundError, match="dataset.root"):
        CocoDetection(tmp_path / "missing")
    assert path.name == "annotations.json"
