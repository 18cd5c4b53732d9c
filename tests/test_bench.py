"""scripts/bench.py --quick runs end to end: exit 0, one CSV/MD pair with the expected columns and rows,
no failed row, float64 entropy equal to the entropy_estimators reference to 1e-9, in well under a minute.
Timings are not asserted (speed goals live in the benchmark's own table)."""
from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("entropy_estimators", reason="the entropy rows compare against entropy-estimators")
pytest.importorskip("pytorch_ood", reason="the baseline rows compare against pytorch-ood")

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["row", "inputs", "larex_s", "reference_s", "ratio", "goal", "met", "max_abs_err", "note"]
ENTROPY_ROWS = {f"entropy/{t}/{s}" for t in ("f64", "f32") for s in ("small", "large")} | {"entropy/scaling"}
QUICK_BASELINES = {"msp", "gen", "kl_matching", "mdist", "ddu", "knn", "vim", "react", "she"}


def test_quick_bench_writes_complete_table(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 60, f"--quick took {elapsed:.0f} s"

    with open(tmp_path / "bench.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        rows = {r["row"]: r for r in reader}
    expected = ENTROPY_ROWS | {"scoring/lared", "scoring/larem"} | {f"baselines/{m}" for m in QUICK_BASELINES}
    assert set(rows) == expected

    failed = {name: r["note"] for name, r in rows.items() if r["note"].startswith("error:")}
    assert not failed, failed
    for name, r in rows.items():
        assert float(r["larex_s"]) > 0, name
        if name != "entropy/scaling":  # the scaling row's reference column is larex itself at N
            assert math.isclose(float(r["ratio"]), float(r["reference_s"]) / float(r["larex_s"]), rel_tol=1e-9)
        assert r["met"] in ("yes", "no"), name

    for name in ENTROPY_ROWS - {"entropy/scaling"}:
        err = float(rows[name]["max_abs_err"])
        assert 0 <= err <= (1e-9 if "/f64/" in name else 1e-4), (name, err)
    assert float(rows["entropy/scaling"]["max_abs_err"]) == 0.0  # first N images of the 4N run == the N run
    assert float(rows["scoring/lared"]["max_abs_err"]) <= 1e-6
    assert float(rows["scoring/larem"]["max_abs_err"]) <= 1e-6
    exact = QUICK_BASELINES - {"ddu", "vim"}  # ddu: rank only; vim: pytorch-ood computes in float32
    for m in exact:
        assert float(rows[f"baselines/{m}"]["max_abs_err"]) <= 1e-6, m
    rho = re.search(r"spearman ([0-9.]+)$", rows["baselines/ddu"]["note"])
    assert rho and float(rho.group(1)) >= 0.999, rows["baselines/ddu"]["note"]

    md = (tmp_path / "bench.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in md
    assert "torch" in md and "git commit" in md and md.count("\n| entropy/") == len(ENTROPY_ROWS)
