"""Evaluate stage: fit every method on ID ``fit`` (hyperparameters on ID ``val``), score ``val``, ``test`` and
each OOD set, compute metrics and thresholds, write tables and plots, log one MLflow run.

Outputs in ``evaluate-<hash>/`` (one folder per evaluation config, so every sweep job keeps its own):
``metrics.csv``, ``metrics.parquet``, ``results.md``, ``plots/*.png``, ``config.yaml`` and ``evaluate.json`` (and
``val_metrics.csv``: ID val vs the validation OOD sets of ``evaluate.val_ood``, what choices are made on); the
hooked layer's ``index.json`` and ``latest`` point at it. Nothing is tuned on ``test`` or OOD data. Feature
loading is :mod:`larex.featurestore`, method running :mod:`larex.scoring`, reporting :mod:`larex.reporting`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from larex import io
from larex.detector import SPEC_FILE
from larex.featurestore import FeatureStore
from larex.layout import claim
from larex.reporting.figures import evaluation_plots
from larex.reporting.sweep import JOB_POINTER
from larex.reporting.tables import metrics_table, print_results, results_markdown, validation_table
from larex.scoring import score_methods
from larex.stages import common
from larex.tracking import TrackingUnavailableError, check_reachable, is_remote


def feature_store(run: common.Run) -> FeatureStore:
    return FeatureStore(run.layout, run.part_hash, aggregated=run.derived_needed(),
                        aggregate_hash=run.aggregate_split_hash)


def check_requirements(cfg: DictConfig, run: common.Run | None = None) -> common.Run:
    """Every selected method's features can be planned, and a tracking server answers (config errors before any
    compute)."""
    run = run or common.prepare(cfg)
    if cfg.tracking.enabled and cfg.tracking.uri and is_remote(str(cfg.tracking.uri)):
        check_reachable(str(cfg.tracking.uri))
    if not run.methods:
        raise common.ConfigError("no method selected: set postprocessor=[lared,larem] and/or baselines=[...]")
    if common.optimizing():
        check_objective(cfg, run)
    selected = set(run.bases.values())
    unknown = [m for m in detector_methods(cfg, run) if m not in selected]
    if unknown:
        raise common.ConfigError(f"save_detector={unknown}: not among the evaluated methods {sorted(selected)}; "
                                 "save only methods selected with postprocessor=[...] or baselines=[...]")
    return run


OBJECTIVES = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_ood", "val_accuracy")


def detector_methods(cfg: DictConfig, run: common.Run) -> list[str]:
    """The selected methods to save as deployable detectors (``save_detector=[lared,vim]``; ``all``: every one)."""
    node = cfg.get("save_detector") or []
    names = [str(node)] if isinstance(node, str) else [str(m) for m in node]
    return list(dict.fromkeys(run.bases.values())) if "all" in names else names


def check_objective(cfg: DictConfig, run: common.Run) -> None:
    """An Optuna sweep's objective can be computed from this config (before any compute)."""
    spec = cfg.evaluate.get("objective") or {}
    metric = spec.get("metric")
    if metric is None:
        raise common.ConfigError("a sweeper needs a number: set evaluate.objective.metric (e.g. auroc with "
                                 "evaluate.val_ood=[<validation OOD set>])")
    if metric not in OBJECTIVES:
        raise common.ConfigError(f"evaluate.objective.metric={metric!r} is unknown; use one of {list(OBJECTIVES)}")
    method = spec.get("method")
    if method is not None and method not in run.methods:
        raise common.ConfigError(f"evaluate.objective.method={method!r} is not evaluated here; methods: "
                                 f"{list(run.methods)}")
    if metric != "val_accuracy" and not common.val_ood_names(cfg):
        raise common.ConfigError(f"evaluate.objective.metric={metric} compares ID val with validation OOD sets: set "
                                 "evaluate.val_ood=[...] (configs/ood, disjoint from the reported sets), or use "
                                 "evaluate.objective.metric=val_accuracy; test and OOD test sets are never an objective")


def score(cfg: DictConfig, run: common.Run, methods: dict | None = None, store: FeatureStore | None = None):
    """Scores of ``methods`` (default: every selected one) on val, test and every OOD set, cached per method."""
    names = list(methods or run.methods)
    return score_methods({n: run.methods[n] for n in names}, {n: run.method_hash(n) for n in names},
                         {n: common.plain(run.specs[n]) for n in names}, store or feature_store(run), run.layout,
                         ["fit", "val", "test", *(s for s in run.splits if s.startswith(("ood/", "val_ood/")))],
                         force=bool(cfg.force))


def title(cfg: DictConfig) -> str:
    return f"{cfg.dataset.name} / {cfg.model.name} / {cfg.hooked_layer.name}"


def run(cfg: DictConfig, run: common.Run | None = None) -> pd.DataFrame:
    run = check_requirements(cfg, run)
    out = run.layout.evaluate_dir
    h = run.layout.evaluate_hash
    state = out / "evaluate.json"
    with claim(out, "larex-evaluate"):
        known = io.read_json(state) if state.is_file() else {}
        if not cfg.force and (out / "metrics.csv").is_file() and known.get("config_hash") == h \
                and not (cfg.tracking.enabled and known.get("tracking_pending")):
            df = pd.read_csv(out / "metrics.csv")
            common.log("evaluate", f"up to date: {out / 'metrics.csv'}")
            print_results(common.console, df, title(cfg))
            if any(not (out / DETECTOR_DIR / m / SPEC_FILE).is_file() for m in detector_methods(cfg, run)):
                store = feature_store(run)
                saved = _save_detectors(cfg, run, store, score(cfg, run, store=store)[0], out)
                info = io.read_json(state)
                if info.get("mlflow_run_id") and cfg.tracking.enabled:
                    tracker = _tracker(cfg)
                    with tracker.resume_run(info["mlflow_run_id"]):
                        info = _log_detectors(cfg, tracker, saved, info)
                    io.write_json(state, info)
            run.layout.record("evaluate", out, h, _index_info(cfg, run))
            _point_sweep_job(out, h)
            return df
        table = _evaluate(cfg, run, out, h)
        _point_sweep_job(out, h)
        return table


def _point_sweep_job(out: Path, h: str) -> None:
    """In a job of a Hydra multirun, ``<job folder>/larex_evaluate.json`` names the evaluation the job produced (or
    found up to date), so a sweep folder leads to every job's metrics (``larex-report``)."""
    sweep = common.sweep_info()
    if sweep:
        io.write_json(Path(sweep["job_dir"]) / JOB_POINTER, {"evaluate_dir": str(out), "config_hash": h,
                                                              "job": sweep["job"], "overrides": sweep["overrides"]})


def objective(cfg: DictConfig, run: common.Run, required: bool = False) -> float | None:
    """The sweep objective (``evaluate.objective``) of this evaluation, from ID ``val`` only: a metric of ID val vs
    the validation OOD sets (``val_metrics.csv``, mean over ``evaluate.val_ood``) for one method (default: the
    first selected), or the ID-val accuracy. None when it cannot be computed and ``required`` is false (a plain
    run); with ``required`` (an Optuna sweep) that is a configuration error naming the fix (:func:`check_objective`)."""
    if required:
        check_objective(cfg, run)
    spec = cfg.evaluate.get("objective") or {}
    metric = spec.get("metric")
    if metric is None or metric not in OBJECTIVES:
        return None
    if metric == "val_accuracy":
        return _val_accuracy(run, required)
    method = spec.get("method") or next(iter(run.methods))
    table = run.layout.evaluate_dir / "val_metrics.csv"
    if method not in run.methods or not table.is_file():
        return None
    df = pd.read_csv(table)
    row = df[(df["method"] == method) & (df["ood"] == "mean")]
    return float(row[metric].iloc[0])


def _val_accuracy(run: common.Run, required: bool) -> float | None:
    store = feature_store(run)
    keys = run.task.summary_requires
    if not keys or set(keys) - store.available("val"):
        if required:
            raise common.ConfigError(f"evaluate.objective.metric=val_accuracy needs {list(keys)} on ID val "
                                     f"(task {run.task.name!r}); choose a validation OOD metric instead")
        return None
    value = run.task.summary_metrics(store.get("val", keys)).get("accuracy")
    if value is None and required:
        raise common.ConfigError(f"task {run.task.name!r} reports no accuracy; choose a validation OOD metric")
    return value


def _index_info(cfg: DictConfig, run: common.Run) -> dict:
    return {"overrides": common.overrides(), "methods": list(run.methods)}


def _evaluate(cfg: DictConfig, run: common.Run, out: Path, h: str) -> pd.DataFrame:
    oods = common.ood_names(cfg)
    tracker = _tracker(cfg) if cfg.tracking.enabled else None

    store = feature_store(run)  # one store: features read for scoring are reused by the summary metrics
    all_scores, timings = score(cfg, run, store=store)
    tpr = float(cfg.evaluate.tpr)
    table, flat = metrics_table(all_scores, oods, tpr, list(cfg.evaluate.zscore_percentiles))
    val_table, val_flat = validation_table(all_scores, common.val_ood_names(cfg), tpr)
    flat.update(val_flat)
    summary = _summary(run, store)
    flat.update({f"id/test_{k}": v for k, v in summary.items()})
    table, split_flat = _with_split_metrics(table, run, store, oods)
    flat.update(split_flat)
    table, method_flat = _with_method_metrics(table, run, store, all_scores, oods)
    flat.update(method_flat)
    io.write_text(out / "metrics.csv", table.to_csv(index=False))
    io.write_bytes(out / "metrics.parquet", table.to_parquet(index=False))
    if not val_table.empty:
        io.write_text(out / "val_metrics.csv", val_table.to_csv(index=False))
    io.write_text(out / "results.md", results_markdown(table, title(cfg), summary, val_table))
    io.write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    pngs = evaluation_plots(out / "plots", all_scores, oods, table, tpr) if cfg.evaluate.plots else []
    if cfg.evaluate.plots:
        pngs += _task_plots(cfg, run, store, all_scores, oods, table, out / "plots")

    saved = _save_detectors(cfg, run, store, all_scores, out)
    info = {"config_hash": h}
    lost = None
    if tracker is not None:
        try:
            info = _log_run(cfg, tracker, out, flat, timings, pngs, saved, info)
        except TrackingUnavailableError as err:  # every output is on disk: keep it, marked unlogged
            lost, info = err, {**info, "tracking_pending": str(err)}
    io.write_json(out / "evaluate.json", info)
    run.layout.record("evaluate", out, h, _index_info(cfg, run))
    if lost is not None:
        raise TrackingUnavailableError(
            f"{lost}. The evaluation itself is complete: {out}. Run the same command again when the server "
            "answers to log it (nothing is recomputed), or add tracking.enabled=false to leave it unlogged") from lost

    print_results(common.console, table, title(cfg))
    for k, v in summary.items():
        common.console.print(f"ID test {k}: {v:.4f}")
    common.console.print(f"metrics: {out / 'metrics.csv'}   plots: {out / 'plots'}   latest: {run.layout.layer_dir / 'latest'}")
    if tracker is not None:
        common.console.print(f"MLflow run {tracker.run_id}: mlflow ui --backend-store-uri {tracker.uri}")
    return table


DETECTOR_DIR = "detector"


def _log_run(cfg: DictConfig, tracker, out: Path, flat: dict, timings: dict, pngs: list[Path],
             saved: dict[str, Path], info: dict) -> dict:
    """One MLflow run of this evaluation (nested under the sweep's parent run in a multirun): the config as
    params, every metric, the tables, plots, config and the saved detectors; returns ``info`` with the run id."""
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
        for p in (out / "metrics.csv", out / "metrics.parquet", out / "results.md", out / "val_metrics.csv"):
            if p.is_file():
                tracker.log_artifact(p)
        for p in pngs:
            tracker.log_artifact(p, "plots")
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        info = {**info, "mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri}
        return _log_detectors(cfg, tracker, saved, info)


def _tracker(cfg: DictConfig):
    from larex.tracking import Tracker, default_uri

    uri = cfg.tracking.uri or default_uri(common.output_root(cfg))
    return Tracker(uri, str(cfg.tracking.experiment), artifact_root=common.output_root(cfg) / "mlartifacts",
                   http_retries=int(cfg.tracking.get("http_retries", 3)),
                   http_timeout=float(cfg.tracking.get("http_timeout", 60)))


def _log_detectors(cfg: DictConfig, tracker, saved: dict[str, Path], info: dict) -> dict:
    """Each saved detector logged to the open MLflow run as a pyfunc model (``tracking.log_detectors``), with
    the weights it references; ``info["detectors"][method]`` gets the folder and the model URI."""
    if not saved or not cfg.tracking.get("log_detectors", True):
        return info
    info = {**info, "detectors": dict(info.get("detectors") or {})}
    for method, directory in saved.items():
        model = io.read_json(directory / SPEC_FILE)["model"]
        files = {"checkpoint": model["checkpoint"]["path"]} if model.get("checkpoint") else {}
        files.update({f"net.{k}": f["path"] for k, f in (model.get("files") or {}).items()})
        uri = tracker.log_detector(f"detector-{method}", directory, files)
        info["detectors"][method] = {"path": str(directory), "mlflow_model_uri": uri}
        common.log("evaluate", f"detector {method} logged to MLflow: {uri}")
    return info


def _save_detectors(cfg: DictConfig, run: common.Run, store: FeatureStore, all_scores, out: Path) -> dict[str, Path]:
    """``detector/<method>/`` for every method of ``save_detector``: its views fitted (refitted when their scores
    came from the cache; fitting is deterministic), their ID-val thresholds, and what rebuilds the model and the
    features (:mod:`larex.detector`). Returns method -> folder."""
    from larex import metrics
    from larex.detector import detector_spec, save_detector

    tpr = float(cfg.evaluate.tpr)
    saved = {}
    for method in detector_methods(cfg, run):
        views = {v: pp for v, pp in run.methods.items() if run.bases[v] == method}
        thresholds = {}
        for v, pp in views.items():
            if not pp.is_fitted:
                pp.fit(store.get("fit", pp.fit_requires), store.get("val", pp.requires))
            val = np.asarray(all_scores[v]["val"], dtype=np.float64)
            thr = metrics.threshold_at_tpr(val, tpr)
            zs = list(cfg.evaluate.zscore_percentiles)
            thresholds[v] = {"threshold": thr, "tpr": tpr, "val_tpr": float(np.mean(val >= thr)),
                             "zscore_thresholds": metrics.zscore_thresholds(val, tuple(zs)) if zs else {},
                             "score_axis": pp.score_axis}
        est = cfg.aggregate.get("estimator")
        spec = detector_spec(
            method=method, method_spec=common.plain(common.method_specs(cfg)[method]),
            task=common.plain(cfg.task),
            model={"name": str(cfg.model.name), "net": common.plain(cfg.model.net), "head": cfg.model.get("head"),
                   "checkpoint": common.checkpoint_path(cfg)},
            hooked_layer=common.plain(cfg.hooked_layer), input_spec=common.input_spec(cfg),
            context=common.producer_context(cfg), estimator=None if est is None else common.plain(est),
            thresholds=thresholds,
            source={"evaluate_dir": str(out), "evaluate_hash": run.layout.evaluate_hash,
                    "dataset": str(cfg.dataset.name), "hooked_layer": str(cfg.hooked_layer.name)})
        saved[method] = save_detector(out / DETECTOR_DIR / method, spec, views)
        common.log("evaluate", f"detector {method} ({', '.join(views)}) -> {saved[method]}")
    return saved


def _with_split_metrics(table: pd.DataFrame, run: common.Run, store: FeatureStore, oods: list[str]):
    """The Task's per-split figures (detection: no-object count and share) as ``id_<k>`` (ID test) and ``ood_<k>``
    columns of every OOD row, and MLflow metrics ``<split>/<k>``; nothing for tasks without such figures."""
    if not run.task.split_requires:
        return table, {}
    figs = {}
    for split in ["test", *(f"ood/{o}" for o in oods)]:
        keys = [k for k in run.task.split_requires if k in store.available(split)]
        if len(keys) == len(run.task.split_requires):
            figs[split] = run.task.split_metrics(store.get(split, keys))
    if "test" not in figs:
        return table, {}
    table = table.copy()
    for k in figs["test"]:
        table[f"id_{k}"] = figs["test"][k]
        table[f"ood_{k}"] = [figs.get(f"ood/{o}", {}).get(k, float("nan")) for o in table["ood"]]
    flat = {f"{'id/test' if s == 'test' else s}/{k}": float(v) for s, f in figs.items() for k, v in f.items()}
    return table, flat


def _method_feats(run: common.Run, store: FeatureStore, oods: list[str]):
    """``split -> the Task's method_requires keys`` when ID test and every OOD set hold them, else None."""
    keys = run.task.method_requires
    if not keys or any(set(keys) - store.available(s) for s in ["test", *(f"ood/{o}" for o in oods)]):
        return None
    return lambda split: store.get(split, keys)


def _with_method_metrics(table: pd.DataFrame, run: common.Run, store: FeatureStore, all_scores, oods: list[str]):
    """The Task's per-method figures at each method's ID-val threshold (detection: open-set figures of box-level
    methods) as columns of the method's OOD rows, and MLflow metrics ``<ood>/<method>/<k>``."""
    feats = _method_feats(run, store, oods)
    if feats is None:
        return table, {}
    table, flat = table.copy(), {}
    for name, scores in all_scores.items():
        rows = (table["method"] == name) & (table["ood"] != "mean")
        if not rows.any():
            continue
        threshold = float(table.loc[rows, "threshold"].iloc[0])
        figs = run.task.method_metrics(run.methods[name], scores, feats, oods, threshold)
        for ood, values in figs.items():
            for k, v in values.items():
                table.loc[rows & (table["ood"] == ood), k] = v
                flat[f"{ood}/{name}/{k}"] = float(v)
    return table, flat


def _task_plots(cfg, run: common.Run, store: FeatureStore, all_scores, oods, table, directory: Path) -> list[Path]:
    """The Task's figures (detection: images with their boxes coloured by OOD score), raw images read back from
    the split's dataset for the few rows shown."""
    feats = _method_feats(run, store, oods)
    if feats is None:
        return []
    from larex.data.base import to_image_tensor

    datasets: dict[str, object] = {}

    def images(split: str, rows) -> list:
        if split not in datasets:
            datasets[split] = common.build_dataset(cfg, split, raw=True)
        return [to_image_tensor(datasets[split][int(r)][0]).numpy() for r in rows]

    rows = table[table["ood"] != "mean"]
    thresholds = dict(zip(rows["method"], rows["threshold"]))
    return run.task.plots(directory, all_scores, feats, images, oods, thresholds)


def _summary(run: common.Run, store: FeatureStore) -> dict[str, float]:
    """The Task's summary metrics (classification: accuracy) on ID test, from whatever features were extracted."""
    keys = [k for k in run.task.summary_requires if k in store.available("test")]
    if set(keys) != set(run.task.summary_requires):
        return {}
    return run.task.summary_metrics(store.get("test", keys))
