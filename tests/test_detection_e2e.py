"""Detection end to end through the console scripts: YOLOv8 and RT-DETR (ultralytics, built from their YAML,
random weights with calibrated BatchNorm statistics) on the generated shapes set; box- and image-level metrics,
the no-object policy and counts, mAP."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from _cli import cli
from _detection import calibrated_weights

# a random network scores its boxes ~0.005..0.99: predict_conf 0.006 leaves about half the images without a box
DET = ["task=detection", "dataset=shapes", "progress=false", "limit.fit=48", "limit.val=24", "limit.test=24",
       "limit.ood=24", "task.boxes.predict_conf=0.006", "task.boxes.max_det=10", "extract.batch_size=8",
       "hooked_layer.mc_samples=6", "postprocessor.lared.pca=8", "postprocessor.larem.pca=8", "device=cpu"]


def _out_args(out):
    return [f"output_root={out}", f"tracking.uri=sqlite:///{out}/mlflow.db"]


def test_yolov8_detection_through_the_console_scripts(tmp_path):
    weights = calibrated_weights("yolov8n.yaml", tmp_path / "yolo.safetensors")
    out = tmp_path / "out"
    args = [*DET, *_out_args(out), "model=yolov8", "hooked_layer=yolov8_sppf", f"model.net.weights={weights}",
            "baselines=[msp,energy,mdist]", "save_detector=[lared,msp]"]
    cli("larex-run", *args, cwd=tmp_path)
    layer = out / "detection" / "shapes" / "yolov8" / "sppf"
    df = pd.read_csv(layer / "latest" / "metrics.csv")
    methods = {f"{lv}.{m}" for lv in ("box", "image") for m in ("lared", "larem", "msp", "energy", "mdist")}
    assert set(df["method"]) == methods
    rows = df[df["ood"] != "mean"]
    assert set(rows["ood"]) == {"shapes_near", "shapes_far"}
    assert rows["auroc"].between(0, 1).all() and np.isfinite(rows["threshold"]).all()

    extract = next(layer.glob("extract-*"))
    feats = {s: {k: v for p in (extract / s).glob("boxes-*") for f in sorted(p.glob("shard-*.safetensors"))
                 for k, v in load_file(str(f)).items()} for s in ("val", "test", "ood/shapes_near")}
    # no-object images are counted, not dropped: the table's shares are those of the stored flags
    share = {s: float(f["no_object"].mean()) for s, f in feats.items()}
    assert rows["id_no_object_share"].iloc[0] == pytest.approx(share["test"])
    near = rows[rows["ood"] == "shapes_near"]
    assert near["ood_no_object_share"].iloc[0] == pytest.approx(share["ood/shapes_near"])
    assert 0 < share["test"] < 1  # images with and without boxes in one split
    for f in feats.values():  # box rows link to images that have boxes, and only to those
        linked = np.zeros(len(f["no_object"]), bool)
        linked[f["image_index"] - f["image_index"].min() if len(f["image_index"]) else []] = True
        assert len(f["box_scores"]) == len(f["image_index"]) == len(f["boxes"])
        assert (f["box_scores"] > 0.006).all()
    # image-level MSP: no-object images get the lowest image score of ID val (val_min policy)
    scores = pd.read_parquet(next((layer / "scores").glob("image.msp-*.parquet")))
    val, test = (scores[scores["split"] == s]["score"].to_numpy() for s in ("val", "test"))
    val_has = feats["val"]["no_object"] == 0
    no = feats["test"]["no_object"] == 1
    assert np.all(test[no] == val[val_has].min())
    # open-set figures of the box-level methods at their ID-val thresholds; every near/far object is unknown
    box_rows = rows[rows["method"].str.startswith("box.")]
    assert box_rows["unknown_recall"].between(0, 1).all() and (box_rows["a_ose"] >= 0).all()
    assert rows[rows["method"].str.startswith("image.")]["a_ose"].isna().all()
    assert (layer / "latest" / "plots" / "boxes_box.lared.png").stat().st_size > 10_000
    results = (layer / "latest" / "results.md").read_text()
    assert "map50" in results
    _saved_detectors_score_as_evaluated(layer, args, feats["test"])


def _saved_detectors_score_as_evaluated(layer, args, test_feats):
    """A saved detection detector scores the raw test images per box and per image exactly as evaluate did, and
    its box rows are the extracted boxes (original-image pixels). Bit-identical needs the extraction's batches
    and threads (the console scripts ran batches of 8 with OMP_NUM_THREADS=1): float32 convolutions round
    differently with another batch size or thread count (relative ~1e-6); the float64 scoring of those rows in
    batches of 8 images instead of the whole split differs by rounding only."""
    import torch
    from hydra import compose, initialize_config_module

    from larex.detector import Detector
    from larex.stages import common

    with initialize_config_module("larex.configs", version_base="1.3"):
        cfg = compose("run", overrides=[a for a in args if not a.startswith("tracking.")])
    ds = common.build_dataset(cfg, "test", raw=True)
    images = [ds[i][0] for i in range(len(ds))]
    threads = torch.get_num_threads()
    for method in ("lared", "msp"):
        det = Detector.load(layer / "latest" / "detector" / method, device="cpu")
        assert sorted(det.views) == [f"box.{method}", f"image.{method}"]
        torch.set_num_threads(1)
        try:
            res = det.score(images, batch_size=8)
        finally:
            torch.set_num_threads(threads)
        for view in det.views:
            scores = pd.read_parquet(next((layer / "scores").glob(f"{view}-*.parquet")))
            ref = scores.loc[scores["split"] == "test", "score"].to_numpy()
            got = (res.boxes if view.startswith("box.") else res.images)[view].to_numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)  # float64 scoring of other row chunks
        np.testing.assert_array_equal(res.boxes[["x1", "y1", "x2", "y2"]].to_numpy(), test_feats["boxes"])
        np.testing.assert_array_equal(res.boxes["image"].to_numpy(), test_feats["image_index"])
        assert (res.images["no_object"].to_numpy() == test_feats["no_object"].astype(bool)).all()
        assert (res.images["is_ood"] == (res.images["score"] < det.thresholds[f"image.{method}"])).all()
        assert (res.boxes["is_ood"] == (res.boxes["score"] < det.thresholds[f"box.{method}"])).all()


def test_rtdetr_extracts_box_and_image_features(tmp_path):
    weights = calibrated_weights("rtdetr-l.yaml", tmp_path / "rtdetr.safetensors", image_size=96)
    out = tmp_path / "out"
    args = [*DET, *_out_args(out), "model=rtdetr", "hooked_layer=rtdetr_aifi", f"model.net.weights={weights}",
            "task.boxes.predict_conf=0", "limit.fit=8", "limit.val=8", "limit.test=8", "limit.ood=8",
            "dataset.image_size=96", "dataset.size=96", "+ood=[shapes_near]", "baselines=[msp,vim]"]
    cli("larex-extract", *args, cwd=tmp_path)
    extract = next((out / "detection" / "shapes" / "rtdetr" / "aifi").glob("extract-*"))
    boxes = {k: v for p in (extract / "test").glob("boxes-*") for k, v in
             load_file(str(sorted(p.glob("shard-*.safetensors"))[0])).items()}
    latent = {k: v for p in (extract / "test").glob("mc-*") for k, v in
              load_file(str(sorted(p.glob("shard-*.safetensors"))[0])).items()}
    assert boxes["roi_latent"].shape == (80, 6, 256)  # 8 images x max_det 10, 256 AIFI channels
    assert boxes["box_logits"].shape == (80, 3) and (boxes["no_object"] == 0).all()
    assert latent["latent"].shape == (8, 6, 256)
    assert np.ptp(latent["latent"], axis=1).max() > 0  # the inserted DropBlock varies the MC samples
    assert (boxes["boxes"][:, 2:] <= 96).all() and (boxes["boxes"] >= 0).all()
    # ViM reads the decoder's per-query features and its score head: logits = features @ W.T + b
    head = load_file(str(next(extract.rglob("box_head-*.safetensors"))))
    assert boxes["box_penultimate"].shape == (80, 256)
    np.testing.assert_allclose(boxes["box_penultimate"] @ head["box_head.weight"].T + head["box_head.bias"],
                               boxes["box_logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # ultralytics' trainer, one epoch on 32 images (~20 s)
def test_larex_train_trains_yolo_with_ultralytics_and_extract_loads_it(tmp_path):
    import json

    out = tmp_path / "out"
    args = [*_out_args(out), "experiment=detection_demo", "model.train.epochs=1", "train.limit.fit=32",
            "train.limit.val=16", "progress=false"]
    cli("larex-train", *args, cwd=tmp_path)
    ckpt = next((out / "detection" / "shapes" / "yolov8").glob("checkpoint-*"))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["complete"] and {"val_map50", "val_map"} <= set(manifest)
    assert (ckpt / "model.safetensors").stat().st_size > 1_000_000
    cli("larex-extract", *args, "limit.fit=8", "limit.val=8", "limit.test=8", "limit.ood=8",
        "task.boxes.predict_conf=0", cwd=tmp_path)  # loads the trained weights, inserts the DropBlock
    assert list((out / "detection" / "shapes" / "yolov8" / "sppf").glob("extract-*/test/boxes-*/manifest.json"))
