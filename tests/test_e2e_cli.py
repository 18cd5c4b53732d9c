"""End to end through the console scripts on a tiny Fashion-MNIST subset: output layout, skipping of
complete stages, MLflow run contents, config composition, early errors. Runs the scripts from a temp
working directory (configs must resolve from the installed package) with sockets blocked."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist")
BIN = Path(sys.executable).parent
OFFLINE = Path(__file__).parent / "_offline"

pytestmark = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Debian package dataset-fashion-mnist not installed (make install as root)")

OODS = ["fmnist_holdout", "fmnist_shift", "digits", "noise"]
S = 6


def tiny(out: Path) -> list[str]:
    return [f"output_root={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", "progress=false",
            "train.limit.fit=768", "train.limit.val=128", "model.train.epochs=1",
            "limit.fit=300", "limit.val=200", "limit.test=200", "limit.ood=120",
            f"hooked_layer.mc_samples={S}", "extract.batch_size=64", "extract.shard_size=100"]


def cli(name: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(OFFLINE), "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "HYDRA_FULL_ERROR": "0", "COLUMNS": "200"}
    p = subprocess.run([str(BIN / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the four stages one by one, as a user would."""
    work = tmp_path_factory.mktemp("work")
    out = work / "outputs"
    logs = {name: cli(f"larex-{name}", *tiny(out), cwd=work)
            for name in ("train", "extract", "aggregate", "evaluate")}
    return work, out, logs


def test_output_layout(pipeline):
    from larex import io

    _, out, _ = pipeline
    base = out / "classification" / "fashion_mnist" / "small_cnn"
    assert io.read_manifest(base / "checkpoint")["complete"] is True
    run = base / "dropblock"
    expected_rows = {"fit": 300, "val": 200, "test": 200, **{f"ood/{o}": 120 for o in OODS}}
    for split, n in expected_rows.items():
        m = io.read_manifest(run / "extract" / split)
        assert m["complete"] is True and m["rows"] == n
        assert m["shard_size"] == 128 and len(m["shards"]) == -(-n // 128)
        lat, logits, mc = m["keys"]["latent"]["shape"], m["keys"]["logits"]["shape"], m["keys"]["mc_logits"]["shape"]
        assert lat[:2] == [n, S] and logits == [n, 8] and mc == [n, S, 8]
        agg = io.load_arrays(run / "aggregate" / f"{split}.safetensors")
        assert agg["entropy"].shape == (n, lat[2]) and agg["entropy"].dtype == np.float64
    head = io.load_arrays(run / "extract" / "head.safetensors")
    assert head["head.weight"].shape[0] == 8 and head["head.bias"].shape == (8,)
    feats = io.read_features(run / "extract" / "ood/fmnist_holdout", ["labels"])
    assert (feats["labels"] == -1).all()
    assert (run / "scores" / "lared.parquet").is_file() and (run / "plots" / "roc_lared.png").is_file()


def test_aggregate_matches_entropy_of_extracted_latents(pipeline):
    from larex import io
    from larex.entropy import knn_entropy

    _, out, _ = pipeline
    run = out / "classification" / "fashion_mnist" / "small_cnn" / "dropblock"
    lat = io.read_features(run / "extract" / "val", ["latent"])["latent"]
    agg = io.load_arrays(run / "aggregate" / "val.safetensors")["entropy"]
    np.testing.assert_allclose(agg, knn_entropy(lat.astype(np.float64)).numpy(), rtol=0, atol=1e-12)


def test_metrics_table_and_mlflow_run(pipeline):
    from larex import io
    from larex.metrics import ood_metrics
    from larex.tracking import read_run

    _, out, logs = pipeline
    run = out / "classification" / "fashion_mnist" / "small_cnn" / "dropblock"
    table = pd.read_csv(run / "metrics.csv")
    assert set(table["method"]) == {"lared", "larem"}
    assert set(table["ood"]) == {*OODS, "mean"}
    scores = pd.read_parquet(run / "scores" / "larem.parquet")
    ids = scores.loc[scores.split == "test", "score"].to_numpy()
    ood = scores.loc[scores.split == "ood/digits", "score"].to_numpy()
    row = table[(table.method == "larem") & (table.ood == "digits")].iloc[0]
    assert row["auroc"] == pytest.approx(ood_metrics(ids, ood)["auroc"], abs=1e-12)
    state = io.read_json(run / "evaluate.json")
    rec = read_run(f"sqlite:///{out}/mlflow.db", state["mlflow_run_id"])
    for o in OODS:
        for m in ("lared", "larem"):
            for k in ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_ood", "threshold"):
                assert f"{o}/{m}/{k}" in rec["metrics"]
    assert rec["metrics"]["digits/larem/auroc"] == pytest.approx(row["auroc"])
    assert rec["params"]["hooked_layer.mc_samples"] == str(S)
    assert {"metrics.csv", "metrics.parquet", "results.md", "config.yaml", "plots/roc_lared.png"} <= set(rec["artifacts"])
    md = (run / "results.md").read_text()
    best = table[table.ood == "digits"]["auroc"].max()
    assert f"**{best:.4f}**" in md
    assert "mlflow ui --backend-store-uri" in logs["evaluate"].stdout
    assert "lared" in logs["evaluate"].stdout and "AUROC" in logs["evaluate"].stdout


def test_run_skips_complete_stages(pipeline):
    work, out, _ = pipeline
    p = cli("larex-run", *tiny(out), cwd=work)
    for stage in ("train", "extract", "aggregate", "evaluate"):
        assert f"[{stage}] up to date" in p.stdout, p.stdout


def test_unknown_layer_fails_before_compute_with_close_names(pipeline, tmp_path):
    work, _, _ = pipeline
    p = cli("larex-run", *tiny(tmp_path / "o"), "hooked_layer.path=blok3", cwd=work, check=False)
    assert p.returncode != 0
    assert "block3" in p.stderr + p.stdout
    assert not (tmp_path / "o" / "classification").exists()  # nothing trained or written


def test_missing_data_root_is_named(pipeline, tmp_path):
    work, _, _ = pipeline
    p = cli("larex-train", *tiny(tmp_path / "o"), f"dataset.root={tmp_path}/nowhere", cwd=work, check=False)
    assert p.returncode != 0
    assert f"{tmp_path}/nowhere" in p.stderr + p.stdout


def test_help_cfg_job_and_multirun(pipeline):
    work, out, _ = pipeline
    helptext = cli("larex-run", "--help", cwd=work).stdout
    for group in ("dataset", "model", "hooked_layer", "postprocessor", "ood", "experiment"):
        assert group in helptext
    job = cli("larex-extract", "--cfg", "job", "model=resnet18", "dataset=cifar10",
              "hooked_layer=resnet18_layer3", cwd=work).stdout
    assert "resnet18" in job and "cifar10" in job
    p = cli("larex-evaluate", "-m", *tiny(out), "postprocessor=lared,larem", cwd=work)
    assert p.stdout.count("MLflow run") == 2
    from larex.tracking import list_runs

    runs = list_runs(f"sqlite:///{out}/mlflow.db", "larex")
    children = [r for r in runs if "larex.job" in r["tags"]]
    assert len(children) == 2 and {r["tags"]["larex.job"] for r in children} == {"0", "1"}
    parents = {r["tags"]["mlflow.parentRunId"] for r in children}
    assert len(parents) == 1 and parents <= {r["run_id"] for r in runs}  # one parent run per sweep


def test_baselines_stage_and_missing_feature_error(pipeline, tmp_path):
    """A baseline needing a feature that was not extracted fails before any compute, naming the key and the
    extraction option; with the feature present, larex-baselines writes its scores."""
    work, out, _ = pipeline
    p = cli("larex-baselines", *tiny(out), "baselines=[msp,knn]", cwd=work)
    run = out / "classification" / "fashion_mnist" / "small_cnn" / "dropblock"
    msp = pd.read_parquet(run / "scores" / "msp.parquet")
    assert set(msp["split"]) == {"val", "test", *(f"ood/{o}" for o in OODS)}
    assert "knn" in p.stdout
    lean = [*tiny(tmp_path / "o"), "extract.features=[latent,labels]", "limit.fit=64", "limit.val=64",
            "limit.test=64", "limit.ood=32", "train.limit.fit=256", "train.limit.val=64"]
    cli("larex-train", *lean, cwd=work)
    cli("larex-extract", *lean, cwd=work)
    bad = cli("larex-baselines", *lean, "baselines=[msp]", cwd=work, check=False)
    assert bad.returncode != 0
    text = bad.stdout + bad.stderr
    assert "'logits'" in text and "extract.features" in text
    assert not (tmp_path / "o" / "classification" / "fashion_mnist" / "small_cnn" / "dropblock" / "scores").exists()


def test_interrupted_extraction_resumes_at_first_missing_shard(pipeline):
    """Simulate a crash after the first shard of the fit split: larex-extract redoes only the rest, and the
    resumed shards are byte-identical to the uninterrupted run's."""
    from larex import io

    work, out, _ = pipeline
    split = out / "classification" / "fashion_mnist" / "small_cnn" / "dropblock" / "extract" / "fit"
    manifest = io.read_manifest(split)
    original = {s["file"]: (split / s["file"]).read_bytes() for s in manifest["shards"]}
    assert len(original) == 3
    for s in manifest["shards"][1:]:
        (split / s["file"]).unlink()
    io.write_json(split / io.MANIFEST, {**manifest, "complete": False, "shards": manifest["shards"][:1],
                                        "rows": manifest["shards"][0]["rows"]})
    p = cli("larex-extract", *tiny(out), cwd=work)
    assert "fit: resuming at row 128/300" in p.stdout
    assert "val:" not in p.stdout  # complete splits are skipped
    resumed = io.read_manifest(split)
    assert resumed["complete"] is True and resumed["rows"] == 300
    for name, data in original.items():
        assert (split / name).read_bytes() == data, name
