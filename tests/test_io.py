"""larex.io: atomic writes, safetensors shards, manifests and resume."""
import json
import os

import numpy as np
import pytest

from larex import features, io


def _batches(n, b, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4, d)).astype(np.float32)
    y = np.arange(n, dtype=np.int64)
    return x, y, [{"latent": x[i:i + b], "labels": y[i:i + b]} for i in range(0, n, b)]


def test_shards_roundtrip_and_manifest(tmp_path):
    x, y, batches = _batches(23, 5)
    w = io.ShardWriter(tmp_path / "fit", "h1", shard_size=10, total=23)
    for b in batches:
        w.write(b)
    m = w.close()
    assert m["complete"] is True and m["rows"] == 23 and m["config_hash"] == "h1"
    assert [s["rows"] for s in m["shards"]] == [10, 10, 3]
    assert m["keys"]["latent"]["shape"] == [23, 4, 3] and m["keys"]["labels"]["dtype"] == "int64"
    got = io.read_features(tmp_path / "fit")
    np.testing.assert_array_equal(got["latent"], x)
    np.testing.assert_array_equal(got["labels"], y)
    assert io.is_complete(tmp_path / "fit", "h1") and not io.is_complete(tmp_path / "fit", "other")
    assert [len(s["labels"]) for s in io.iter_shards(tmp_path / "fit", ["labels"])] == [10, 10, 3]


def test_resume_after_interruption_gives_identical_shards(tmp_path):
    x, y, batches = _batches(30, 5)
    full = io.ShardWriter(tmp_path / "a", "h", shard_size=10, total=30)
    for b in batches:
        full.write(b)
    full.close()
    part = io.ShardWriter(tmp_path / "b", "h", shard_size=10, total=30)
    for b in batches[:5]:  # 25 rows: two shards flushed, 5 rows lost in the buffer
        part.write(b)
    del part  # interrupted
    assert not io.is_complete(tmp_path / "b")
    with pytest.raises(RuntimeError, match="incomplete"):
        io.read_features(tmp_path / "b")
    resumed = io.ShardWriter(tmp_path / "b", "h", shard_size=10, total=30)
    assert resumed.resume_row == 20
    for b in batches[4:]:
        resumed.write(b)
    resumed.close()
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_changed_config_hash_starts_over(tmp_path):
    _, _, batches = _batches(20, 10)
    w = io.ShardWriter(tmp_path / "s", "old", shard_size=10)
    w.write(batches[0])
    assert io.ShardWriter(tmp_path / "s", "new", shard_size=10).resume_row == 0
    assert not list((tmp_path / "s").glob("shard-*"))


def test_mismatched_batch_lengths_rejected(tmp_path):
    w = io.ShardWriter(tmp_path / "s", "h", shard_size=10)
    with pytest.raises(ValueError, match="mismatched shapes.*latent.*labels|mismatched shapes.*labels.*latent"):
        w.write({"latent": np.zeros((3, 2, 2), np.float32), "labels": np.zeros(4, np.int64)})


def test_unknown_key_rejected(tmp_path):
    w = io.ShardWriter(tmp_path / "s", "h", shard_size=10)
    with pytest.raises(features.UnknownFeatureError, match="not_a_feature"):
        w.write({"not_a_feature": np.zeros(3)})


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(ZeroDivisionError):
        with io.atomic_write(target, "w") as fh:
            fh.write("partial")
            1 / 0
    assert not target.exists() and list(tmp_path.iterdir()) == []
    io.write_json(target, {"b": 1, "a": np.float32(0.5)})
    assert json.loads(target.read_text()) == {"a": 0.5, "b": 1}


def test_config_hash_is_order_independent():
    assert io.config_hash({"a": 1, "b": [1, 2]}) == io.config_hash({"b": [1, 2], "a": 1})
    assert io.config_hash({"a": 1}) != io.config_hash({"a": 2})


# --------------------------------------------------------------------------------------------------
# shard integrity
# --------------------------------------------------------------------------------------------------
def _complete_split(path, n=30, shard_size=10, seed=0):
    x, y, batches = _batches(n, 5, d=64, seed=seed)
    w = io.ShardWriter(path, "h", shard_size=shard_size, total=n)
    for b in batches:
        w.write(b)
    return x, y, w.close()


def test_manifest_records_size_and_sha256_of_written_bytes(tmp_path):
    _, _, m = _complete_split(tmp_path / "s")
    import hashlib
    for s in m["shards"]:
        data = (tmp_path / "s" / s["file"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
        assert s["axes"] == {"image": s["rows"]}
    assert m["axes"] == {"image": 30} and io.axis_rows(m) == {"image": 30}
    assert m["keys"]["latent"]["axis"] == "image"
    assert io.verify_split(tmp_path / "s") == []
    assert io.is_complete(tmp_path / "s", verify="sha256")


def test_truncated_shard_detected(tmp_path):
    d = tmp_path / "s"
    _complete_split(d)
    bad = d / "shard-00001.safetensors"
    os.truncate(bad, 1000)
    assert not io.is_complete(d) and not io.is_complete(d, "h", verify="size")
    assert io.is_complete(d, verify=None)  # manifest only
    assert io.verify_split(d) == ["shard-00001.safetensors"]
    with pytest.raises(io.CorruptShardError, match="size 1000 bytes") as err:
        io.read_features(d)
    assert str(bad) in str(err.value) and io.REPAIR_HINT in str(err.value)
    assert err.value.path == bad
    with pytest.raises(io.CorruptShardError, match="larex-extract model=x"):
        list(io.iter_shards(d, ["labels"], repair="larex-extract model=x"))


def test_flipped_byte_detected_by_sha256_only(tmp_path):
    d = tmp_path / "s"
    _complete_split(d)
    bad = d / "shard-00002.safetensors"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert io.is_complete(d, "h", verify="size")
    assert not io.is_complete(d, "h", verify="sha256")
    assert io.verify_split(d) == ["shard-00002.safetensors"]
    with pytest.raises(io.CorruptShardError, match="sha256") as err:
        io.read_features(d)
    assert str(bad) in str(err.value)


def test_missing_shard_and_unreadable_header_raise_corrupt_shard_error(tmp_path):
    d = tmp_path / "s"
    _complete_split(d)
    (d / "shard-00000.safetensors").unlink()
    assert not io.is_complete(d)
    with pytest.raises(io.CorruptShardError, match="missing"):
        io.read_features(d)
    # an older manifest (no bytes / sha256): still readable, and a broken header is a CorruptShardError
    d2 = tmp_path / "legacy"
    x, y, m = _complete_split(d2)
    m["shards"] = [{"file": s["file"], "rows": s["rows"]} for s in m["shards"]]
    io.write_json(d2 / io.MANIFEST, m)
    np.testing.assert_array_equal(io.read_features(d2)["latent"], x)
    assert io.is_complete(d2, verify="sha256") and io.verify_split(d2) == []
    os.truncate(d2 / "shard-00001.safetensors", 1000)
    assert io.is_complete(d2, verify="size")  # no recorded size to compare with
    assert not io.is_complete(d2, verify="sha256") and io.verify_split(d2) == ["shard-00001.safetensors"]
    with pytest.raises(io.CorruptShardError, match="unreadable safetensors header"):
        io.read_features(d2)
    w = io.ShardWriter(d2, "h", shard_size=10, total=30)  # resuming an older manifest verifies its headers
    assert w.missing_shards() == [1] and all("sha256" in s for s in w.shards)
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x01\x02")
    with pytest.raises(io.CorruptShardError, match="unreadable"):
        io.load_arrays(f)


def test_is_complete_rejects_unknown_verify_level(tmp_path):
    with pytest.raises(ValueError, match="verify"):
        io.is_complete(tmp_path, verify="md5")


def test_resume_rewrites_only_the_corrupt_shard(tmp_path):
    ref, d = tmp_path / "ref", tmp_path / "s"
    x, y, _ = _complete_split(ref)
    _complete_split(d)
    files = [d / f"shard-{i:05d}.safetensors" for i in range(3)]
    data = bytearray(files[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[1].write_bytes(bytes(data))
    before = {i: (files[i].stat().st_mtime_ns, files[i].stat().st_ino) for i in (0, 2)}
    w = io.ShardWriter(d, "h", shard_size=10, total=30, resume=True)
    assert w.missing_shards() == [1] and w.resume_row == 10
    assert w.shard_rows(1) == range(10, 20) and w.shard_rows(2) == range(20, 30)
    assert not io.is_complete(d, verify=None)  # the bad shard is dropped from the manifest at once
    with pytest.raises(ValueError, match="covers image rows"):
        w.write_shard(1, {"latent": x[10:15], "labels": y[10:15]})
    with pytest.raises(ValueError, match="other keys"):
        w.write_shard(1, {"latent": x[10:20]})
    with pytest.raises(RuntimeError, match=r"\[1\]"):
        w.close()
    w.write_shard(1, {"latent": x[10:20], "labels": y[10:20]})
    assert w.missing_shards() == []
    m = w.close()
    assert m["complete"] and m["rows"] == 30 and io.is_complete(d, "h", verify="sha256")
    for i in range(3):
        assert files[i].read_bytes() == (ref / files[i].name).read_bytes()
    for i in (0, 2):
        assert (files[i].stat().st_mtime_ns, files[i].stat().st_ino) == before[i]
    np.testing.assert_array_equal(io.read_features(d)["latent"], x)
    # a clean complete split resumes with nothing to do
    again = io.ShardWriter(d, "h", shard_size=10, resume=True)
    assert again.missing_shards() == [] and again.resume_row == 30 and again.total == 30


def test_write_shard_out_of_order_and_changed_shard_size_starts_over(tmp_path):
    x, y, _ = _batches(23, 5)
    w = io.ShardWriter(tmp_path / "s", "h", shard_size=10, total=23)
    assert w.missing_shards() == [0, 1, 2] and w.shard_rows(2) == range(20, 23)
    for i in (2, 0):
        w.write_shard(i, {"latent": x[w.shard_rows(i).start:w.shard_rows(i).stop],
                          "labels": y[w.shard_rows(i).start:w.shard_rows(i).stop]})
    del w  # interrupted: shard 1 never written
    w = io.ShardWriter(tmp_path / "s", "h", shard_size=10, total=23)
    assert w.missing_shards() == [1] and w.resume_row == 10
    with pytest.raises(IndexError):
        w.shard_rows(3)
    w.write_shard(1, {"latent": x[10:20], "labels": y[10:20]})
    m = w.close()
    assert [s["file"] for s in m["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(3)]
    np.testing.assert_array_equal(io.read_features(tmp_path / "s")["labels"], y)
    w = io.ShardWriter(tmp_path / "s", "h", shard_size=5, total=23)
    assert w.missing_shards() == list(range(5)) and not list((tmp_path / "s").glob("shard-*"))


def test_empty_split_keeps_zero_row_arrays(tmp_path):
    w = io.ShardWriter(tmp_path / "e", "h", shard_size=4, total=0)
    w.write({"latent": np.zeros((0, 2, 3), np.float32), "labels": np.zeros(0, np.int64)})
    m = w.close()
    assert m["complete"] and m["rows"] == 0 and m["shards"] == [] and m["axes"] == {"image": 0}
    got = io.read_features(tmp_path / "e")
    assert got["latent"].shape == (0, 2, 3) and got["labels"].dtype == np.int64


# --------------------------------------------------------------------------------------------------
# row axes
# --------------------------------------------------------------------------------------------------
features.register(features.FeatureSpec("test_box_score", "box", 1, "tests", "a per-box score (tests only)"))


def _boxed(n=10, seed=1):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 4, size=n)
    counts[[2, 3]] = [0, 3]  # at least one image without and one with three boxes
    image_index = np.repeat(np.arange(n), counts).astype(np.int64)
    score = rng.normal(size=len(image_index)).astype(np.float32)
    logits = rng.normal(size=(n, 5)).astype(np.float32)
    return counts, image_index, score, logits


def _box_batches(counts, image_index, score, logits, b):
    starts = np.concatenate([[0], np.cumsum(counts)])
    for i in range(0, len(counts), b):
        j = min(i + b, len(counts))
        sl = slice(starts[i], starts[j])
        yield {"logits": logits[i:j], "image_index": image_index[sl], "test_box_score": score[sl]}


@pytest.mark.parametrize("batch", [1, 3, 10])
def test_box_rows_stay_with_their_images(tmp_path, batch):
    counts, image_index, score, logits = _boxed()
    w = io.ShardWriter(tmp_path / "s", "h", shard_size=4, total=10)
    for b in _box_batches(counts, image_index, score, logits, batch):
        w.write(b)
    m = w.close()
    assert [s["rows"] for s in m["shards"]] == [4, 4, 2]
    assert [s["axes"]["box"] for s in m["shards"]] == [int(counts[i:i + 4].sum()) for i in (0, 4, 8)]
    assert m["axes"] == {"image": 10, "box": len(image_index)} == io.axis_rows(m)
    assert m["rows"] == 10
    assert m["keys"]["test_box_score"] == {"dtype": "float32", "shape": [len(image_index)], "axis": "box"}
    assert m["keys"]["logits"]["shape"] == [10, 5] and m["keys"]["image_index"]["axis"] == "box"
    for i, shard in enumerate(io.iter_shards(tmp_path / "s")):
        assert len(shard["logits"]) == m["shards"][i]["rows"]
        assert np.all((shard["image_index"] >= 4 * i) & (shard["image_index"] < 4 * i + 4))  # global rows
    got = io.read_features(tmp_path / "s")
    np.testing.assert_array_equal(got["logits"], logits)
    np.testing.assert_array_equal(got["image_index"], image_index)
    np.testing.assert_array_equal(got["test_box_score"], score)
    # the same split written shard by shard is byte-identical
    v = io.ShardWriter(tmp_path / "v", "h", shard_size=4, total=10)
    for i in reversed(v.missing_shards()):
        r = v.shard_rows(i)
        inside = (image_index >= r.start) & (image_index < r.stop)
        v.write_shard(i, {"logits": logits[r.start:r.stop], "image_index": image_index[inside],
                          "test_box_score": score[inside]})
    v.close()
    for s in m["shards"]:
        assert (tmp_path / "v" / s["file"]).read_bytes() == (tmp_path / "s" / s["file"]).read_bytes()


def test_box_only_split_with_images_count(tmp_path):
    counts, image_index, score, _ = _boxed()
    w = io.ShardWriter(tmp_path / "s", "h", shard_size=4, total=10)
    w.write({"image_index": image_index[:counts[:6].sum()], "test_box_score": score[:counts[:6].sum()]}, images=6)
    w.write({"image_index": image_index[counts[:6].sum():], "test_box_score": score[counts[:6].sum():]}, images=4)
    m = w.close()
    assert m["rows"] == 10 and m["axes"]["box"] == len(score) and "logits" not in m["keys"]
    np.testing.assert_array_equal(io.read_features(tmp_path / "s")["test_box_score"], score)


def test_box_rows_errors(tmp_path):
    counts, image_index, score, logits = _boxed()
    w = io.ShardWriter(tmp_path / "s", "h", shard_size=4, total=10)
    with pytest.raises(ValueError, match="link key 'image_index'"):
        w.write({"logits": logits[:2], "test_box_score": score[:3]})
    with pytest.raises(ValueError, match="mismatched shapes.*test_box_score"):
        w.write({"logits": logits[:2], "image_index": image_index[:3], "test_box_score": score[:2]})
    with pytest.raises(ValueError, match="outside the image rows"):  # boxes of images not written yet
        w.write({"logits": logits[:1], "image_index": np.array([0, 5]), "test_box_score": score[:2]})
    with pytest.raises(ValueError, match="model arrays"):
        w.write({"head.bias": np.zeros(3)})
    w.write({"logits": logits[:5], "image_index": image_index[image_index < 5],
             "test_box_score": score[image_index < 5]})
    with pytest.raises(ValueError, match="outside the image rows"):  # image 1 is in the written shard 0
        w.write({"logits": logits[5:6], "image_index": np.array([1]), "test_box_score": score[:1]})
    fresh = io.ShardWriter(tmp_path / "f", "h", shard_size=4, total=10)
    with pytest.raises(ValueError, match="outside the image rows"):
        fresh.write({"logits": logits[:1], "image_index": np.array([3]), "test_box_score": score[:1]})
    fresh.write({"logits": logits[:4]})  # a rejected batch does not fix the key set
    assert fresh.missing_shards() == [1, 2]
    with pytest.raises(ValueError, match="outside the image rows"):
        w.write_shard(2, {"logits": logits[8:10], "image_index": np.array([3]), "test_box_score": score[:1]})
