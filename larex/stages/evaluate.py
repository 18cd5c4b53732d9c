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
ODIN_KEY = "odin_logits"
ODIN_HINT = "extract.odin={temperature: 1000, epsilon: 0.0014}"


def baseline_specs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The selected baselines; ``baselines=all`` expands to every packaged ``configs/baselines/*.yaml``."""
    node = cfg.get("baselines") or {}
    specs = {name: spec for name, spec in node.items() if name != "all"}
    if "all" in node:
        for name in common.packaged_options("baselines"):
            if name != "all" and name not in specs:
                specs[name] = common.load_packaged_option("baselines", name)
    return specs


def postprocessor_specs(cfg: DictConfig) -> dict[str, DictConfig]:
    specs: dict[str, DictConfig] = {}
    for group, node in (("postprocessor", cfg.get("postprocessor") or {}), ("baselines", baseline_specs(cfg))):
        if node:
            for name, spec in node.items():
                if name in specs:
                    raise common.ConfigError(f"method {name!r} is selected twice (postprocessor and baselines)")
                specs[name] = spec
    if not specs:
        raise common.ConfigError("no method selected: set postprocessor=[lared,larem] and/or baselines=[...]")
    return specs


def producible_features(cfg: DictConfig) -> set[str]:
    """Feature keys this config's extract + aggregate stages write."""
    keys = set(cfg.extract.features) | set(AGGREGATE_KEYS) | {f"nac.{layer}" for layer in cfg.extract.nac_layers or []}
    if cfg.model.get("head"):
        keys |= set(HEAD_KEYS)
    if cfg.extract.get("odin"):
        keys.add(ODIN_KEY)
    return keys


def feature_option(key: str) -> str:
    """The config setting that makes the extract/aggregate stages write feature ``key``."""
    if key in AGGREGATE_KEYS:
        return "larex-aggregate (with 'latent' in extract.features)"
    if key.startswith("nac."):
        return f"extract.nac_layers=[{key[4:]}]"
    if key == ODIN_KEY:
        return ODIN_HINT
    if key in HEAD_KEYS:
        return "model.head=<dotted path of the final linear layer>"
    return f"extract.features=[...,{key}]"


def check_requirements(cfg: DictConfig) -> None:
    """Fail before any compute when a selected method needs a feature this config does not extract."""
    have = producible_features(cfg)
    for name, spec in postprocessor_specs(cfg).items():
        missing = [k for k in instantiate(spec).requires if k not in have]
        if missing:
            raise common.ConfigError(f"method {name} needs feature(s) {missing}, which this config does not "
                                     f"extract; add {' and '.join(map(feature_option, missing))} or drop the method")


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
            raise KeyError(f"method {method} needs feature(s) {missing} of split {split}, which are missing; "
                           f"produce them with {' and '.join(map(feature_option, missing))} and rerun "
                           "larex-extract / larex-aggregate")

    def rows(self, split: str) -> int:
        return int((io.read_manifest(self.extract / split) or {}).get("rows", 0))

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


def _marked_rows(df: pd.DataFrame, col: str, better: str, mark) -> list[tuple[str, list[str]]]:
    """(method, cells) per method for metric ``col``; the best value of each OOD column passed through ``mark``."""
    oods = list(dict.fromkeys(df["ood"]))
    best = {o: getattr(df.loc[df["ood"] == o, col], better)() for o in oods}
    rows = []
    for method in dict.fromkeys(df["method"]):
        cells = []
        for ood in oods:
            v = df.loc[(df["ood"] == ood) & (df["method"] == method), col].iloc[0]
            cells.append(mark(f"{v:.4f}") if np.isclose(v, best[ood]) else f"{v:.4f}")
        rows.append((method, cells))
    return rows


def results_tables(df: pd.DataFrame, title: str) -> list[Table]:
    """Two Rich tables (AUROC ↑ and FPR95 ↓): method rows × OOD-set columns, best per column in bold green."""
    oods = list(dict.fromkeys(df["ood"]))
    tables = []
    for col, better in (("auroc", "max"), ("fpr95", "min")):
        arrow = "↑" if better == "max" else "↓"
        t = Table(title=f"{title} — {col.upper()} {arrow}", title_justify="left")
        t.add_column("method", style="bold", no_wrap=True)
        for ood in oods:
            t.add_column(ood, justify="right", no_wrap=True)
        for method, cells in _marked_rows(df, col, better, lambda v: f"[bold green]{v}[/]"):
            t.add_row(method, *cells)
        tables.append(t)
    return tables


def results_markdown(df: pd.DataFrame, title: str) -> str:
    """Every metric as a Markdown table (method × OOD set, best per column in bold), for the run folder and
    MLflow; the console shows AUROC and FPR95 only."""
    oods = list(dict.fromkeys(df["ood"]))
    lines = [f"# {title}", ""]
    for col in METRIC_COLUMNS:
        better = "min" if col in LOWER_IS_BETTER else "max"
        lines += [f"## {col.upper()} ({'higher' if better == 'max' else 'lower'} is better)", "",
                  "| method | " + " | ".join(oods) + " |", "|---|" + "---:|" * len(oods)]
        for method, cells in _marked_rows(df, col, better, lambda v: f"**{v}**"):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def print_results(df: pd.DataFrame, title: str) -> None:
    for t in results_tables(df, title):
        common.console.print(t)


def run(cfg: DictConfig) -> pd.DataFrame:
    common.ensure_ood(cfg)
    out = common.run_dir(cfg)
    h = evaluate_hash(cfg)
    state = out / "evaluate.json"
    if not cfg.force and state.is_file() and io.read_json(state).get("config_hash") == h \
            and (out / "metrics.csv").is_file():
        df = pd.read_csv(out / "metrics.csv")
        common.log("evaluate", f"up to date: {out / 'metrics.csv'}")
        print_results(df, f"{cfg.dataset.name} / {cfg.model.name} / {cfg.hooked_layer.name}")
        return df

    oods = common.ood_names(cfg)
    tracker = None
    if cfg.tracking.enabled:
        from larex.tracking import Tracker, default_uri

        uri = cfg.tracking.uri or default_uri(common.output_root(cfg))
        tracker = Tracker(uri, str(cfg.tracking.experiment), artifact_root=common.output_root(cfg) / "mlartifacts")

    all_scores, timings = score_methods(cfg, postprocessor_specs(cfg))
    all_rows, flat = [], {}
    for name, scores in all_scores.items():
        rows, f = method_rows(name, scores, oods, float(cfg.evaluate.tpr), list(cfg.evaluate.zscore_percentiles))
        all_rows += rows
        flat.update(f)
    store = FeatureStore(cfg)

    df = pd.DataFrame(all_rows)
    mean = df.groupby("method", sort=False)[list(METRIC_COLUMNS)].mean().reset_index()
    mean.insert(0, "ood", "mean")
    table = pd.concat([df, mean], ignore_index=True)
    io.write_text(out / "metrics.csv", table.to_csv(index=False))
    io.write_bytes(out / "metrics.parquet", table.to_parquet(index=False))
    title = f"{cfg.dataset.name} / {cfg.model.name} / {cfg.hooked_layer.name}"
    io.write_text(out / "results.md", results_markdown(table, title))
    for _, r in mean.iterrows():
        flat.update({f"mean/{r['method']}/{k}": float(r[k]) for k in METRIC_COLUMNS})

    id_acc = _id_accuracy(store)
    if id_acc is not None:
        flat["id/test_accuracy"] = id_acc

    pngs = []
    if cfg.evaluate.plots:
        pngs = _plots(out / "plots", all_scores, oods, table, float(cfg.evaluate.tpr))

    if tracker is not None:
        sweep = common.sweep_info()
        parent = tracker.sweep_parent(sweep["dir"], f"sweep {Path(sweep['dir']).name}") if sweep else None
        tags = {"larex.stage": "evaluate", "larex.run_dir": str(out)}
        if sweep:
            tags.update({"larex.sweep_dir": sweep["dir"], "larex.job": sweep["job"], "larex.overrides": sweep["overrides"]})
        with tracker.start_run(run_name=cfg.tracking.run_name or f"{cfg.dataset.name}-{cfg.model.name}-"
                               f"{cfg.hooked_layer.name}", tags=tags, parent_run_id=parent):
            tracker.log_params(common.plain(cfg))
            tracker.log_metrics(flat)
            tracker.log_metrics({f"time/{k}_s": v for k, v in timings.items()})
            for p in (out / "metrics.csv", out / "metrics.parquet", out / "results.md"):
                tracker.log_artifact(p)
            for p in pngs:
                tracker.log_artifact(p, "plots")
            tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            run_id = tracker.run_id
        io.write_json(out / "evaluate.json", {"config_hash": h, "mlflow_run_id": run_id, "tracking_uri": tracker.uri})
    else:
        io.write_json(out / "evaluate.json", {"config_hash": h})

    print_results(table, title)
    if id_acc is not None:
        common.console.print(f"ID test accuracy: {id_acc:.4f}")
    common.console.print(f"metrics: {out / 'metrics.csv'}   plots: {out / 'plots'}")
    if tracker is not None:
        common.console.print(f"MLflow run {tracker.run_id}: mlflow ui --backend-store-uri {tracker.uri}")
    return table


def method_hash(cfg: DictConfig, spec: DictConfig) -> str:
    """What a method's scores depend on: its config and the features of every split."""
    return io.config_hash({"method": common.plain(spec),
                           "splits": {s: common.aggregate_hash(cfg, s) for s in common.all_splits(cfg)}})


def score_methods(cfg: DictConfig, specs: Mapping[str, DictConfig]) -> tuple[dict, dict[str, float]]:
    """Fit each method on ID ``fit`` (``val`` for its hyperparameters) and score ``val``, ``test`` and every
    OOD set. Scores are cached in ``scores/<method>.parquet`` (+ ``.json`` with the config hash) and reused
    while the method's config and the features are unchanged (``force=true`` recomputes)."""
    common.ensure_ood(cfg)
    out = common.run_dir(cfg) / "scores"
    splits = ["fit", "val", "test", *(f"ood/{o}" for o in common.ood_names(cfg))]
    methods = {name: instantiate(spec) for name, spec in specs.items()}
    store = FeatureStore(cfg)
    for name, pp in methods.items():  # every missing input fails before any compute
        for s in splits:
            store.check(s, name, tuple(pp.requires))
    all_scores, timings = {}, {}
    for name, pp in methods.items():
        h = method_hash(cfg, specs[name])
        cached = out / f"{name}.json"
        if not cfg.force and cached.is_file() and io.read_json(cached).get("config_hash") == h:
            df = pd.read_parquet(out / f"{name}.parquet")
            all_scores[name] = {sp: df.loc[df["split"] == sp, "score"].to_numpy() for sp in splits[1:]}
            timings[name] = float(io.read_json(cached).get("seconds", float("nan")))
            continue
        req = tuple(pp.requires)
        feat_keys = tuple(k for k in req if k not in HEAD_KEYS)
        head = store.get("fit", tuple(k for k in req if k in HEAD_KEYS))
        t0 = time.perf_counter()
        pp.fit({**store.get("fit", feat_keys), **head}, {**store.get("val", feat_keys), **head})
        scores = {sp: np.asarray(pp.score({**store.get(sp, feat_keys), **head}), dtype=np.float64)
                  for sp in splits[1:]}
        timings[name] = time.perf_counter() - t0
        for sp, v in scores.items():
            if v.shape != (store.rows(sp),) or not np.isfinite(v).all():
                raise ValueError(f"method {name} returned invalid scores for split {sp}: shape {v.shape}, "
                                 f"{int((~np.isfinite(v)).sum())} non-finite values")
        all_scores[name] = scores
        io.write_bytes(out / f"{name}.parquet", _scores_parquet(scores, store))
        io.write_json(cached, {"config_hash": h, "seconds": timings[name], "method": common.plain(specs[name])})
    return all_scores, timings


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
           table: pd.DataFrame, tpr: float) -> list[Path]:
    pngs = []
    for name, scores in all_scores.items():
        ood_scores = {o: scores[f"ood/{o}"] for o in oods}
        pngs.append(plots.roc_plot(scores["test"], ood_scores, f"{name}: ID test vs OOD", directory / f"roc_{name}.png"))
        pngs.append(plots.score_histogram({"ID test": scores["test"], **ood_scores}, f"{name} scores",
                                          directory / f"hist_{name}.png",
                                          threshold=metrics.threshold_at_tpr(scores["val"], tpr),
                                          threshold_label=f"threshold ({tpr:.0%} TPR on ID val)"))
    mean = table[table["ood"] == "mean"].sort_values("auroc", ascending=False)
    best = list(mean["method"][:6])
    for o in oods:
        curves = {m: (all_scores[m]["test"], all_scores[m][f"ood/{o}"]) for m in best}
        pngs.append(plots.methods_roc_plot(curves, f"best methods: ID test vs {o}", directory / f"roc_ood_{o}.png"))
    return pngs
