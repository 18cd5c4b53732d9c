"""Output layout, safetensors shards, manifests and atomic writes.

Every file larex writes goes through :func:`atomic_write` (write to a temp file in the same folder, fsync,
rename), so an interrupted run never leaves a half-written file where a later stage would read it.
Feature sets are stored as safetensors shards (no unsafe serialisation) with a ``manifest.json`` per split that
records the config hash, keys, shapes and ``complete: true`` once the split is fully written.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as _np_load_file
from safetensors.numpy import save as _np_save_bytes

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; on success fsync and rename it to ``path``, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(x)


def save_arrays(path: str | Path, arrays: Mapping[str, np.ndarray | torch.Tensor],
                metadata: Mapping[str, str] | None = None) -> None:
    """Atomically save a mapping of arrays as one safetensors file."""
    data = {k: to_numpy(v) for k, v in arrays.items()}
    write_bytes(path, _np_save_bytes(data, metadata=dict(metadata) if metadata else None))


def load_arrays(path: str | Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Load a safetensors file into numpy arrays (optionally only ``keys``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such feature file: {path} (run the stage that writes it first)")
    arrays = _np_load_file(str(path))
    if keys is None:
        return arrays
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise KeyError(f"{path} has no key(s) {missing}; it holds {sorted(arrays)}")
    return {k: arrays[k] for k in keys}


# --------------------------------------------------------------------------------------------------
# config hashing and layout
# --------------------------------------------------------------------------------------------------
def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able object (dict key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_dir(root: str | Path, task: str, dataset: str, model: str, hooked_layer: str) -> Path:
    """``<root>/<task>/<dataset>/<model>/<hooked_layer>`` (DESIGN.md output layout)."""
    return Path(root) / task / dataset / model / hooked_layer


def split_dirname(split: str) -> str:
    """Split names such as ``ood/digits`` map to nested folders ``ood/digits``."""
    parts = split.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid split name {split!r}")
    return split


# --------------------------------------------------------------------------------------------------
# manifests
# --------------------------------------------------------------------------------------------------
def read_manifest(directory: str | Path) -> dict | None:
    p = Path(directory) / MANIFEST
    if not p.is_file():
        return None
    try:
        return read_json(p)
    except (json.JSONDecodeError, OSError):
        return None


def is_complete(directory: str | Path, cfg_hash: str | None = None) -> bool:
    """True when ``directory`` has a manifest marked complete (and, if given, with this config hash)."""
    m = read_manifest(directory)
    if not m or not m.get("complete"):
        return False
    return cfg_hash is None or m.get("config_hash") == cfg_hash


# --------------------------------------------------------------------------------------------------
# sharded feature sets
# --------------------------------------------------------------------------------------------------
class ShardWriter:
    """Stream per-batch feature dicts into fixed-size safetensors shards with a manifest.

    Shard ``i`` always holds rows ``[i * shard_size, (i + 1) * shard_size)`` so a resumed run that
    restarts at :attr:`resume_row` writes byte-identical shards. The manifest is rewritten after every
    shard (``complete: false``) and finally with ``complete: true`` by :meth:`close`.
    """

    def __init__(self, directory: str | Path, cfg_hash: str, shard_size: int = 4096,
                 total: int | None = None, resume: bool = True):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.directory = Path(directory)
        self.cfg_hash = cfg_hash
        self.shard_size = int(shard_size)
        self.total = total
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self.keys: dict[str, dict] = {}
        m = read_manifest(self.directory)
        if (resume and m and m.get("config_hash") == cfg_hash and m.get("shard_size") == shard_size
                and not m.get("complete")):
            # keep the shards that really exist, in order, up to the first gap
            for s in m.get("shards", []):
                if (self.directory / s["file"]).is_file():
                    self.shards.append(s)
                else:
                    break
            self.keys = m.get("keys", {}) if self.shards else {}
        else:
            for old in self.directory.glob("shard-*.safetensors"):
                old.unlink()
            with contextlib.suppress(FileNotFoundError):
                (self.directory / MANIFEST).unlink()
        self._buffer: dict[str, list[np.ndarray]] = {}
        self._buffered = 0

    @property
    def resume_row(self) -> int:
        """First row not yet stored (where a resumed extraction starts)."""
        return sum(s["rows"] for s in self.shards)

    def write(self, batch: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        arrays = {k: to_numpy(v) for k, v in batch.items()}
        lengths = {k: a.shape[0] for k, a in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"mismatched batch lengths across keys: {lengths}")
        if self._buffer and set(arrays) != set(self._buffer):
            raise ValueError(f"batch keys {sorted(arrays)} differ from earlier batches {sorted(self._buffer)}")
        for k, a in arrays.items():
            self._buffer.setdefault(k, []).append(a)
        self._buffered += next(iter(lengths.values()))
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        if rows == 0:
            return
        full = {k: np.concatenate(v, axis=0) for k, v in self._buffer.items()}
        out = {k: np.ascontiguousarray(a[:rows]) for k, a in full.items()}
        rest = {k: a[rows:] for k, a in full.items()}
        name = SHARD_PATTERN.format(len(self.shards))
        save_arrays(self.directory / name, out)
        self.shards.append({"file": name, "rows": rows})
        for k, a in out.items():
            self.keys[k] = {"dtype": str(a.dtype), "shape": [None, *a.shape[1:]]}
        self._buffer = {k: [a] for k, a in rest.items()} if rows < next(iter(full.values())).shape[0] else {}
        self._buffered -= rows
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool, extra: Mapping[str, Any] | None = None) -> None:
        n = self.resume_row
        write_json(self.directory / MANIFEST, {
            "complete": complete,
            "config_hash": self.cfg_hash,
            "shard_size": self.shard_size,
            "rows": n,
            "shards": self.shards,
            "keys": {k: {"dtype": v["dtype"], "shape": [n, *v["shape"][1:]]} for k, v in self.keys.items()},
            **(dict(extra) if extra else {}),
        })

    def close(self, extra: Mapping[str, Any] | None = None) -> dict:
        """Flush the last partial shard and mark the split complete."""
        self._flush(self._buffered)
        if self.total is not None and self.resume_row != self.total:
            raise RuntimeError(f"{self.directory}: wrote {self.resume_row} rows, expected {self.total}")
        self._write_manifest(complete=True, extra=extra)
        return read_manifest(self.directory)


def iter_shards(directory: str | Path, keys: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield the shards of a complete split one at a time (bounded memory)."""
    directory = Path(directory)
    m = read_manifest(directory)
    if not m:
        raise FileNotFoundError(f"no features at {directory} (run larex-extract first)")
    if not m.get("complete"):
        raise RuntimeError(f"features at {directory} are incomplete (an extraction was interrupted); "
                           "rerun larex-extract to resume it")
    if keys is not None:
        missing = [k for k in keys if k not in m["keys"]]
        if missing:
            raise KeyError(f"features at {directory} have no key(s) {missing}; available: {sorted(m['keys'])}")
    for s in m["shards"]:
        yield load_arrays(directory / s["file"], keys)


def read_features(directory: str | Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Concatenate all shards of a split (use :func:`iter_shards` for data that does not fit memory)."""
    parts: dict[str, list[np.ndarray]] = {}
    for shard in iter_shards(directory, keys):
        for k, v in shard.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        m = read_manifest(directory) or {}
        return {k: np.zeros([0, *v["shape"][1:]], dtype=v["dtype"]) for k, v in m.get("keys", {}).items()
                if keys is None or k in keys}
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}
