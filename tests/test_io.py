"""larex.io: atomic writes, safetensors shards, manifests and resume."""
import json

import numpy as np
import pytest

from larex import io


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
    with pytest.raises(ValueError, match="mismatched"):
        w.write({"a": np.zeros((3, 2)), "b": np.zeros(4)})


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
