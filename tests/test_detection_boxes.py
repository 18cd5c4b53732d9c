"""Box rows of a detector: RoIAlign over the hooked map under letterbox padding and resize, equal to a direct
crop-and-pool computation; the RoI DropBlock samples; boxes back in the original frame; no-object images."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import roi_align

from larex.extraction.mc import deterministic_masks
from larex.extraction.producers.boxes import Boxes
from larex.models.detection.base import Detections, DetectorAdapter, insert_mc_layer, top_per_image
from larex.tasks.detection.geometry import resize_transform, to_feature_map
from larex.tasks.detection.inputs import DetectionInput, collate


def _bilinear(fmap: np.ndarray, y: float, x: float) -> np.ndarray:
    """torchvision's RoIAlign bilinear sample of fmap [C, h, w] at (y, x), written out (zero outside [-1, size])."""
    c, h, w = fmap.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(c)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * fmap[:, y0, x0] + (1 - ly) * lx * fmap[:, y0, x1]
            + ly * (1 - lx) * fmap[:, y1, x0] + ly * lx * fmap[:, y1, x1])


def _crop_and_pool(fmap: np.ndarray, box: np.ndarray, out: int, ratio: int) -> np.ndarray:
    """Mean of ``ratio x ratio`` bilinear samples per bin of an ``out x out`` grid over ``box`` (aligned: -0.5)."""
    x0, y0, x1, y1 = box - 0.5
    bw, bh = (x1 - x0) / out, (y1 - y0) / out
    res = np.zeros((fmap.shape[0], out, out))
    for i in range(out):
        for j in range(out):
            pts = [_bilinear(fmap, y0 + (i + (a + 0.5) / ratio) * bh, x0 + (j + (b + 0.5) / ratio) * bw)
                   for a in range(ratio) for b in range(ratio)]
            res[:, i, j] = np.mean(pts, axis=0)
    return res


@pytest.mark.parametrize("original,mode", [((120, 200), "letterbox"), ((200, 90), "letterbox"),
                                           ((150, 150), "stretch"), ((100, 180), "pad_end")])
def test_roi_align_on_the_hooked_map_equals_direct_crop_and_pool(original, mode):
    g = torch.Generator().manual_seed(0)
    fmap = torch.rand((1, 5, 20, 20), generator=g, dtype=torch.float64)  # stride 8 over a 160 x 160 input
    h, w = original
    boxes = torch.tensor([[10.0, 12.0, 60.0, 80.0], [0.0, 0.0, w, h], [w * 0.5, h * 0.3, w * 0.9, h * 0.95]],
                         dtype=torch.float64)
    t = resize_transform(original, 160, mode)
    on_map = to_feature_map(t.to_input(boxes), 160, (20, 20))
    got = roi_align(fmap, torch.cat([torch.zeros(3, 1, dtype=torch.float64), on_map], 1), output_size=(7, 7),
                    spatial_scale=1.0, sampling_ratio=2, aligned=True).numpy()
    # the direct computation: the box in input pixels, scaled by the map's stride (160 / 20 = 8)
    for k in range(3):
        inp = t.to_input(boxes[k:k + 1])[0].numpy() / 8.0
        np.testing.assert_allclose(got[k], _crop_and_pool(fmap[0].numpy(), inp, 7, 2), rtol=0, atol=1e-12)


class _RectangleDetector(DetectorAdapter):
    """A stand-in detector: the hooked map is the input average-pooled by 8; it 'detects' the non-zero rectangle
    of each image (the inner half of it), and nothing on an all-zero image."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(8)

    def forward(self, x):
        return self.pool(x)

    def detect(self, x, conf=0.25, iou=0.7, max_det=100):
        self(x)
        fg = (x.abs().sum(1) > 1e-6)  # [B, H, W]; letterbox padding is zero here (fill=0)
        rows, cols = fg.any(2), fg.any(1)
        has = rows.any(1)
        ar = torch.arange(x.shape[-1], dtype=torch.float32)
        y0 = torch.where(rows, ar, torch.inf).amin(1)
        y1 = torch.where(rows, ar, -torch.inf).amax(1) + 1
        x0 = torch.where(cols, ar, torch.inf).amin(1)
        x1 = torch.where(cols, ar, -torch.inf).amax(1) + 1
        cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4, (y1 - y0) / 4
        boxes = torch.stack([cx - bw, cy - bh, cx + bw, cy + bh], 1)[has]
        img = torch.arange(x.shape[0])[has]
        scores = torch.full((len(img),), 0.9)
        return Detections(img, boxes, scores, torch.zeros(len(img), dtype=torch.int64), torch.zeros(len(img), 2))


class _Images(torch.utils.data.Dataset):
    """Images of different sizes, each one constant-colour rectangle (box = its ground truth), one blank image."""

    specs = [((96, 160), (40, 20, 120, 80), (0.9, 0.2, 0.5)), ((160, 100), (10, 30, 90, 150), (0.1, 0.7, 0.4)),
             ((64, 64), None, None), ((128, 200), (100, 8, 196, 120), (0.3, 0.3, 0.8))]

    def __len__(self):
        return len(self.specs)

    def __getitem__(self, i):
        (h, w), box, colour = self.specs[i]
        img = torch.zeros(3, h, w)
        boxes = torch.zeros(0, 4)
        if box is not None:
            x0, y0, x1, y1 = box
            img[:, y0:y1, x0:x1] = torch.tensor(colour)[:, None, None]
            boxes = torch.tensor([box], dtype=torch.float32)
        return img, {"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.int64)}


def _producer_batch(s: int = 5):
    model = insert_mc_layer(_RectangleDetector(), "pool", "dropblock", drop_prob=0.5, block_size=3).eval()
    ds = DetectionInput(_Images(), 128, fill=0.0)
    x, y, index = collate([ds[i] for i in range(len(ds))])
    p = Boxes("pool", keys=("box_logits", "roi_features", "roi_latent"), predict_conf=0.0, mc_samples=s, seed=3)
    p.setup(model)
    return model, p, p.produce(model, x, y, index + 10), ds


def test_box_producer_features_boxes_and_no_object_under_letterbox():
    model, p, out, ds = _producer_batch()
    specs = [sp for sp in _Images.specs if sp[1] is not None]
    np.testing.assert_array_equal(out["image_index"].numpy(), [10, 11, 13])  # global rows; image 12 is blank
    np.testing.assert_array_equal(out["no_object"].numpy(), [0, 0, 1, 0])
    # RoI channel means over the map = the rectangle's colour (the box lies inside it), whatever the padding
    np.testing.assert_allclose(out["roi_features"].numpy(), [sp[2] for sp in specs], atol=1e-6)
    # boxes come back in the original frame: the inner half of each rectangle
    inner = [[(a + c) / 2 - (c - a) / 4, (b + d) / 2 - (d - b) / 4, (a + c) / 2 + (c - a) / 4,
              (b + d) / 2 + (d - b) / 4] for (a, b, c, d) in (sp[1] for sp in specs)]
    # (the found rectangle may include one antialiased input pixel: 1 / gain <= 1.6 original pixels here)
    np.testing.assert_allclose(out["boxes"].numpy(), inner, atol=1.6)
    # the naive scale map_w / original_w (no padding, no gain) misses the rectangle on a letterboxed input
    h, w = specs[0][0]
    full = torch.tensor([specs[0][1]], dtype=torch.float32)  # the whole rectangle
    fmap = model.pool(torch.stack([ds[0][0]]))
    naive = full * torch.tensor([16 / w, 16 / h, 16 / w, 16 / h])
    wrong = roi_align(fmap, torch.cat([torch.zeros(1, 1), naive], 1), (7, 7), 1.0, 2, True).mean((2, 3))
    t = resize_transform((h, w), 128, "letterbox")
    right = roi_align(fmap, torch.cat([torch.zeros(1, 1), to_feature_map(t.to_input(full), 128, 16)], 1),
                      (7, 7), 1.0, 2, True).mean((2, 3))
    assert np.abs(wrong.numpy() - specs[0][2]).max() > 0.1  # background rows pulled in
    assert np.abs(right.numpy() - specs[0][2]).max() < np.abs(wrong.numpy() - specs[0][2]).max() / 2


def test_roi_latent_is_the_roi_features_under_the_seeded_dropblock_masks():
    model, p, out, _ = _producer_batch(s=6)
    lat = out["roi_latent"].numpy()
    assert lat.shape == (3, 6, 3)
    masks, _ = deterministic_masks(model.pool.mc, (3, 7, 7), 6, 3, 0, norm="expected")
    kept = masks[:, 0].mean((1, 2)).numpy()  # constant RoI -> sample s = colour x mean of mask s
    colours = np.array([sp[2] for sp in _Images.specs if sp[1] is not None])
    np.testing.assert_allclose(lat, colours[:, None, :] * kept[None, :, None], rtol=1e-5)
    assert len(np.unique(kept.round(6))) > 1  # the samples differ
    # the same image alone gives the same samples (no dependence on the batch)
    ds = DetectionInput(_Images(), 128, fill=0.0)
    x, y, index = collate([ds[1]])
    alone = p.produce(model, x, y, index)
    np.testing.assert_allclose(alone["roi_latent"].numpy()[0], lat[1], rtol=1e-6)


def test_top_per_image_keeps_the_best_boxes_of_every_image():
    img = torch.tensor([1, 0, 1, 1, 0, 2])
    scores = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7, 0.2])
    kept = top_per_image(img, scores, 2)
    assert kept.tolist() == [4, 1, 2, 3, 5]


def test_box_producer_needs_a_detector_and_an_mc_layer():
    with pytest.raises(TypeError, match="detector adapter"):
        Boxes("0", keys=("roi_latent",)).setup(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="hooked_layer.insert"):
        Boxes("pool", keys=("roi_latent",)).setup(_RectangleDetector())
    assert math.isfinite(Boxes("pool").predict_conf)
    # box_penultimate / box_head.* (ViM, ReAct, ...) need the detector's linear class head: refused before compute
    from larex.extraction.producers.boxes import BoxHead
    from larex.models.detection.base import NoBoxHead

    for producer in (Boxes("pool", keys=("box_penultimate",)), BoxHead()):
        with pytest.raises(NoBoxHead, match="no single linear class head.*vim"):
            producer.setup(_RectangleDetector())


@pytest.mark.parametrize("size,channels,ratio,aligned", [((5, 5), 64, 2, True), ((4, 6), 64, 1, False),
                                                         ((5, 5), 64, 3, False), ((12, 9), 16, 2, True),
                                                         ((5, 5), 64, 0, True)])
def test_roi_means_equal_the_means_of_roi_align(size, channels, ratio, aligned):
    """The separable weights (coarse maps) and RoIAlign itself (fine maps, adaptive sampling) give torchvision's
    grid means, boxes partly outside the map and thinner than a cell included."""
    from larex.extraction.producers.boxes import roi_means

    g = torch.Generator().manual_seed(1)
    fmap = torch.rand((3, channels, *size), generator=g, dtype=torch.float64)
    h, w = size
    xy = torch.rand((12, 2), generator=g, dtype=torch.float64) * torch.tensor([w + 1.0, h + 1.0]) - 1.5
    wh = torch.rand((12, 2), generator=g, dtype=torch.float64) * 4 + 0.05
    boxes = torch.cat([xy, xy + wh], 1)
    image = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2, 0, 1, 2])
    masks = torch.rand((6, 7, 7), generator=g, dtype=torch.float64)
    feats, latent = roi_means(fmap, image, boxes, 7, ratio, aligned, masks)
    roi = roi_align(fmap, torch.cat([image[:, None].double(), boxes], 1), (7, 7), 1.0, ratio, aligned)
    np.testing.assert_allclose(feats.numpy(), roi.mean((2, 3)).numpy(), rtol=0, atol=1e-12)
    want = (roi[:, None] * masks[None, :, None]).mean((3, 4))
    np.testing.assert_allclose(latent.numpy(), want.numpy(), rtol=0, atol=1e-12)
    alone, none = roi_means(fmap, image, boxes, 7, ratio, aligned)
    assert none is None
    np.testing.assert_allclose(alone.numpy(), roi.mean((2, 3)).numpy(), rtol=0, atol=1e-12)


def test_roi_std_appends_the_grid_spread_of_each_channel():
    model = insert_mc_layer(_RectangleDetector(), "pool", "dropblock", drop_prob=0.5, block_size=3).eval()
    ds = DetectionInput(_Images(), 128, fill=0.0)
    x, y, index = collate([ds[i] for i in range(len(ds))])
    plain = Boxes("pool", keys=("roi_features",), predict_conf=0.0)
    spread = Boxes("pool", keys=("roi_features",), predict_conf=0.0, roi_std=True)
    a, b = plain.produce(model, x, y, index)["roi_features"], spread.produce(model, x, y, index)["roi_features"]
    assert b.shape == (3, 6)
    torch.testing.assert_close(b[:, :3], a)
    torch.testing.assert_close(b[:, 3:], torch.zeros(3, 3), atol=1e-6, rtol=0)  # inside a constant rectangle
    assert plain.part != spread.part and "roi_std" not in plain.identity()
    # on a textured input the spread is that of the RoIAlign grid over the hooked map
    x = x + 0.3 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    out = spread.produce(model, x, y, index)
    det = model.detect(x)  # the detector's own input-frame boxes, mapped onto the stride-8 map
    grid = roi_align(model.pool.inner(x), torch.cat([det.image_index[:, None].float(), det.boxes / 8], 1),
                     (7, 7), 1.0, 2, True)
    assert len(out["image_index"]) == grid.shape[0] == 4  # the blank image is textured now: it has a box
    torch.testing.assert_close(out["roi_features"][:, 3:], grid.flatten(2).std(2, unbiased=False), rtol=1e-5,
                               atol=1e-6)
