"""Report stage (``larex-report``): the metrics of a sweep in one long table, and a figure of one metric against
the swept parameters (:mod:`larex.reporting.sweep`).

Sources: ``report.sweep=FOLDER`` (a Hydra sweep folder ``<output_root>/hydra/multirun/<time>``, or any folder
holding ``evaluate-<hash>/`` evaluations, e.g. an output root), or ``report.experiment=NAME`` (the evaluate runs
of an MLflow experiment at ``tracking.uri``; ``report.parent_run=ID`` / ``report.sweep=FOLDER`` keep one sweep's).
Writes ``report.csv`` (every column), ``report.md`` and ``<metric>.png`` (skipped with ``report.plot=false``)
atomically into ``report.out`` (default ``<folder>/report``, or ``<output_root>/reports/<experiment>``; with
``report.split=val`` ``report-val`` / ``<experiment>-val``) and prints the metric per swept value and method.
Everything is checked (metric, method, OOD set, what was swept) before anything is written.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from larex import io
from larex.reporting import sweep
from larex.stages import common


def _names(node) -> list[str] | None:
    """A list option given as a list, one name, or a comma-separated string; None when unset."""
    value = common.plain(node)
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _tracking_uri(cfg: DictConfig) -> str:
    """``tracking.uri`` (default the SQLite store of ``output_root``), checked: a server answers, a file exists."""
    from larex import tracking

    uri = str(cfg.tracking.uri) if cfg.get("tracking") and cfg.tracking.get("uri") else \
        tracking.default_uri(common.output_root(cfg))
    if tracking.is_remote(uri):
        tracking.check_reachable(uri)
    elif uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise FileNotFoundError(f"tracking.uri={uri}: no such SQLite store; point tracking.uri at the store the "
                                "sweep logged to (default sqlite:///<output_root>/mlflow.db, or an http:// server)")
    return uri


def collect(cfg: DictConfig) -> tuple[pd.DataFrame, str, Path]:
    """The long table of ``cfg.report``'s source, a label of the source, and the output folder."""
    r = cfg.report
    split = str(r.get("split") or "test")
    params = _names(r.get("params"))
    folder = Path(str(r.sweep)).expanduser() if r.get("sweep") else None
    suffix = "" if split == "test" else f"-{split}"
    if r.get("experiment"):
        uri = _tracking_uri(cfg)
        table = sweep.collect_mlflow(uri, str(r.experiment), r.get("parent_run"), folder, params, split)
        label = f"MLflow experiment {r.experiment} ({uri})"
        default = common.output_root(cfg) / "reports" / f"{r.experiment}{suffix}"
    elif folder is not None:
        table = sweep.collect_folder(folder, params, split)
        label = str(folder.resolve())
        default = folder / f"report{suffix}"
    else:
        raise common.ConfigError("larex-report needs report.sweep=FOLDER (a Hydra sweep folder "
                                 "<output_root>/hydra/multirun/<time>, or an output root) or report.experiment=NAME "
                                 "(an MLflow experiment at tracking.uri, with report.parent_run=ID for one sweep)")
    out = Path(str(r.out)).expanduser() if r.get("out") else default
    return table, label, out


def run(cfg: DictConfig) -> pd.DataFrame:
    r = cfg.report
    table, label, out = collect(cfg)
    metric, ood, method = str(r.metric), str(r.ood), _names(r.get("method"))
    pivot = sweep.metric_pivot(table, metric, method, ood)
    params = sweep.table_params(table)
    common.log("report", f"{table['run'].nunique()} evaluation(s) from {label}; swept: "
                         f"{', '.join(params) if params else 'nothing'}")
    written = []
    if r.get("plot", True):  # first: a figure of 0 or > 2 swept parameters is an error before anything is written
        written.append(sweep.sweep_figure(table, out / f"{metric}.png", metric, method, ood))
    io.write_text(out / "report.csv", table.to_csv(index=False))
    io.write_text(out / "report.md", sweep.report_markdown(table, pivot, metric, ood, label))
    common.console.print(sweep.pivot_rich(pivot, metric, ood, title=f"{table['run'].nunique()} evaluation(s)"))
    common.log("report", f"{out / 'report.csv'}, {out / 'report.md'}"
                         + "".join(f", {p}" for p in written))
    return table
