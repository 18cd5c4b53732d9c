"""Output layout, safetensors shards, manifests, shard integrity and atomic writes.

Every file larex writes goes through :func:`atomic_write` (write to a temp file in the same folder, fsync,
rename), so an interrupted run never leaves a half-written file where a later stage would read it.
Feature sets are stored as safetensors shards (no unsafe serialisation) with a ``manifest.json`` per split that
records the config hash, keys, shapes, per-axis row counts, each shard's byte size and sha256, and
``complete: true`` once the split is fully written.

Row axes (:mod:`larex.features`): every key has a row axis. ``shard_size`` counts ``image`` (primary) rows;
shard ``i`` holds image rows ``[i * shard_size, (i + 1) * shard_size)`` plus every secondary (``box``,
``pixel``, ``token``) row whose link key (e.g. ``image_index``, a global image row index) falls in that range.

Integrity: readers (:func:`iter_shards`, :func:`read_features`, :func:`load_arrays` given a size / sha256)
hash the bytes they read and raise :class:`CorruptShardError` (file, problem, repair command) for a missing,
truncated, altered or unparsable shard. :func:`is_complete` checks sizes (cheap) or sha256s, and
:func:`verify_split` lists the bad shards. A resumed :class:`ShardWriter` keeps the shards that verify and
recomputes only the others (:meth:`ShardWriter.missing_shards`, :meth:`ShardWriter.write_shard`).

Manifest (``manifest.json``)::

    {"complete": bool, "config_hash": str, "shard_size": int,   # image rows per shard
     "rows": int,                                               # image rows of the split
     "axes": {"image": 10, "box": 17},                          # rows per axis
     "shards": [{"file": "shard-00000.safetensors", "rows": 4, "axes": {"image": 4, "box": 7},
                 "bytes": 1234, "sha256": "<hex>"}, ...],
     "keys": {"latent": {"dtype": "float32", "shape": [10, 8, 64], "axis": "image"}, ...},
     ...extra}

Manifests written before sizes / hashes / axes were recorded stay readable (those checks are skipped).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as _np_load_bytes
from safetensors.numpy import save as _np_save_bytes

from larex import features

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
_SHARD_RE = re.compile(r"^shard-(\d+)\.safetensors$")

REPAIR_HINT = "rerun larex-extract with the same overrides (it recomputes only the bad shards)"
"""Default repair command shown by :class:`CorruptShardError` (readers take ``repair=`` to override it)."""

VERIFY_LEVELS = (None, "size", "sha256")


class CorruptShardError(RuntimeError):
    """A shard (or any safetensors file) that is missing, truncated, altered or unreadable.

    Attributes: ``path`` (the file), ``problem`` (what is wrong), ``repair`` (the command that fixes it).
    """

    def __init__(self, path: str | Path, problem: str, repair: str | None = None):
        self.path = Path(path)
        self.problem = problem
        self.repair = REPAIR_HINT if repair is None else repair
        super().__init__(f"corrupt feature file {self.path}: {problem}; to repair: {self.repair}")


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


def load_arrays(path: str | Path, keys: Sequence[str] | None = None, *, size: int | None = None,
                sha256: str | None = None, repair: str | None = None) -> dict[str, np.ndarray]:
    """Load a safetensors file into numpy arrays (optionally only ``keys``).

    The file is read once; given ``size`` (bytes) and / or ``sha256`` (hex) the bytes are checked against them.
    A mismatch or an unparsable file raises :class:`CorruptShardError` (never a raw safetensors error) whose
    message ends with ``repair`` (default :data:`REPAIR_HINT`). A missing file raises ``FileNotFoundError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such feature file: {path} (run the stage that writes it first)")
    data = path.read_bytes()
    if size is not None and len(data) != int(size):
        raise CorruptShardError(path, f"size {len(data)} bytes, expected {int(size)} (truncated or overwritten)",
                                repair)
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise CorruptShardError(path, f"sha256 mismatch (content {got[:16]}..., manifest {sha256[:16]}...)",
                                    repair)
    try:
        arrays = _np_load_bytes(data)
    except Exception as e:  # safetensors raises its own SafetensorError; never let it escape raw
        raise CorruptShardError(path, f"unreadable safetensors header ({e})", repair) from e
    if keys is None:
        return arrays
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise KeyError(f"{path} has no key(s) {missing}; it holds {sorted(arrays)}")
    return {k: arrays[k] for k in keys}


# --------------------------------------------------------------------------------------------------
# config hashing and layout
# --------------------------------------------------------------------------------------------------
def has_config_hash(path: str | Path, cfg_hash: str) -> bool:
    """True when the safetensors file ``path`` exists, is readable and its metadata carries ``config_hash``."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return False
    try:
        with safe_open(str(path), framework="numpy") as f:
            return (f.metadata() or {}).get("config_hash") == cfg_hash
    except Exception:  # noqa: BLE001 - a truncated or unreadable file is not current: recompute it
        return False


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able object (dict key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_dirname(split: str) -> str:
    """Split names such as ``ood/digits`` map to nested folders ``ood/digits``."""
    parts = split.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid split name {split!r}")
    return split


# --------------------------------------------------------------------------------------------------
# manifests and shard integrity
# --------------------------------------------------------------------------------------------------
def read_manifest(directory: str | Path) -> dict | None:
    p = Path(directory) / MANIFEST
    if not p.is_file():
        return None
    try:
        return read_json(p)
    except (json.JSONDecodeError, OSError):
        return None


def axis_rows(manifest: Mapping[str, Any] | None) -> dict[str, int]:
    """Rows per axis of a split (``{"image": N, "box": M, ...}``); older manifests only know image rows."""
    if not manifest:
        return {features.PRIMARY_AXIS: 0}
    axes = manifest.get("axes")
    if axes:
        return {k: int(v) for k, v in axes.items()}
    return {features.PRIMARY_AXIS: int(manifest.get("rows", 0))}


def _key_axis(key: str) -> str:
    """Row axis of a key recorded in a manifest (keys of old manifests that nobody registers: ``image``)."""
    found = features.lookup(key)
    return found.axis if found is not None else features.PRIMARY_AXIS


def _entry_axes(entry: Mapping[str, Any]) -> dict[str, int]:
    return dict(entry.get("axes") or {features.PRIMARY_AXIS: int(entry["rows"])})


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _header_problem(head: bytes, file_size: int) -> str | None:
    """Why a safetensors file with these leading bytes and this size is unreadable (None when it parses)."""
    if file_size < 8 or len(head) < 8:
        return f"unreadable safetensors header (file is {file_size} bytes)"
    (n,) = struct.unpack("<Q", head[:8])
    if 8 + n > file_size or 8 + n > len(head):
        return f"unreadable safetensors header (header of {n} bytes does not fit in {file_size} bytes)"
    try:
        header = json.loads(head[8:8 + n])
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        return f"unreadable safetensors header ({e})"
    if 8 + n + end != file_size:
        return f"unreadable safetensors header (it describes {8 + n + end} bytes, the file has {file_size})"
    return None


def _file_header_problem(path: Path, file_size: int) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) == 8:
            head += fh.read(min(struct.unpack("<Q", head)[0], file_size))
    return _header_problem(head, file_size)


def _shard_problem(path: Path, entry: Mapping[str, Any], verify: str | None) -> str | None:
    """What is wrong with one shard file given its manifest entry (None when it verifies at this level).

    Entries of manifests written before sizes / hashes were recorded are checked for existence (and, for
    ``sha256``, a parsable header) only.
    """
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    if verify is None:
        return None
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    size = entry.get("bytes")
    if size is not None and actual != int(size):
        return f"size {actual} bytes, expected {int(size)} (truncated or overwritten)"
    if verify == "sha256":
        sha = entry.get("sha256")
        if sha is None:
            return _file_header_problem(path, actual)
        got = file_sha256(path)
        if got != sha:
            return f"sha256 mismatch (content {got[:16]}..., manifest {sha[:16]}...)"
    return None


def is_complete(directory: str | Path, cfg_hash: str | None = None, verify: str | None = "size") -> bool:
    """True when ``directory`` has a manifest marked complete (with this config hash, if given) whose shards verify.

    ``verify``: ``"size"`` (default; a stat per shard: every shard file exists with its recorded size, which
    catches truncation), ``"sha256"`` (also re-hash every shard) or None (trust the manifest).
    """
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    m = read_manifest(directory)
    if not m or not m.get("complete"):
        return False
    if cfg_hash is not None and m.get("config_hash") != cfg_hash:
        return False
    d = Path(directory)
    return all(_shard_problem(d / s["file"], s, verify) is None for s in m.get("shards", []))


def verify_split(directory: str | Path) -> list[str]:
    """File names of the shards listed in the manifest that are missing or fail their size / sha256 check."""
    d = Path(directory)
    m = read_manifest(d)
    if m is None:
        raise FileNotFoundError(f"no features at {d} (run larex-extract first)")
    return [s["file"] for s in m.get("shards", []) if _shard_problem(d / s["file"], s, "sha256") is not None]


# --------------------------------------------------------------------------------------------------
# sharded feature sets
# --------------------------------------------------------------------------------------------------
def _shard_index(entry: Mapping[str, Any], position: int) -> int:
    found = _SHARD_RE.match(str(entry.get("file", "")))
    return int(found.group(1)) if found else position


class ShardWriter:
    """Write a split's feature dicts as fixed-size safetensors shards with a manifest.

    Shard ``i`` always holds image rows :meth:`shard_rows` ``(i) = [i * shard_size, min((i + 1) * shard_size,
    total))`` plus the secondary-axis rows (boxes, ...) whose link key (their global image row) falls in that
    range, so a recomputed shard is byte-identical to the original. Two ways to write:

    * :meth:`write` streams batches and fills shards in order, starting at the first missing shard
      (:attr:`resume_row`); a batch carries its images' secondary rows.
    * :meth:`write_shard` writes exactly shard ``i`` (e.g. only the :meth:`missing_shards` of a resumed split).

    With ``resume=True`` an existing manifest (complete or not) with the same ``cfg_hash`` and ``shard_size``
    is reused: every listed shard whose file has the recorded size and sha256 is kept, bad or missing shards
    are deleted and become missing. Otherwise (or with a changed hash / shard size) the folder starts over.
    The manifest is rewritten after every shard (``complete: false``) and with ``complete: true`` by
    :meth:`close`.

    Distributed extraction (several processes writing whole shards of one folder): the coordinating rank opens
    the folder as above; every other rank opens it with ``manifest=False`` -- it touches no existing file and
    writes no manifest, only its shard files -- and hands its :attr:`written` entries to the coordinator, which
    verifies and records them with :meth:`add_written`, then :meth:`close`\ s the folder.
    """

    def __init__(self, directory: str | Path, cfg_hash: str, shard_size: int = 4096,
                 total: int | None = None, resume: bool = True, manifest: bool = True):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        if total is not None and total < 0:
            raise ValueError("total must be >= 0")
        self.directory = Path(directory)
        self.cfg_hash = cfg_hash
        self.shard_size = int(shard_size)
        self.total = None if total is None else int(total)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._entries: dict[int, dict] = {}  # shard index -> manifest entry
        self.keys: dict[str, dict] = {}  # key -> {"dtype", "shape": [None, *trailing], "axis"}
        self.manifest = bool(manifest)
        m = read_manifest(self.directory)
        if not self.manifest:
            pass  # a non-coordinating rank: the coordinator owns the folder's files and manifest
        elif resume and m and m.get("config_hash") == cfg_hash and m.get("shard_size") == self.shard_size:
            if self.total is None and m.get("complete"):
                self.total = int(m.get("rows", 0))
            self._adopt(m)
        else:
            for old in self.directory.glob("shard-*.safetensors"):
                old.unlink()
            with contextlib.suppress(FileNotFoundError):
                (self.directory / MANIFEST).unlink()
        # streaming state (see write)
        self._cursor: int | None = None  # shard the buffer fills
        self._buf: dict[str, list[np.ndarray]] = {}
        self._stream_keys: dict[str, tuple[str, str, tuple]] | None = None  # key -> (axis, dtype, trailing)
        self._buffered = 0  # image rows in the buffer

    # ---------------------------------------------------------------- resume
    def _adopt(self, m: Mapping[str, Any]) -> None:
        """Keep the verified shards of an existing manifest; delete bad and unlisted shard files."""
        listed = m.get("shards", [])
        n = self.n_shards
        for pos, s in enumerate(listed):
            i = _shard_index(s, pos)
            path = self.directory / s["file"]
            entry = self._verified(path, s, i, n)
            if entry is not None:
                self._entries[i] = entry
        keep = {e["file"] for e in self._entries.values()}
        for f in self.directory.glob("shard-*.safetensors"):
            if f.name not in keep:
                f.unlink()
        if self._entries:
            for k, v in m.get("keys", {}).items():
                self.keys[k] = {"dtype": v["dtype"], "shape": [None, *v["shape"][1:]],
                                "axis": v.get("axis") or _key_axis(k)}
        if len(self._entries) != len(listed) or (m.get("complete") and self.missing_shards()):
            self._write_manifest(complete=False)

    def _verified(self, path: Path, s: Mapping[str, Any], i: int, n: int | None) -> dict | None:
        """The (upgraded) entry of a listed shard when its file verifies and its rows fit shard ``i``."""
        if i < 0 or (n is not None and i >= n) or i in self._entries:
            return None
        rows = int(s.get("rows", -1))
        if n is not None:
            if rows != len(self.shard_rows(i)):
                return None
        elif not 0 < rows <= self.shard_size:
            return None
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None
        if s.get("bytes") is not None and len(data) != int(s["bytes"]):
            return None
        sha = hashlib.sha256(data).hexdigest()
        if s.get("sha256") is not None and sha != s["sha256"]:
            return None
        if s.get("sha256") is None and _header_problem(data, len(data)) is not None:  # an older manifest
            return None
        return {**dict(s), "rows": rows, "axes": _entry_axes(s), "bytes": len(data), "sha256": sha}

    # ---------------------------------------------------------------- layout
    @property
    def n_shards(self) -> int | None:
        """Number of shards of the split (None while ``total`` is unknown)."""
        return None if self.total is None else -(-self.total // self.shard_size)

    def shard_rows(self, i: int) -> range:
        """Image rows of shard ``i`` (global row indices)."""
        if i < 0 or (self.n_shards is not None and i >= self.n_shards):
            raise IndexError(f"shard {i} out of range: the split has {self.n_shards} shard(s)")
        start = i * self.shard_size
        stop = start + self.shard_size
        return range(start, stop if self.total is None else min(stop, self.total))

    def missing_shards(self) -> list[int]:
        """Indices of the shards still to write (with ``total`` unknown: only the gaps before the last one)."""
        n = self.n_shards if self.n_shards is not None else (max(self._entries, default=-1) + 1)
        return [i for i in range(n) if i not in self._entries]

    @property
    def written(self) -> dict[str, Any]:
        """What this writer holds, for :meth:`add_written` in another process: shard entries and key schema."""
        return {"entries": {i: dict(e) for i, e in self._entries.items()}, "keys": {k: dict(v) for k, v in self.keys.items()}}

    def add_written(self, written: Mapping[str, Any]) -> None:
        """Record shards another process wrote into this folder (its :attr:`written`): each file is checked
        against its entry (rows, size, sha256) first; one that does not verify is an error naming it."""
        entries = {}
        for i, e in written["entries"].items():
            i = int(i)
            if i in self._entries:
                raise RuntimeError(f"{self.directory}: shard {i} was written by two processes")
            entry = self._verified(self.directory / e["file"], e, i, self.n_shards)
            if entry is None:
                raise RuntimeError(f"{self.directory}: shard {i} ({e['file']}) written by another rank does not "
                                   "match its record (missing, other size or sha256); rerun the extraction")
            entries[i] = entry
        self._entries.update(entries)  # all or nothing
        if not self.keys:
            self.keys = {k: dict(v) for k, v in written["keys"].items()}
        elif written["keys"] and {k: v["dtype"] for k, v in written["keys"].items()} != \
                {k: v["dtype"] for k, v in self.keys.items()}:
            raise RuntimeError(f"{self.directory}: another rank wrote keys {written['keys']}, this one {self.keys}")

    @property
    def shards(self) -> list[dict]:
        """Manifest entries of the shards written so far, in shard order."""
        return [self._entries[i] for i in sorted(self._entries)]

    @property
    def resume_row(self) -> int:
        """First image row of the first missing shard (where a resumed streaming extraction starts)."""
        missing = self.missing_shards()
        if missing:
            return missing[0] * self.shard_size
        if self.total is not None:
            return self.total
        return sum(e["rows"] for e in self._entries.values())

    # ---------------------------------------------------------------- batch checks
    def _group(self, batch: Mapping[str, np.ndarray | torch.Tensor], what: str
               ) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, int]]:
        """numpy arrays, key -> axis and axis -> rows of a batch; checks lengths and link keys."""
        arrays = {k: to_numpy(v) for k, v in batch.items()}
        key_axis = {k: features.axis(k) for k in arrays}  # UnknownFeatureError for an unregistered key
        model = [k for k, a in key_axis.items() if a == "model"]
        if model:
            raise ValueError(f"{what}: key(s) {model} are model arrays (no rows); save them with save_arrays, "
                             "not in shards")
        rows: dict[str, int] = {}
        for ax in dict.fromkeys(key_axis.values()):
            lengths = {k: (arrays[k].shape[0] if arrays[k].ndim else None) for k in arrays if key_axis[k] == ax}
            if None in lengths.values():
                raise ValueError(f"{what}: scalar arrays have no row axis: "
                                 f"{[k for k, n in lengths.items() if n is None]}")
            if len(set(lengths.values())) != 1:
                raise ValueError(f"{what}: mismatched shapes: the {ax!r}-axis keys must have the same number of "
                                 f"rows, got {lengths}")
            rows[ax] = next(iter(lengths.values()))
            if ax != features.PRIMARY_AXIS:
                link = features.LINK_KEYS[ax]
                if link not in arrays:
                    raise ValueError(f"{what}: {ax!r}-axis keys {sorted(lengths)} come without their link key "
                                     f"{link!r} (the image row of each {ax} row)")
                if arrays[link].ndim != 1 or arrays[link].dtype.kind not in "iu":
                    raise ValueError(f"{what}: link key {link!r} must be a 1-d integer array, got "
                                     f"{arrays[link].dtype} {list(arrays[link].shape)}")
        return arrays, key_axis, rows

    @staticmethod
    def _check_links(arrays, key_axis, lo: int, hi: int, what: str) -> None:
        for ax in dict.fromkeys(key_axis.values()):
            if ax == features.PRIMARY_AXIS:
                continue
            link = arrays[features.LINK_KEYS[ax]]
            if link.size and (int(link.min()) < lo or int(link.max()) >= hi):
                raise ValueError(f"{what}: {ax!r} rows link ({features.LINK_KEYS[ax]!r}) to image rows "
                                 f"[{int(link.min())}, {int(link.max())}], outside the image rows [{lo}, {hi}) "
                                 "that this write covers (a batch carries the secondary rows of its own images, "
                                 "with global image row indices)")

    def _check_keys(self, out: Mapping[str, np.ndarray], key_axis: Mapping[str, str], i: int) -> None:
        """A shard must have the keys, dtypes and trailing shapes of the split's other shards."""
        others = [j for j in self._entries if j != i]
        if not others or not self.keys:
            return
        want = {k: (v["axis"], v["dtype"], tuple(v["shape"][1:])) for k, v in self.keys.items()}
        got = {k: (key_axis[k], str(a.dtype), tuple(a.shape[1:])) for k, a in out.items()}
        if want != got:
            diff = {k: {"shard": got.get(k), "split": want.get(k)} for k in sorted(set(want) | set(got))
                    if want.get(k) != got.get(k)}
            raise ValueError(f"{self.directory}: shard {i} has other keys / dtypes / shapes than the split's "
                             f"other shards (axis, dtype, trailing shape): {diff}")

    # ---------------------------------------------------------------- writing
    def write(self, batch: Mapping[str, np.ndarray | torch.Tensor], images: int | None = None) -> None:
        """Append a batch (streaming; shards are filled in order from :attr:`resume_row`).

        Keys are grouped by row axis; all keys of one axis have the same number of rows. Secondary rows (boxes,
        ...) need their link key, holding global image rows within the images written so far (in the current,
        unwritten shard) or in this batch. ``images`` gives the batch's image rows when it has no image key.
        A shard this fills is (re)written even if a verified copy exists; use :meth:`write_shard` to write only
        chosen shards.
        """
        arrays, key_axis, rows = self._group(batch, f"{self.directory}: batch")
        n_img = rows.get(features.PRIMARY_AXIS)
        if images is not None:
            if n_img is not None and n_img != images:
                raise ValueError(f"{self.directory}: images={images} but the batch has {n_img} image rows")
            n_img = int(images)
        n_img = n_img or 0
        sig = {k: (key_axis[k], str(a.dtype), tuple(a.shape[1:])) for k, a in arrays.items()}
        earlier = self._stream_keys
        if earlier is not None and set(sig) != set(earlier):
            raise ValueError(f"batch keys {sorted(arrays)} differ from earlier batches {sorted(earlier)}")
        if earlier is not None and sig != earlier:
            bad = {k: {"batch": sig[k], "earlier": earlier[k]} for k in sig if sig[k] != earlier[k]}
            raise ValueError(f"{self.directory}: mismatched shapes: dtype / trailing shape of {bad} changed "
                             "between batches")
        if self._cursor is None:
            missing = self.missing_shards()
            self._cursor = missing[0] if missing else (self.n_shards if self.n_shards is not None
                                                       else max(self._entries, default=-1) + 1)
        base = self._cursor * self.shard_size
        seen = base + self._buffered + n_img
        if self.total is not None and seen > self.total:
            raise ValueError(f"{self.directory}: batch goes up to image row {seen}, but the split has only "
                             f"{self.total} rows")
        self._check_links(arrays, key_axis, base, seen, f"{self.directory}: batch")
        self._stream_keys = sig  # only after every check passed: a rejected batch leaves no trace
        for k, a in arrays.items():
            self._buf.setdefault(k, []).append(a)
        self._buffered += n_img
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        """Write the buffer's first ``n`` image rows (and their secondary rows) as shard :attr:`_cursor`."""
        key_axis = {k: v[0] for k, v in (self._stream_keys or {}).items()}
        full = {k: (np.concatenate(v, axis=0) if len(v) > 1 else v[0]) for k, v in self._buf.items()}
        hi = self._cursor * self.shard_size + n  # secondary rows linking below hi belong to this shard
        out: dict[str, np.ndarray] = {}
        rest: dict[str, np.ndarray] = {}
        counts = {features.PRIMARY_AXIS: n}
        for ax in dict.fromkeys(key_axis.values()):
            ks = [k for k in full if key_axis[k] == ax]
            if ax == features.PRIMARY_AXIS:
                for k in ks:
                    out[k], rest[k] = np.ascontiguousarray(full[k][:n]), full[k][n:]
                continue
            inside = full[features.LINK_KEYS[ax]] < hi
            counts[ax] = int(inside.sum())
            for k in ks:
                out[k], rest[k] = np.ascontiguousarray(full[k][inside]), full[k][~inside]
        self._store(self._cursor, out, key_axis, counts)
        self._buf = {k: [a] for k, a in rest.items()}
        self._buffered -= n
        self._cursor += 1

    def write_shard(self, i: int, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Write exactly shard ``i``: its :meth:`shard_rows` ``(i)`` image rows and their secondary rows.

        Image-axis keys must have ``len(shard_rows(i))`` rows (a shard with only secondary keys covers those
        image rows implicitly); secondary rows link to image rows inside ``shard_rows(i)``. Nothing else is
        touched, so a resumed caller recomputes only :meth:`missing_shards`.
        """
        what = f"{self.directory}: shard {i}"
        arrays, key_axis, rows = self._group(arrays, what)
        if not arrays:
            raise ValueError(f"{what}: no arrays to write")
        span = self.shard_rows(i)
        n_img = rows.get(features.PRIMARY_AXIS, len(span))
        if n_img != len(span):
            raise ValueError(f"{what} covers image rows [{span.start}, {span.stop}) ({len(span)} rows), "
                             f"got {n_img} image rows")
        if self._cursor == i and self._buffered:
            raise ValueError(f"{what}: the streaming write() buffer is filling this shard")
        self._check_links(arrays, key_axis, span.start, span.stop, what)
        counts = {features.PRIMARY_AXIS: n_img}
        for ax in dict.fromkeys(key_axis.values()):
            if ax != features.PRIMARY_AXIS:
                counts[ax] = rows[ax]
        self._store(i, {k: np.ascontiguousarray(a) for k, a in arrays.items()}, key_axis, counts)

    def _store(self, i: int, out: dict[str, np.ndarray], key_axis: Mapping[str, str], counts: dict[str, int]) -> None:
        self._check_keys(out, key_axis, i)
        data = _np_save_bytes(out)  # the same bytes save_arrays writes
        name = SHARD_PATTERN.format(i)
        write_bytes(self.directory / name, data)
        self._entries[i] = {"file": name, "rows": counts[features.PRIMARY_AXIS], "axes": counts,
                            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if len(self._entries) == 1 or not self.keys:
            self.keys = {k: {"dtype": str(a.dtype), "shape": [None, *a.shape[1:]], "axis": key_axis[k]}
                         for k, a in out.items()}
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool, extra: Mapping[str, Any] | None = None) -> None:
        if not self.manifest:
            return
        shards = self.shards
        totals = {features.PRIMARY_AXIS: sum(e["rows"] for e in shards)}
        for v in self.keys.values():
            totals.setdefault(v["axis"], 0)
        for e in shards:
            for ax, n in _entry_axes(e).items():
                if ax != features.PRIMARY_AXIS:
                    totals[ax] = totals.get(ax, 0) + int(n)
        write_json(self.directory / MANIFEST, {
            "complete": complete,
            "config_hash": self.cfg_hash,
            "shard_size": self.shard_size,
            "rows": totals[features.PRIMARY_AXIS],
            "axes": totals,
            "shards": shards,
            "keys": {k: {"dtype": v["dtype"], "shape": [totals[v["axis"]], *v["shape"][1:]], "axis": v["axis"]}
                     for k, v in self.keys.items()},
            **(dict(extra) if extra else {}),
        })

    def close(self, extra: Mapping[str, Any] | None = None) -> dict:
        """Flush the last partial shard, check that every shard is there and mark the split complete."""
        if self._buffered:  # secondary rows only ever link to buffered images, so they go with them
            end = self._cursor * self.shard_size + self._buffered
            if self.total is not None and end != self.total:
                raise RuntimeError(f"{self.directory}: wrote rows up to {end}, expected {self.total}")
            self._flush(self._buffered)
        elif not self.keys and self._stream_keys:  # an empty split: still record its keys
            self.keys = {k: {"dtype": dt, "shape": [None, *trailing], "axis": ax}
                         for k, (ax, dt, trailing) in self._stream_keys.items()}
        missing = self.missing_shards()
        rows = sum(e["rows"] for e in self._entries.values())
        if missing:
            raise RuntimeError(f"{self.directory}: shard(s) {missing} were never written ({rows} of "
                               f"{self.total if self.total is not None else '?'} rows)")
        if self.total is not None and rows != self.total:
            raise RuntimeError(f"{self.directory}: wrote {rows} rows, expected {self.total}")
        self._write_manifest(complete=True, extra=extra)
        return read_manifest(self.directory)


def _complete_manifest(directory: Path) -> dict:
    m = read_manifest(directory)
    if not m:
        raise FileNotFoundError(f"no features at {directory} (run larex-extract first)")
    if not m.get("complete"):
        raise RuntimeError(f"features at {directory} are incomplete (an extraction was interrupted); "
                           "rerun larex-extract to resume it")
    return m


def iter_shards(directory: str | Path, keys: Sequence[str] | None = None,
                repair: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield the shards of a complete split one at a time (bounded memory).

    Each shard's bytes are checked against the manifest's size and sha256 as it is read; a missing, truncated,
    altered or unparsable shard raises :class:`CorruptShardError` naming the file and ``repair`` (default
    :data:`REPAIR_HINT`). Secondary-axis link keys (``image_index``) are global image rows.
    """
    directory = Path(directory)
    m = _complete_manifest(directory)
    if keys is not None:
        missing = [k for k in keys if k not in m["keys"]]
        if missing:
            raise KeyError(f"features at {directory} have no key(s) {missing}; available: {sorted(m['keys'])}")
    for s in m["shards"]:
        path = directory / s["file"]
        if not path.is_file():
            raise CorruptShardError(path, "missing", repair)
        yield load_arrays(path, keys, size=s.get("bytes"), sha256=s.get("sha256"), repair=repair)


def read_features(directory: str | Path, keys: Sequence[str] | None = None,
                  repair: str | None = None) -> dict[str, np.ndarray]:
    """Concatenate all shards of a split per key (use :func:`iter_shards` for data that does not fit memory).

    Keys of different row axes have their own lengths (:func:`axis_rows`); link keys stay global. An empty split
    gives zero-row arrays of the recorded dtypes and shapes.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for shard in iter_shards(directory, keys, repair=repair):
        for k, v in shard.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        m = read_manifest(directory) or {}
        return {k: np.zeros([0, *v["shape"][1:]], dtype=v["dtype"]) for k, v in m.get("keys", {}).items()
                if keys is None or k in keys}
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}
