"""Reads a split's features for the methods: extracted parts, aggregated keys and model arrays, from one layout.

No Hydra, no MLflow: it is handed the :class:`~larex.layout.Layout`, the part hash function and the keys the
aggregate stage writes. Arrays are read once per (split, key) and cached for the run.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from larex import features, io
from larex.layout import Layout


class FeatureStore:
    """``get(split, keys)`` -> ``{key: array}``; ``check`` fails with the command that produces a missing key."""

    def __init__(self, layout: Layout, part_hash: Callable[[str, str], str], aggregated: Iterable[str] = (),
                 aggregate_hash: Callable[[str], str] | None = None):
        self.layout = layout
        self.part_hash = part_hash
        self.aggregated = set(aggregated)
        self.aggregate_hash = aggregate_hash
        self._cache: dict[tuple[str, str], np.ndarray] = {}
        self._available: dict[str, set[str]] = {}  # per split: outputs do not change while a store is in use

    def _part_ok(self, split: str, key: str) -> bool:
        if key not in self.layout.parts:
            return False
        part = self.layout.parts[key]
        return io.is_complete(self.layout.part_dir(split, part), self.part_hash(split, part))

    def _aggregate_ok(self, split: str) -> bool:
        path = self.layout.aggregate_file(split)
        if self.aggregate_hash is None:
            return path.is_file()
        return io.has_config_hash(path, self.aggregate_hash(split))

    def available(self, split: str) -> set[str]:
        """Keys of ``split`` that are complete on disk (checked once per split for the store's lifetime)."""
        if split not in self._available:
            keys = {k for k in self.layout.parts if not features.is_model_key(k) and self._part_ok(split, k)}
            keys |= {k for k in self.layout.parts if features.is_model_key(k)
                     and self.layout.model_file(self.layout.parts[k]).is_file()}
            if self.aggregated and self._aggregate_ok(split):
                keys |= self.aggregated
            self._available[split] = keys
        return set(self._available[split])

    def check(self, split: str, method: str, keys: Iterable[str]) -> None:
        missing = [k for k in keys if k not in self.available(split)]
        if missing:
            stages = sorted({"larex-aggregate" if k in self.aggregated else "larex-extract" for k in missing})
            raise FileNotFoundError(
                f"method {method} needs feature(s) {missing} of split {split}, which are missing or incomplete "
                f"under {self.layout.extract_dir}; run {' then '.join(stages)} (or larex-run) with the same "
                "overrides first")

    def rows(self, split: str, axis: str = features.PRIMARY_AXIS) -> int:
        """Rows of ``axis`` in ``split``, from the manifest of a part holding a key of that axis."""
        for k, part in self.layout.parts.items():
            if not features.is_model_key(k) and features.axis(k) == axis:
                m = io.read_manifest(self.layout.part_dir(split, part)) or {}
                return int((m.get("axes") or {}).get(axis, m.get("rows", 0)))
        return 0

    def get(self, split: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
        keys = list(keys)
        by_part: dict[str, list[str]] = {}
        for k in keys:
            if (split, k) in self._cache or k in self.aggregated or features.is_model_key(k):
                continue
            by_part.setdefault(self.layout.parts[k], []).append(k)
        for part, ks in by_part.items():
            for k, v in io.read_features(self.layout.part_dir(split, part), ks).items():
                self._cache[(split, k)] = v
        out = {}
        for k in keys:
            if (split, k) not in self._cache:
                if k in self.aggregated:
                    self._cache[(split, k)] = io.load_arrays(self.layout.aggregate_file(split), [k])[k]
                elif features.is_model_key(k):
                    self._cache[(split, k)] = io.load_arrays(self.layout.model_file(self.layout.parts[k]), [k])[k]
            out[k] = self._cache[(split, k)]
        return out
