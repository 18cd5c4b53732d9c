"""Box geometry of the detection task (larex.tasks.detection.geometry): letterbox, resize, feature-map mapping."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from larex.tasks.detection.geometry import BoxTransform, letterbox, resize_transform, to_feature_map


def _image_with_rect(h, w, box):
    img = torch.zeros(3, h, w)
    x0, y0, x1, y1 = box
    img[:, y0:y1, x0:x1] = 1.0
    return img


def _bright_box(img, thr=0.5):
    m = img.amax(0) > thr
    ys, xs = torch.nonzero(m, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float64)


@pytest.mark.parametrize("orig,inp", [((120, 200), (160, 160)), ((200, 90), (128, 160)), ((64, 64), (64, 64)),
                                      ((75, 133), (96, 96))])
def test_letterbox_places_content_where_the_transform_says(orig, inp):
    h, w = orig
    box = (w // 4, h // 3, w // 2 + 3, (2 * h) // 3)
    out, t = letterbox(_image_with_rect(h, w, box), inp, fill=0.0)
    assert out.shape == (3, *inp)
    want = t.to_input(torch.tensor([box], dtype=torch.float64))[0]
    got = _bright_box(out)
    assert (got - want).abs().max() <= 1.0  # one pixel of resampling blur at most
    # the padding is where the transform says, split evenly (odd pixel at the end), filled
    H, W = inp
    nh, nw = round(h * t.gain_y), round(w * t.gain_x)
    assert (t.pad_x, t.pad_y) == ((W - nw) // 2, (H - nh) // 2)
    assert abs(t.gain_x - t.gain_y) < 0.02 and min(nh, nw) > 0
    back = t.to_original(want[None])[0]
    assert torch.allclose(back, torch.tensor(box, dtype=torch.float64), atol=1e-9)


def test_round_trip_clip_and_modes():
    t = resize_transform((100, 300), (160, 160))
    assert t.pad_x == 0 and t.pad_y == (160 - round(100 * 160 / 300)) // 2
    boxes = torch.tensor([[0.0, 0.0, 300.0, 100.0], [10.5, 20.25, 50.0, 60.0]], dtype=torch.float64)
    assert torch.allclose(t.to_original(t.to_input(boxes)), boxes, atol=1e-12)
    outside = t.to_original(torch.tensor([[-5.0, -5.0, 500.0, 500.0]], dtype=torch.float64))
    assert outside.tolist() == [[0.0, 0.0, 300.0, 100.0]]
    s = resize_transform((100, 300), (160, 160), mode="stretch")
    assert (s.gain_x, s.gain_y, s.pad_x, s.pad_y) == (160 / 300, 1.6, 0.0, 0.0)
    e = resize_transform((100, 300), (160, 160), mode="pad_end")
    assert (e.pad_x, e.pad_y) == (0.0, 0.0) and e.input == (160, 160)
    r = resize_transform((100, 300), (160, 160), stride=32)  # rect shapes: the input shrinks to a stride multiple
    assert r.input == (64, 160) and r.pad_y == (64 - 53) // 2
    for bad in (dict(mode="crop"),):
        with pytest.raises(ValueError):
            resize_transform((10, 10), (20, 20), **bad)
    with pytest.raises(ValueError, match=r"\[K, 4\]"):
        t.to_input(torch.zeros(3))


def test_feature_map_boxes_cover_the_object_on_a_strided_map():
    """A stride-8 'feature map' (average pooling of the letterboxed image) lights up where to_feature_map says."""
    h, w = 90, 200
    box = (40, 20, 120, 70)
    out, t = letterbox(_image_with_rect(h, w, box), (160, 160), fill=0.0)
    fmap = F.avg_pool2d(out[None], 8)[0]  # [3, 20, 20] covers the padded input
    fbox = to_feature_map(t.to_input(torch.tensor([box], dtype=torch.float64)), (160, 160), fmap.shape[1:])[0]
    lit = _bright_box(fmap, thr=0.99)  # map cells fully inside the object
    assert (lit[:2] >= fbox[:2].floor()).all() and (lit[2:] <= fbox[2:].ceil()).all()
    # the naive scale (map size / original size, ignoring the letterbox) misses the object vertically
    naive = torch.tensor(box, dtype=torch.float64) * torch.tensor([20 / w, 20 / h, 20 / w, 20 / h])
    assert (naive - fbox).abs().max() > 2.0
    assert isinstance(t, BoxTransform)
