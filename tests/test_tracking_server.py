"""Sweeps that log to a shared MLflow tracking server, as jobs on a cluster do: a real `mlflow server` on 127.0.0.1
(SQLite backend, its own artifact root), a 2-job sweep with ``tracking.uri=http://127.0.0.1:PORT``, everything read
back through the client; a server that dies during a run gives one clear error and leaves the outputs complete."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module

from _cli import cli, layer_dir, tiny
from larex import io, tracking
from larex.detector import SPEC_FILE
from larex.stages import evaluate

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1:port with a SQLite backend and proxied artifacts under ``root``."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> "Server":
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            env={**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.time() + 120
        while True:
            try:
                if opener.open(f"{self.uri}/health", timeout=2).status == 200:
                    return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise AssertionError(f"mlflow server did not come up:\n{self.proc.stdout.read()[-3000:]}")
                time.sleep(0.5)

    def stop(self) -> None:
        """Kill the server and every process it started (uvicorn runs the app in a child)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path, loopback, monkeypatch):
    monkeypatch.setenv("LAREX_TEST_ALLOW_LOOPBACK", "1")  # the jobs (subprocesses) talk to the server too
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        monkeypatch.setenv(name, value)  # a dead server fails within seconds; restored after the test
    s = Server(tmp_path / "server", _free_port()).start()
    yield s
    s.stop()


def _args(out: Path) -> list[str]:
    return [*tiny(out, "digits", s=4), "limit.fit=200", "limit.ood=64", "evaluate.plots=false", "baselines=[msp]"]


def _evaluate_cfg(out: Path, uri: str, *extra: str):
    with initialize_config_module("larex.configs", version_base="1.3"):
        return compose("evaluate", overrides=[*_args(out), f"tracking.uri={uri}", "device=cpu", *extra])


def test_sweep_logs_parent_and_nested_runs_to_a_shared_server_and_survives_its_death(server, tmp_path, monkeypatch):
    import mlflow

    out = tmp_path / "outputs"
    cli("larex-run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *_args(out), "postprocessor=lared,larem",
        f"tracking.uri={server.uri}", "save_detector=all", "tracking.log_detectors=false", cwd=tmp_path)
    (sweep_dir,) = (out / "hydra" / "multirun").iterdir()
    parent = io.read_json(sweep_dir / "mlflow_parent.json")
    assert parent["tracking_uri"] == server.uri
    assert tracking.read_run(server.uri, parent["run_id"])["tags"]["larex.sweep_dir"] == str(sweep_dir.resolve())

    runs = [r for r in tracking.list_runs(server.uri, "larex") if r["tags"].get("larex.stage") == "evaluate"]
    assert len(runs) == 2 and {r["tags"]["mlflow.parentRunId"] for r in runs} == {parent["run_id"]}
    evaluations = sorted(layer_dir(out, "digits").glob("evaluate-*"))
    assert len(evaluations) == 2
    by_dir = {Path(r["tags"]["larex.run_dir"]): tracking.read_run(server.uri, r["run_id"]) for r in runs}
    assert set(by_dir) == set(evaluations)
    methods = set()
    for ev, logged in by_dir.items():
        assert logged["status"] == "FINISHED"
        table = pd.read_csv(ev / "metrics.csv")
        (method,) = set(table["method"]) - {"msp"}
        methods.add(method)
        assert {k.split(".")[1] for k in logged["params"] if k.startswith("postprocessor.")} == {method}
        for _, row in table.iterrows():  # every metric of the table, as logged by the job
            for metric in ("auroc", "fpr95", "aupr_in"):
                assert logged["metrics"][f"{row['ood']}/{row['method']}/{metric}"] == pytest.approx(row[metric])
        assert {"metrics.csv", "metrics.parquet", "results.md", "config.yaml"} <= set(logged["artifacts"])
        run_id = io.read_json(ev / "evaluate.json")["mlflow_run_id"]
        got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="metrics.csv",
                                                       tracking_uri=server.uri, dst_path=str(tmp_path / run_id)))
        assert got.read_bytes() == (ev / "metrics.csv").read_bytes()
    assert methods == {"lared", "larem"}
    stored = {p.name for p in (server.root / "artifacts").rglob("*") if p.is_file()}
    assert {"metrics.csv", "results.md", "config.yaml"} <= stored  # uploaded through the server, not written here
    assert not (out / "mlartifacts").exists()

    # the server dies during an evaluation (after scoring, before the run is logged): one clear error, the
    # evaluation complete on disk; when the server is back, the same command logs it without recomputing
    cfg = _evaluate_cfg(out, server.uri, "postprocessor=lared", "evaluate.tpr=0.9", "save_detector=[lared]")
    real_save = evaluate._save_detectors

    def save_then_kill_the_server(*args, **kwargs):
        saved = real_save(*args, **kwargs)
        server.stop()
        return saved

    monkeypatch.setattr(evaluate, "_save_detectors", save_then_kill_the_server)
    with pytest.raises(tracking.TrackingUnavailableError, match=r"stopped answering .*The evaluation itself is complete"):
        evaluate.run(cfg)
    monkeypatch.setattr(evaluate, "_save_detectors", real_save)
    (new,) = set(layer_dir(out, "digits").glob("evaluate-*")) - set(evaluations)
    state = io.read_json(new / "evaluate.json")
    assert "mlflow_run_id" not in state and "stopped answering" in state["tracking_pending"]
    table = pd.read_csv(new / "metrics.csv")
    assert set(table["method"]) == {"lared", "msp"} and table.loc[table["ood"] != "mean", "threshold"].notna().all()
    assert (new / "results.md").is_file() and (new / "detector" / "lared" / SPEC_FILE).is_file()
    assert not [p for p in new.rglob("*") if ".tmp" in p.name]
    assert io.read_json(layer_dir(out, "digits") / "latest.json")["path"] == str(new)

    server.start()  # same port, same store
    again = evaluate.run(cfg)
    pd.testing.assert_frame_equal(again, table)
    state = io.read_json(new / "evaluate.json")
    assert "tracking_pending" not in state
    logged = tracking.read_run(server.uri, state["mlflow_run_id"])
    assert logged["status"] == "FINISHED" and state["detectors"]["lared"]["mlflow_model_uri"].startswith("models:/")
    assert logged["metrics"]["mean/lared/auroc"] == pytest.approx(
        table.loc[(table["method"] == "lared") & (table["ood"] == "mean"), "auroc"].iloc[0])


def test_an_unreachable_server_is_refused_before_any_compute(tmp_path, loopback):
    from larex.stages import run as run_stage

    out = tmp_path / "outputs"
    with initialize_config_module("larex.configs", version_base="1.3"):
        cfg = compose("run", overrides=[*_args(out), f"tracking.uri=http://127.0.0.1:{_free_port()}"])
    with pytest.raises(tracking.TrackingUnavailableError, match="is unreachable.*tracking.enabled=false"):
        run_stage.run(cfg)
    assert not (out / "classification").exists()  # nothing trained or extracted
