"""Metric rows per method and OOD set, and the tables a person reads: Rich on the console, Markdown on disk."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from rich.table import Table

from larex import metrics

METRIC_COLUMNS = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_ood")
LOWER_IS_BETTER = {"fpr95", "fpr95_ood"}


def method_rows(method: str, scores: Mapping[str, np.ndarray], oods: list[str], tpr: float,
                zscore_percentiles: list[float]) -> tuple[list[dict], dict[str, float]]:
    """Metric rows (one per OOD set) and the flat MLflow metrics ``<ood>/<method>/<metric>`` of one method.

    ``threshold`` is chosen on ID ``val`` only; its TPR on ID ``test`` and FPR on each OOD set are reported."""
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


def metrics_table(all_scores: Mapping[str, Mapping[str, np.ndarray]], oods: list[str], tpr: float,
                  zscore_percentiles: list[float]) -> tuple[pd.DataFrame, dict[str, float]]:
    """Rows of every method and OOD set plus one ``mean`` row per method; and the flat MLflow metrics."""
    all_rows, flat = [], {}
    for name, scores in all_scores.items():
        rows, f = method_rows(name, scores, oods, tpr, zscore_percentiles)
        all_rows += rows
        flat.update(f)
    df = pd.DataFrame(all_rows)
    mean = df.groupby("method", sort=False)[list(METRIC_COLUMNS)].mean().reset_index()
    mean.insert(0, "ood", "mean")
    for _, r in mean.iterrows():
        flat.update({f"mean/{r['method']}/{k}": float(r[k]) for k in METRIC_COLUMNS})
    return pd.concat([df, mean], ignore_index=True), flat


def validation_table(all_scores: Mapping[str, Mapping[str, np.ndarray]], val_oods: list[str],
                     tpr: float) -> tuple[pd.DataFrame, dict[str, float]]:
    """ID ``val`` vs each validation OOD set (``val_ood/<name>``), per method, plus a ``mean`` row per method:
    what model-selection choices are made on (never the test sets). Flat MLflow metrics ``val/<ood>/<method>/<m>``."""
    rows, flat = [], {}
    for name, scores in all_scores.items():
        for ood in val_oods:
            m = metrics.ood_metrics(scores["val"], scores[f"val_ood/{ood}"], tpr=tpr)
            rows.append({"ood": ood, "method": name, **m})
    df = pd.DataFrame(rows, columns=["ood", "method", *METRIC_COLUMNS])
    if df.empty:
        return df, flat
    mean = df.groupby("method", sort=False)[list(METRIC_COLUMNS)].mean().reset_index()
    mean.insert(0, "ood", "mean")
    df = pd.concat([df, mean], ignore_index=True)
    for _, r in df.iterrows():
        flat.update({f"val/{r['ood']}/{r['method']}/{k}": float(r[k]) for k in METRIC_COLUMNS})
    return df, flat


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


def results_markdown(df: pd.DataFrame, title: str, summary: Mapping[str, float] | None = None,
                     val: pd.DataFrame | None = None) -> str:
    """Every metric as a Markdown table (method × OOD set, best per column in bold), for the run folder and
    MLflow; the console shows AUROC and FPR95 only. ``val``: the validation table (:func:`validation_table`),
    added as its own AUROC / FPR95 section."""
    oods = list(dict.fromkeys(df["ood"]))
    lines = [f"# {title}", ""]
    if summary:
        lines += [", ".join(f"ID test {k}: {v:.4f}" for k, v in summary.items()), ""]
    for col in METRIC_COLUMNS:
        better = "min" if col in LOWER_IS_BETTER else "max"
        lines += [f"## {col.upper()} ({'higher' if better == 'max' else 'lower'} is better)", "",
                  "| method | " + " | ".join(oods) + " |", "|---|" + "---:|" * len(oods)]
        for method, cells in _marked_rows(df, col, better, lambda v: f"**{v}**"):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if val is not None and not val.empty:
        vals = list(dict.fromkeys(val["ood"]))
        lines += ["## Validation (ID val vs validation OOD sets; choices are made here, never on the tables above)", ""]
        for col, better in (("auroc", "max"), ("fpr95", "min")):
            lines += [f"### {col.upper()}", "", "| method | " + " | ".join(vals) + " |", "|---|" + "---:|" * len(vals)]
            for method, cells in _marked_rows(val, col, better, lambda v: f"**{v}**"):
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def print_results(console, df: pd.DataFrame, title: str) -> None:
    for t in results_tables(df, title):
        console.print(t)
