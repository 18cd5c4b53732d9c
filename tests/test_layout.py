"""larex.layout: stage folders keyed by config hash, the index and latest pointer, and claims across processes."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from larex import io
from larex.layout import Layout, claim, latest_dir, read_index, stage_hash


def _layout(root: Path, **hashes) -> Layout:
    h = {"train_hash": "t1", "extract_hash": "e1", "aggregate_hash": "a1", "evaluate_hash": "v1", **hashes}
    return Layout(root, "classification", "fashion_mnist", "small_cnn", "dropblock", parts={"latent": "mc-p1"}, **h)


def test_folders_are_keyed_by_each_stage_hash(tmp_path):
    lay = _layout(tmp_path)
    base = tmp_path / "classification" / "fashion_mnist" / "small_cnn"
    assert lay.checkpoint_dir == base / "checkpoint-t1"
    assert lay.extract_dir == base / "dropblock" / "extract-e1"
    assert lay.aggregate_dir == base / "dropblock" / "aggregate-a1"
    assert lay.evaluate_dir == base / "dropblock" / "evaluate-v1"
    assert lay.part_dir("ood/noise", "mc-p1") == base / "dropblock" / "extract-e1" / "ood" / "noise" / "mc-p1"
    assert lay.key_dir("fit", "latent") == lay.extract_dir / "fit" / "mc-p1"
    assert lay.aggregate_file("ood/digits") == lay.aggregate_dir / "ood" / "digits.safetensors"
    assert lay.scores_file("lared", "abc") == base / "dropblock" / "scores" / "lared-abc.parquet"
    with pytest.raises(KeyError, match="not in this run's extraction plan"):
        lay.key_dir("fit", "logits")
    with pytest.raises(ValueError, match="invalid split"):
        lay.split_dir("../escape")
    other = _layout(tmp_path, evaluate_hash="v2")
    assert other.evaluate_dir != lay.evaluate_dir and other.extract_dir == lay.extract_dir


def test_stage_hash_is_order_independent_and_sensitive():
    a = stage_hash({"x": 1, "y": [1, 2], "z": {"p": 0.5, "q": None}})
    assert a == stage_hash({"z": {"q": None, "p": 0.5}, "y": [1, 2], "x": 1})
    assert a != stage_hash({"x": 1, "y": [2, 1], "z": {"p": 0.5, "q": None}})
    assert a != stage_hash({"x": 1, "y": [1, 2], "z": {"p": 0.25, "q": None}})
    assert len(a) == 16 and int(a, 16) >= 0


def test_index_and_latest_point_at_the_newest_evaluation(tmp_path):
    first, second = _layout(tmp_path, evaluate_hash="v1"), _layout(tmp_path, evaluate_hash="v2")
    for lay in (first, second):
        lay.evaluate_dir.mkdir(parents=True)
        (lay.evaluate_dir / "metrics.csv").write_text("ood,method\n")
    first.record("extract", first.extract_dir, "e1", {"overrides": "a=1"})
    first.record("evaluate", first.evaluate_dir, "v1", {"overrides": "a=1"})
    second.record("evaluate", second.evaluate_dir, "v2", {"overrides": "a=2"})
    first.record("evaluate", first.evaluate_dir, "v1", {"overrides": "a=1"})  # re-run: refreshed, not duplicated
    entries = read_index(first.layer_dir)
    assert [(e["stage"], e["hash"]) for e in entries] == [("extract", "e1"), ("evaluate", "v2"), ("evaluate", "v1")]
    assert entries[-1]["path"] == "evaluate-v1" and entries[1]["overrides"] == "a=2"
    assert latest_dir(first.layer_dir) == first.evaluate_dir
    link = first.layer_dir / "latest"
    assert link.is_symlink() and (link / "metrics.csv").is_file() and os.readlink(link) == "evaluate-v1"
    assert io.read_json(first.layer_dir / "latest.json")["hash"] == "v1"


def _hold(path: str, log: str, seconds: float) -> None:
    with claim(path, "test"):
        with open(log, "a") as fh:
            fh.write(f"start {os.getpid()}\n")
        time.sleep(seconds)
        with open(log, "a") as fh:
            fh.write(f"end {os.getpid()}\n")


def test_claim_serialises_two_processes_and_reports_the_holder(tmp_path):
    target, log = tmp_path / "out" / "split", tmp_path / "log.txt"
    ctx = mp.get_context("spawn")
    first = ctx.Process(target=_hold, args=(str(target), str(log), 1.0))
    first.start()
    for _ in range(200):  # wait until the first holds the claim
        if log.is_file() and "start" in log.read_text():
            break
        time.sleep(0.02)
    waited = []
    with claim(target, on_wait=waited.append):
        with open(log, "a") as fh:
            fh.write("second\n")
    first.join(10)
    lines = log.read_text().split()
    assert lines[0] == "start" and lines[2] == "end" and lines[-1] == "second"  # no overlap
    assert waited and "pid" in waited[0] and "test" in waited[0]
    assert not target.exists()  # a claim never creates the output itself


def test_claim_is_released_when_the_holder_dies(tmp_path):
    target = tmp_path / "x"
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_hold, args=(str(target), str(tmp_path / "log"), 30.0))
    p.start()
    for _ in range(200):
        if (tmp_path / "log").is_file():
            break
        time.sleep(0.02)
    p.kill()
    p.join(10)
    import threading

    got = threading.Event()

    def take():
        with claim(target):
            got.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(60)
    assert got.is_set(), "the claim of a killed process was not released"
