"""Fashion-MNIST read straight from the IDX files (e.g. Debian's ``dataset-fashion-mnist`` package)."""
from __future__ import annotations

import gzip
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from larex.data.base import DataRootNotFoundError

__all__ = ["read_idx", "FashionMNIST", "FASHION_MNIST_CLASSES"]

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzip-compressed if the name ends in ``.gz``) into a native-endian array.

    Header: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian uint32 sizes.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex() if raw else 'empty'})")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"{path}: IDX payload has {len(raw) - header} bytes, "
                         f"header promises {count * dtype.itemsize} for shape {dims}")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


class FashionMNIST(Dataset):
    """Fashion-MNIST from ``root`` holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.

    Missing files: with ``download=True`` falls back to ``torchvision.datasets.FashionMNIST(download_root or
    root, download=True)``; otherwise raises :class:`DataRootNotFoundError`. Items: ``([1, 28, 28] float in
    [0, 1], label)``. ``config_key`` names the setting shown in that error.
    """

    def __init__(self, root: str, train: bool = True, download: bool = False, download_root: str | None = None,
                 config_key: str = "dataset.root"):
        prefix = "train" if train else "t10k"
        files = [os.path.join(os.fspath(root), f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
        missing = [f for f in files if not os.path.isfile(f)]
        if not missing:
            images, labels = (read_idx(f) for f in files)
        elif download:
            import torchvision

            tv = torchvision.datasets.FashionMNIST(download_root or os.fspath(root), train=train, download=True)
            images, labels = tv.data.numpy(), tv.targets.numpy()
        else:
            download_key = config_key.rsplit(".", 1)[0] + ".download" if "." in config_key else "download"
            raise DataRootNotFoundError(
                f"Fashion-MNIST files not found: {', '.join(missing)}. Fix: `apt-get install dataset-fashion-mnist` "
                f"(installs them in /usr/share/datasets/fashion-mnist), or point `{config_key}=DIR` at a folder "
                f"holding them, or set `{download_key}=true` to download with torchvision.")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST in {root}: images {images.shape} and labels {labels.shape} do not match")
        self.root = os.fspath(root)
        self.train = train
        self.data = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).unsqueeze(1)  # [N, 1, 28, 28]
        self.targets = np.asarray(labels, dtype=np.int64)
        self.classes = list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.data[i].float().div_(255.0), int(self.targets[i])
