"""larex benchmark (``make bench``): larex side by side with the reference implementations it replaces.

Every row is measured in this run; speed rows time larex and its reference on the same inputs (the
``memory`` and ``stages`` rows describe larex alone):

* ``entropy/*``   :func:`larex.entropy.knn_entropy` vs the LaREx reference computation (per image, per
  dimension ``entropy_estimators.continuous.get_h(x.reshape(-1, 1), k, norm="max", min_dist=1e-5)`` in a
  Python loop), float64 and float32, plus a linear-scaling check (time at N and 4N).
* ``estimators/*`` the other aggregation estimators (``gaussian``, ``latent_mean``, ``joint``) vs the kNN
  entropy kernel on the same latents (time ratio), each checked against an independent computation.
* ``scoring/*``   LaRED (Gaussian KDE) vs ``sklearn.neighbors.KernelDensity``; LaREM vs
  ``sklearn.covariance.EmpiricalCovariance.mahalanobis``.
* ``baselines/*`` every logits/feature baseline YAML in ``configs/baselines`` (instantiated with Hydra)
  vs its pytorch-ood 0.4 counterpart, compared after the documented sign/scale conversion.
* ``mc/*``        MC extraction with the shared deterministic prefix (``FeatureExtractor(share_prefix=True)``:
  the layers before the first dropout/DropBlock layer run once per image) vs S full passes
  (``share_prefix=False``), S=16, on a random-init ResNet-18 (hooked at ``dropblock``, 32x32) and SmallCNN
  (28x28, hooked at ``dropblock`` as in the default config and at ``block3``), with keys ``latent`` and
  ``latent + mc_logits``; same seed, so the latents must agree to 1e-6.
* ``detection/*`` box-level LaREx extraction (one forward + RoIAlign + S DropBlock samples of the RoI features)
  vs a plain deterministic ``detect`` of the same model (goal <= 1.3x its time), and image-level MC latents of
  the hooked map with the shared prefix vs S full passes, for YOLOv8n and Faster R-CNN MobileNetV3.
* ``detector/*``  per-batch scoring latency of a saved LaRED / LaREM detector (``larex.Detector``, S=16) vs plain
  deterministic inference of the same model on the same batch, batch 1 and 64 (goal <= 1.5x).
* ``memory/*``    peak RSS of the extraction stage (``Trainer.predict`` streaming to safetensors shards)
  at N and 10N images, each in a fresh process: the goal is <20% growth; and ``memory/extract_disk``: bytes
  per image of the stored S=16 latents vs the entropy computed during extraction (``extract.keep_latent=false``).
* ``stages/*``    (last; about 3 minutes of the run on 2 cores) per-stage wall time of
  ``larex-run experiment=fmnist_demo`` (tiny overrides with --quick), read from its "stage times" table;
  needs Debian's Fashion-MNIST in /usr/share/datasets/fashion-mnist (a row says so when it is missing).

Default groups (plain ``make bench``): all of them, about 8 minutes on 2 CPU cores (the baseline rows fit on
50k rows and score 10k, so that the whole table, demo included, stays under 10 minutes).

Prints one Rich table and writes it atomically as ``<out>/bench.csv`` and ``<out>/bench.md``.
Timing: ``time.perf_counter``; every call runs once as warm-up, calls faster than ``FAST_S`` are then
repeated and the median is reported (``mc`` rows: the median of ``REPEATS`` calls after the warm-up, however
long they take). Slow references are timed on a subset and scaled linearly (the
row's note says so). A row that fails reports the error in its note; the others still run.

Layout: this file is the entry (arguments, running the selected groups, the table, CSV, Markdown and MLflow
output); each group lives in ``scripts/benchmarks/<group>.py`` (imported as ``benchmarks.<group>``: the
script's own folder is on ``sys.path``) and exposes ``<group>_rows(ctx) -> list[Row]``; the sizes, the row, the
timing context are in ``benchmarks/common.py``. A group's module is imported when the group runs, so one that
fails to import gives one error row and the other groups still run.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib
import io
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import COLUMNS, DEFAULT, DEFAULT_GROUPS, GROUPS, QUICK, REPO, Ctx, Row, error_row
from larex.io import write_text

# group -> its row builder in benchmarks.<group> (imported when the group runs)
BUILDERS = {"entropy": "entropy_rows", "estimators": "estimators_rows", "scoring": "scoring_rows", "baselines": "baseline_rows", "mc": "mc_rows",
            "detection": "detection_rows", "detector": "detector_rows",
            "memory": "memory_rows", "stages": "stages_rows"}
assert set(BUILDERS) == set(GROUPS)


def builder(group: str) -> Callable[[Ctx], list[Row]]:
    """The row builder of ``group`` (imports ``benchmarks.<group>``)."""
    return getattr(importlib.import_module(f"benchmarks.{group}"), BUILDERS[group])


# ----------------------------------------------------------------------------------------------- output
def machine_info(device: torch.device) -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    dev = str(device)
    if device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)})"
    try:
        load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "device": dev,
        "git_commit": commit,
        "load_avg_start": load,
    }


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r.raw())
    return buf.getvalue()


def to_markdown(rows: list[Row], info: dict[str, str], argv: list[str], wall: float) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [
        "# larex benchmark",
        "",
        f"- date: {info['date']}",
        f"- machine: {info['platform']}, {info['cpus']} CPUs (torch threads {info['torch_threads']}), "
        f"torch {info['torch']}, device {info['device']}",
        f"- git commit: {info['git_commit']}",
        f"- load average at start (1/5/15 min): {info['load_avg_start']}",
        f"- command: `{' '.join(['scripts/bench.py', *argv])}`; total wall time {wall:.0f} s",
        "- ratio = reference_s / larex_s (except `entropy/scaling`: t(4N)/t(N); `memory/extract`: peak RSS "
        "at 10N / at N; `memory/extract_disk`: bytes per image, latents / entropy); times in seconds, "
        "warm-up once, median of a few repeats for calls under 1 s",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        f = r.fmt()
        lines.append("| " + " | ".join(esc(f[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[Row], info: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"larex benchmark - {info['device']}, {info['cpus']} CPUs, torch {info['torch']}, "
                        f"commit {info['git_commit']}")
    for c in COLUMNS:
        table.add_column(c, overflow="fold", no_wrap=c in ("row", "larex_s", "reference_s", "ratio", "met"))
    for r in rows:
        f = r.fmt()
        table.add_row(*(f[c] for c in COLUMNS))
    Console(width=max(160, Console().width)).print(table)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds; used by tests/test_bench.py)")
    p.add_argument("--tracking-uri", default=None,
                   help="also log the table to this MLflow tracking URI (e.g. sqlite:///outputs/mlflow.db)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="device for the larex side (references always run on CPU); auto = cuda if available")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "bench", help="folder for bench.csv / bench.md")
    p.add_argument("--rows", default=",".join(DEFAULT_GROUPS),
                   help=f"comma-separated subset of {','.join(GROUPS)} (default: {','.join(DEFAULT_GROUPS)}; "
                        "stages runs the whole fmnist_demo, about 3 minutes on 2 CPU cores)")
    p.add_argument("--memory-child", nargs=3, metavar=("N", "BATCH", "DIR"), help=argparse.SUPPRESS)  # memory rows' worker
    p.add_argument("overrides", nargs="*", metavar="tracking.uri=URI",
                   help="larex-style override, same as --tracking-uri (so `make bench ARGS=tracking.uri=...` works)")
    args = p.parse_args(argv)
    if args.memory_child:
        return args
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if key != "tracking.uri" or not sep or not value:
            p.error(f"unknown override {item!r}: the only one is tracking.uri=URI (e.g. "
                    "tracking.uri=sqlite:///outputs/mlflow.db); other settings are --options, see --help")
        if args.tracking_uri and args.tracking_uri != value:
            p.error(f"--tracking-uri {args.tracking_uri} and tracking.uri={value} disagree; give one")
        args.tracking_uri = value
    groups = [g.strip() for g in args.rows.split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        p.error(f"--rows: unknown group(s) {bad or groups}; choose a comma-separated subset of {','.join(GROUPS)}")
    args.groups = groups
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine; use --device cpu (or auto)")
    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                               else ("cpu" if args.device == "auto" else args.device))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_child:
        import json

        from benchmarks.memory import memory_child

        print(json.dumps(memory_child(int(args.memory_child[0]), int(args.memory_child[1]), Path(args.memory_child[2]))), flush=True)
        return 0
    t0 = time.perf_counter()
    info = machine_info(args.device)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    ctx = Ctx(device=args.device, sizes=QUICK if args.quick else DEFAULT, quick=args.quick, log=log)
    rows: list[Row] = []
    for group in args.groups:
        try:
            rows.extend(builder(group)(ctx))
        except Exception as exc:  # noqa: BLE001 - e.g. an import failing: one row for the whole group
            rows.append(error_row(f"{group}/*", "", "", exc))
    wall = time.perf_counter() - t0
    print_table(rows, info)
    out: Path = args.out
    write_text(out / "bench.csv", to_csv(rows))
    write_text(out / "bench.md", to_markdown(rows, info, argv, wall))
    print(f"wrote {out / 'bench.csv'} and {out / 'bench.md'} ({wall:.0f} s)")
    if args.tracking_uri:
        log_to_mlflow(args.tracking_uri, rows, info, out, wall)
    return 0


def log_to_mlflow(uri: str, rows: list[Row], info: dict[str, str], out: Path, wall: float) -> None:
    """One MLflow run in experiment ``larex-bench``: ratios/times/errors as metrics, the tables as artifacts."""
    from larex.tracking import Tracker

    tracker = Tracker(uri, "larex-bench")
    metrics = {"wall_s": wall}
    for r in rows:
        for field in ("larex_s", "reference_s", "ratio", "max_abs_err"):
            v = getattr(r, field)
            if isinstance(v, float) and math.isfinite(v):
                metrics[f"{r.row}/{field}"] = v
        if r.met is not None:
            metrics[f"{r.row}/met"] = float(r.met)
    with tracker.start_run(run_name=f"bench {info.get('git_commit', '')}".strip(), tags={"larex.stage": "bench"}):
        tracker.log_params(info)
        tracker.log_metrics(metrics)
        tracker.log_artifact(out / "bench.csv")
        tracker.log_artifact(out / "bench.md")
    print(f"logged to MLflow {uri} (experiment larex-bench, run {tracker.run_id})")


if __name__ == "__main__":
    sys.exit(main())
