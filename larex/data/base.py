"""Dataset wrappers shared by every classification dataset.

Contract: a dataset returns ``(image, label)`` with ``image`` a float32 tensor ``[C, H, W]`` in ``[0, 1]``
at its native size and ``label`` an int (ID class index; OOD sets return ``-1``). Wrappers expose
``targets`` (``np.ndarray`` of int64 labels) so labels can be read without loading images.
"""
from __future__ import annotations

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
    "Subsample",
    "AsOOD",
    "ModelInput",
    "to_image_tensor",
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
        image, _ = self.dataset[int(self.indices[i])]
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


class ModelInput(WrapsTargets):
    """Converts any dataset's images to the ID model's input: channels, size, normalization.

    Channel conversion: 1→3 repeats, 3→1 uses ITU-R BT.601 luma (0.299, 0.587, 0.114), 4→3 drops alpha.
    Resize to ``image_size``×``image_size`` (bilinear, antialiased) only when the size differs; then
    ``(x - mean) / std`` per channel. Returns ``(image, label, index)``; ``index`` is the position here.
    """

    def __init__(self, dataset, channels: int, image_size: int, mean: Sequence[float], std: Sequence[float]):
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
        self.dataset = dataset
        self.channels = int(channels)
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._luma = torch.tensor(LUMA_601, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset)

    def convert(self, image) -> torch.Tensor:
        """Normalized model input ``[channels, image_size, image_size]`` for one image."""
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
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        return (x - self.mean) / self.std

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return self.convert(image), int(label), int(i)
