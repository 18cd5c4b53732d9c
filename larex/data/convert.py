"""Converters of object-detection benchmarks to COCO JSON and the OOD subset builder (the VOS protocol).

Plain functions (no argparse) that ``scripts/convert_voc.py``, ``scripts/convert_bdd100k.py`` and
``scripts/make_ood_subset.py`` call and tests import. Every function returns a COCO dict
(``images``: ``id``, ``file_name`` relative to an image folder, ``width``, ``height``; ``annotations``: ``id``,
``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` in pixels, ``area``, ``iscrowd``; ``categories``:
``id``, ``name``), which :func:`write_annotations` writes atomically and
:class:`larex.data.coco.CocoDetection` reads (boxes back as ``xyxy = [x, y, x + w, y + h]``).

Box conventions (continuous pixel coordinates, the image spans ``[0, W] x [0, H]``):

* Pascal VOC stores 1-based inclusive pixel indices: a box ``xmin..xmax`` covers pixels ``xmin-1 .. xmax-1``
  (0-based), i.e. ``[xmin - 1, xmax]`` in continuous coordinates. So ``x = xmin - 1``, ``y = ymin - 1``,
  ``w = xmax - xmin + 1``, ``h = ymax - ymin + 1`` (detectron2's VOC loader, used by VOS, does the same:
  xyxy ``[xmin - 1, ymin - 1, xmax, ymax]``).
* BDD100k ``box2d`` corners are float pixel coordinates: ``x = x1``, ``w = x2 - x1`` (``inclusive=True``:
  ``w = x2 - x1 + 1``, scalabel's ``to_coco``).

Difficult VOC objects are kept by default (``"difficult": 1``, ``"iscrowd": 0``), as detectron2 / VOS train
on them; ``keep_difficult=False`` drops them. ``CocoDetection`` ignores the ``difficult`` field.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from larex import io

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
"""The 20 Pascal VOC classes in the standard order (category ids 1..20)."""

BDD100K_CLASSES = ("pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle", "traffic light",
                   "traffic sign")
"""The 10 BDD100k detection classes (category ids 1..10)."""

BDD100K_ALIASES = {"person": "pedestrian", "motor": "motorcycle", "bike": "bicycle"}
"""Names of the older BDD100k label files (``bdd100k_labels_images_*.json``) -> the current names."""

ID_CLASS_SETS = {"voc": VOC_CLASSES, "bdd100k": BDD100K_CLASSES}
"""ID class sets by dataset name (``make_ood_subset.py --id voc``)."""

SYNONYMS = {
    # Pascal VOC -> COCO
    "aeroplane": "airplane", "diningtable": "dining table", "motorbike": "motorcycle", "pottedplant": "potted plant",
    "sofa": "couch", "tvmonitor": "tv", "tv monitor": "tv",
    # BDD100k -> COCO (a rider is a person on a bike; a COCO stop sign is a traffic sign)
    "pedestrian": "person", "rider": "person", "motor": "motorcycle", "bike": "bicycle", "traffic sign": "stop sign",
    # OpenImages -> COCO (direct equivalents and the kinds of person OpenImages labels instead of "Person")
    "television": "tv", "houseplant": "potted plant", "cattle": "cow", "kitchen & dining room table": "dining table",
    "man": "person", "woman": "person", "boy": "person", "girl": "person",
}
"""Normalized name -> canonical (COCO) name. Names are equal for :func:`ood_subset` when their canonical names
are; the other shared VOC/COCO names (bicycle, bird, boat, bottle, bus, car, cat, chair, cow, dog, horse, person,
sheep, train) are the same after lower-casing."""


# --------------------------------------------------------------------------------------------------
# shared
# --------------------------------------------------------------------------------------------------
def categories(names: Sequence[str]) -> list[dict]:
    """COCO categories with ids 1..C in ``names`` order."""
    return [{"id": k + 1, "name": str(n)} for k, n in enumerate(names)]


def _annotations(image_ids: np.ndarray, category_ids: np.ndarray, xywh: np.ndarray,
                 extra: Mapping[str, np.ndarray] | None = None) -> list[dict]:
    """COCO annotation dicts (ids 1..K) from per-object arrays; ``extra``: more int fields per object."""
    xywh = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    area = xywh[:, 2] * xywh[:, 3]
    extra = {k: np.asarray(v).astype(np.int64).tolist() for k, v in (extra or {}).items()}
    extra.setdefault("iscrowd", [0] * len(xywh))
    rows = zip(np.asarray(image_ids).tolist(), np.asarray(category_ids).tolist(), xywh.tolist(), area.tolist())
    out = []
    for k, (img, cat, box, a) in enumerate(rows):
        ann = {"id": k + 1, "image_id": int(img), "category_id": int(cat), "bbox": box, "area": a}
        ann.update({key: vals[k] for key, vals in extra.items()})
        out.append(ann)
    return out


def write_annotations(path: str | Path, coco: Mapping[str, Any]) -> Path:
    """Write a COCO dict as JSON, atomically (:func:`larex.io.write_json`). Returns the path."""
    path = Path(path)
    io.write_json(path, dict(coco))
    return path


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file (PIL reads the header only)."""
    from PIL import Image

    with Image.open(path) as im:
        return int(im.width), int(im.height)


# --------------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------------
def parse_voc_xml(path: str | Path) -> dict:
    """One VOC annotation file: ``{"width", "height" (0 when absent), "names": [K] (lower case),
    "boxes": [K, 4] float64 (xmin, ymin, xmax, ymax as stored: 1-based inclusive), "difficult": [K] bool}``."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path}: not a VOC annotation XML ({err})") from None

    def num(node, tag: str, default: float | None = None) -> float:
        el = None if node is None else node.find(tag)
        if el is None or el.text is None or not el.text.strip():
            if default is None:
                raise ValueError(f"{path}: an object has no <{tag}>")
            return default
        return float(el.text)

    size = root.find("size")
    names, boxes, difficult = [], [], []
    for obj in root.iter("object"):
        name_el = obj.find("name")
        if name_el is None or not (name_el.text or "").strip():
            raise ValueError(f"{path}: an object has no <name>")
        names.append(name_el.text.strip().lower())
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{path}: object {names[-1]!r} has no <bndbox>")
        boxes.append([num(bb, t) for t in ("xmin", "ymin", "xmax", "ymax")])
        difficult.append(bool(int(num(obj, "difficult", 0.0))))
    return {"width": int(num(size, "width", 0.0)), "height": int(num(size, "height", 0.0)), "names": names,
            "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "difficult": np.asarray(difficult, bool)}


def voc_boxes_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """VOC ``(xmin, ymin, xmax, ymax)`` (1-based inclusive) -> COCO ``[x, y, w, h]``:
    ``x = xmin - 1, y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0] - 1.0, b[:, 1] - 1.0, b[:, 2] - b[:, 0] + 1.0, b[:, 3] - b[:, 1] + 1.0], axis=1)


def voc_image_ids(root: str | Path, year: str | int, split: str) -> list[str]:
    """Image ids listed in ``root/VOC<year>/ImageSets/Main/<split>.txt`` (file order)."""
    path = Path(root) / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; --root must be the VOCdevkit folder holding VOC{year}/ "
                                f"(Annotations/, JPEGImages/, ImageSets/Main/{split}.txt)")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def voc_to_coco(root: str | Path, years: Iterable[str | int] = (2007, 2012), split: str = "trainval",
                keep_difficult: bool = True, image_root: str | Path | None = None) -> dict:
    """Pascal VOC (``root`` = VOCdevkit with ``VOC<year>/{Annotations,JPEGImages,ImageSets/Main}``) -> COCO dict.

    Images of every year's ``<split>.txt`` in order (ids 1..N); ``file_name`` is the JPEG's path relative to
    ``image_root`` (default ``root``), e.g. ``VOC2007/JPEGImages/000005.jpg``; width/height from the XML's
    ``<size>`` (read from the image when it is missing or 0). Categories 1..20 in :data:`VOC_CLASSES` order.
    Boxes: see the module docstring. Difficult objects: ``"difficult": 1`` when kept, none when
    ``keep_difficult=False``; every object has ``"iscrowd": 0``."""
    root = Path(root)
    years = [str(y) for y in years]
    image_root = Path(image_root) if image_root is not None else root
    cat_of = {n: k + 1 for k, n in enumerate(VOC_CLASSES)}
    images, seen = [], set()
    obj_img, obj_names, obj_boxes, obj_difficult = [], [], [], []
    for year in years:
        base = root / f"VOC{year}"
        for stem in voc_image_ids(root, year, split):
            jpeg = base / "JPEGImages" / f"{stem}.jpg"
            file_name = Path(os.path.relpath(jpeg, image_root)).as_posix()
            if file_name in seen:
                raise ValueError(f"{file_name} is listed twice (VOC{year} {split}.txt)")
            seen.add(file_name)
            xml = base / "Annotations" / f"{stem}.xml"
            if not xml.is_file():
                raise FileNotFoundError(f"{xml} not found (listed in VOC{year}/ImageSets/Main/{split}.txt)")
            rec = parse_voc_xml(xml)
            unknown = sorted(set(rec["names"]) - set(cat_of))
            if unknown:
                raise ValueError(f"{xml}: classes {unknown} are not VOC classes ({list(VOC_CLASSES)})")
            width, height = rec["width"], rec["height"]
            if width <= 0 or height <= 0:
                width, height = _image_size(jpeg)
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            keep = np.ones(len(rec["names"]), bool) if keep_difficult else ~rec["difficult"]
            obj_img.append(np.full(int(keep.sum()), image_id, np.int64))
            obj_names.extend(n for n, k in zip(rec["names"], keep) if k)
            obj_boxes.append(rec["boxes"][keep])
            obj_difficult.append(rec["difficult"][keep])
    img_ids = np.concatenate(obj_img) if obj_img else np.zeros(0, np.int64)
    boxes = np.concatenate(obj_boxes) if obj_boxes else np.zeros((0, 4))
    difficult = np.concatenate(obj_difficult) if obj_difficult else np.zeros(0, bool)
    cat_ids = np.array([cat_of[n] for n in obj_names], dtype=np.int64)
    anns = _annotations(img_ids, cat_ids, voc_boxes_to_xywh(boxes), {"difficult": difficult})
    return {"info": {"description": f"Pascal VOC {'+'.join(years)} {split}",
                     "box_convention": "x = xmin - 1, y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1",
                     "difficult": "kept (difficult: 1)" if keep_difficult else "dropped"},
            "images": images, "annotations": anns, "categories": categories(VOC_CLASSES)}


# --------------------------------------------------------------------------------------------------
# BDD100k
# --------------------------------------------------------------------------------------------------
def bdd100k_to_coco(frames: Sequence[Mapping[str, Any]], width: int = 1280, height: int = 720,
                    image_dir: str | Path | None = None, inclusive: bool = False) -> dict:
    """BDD100k detection labels (list of frames ``{"name", "labels": [{"category", "box2d": {x1, y1, x2, y2}}]}``,
    both the ``det_20`` and the older ``bdd100k_labels_images_*`` formats) -> COCO dict.

    Images in frame order (ids 1..N, ``file_name`` = ``name``, frame ``attributes`` such as weather / time of day
    kept as ``attributes``), ``width`` x ``height`` each, or read from ``image_dir/<name>`` when ``image_dir`` is
    given. Categories 1..10 in :data:`BDD100K_CLASSES` order (older names via :data:`BDD100K_ALIASES`); labels of
    other categories (lanes, drivable area, other vehicle, trailer, ...) and labels without ``box2d`` are dropped,
    as are boxes with no area. ``attributes.crowd`` becomes ``iscrowd``. Boxes: ``[x1, y1, x2 - x1, y2 - y1]``
    (``inclusive``: ``+ 1`` on w and h)."""
    if not isinstance(frames, Sequence) or isinstance(frames, (str, bytes)):
        raise ValueError("BDD100k labels must be a JSON list of frames ({'name': ..., 'labels': [...]})")
    cat_of = {n: k + 1 for k, n in enumerate(BDD100K_CLASSES)}
    cat_of.update({a: cat_of[n] for a, n in BDD100K_ALIASES.items()})
    image_dir = Path(image_dir) if image_dir is not None else None
    images, obj_img, obj_cat, corners, crowd = [], [], [], [], []
    for frame in frames:
        name = str(frame["name"])
        w, h = _image_size(image_dir / name) if image_dir is not None else (int(width), int(height))
        image_id = len(images) + 1
        image = {"id": image_id, "file_name": name, "width": w, "height": h}
        if frame.get("attributes"):
            image["attributes"] = dict(frame["attributes"])
        images.append(image)
        for lab in frame.get("labels") or ():
            cat = cat_of.get(str(lab.get("category", "")).strip().lower())
            box = lab.get("box2d")
            if cat is None or not box:
                continue
            obj_img.append(image_id)
            obj_cat.append(cat)
            corners.append([float(box[k]) for k in ("x1", "y1", "x2", "y2")])
            crowd.append(bool((lab.get("attributes") or {}).get("crowd", False)))
    c = np.asarray(corners, dtype=np.float64).reshape(-1, 4)
    xywh = np.concatenate([c[:, :2], c[:, 2:] - c[:, :2] + (1.0 if inclusive else 0.0)], axis=1)
    ok = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
    anns = _annotations(np.asarray(obj_img, np.int64)[ok], np.asarray(obj_cat, np.int64)[ok], xywh[ok],
                        {"iscrowd": np.asarray(crowd, bool)[ok]})
    return {"info": {"description": "BDD100k detection",
                     "box_convention": "x = x1, y = y1, w = x2 - x1" + (" + 1" if inclusive else "") +
                                       ", h = y2 - y1" + (" + 1" if inclusive else "")},
            "images": images, "annotations": anns, "categories": categories(BDD100K_CLASSES)}


# --------------------------------------------------------------------------------------------------
# OOD subsets
# --------------------------------------------------------------------------------------------------
def normalize_class_name(name: str, synonyms: Mapping[str, str] | None = None) -> str:
    """Lower case, ``_`` / ``-`` / runs of spaces -> one space, then :data:`SYNONYMS` (``synonyms`` first):
    ``"TVMonitor"`` -> ``"tv"``, ``"dining_table"`` -> ``"dining table"``."""
    s = re.sub(r"[\s_\-]+", " ", str(name).strip().lower())
    table = {**SYNONYMS, **{re.sub(r"[\s_\-]+", " ", k.strip().lower()): v for k, v in (synonyms or {}).items()}}
    seen = set()
    while s in table and s not in seen:  # follow chains (an extra synonym may name a VOC name)
        seen.add(s)
        s = re.sub(r"[\s_\-]+", " ", table[s].strip().lower())
    return s


def ood_subset(coco: Mapping[str, Any], id_classes: Sequence[str], drop_empty: bool = False,
               synonyms: Mapping[str, str] | None = None) -> tuple[dict, dict]:
    """The images of ``coco`` none of whose annotations (crowd ones included) is of an ID class.

    Category and ID names are compared after :func:`normalize_class_name`. ``drop_empty`` also drops images
    without any annotation. Returns ``(subset, stats)``: the subset keeps the input's other top-level keys, its
    categories and the kept images' annotations (in input order); ``stats``: ``images`` (input), ``kept``,
    ``with_id_objects``, ``empty_dropped``, ``matched`` (ID name -> the file's category names it matched) and
    ``unmatched`` (ID names that match no category: check the synonym table)."""
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise ValueError(f"not a COCO annotation dict: it has no {key!r} list")
    id_norm = {}
    for n in id_classes:
        id_norm.setdefault(normalize_class_name(n, synonyms), []).append(str(n))
    matched: dict[str, list[str]] = {str(n): [] for n in id_classes}
    id_cats = []
    for c in coco["categories"]:
        norm = normalize_class_name(c["name"], synonyms)
        if norm in id_norm:
            id_cats.append(int(c["id"]))
            for n in id_norm[norm]:
                matched[n].append(str(c["name"]))
    anns = coco["annotations"]
    ann_img = np.fromiter((int(a["image_id"]) for a in anns), dtype=np.int64, count=len(anns))
    ann_cat = np.fromiter((int(a["category_id"]) for a in anns), dtype=np.int64, count=len(anns))
    img_ids = np.fromiter((int(im["id"]) for im in coco["images"]), dtype=np.int64, count=len(coco["images"]))
    has_id = np.isin(img_ids, ann_img[np.isin(ann_cat, np.asarray(id_cats, np.int64))])
    empty = ~np.isin(img_ids, ann_img)
    keep = ~has_id & ~(empty if drop_empty else np.zeros_like(empty))
    kept_ids = img_ids[keep]
    ann_keep = np.isin(ann_img, kept_ids)
    subset = {k: v for k, v in coco.items() if k not in ("images", "annotations", "categories")}
    subset.update({"images": [im for im, k in zip(coco["images"], keep.tolist()) if k],
                   "annotations": [a for a, k in zip(anns, ann_keep.tolist()) if k],
                   "categories": list(coco["categories"])})
    stats = {"images": int(len(img_ids)), "kept": int(keep.sum()), "with_id_objects": int(has_id.sum()),
             "empty_dropped": int((empty & ~has_id).sum()) if drop_empty else 0,
             "matched": {n: v for n, v in matched.items() if v},
             "unmatched": [n for n, v in matched.items() if not v]}
    return subset, stats
