"""Output layout: every stage's folder, keyed by the hash of the config that produced it.

One :class:`Layout` is built per run (from plain values, by ``larex.stages.common.build_layout``) and handed
to the stages; no other module computes an output path. The tree::

    <root>/<task>/<dataset>/<model>/
      checkpoint-<train>/                       model.safetensors + manifest.json   (models we train)
      <hooked_layer>/
        extract-<extract>/<split>/<part>/       shard-*.safetensors + manifest.json (one part per producer)
        extract-<extract>/model/<part>.safetensors                                  (model-axis keys: head)
        aggregate-<aggregate>/<split>.safetensors
        scores/<method>-<hash>.parquet (+ .json)
        evaluate-<evaluate>/                    metrics.csv/.parquet, results.md, plots/, evaluate.json, config.yaml
        index.json                              every stage output of this hooked layer: hash, time, overrides
        latest -> evaluate-<...>                newest evaluation (symlink) + latest.json (pointer file)

* ``extract-<hash>`` is keyed by what fixes the rows and the model (trained weights, data, limits, seed, input
  transform); each producer's part inside a split is keyed by the producer's own parameters (``<part>`` =
  ``<producer>-<hash>``), so runs that need other features add parts and share the rest.
* A sweep over evaluate-only keys shares the extraction and the aggregation and gets one ``evaluate-<hash>``
  per job. Re-running a sweep finds every folder complete and recomputes nothing.
* :func:`claim` serialises writers of one output across processes (an ``fcntl`` lock file beside it): the
  second job waits, then finds the output complete and reuses it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from larex import io

INDEX = "index.json"
LATEST = "latest"


def stage_hash(parts: Mapping[str, Any]) -> str:
    """Hash of what a stage's output depends on (a JSON-able mapping; key order does not matter)."""
    return io.config_hash(dict(parts))


def split_dirname(split: str) -> str:
    """``ood/digits`` -> nested folders ``ood/digits``; rejects empty, ``.`` and ``..`` parts."""
    return io.split_dirname(split)


@dataclass(frozen=True)
class Layout:
    """Paths of one run's outputs. Built once per run; every stage reads its folders from here.

    Attributes:
        root: the output root (``output_root``).
        task, dataset, model, hooked_layer: names (folders).
        train_hash, extract_hash, aggregate_hash, evaluate_hash: each stage's config hash.
        parts: producer part name (``<producer>-<hash>``) per feature key, from the extraction plan.
    """

    root: Path
    task: str
    dataset: str
    model: str
    hooked_layer: str
    train_hash: str
    extract_hash: str
    aggregate_hash: str
    evaluate_hash: str
    parts: Mapping[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ folders
    @property
    def model_dir(self) -> Path:
        return self.root / self.task / self.dataset / self.model

    @property
    def checkpoint_dir(self) -> Path:
        return self.model_dir / f"checkpoint-{self.train_hash}"

    @property
    def layer_dir(self) -> Path:
        return self.model_dir / self.hooked_layer

    @property
    def extract_dir(self) -> Path:
        return self.layer_dir / f"extract-{self.extract_hash}"

    @property
    def aggregate_dir(self) -> Path:
        return self.layer_dir / f"aggregate-{self.aggregate_hash}"

    @property
    def evaluate_dir(self) -> Path:
        return self.layer_dir / f"evaluate-{self.evaluate_hash}"

    @property
    def scores_dir(self) -> Path:
        return self.layer_dir / "scores"

    # ------------------------------------------------------------------ files
    def split_dir(self, split: str) -> Path:
        return self.extract_dir / split_dirname(split)

    def part_dir(self, split: str, part: str) -> Path:
        """Shards of one producer part of one split."""
        return self.split_dir(split) / part

    def key_dir(self, split: str, key: str) -> Path:
        """Folder of the part that holds per-row feature ``key`` of ``split`` (from the plan)."""
        if key not in self.parts:
            raise KeyError(f"feature {key!r} is not in this run's extraction plan (planned: {sorted(self.parts)})")
        return self.part_dir(split, self.parts[key])

    def model_file(self, part: str) -> Path:
        """Model-axis arrays (e.g. the head weights) of one producer part."""
        return self.extract_dir / "model" / f"{part}.safetensors"

    def aggregate_file(self, split: str) -> Path:
        return self.aggregate_dir / f"{split_dirname(split)}.safetensors"

    def scores_file(self, method: str, method_hash: str, suffix: str = ".parquet") -> Path:
        return self.scores_dir / f"{method}-{method_hash}{suffix}"

    def with_parts(self, parts: Mapping[str, str]) -> "Layout":
        return Layout(self.root, self.task, self.dataset, self.model, self.hooked_layer, self.train_hash,
                      self.extract_hash, self.aggregate_hash, self.evaluate_hash, dict(parts))

    # ------------------------------------------------------------------ index and latest
    def record(self, stage: str, directory: Path, config_hash: str, info: Mapping[str, Any] | None = None) -> None:
        """Add (or refresh) ``directory`` in ``<hooked_layer>/index.json``; an evaluation also becomes ``latest``.

        The index lists every stage output of this hooked layer with its hash, time and the overrides that
        produced it, so a person finds a result without knowing hashes. Updated under a lock, atomically.
        """
        entry = {"stage": stage, "hash": config_hash, "path": str(directory.relative_to(self.layer_dir))
                 if directory.is_relative_to(self.layer_dir) else str(directory),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(dict(info) if info else {})}
        index = self.layer_dir / INDEX
        with claim(index):
            entries = read_index(self.layer_dir)
            entries = [e for e in entries if not (e.get("stage") == stage and e.get("hash") == config_hash)]
            entries.append(entry)
            io.write_json(index, entries)
            if stage == "evaluate":
                set_latest(self.layer_dir, directory, entry)

    def latest(self) -> Path | None:
        """The newest evaluation folder of this hooked layer (any config), or None."""
        return latest_dir(self.layer_dir)


def read_index(layer_dir: Path) -> list[dict]:
    """Entries of ``<layer_dir>/index.json`` (oldest first); [] when there is none or it is unreadable."""
    p = Path(layer_dir) / INDEX
    try:
        data = io.read_json(p)
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return data if isinstance(data, list) else []


def set_latest(layer_dir: Path, target: Path, entry: Mapping[str, Any]) -> None:
    """Point ``<layer_dir>/latest`` (relative symlink, replaced atomically) and ``latest.json`` at ``target``."""
    layer_dir = Path(layer_dir)
    io.write_json(layer_dir / f"{LATEST}.json", {**dict(entry), "path": str(target)})
    tmp = layer_dir / f".{LATEST}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        tmp.symlink_to(os.path.relpath(target, layer_dir), target_is_directory=True)
        os.replace(tmp, layer_dir / LATEST)
    except OSError:  # a filesystem without symlinks: latest.json is the pointer
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def latest_dir(layer_dir: Path) -> Path | None:
    p = Path(layer_dir) / f"{LATEST}.json"
    try:
        target = Path(io.read_json(p)["path"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None
    return target if target.is_dir() else None


# --------------------------------------------------------------------------------------------------
# claims: one writer per output across processes
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def claim(path: str | Path, what: str | None = None, on_wait=None) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (beside ``path``) while a stage writes ``path``.

    Another process (a parallel sweep job) that claims the same output blocks until this one is done; it
    should then check whether the output is complete and reuse it. The lock file records who holds it
    (host, pid, time) for a person looking at a stuck run. ``fcntl`` locks are released by the kernel when the
    holder dies, so a killed job never leaves a stale claim. ``on_wait(holder_text)`` is called once when the
    claim is held by someone else.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                with contextlib.suppress(OSError):
                    on_wait(os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}"
                      f"{' ' + what if what else ''}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
