"""BDD100k detection labels -> COCO JSON (the VOS protocol's ID data for ``dataset=bdd100k``).

    python scripts/convert_bdd100k.py --labels DATA/bdd100k/labels/det_20/det_train.json \
        --out DATA/bdd100k/annotations/train.json
    python scripts/convert_bdd100k.py --labels DATA/bdd100k/labels/det_20/det_val.json \
        --out DATA/bdd100k/annotations/val.json

Input: the list-of-frames format ``[{"name": "xxx.jpg", "labels": [{"category": "car", "box2d": {"x1", "y1",
"x2", "y2"}}, ...]}]`` (``det_20/det_*.json`` or the older ``bdd100k_labels_images_*.json``, whose names
person / motor / bike are read as pedestrian / motorcycle / bicycle). Output categories 1..10: pedestrian, rider,
car, truck, bus, train, motorcycle, bicycle, traffic light, traffic sign; other labels (lanes, drivable area,
other vehicle, trailer, ...) are dropped. Boxes ``[x1, y1, x2 - x1, y2 - y1]`` (``--inclusive``: ``+ 1``, as
scalabel's to_coco). Images are 1280 x 720 unless ``--read-sizes`` (read each from ``--images`` with PIL).
``configs/dataset/bdd100k.yaml`` reads ``${data_root}/bdd100k/annotations/{train,val}.json`` with the images in
``images/100k/{train,val}/``. The logic is :func:`larex.data.convert.bdd100k_to_coco`; the file is written
atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from larex.data.convert import bdd100k_to_coco, write_annotations


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", required=True, help="BDD100k labels JSON (list of frames)")
    p.add_argument("--out", required=True, help="output COCO JSON")
    p.add_argument("--images", default=None, help="image folder (needed by --read-sizes)")
    p.add_argument("--read-sizes", action="store_true", help="read each image's size with PIL (default 1280x720)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--inclusive", action="store_true", help="w = x2 - x1 + 1, h = y2 - y1 + 1 (scalabel)")
    a = p.parse_args(argv)
    if a.read_sizes and not a.images:
        p.error("--read-sizes needs --images DIR")
    labels = Path(a.labels)
    if not labels.is_file():
        print(f"convert_bdd100k: {labels} not found", file=sys.stderr)
        return 2
    try:
        coco = bdd100k_to_coco(json.loads(labels.read_text()), width=a.width, height=a.height,
                               image_dir=a.images if a.read_sizes else None, inclusive=a.inclusive)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"convert_bdd100k: {labels}: {err}", file=sys.stderr)
        return 2
    path = write_annotations(a.out, coco)
    print(f"wrote {path}: {len(coco['images'])} images, {len(coco['annotations'])} objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
