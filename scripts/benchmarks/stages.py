"""``stages/*`` rows: per-stage wall time of ``larex-run experiment=fmnist_demo`` (tiny overrides with
--quick), read from its "stage times" table; needs Debian's Fashion-MNIST in /usr/share/datasets/fashion-mnist."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Ctx, Row, error_row

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = tuple(f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))
STAGES = ("train", "extract", "aggregate", "evaluate")
STAGES_QUICK = ("train.limit.fit=512", "train.limit.val=128", "model.train.epochs=1", "limit.fit=200",
                "limit.val=100", "limit.test=100", "limit.ood=50", "hooked_layer.mc_samples=6",
                "baselines=[msp,energy]")
STAGES_TIMEOUT_S = 1800.0


def parse_stage_times(text: str) -> dict[str, float]:
    """Seconds per stage from the "stage times" table ``larex-run`` prints (any box characters)."""
    import re

    start = text.rfind("stage times")
    if start < 0:
        raise ValueError("larex-run printed no 'stage times' table")
    pattern = re.compile(r"^\W*(" + "|".join(STAGES) + r")\W+([0-9]+(?:\.[0-9]+)?)\W*$")
    times = {}
    for line in text[start:].splitlines():
        m = pattern.match(line.strip())
        if m:
            times[m.group(1)] = float(m.group(2))
    missing = [s for s in STAGES if s not in times]
    if missing:
        raise ValueError(f"the 'stage times' table of larex-run lacks the stage(s) {missing}")
    return times


def stages_rows(ctx: Ctx) -> list[Row]:
    import tempfile

    quick = ctx.sizes.stages_quick
    inputs = "experiment=fmnist_demo" + (" + tiny overrides (--quick)" if quick else "")
    missing = [f for f in FMNIST_FILES if not (FMNIST_DIR / f).is_file()]
    if missing:
        return [Row("stages/fmnist_demo", inputs, goal="-",
                    note=f"skipped: Fashion-MNIST files not found in {FMNIST_DIR} ({', '.join(missing)}); "
                         "`apt-get install dataset-fashion-mnist` provides them")]
    exe = Path(sys.executable).parent / "larex-run"
    try:
        if not exe.is_file():
            raise FileNotFoundError(f"console script {exe} not found next to {sys.executable}; "
                                    "`pip install -e .` in this environment installs it")
        with tempfile.TemporaryDirectory(prefix="larex-bench-stages-") as tmp:
            cmd = [str(exe), "experiment=fmnist_demo", f"output_root={tmp}/outputs", "progress=false",
                   f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"device={ctx.device.type}",
                   *(STAGES_QUICK if quick else ())]
            env = {"HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                   **os.environ, "COLUMNS": "120"}
            ctx.log(f"stages: {' '.join(cmd[1:])}")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=STAGES_TIMEOUT_S)
            wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = " ".join((proc.stderr + proc.stdout).split()[-60:])
            raise RuntimeError(f"larex-run exited with {proc.returncode}: {tail}")
        times = parse_stage_times(proc.stdout)
    except Exception as exc:  # noqa: BLE001
        return [error_row(f"stages/{s}", inputs, "-", exc) for s in STAGES]
    total = sum(times.values())
    slowest = max(times, key=times.__getitem__)
    rows = []
    for s in STAGES:
        note = f"{times[s] / total:.0%} of the {total:.1f} s of the four stages"
        if s == slowest:
            note += " (slowest stage)"
        if s == STAGES[0]:
            note += f"; larex-run wall time {wall:.1f} s (start-up included), device {ctx.device.type}"
        rows.append(Row(f"stages/{s}", inputs, times[s], goal="-", note=note))
    return rows
