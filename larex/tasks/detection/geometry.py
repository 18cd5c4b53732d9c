"""Box geometry between an original image, the network input and a hooked feature map.

Detectors do not see the original image: ultralytics letterboxes it (one gain for both axes, then padding to
the input size), torchvision's transform resizes it (one gain, 800-px short side) and pads the batch at the
bottom/right, a "stretch" resize has one gain per axis. :class:`BoxTransform` records that mapping
``input = original * gain + pad`` per axis, so boxes move between the three frames exactly:

* :meth:`BoxTransform.to_input` / :meth:`BoxTransform.to_original` (clipped to the original image);
* :func:`to_feature_map`: input-frame boxes onto a feature map that covers the whole (padded) input, scale
  ``map_size / input_size`` per axis. Dividing by the original width instead (``fmap_w / img_w``) is wrong as
  soon as there is padding or a resize.

:func:`letterbox` builds the input and its transform (bilinear, antialiased resize; the padding split evenly
between the two sides, the odd pixel at the end, as ultralytics does). Vectorized over boxes; float32/float64 in,
same dtype out.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return int(size), int(size)
    h, w = (int(v) for v in size)
    return h, w


@dataclass(frozen=True)
class BoxTransform:
    """``x_input = x_original * gain_x + pad_x`` (same for y). ``original`` and ``input`` are (H, W)."""

    gain_x: float
    gain_y: float
    pad_x: float
    pad_y: float
    original: tuple[int, int]
    input: tuple[int, int]

    def _check(self, boxes: torch.Tensor) -> None:
        if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be a [K, 4] tensor of x0, y0, x1, y1; got "
                             f"{tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__}")

    def to_input(self, boxes: torch.Tensor) -> torch.Tensor:
        """Original-image boxes [K, 4] (xyxy, pixels) -> network-input boxes."""
        self._check(boxes)
        scale = boxes.new_tensor([self.gain_x, self.gain_y, self.gain_x, self.gain_y])
        shift = boxes.new_tensor([self.pad_x, self.pad_y, self.pad_x, self.pad_y])
        return boxes * scale + shift

    def to_original(self, boxes: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """Network-input boxes [K, 4] -> original-image boxes (clipped to the image unless ``clip=False``)."""
        self._check(boxes)
        scale = boxes.new_tensor([self.gain_x, self.gain_y, self.gain_x, self.gain_y])
        shift = boxes.new_tensor([self.pad_x, self.pad_y, self.pad_x, self.pad_y])
        out = (boxes - shift) / scale
        if clip:
            h, w = self.original
            out = torch.stack([out[:, 0].clamp(0, w), out[:, 1].clamp(0, h), out[:, 2].clamp(0, w),
                               out[:, 3].clamp(0, h)], dim=1)
        return out


def resize_transform(original: int | Sequence[int], input: int | Sequence[int], mode: str = "letterbox",
                     stride: int | None = None) -> BoxTransform:
    """The transform of resizing an ``original`` (H, W) image to ``input`` (H, W).

    ``letterbox``: one gain ``min(H/h, W/w)``, the resized image centred (padding split evenly, the odd pixel
    at the bottom/right). ``pad_end``: the same gain, padding only at the bottom/right (torchvision's batch
    padding). ``stretch``: one gain per axis, no padding. ``stride`` (letterbox/pad_end): the input is the resized
    size rounded up to a multiple of ``stride`` instead of ``input`` (ultralytics' ``rect`` shapes)."""
    h, w = _size(original)
    H, W = _size(input)
    if min(h, w, H, W) < 1:
        raise ValueError(f"image sizes must be positive; got original {(h, w)}, input {(H, W)}")
    if mode == "stretch":
        return BoxTransform(W / w, H / h, 0.0, 0.0, (h, w), (H, W))
    if mode not in ("letterbox", "pad_end"):
        raise ValueError(f"resize mode must be letterbox, pad_end or stretch; got {mode!r}")
    gain = min(H / h, W / w)
    nh, nw = int(round(h * gain)), int(round(w * gain))
    if stride is not None:
        H, W = -(-nh // stride) * stride, -(-nw // stride) * stride
    if mode == "pad_end":
        return BoxTransform(nw / w, nh / h, 0.0, 0.0, (h, w), (H, W))
    return BoxTransform(nw / w, nh / h, float((W - nw) // 2), float((H - nh) // 2), (h, w), (H, W))


def letterbox(image: torch.Tensor, size: int | Sequence[int], fill: float = 114 / 255, mode: str = "letterbox",
              stride: int | None = None) -> tuple[torch.Tensor, BoxTransform]:
    """``image`` [C, h, w] (float) resized and padded to the input size; returns ``(input [C, H, W], transform)``.
    The resized content occupies ``[pad, pad + round(gain * size))`` on each axis; padding is ``fill``."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise ValueError(f"letterbox needs an image [C, H, W]; got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    t = resize_transform(tuple(image.shape[1:]), size, mode, stride)
    h, w = t.original
    nh, nw = int(round(h * t.gain_y)), int(round(w * t.gain_x))
    resized = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                            antialias=True)[0].to(image.dtype) if (nh, nw) != (h, w) else image
    H, W = t.input
    out = image.new_full((image.shape[0], H, W), fill)
    x0, y0 = int(t.pad_x), int(t.pad_y)
    out[:, y0:y0 + nh, x0:x0 + nw] = resized
    return out, t


def to_feature_map(boxes: torch.Tensor, input_size: int | Sequence[int], map_size: int | Sequence[int]) -> torch.Tensor:
    """Input-frame boxes [K, 4] onto a feature map [h, w] that covers the whole input (H, W): ``x * w / W``,
    ``y * h / H`` (feature-map pixel units, as ``torchvision.ops.roi_align`` takes with ``spatial_scale=1``)."""
    H, W = _size(input_size)
    h, w = _size(map_size)
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError("boxes must be a [K, 4] tensor of x0, y0, x1, y1")
    return boxes * boxes.new_tensor([w / W, h / H, w / W, h / H])
