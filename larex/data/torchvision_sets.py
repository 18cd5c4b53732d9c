"""Thin wrappers over torchvision's MNIST, CIFAR-10/100 and SVHN: uint8 kept in memory, items float [0, 1].

They download only when ``download=True``; otherwise missing data raises :class:`DataRootNotFoundError`
naming the expected path and the fix.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from larex.data.base import DataRootNotFoundError

__all__ = ["MNIST", "CIFAR10", "CIFAR100", "SVHN"]


def _download_key(config_key: str) -> str:
    return config_key.rsplit(".", 1)[0] + ".download" if "." in config_key else "download"


class _TorchvisionImages(Dataset):
    """Shared loader: ``self.data`` uint8 ``[N, C, H, W]``, ``self.targets`` int64, ``self.classes``."""

    title = ""

    def _load(self, factory, root: str, expected: str, download: bool, config_key: str, **kwargs):
        missing = DataRootNotFoundError(
            f"{self.title} not found: expected {os.path.abspath(expected)!r}. Set `{config_key}=DIR` to the folder "
            f"holding it, or `{_download_key(config_key)}=true` to download it with torchvision.")
        if not download and not os.path.exists(expected):
            raise missing
        try:
            return factory(os.fspath(root), download=bool(download), **kwargs)
        except RuntimeError as err:
            if download:
                raise
            raise DataRootNotFoundError(f"{missing} (torchvision: {err})") from err

    def _store(self, data: np.ndarray | torch.Tensor, targets, classes) -> None:
        data = torch.as_tensor(np.asarray(data, dtype=np.uint8))
        self.data = data.contiguous()
        self.targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        self.classes = [str(c) for c in classes]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.data[i].float().div_(255.0), int(self.targets[i])


class MNIST(_TorchvisionImages):
    """MNIST from ``root/MNIST/raw`` (torchvision layout); items ``([1, 28, 28], digit)``."""

    title = "MNIST"

    def __init__(self, root: str, train: bool = True, download: bool = False, config_key: str = "dataset.root"):
        import torchvision

        tv = self._load(torchvision.datasets.MNIST, root, os.path.join(root, "MNIST", "raw"), download,
                        config_key, train=train)
        self._store(tv.data.numpy()[:, None], tv.targets.numpy(), tv.classes)


class CIFAR10(_TorchvisionImages):
    """CIFAR-10 from ``root/cifar-10-batches-py``; items ``([3, 32, 32], class)``."""

    title = "CIFAR-10"
    _folder = "cifar-10-batches-py"
    _factory = "CIFAR10"

    def __init__(self, root: str, train: bool = True, download: bool = False, config_key: str = "dataset.root"):
        import torchvision

        factory = getattr(torchvision.datasets, self._factory)
        tv = self._load(factory, root, os.path.join(root, self._folder), download, config_key, train=train)
        self._store(np.asarray(tv.data).transpose(0, 3, 1, 2), tv.targets, tv.classes)


class CIFAR100(CIFAR10):
    """CIFAR-100 (fine labels) from ``root/cifar-100-python``; items ``([3, 32, 32], class)``."""

    title = "CIFAR-100"
    _folder = "cifar-100-python"
    _factory = "CIFAR100"


class SVHN(_TorchvisionImages):
    """SVHN cropped digits from ``root/<split>_32x32.mat``; items ``([3, 32, 32], digit)`` (digit 0 is label 0)."""

    title = "SVHN"

    def __init__(self, root: str, split: str = "train", download: bool = False, config_key: str = "dataset.root"):
        import torchvision

        if split not in ("train", "test", "extra"):
            raise ValueError(f"SVHN: split must be 'train', 'test' or 'extra', got {split!r}")
        tv = self._load(torchvision.datasets.SVHN, root, os.path.join(root, f"{split}_32x32.mat"), download,
                        config_key, split=split)
        self._store(tv.data, tv.labels, [str(d) for d in range(10)])
