"""Detection benchmark tooling (larex.data.convert, scripts/convert_*.py, scripts/make_ood_subset.py) and the
VOS-protocol configs (dataset=voc / bdd100k, ood coco / openimages), on tiny files generated in tmp_path."""
from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from larex.data.coco import CocoDetection
from larex.data.convert import (BDD100K_CLASSES, SYNONYMS, VOC_CLASSES, bdd100k_to_coco, normalize_class_name,
                                ood_subset, parse_voc_xml, voc_to_coco, write_annotations)
from larex.data.detection import UnknownObjects

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# VOC objects: (name, xmin, ymin, xmax, ymax, difficult), 1-based inclusive pixel indices
VOC = {
    ("2007", "000005"): ((40, 30), [("chair", 1, 1, 10, 20, 0), ("person", 5, 6, 40, 30, 1)]),
    ("2007", "000007"): ((32, 24), [("tvmonitor", 3, 4, 12, 14, 0)]),
    ("2007", "000009"): ((20, 16), [("aeroplane", 2, 2, 19, 15, 0)]),  # test
    ("2012", "2008_000001"): ((24, 36), [("diningtable", 10, 12, 20, 30, 0), ("dog", 1, 1, 24, 36, 0)]),
}
SPLITS = {("2007", "trainval"): ["000005", "000007"], ("2007", "test"): ["000009"],
          ("2012", "trainval"): ["2008_000001"]}
NO_SIZE = ("2007", "000007")  # its XML has <size> 0 x 0: the converter reads the JPEG


def _voc_xml(size, objects, write_size=True):
    w, h = size if write_size else (0, 0)
    objs = "".join(f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated><difficult>{d}</difficult>"
                   f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
                   for n, x0, y0, x1, y1, d in objects)
    return (f"<annotation><folder>VOC</folder><filename>x.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>")


def make_voc(root: Path) -> Path:
    """A VOCdevkit folder (VOC2007 + VOC2012) with JPEGs of the sizes in VOC."""
    for (year, stem), (size, objects) in VOC.items():
        base = root / f"VOC{year}"
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{stem}.xml").write_text(_voc_xml(size, objects, (year, stem) != NO_SIZE))
        Image.new("RGB", size, (200, 50, 10)).save(base / "JPEGImages" / f"{stem}.jpg", quality=90)
    for (year, split), stems in SPLITS.items():
        d = root / f"VOC{year}" / "ImageSets" / "Main"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    return root


def _expected_voc(keys, keep_difficult=True):
    images, anns = [], []
    for i, (year, stem) in enumerate(keys, start=1):
        (w, h), objects = VOC[(year, stem)]
        images.append({"id": i, "file_name": f"VOC{year}/JPEGImages/{stem}.jpg", "width": w, "height": h})
        for n, x0, y0, x1, y1, d in objects:
            if d and not keep_difficult:
                continue
            bw, bh = x1 - x0 + 1, y1 - y0 + 1
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": VOC_CLASSES.index(n) + 1,
                         "bbox": [x0 - 1.0, y0 - 1.0, float(bw), float(bh)], "area": float(bw * bh),
                         "iscrowd": 0, "difficult": d})
    return images, anns


TRAINVAL = [("2007", "000005"), ("2007", "000007"), ("2012", "2008_000001")]


def test_voc_xml_and_converter_output_exactly(tmp_path):
    root = make_voc(tmp_path / "VOCdevkit")
    rec = parse_voc_xml(root / "VOC2007" / "Annotations" / "000005.xml")
    assert (rec["width"], rec["height"], rec["names"]) == (40, 30, ["chair", "person"])
    assert rec["boxes"].tolist() == [[1, 1, 10, 20], [5, 6, 40, 30]] and rec["difficult"].tolist() == [False, True]

    coco = voc_to_coco(root, ["2007", "2012"], "trainval")
    images, anns = _expected_voc(TRAINVAL)
    assert coco["images"] == images  # 000007's size came from the JPEG (its XML says 0 x 0)
    assert coco["annotations"] == anns
    assert coco["categories"] == [{"id": k + 1, "name": n} for k, n in enumerate(VOC_CLASSES)]
    assert coco["categories"][0]["name"] == "aeroplane" and coco["categories"][19]["name"] == "tvmonitor"
    # a box spanning the whole image (xmin=1, xmax=W) covers [0, W]
    dog = coco["annotations"][-1]
    assert dog["bbox"] == [0.0, 0.0, 24.0, 36.0]

    dropped = voc_to_coco(root, [2007, 2012], "trainval", keep_difficult=False)
    images, anns = _expected_voc(TRAINVAL, keep_difficult=False)
    assert dropped["images"] == images and dropped["annotations"] == anns and len(anns) == 4

    # file_name relative to another folder holding VOCdevkit
    other = voc_to_coco(root, ["2007"], "test", image_root=tmp_path)
    assert [im["file_name"] for im in other["images"]] == ["VOCdevkit/VOC2007/JPEGImages/000009.jpg"]

    with pytest.raises(FileNotFoundError, match=r"VOC2010.*--root must be the VOCdevkit"):
        voc_to_coco(root, ["2010"], "trainval")
    (root / "VOC2007" / "Annotations" / "000009.xml").write_text(_voc_xml((20, 16), [("giraffe", 1, 1, 5, 5, 0)]))
    with pytest.raises(ValueError, match=r"000009.xml.*giraffe"):
        voc_to_coco(root, ["2007"], "test")


def test_voc_round_trip_through_coco_detection(tmp_path):
    root = make_voc(tmp_path / "VOCdevkit")
    write_annotations(tmp_path / "ann.json", voc_to_coco(root, ["2007", "2012"], "trainval"))
    ds = CocoDetection(tmp_path, annotations="ann.json", images="VOCdevkit", classes=list(VOC_CLASSES))
    assert len(ds) == 3
    for i, key in enumerate(TRAINVAL):
        (w, h), objects = VOC[key]
        img, t = ds[i]
        assert img.shape == (3, h, w) and t["image_id"] == i + 1
        expect = torch.tensor([[x0 - 1, y0 - 1, x1, y1] for _, x0, y0, x1, y1, _ in objects], dtype=torch.float32)
        assert torch.equal(t["boxes"], expect)  # xyxy = [xmin - 1, ymin - 1, xmax, ymax]
        assert t["labels"].tolist() == [VOC_CLASSES.index(n) for n, *_ in objects]


FRAMES = [
    {"name": "a.jpg", "attributes": {"weather": "rainy", "timeofday": "night"},
     "labels": [{"category": "car", "box2d": {"x1": 10.5, "y1": 20.0, "x2": 110.5, "y2": 70.25}},
                {"category": "person", "box2d": {"x1": 0.0, "y1": 1.0, "x2": 5.0, "y2": 21.0}},  # old name
                {"category": "lane", "poly2d": [{"vertices": [[0, 0], [1, 1]]}]},  # no box: dropped
                {"category": "traffic sign", "box2d": {"x1": 3.0, "y1": 3.0, "x2": 3.0, "y2": 9.0}},  # no area
                {"category": "motor", "box2d": {"x1": 1.0, "y1": 2.0, "x2": 4.0, "y2": 8.0},
                 "attributes": {"crowd": True}}]},
    {"name": "b.jpg", "labels": None},
    {"name": "c.jpg", "labels": [{"category": "other vehicle", "box2d": {"x1": 0, "y1": 0, "x2": 9, "y2": 9}},
                                 {"category": "traffic light", "box2d": {"x1": 7, "y1": 8, "x2": 9, "y2": 18}},
                                 {"category": "bike", "box2d": {"x1": 1, "y1": 1, "x2": 3, "y2": 2}}]},
]


def test_bdd100k_converter_output_exactly(tmp_path):
    coco = bdd100k_to_coco(FRAMES)
    assert coco["categories"] == [{"id": k + 1, "name": n} for k, n in enumerate(BDD100K_CLASSES)]
    assert coco["images"] == [
        {"id": 1, "file_name": "a.jpg", "width": 1280, "height": 720,
         "attributes": {"weather": "rainy", "timeofday": "night"}},
        {"id": 2, "file_name": "b.jpg", "width": 1280, "height": 720},
        {"id": 3, "file_name": "c.jpg", "width": 1280, "height": 720}]
    cat = {n: k + 1 for k, n in enumerate(BDD100K_CLASSES)}
    got = [(a["id"], a["image_id"], a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in coco["annotations"]]
    assert got == [(1, 1, cat["car"], [10.5, 20.0, 100.0, 50.25], 5025.0, 0),
                   (2, 1, cat["pedestrian"], [0.0, 1.0, 5.0, 20.0], 100.0, 0),
                   (3, 1, cat["motorcycle"], [1.0, 2.0, 3.0, 6.0], 18.0, 1),
                   (4, 3, cat["traffic light"], [7.0, 8.0, 2.0, 10.0], 20.0, 0),
                   (5, 3, cat["bicycle"], [1.0, 1.0, 2.0, 1.0], 2.0, 0)]
    incl = bdd100k_to_coco(FRAMES, inclusive=True)
    assert incl["annotations"][0]["bbox"] == [10.5, 20.0, 101.0, 51.25] and len(incl["annotations"]) == 6

    for name, size in (("a.jpg", (64, 48)), ("b.jpg", (32, 40)), ("c.jpg", (20, 30))):
        Image.new("RGB", size).save(tmp_path / name)
    sized = bdd100k_to_coco(FRAMES, image_dir=tmp_path)
    assert [(im["width"], im["height"]) for im in sized["images"]] == [(64, 48), (32, 40), (20, 30)]
    small = bdd100k_to_coco(FRAMES, width=64, height=48)
    assert {(im["width"], im["height"]) for im in small["images"]} == {(64, 48)}
    with pytest.raises(ValueError, match="list of frames"):
        bdd100k_to_coco({"frames": FRAMES})

    write_annotations(tmp_path / "bdd.json", sized)
    ds = CocoDetection(tmp_path, annotations="bdd.json", images=".", classes=list(BDD100K_CLASSES))
    _, t = ds[0]  # the crowd box is skipped by CocoDetection
    assert t["boxes"].tolist() == [[10.5, 20.0, 110.5, 70.25], [0.0, 1.0, 5.0, 21.0]]
    assert t["labels"].tolist() == [2, 0]


def _coco_source():
    cats = [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}, {"id": 25, "name": "giraffe"},
            {"id": 67, "name": "dining table"}, {"id": 38, "name": "kite"}, {"id": 63, "name": "couch"},
            {"id": 72, "name": "tv"}]
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 30, "height": 20} for i in (11, 12, 13, 14, 15, 16, 17)]
    objects = [(11, 1), (12, 25), (12, 38), (13, 25), (13, 63), (15, 38), (15, 1), (16, 72), (17, 38), (12, 25)]
    anns = [{"id": k + 1, "image_id": im, "category_id": c, "bbox": [1.0, 2.0, 5.0, 6.0], "area": 30.0,
             "iscrowd": int(k == 6)} for k, (im, c) in enumerate(objects)]  # (15, person) is a crowd box
    return {"info": {"description": "toy"}, "licenses": [], "images": images, "annotations": anns, "categories": cats}


def test_class_name_normalization():
    voc_coco = {"aeroplane": "airplane", "diningtable": "dining table", "motorbike": "motorcycle",
                "pottedplant": "potted plant", "sofa": "couch", "tvmonitor": "tv"}
    for voc, coco in voc_coco.items():
        assert normalize_class_name(voc) == normalize_class_name(coco) == coco
    for same in ("bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog", "horse", "person",
                 "sheep", "train"):
        assert normalize_class_name(same.upper()) == same and same not in SYNONYMS
    assert normalize_class_name("Dining_Table") == "dining table" and normalize_class_name("TVMonitor") == "tv"
    assert normalize_class_name("  Potted-Plant ") == "potted plant"
    assert normalize_class_name("Kitchen & dining room table") == "dining table"
    assert normalize_class_name("Van", {"van": "car"}) == "car"
    assert normalize_class_name("pedestrian") == normalize_class_name("Person")


def test_ood_subset_keeps_exactly_the_images_without_id_objects():
    src = _coco_source()
    subset, stats = ood_subset(src, VOC_CLASSES)
    # 11 person, 13 couch (sofa), 15 crowd person, 16 tv (tvmonitor) have ID objects; 14 has no annotation
    assert [im["id"] for im in subset["images"]] == [12, 14, 17]
    assert [a["id"] for a in subset["annotations"]] == [2, 3, 9, 10]
    assert subset["categories"] == src["categories"] and subset["info"] == src["info"] and "licenses" in subset
    assert stats["images"] == 7 and stats["kept"] == 3 and stats["with_id_objects"] == 4
    assert stats["matched"] == {"aeroplane": ["airplane"], "diningtable": ["dining table"], "person": ["person"],
                                "sofa": ["couch"], "tvmonitor": ["tv"]}
    assert "cat" in stats["unmatched"] and "person" not in stats["unmatched"]
    no_empty, stats = ood_subset(src, VOC_CLASSES, drop_empty=True)
    assert [im["id"] for im in no_empty["images"]] == [12, 17] and stats["empty_dropped"] == 1
    kites, _ = ood_subset(src, ["Kite"])
    assert [im["id"] for im in kites["images"]] == [11, 13, 14, 16]
    with pytest.raises(ValueError, match="annotations"):
        ood_subset({"images": [], "categories": []}, VOC_CLASSES)


def _start(script, *args):
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / script), *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_scripts_run_and_write_what_the_library_builds(tmp_path):
    root = make_voc(tmp_path / "VOCdevkit")
    out = tmp_path / "voc" / "annotations" / "trainval.json"
    (tmp_path / "bdd.json").write_text(json.dumps(FRAMES))
    (tmp_path / "instances.json").write_text(json.dumps(_coco_source()))
    sub = tmp_path / "coco_ood" / "annotations" / "instances_val2017_ood_voc.json"
    procs = [  # the three scripts at once (each start imports torch through larex.io)
        _start("convert_voc.py", "--root", root, "--years", "2007", "2012", "--split", "trainval", "--out", out),
        _start("convert_bdd100k.py", "--labels", tmp_path / "bdd.json", "--out", tmp_path / "bdd_coco.json"),
        _start("make_ood_subset.py", "--annotations", tmp_path / "instances.json", "--id", "voc", "--out", sub)]
    (voc_out, _), (_, bdd_err), (ood_out, ood_err) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [0, 0, 0], (bdd_err, ood_err)
    assert "3 images, 5 objects (1 difficult kept)" in voc_out
    assert json.loads(out.read_text()) == json.loads(json.dumps(voc_to_coco(root, ["2007", "2012"], "trainval")))
    assert json.loads((tmp_path / "bdd_coco.json").read_text()) == json.loads(json.dumps(bdd100k_to_coco(FRAMES)))
    assert "kept 3 of 7 images" in ood_out and "warning" in ood_err  # VOC classes the toy file lacks (cat, ...)
    assert [im["id"] for im in json.loads(sub.read_text())["images"]] == [12, 14, 17]

    # error paths, in process: exit status 2 and a message naming the file
    for script, argv in (("convert_voc.py", ["--root", tmp_path / "nope", "--out", tmp_path / "x.json"]),
                         ("convert_bdd100k.py", ["--labels", tmp_path / "nope.json", "--out", tmp_path / "x.json"]),
                         ("make_ood_subset.py", ["--annotations", tmp_path / "nope.json", "--id", "voc",
                                                 "--out", tmp_path / "x.json"])):
        main = runpy.run_path(str(REPO / "scripts" / script))["main"]
        assert main([str(a) for a in argv]) == 2
    assert not (tmp_path / "x.json").exists()


def _config(group, name, data_root, updates=None, **extra):
    """configs/<group>/<name>.yaml placed where Hydra puts it, with data_root (and ``updates``), resolved."""
    node = OmegaConf.load(CONFIGS / group / f"{name}.yaml")
    cfg = OmegaConf.create({"data_root": str(data_root), "seed": 0, **extra})
    if group == "ood":
        cfg.ood = {name: node}
    else:
        cfg.dataset = node
    for key, value in (updates or {}).items():
        OmegaConf.update(cfg, key, value)
    OmegaConf.resolve(cfg)
    return cfg


def _root_cause(err):
    while err.__cause__ is not None:
        err = err.__cause__
    return err


@pytest.mark.parametrize("group,name,key,path", [
    ("ood", "coco", "ood.coco", "coco_ood/annotations/instances_val2017_ood_voc.json"),
    ("ood", "openimages", "ood.openimages", "openimages_ood/annotations/openimages_ood_voc.json"),
    ("dataset", "voc", "dataset.test", "voc/annotations/test.json"),
    ("dataset", "bdd100k", "dataset.test", "bdd100k/annotations/val.json"),
])
def test_missing_data_root_names_the_paths_and_the_key(tmp_path, group, name, key, path):
    from hydra.utils import instantiate

    cfg = _config(group, name, tmp_path / "data", **({"dataset": {"name": "voc"}} if group == "ood" else {}))
    node = cfg.ood[name] if group == "ood" else cfg.dataset.splits.test
    with pytest.raises(Exception) as info:
        instantiate(node)
    err = _root_cause(info.value)
    assert isinstance(err, FileNotFoundError)
    assert str(tmp_path / "data" / path) in str(err) and "root=DIR" in str(err)


def test_configs_read_the_converted_files(tmp_path):
    """The converters' output, laid out as the configs' comments say, loads through dataset=voc and ood=coco."""
    from hydra.utils import instantiate

    data = tmp_path / "data"
    make_voc(data / "voc" / "images")
    for years, split, out in ((["2007", "2012"], "trainval", "trainval"), (["2007"], "test", "test")):
        write_annotations(data / "voc" / "annotations" / f"{out}.json",
                          voc_to_coco(data / "voc" / "images", years, split))
    cfg = _config("dataset", "voc", data, updates={"dataset.val_fraction": 0.34})  # 1 of the 3 trainval images
    fit, val, test = (instantiate(cfg.dataset.splits[s]) for s in ("fit", "val", "test"))
    assert (len(fit), len(val), len(test)) == (2, 1, 1) and set(fit.indices).isdisjoint(val.indices)
    _, t = test[0]
    assert t["boxes"].tolist() == [[1.0, 1.0, 19.0, 15.0]] and t["labels"].tolist() == [0]  # aeroplane
    assert fit.dataset.classes == tuple(VOC_CLASSES) and cfg.dataset.num_classes == 20

    coco_ood = data / "coco_ood"
    for im in _coco_source()["images"]:
        (coco_ood / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (im["width"], im["height"])).save(coco_ood / "images" / im["file_name"])
    subset, _ = ood_subset(_coco_source(), VOC_CLASSES)
    write_annotations(coco_ood / "annotations" / "instances_val2017_ood_voc.json", subset)
    ood = instantiate(_config("ood", "coco", data, dataset={"name": "voc"}).ood.coco)
    assert isinstance(ood, UnknownObjects) and len(ood) == 3
    img, t = ood[0]
    assert img.shape == (3, 20, 30) and t["labels"].tolist() == [-1, -1, -1]
    assert np.all(ood.targets == -1) and t["boxes"].shape == (3, 4)
