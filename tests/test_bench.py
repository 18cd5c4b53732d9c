"""scripts/bench.py --quick runs end to end: exit 0, one CSV/MD pair with the expected columns and rows,
no failed row, float64 entropy equal to the entropy_estimators reference to 1e-9, MC latents with and
without the shared prefix equal to 1e-6, peak-RSS figures of the memory rows, in well under a minute.
Timings are not asserted (speed goals live in the benchmark's own table). The ``stages`` group (it trains)
is a slow test."""
from __future__ import annotations

import csv
import importlib.util
import io
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
MC_ROWS = {f"mc/{m}/{k}" for m in ("resnet18", "small_cnn", "small_cnn_block3") for k in ("latent", "latent+mc_logits")}
STAGES = ("train", "extract", "aggregate", "evaluate")
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _run_bench(out: Path, *args: str, timeout: float) -> tuple[dict[str, dict[str, str]], float]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "bench.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        return {r["row"]: r for r in reader}, elapsed


def _load_bench(monkeypatch):
    """scripts/bench.py as a module (registered in sys.modules for the test only: its dataclasses need it)."""
    spec = importlib.util.spec_from_file_location("larex_bench_script", REPO / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def test_bench_arguments_accept_tracking_uri_override(monkeypatch, capsys):
    bench = _load_bench(monkeypatch)
    assert bench.parse_args(["tracking.uri=sqlite:///x.db"]).tracking_uri == "sqlite:///x.db"
    assert bench.parse_args(["--tracking-uri", "sqlite:///x.db"]).tracking_uri == "sqlite:///x.db"
    assert bench.parse_args([]).tracking_uri is None
    for bad in (["seed=3"], ["tracking.uri="], ["--tracking-uri", "a", "tracking.uri=b"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert "only one is tracking.uri" in capsys.readouterr().err


def test_quick_bench_writes_complete_table(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rows, _ = _run_bench(tmp_path, "--rows", "entropy,scoring,baselines,mc,memory", f"tracking.uri={uri}",
                         timeout=600)  # as `make bench ARGS=...`; stages (it trains) is the slow test below
    from larex.tracking import list_runs, read_run

    (run,) = list_runs(uri, "larex-bench")
    logged = read_run(uri, run["run_id"])
    assert logged["metrics"]["scoring/lared/ratio"] == pytest.approx(float(rows["scoring/lared"]["ratio"]), rel=1e-6)
    assert {"bench.csv", "bench.md"} <= set(logged["artifacts"])
    expected = (ENTROPY_ROWS | {"scoring/lared", "scoring/larem"} | {f"baselines/{m}" for m in QUICK_BASELINES}
                | MC_ROWS | {"memory/extract"})
    assert set(rows) == expected  # no stages/* rows (not asked for)

    failed = {name: r["note"] for name, r in rows.items() if r["note"].startswith("error:")}
    assert not failed, failed
    for name, r in rows.items():
        assert float(r["larex_s"]) > 0, name
        if name not in ("entropy/scaling", "memory/extract"):  # ratio is t(4N)/t(N) and RSS(10N)/RSS(N) there
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

    # shared prefix vs S full passes, same seed: identical MC samples (latent and, where asked, mc_logits)
    for name in MC_ROWS:
        assert 0 <= float(rows[name]["max_abs_err"]) <= 1e-6, (name, rows[name]["note"])
        errs = re.findall(r"(latent|mc_logits) ([0-9.e+-]+)", rows[name]["note"].split("err = ")[-1])
        assert [k for k, _ in errs] == rows[name]["row"].split("/")[-1].split("+"), rows[name]["note"]
        assert max(float(v) for _, v in errs) <= 1e-6
    assert rows["mc/resnet18/latent"]["goal"].startswith(">=5x")

    mem = rows["memory/extract"]
    peaks = re.search(r"peak RSS \(VmHWM\) ([0-9.]+) MiB at 1x, ([0-9.]+) MiB at 10x", mem["note"])
    assert peaks, mem["note"]
    rss1, rss10 = float(peaks.group(1)), float(peaks.group(2))
    assert 50 < rss1 < 64_000 and 50 < rss10 < 64_000  # MiB: a real process, not a unit mix-up
    assert math.isclose(float(mem["ratio"]), rss10 / rss1, rel_tol=1e-3)
    assert mem["met"] == ("yes" if rss10 / rss1 < 1.2 else "no")
    assert float(mem["reference_s"]) > 0  # wall time at N (larex_s: at 10N)

    md = (tmp_path / "bench.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in md
    assert "torch" in md and "git commit" in md and md.count("\n| entropy/") == len(ENTROPY_ROWS)
    assert md.count("\n| mc/") == len(MC_ROWS) and md.count("\n| memory/") == 1


def test_parse_stage_times_reads_rich_tables(monkeypatch):
    from rich import box
    from rich.console import Console
    from rich.table import Table

    bench = _load_bench(monkeypatch)
    secs = {"train": 61.2, "extract": 100.0, "aggregate": 3.5, "evaluate": 12.0}
    for style in (box.HEAVY_HEAD, box.ASCII):
        table = Table(title="stage times", box=style)
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        for k, v in secs.items():
            table.add_row(k, f"{v:.1f}")
        buf = io.StringIO()
        Console(file=buf, width=80, force_terminal=False).print(table)
        text = "[train] train 99.0 epochs\n" + buf.getvalue()  # log lines before the table are ignored
        assert bench.parse_stage_times(text) == secs
    with pytest.raises(ValueError, match="stage times"):
        bench.parse_stage_times("no table here")
    with pytest.raises(ValueError, match="evaluate"):
        bench.parse_stage_times("stage times\n| train | 1.0 |\n| extract | 2.0 |\n| aggregate | 3.0 |\n")


@pytest.mark.slow
def test_quick_bench_stages(tmp_path):
    rows, _ = _run_bench(tmp_path, "--rows", "stages", timeout=600)
    if not all((FMNIST / f"{p}-{k}-ubyte.gz").is_file() for p in ("train", "t10k")
               for k in ("images-idx3", "labels-idx1")):
        assert set(rows) == {"stages/fmnist_demo"} and rows["stages/fmnist_demo"]["note"].startswith("skipped:")
        return
    assert set(rows) == {f"stages/{s}" for s in STAGES}
    failed = {name: r["note"] for name, r in rows.items() if r["note"].startswith("error:")}
    assert not failed, failed
    secs = {s: float(rows[f"stages/{s}"]["larex_s"]) for s in STAGES}
    assert all(v >= 0 for v in secs.values()) and sum(secs.values()) > 0
    total = sum(secs.values())
    for s in STAGES:
        share = re.match(r"(\d+)% of the ([0-9.]+) s", rows[f"stages/{s}"]["note"])
        assert share, rows[f"stages/{s}"]["note"]
        assert abs(int(share.group(1)) - 100 * secs[s] / total) <= 0.5 + 1e-9
        assert math.isclose(float(share.group(2)), total, abs_tol=0.051)
    slowest = [s for s in STAGES if "(slowest stage)" in rows[f"stages/{s}"]["note"]]
    assert slowest == [max(secs, key=secs.__getitem__)]
