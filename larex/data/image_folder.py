"""Images from a folder: an ImageFolder-style tree (one subfolder per class) or a flat folder."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from larex.data.base import AsOOD, DataRootNotFoundError

__all__ = ["ImageFolder", "ImageFolderOOD", "IMAGE_EXTENSIONS", "load_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def load_image(path: str) -> torch.Tensor:
    """Float32 ``[C, H, W]`` in [0, 1]; grayscale stays 1 channel (16-bit scaled by 65535), all else RGB."""
    from PIL import Image

    with Image.open(path) as im:
        mode = im.mode
        if mode in ("1", "L", "LA", "P;L"):
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        elif mode.startswith("I;16") or mode == "I":
            arr = np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)
        elif mode == "F":
            arr = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
        else:  # RGB, RGBA (alpha dropped), P, CMYK, YCbCr, ...
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(np.ascontiguousarray(arr))
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


class ImageFolder(Dataset):
    """Lazily loaded images under ``root``, in sorted path order.

    Layouts: ``root/<class>/...`` → label = index of ``<class>`` among the sorted class folders
    (``classes``); images directly in ``root`` (flat) → label ``-1``. ``recursive`` also takes images in
    nested folders (below the class folder). Extensions match case-insensitively. ``config_key`` names the
    setting shown when ``root`` is missing.
    """

    def __init__(self, root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS, recursive: bool = True,
                 config_key: str = "ood.<name>.root"):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataRootNotFoundError(
                f"image folder not found: {os.path.abspath(root)!r}. "
                f"Set `{config_key}=DIR` to a folder of images (flat or one subfolder per class).")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        rel_paths: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, root)
            depth = 0 if rel_dir == "." else rel_dir.count(os.sep) + 1
            if not recursive and depth >= 1:
                dirnames[:] = []  # at most root/<class>/<file>
            rel_paths.extend(os.path.normpath(os.path.join(rel_dir, f)) for f in filenames
                             if not f.startswith(".") and f.lower().endswith(exts))
        if not rel_paths:
            how = "recursively " if recursive else ""
            raise ValueError(f"no images found in {os.path.abspath(root)!r} (searched {how}for extensions "
                             f"{', '.join(exts)}); put images there or pass `extensions`.")
        rel_paths.sort()
        parts = [p.split(os.sep, 1) for p in rel_paths]
        in_root = [p[0] for p in parts if len(p) == 1]
        if in_root and len(in_root) != len(parts):
            raise ValueError(f"image folder {os.path.abspath(root)!r} mixes images in the root (e.g. {in_root[0]!r}) "
                             "with class subfolders; use either a flat folder or one subfolder per class.")
        if in_root:
            self.classes: list[str] = []
            targets = np.full(len(rel_paths), -1, dtype=np.int64)
        else:
            names = np.array([p[0] for p in parts])
            self.classes = sorted(set(names.tolist()))
            targets = np.searchsorted(np.array(self.classes), names).astype(np.int64)
        self.root = root
        self.samples = [os.path.join(root, p) for p in rel_paths]
        self.targets = targets

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return load_image(self.samples[i]), int(self.targets[i])


class ImageFolderOOD(AsOOD):
    """``AsOOD(ImageFolder(root, ...))`` with ``root`` at the top level, so an OOD spec is set by
    ``ood.<name>.root=DIR``."""

    def __init__(self, root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS, recursive: bool = True,
                 config_key: str = "ood.<name>.root"):
        super().__init__(ImageFolder(root, extensions=extensions, recursive=recursive, config_key=config_key))
        self.root = os.fspath(root)
