"""The LaREx configuration study's report: collect the sweep jobs' results, choose on validation, write the page.

:func:`collect` reads every evaluation folder of a study run (``config.yaml``, ``val_metrics.csv``,
``metrics.csv``) into one row per (configuration, method); :func:`choose` picks the configuration with the best
mean validation AUROC (ID val vs the validation OOD sets -- never a test set); :func:`study_markdown` and
:func:`study_plot` write the report. Plain functions over files and DataFrames: no Hydra or MLflow.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

AXES = ("estimator", "mc_samples", "drop_prob", "hooked_layer", "masks")
"""Extraction / aggregation axes of a study job (columns of :func:`collect`), besides ``method``."""


def estimator_label(est) -> str:
    """Short name of an ``aggregate.estimator`` config: ``knn k=5``, ``knn k=sqrt``, ``gaussian``, ``joint``."""
    target = str(est.get("_target_", "")).rsplit(".", 1)[-1]
    k = est.get("k")
    k = 5 if k is None else k
    if target == "KNNEntropy":
        return f"knn k={k}"
    if target == "JointKNNEntropy":
        return "joint" if k == 5 else f"joint k={k}"
    if target == "GaussianEntropy":
        return "gaussian"
    return target or "?"


def newest_run(layer_dirs: Sequence[Path], run_name: str) -> Path | None:
    """The newest evaluation folder (by its ``evaluate.json``) whose config has ``tracking.run_name == run_name``."""
    found = []
    for layer in layer_dirs:
        for ev in Path(layer).glob("evaluate-*"):
            if (ev / "evaluate.json").is_file() and (ev / "config.yaml").is_file() and \
                    str(OmegaConf.select(OmegaConf.load(ev / "config.yaml"), "tracking.run_name")) == run_name:
                found.append(((ev / "evaluate.json").stat().st_mtime, ev))
    return max(found)[1] if found else None


def collect(layer_dirs: Sequence[Path], run_name: str = "larex-study") -> pd.DataFrame:
    """One row per (study job, method): the axes, ``val_auroc`` / ``val_fpr95`` (means over the validation OOD
    sets), ``test_auroc`` / ``test_fpr95`` (means over the reported OOD sets) and ``test_auroc/<set>``.

    Reads every ``evaluate-*`` folder under ``layer_dirs`` whose ``config.yaml`` has ``tracking.run_name ==
    run_name`` and a ``val_metrics.csv``; the same configuration evaluated twice counts once (newest)."""
    rows = []
    for layer in layer_dirs:
        for ev in sorted(Path(layer).glob("evaluate-*")):
            cfg_file, val_file, test_file = ev / "config.yaml", ev / "val_metrics.csv", ev / "metrics.csv"
            if not (cfg_file.is_file() and val_file.is_file() and test_file.is_file()):
                continue
            cfg = OmegaConf.load(cfg_file)
            if str(OmegaConf.select(cfg, "tracking.run_name")) != run_name:
                continue
            axes = {"estimator": estimator_label(cfg.aggregate.estimator),
                    "mc_samples": int(cfg.hooked_layer.mc_samples),
                    "drop_prob": float(cfg.hooked_layer.drop_prob),
                    "hooked_layer": str(cfg.hooked_layer.name),
                    "masks": str(cfg.hooked_layer.get("masks", "shared"))}
            val, test = pd.read_csv(val_file), pd.read_csv(test_file)
            for method in dict.fromkeys(test["method"]):
                v = val[(val["method"] == method) & (val["ood"] == "mean")]
                t = test[test["method"] == method]
                tm = t[t["ood"] == "mean"]
                if v.empty or tm.empty:
                    continue
                row = {**axes, "method": method, "val_auroc": float(v["auroc"].iloc[0]),
                       "val_fpr95": float(v["fpr95"].iloc[0]), "test_auroc": float(tm["auroc"].iloc[0]),
                       "test_fpr95": float(tm["fpr95"].iloc[0]), "folder": str(ev),
                       "mtime": (ev / "evaluate.json").stat().st_mtime if (ev / "evaluate.json").is_file() else 0.0}
                row.update({f"test_auroc/{o}": float(a) for o, a in zip(t["ood"], t["auroc"]) if o != "mean"})
                rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = df.sort_values("mtime").drop_duplicates([*AXES, "method"], keep="last")
    return df.sort_values([*AXES, "method"]).reset_index(drop=True)


def choose(df: pd.DataFrame, methods: Sequence[str] | None = None) -> pd.Series:
    """The row with the best mean validation AUROC (ties: lower validation FPR95, then the earlier row),
    among ``methods`` (default: all). Test columns play no part."""
    d = df if methods is None else df[df["method"].isin(list(methods))]
    if d.empty:
        raise ValueError(f"no study results for methods {methods}; run the study first")
    order = np.lexsort((np.arange(len(d)), d["val_fpr95"].to_numpy(), -d["val_auroc"].to_numpy()))
    return d.iloc[order[0]]


def _fmt(v) -> str:
    """Metrics with 4 decimals; short settings (drop probabilities, 0.5) as written."""
    if isinstance(v, (float, np.floating)) and np.isfinite(v) and round(float(v), 2) != float(v):
        return f"{v:.4f}"
    return str(v)


def markdown_table(df: pd.DataFrame, columns: Sequence[str], bold_max: Sequence[str] = ()) -> list[str]:
    """``df[columns]`` as Markdown lines; the best value of each ``bold_max`` column in bold."""
    best = {c: df[c].max() for c in bold_max if c in df and len(df)}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if df[c].dtype.kind in "fi" else "---"
                                                              for c in columns) + "|"]
    for _, r in df.iterrows():
        cells = [f"**{_fmt(r[c])}**" if c in best and r[c] == best[c] else _fmt(r[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def axis_effects(df: pd.DataFrame, chosen: pd.Series) -> pd.DataFrame:
    """For each axis value: the chosen configuration with only that axis changed (same method), val and test."""
    rows = []
    for axis in AXES:
        others = [a for a in AXES if a != axis]
        mask = (df["method"] == chosen["method"])
        for a in others:
            mask &= df[a] == chosen[a]
        for _, r in df[mask].sort_values(axis).iterrows():
            rows.append({"axis": axis, "value": r[axis], "val_auroc": r["val_auroc"], "test_auroc": r["test_auroc"],
                         "chosen": "yes" if r[axis] == chosen[axis] else ""})
    return pd.DataFrame(rows)


def study_plot(df: pd.DataFrame, chosen: pd.Series, path: Path, methods: Sequence[str] = ("lared", "larem")) -> Path:
    """Mean AUROC vs S, one line per estimator (the kNN k values among them), one panel per method, at the
    chosen layer / drop probability / masks; validation solid, test dashed. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from larex import io

    fixed = (df["hooked_layer"] == chosen["hooked_layer"]) & (df["drop_prob"] == chosen["drop_prob"]) & \
            (df["masks"] == chosen["masks"])
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        d = df[fixed & (df["method"] == method)]
        for i, (est, g) in enumerate(d.groupby("estimator", sort=True)):
            g = g.sort_values("mc_samples")
            color = f"C{i}"
            ax.plot(g["mc_samples"], g["val_auroc"], "-o", color=color, label=f"{est} (val)")
            ax.plot(g["mc_samples"], g["test_auroc"], "--", color=color, alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(d["mc_samples"].unique()), [str(s) for s in sorted(d["mc_samples"].unique())])
        ax.set_xlabel("MC samples S")
        ax.set_ylabel("mean AUROC (solid: val OOD, dashed: test OOD)")
        ax.set_title(f"{method}: {chosen['hooked_layer']}, p={chosen['drop_prob']}, masks {chosen['masks']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    io.write_bytes(Path(path), buf.getvalue())
    return Path(path)


REFERENCE = {"estimator": "knn k=5", "mc_samples": 16, "drop_prob": 0.5, "hooked_layer": "dropblock",
             "masks": "per_image"}
"""The extraction and estimator of the defaults before the study (the LaREx reference estimator, kNN k=5)."""


def _select(df: pd.DataFrame, **where) -> pd.DataFrame:
    mask = np.ones(len(df), dtype=bool)
    for k, v in where.items():
        mask &= (df[k] == v).to_numpy()
    return df[mask]


def default_changes(df: pd.DataFrame, chosen: pd.Series, current: dict) -> pd.DataFrame:
    """Per axis (and the method variant): the current default, the validation-chosen value, and the test AUROC of
    the chosen configuration with that one axis at its current default. A default changes only where the chosen
    value also wins on test (``change``)."""
    rows = []
    for axis in (*AXES, "method"):
        now, new = current[axis], chosen[axis]
        alt = _select(df, **{a: (now if a == axis else chosen[a]) for a in (*AXES, "method")})
        alt_test = float(alt["test_auroc"].iloc[0]) if len(alt) else float("nan")
        rows.append({"axis": axis, "default": now, "chosen on val": new, "test AUROC (default)": alt_test,
                     "test AUROC (chosen)": float(chosen["test_auroc"]),
                     "change": "yes" if new != now and (not np.isfinite(alt_test) or chosen["test_auroc"] > alt_test)
                     else ("no (loses on test)" if new != now else "-")})
    return pd.DataFrame(rows)


def study_markdown(df: pd.DataFrame, chosen: dict[str, pd.Series], info: dict, plot_name: str,
                   baselines: pd.DataFrame | None = None) -> str:
    """The study page: set-up, the validation-chosen configurations and their test results, the estimator x S
    table, one-axis changes, the method variants, the top configurations by validation, and (``baselines``:
    the demo's metrics table) where LaREx stands among the baselines."""
    lared, larem = chosen["lared"], chosen["larem"]
    best = chosen["all"]
    test_sets = sorted(c.split("/", 1)[1] for c in df.columns if c.startswith("test_auroc/"))
    lines = ["# The LaREx study", "",
             f"Measured {info.get('date', '')} by `{info.get('command', 'make study')}` "
             f"({info.get('jobs', '?')} jobs, {info.get('minutes', '?')} minutes on {info.get('machine', 'this machine')}); "
             "regenerate with the same command. Every number below comes from the jobs' own "
             "`val_metrics.csv` / `metrics.csv`.", "",
             "## Set-up", "",
             f"- Model and data: {info.get('setup', 'the study config')}, on smaller splits than the demo: "
             f"{info.get('sizes', '')}.",
             "- **Choices are made on validation only**: mean AUROC of ID `val` against the validation OOD sets "
             f"{info.get('val_ood', '')} (disjoint from every reported set: other images, another corruption), as "
             "OpenOOD v1.5 does. The test columns (ID `test` vs " + ", ".join(test_sets) + ") are reported, never "
             "used to choose.",
             f"- Grid (Hydra multirun, extractions shared across jobs): {info.get('grid', '')}; in every job the "
             "LaRED/LaREM variants " + ", ".join(f"`{m}`" for m in sorted(df["method"].unique())) + ".", "",
             "## The validation-chosen configurations", ""]
    rows = []
    for label, r in (("LaRED, chosen on val", lared), ("LaREM, chosen on val", larem), ("any variant, chosen on val", best)):
        rows.append({"what": label, **{a: r[a] for a in AXES}, "method": r["method"], "val AUROC": r["val_auroc"],
                     "test AUROC": r["test_auroc"], "test FPR95": r["test_fpr95"]})
    for m in ("lared", "larem"):
        ref = _select(df, method=m, **REFERENCE)
        if len(ref):
            r = ref.iloc[0]
            rows.append({"what": f"{m}, previous defaults", **{a: r[a] for a in AXES}, "method": m,
                         "val AUROC": r["val_auroc"], "test AUROC": r["test_auroc"], "test FPR95": r["test_fpr95"]})
    t = pd.DataFrame(rows)
    lines += markdown_table(t, ["what", *AXES, "method", "val AUROC", "test AUROC", "test FPR95"]) + [""]
    lines += ["How the defaults follow (the chosen configuration with one axis at the previous default):", ""]
    changes = default_changes(df, best, {**REFERENCE, "method": "lared"})
    lines += markdown_table(changes, list(changes.columns)) + [""]
    per_set = [{"method": f"{r['method']} ({what})", **{o: r[f"test_auroc/{o}"] for o in test_sets}}
               for what, r in (("chosen", lared), ("chosen", larem))]
    lines += ["Test AUROC per OOD set of the chosen configurations:", ""]
    lines += markdown_table(pd.DataFrame(per_set), ["method", *test_sets]) + [""]

    lines += [f"## Estimator × S (at {lared['hooked_layer']}, p={lared['drop_prob']}, masks {lared['masks']})", "",
              f"Mean AUROC, val / test; plot: ![mean AUROC vs S]({plot_name})", ""]
    fixed = dict(hooked_layer=lared["hooked_layer"], drop_prob=lared["drop_prob"], masks=lared["masks"])
    for m in ("lared", "larem"):
        d = _select(df, method=m, **fixed)
        if d.empty:
            continue
        piv = d.pivot_table(index="estimator", columns="mc_samples", values=["val_auroc", "test_auroc"])
        ss = sorted(d["mc_samples"].unique())
        tab = pd.DataFrame({"estimator": piv.index,
                            **{f"S={s} val": piv[("val_auroc", s)].to_numpy() for s in ss},
                            **{f"S={s} test": piv[("test_auroc", s)].to_numpy() for s in ss}})
        lines += [f"**{m}**", ""] + markdown_table(tab, list(tab.columns), bold_max=[f"S={s} val" for s in ss]) + [""]

    lines += ["## One axis at a time (the chosen LaRED configuration with one axis changed)", ""]
    eff = axis_effects(df, lared)
    lines += markdown_table(eff, ["axis", "value", "val_auroc", "test_auroc", "chosen"]) + [""]

    lines += ["## Method variants at the chosen extraction", ""]
    d = _select(df, **{a: lared[a] for a in AXES}).sort_values("val_auroc", ascending=False)
    lines += markdown_table(d, ["method", "val_auroc", "test_auroc", "test_fpr95"], bold_max=["val_auroc"]) + [""]

    lines += ["## Top 15 of all configurations by validation AUROC", ""]
    top = df.sort_values(["val_auroc", "val_fpr95"], ascending=[False, True]).head(15)
    lines += markdown_table(top, [*AXES, "method", "val_auroc", "test_auroc"]) + [""]
    rank_val = df["val_auroc"].rank(ascending=False)
    rank_test = df["test_auroc"].rank(ascending=False)
    corr = float(np.corrcoef(rank_val, rank_test)[0, 1]) if len(df) > 2 else float("nan")
    lines += [f"Rank correlation of val and test AUROC over all {len(df)} (configuration, method) pairs: "
              f"{corr:.3f}. Best test AUROC of any pair (hindsight, not a choice): "
              f"{df['test_auroc'].max():.4f}.", ""]

    if baselines is not None and not baselines.empty:
        mean = baselines[baselines["ood"] == "mean"].sort_values("auroc", ascending=False)
        lines += ["## Where LaREx stands (the demo table with the new defaults)", ""]
        lines += [f"Mean test AUROC of every method in `make demo` ({info.get('demo_run', 'its newest evaluation')}; "
                  "full demo splits):", ""]
        lines += markdown_table(mean.assign(rank=np.arange(1, len(mean) + 1)), ["rank", "method", "auroc", "fpr95"],
                                bold_max=["auroc"]) + [""]
    if info.get("conclusion"):
        lines += ["## Conclusion", "", info["conclusion"], ""]
    return "\n".join(lines)
