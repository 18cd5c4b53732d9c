"""OOD subset of a COCO-format detection set: the images with no object of an ID class (the VOS protocol).

    python scripts/make_ood_subset.py --annotations DATA/coco/annotations/instances_val2017.json --id voc \
        --out DATA/coco_ood/annotations/instances_val2017_ood_voc.json
    ln -s "$(realpath DATA/coco/val2017)" DATA/coco_ood/images

Input: a COCO annotation JSON (COCO val2017, or OpenImages converted to COCO format). ID classes: ``--id voc`` /
``--id bdd100k`` or ``--id-classes NAME ...``. Names are compared after normalization (lower case, ``_``/``-`` as
spaces) and the synonym table :data:`larex.data.convert.SYNONYMS` (VOC <-> COCO: aeroplane/airplane, diningtable/
dining table, motorbike/motorcycle, pottedplant/potted plant, sofa/couch, tvmonitor/tv; BDD100k and OpenImages
names too); ``--synonym NAME=ID_NAME`` adds entries. An image is dropped when any of its annotations (crowd ones
included) is of an ID class; ``--drop-empty`` also drops images without annotations. Prints how many images were
kept and warns about ID classes that match no category of the file. The logic is
:func:`larex.data.convert.ood_subset`; the file is written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from larex.data.convert import ID_CLASS_SETS, ood_subset, write_annotations


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True, help="input COCO annotation JSON")
    p.add_argument("--out", required=True, help="output COCO JSON")
    ids = p.add_mutually_exclusive_group(required=True)
    ids.add_argument("--id", choices=sorted(ID_CLASS_SETS), help="ID dataset whose classes to exclude")
    ids.add_argument("--id-classes", nargs="+", metavar="NAME", help="ID class names to exclude")
    p.add_argument("--synonym", action="append", default=[], metavar="NAME=ID_NAME",
                   help="extra synonym (repeatable), e.g. --synonym 'Van=car'")
    p.add_argument("--drop-empty", action="store_true", help="also drop images with no annotation")
    a = p.parse_args(argv)
    synonyms = {}
    for s in a.synonym:
        if "=" not in s:
            p.error(f"--synonym {s!r}: expected NAME=ID_NAME")
        k, v = s.split("=", 1)
        synonyms[k] = v
    src = Path(a.annotations)
    if not src.is_file():
        print(f"make_ood_subset: {src} not found", file=sys.stderr)
        return 2
    id_classes = list(ID_CLASS_SETS[a.id]) if a.id else list(a.id_classes)
    try:
        subset, stats = ood_subset(json.loads(src.read_text()), id_classes, drop_empty=a.drop_empty,
                                   synonyms=synonyms)
    except ValueError as err:
        print(f"make_ood_subset: {src}: {err}", file=sys.stderr)
        return 2
    if stats["unmatched"]:
        print(f"make_ood_subset: warning: ID classes {stats['unmatched']} match no category of {src} "
              "(add --synonym NAME=ID_NAME if the file names them otherwise)", file=sys.stderr)
    path = write_annotations(a.out, subset)
    print(f"kept {stats['kept']} of {stats['images']} images ({stats['with_id_objects']} with ID objects dropped"
          + (f", {stats['empty_dropped']} without annotations dropped" if a.drop_empty else "") + f") -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
