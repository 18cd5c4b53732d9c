"""Evaluate stage: fit every postprocessor on ID ``fit`` (hyperparameters on ID ``val``), score ``val``,
``test`` and each OOD set, compute metrics and thresholds, write tables/plots, log one MLflow run.

Outputs under ``<run_dir>``: ``scores/<postprocessor>.parquet``, ``metrics.csv``, ``metrics.parquet``,
``plots/*.png`` and ``evaluate.json`` (config hash; lets ``larex-run`` skip an unchanged evaluation).
Nothing is tuned on ``test`` or OOD data.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from larex import io, metrics, plots
from larex.stages import common
from larex.stages.aggregate import aggregate_path, is_current
from larex.stages.extract import extract_dir

METRIC_COLUMNS = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_ood")
LOWER_IS_BETTER = {"fpr95", "fpr95_ood"}
HEAD_KEYS = ("head.weight", "head.bias")
AGGREGATE_KEYS = ("entropy",)


def postprocessor_specs(cfg: DictConfig) -> dict[str, DictConfig]:
    specs: dict[str, DictConfig] = {}
    for group in ("postprocessor", "baselines"):
        node = cfg.get(group)
        if node:
            for name, spec in node.items():
                if name in specs:
                    raise common.ConfigError(f"method {name!r} is selected twice (postprocessor and baselines)")
                specs[name] = spec
    if not specs:
        raise common.ConfigError("no method selected: set postprocessor=[lared,larem] and/or baselines=[...]")
    return specs


def evaluate_hash(cfg: DictConfig) -> str:
    return io.config_hash({
        "splits": {s: common.aggregate_hash(cfg, s) for s in common.all_splits(cfg)},
        "methods": {k: common.plain(v) for k, v in postprocessor_specs(cfg).items()},
        "evaluate": common.plain(cfg.evaluate), "tracking": common.plain(cfg.tracking),
    })


class FeatureStore:
    """Reads the features a method needs: ``entropy`` from aggregate, the rest from extract, head once."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.extract = extract_dir(cfg)
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def available(self, split: str) -> set[str]:
        keys = set((io.read_manifest(self.extract / split) or {}).get("keys", {}))
        if is_current(aggregate_path(self.cfg, split), common.aggregate_hash(self.cfg, split)):
            keys |= set(AGGREGATE_KEYS)
        if (self.extract / "head.safetensors").is_file():
            keys |= set(HEAD_KEYS)
        return keys

    def check(self, split: str, method: str, requires: tuple[str, ...]) -> None:
        if not io.is_complete(self.extract / split, common.extract_hash(self.cfg, split)):
            raise FileNotFoundError(f"split {split} has no complete features for this config at "
                                    f"{self.extract / split}: run larex-extract (or larex-run) first")
        missing = [k for k in requires if k not in self.available(split)]
        if missing:
            hints = []
            for k in missing:
                if k in AGGREGATE_KEYS:
                    hints.append(f"'{k}' is written by larex-aggregate")
                elif k in HEAD_KEYS:
                    hints.append(f"'{k}' is written by larex-extract when model.head names the final linear layer")
                else:
                    hints.append(f"'{k}' is written by larex-extract when extract.keys contains it")
            raise KeyError(f"method {method} needs feature(s) {missing} of split {split}, which are missing: "
                           + "; ".join(hints))

    def get(self, split: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
        out = {}
        need_ex = [k for k in keys if k not in AGGREGATE_KEYS and k not in HEAD_KEYS and (split, k) not in self._cache]
        if need_ex:
            for k, v in io.read_features(self.extract / split, need_ex).items():
                self._cache[(split, k)] = v
        for k in keys:
            if (split, k) in self._cache:
                out[k] = self._cache[(split, k)]
            elif k in AGGREGATE_KEYS:
                self._cache[(split, k)] = io.load_arrays(aggregate_path(self.cfg, split), [k])[k]
                out[k] = self._cache[(split, k)]
            elif k in HEAD_KEYS:
                out[k] = io.load_arrays(self.extract / "head.safetensors", [k])[k]
        return out


def method_rows(method: str, scores: Mapping[str, np.ndarray], oods: list[str], tpr: float,
                zscore_percentiles: list[float]) -> tuple[list[dict], dict[str, float]]:
    """Metric rows (one per OOD set) and the flat MLflow metrics of one method."""
    thr = metrics.threshold_at_tpr(scores["val"], tpr)
    zthr = metrics.zscore_thresholds(scores["val"], tuple(zscore_percentiles)) if zscore_percentiles else {}
    rows, flat = [], {}
    for ood in oods:
        m = metrics.ood_metrics(scores["test"], scores[f"ood/{ood}"], tpr=tpr)
        at = metrics.rates_at_threshold(scores["test"], scores[f"ood/{ood}"], thr)
        row = {"ood": ood, "method": method, **m, "threshold": thr, "id_tpr_at_threshold": at["tpr"],
               "ood_fpr_at_threshold": at["fpr"]}
        for zname, zt in zthr.items():
            zr = metrics.rates_at_threshold(scores["test"], scores[f"ood/{ood}"], zt)
            row[f"threshold_{zname}"] = zt
            row[f"ood_fpr_at_threshold_{zname}"] = zr["fpr"]
        rows.append(row)
        flat.update({f"{ood}/{method}/{k}": float(v) for k, v in row.items() if k not in ("ood", "method")})
    return rows, flat


def results_table(df: pd.DataFrame, title: str) -> Table:
    """Rich table: method × OOD set, AUROC and FPR95, best per column in bold green."""
    t = Table(title=title, show_lines=False)
    t.add_column("method", style="bold")
    oods = list(dict.fromkeys(df["ood"]))
    for ood in oods:
        t.add_column(f"{ood}\nAUROC ↑", justify="right")
        t.add_column(f"{ood}\nFPR95 ↓", justify="right")
    best = {}
    for ood in oods:
        sub = df[df["ood"] == ood]
        best[(ood, "auroc")] = sub["auroc"].max()
        best[(ood, "fpr95")] = sub["fpr95"].min()
    for method in dict.fromkeys(df["method"]):
        cells = []
        for ood in oods:
            r = df[(df["ood"] == ood) & (df["method"] == method)].iloc[0]
            for col in ("auroc", "fpr95"):
                s = f"{r[col]:.4f}"
                cells.append(f"[bold green]{s}[/]" if np.isclose(r[col], best[(ood, col)]) else s)
        t.add_row(method, *cells)
    return t


def run(cfg: DictConfig) -> pd.DataFrame:
    common.ensure_ood(cfg)
    out = common.run_dir(cfg)
    h = evaluate_hash(cfg)
    state = out / "evaluate.json"
    if not cfg.force and state.is_file() and io.read_json(state).get("config_hash") == h \
            and (out / "metrics.csv").is_file():
        df = pd.read_csv(out / "metrics.csv")
        common.console.print(f"[evaluate] up to date: {out / 'metrics.csv'}")
        common.console.print(results_table(df, f"{cfg.dataset.name} / {cfg.model.name} / {cfg.hooked_layer.name}"))
        return df

    oods = common.ood_names(cfg)
    specs = postprocessor_specs(cfg)
    methods = {name: instantiate(spec) for name, spec in specs.items()}
    store = FeatureStore(cfg)
    splits = ["fit", "val", "test", *(f"ood/{o}" for o in oods)]
    for name, pp in methods.items():  # every missing input fails before any compute
        for s in splits:
            store.check(s, name, tuple(pp.requires))

    tracker = None
    if cfg.tracking.enabled:
        from larex.tracking import Tracker, default_uri

        uri = cfg.tracking.uri or default_uri(common.output_root(cfg))
        tracker = Tracker(uri, str(cfg.tracking.experiment), artifact_root=common.output_root(cfg) / "mlartifacts")

    all_rows, flat, all_scores, timings = [], {}, {}, {}
    head_keys = set(HEAD_KEYS)
    for name, pp in methods.items():
        req = tuple(pp.requires)
        feat_keys = tuple(k for k in req if k not in head_keys)
        head = store.get("fit", tuple(k for k in req if k in head_keys))
        t0 = time.perf_counter()
        pp.fit({**store.get("fit", feat_keys), **head}, {**store.get("val", feat_keys), **head})
        scores = {s: np.asarray(pp.score({**store.get(s, feat_keys), **head}), dtype=np.float64)
                  for s in splits[1:]}
        timings[name] = time.perf_counter() - t0
        all_scores[name] = scores
        rows, f = method_rows(name, scores, oods, float(cfg.evaluate.tpr), list(cfg.evaluate.zscore_percentiles))
        all_rows += rows
        flat.update(f)
        io.write_bytes(out / "scores" / f"{name}.parquet", _scores_parquet(scores, store))

    df = pd.DataFrame(all_rows)
    mean = df.groupby("method", sort=False)[list(METRIC_COLUMNS)].mean().reset_index()
    mean.insert(0, "ood", "mean")
    table = pd.concat([df, mean], ignore_index=True)
    io.write_text(out / "metrics.csv", table.to_csv(index=False))
    io.write_bytes(out / "metrics.parquet", table.to_parquet(index=False))
    for _, r in mean.iterrows():
        flat.update({f"mean/{r['method']}/{k}": float(r[k]) for k in METRIC_COLUMNS})

    id_acc = _id_accuracy(store)
    if id_acc is not None:
        flat["id/test_accuracy"] = id_acc

    pngs = []
    if cfg.evaluate.plots:
        pngs = _plots(out / "plots", all_scores, oods, table)

    title = f"{cfg.dataset.name} / {cfg.model.name} / {cfg.hooked_layer.name}"
    if tracker is not None:
        with tracker.start_run(run_name=cfg.tracking.run_name or f"{cfg.dataset.name}-{cfg.model.name}-"
                               f"{cfg.hooked_layer.name}", tags={"larex.stage": "evaluate", "larex.run_dir": str(out)}):
            tracker.log_params(common.plain(cfg))
            tracker.log_metrics(flat)
            tracker.log_metrics({f"time/{k}_s": v for k, v in timings.items()})
            for p in (out / "metrics.csv", out / "metrics.parquet"):
                tracker.log_artifact(p)
            for p in pngs:
                tracker.log_artifact(p, "plots")
            tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            run_id = tracker.run_id
        io.write_json(out / "evaluate.json", {"config_hash": h, "mlflow_run_id": run_id, "tracking_uri": tracker.uri})
    else:
        io.write_json(out / "evaluate.json", {"config_hash": h})

    common.console.print(results_table(table, title))
    if id_acc is not None:
        common.console.print(f"ID test accuracy: {id_acc:.4f}")
    common.console.print(f"metrics: {out / 'metrics.csv'}   plots: {out / 'plots'}")
    if tracker is not None:
        common.console.print(f"MLflow run {tracker.run_id}: mlflow ui --backend-store-uri {tracker.uri}")
    return table


def _scores_parquet(scores: Mapping[str, np.ndarray], store: FeatureStore) -> bytes:
    frames = []
    for split, s in scores.items():
        labels = store.get(split, ("labels",)).get("labels") if "labels" in store.available(split) else None
        frames.append(pd.DataFrame({"split": split, "score": s,
                                    "label": labels if labels is not None else np.full(len(s), -1)}))
    return pd.concat(frames, ignore_index=True).to_parquet(index=False)


def _id_accuracy(store: FeatureStore) -> float | None:
    if not {"logits", "labels"} <= store.available("test"):
        return None
    f = store.get("test", ("logits", "labels"))
    return float(np.mean(f["logits"].argmax(1) == f["labels"]))


def _plots(directory: Path, all_scores: Mapping[str, Mapping[str, np.ndarray]], oods: list[str],
           table: pd.DataFrame) -> list[Path]:
    pngs = []
    for name, scores in all_scores.items():
        ood_scores = {o: scores[f"ood/{o}"] for o in oods}
        pngs.append(plots.roc_plot(scores["test"], ood_scores, f"{name}: ID test vs OOD", directory / f"roc_{name}.png"))
        pngs.append(plots.score_histogram({"ID test": scores["test"], **ood_scores}, f"{name} scores",
                                          directory / f"hist_{name}.png",
                                          threshold=metrics.threshold_at_tpr(scores["val"], 0.95)))
    mean = table[table["ood"] == "mean"].sort_values("auroc", ascending=False)
    best = list(mean["method"][:6])
    for o in oods:
        curves = {m: (all_scores[m]["test"], all_scores[m][f"ood/{o}"]) for m in best}
        pngs.append(plots.methods_roc_plot(curves, f"best methods: ID test vs {o}", directory / f"roc_ood_{o}.png"))
    return pngs
