"""A generated object-detection set (offline, deterministic): coloured shapes on textured backgrounds.

The detection demo's data (issue "Object detection"): ID images hold 1..``max_objects`` shapes of the ID kinds;
a near-OOD set uses other shape kinds on the same backgrounds, a far-OOD set other backgrounds (stripes, flat
colour with noise) -- and every object, known or not, has a ground-truth box, so open-set figures (unknown-object
recall, wilderness impact) can be computed.

Item ``i`` is a function of ``(seed, i)`` only (``numpy.random.default_rng([seed, i])``): any subset, order or
worker split gives the same images. Images are rendered with vectorized NumPy masks over the pixel grid (one mask
per object; an image holds a handful). Boxes are ``[x0, y0, x1, y1]`` in pixels (x1/y1 exclusive) of each
object's full mask (later objects may cover part of earlier ones; placement rejects overlaps above
``max_iou``).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star")
"""Every shape kind; ``label`` of an object is its index in the dataset's ``classes``."""
BACKGROUNDS = ("texture", "stripes", "flat")


def _shape_mask(kind: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float,
                angle: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if kind == "triangle":  # apex up: width grows linearly from the top to the base
        t = (dy + r) / (2 * r)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if kind == "cross":
        w = r / 3
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if kind == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "star":  # five points: radius modulated by the polar angle
        theta = np.arctan2(dy, dx) + angle
        rad = r * (0.55 + 0.45 * np.cos(5 * theta) ** 2)
        return dx * dx + dy * dy <= rad * rad
    raise ValueError(f"unknown shape {kind!r}; use one of {SHAPES}")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class ShapesDetection(Dataset):
    """``(image [3, H, W] float32 in [0, 1], target)``, target ``{"boxes": [K, 4] float32 xyxy, "labels": [K]
    int64 (index into ``classes``), "image_id": int}``.

    Args:
        length: number of images.
        classes: shape kinds drawn (subset of :data:`SHAPES`); ``labels`` index this list.
        background: ``texture`` (smoothed colour noise), ``stripes`` (oriented colour bands) or ``flat``.
        image_size: side of the square images in pixels.
        objects: (min, max) objects per image.
        size: (min, max) object radius as a fraction of ``image_size``.
        max_iou: placement rejects a box overlapping an earlier one by more than this (up to 50 tries).
        seed: item ``i`` is drawn from ``default_rng([seed, i])``.
    """

    def __init__(self, length: int = 1000, classes: Sequence[str] = ("circle", "square", "triangle"),
                 background: str = "texture", image_size: int = 160, objects: Sequence[int] = (1, 4),
                 size: Sequence[float] = (0.06, 0.18), max_iou: float = 0.2, seed: int = 0):
        classes = tuple(str(c) for c in classes)
        bad = [c for c in classes if c not in SHAPES]
        if not classes or bad or len(set(classes)) != len(classes):
            raise ValueError(f"ShapesDetection classes must be distinct kinds among {SHAPES}; got {list(classes)}")
        if background not in BACKGROUNDS:
            raise ValueError(f"ShapesDetection background must be one of {BACKGROUNDS}; got {background!r}")
        lo, hi = (int(v) for v in objects)
        if not 0 <= lo <= hi:
            raise ValueError(f"ShapesDetection objects must be (min, max) with 0 <= min <= max; got {objects}")
        smin, smax = (float(v) for v in size)
        if not 0 < smin <= smax < 0.5:
            raise ValueError(f"ShapesDetection size must be (min, max) radii in (0, 0.5); got {size}")
        if int(length) < 0 or int(image_size) < 16:
            raise ValueError(f"ShapesDetection needs length >= 0 and image_size >= 16; got {length}, {image_size}")
        self.length, self.classes, self.background = int(length), classes, background
        self.image_size, self.objects, self.size = int(image_size), (lo, hi), (smin, smax)
        self.max_iou, self.seed = float(max_iou), int(seed)

    def __len__(self) -> int:
        return self.length

    @property
    def targets(self) -> np.ndarray:
        """Image-level labels for the generic wrappers (``Subsample``): 0 for every image (objects carry theirs)."""
        return np.zeros(self.length, dtype=np.int64)

    def _background(self, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        n = self.image_size
        base = rng.uniform(0.15, 0.85, size=3)
        if self.background == "texture":  # colour noise smoothed by a box filter over each channel
            from scipy.ndimage import uniform_filter

            noise = rng.normal(0.0, 1.0, size=(3, n, n))
            sm = uniform_filter(noise, size=(1, max(3, n // 20), max(3, n // 20)), mode="reflect")
            sm /= sm.std() + 1e-12
            return np.clip(base[:, None, None] + 0.12 * sm, 0, 1)
        if self.background == "stripes":
            theta = rng.uniform(0, np.pi)
            period = rng.uniform(n / 12, n / 4)
            phase = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
            other = rng.uniform(0.15, 0.85, size=3)
            w = (phase > 0).astype(np.float64)
            return base[:, None, None] * w + other[:, None, None] * (1 - w)
        return np.clip(base[:, None, None] + rng.normal(0.0, 0.05, size=(3, n, n)), 0, 1)

    def __getitem__(self, i: int):
        if not 0 <= int(i) < self.length:
            raise IndexError(f"ShapesDetection index {i} out of range for {self.length} images")
        rng = np.random.default_rng([self.seed, int(i)])
        n = self.image_size
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
        img = self._background(rng, yy, xx)
        boxes, labels = [], []
        for _ in range(int(rng.integers(self.objects[0], self.objects[1] + 1))):
            for _try in range(50):
                label = int(rng.integers(len(self.classes)))
                r = rng.uniform(*self.size) * n
                cx, cy = rng.uniform(r, n - r), rng.uniform(r, n - r)
                mask = _shape_mask(self.classes[label], xx, yy, cx, cy, r, rng.uniform(0, 2 * np.pi))
                rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                if not len(rows):
                    continue
                box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)
                if all(_iou(box, b) <= self.max_iou for b in boxes):
                    colour = rng.uniform(0, 1, size=3)
                    img = np.where(mask[None], colour[:, None, None], img)
                    boxes.append(box)
                    labels.append(label)
                    break
        target = {"boxes": torch.as_tensor(np.array(boxes, dtype=np.float32).reshape(-1, 4)),
                  "labels": torch.as_tensor(np.array(labels, dtype=np.int64)), "image_id": int(i)}
        return torch.from_numpy(img.astype(np.float32)), target
