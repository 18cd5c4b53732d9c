"""The benchmark code (scripts/bench.py and scripts/benchmarks/) is correct, not that larex is fast.

``bench.py --quick`` runs the entropy, scoring, baselines and mc groups end to end (exit 0, one CSV/MD pair
with the expected columns and rows, no failed row, the MLflow run, float64 entropy equal to the
entropy_estimators reference to 1e-9, MC latents with and without the shared prefix equal to 1e-6); the memory
rows are checked in-process (the extraction child and the row arithmetic on given figures); argument parsing
and the stage-times parser are unit tests. No wall-clock time or speed ratio is asserted: a ratio only has to
be a finite positive number, consistent with the two times it divides. The memory group in its subprocesses and
the ``stages`` group (it trains) are slow tests."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
COLUMNS = ["row", "inputs", "larex_s", "reference_s", "ratio", "goal", "met", "max_abs_err", "note"]
ENTROPY_ROWS = {f"entropy/{t}/{s}" for t in ("f64", "f32") for s in ("small", "large")} | {"entropy/scaling"}
QUICK_BASELINES = {"msp", "gen", "kl_matching", "mdist", "ddu", "knn", "vim", "react", "she"}
MC_ROWS = {f"mc/{m}/{k}" for m in ("resnet18", "small_cnn", "small_cnn_block3") for k in ("latent", "latent+mc_logits")}
STAGES = ("train", "extract", "aggregate", "evaluate")
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _need_references() -> None:
    pytest.importorskip("entropy_estimators", reason="the entropy rows compare against entropy-estimators")
    pytest.importorskip("pytorch_ood", reason="the baseline rows compare against pytorch-ood")


def _run_bench(out: Path, *args: str, timeout: float) -> dict[str, dict[str, str]]:
    """``python scripts/bench.py --quick --out OUT ARGS`` from the repo root, as `make bench` runs it."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench.py"), "--quick", "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "bench.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        return {r["row"]: r for r in reader}


def _positive(value: str) -> float:
    v = float(value)
    assert math.isfinite(v) and v > 0, value
    return v


def _no_failed(rows: dict[str, dict[str, str]]) -> None:
    failed = {name: r["note"] for name, r in rows.items() if r["note"].startswith("error:")}
    assert not failed, failed


@pytest.fixture
def bench(monkeypatch):
    """scripts/bench.py as a module, with scripts/ on sys.path as when it runs as a script (so that
    ``benchmarks.<group>`` imports); registered in sys.modules for the test only."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("larex_bench_script", SCRIPTS / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def test_bench_arguments_accept_tracking_uri_override(bench, capsys):
    assert bench.parse_args(["tracking.uri=sqlite:///x.db"]).tracking_uri == "sqlite:///x.db"
    assert bench.parse_args(["--tracking-uri", "sqlite:///x.db"]).tracking_uri == "sqlite:///x.db"
    assert bench.parse_args(["--tracking-uri", "sqlite:///x.db", "tracking.uri=sqlite:///x.db"]).tracking_uri \
        == "sqlite:///x.db"
    args = bench.parse_args([])
    assert args.tracking_uri is None and args.groups == list(bench.DEFAULT_GROUPS) and str(args.device) == "cpu"
    assert bench.parse_args(["--rows", "mc, entropy"]).groups == ["mc", "entropy"]
    assert str(bench.parse_args(["--device", "auto"]).device) in ("cpu", "cuda")
    assert bench.parse_args(["--memory-child", "40", "20", "d"]).memory_child == ["40", "20", "d"]
    for bad in (["seed=3"], ["tracking.uri="], ["--tracking-uri", "a", "tracking.uri=b"], ["--rows", "nope"],
                ["--rows", ","]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    err = capsys.readouterr().err
    assert "only one is tracking.uri" in err and "unknown group" in err


def test_every_group_has_a_module_and_builder(bench):
    assert set(bench.BUILDERS) == set(bench.GROUPS)
    for group in bench.GROUPS:
        assert (SCRIPTS / "benchmarks" / f"{group}.py").is_file(), group
        assert callable(bench.builder(group)), group
    from benchmarks import memory

    assert memory.BENCH_SCRIPT == SCRIPTS / "bench.py"  # the memory child is `bench.py --memory-child`


def test_main_writes_tables_and_reports_a_failing_group(bench, tmp_path, monkeypatch, capsys):
    """main() in-process with stub groups: one table per run, a group that raises gives one error row."""
    def fake(ctx):
        assert ctx.quick and ctx.sizes == bench.QUICK
        return [bench.Row("scoring/fake", "x", 0.5, 2.0, 4.0, ">=1x", True, 1e-9, "a | b")]

    def broken(group):
        if group == "entropy":
            raise ImportError("no module named entropy_estimators")
        return fake

    monkeypatch.setattr(bench, "builder", broken)
    assert bench.main(["--quick", "--rows", "entropy,scoring", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "bench.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["row"] for r in rows] == ["entropy/*", "scoring/fake"]
    assert rows[0]["note"].startswith("error: ImportError: no module named entropy_estimators")
    assert (rows[1]["larex_s"], rows[1]["ratio"], rows[1]["met"]) == ("0.5", "4.0", "yes")
    md = (tmp_path / "bench.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in md and "| scoring/fake | x | 0.5 | 2 | 4.0x |" in md
    assert "a \\| b" in md and "git commit" in md
    assert "scoring/fake" in capsys.readouterr().out  # the Rich table


def test_quick_bench_writes_complete_table(tmp_path):
    _need_references()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rows = _run_bench(tmp_path, "--rows", "entropy,scoring,baselines,mc", f"tracking.uri={uri}",
                      timeout=600)  # as `make bench ARGS=...`; memory is checked below, stages is a slow test
    expected = ENTROPY_ROWS | {"scoring/lared", "scoring/larem"} | {f"baselines/{m}" for m in QUICK_BASELINES} | MC_ROWS
    assert set(rows) == expected
    _no_failed(rows)

    from larex.tracking import list_runs, read_run

    (run,) = list_runs(uri, "larex-bench")
    logged = read_run(uri, run["run_id"])
    assert logged["metrics"]["scoring/lared/ratio"] == pytest.approx(float(rows["scoring/lared"]["ratio"]), rel=1e-6)
    assert {"bench.csv", "bench.md"} <= set(logged["artifacts"])

    for name, r in rows.items():
        larex_s, ref_s, ratio = _positive(r["larex_s"]), _positive(r["reference_s"]), _positive(r["ratio"])
        if name != "entropy/scaling":  # there ratio = t(4N)/t(N) = larex_s / reference_s
            assert math.isclose(ratio, ref_s / larex_s, rel_tol=1e-9), name
        else:
            assert math.isclose(ratio, larex_s / ref_s, rel_tol=1e-9)
        assert r["met"] in ("yes", "no"), name

    for name in ENTROPY_ROWS - {"entropy/scaling"}:
        err = float(rows[name]["max_abs_err"])
        assert 0 <= err <= (1e-9 if "/f64/" in name else 1e-4), (name, err)
    assert float(rows["entropy/scaling"]["max_abs_err"]) == 0.0  # first N images of the 4N run == the N run
    assert float(rows["scoring/lared"]["max_abs_err"]) <= 1e-6
    assert float(rows["scoring/larem"]["max_abs_err"]) <= 1e-6
    assert rows["scoring/larem"]["met"] == "yes"  # its only goal is the error
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

    md = (tmp_path / "bench.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in md
    assert "torch" in md and "git commit" in md and md.count("\n| entropy/") == len(ENTROPY_ROWS)
    assert md.count("\n| mc/") == len(MC_ROWS) and md.count("\n| baselines/") == len(QUICK_BASELINES)


def test_memory_child_extracts_and_reports_rss(bench, tmp_path, capsys):
    """The worker of the memory rows, via main's --memory-child dispatch (in this process, 32 images)."""
    assert bench.main(["--memory-child", "32", "16", str(tmp_path)]) == 0
    out = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1])
    assert (out["n"], out["batch"]) == (32, 16)
    assert 50 < out["setup_mib"] <= out["peak_mib"] < 64_000  # MiB of a real process, not a unit mix-up
    assert _positive(str(out["wall_s"]))
    assert any(tmp_path.rglob("*.safetensors")), sorted(p.name for p in tmp_path.rglob("*"))


def test_memory_row_from_child_figures(bench, monkeypatch):
    import torch

    from benchmarks import common, memory

    figures = {160: {"n": 160, "batch": 40, "setup_mib": 800.0, "peak_mib": 1000.0, "wall_s": 0.7},
               1600: {"n": 1600, "batch": 40, "setup_mib": 801.0, "peak_mib": 1250.0, "wall_s": 5.9}}
    calls = []

    def child(n, batch, timeout):
        calls.append((n, batch))
        return figures[n]

    monkeypatch.setattr(memory, "run_memory_child", child)
    ctx = common.Ctx(device=torch.device("cpu"), sizes=common.QUICK, quick=True, log=lambda m: None)
    (row,) = memory.rss_rows(ctx)
    assert calls == [(160, 40), (1600, 40)]
    assert (row.row, row.larex_s, row.reference_s) == ("memory/extract", 5.9, 0.7)
    assert row.ratio == pytest.approx(1.25) and row.met is False  # growth 25% >= 20%
    assert "peak RSS (VmHWM) 1000.0 MiB at 1x, 1250.0 MiB at 10x" in row.note
    assert "peak RSS 1000 MiB vs 1250 MiB" in row.inputs
    figures[1600] = {**figures[1600], "peak_mib": 1100.0}
    assert memory.rss_rows(ctx)[0].met is True

    def fails(n, batch, timeout):
        raise RuntimeError("memory child (N=160) exited with 1: boom")

    monkeypatch.setattr(memory, "run_memory_child", fails)
    (row,) = memory.rss_rows(ctx)
    assert row.note.startswith("error: RuntimeError: memory child (N=160)") and math.isnan(row.ratio)


def test_disk_row_compares_bytes_per_image_and_entropies(bench):
    """memory/extract_disk: the S=16 latents on disk vs the entropy computed during extraction (32 images)."""
    import dataclasses

    import torch

    from benchmarks import common, memory

    ctx = common.Ctx(device=torch.device("cpu"), sizes=dataclasses.replace(common.QUICK, mem_images=32, mem_batch=16),
                     quick=True, log=lambda m: None)
    row = memory.disk_row(ctx)
    assert row.row == "memory/extract_disk" and row.max_abs_err == 0.0, row.note
    # 16 float32 samples of D dims vs D float64 entropies: 8x, less the two files' headers
    assert 7.6 <= row.ratio <= 8.0 and row.met is True
    per_image = [float(v) for v in re.findall(r"([0-9]+) B \(", row.note)]
    assert per_image[0] / per_image[1] == pytest.approx(row.ratio, rel=1e-3)  # the note rounds to bytes


def test_parse_stage_times_reads_rich_tables(bench):
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from benchmarks.stages import parse_stage_times

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
        assert parse_stage_times(text) == secs
    with pytest.raises(ValueError, match="stage times"):
        parse_stage_times("no table here")
    with pytest.raises(ValueError, match="evaluate"):
        parse_stage_times("stage times\n| train | 1.0 |\n| extract | 2.0 |\n| aggregate | 3.0 |\n")


@pytest.mark.slow
def test_quick_bench_memory(tmp_path):
    """The memory group as `make bench` runs it: two fresh `bench.py --memory-child` processes."""
    rows = _run_bench(tmp_path, "--rows", "memory", timeout=600)
    assert set(rows) == {"memory/extract", "memory/extract_disk"}
    _no_failed(rows)
    disk = rows["memory/extract_disk"]  # bytes per image with the latents vs with the entropy only
    sizes = re.search(r"bytes per image on disk: (\d+) B \(latent \[N, (\d+), (\d+)\] float32\) vs (\d+) B "
                      r"\(entropy \[N, (\d+)\] float64", disk["note"])
    assert sizes, disk["note"]
    latent_b, s, d, entropy_b, d2 = map(int, sizes.groups())
    assert d2 == d  # measured file bytes per image: the arrays' bytes plus a few of the files' headers
    assert math.isclose(latent_b, s * d * 4, rel_tol=0.05) and math.isclose(entropy_b, d * 8, rel_tol=0.05)
    assert math.isclose(_positive(disk["ratio"]), latent_b / entropy_b, rel_tol=0.05)
    assert float(disk["max_abs_err"]) == 0.0  # the entropies of the two paths are identical
    mem = rows["memory/extract"]
    peaks = re.search(r"peak RSS \(VmHWM\) ([0-9.]+) MiB at 1x, ([0-9.]+) MiB at 10x", mem["note"])
    assert peaks, mem["note"]
    rss1, rss10 = float(peaks.group(1)), float(peaks.group(2))
    assert 50 < rss1 < 64_000 and 50 < rss10 < 64_000  # MiB: a real process, not a unit mix-up
    assert math.isclose(_positive(mem["ratio"]), rss10 / rss1, rel_tol=1e-3)
    assert mem["met"] == ("yes" if rss10 / rss1 < 1.2 else "no")
    _positive(mem["larex_s"])  # wall time at 10N
    _positive(mem["reference_s"])  # and at N


@pytest.mark.slow
def test_quick_bench_stages(tmp_path):
    rows = _run_bench(tmp_path, "--rows", "stages", timeout=600)
    if not all((FMNIST / f"{p}-{k}-ubyte.gz").is_file() for p in ("train", "t10k")
               for k in ("images-idx3", "labels-idx1")):
        assert set(rows) == {"stages/fmnist_demo"} and rows["stages/fmnist_demo"]["note"].startswith("skipped:")
        return
    assert set(rows) == {f"stages/{s}" for s in STAGES}
    _no_failed(rows)
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
