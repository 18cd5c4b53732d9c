"""The report of a sweep (``larex-report``): every evaluation's metrics in one long table, and a figure of one metric
against the swept parameters.

Sources: a Hydra multirun sweep folder (each job folder ``<sweep>/<n>/`` holds ``larex_evaluate.json``, naming the
evaluation the job produced), any other folder (an output root: every folder under it holding ``metrics.csv``,
``config.yaml`` and ``evaluate.json``), or an MLflow experiment (the runs tagged ``larex.stage=evaluate``, read
through :mod:`larex.tracking` only). Each becomes a list of :class:`Evaluation`; :func:`long_table` turns them into
one table with columns ``run``, ``source``, one per swept parameter, ``method``, ``ood`` and the metric columns
(:data:`METRIC_COLUMNS` first, then the others sorted), rows sorted by run, method and OOD set (``mean`` last).

Swept parameters: the override keys whose values differ between evaluations where every evaluation knows its
overrides (sweep jobs, MLflow runs of a sweep), else the flattened config keys whose values differ, less the
bookkeeping keys of :data:`IGNORED_KEYS` / :data:`IGNORED_PREFIXES`; ``params=[...]`` replaces the detection. A
value is the job's override (also for a config group choice such as ``estimator=knn``), else the config value,
typed back to int / float / bool where it parses, ``null`` as the string ``"null"``.

:func:`metric_pivot` gives one metric on one OOD set per (swept values, method); :func:`sweep_figure` draws it: a
line per method against one parameter, or a heatmap per method (annotated cells, one colour scale) over two.
Plain functions over files and DataFrames: no Hydra, no MLflow import.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from larex import plots
from larex.reporting.tables import LOWER_IS_BETTER, METRIC_COLUMNS

JOB_POINTER = "larex_evaluate.json"
"""File of a sweep job folder naming the evaluation the job produced (written by larex-evaluate)."""
EVALUATION_FILES = ("metrics.csv", "config.yaml", "evaluate.json")
"""Files that make a folder an evaluation (``evaluate-<hash>/``)."""
SPLIT_FILES = {"test": "metrics.csv", "val": "val_metrics.csv"}
"""Metrics file of each split: ``test`` (ID test vs the OOD test sets), ``val`` (ID val vs ``evaluate.val_ood``)."""

IGNORED_PREFIXES = ("tracking.", "hydra.")
IGNORED_KEYS = frozenset({
    "output_root", "data_root", "force", "progress", "threads", "device", "stage", "save_detector",
    "aggregate.device", "train.num_workers", "extract.num_workers", "extract.devices", "extract.num_nodes",
    "extract.strategy", "extract.mc_batch", "evaluate.plots",
})
"""Config keys that differ between evaluations without changing a metric (paths, devices, workers, run names):
never detected as swept (``params=[...]`` can still name them)."""
NON_METRIC_PREFIXES = frozenset({"val", "id", "time", "ood"})
"""First parts of MLflow metric keys ``<a>/<b>/<c>`` that are not ``<ood>/<method>/<metric>``."""
RESERVED = ("run", "source", "method", "ood")


@dataclass
class Evaluation:
    """One evaluation: its label (``run``), where it was read (``source``), its flattened config, its overrides
    (None where unknown) and its metric rows (``method``, ``ood`` and metric columns)."""

    run: str
    source: str
    config: dict[str, Any]
    overrides: dict[str, Any] | None
    rows: pd.DataFrame


# ---------------------------------------------------------------------------------------------------- values
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def typed(value: Any) -> Any:
    """A config or parameter value as a table cell: strings that parse become int / float / bool, null (None or
    ``"null"`` / ``"None"``) becomes ``"null"``, lists and mappings their string form."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, Mapping)):
        return str(list(value) if isinstance(value, tuple) else value)
    if not isinstance(value, str):
        return value
    s = value.strip()
    if s in ("null", "None", "~"):
        return "null"
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    if _INT.fullmatch(s):
        return int(s)
    if _FLOAT.fullmatch(s):
        return float(s)
    return s


def parse_overrides(overrides: Iterable[str] | str) -> dict[str, Any]:
    """``key -> typed value`` of Hydra override strings (a list, or one space-separated string); ``+`` / ``++``
    prefixes dropped, ``~key`` (a deletion) gives ``"null"``, escapes (``\\:``) and quotes undone."""
    items = overrides.split() if isinstance(overrides, str) else list(overrides)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if key.startswith("~"):
            out[key.lstrip("~")] = "null"
            continue
        if not sep:
            continue
        value = re.sub(r"\\(.)", r"\1", value)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.lstrip("+")] = typed(value)
    return out


def _flat_config(path: Path) -> dict[str, Any]:
    from larex.tracking import flatten

    return flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False))


def _order_key(value: Any) -> tuple:
    """Numbers first (by value), then everything else by its string."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def ordered(values: Iterable[Any]) -> list[Any]:
    """The distinct ``values``, numbers first in increasing order, then the others by their string."""
    return sorted(dict.fromkeys(values), key=_order_key)


def _natural(label: str) -> tuple:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


# ---------------------------------------------------------------------------------------------------- folders
def _read_rows(directory: Path, split: str) -> pd.DataFrame:
    name = SPLIT_FILES.get(split)
    if name is None:
        raise ValueError(f"split={split!r} is unknown; use one of {list(SPLIT_FILES)}")
    path = directory / name
    if not path.is_file():
        fix = ("set evaluate.val_ood=[...] (validation OOD sets) and rerun the sweep" if split == "val"
               else "rerun the sweep (evaluations that are up to date are not recomputed)")
        raise FileNotFoundError(f"{path} does not exist: the evaluation in {directory} has no {split} metrics; {fix}")
    rows = pd.read_csv(path)
    missing = {"method", "ood"} - set(rows.columns)
    if missing:
        raise ValueError(f"{path} has no column(s) {sorted(missing)}: not a larex metrics table")
    return rows.astype({"method": str, "ood": str})


def is_sweep_folder(path: Path) -> bool:
    """A Hydra multirun folder: it has ``multirun.yaml`` or a job folder holding ``larex_evaluate.json``."""
    return (path / "multirun.yaml").is_file() or any(path.glob(f"*/{JOB_POINTER}"))


def read_sweep(path: str | Path, split: str = "test") -> list[Evaluation]:
    """One :class:`Evaluation` per job folder ``<path>/<n>/`` with a ``larex_evaluate.json`` (job folders without
    one, a failed or unfinished job, are left out), sorted by job number; overrides from the job's
    ``.hydra/overrides.yaml`` (else the pointer's ``overrides``)."""
    path = Path(path)
    evals = []
    for pointer in path.glob(f"*/{JOB_POINTER}"):
        job_dir = pointer.parent
        info = json.loads(pointer.read_text())
        directory = Path(info["evaluate_dir"])
        if not directory.is_dir():
            raise FileNotFoundError(f"{pointer} names the evaluation {directory}, which does not exist (moved or "
                                    "deleted); rerun the sweep, or point report.sweep at the output root holding it")
        over_file = job_dir / ".hydra" / "overrides.yaml"
        over = OmegaConf.to_container(OmegaConf.load(over_file)) if over_file.is_file() else info.get("overrides", "")
        config = _flat_config(directory / "config.yaml") if (directory / "config.yaml").is_file() else {}
        evals.append(Evaluation(str(info.get("job", job_dir.name)), str(directory), config, parse_overrides(over),
                                _read_rows(directory, split)))
    return sorted(evals, key=lambda e: _natural(e.run))


def evaluation_dirs(path: str | Path) -> list[Path]:
    """Every folder under ``path`` (itself included) holding ``metrics.csv``, ``config.yaml`` and ``evaluate.json``,
    resolved, each once (symlinks such as ``latest`` are not followed), sorted."""
    found: set[Path] = set()
    for root, dirs, files in os.walk(Path(path).resolve()):
        if all(f in files for f in EVALUATION_FILES):
            found.add(Path(root).resolve())
            dirs[:] = []  # plots/, detector/: nothing more inside an evaluation
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def read_tree(path: str | Path, split: str = "test") -> list[Evaluation]:
    """One :class:`Evaluation` per :func:`evaluation_dirs` folder, labelled by its folder name."""
    return [Evaluation(d.name, str(d), _flat_config(d / "config.yaml"), None, _read_rows(d, split))
            for d in evaluation_dirs(path)]


def read_folder(path: str | Path, split: str = "test") -> list[Evaluation]:
    """The evaluations of a sweep folder (:func:`read_sweep`) or of any other folder (:func:`read_tree`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a Hydra sweep folder (<output_root>/hydra/multirun/"
                                "<time>) or an output root")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; give a Hydra sweep folder (<output_root>/hydra/multirun/<time>) or an "
                         "output root")
    if is_sweep_folder(path):
        evals = read_sweep(path, split)
        if not evals:
            raise FileNotFoundError(
                f"no evaluations in the sweep folder {path}: no job folder {path}/<n>/ holds {JOB_POINTER} (written "
                "by each larex-evaluate / larex-run job when it finishes: the jobs failed, are still running, or "
                "predate it); rerun the sweep (finished evaluations are not recomputed), or point report.sweep at "
                "the output root to read its evaluate-* folders")
        return evals
    evals = read_tree(path, split)
    if not evals:
        raise FileNotFoundError(
            f"no evaluations under {path}: looked for job folders {path}/<n>/{JOB_POINTER} (a Hydra sweep folder) "
            f"and for folders holding {', '.join(EVALUATION_FILES)} (evaluate-<hash>/ of an output tree); point "
            "report.sweep at a sweep folder (<output_root>/hydra/multirun/<time>) or at an output root")
    return evals


# ---------------------------------------------------------------------------------------------------- MLflow
def metric_rows(metrics: Mapping[str, float], split: str = "test") -> pd.DataFrame:
    """Long rows (``method``, ``ood``, one column per metric) of flat MLflow metrics: ``<ood>/<method>/<metric>``
    for ``test`` (keys starting with ``val/``, ``id/``, ``time/``, ``ood/`` are not such rows),
    ``val/<ood>/<method>/<metric>`` for ``val``."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split={split!r} is unknown; use one of {list(SPLIT_FILES)}")
    values = pd.Series(dict(metrics), dtype=float)
    parts = pd.Series(values.index, index=values.index, dtype=object).str.split("/")
    if split == "val":
        keep = (parts.str.len() == 4) & (parts.str[0] == "val")
        parts = parts[keep].str[1:]
    else:
        keep = (parts.str.len() == 3) & ~parts.str[0].isin(NON_METRIC_PREFIXES)
        parts = parts[keep]
    long = pd.DataFrame({"ood": parts.str[0], "method": parts.str[1], "metric": parts.str[2],
                         "value": values[keep]})
    if long.empty:
        return pd.DataFrame(columns=["ood", "method"])
    wide = long.pivot(index=["method", "ood"], columns="metric", values="value").reset_index()
    wide.columns.name = None
    return wide.astype({"method": str, "ood": str})


def read_mlflow(uri: str, experiment: str, parent_run: str | None = None, sweep_dir: str | Path | None = None,
                split: str = "test") -> list[Evaluation]:
    """One :class:`Evaluation` per MLflow run of ``experiment`` tagged ``larex.stage=evaluate`` (optionally only
    the children of ``parent_run``, or the jobs of the sweep folder ``sweep_dir``); the newest run of each
    evaluation folder (tag ``larex.run_dir``) counts once. ``run`` is the job number where every run is a job
    of one sweep, else the run id; ``source`` is the run id. Oldest first (by job number for a sweep)."""
    from larex import tracking

    runs = tracking.list_runs(uri, experiment)
    if not runs:
        raise ValueError(f"MLflow experiment {experiment!r} at {uri} does not exist or has no runs; check "
                         "report.experiment (the tracking.experiment the runs were logged to, default larex) and "
                         "tracking.uri")
    ev = [r for r in runs if r["tags"].get("larex.stage") == "evaluate"]
    if not ev:
        raise ValueError(f"MLflow experiment {experiment!r} at {uri} has {len(runs)} run(s) but none from "
                         "larex-evaluate (tag larex.stage=evaluate); run a sweep with tracking.enabled=true first")
    wanted = []
    if parent_run:
        ev = [r for r in ev if r["tags"].get("mlflow.parentRunId") == str(parent_run)]
        wanted.append(f"parent run {parent_run}")
    if sweep_dir:
        target = str(Path(sweep_dir).expanduser().resolve())
        ev = [r for r in ev if r["tags"].get("larex.sweep_dir") == target]
        wanted.append(f"sweep folder {target}")
    if not ev:
        raise ValueError(f"none of the evaluate runs of MLflow experiment {experiment!r} at {uri} has "
                         f"{' and '.join(wanted)}; check report.parent_run (<sweep folder>/mlflow_parent.json has "
                         "its run_id) / report.sweep, or drop them to report every run")
    seen: set[str] = set()
    unique = []
    for r in ev:  # newest first: a rerun (force=true) of one evaluation replaces the older run
        key = r["tags"].get("larex.run_dir") or r["run_id"]
        if key not in seen:
            seen.add(key)
            unique.append(r)
    unique.reverse()
    jobs = [r["tags"].get("larex.job") for r in unique]
    one_sweep = len({r["tags"].get("larex.sweep_dir") for r in unique}) == 1 and None not in jobs \
        and len(set(jobs)) == len(jobs)
    evals = []
    for r, job in zip(unique, jobs):
        data = tracking.read_run(uri, r["run_id"])
        over = r["tags"].get("larex.overrides")
        rows = metric_rows(data["metrics"], split)
        if rows.empty:
            raise ValueError(f"MLflow run {r['run_id']} of experiment {experiment!r} has no {split} metrics "
                             f"({'val/<ood>/<method>/<metric>' if split == 'val' else '<ood>/<method>/<metric>'}); "
                             + ("set evaluate.val_ood=[...] and rerun" if split == "val" else "is it finished?"))
        evals.append(Evaluation(str(job) if one_sweep else r["run_id"], r["run_id"], dict(data["params"]),
                                None if over is None else parse_overrides(over), rows))
    return sorted(evals, key=lambda e: _natural(e.run)) if one_sweep else evals


# ---------------------------------------------------------------------------------------------------- the table
def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def _differing(maps: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for m in maps for k in m))
    return [k for k in keys if not _ignored(k) and len({repr(typed(m.get(k))) for m in maps}) > 1]


def swept_params(evals: Sequence[Evaluation]) -> list[str]:
    """The parameters that differ between ``evals``: their override keys where every evaluation has overrides,
    else their config keys (bookkeeping keys ignored); in first-seen order."""
    if len(evals) < 2:
        return []
    if all(e.overrides is not None for e in evals):
        return _differing([e.overrides for e in evals])
    return _differing([e.config for e in evals])


def param_value(evaluation: Evaluation, key: str) -> Any:
    """The evaluation's value of ``key``, typed: its override's (what the job ran, also for a config group choice
    such as ``estimator=knn``; two jobs may share one evaluation folder), else its config value, else ``"null"``."""
    if evaluation.overrides and key in evaluation.overrides:
        return evaluation.overrides[key]
    return typed(evaluation.config.get(key))


def long_table(evals: Sequence[Evaluation], params: Sequence[str] | None = None) -> pd.DataFrame:
    """The long table of ``evals``: ``run``, ``source``, one column per swept parameter (``params``, default
    :func:`swept_params`), ``method``, ``ood`` and the metric columns."""
    if not evals:
        raise ValueError("no evaluations to report")
    if params:
        params = list(dict.fromkeys(str(p) for p in params))
        unknown = [p for p in params if not any(p in e.config or p in (e.overrides or {}) for e in evals)]
        if unknown:
            raise ValueError(f"params={unknown}: not a config key or override of any evaluation; detected swept "
                             f"parameters: {swept_params(evals) or 'none'} (keys are dotted, e.g. "
                             "postprocessor.lared.pca)")
    else:
        params = swept_params(evals)
    clash = [p for p in params if p in RESERVED]
    if clash:
        raise ValueError(f"parameter(s) {clash} clash with the table's columns {list(RESERVED)}")
    frames = []
    for i, e in enumerate(evals):
        f = e.rows.copy()
        f.insert(0, "run", e.run)
        f.insert(1, "source", e.source)
        for j, p in enumerate(params):
            f.insert(2 + j, p, [param_value(e, p)] * len(f))
        f["_eval"] = i
        frames.append(f)
    table = pd.concat(frames, ignore_index=True)
    metrics = [c for c in table.columns if c not in {*RESERVED, *params, "_eval"}]
    metrics = [c for c in METRIC_COLUMNS if c in metrics] + sorted(c for c in metrics if c not in METRIC_COLUMNS)
    table["_mean"] = table["ood"] == "mean"
    table = table.sort_values(["_eval", "method", "_mean", "ood"], kind="stable", ignore_index=True)
    table = table[["run", "source", *params, "method", "ood", *metrics]]
    table.columns = pd.Index(list(table.columns))  # one column-index dtype whatever the source
    return table


def table_params(table: pd.DataFrame) -> list[str]:
    """The swept-parameter columns of a :func:`long_table` (those between ``source`` and ``method``)."""
    cols = list(table.columns)
    return cols[cols.index("source") + 1:cols.index("method")]


def metric_columns(table: pd.DataFrame) -> list[str]:
    """The metric columns of a :func:`long_table` (those after ``ood``)."""
    cols = list(table.columns)
    return cols[cols.index("ood") + 1:]


def collect_folder(path: str | Path, params: Sequence[str] | None = None, split: str = "test") -> pd.DataFrame:
    """:func:`long_table` of a sweep folder or an output tree (:func:`read_folder`)."""
    return long_table(read_folder(path, split), params)


def collect_mlflow(uri: str, experiment: str, parent_run: str | None = None, sweep_dir: str | Path | None = None,
                   params: Sequence[str] | None = None, split: str = "test") -> pd.DataFrame:
    """:func:`long_table` of an MLflow experiment's evaluate runs (:func:`read_mlflow`)."""
    return long_table(read_mlflow(uri, experiment, parent_run, sweep_dir, split), params)


# ---------------------------------------------------------------------------------------------------- pivot, figure
def select_methods(table: pd.DataFrame, method: str | Sequence[str] | None = None) -> list[str]:
    """The methods to show: ``method`` (a name or a list), or every method of the table (``None``)."""
    available = list(dict.fromkeys(table["method"]))
    if method is None:
        return available
    names = [method] if isinstance(method, str) else [str(m) for m in method]
    unknown = [m for m in names if m not in available]
    if unknown:
        raise ValueError(f"method {', '.join(map(repr, unknown))} not in the report; available: {available}")
    return names


def metric_pivot(table: pd.DataFrame, metric: str = "auroc", method: str | Sequence[str] | None = None,
                 ood: str = "mean") -> pd.DataFrame:
    """``metric`` on OOD set ``ood`` (default the mean over the OOD sets): one row per swept-parameter combination
    (per ``run`` when nothing was swept), in :func:`ordered` value order, one column per method. Runs sharing a
    combination are one cell when they agree on it, else an error (another setting differs: name it in params)."""
    available = metric_columns(table)
    if metric not in available:
        raise ValueError(f"metric {metric!r} is not a column of the report; available: {available}")
    methods = select_methods(table, method)
    oods = list(dict.fromkeys(table["ood"]))
    if ood not in oods:
        raise ValueError(f"ood {ood!r} not in the report; available: {oods}")
    index = table_params(table) or ["run"]
    sub = table[(table["ood"] == ood) & table["method"].isin(methods)]
    sub = sub.drop_duplicates([*index, "method", metric])  # runs that agree on a cell are one cell
    dup = sub.duplicated([*index, "method"], keep=False)
    if dup.any():
        first = sub[dup].iloc[0]
        same = dup & (sub[index] == first[index]).all(axis=1) & (sub["method"] == first["method"])
        runs = list(dict.fromkeys(sub.loc[same, "run"]))
        raise ValueError(f"runs {runs} share {', '.join(f'{p}={first[p]}' for p in index)} but their {metric} of "
                         f"{first['method']} differs: another setting differs between them; name it in "
                         "report.params=[...] too, or report a folder of one sweep")
    pivot = sub.pivot(index=index, columns="method", values=metric)
    combos = list(dict.fromkeys(map(tuple, sub[index].to_numpy().tolist())))
    combos.sort(key=lambda c: tuple(_order_key(v) for v in c))
    rows = pd.Index([c[0] for c in combos], name=index[0]) if len(index) == 1 else \
        pd.MultiIndex.from_tuples(combos, names=index)
    pivot = pivot.reindex(index=rows, columns=methods)
    pivot.columns.name = None
    return pivot


def plot_params(table: pd.DataFrame) -> list[str]:
    """The table's swept parameters when a figure can show them (1 or 2); else a ValueError with the fix."""
    params = table_params(table)
    if not params:
        raise ValueError("nothing was swept: every evaluation of the report has the same parameters, so there is no "
                         "figure to draw; name the parameter(s) with report.params=[a.b,c.d], or report.plot=false "
                         "for the tables only")
    if len(params) > 2:
        raise ValueError(f"{len(params)} parameters were swept ({', '.join(params)}); the figure shows 1 or 2: pass "
                         "report.params=[p1,p2] (the others fixed, e.g. a folder of one sub-sweep), or report.plot="
                         "false for the tables only")
    return params


def _is_numeric(values: Sequence[Any]) -> bool:
    return all(_order_key(v)[0] == 0 for v in values)


def _label(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def sweep_figure(table: pd.DataFrame, path: str | Path, metric: str = "auroc",
                 method: str | Sequence[str] | None = None, ood: str = "mean", title: str | None = None) -> Path:
    """PNG of ``metric`` (on ``ood``) against the swept parameters: one parameter, a line per method (a numeric
    axis when every value is a number); two, one heatmap per method (rows: the first parameter, columns: the
    second; annotated cells, one colour scale for every panel, better = brighter)."""
    params = plot_params(table)
    pivot = metric_pivot(table, metric, method, ood)
    methods = list(pivot.columns)
    what = f"{metric} ({'mean over the OOD sets' if ood == 'mean' else ood})"
    plt = plots._pyplot()
    if len(params) == 1:
        values = list(pivot.index)
        x = [float(v) for v in values] if _is_numeric(values) else list(range(len(values)))
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        for m in methods:
            ax.plot(x, pivot[m].to_numpy(dtype=float), marker="o", label=m)
        ax.set_xticks(x, [_label(v) for v in values])
        ax.set(xlabel=params[0], ylabel=what, title=title or f"{what} vs {params[0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    else:
        p0, p1 = params
        rows = ordered(pivot.index.get_level_values(p0))
        cols = ordered(pivot.index.get_level_values(p1))
        grids = {m: pivot[m].unstack(p1).reindex(index=rows, columns=cols).to_numpy(dtype=float) for m in methods}
        finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        cmap = plt.get_cmap("viridis_r" if metric in LOWER_IS_BETTER else "viridis")
        n = len(methods)
        ncols = min(n, 3)
        nrows = -(-n // ncols)
        cell = 0.7
        fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                                 figsize=(max(3.5, 1.2 + cell * len(cols)) * ncols + 1.2,
                                          max(3.0, 1.2 + cell * len(rows)) * nrows))
        for ax in axes.ravel()[n:]:
            ax.set_visible(False)
        for ax, m in zip(axes.ravel(), methods):
            g = grids[m]
            img = ax.imshow(g, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
            for (i, j), v in np.ndenumerate(g):
                if np.isfinite(v):
                    r, gr, b, _ = cmap((v - lo) / (hi - lo))
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                            color="black" if 0.299 * r + 0.587 * gr + 0.114 * b > 0.5 else "white")
            ax.set_xticks(range(len(cols)), [_label(v) for v in cols])
            ax.set_yticks(range(len(rows)), [_label(v) for v in rows])
            ax.set(xlabel=p1, ylabel=p0, title=m)
        fig.colorbar(img, ax=axes.ravel().tolist(), label=what)
        fig.suptitle(title or what)
    try:
        return plots._save(fig, Path(path))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------- tables
def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{v:.4f}"
    return str(v)


def _best(pivot: pd.DataFrame, metric: str) -> pd.DataFrame:
    """True where a cell is the best of its method's column (max, or min for lower-is-better metrics)."""
    best = pivot.min() if metric in LOWER_IS_BETTER else pivot.max()
    return pivot.eq(best, axis=1) & pivot.notna()


def _index_rows(pivot: pd.DataFrame) -> list[tuple]:
    return [k if isinstance(k, tuple) else (k,) for k in pivot.index]


def pivot_rich(pivot: pd.DataFrame, metric: str, ood: str, title: str = ""):
    """A Rich table of :func:`metric_pivot`: parameter columns, then one column per method, best in bold green."""
    from rich.markup import escape
    from rich.table import Table

    arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
    t = Table(title=escape(f"{title} — {metric} {arrow} on {ood}" if title else f"{metric} {arrow} on {ood}"),
              title_justify="left")
    for name in pivot.index.names:
        t.add_column(escape(str(name)), style="bold", no_wrap=True)
    for m in pivot.columns:
        t.add_column(escape(str(m)), justify="right", no_wrap=True)
    best = _best(pivot, metric)
    for key, values, marks in zip(_index_rows(pivot), pivot.to_numpy(), best.to_numpy()):
        cells = [f"[bold green]{_fmt(v)}[/]" if b else _fmt(v) for v, b in zip(values, marks)]
        t.add_row(*(escape(_label(k)) for k in key), *cells)
    return t


def _md_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def report_markdown(table: pd.DataFrame, pivot: pd.DataFrame, metric: str, ood: str, source: str) -> str:
    """The report as Markdown: what was read, the metric pivot (best per method in bold), then every row with the
    main metrics (the CSV has every column)."""
    params = table_params(table)
    n = table["run"].nunique()
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    lines = [f"# Sweep report: {source}", "",
             f"{n} evaluation(s); swept: {', '.join(f'`{p}`' for p in params) if params else 'nothing'}.", "",
             f"## {metric} on {ood} ({better} is better)", "",
             _md_row([*map(str, pivot.index.names), *pivot.columns]),
             "|" + "---|" * len(pivot.index.names) + "---:|" * len(pivot.columns)]
    best = _best(pivot, metric)
    for key, values, marks in zip(_index_rows(pivot), pivot.to_numpy(), best.to_numpy()):
        lines.append(_md_row([*map(_label, key), *(f"**{_fmt(v)}**" if b else _fmt(v) for v, b in zip(values, marks))]))
    shown = [c for c in metric_columns(table) if c in METRIC_COLUMNS or c == metric]
    cols = ["run", *params, "method", "ood", *shown]
    lines += ["", "## Every evaluation", "", _md_row(cols),
              "|" + "---|" * (len(cols) - len(shown)) + "---:|" * len(shown)]
    lines += [_md_row(_fmt(v) if c in shown else _label(v) for c, v in zip(cols, row))
              for row in table[cols].itertuples(index=False)]
    return "\n".join(lines) + "\n"
