"""Detection inputs: each image letterboxed (or resized) to the network input, its ground truth kept in the
original frame with the transform between the two, and the batch collate (targets stay a list)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from larex.tasks.detection.geometry import BoxTransform, letterbox

TRANSFORM_FIELDS = ("gain_x", "gain_y", "pad_x", "pad_y", "orig_h", "orig_w")
"""Layout of a target's ``transform`` tensor (float64 [6])."""


def transform_tensor(t: BoxTransform) -> torch.Tensor:
    return torch.tensor([t.gain_x, t.gain_y, t.pad_x, t.pad_y, *t.original], dtype=torch.float64)


def boxes_to_original(boxes: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Input-frame boxes [K, 4] -> original-image boxes, row k by ``transforms[k]`` ([K, 6], see
    :data:`TRANSFORM_FIELDS`), clipped to each original image. Vectorized over boxes."""
    t = transforms.to(torch.float64)
    gain = t[:, [0, 1, 0, 1]]
    shift = t[:, [2, 3, 2, 3]]
    out = (boxes.to(torch.float64) - shift) / gain
    limit = t[:, [5, 4, 5, 4]]
    return torch.minimum(out.clamp(min=0), limit)


class DetectionInput(Dataset):
    """``(x [3, H, W], target, index)``: the image brought to ``channels`` (grey -> RGB), letterboxed to
    ``image_size`` (``resize``: letterbox | pad_end | stretch; ``stride`` rounds the input up per image, which
    only a batch size of 1 allows), padded with ``fill``, then normalized by ``mean`` / ``std``. ``target``:
    ``boxes`` [K, 4] (original frame), ``labels`` [K] (-1 = unknown object), ``transform`` (float64 [6],
    :data:`TRANSFORM_FIELDS`)."""

    def __init__(self, dataset, image_size: int | Sequence[int], channels: int = 3, mean: Sequence[float] = (0.0,),
                 std: Sequence[float] = (1.0,), resize: str = "letterbox", stride: int | None = None,
                 fill: float = 114 / 255):
        self.dataset = dataset
        self.image_size = image_size if isinstance(image_size, int) else tuple(int(v) for v in image_size)
        self.channels, self.resize, self.stride, self.fill = int(channels), str(resize), stride, float(fill)
        self.mean = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def targets(self):
        from larex.data.base import get_targets

        return get_targets(self.dataset)

    def __getitem__(self, i: int):
        from larex.data.base import to_image_tensor

        image, target = self.dataset[i]
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise TypeError(f"detection datasets return (image, {{'boxes': [K, 4], 'labels': [K]}}); item {i} of "
                            f"{type(self.dataset).__name__} has target {type(target).__name__}")
        x = to_image_tensor(image)
        if x.shape[0] == 1 and self.channels == 3:
            x = x.expand(3, -1, -1)
        if x.shape[0] != self.channels:
            raise ValueError(f"image {i} of {type(self.dataset).__name__} has {x.shape[0]} channels; the model "
                             f"takes {self.channels}")
        x, t = letterbox(x.contiguous(), self.image_size, fill=self.fill, mode=self.resize, stride=self.stride)
        x = (x - self.mean) / self.std
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)
        return x, {"boxes": boxes, "labels": labels, "transform": transform_tensor(t)}, i


def collate(items):
    """``(x [B, 3, H, W], [target, ...], index [B])``; every input of a batch must have one size."""
    xs, ys, idx = zip(*items)
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise ValueError(f"a detection batch needs inputs of one size; got {sorted(shapes)}. Use a fixed "
                         "task.input.resize (letterbox to dataset.image_size) or extract.batch_size=1 with a stride")
    return torch.stack(xs), list(ys), torch.as_tensor(idx, dtype=torch.int64)
