"""The LaREx study report (``make study`` runs the sweep, then this): collect every job of
``larex-run experiment=larex_study``, choose on validation, write ``docs/larex-study.md`` + its plot + the full
table as CSV.

    python scripts/larex_study.py [--root outputs] [--out docs] [--demo PATH/metrics.csv] [--minutes M]

``--root`` is the sweep's ``output_root``; ``--demo`` a demo ``metrics.csv`` to rank LaREx among the baselines
(default: the newest ``make demo`` evaluation under the root); ``--minutes`` the sweep's wall time, for the page. The choice is the (configuration, method) with the best
mean validation AUROC (:func:`larex.reporting.study.choose`); test columns never take part.
"""
from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import pandas as pd

from larex import io
from larex.reporting.study import choose, collect, newest_run, study_markdown, study_plot

ROOT = Path(__file__).resolve().parents[1]


def grid_layers(df: pd.DataFrame) -> str:
    return " / ".join(f"`{h}`" for h in sorted(df["hooked_layer"].unique()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="outputs", help="output_root of the study sweep (default: outputs)")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder of larex-study.md / .png / .csv")
    ap.add_argument("--demo", default="auto", help="a demo metrics.csv to rank LaREx among the baselines; auto = the "
                    "newest `make demo` evaluation under --root (skipped when there is none); none = skip")
    ap.add_argument("--minutes", default=None, help="wall time of the sweep, for the page")
    ap.add_argument("--conclusion", default=None, help="a Markdown file with the closing paragraphs of the page "
                    "(make study passes docs/larex-study-conclusion.md: the reading of the measured table, kept by "
                    "hand; update it when the numbers change)")
    args = ap.parse_args(argv)

    root = Path(args.root).resolve()
    layers = sorted(d for d in root.glob("*/*/*/*/") if d.is_dir())  # <task>/<dataset>/<model>/<hooked_layer>
    df = collect(layers)
    if df.empty:
        raise SystemExit(f"no larex-study evaluations under {root}: run `larex-run experiment=larex_study "
                         f"output_root={args.root}` first")
    chosen = {"lared": choose(df, ["lared"]), "larem": choose(df, ["larem"]), "all": choose(df)}
    out = Path(args.out)
    plot = study_plot(df, chosen["lared"], out / "larex-study.png")
    io.write_text(out / "larex-study.csv", df.drop(columns=["folder", "mtime"]).to_csv(index=False))
    from omegaconf import OmegaConf

    sample = OmegaConf.load(Path(df["folder"].iloc[0]) / "config.yaml")  # a study job's config, not a demo's
    sizes = ", ".join(f"{k} {v}" for k, v in OmegaConf.to_container(sample.limit).items())
    grid = "; ".join(f"{a} {sorted(df[a].unique().tolist())}" for a in ("estimator", "mc_samples", "drop_prob",
                                                                            "hooked_layer", "masks"))
    info = {"date": datetime.date.today().isoformat(), "command": "make study", "jobs": df["folder"].nunique(),
            "minutes": args.minutes or "?", "machine": f"{platform.machine()} CPU, 2 cores",
            "setup": f"`{sample.model.name}` (hooked at {grid_layers(df)}) trained on `{sample.dataset.name}` "
                     f"classes {list(sample.dataset.classes)}",
            "sizes": sizes + " images (limit.*)", "val_ood": list(sample.evaluate.val_ood), "grid": grid,
            "conclusion": Path(args.conclusion).read_text().strip() if args.conclusion else None}
    demo = None
    if args.demo == "auto":
        found = newest_run(layers, "fmnist-demo")
        demo = found / "metrics.csv" if found else None
    elif args.demo != "none":
        demo = Path(args.demo)
    baselines = pd.read_csv(demo) if demo else None
    if demo:
        info["demo_run"] = str(demo.parent.name)
    io.write_text(out / "larex-study.md", study_markdown(df, chosen, info, plot.name, baselines))
    for name, r in chosen.items():
        print(f"chosen on val ({name}): " + ", ".join(f"{k}={r[k]}" for k in ("estimator", "mc_samples", "drop_prob",
              "hooked_layer", "masks", "method")) + f"  val {r['val_auroc']:.4f}  test {r['test_auroc']:.4f}")
    print(f"wrote {out / 'larex-study.md'}, {plot}, {out / 'larex-study.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
