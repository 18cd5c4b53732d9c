"""Extraction on several processes (Lightning DDP over gloo, 2 CPU ranks): each rank writes whole shards, rank 0
completes the manifests, and every shard is byte-identical to a one-device run's."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from _cli import cli, layer_dir, tiny
from larex import io
from larex.extraction.work import _Batches, _Rows, rank_units, units


def _shards(extract_dir):
    """part folder (relative) -> (complete, rows, [sha256 of every shard], keys) of every manifest under it."""
    out = {}
    for m in sorted(extract_dir.rglob("manifest.json")):
        man = io.read_json(m)
        out[str(m.parent.relative_to(extract_dir))] = (man["complete"], man["rows"],
                                                       [s["sha256"] for s in man["shards"]], man["keys"])
    return out


def test_ddp_extraction_on_two_cpu_ranks_equals_the_one_device_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LAREX_TEST_ALLOW_LOOPBACK", "1")  # the ranks meet on a loopback TCP store
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*tiny(one, "digits", s=4), "limit.fit=200", "limit.ood=64", "evaluate.plots=false",
            "tracking.enabled=false", "threads=1", "baselines=[msp]"]
    cli("larex-run", *args, cwd=tmp_path)
    (checkpoint,) = (one / "classification" / "digits" / "small_cnn").glob("checkpoint-*")
    shutil.copytree(checkpoint, two / "classification" / "digits" / "small_cnn" / checkpoint.name)  # same weights
    args_two = [a.replace(str(one), str(two)) for a in args]
    p = cli("larex-run", *args_two, "device=cpu", "extract.devices=2", cwd=tmp_path)
    assert "(2 ranks)" in p.stdout and "[train] up to date" in p.stdout
    assert p.stdout.count("[train] up to date") == 1  # the second rank's lines are not printed
    (ex_one,) = layer_dir(one, "digits").glob("extract-*")
    (ex_two,) = layer_dir(two, "digits").glob("extract-*")
    assert ex_one.name == ex_two.name
    a, b = _shards(ex_one), _shards(ex_two)
    assert set(a) == set(b) and len(a) == 6 * 3  # 6 splits x (mc, deterministic, labels)
    assert b == a  # complete, same rows, byte-identical shards, same keys
    assert any(len(v[2]) >= 2 for v in b.values())  # some split has shards from both ranks
    assert not list(ex_two.rglob("shard-*.tmp*"))
    metrics = [pd.read_csv(next(layer_dir(o, "digits").glob("evaluate-*")) / "metrics.csv") for o in (one, two)]
    pd.testing.assert_frame_equal(*metrics)

    # resume on 2 ranks: a lost shard (128-row shards: whole batches) is recomputed by one rank while the other
    # has nothing to do, and the manifest is completed again
    part = ex_two / "fit" / next(k.split("/")[1] for k in b if k.startswith("fit/mc-"))
    (part / "shard-00001.safetensors").unlink()
    p = cli("larex-extract", *args_two, "device=cpu", "extract.devices=2", cwd=tmp_path)
    assert "fit: resuming: 72 of 200 rows (shards [1])" in p.stdout
    assert _shards(ex_two) == a


def test_extraction_strategy_errors(tmp_path):
    args = [*tiny(tmp_path / "o", "digits", s=4), "tracking.enabled=false"]
    p = cli("larex-extract", *args, "extract.devices=2", "extract.strategy=ddp_spawn", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "extract.strategy=ddp_spawn is not supported" in p.stderr
    p = cli("larex-extract", "-m", *args, "extract.devices=2", "device=cpu", "seed=0,1", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "in a multirun" in p.stderr


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_units_cover_every_shard_once(world):
    work = {"fit": {0: [0, 1, 2, 4], 1: [3]}, "val": {0: [0]}, "ood/noise": {}}
    everything = units(work)
    assert everything == [("fit", 0), ("fit", 1), ("fit", 2), ("fit", 3), ("fit", 4), ("val", 0)]
    shares = [rank_units(work, r, world) for r in range(world)]
    assert sorted(u for s in shares for u in s) == sorted(everything)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_rank_batches_never_span_two_shards():
    datasets = {"a": [("a", i) for i in range(10)], "b": [("b", i) for i in range(7)]}
    rows = _Rows(datasets, [("a", range(4, 8)), ("b", range(0, 7)), ("a", range(8, 10))])
    assert len(rows) == 13 and rows[0] == ("a", 4) and rows[4] == ("b", 0) and rows[12] == ("a", 9)
    sampler = _Batches(rows.offsets, 3)
    batches = list(sampler)
    assert [len(b) for b in batches] == [3, 1, 3, 3, 1, 2] and len(sampler) == 6
    assert sampler.unit_of_batch() == [0, 0, 1, 1, 1, 2]
    assert [rows[i] for b in batches for i in b] == [rows[i] for i in range(13)]


def test_shard_writer_of_another_rank_hands_its_shards_to_the_coordinator(tmp_path):
    d = tmp_path / "part"
    lead = io.ShardWriter(d, "h", shard_size=4, total=10)
    other = io.ShardWriter(d, "h", shard_size=4, total=10, manifest=False)
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    lead.write_shard(0, {"latent_mean": x[:4]})
    other.write_shard(1, {"latent_mean": x[4:8]})
    other.write_shard(2, {"latent_mean": x[8:]})
    assert [s["file"] for s in io.read_manifest(d)["shards"]] == ["shard-00000.safetensors"]  # only the lead's
    with pytest.raises(RuntimeError, match=r"shard\(s\) \[1, 2\] were never written"):
        lead.close()
    written = other.written
    tampered = {**written, "entries": {**written["entries"], 2: {**written["entries"][2], "sha256": "0" * 64}}}
    with pytest.raises(RuntimeError, match="shard 2 .* does not match its record"):
        lead.add_written(tampered)  # nothing recorded
    lead.add_written(written)
    lead.close()
    assert io.is_complete(d, "h", verify="sha256")
    np.testing.assert_array_equal(io.read_features(d)["latent_mean"], x)
    with pytest.raises(RuntimeError, match="written by two processes"):
        lead.add_written(written)


@pytest.mark.slow  # ultralytics on 2 ranks: about a minute
def test_ddp_detection_extraction_equals_the_one_device_run(tmp_path, monkeypatch):
    """The same over the detection task (YOLOv8n, box rows of a varying count per image): each rank's box shards
    equal a one-device run's."""
    from _detection import calibrated_weights

    monkeypatch.setenv("LAREX_TEST_ALLOW_LOOPBACK", "1")
    weights = calibrated_weights("yolov8n.yaml", tmp_path / "yolo.safetensors")
    args = ["task=detection", "dataset=shapes", "progress=false", "limit.fit=32", "limit.val=16", "limit.test=16",
            "limit.ood=16", "task.boxes.predict_conf=0.006", "task.boxes.max_det=10", "extract.batch_size=8",
            "extract.shard_size=8", "hooked_layer.mc_samples=4", "model=yolov8", "hooked_layer=yolov8_sppf",
            f"model.net.weights={weights}", "baselines=[msp]", "tracking.enabled=false", "device=cpu", "threads=1"]
    runs = {}
    for name, extra in (("one", []), ("two", ["extract.devices=2"])):
        out = tmp_path / name
        cli("larex-extract", *args, f"output_root={out}", *extra, cwd=tmp_path)
        (ex,) = (out / "detection" / "shapes" / "yolov8" / "sppf").glob("extract-*")
        runs[name] = (ex.name, _shards(ex))
    assert runs["two"] == runs["one"]
    boxes = {k: v for k, v in runs["two"][1].items() if "/boxes-" in k}
    assert boxes and all(v[0] for v in boxes.values()) and any(len(v[2]) >= 2 for v in boxes.values())
