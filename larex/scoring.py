"""Fit every method on ID ``fit`` (``val`` for its hyperparameters) and score ``val``, ``test`` and each OOD set.

Scores are cached per method in ``<hooked_layer>/scores/<method>-<hash>.parquet`` (+ ``.json``), keyed by the
method's config and the hashes of every input it reads, so evaluations that share a method and its inputs (a
sweep over other methods or evaluate settings) score it once. No Hydra or MLflow here.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from larex import io
from larex.featurestore import FeatureStore
from larex.layout import Layout, claim


def check_inputs(methods: Mapping[str, object], store: FeatureStore, splits: Sequence[str]) -> None:
    """Every method's fit inputs on ``fit`` and score inputs on every other split, before any compute."""
    for name, pp in methods.items():
        store.check(splits[0], name, pp.fit_requires)
        for s in splits[1:]:
            store.check(s, name, pp.requires)


def score_methods(methods: Mapping[str, object], method_hashes: Mapping[str, str], specs: Mapping[str, object],
                  store: FeatureStore, layout: Layout, splits: Sequence[str], force: bool = False,
                  ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """``splits[0]`` is the fit split; returns ``{method: {split: scores}}`` for the others and fit+score seconds."""
    check_inputs(methods, store, splits)
    all_scores, timings = {}, {}
    for name, pp in methods.items():
        h = method_hashes[name]
        parquet, meta = layout.scores_file(name, h), layout.scores_file(name, h, ".json")
        with claim(parquet, f"scoring {name}"):
            if not force and meta.is_file() and parquet.is_file():
                df = pd.read_parquet(parquet)
                all_scores[name] = {sp: df.loc[df["split"] == sp, "score"].to_numpy() for sp in splits[1:]}
                timings[name] = float(io.read_json(meta).get("seconds", float("nan")))
                continue
            t0 = time.perf_counter()
            pp.fit(store.get(splits[0], pp.fit_requires), store.get(splits[1], pp.requires))
            scores = {sp: np.asarray(pp.score(store.get(sp, pp.requires)), dtype=np.float64) for sp in splits[1:]}
            timings[name] = time.perf_counter() - t0
            for sp, v in scores.items():
                if v.shape != (store.rows(sp, pp.score_axis),) or not np.isfinite(v).all():
                    raise ValueError(f"method {name} returned invalid scores for split {sp}: shape {v.shape}, "
                                     f"{int((~np.isfinite(v)).sum())} non-finite values")
            all_scores[name] = scores
            io.write_bytes(parquet, _scores_parquet(scores, store))
            io.write_json(meta, {"config_hash": h, "seconds": timings[name], "method": specs.get(name)})
    return all_scores, timings


def _scores_parquet(scores: Mapping[str, np.ndarray], store: FeatureStore) -> bytes:
    frames = []
    for split, s in scores.items():
        labels = store.get(split, ("labels",))["labels"] if "labels" in store.available(split) else None
        if labels is None or len(labels) != len(s):
            labels = np.full(len(s), -1)
        frames.append(pd.DataFrame({"split": split, "score": s, "label": labels}))
    return pd.concat(frames, ignore_index=True).to_parquet(index=False)
