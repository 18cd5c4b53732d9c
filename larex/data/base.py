"""Dataset wrappers shared by every classification dataset.

Contract: a dataset returns ``(image, label)`` with ``image`` a float32 tensor ``[C, H, W]`` in ``[0, 1]``
at its native size and ``label`` an int (ID class index; OOD sets return ``-1``). Wrappers expose
``targets`` (``np.ndarray`` of int64 labels) so labels can be read without loading images.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "DataRootNotFoundError",
    "get_targets",
    "ClassSubset",
    "TrainValSplit",
    "TrainTestSplit",
    "Subsample",
    "AsOOD",
    "ModelInput",
    "to_image_tensor",
    "image_hw",
    "RESIZE_POLICIES",
]

# ITU-R BT.601 luma weights (R, G, B).
LUMA_601 = (0.299, 0.587, 0.114)


class DataRootNotFoundError(FileNotFoundError):
    """A dataset's files are not where the config says; the message names the path(s) and the fix."""


def _name(dataset) -> str:
    return type(dataset).__name__


def get_targets(dataset) -> np.ndarray:
    """Labels of ``dataset`` as an int64 array, from its ``targets``/``labels`` attribute when present.

    Falls back to reading every sample once (loads images) for datasets without such an attribute.
    """
    for attr in ("targets", "labels"):
        t = getattr(dataset, attr, None)
        if t is not None:
            if isinstance(t, torch.Tensor):
                t = t.detach().cpu().numpy()
            t = np.asarray(t).astype(np.int64, copy=False).reshape(-1)
            if len(t) == len(dataset):
                return t
    return np.fromiter((int(dataset[i][1]) for i in range(len(dataset))), dtype=np.int64, count=len(dataset))


class WrapsTargets(Dataset):
    """Mixin for a wrapper that keeps its ``dataset``'s labels: ``targets`` read once, lazily."""

    dataset: Dataset
    _targets: np.ndarray | None = None

    @property
    def targets(self) -> np.ndarray:
        if self._targets is None:
            self._targets = get_targets(self.dataset)
        return self._targets


class _IndexView(Dataset):
    """A view of ``dataset`` at ``indices`` with precomputed ``targets``."""

    def __init__(self, dataset, indices: np.ndarray, targets: np.ndarray):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, target = self.dataset[int(self.indices[i])]
        if isinstance(target, dict):  # detection: the objects' boxes and labels stay with the image
            return image, target
        return image, int(self.targets[i])


class ClassSubset(_IndexView):
    """Samples of ``dataset`` whose label is in ``classes``; relabelled to the label's index in ``classes``.

    With ``relabel=False`` the original labels are kept.
    """

    def __init__(self, dataset, classes: Sequence[int], relabel: bool = True):
        classes = np.asarray(list(classes), dtype=np.int64)
        if classes.size == 0:
            raise ValueError(f"ClassSubset of {_name(dataset)}: `classes` is empty; list at least one class index")
        if np.unique(classes).size != classes.size:
            raise ValueError(f"ClassSubset of {_name(dataset)}: `classes` has duplicates: {classes.tolist()}")
        base = get_targets(dataset)
        indices = np.flatnonzero(np.isin(base, classes))
        kept = base[indices]
        if relabel:
            order = np.argsort(classes, kind="stable")
            kept = order[np.searchsorted(classes[order], kept)]
        super().__init__(dataset, indices, kept)
        self.classes = classes.tolist()
        self.relabel = relabel


class TrainValSplit(_IndexView):
    """Deterministic random split of ``dataset``: ``part="val"`` gets ``round(val_fraction * N)`` samples,
    ``part="fit"`` the rest. The same ``seed`` gives disjoint, complementary parts (indices kept sorted)."""

    def __init__(self, dataset, part: str = "fit", val_fraction: float = 0.1, seed: int = 0):
        if part not in ("fit", "val"):
            raise ValueError(f"TrainValSplit: part must be 'fit' or 'val', got {part!r}")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"TrainValSplit: val_fraction must be in (0, 1), got {val_fraction!r}; "
                             "set dataset.val_fraction=0.1 for example")
        n = len(dataset)
        n_val = int(round(float(val_fraction) * n))
        perm = np.random.default_rng(int(seed)).permutation(n)
        indices = np.sort(perm[:n_val] if part == "val" else perm[n_val:])
        super().__init__(dataset, indices, get_targets(dataset)[indices])
        self.part = part


class TrainTestSplit(_IndexView):
    """Deterministic held-out split for a dataset without an official test split: ``part="test"`` gets
    ``round(test_fraction * N_c)`` samples of every label ``c`` (stratified; ``stratify=False``:
    ``round(test_fraction * N)`` overall), ``part="train"`` the rest. The same ``seed`` gives disjoint,
    complementary parts (indices kept sorted). Split the full dataset first, then take a
    :class:`ClassSubset` of a part, so that ID and held-out-class OOD sets come from the same parts."""

    def __init__(self, dataset, part: str = "train", test_fraction: float = 0.3, seed: int = 0,
                 stratify: bool = True):
        if part not in ("train", "test"):
            raise ValueError(f"TrainTestSplit: part must be 'train' or 'test', got {part!r}")
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"TrainTestSplit: test_fraction must be in (0, 1), got {test_fraction!r}; "
                             "set dataset.test_fraction=0.3 for example")
        targets = get_targets(dataset)
        rng = np.random.default_rng(int(seed))
        groups = [np.flatnonzero(targets == c) for c in np.unique(targets)] if stratify else [np.arange(len(targets))]
        test = np.concatenate([g[rng.permutation(len(g))[:int(round(float(test_fraction) * len(g)))]]
                               for g in groups]) if len(targets) else np.zeros(0, np.int64)
        mask = np.zeros(len(targets), dtype=bool)
        mask[test] = True
        indices = np.flatnonzero(mask if part == "test" else ~mask)
        super().__init__(dataset, indices, targets[indices])
        self.part = part


class Subsample(_IndexView):
    """Deterministic random subset of ``min(limit, N)`` samples (indices kept sorted); all samples if
    ``limit`` is None."""

    def __init__(self, dataset, limit: int | None = None, seed: int = 0):
        n = len(dataset)
        if limit is None or int(limit) >= n:
            indices = np.arange(n)
        else:
            if int(limit) < 0:
                raise ValueError(f"Subsample: limit must be >= 0 or null, got {limit!r}")
            indices = np.sort(np.random.default_rng(int(seed)).choice(n, size=int(limit), replace=False))
        super().__init__(dataset, indices, get_targets(dataset)[indices])
        self.limit = limit


class AsOOD(Dataset):
    """Wraps any dataset as out-of-distribution: same images, label ``-1``."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.targets = np.full(len(dataset), -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, _ = self.dataset[i]
        return image, -1


def to_image_tensor(image) -> torch.Tensor:
    """Tensor ``[C, H, W]`` float32 in [0, 1] from a tensor (``[C,H,W]`` or ``[H,W]``; uint8 is /255) or a PIL image."""
    if not isinstance(image, torch.Tensor):
        from PIL import Image

        if isinstance(image, Image.Image):
            mode = image.mode
            if mode in ("1", "L", "LA"):
                image = image.convert("L")
            elif mode not in ("RGB", "RGBA"):
                image = image.convert("RGB")
            arr = np.asarray(image)
            image = torch.from_numpy(arr.copy())
            image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
        else:
            raise TypeError(f"expected a torch.Tensor [C, H, W] or a PIL image, got {type(image).__name__}")
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3:
        raise ValueError(f"expected an image of shape [C, H, W] or [H, W], got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    return image.float()


RESIZE_POLICIES = ("stretch", "letterbox", "none")


def image_hw(size, what: str = "dataset.image_size", min_side: int = 1) -> tuple[int, int]:
    """``(H, W)`` from an image size given as an int ``S`` (square ``S``×``S``) or a pair ``[H, W]`` (list,
    tuple or OmegaConf ListConfig). Anything else raises a ``ValueError`` that starts with ``what`` (the
    config key the value comes from)."""
    def side(v) -> int:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < min_side:
            raise ValueError
        return int(v)

    try:
        if isinstance(size, (str, bytes)):
            raise ValueError
        if isinstance(size, numbers.Integral):
            s = side(size)
            return s, s
        pair = list(size)
        if len(pair) != 2:
            raise ValueError
        return side(pair[0]), side(pair[1])
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int >= {min_side} (square) or a pair [H, W] of ints >= {min_side}, "
                         f"got {size!r}; e.g. 28 or [32, 48]") from None


class ModelInput(WrapsTargets):
    """Converts any dataset's images to the ID model's input: channels, size, normalization.

    Channel conversion: 1→3 repeats, 3→1 uses ITU-R BT.601 luma (0.299, 0.587, 0.114), 4→3 drops alpha.
    ``image_size`` is an int ``S`` (model input ``S``×``S``) or a pair ``[H, W]``. ``resize`` (config key
    ``dataset.resize``) says how an image whose size differs from ``H``×``W`` gets there; an image already
    ``H``×``W`` is never resampled:

    - ``"stretch"`` (default): bilinear, antialiased resize to ``H``×``W`` (the aspect ratio may change);
    - ``"letterbox"``: bilinear, antialiased resize by one factor ``min(H/h, W/w)`` (aspect kept, sides
      rounded), centred (extra pixel bottom/right), the rest padded with the per-channel ``mean``, which is
      exactly 0 after normalization;
    - ``"none"``: no resampling. The classification collate stacks a batch, so every image must then
      already be ``H``×``W``: an image of another size raises a ``ValueError`` (naming ``dataset.resize``)
      when it is read. With ``image_size=None`` (allowed only with ``"none"``) native sizes pass through
      unchecked, for ``batch_size=1`` or a collate that handles mixed sizes.

    Then ``(x - mean) / std`` per channel. Returns ``(image, label, index)``; ``index`` is the position here.
    """

    def __init__(self, dataset, channels: int, image_size: int | Sequence[int] | None, mean: Sequence[float],
                 std: Sequence[float], resize: str = "stretch"):
        if len(dataset) == 0:
            raise ValueError(f"ModelInput: dataset {_name(dataset)} is empty (empty split); "
                             "check its root/classes/limit settings")
        if int(channels) not in (1, 3):
            raise ValueError(f"ModelInput: channels must be 1 or 3, got {channels!r}")
        mean, std = list(mean), list(std)
        if len(mean) != int(channels) or len(std) != int(channels):
            raise ValueError(f"ModelInput: mean/std need {channels} values (one per channel), "
                             f"got mean={mean}, std={std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"ModelInput: std values must be > 0, got {std}")
        if resize not in RESIZE_POLICIES:
            raise ValueError(f"ModelInput: dataset.resize must be one of {', '.join(RESIZE_POLICIES)}, "
                             f"got {resize!r}; e.g. dataset.resize=letterbox")
        if image_size is None:
            if resize != "none":
                raise ValueError(f"ModelInput: dataset.image_size is null, which needs dataset.resize=none "
                                 f"(native sizes), got dataset.resize={resize}")
            self.size = None
        else:
            self.size = image_hw(image_size, "ModelInput: dataset.image_size")
        self.dataset = dataset
        self.channels = int(channels)
        # as given: an int (square), an (H, W) tuple, or None (native sizes); ``size`` is always (H, W) or None
        square_int = self.size is not None and isinstance(image_size, numbers.Integral)
        self.image_size = self.size[0] if square_int else self.size
        self.resize = resize
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._luma = torch.tensor(LUMA_601, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset)

    @staticmethod
    def _interpolate(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]

    def convert(self, image, index: int | None = None) -> torch.Tensor:
        """Normalized model input ``[channels, H, W]`` for one image (``index`` only names it in errors)."""
        x = to_image_tensor(image)
        c = x.shape[0]
        if c == 4:
            x, c = x[:3], 3
        if c == 2:  # gray + alpha
            x, c = x[:1], 1
        if c != self.channels:
            if c == 1 and self.channels == 3:
                x = x.expand(3, -1, -1)
            elif c == 3 and self.channels == 1:
                x = (x * self._luma).sum(0, keepdim=True)
            else:
                raise ValueError(f"ModelInput: cannot convert a {c}-channel image to {self.channels} channels")
        hw = tuple(x.shape[-2:])
        if self.size is None or hw == self.size:
            return (x - self.mean) / self.std
        H, W = self.size
        if self.resize == "stretch":
            return (self._interpolate(x, self.size) - self.mean) / self.std
        if self.resize == "none":
            where = f" (item {index} of {_name(self.dataset)})" if index is not None else ""
            raise ValueError(f"ModelInput: image{where} is {hw[0]}x{hw[1]} but dataset.image_size is {H}x{W} "
                             "and dataset.resize=none (no resizing; a batch needs equal sizes); "
                             "set dataset.resize=stretch or dataset.resize=letterbox")
        h, w = hw
        scale = min(H / h, W / w)
        nh, nw = min(H, max(1, round(h * scale))), min(W, max(1, round(w * scale)))
        if (nh, nw) != hw:
            x = self._interpolate(x, (nh, nw))
        x = (x - self.mean) / self.std
        top, left = (H - nh) // 2, (W - nw) // 2
        return F.pad(x, (left, W - nw - left, top, H - nh - top), value=0.0)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return self.convert(image, i), int(label), int(i)
