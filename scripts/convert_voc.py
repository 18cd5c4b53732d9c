"""Pascal VOC -> COCO JSON (the VOS protocol's ID data for ``dataset=voc``).

    python scripts/convert_voc.py --root DATA/voc/images --years 2007 2012 --split trainval \
        --out DATA/voc/annotations/trainval.json
    python scripts/convert_voc.py --root DATA/voc/images --years 2007 --split test \
        --out DATA/voc/annotations/test.json

``--root`` is the VOCdevkit folder (``VOC2007/``, ``VOC2012/`` with ``Annotations/*.xml``, ``JPEGImages/``,
``ImageSets/Main/<split>.txt``); ``configs/dataset/voc.yaml`` expects it at ``${data_root}/voc/images`` (move or
symlink it there), so ``file_name`` is e.g. ``VOC2007/JPEGImages/000005.jpg`` (relative to ``--image-root``,
default ``--root``).

Boxes: VOC coordinates are 1-based inclusive pixel indices; the COCO box is ``x = xmin - 1, y = ymin - 1,
w = xmax - xmin + 1, h = ymax - ymin + 1`` (detectron2's convention, which VOS uses). Category ids 1..20 in the
standard VOC order (aeroplane ... tvmonitor). Difficult objects are kept with ``"difficult": 1`` (detectron2 and
VOS train on them; every object has ``"iscrowd": 0``) unless ``--drop-difficult``. The logic is
:func:`larex.data.convert.voc_to_coco`; the file is written atomically.
"""
from __future__ import annotations

import argparse
import sys

from larex.data.convert import voc_to_coco, write_annotations


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="VOCdevkit folder (holds VOC2007/, VOC2012/)")
    p.add_argument("--years", nargs="+", default=["2007", "2012"], help="VOC years to merge (default: 2007 2012)")
    p.add_argument("--split", default="trainval", help="ImageSets/Main/<split>.txt (train, val, trainval, test)")
    p.add_argument("--out", required=True, help="output COCO JSON")
    p.add_argument("--image-root", default=None, help="folder file_name is relative to (default: --root)")
    p.add_argument("--drop-difficult", action="store_true", help="drop objects marked difficult (default: keep)")
    a = p.parse_args(argv)
    try:
        coco = voc_to_coco(a.root, a.years, a.split, keep_difficult=not a.drop_difficult, image_root=a.image_root)
    except (FileNotFoundError, ValueError) as err:
        print(f"convert_voc: {err}", file=sys.stderr)
        return 2
    path = write_annotations(a.out, coco)
    n_diff = sum(int(x.get("difficult", 0)) for x in coco["annotations"])
    note = "difficult dropped" if a.drop_difficult else f"{n_diff} difficult kept"
    print(f"wrote {path}: {len(coco['images'])} images, {len(coco['annotations'])} objects ({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
