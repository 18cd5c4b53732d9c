"""COCO-format detection data: an annotation JSON (``images``, ``annotations``, ``categories``) + an image folder.

:class:`CocoDetection` reads such a set for ID or OOD use (items ``(image [3, H, W] float32 in [0, 1], target)``,
target ``{"boxes": [K, 4] float32 xyxy in pixels, "labels": [K] int64, "image_id": int}``; labels index
``classes`` when given, else the categories in file order; crowd annotations are skipped). :func:`write_coco`
writes any dataset with that item format as PNG files + ``annotations.json`` (atomically), e.g. the generated
:class:`~larex.data.shapes.ShapesDetection` set or a converted VOC/BDD100k split.
"""
from __future__ import annotations

import io as _io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from larex import io


class CocoDetection(Dataset):
    """Args: root (folder), annotations (JSON path, relative to root), images (image folder, relative to root),
    classes (category names mapped to labels 0..C-1 in this order; annotations of other categories are dropped;
    None = every category in file order), config_key (the config key of ``root``, named in the missing-file
    error)."""

    def __init__(self, root: str | Path, annotations: str = "annotations.json", images: str = "images",
                 classes: Sequence[str] | None = None, config_key: str | None = None):
        self.root = Path(root).expanduser()
        ann_path, self.image_dir = self.root / annotations, self.root / images
        missing = [str(p) for p in (ann_path, self.image_dir) if not p.exists()]
        if missing:
            key = f"{config_key}=DIR (or data_root=DIR)" if config_key else \
                "the dataset's root (e.g. dataset.root=DIR or ood.<name>.root=DIR, default under data_root)"
            raise FileNotFoundError(f"COCO-format data: {', '.join(missing)} not found; set {key} to a folder "
                                    f"holding {annotations} and {images}/")
        data = json.loads(ann_path.read_text())
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{ann_path} is not a COCO annotation file: it has no {key!r} list")
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        order = list(classes) if classes is not None else list(names.values())  # file order
        unknown = sorted(set(order) - set(names.values()))
        if unknown:
            raise ValueError(f"{ann_path}: classes {unknown} are not categories of the file ({sorted(names.values())})")
        label_of = {cid: order.index(n) for cid, n in names.items() if n in order}
        self.classes = tuple(order)
        self.images = sorted(data["images"], key=lambda im: int(im["id"]))
        per_image: dict[int, list[tuple[list[float], int]]] = {int(im["id"]): [] for im in self.images}
        for a in data["annotations"]:
            if a.get("iscrowd", 0) or int(a["category_id"]) not in label_of or int(a["image_id"]) not in per_image:
                continue
            x, y, w, h = (float(v) for v in a["bbox"])
            if w > 0 and h > 0:
                per_image[int(a["image_id"])].append(([x, y, x + w, y + h], label_of[int(a["category_id"])]))
        self._targets = per_image

    def __len__(self) -> int:
        return len(self.images)

    @property
    def targets(self) -> np.ndarray:
        """Image-level labels for the generic wrappers (``Subsample``): 0 for every image (objects carry theirs)."""
        return np.zeros(len(self.images), dtype=np.int64)

    def __getitem__(self, i: int):
        from PIL import Image

        info = self.images[i]
        path = self.image_dir / info["file_name"]
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        anns = self._targets[int(info["id"])]
        boxes = np.array([b for b, _ in anns], dtype=np.float32).reshape(-1, 4)
        labels = np.array([lab for _, lab in anns], dtype=np.int64)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()), {
            "boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels), "image_id": int(info["id"])}


def write_coco(dataset, root: str | Path, classes: Sequence[str], images: str = "images",
               annotations: str = "annotations.json") -> Path:
    """Write ``dataset`` (items ``(image [3, H, W] in [0, 1], {"boxes", "labels", "image_id"})``) as
    ``root/images/<id>.png`` (8-bit RGB) and ``root/annotations.json`` (COCO: bbox ``[x, y, w, h]``, category ids
    1..C in ``classes`` order); every file is written atomically. Returns the annotation path."""
    from PIL import Image

    root = Path(root)
    out_images, anns = [], []
    for i in range(len(dataset)):
        img, t = dataset[i]
        image_id = int(t.get("image_id", i))
        arr = (img.clamp(0, 1).numpy().transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)
        buf = _io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="PNG")
        name = f"{image_id:08d}.png"
        io.write_bytes(root / images / name, buf.getvalue())
        out_images.append({"id": image_id, "file_name": name, "height": int(arr.shape[0]), "width": int(arr.shape[1])})
        for box, lab in zip(t["boxes"].tolist(), t["labels"].tolist()):
            x0, y0, x1, y1 = box
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(lab) + 1, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    cats = [{"id": k + 1, "name": str(c)} for k, c in enumerate(classes)]
    path = root / annotations
    io.write_json(path, {"images": out_images, "annotations": anns, "categories": cats})
    return path
