"""End to end through the console scripts on a tiny subset of real data (Debian's Fashion-MNIST where installed,
scikit-learn's bundled digits otherwise): output layout, extraction planned from the methods, skipping of
complete stages, shard integrity and repair, MLflow run contents, config composition, early errors. Runs the
scripts from a temp working directory (configs must resolve from the installed package) with sockets blocked."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from _cli import DATASET, OODS, cli, expected_rows, latest, layer_dir, only, part_dirs, tiny

S = 6


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the four stages one by one, as a user would (default methods: LaRED + LaREM)."""
    work = tmp_path_factory.mktemp("work")
    out = work / "outputs"
    logs = {name: cli(f"larex-{name}", *tiny(out), cwd=work) for name in ("train", "extract", "aggregate", "evaluate")}
    return work, out, logs


def test_output_layout_and_latent_only_plan(pipeline):
    """Every stage folder is keyed by its hash; LaRED + LaREM plan the MC latents (and labels) only."""
    from larex import io

    _, out, _ = pipeline
    layer = layer_dir(out)
    ckpt = only(layer.parent.glob("checkpoint-*"))
    assert io.read_manifest(ckpt)["complete"] is True
    extract, aggregate = only(layer.glob("extract-*")), only(layer.glob("aggregate-*"))
    for split, n in expected_rows().items():
        parts = part_dirs(extract / split)
        assert set(parts) == {"mc", "labels"}  # no logits, MC logits, penultimate: no method reads them
        m = io.read_manifest(parts["mc"])
        assert m["complete"] is True and m["rows"] == n and set(m["keys"]) == {"latent"}
        assert m["shard_size"] == 128 and len(m["shards"]) == -(-n // 128)
        assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in m["shards"])
        lat = m["keys"]["latent"]["shape"]
        assert lat[:2] == [n, S]
        agg = io.load_arrays(aggregate / f"{split}.safetensors")
        assert agg["entropy"].shape == (n, lat[2]) and agg["entropy"].dtype == np.float64
    labels = io.read_features(part_dirs(extract / f"ood/{OODS[0]}")["labels"], ["labels"])["labels"]
    assert (labels == -1).all()
    ev = latest(out)
    assert ev.parent == layer and ev.name.startswith("evaluate-")
    assert (ev / "plots" / "roc_lared.png").is_file() and (ev / "config.yaml").is_file()
    assert os.readlink(layer / "latest") == ev.name
    index = io.read_json(layer / "index.json")
    assert [e["stage"] for e in index] == ["train", "extract", "aggregate", "evaluate"]
    assert index[-1]["methods"] == ["lared", "larem"] and f"dataset={DATASET}" in index[-1]["overrides"]


def test_aggregate_matches_entropy_of_extracted_latents(pipeline):
    """The default estimator (gaussian): 1/2 log(2 pi e var) of each latent dimension over the S samples."""
    from larex import io

    _, out, _ = pipeline
    layer = layer_dir(out)
    lat = io.read_features(part_dirs(only(layer.glob("extract-*")) / "val")["mc"], ["latent"])["latent"]
    agg = io.load_arrays(only(layer.glob("aggregate-*")) / "val.safetensors")["entropy"]
    sd = np.maximum(lat.astype(np.float64).std(axis=1, ddof=1), 1e-5)
    np.testing.assert_allclose(agg, 0.5 * np.log(2 * np.pi * np.e * sd ** 2), rtol=1e-12)


def test_reference_estimator_is_the_knn_entropy(pipeline):
    from larex import io
    from larex.entropy import knn_entropy

    work, out, _ = pipeline
    layer = layer_dir(out)
    cli("larex-aggregate", *tiny(out), "estimator=knn", cwd=work)
    lat = io.read_features(part_dirs(only(layer.glob("extract-*")) / "val")["mc"], ["latent"])["latent"]
    want = knn_entropy(lat.astype(np.float64)).numpy()
    got = [io.load_arrays(d / "val.safetensors")["entropy"] for d in layer.glob("aggregate-*")]
    assert any(g.shape == want.shape and np.allclose(g, want, rtol=0, atol=1e-12) for g in got)


def test_metrics_table_and_mlflow_run(pipeline):
    from larex import io
    from larex.metrics import ood_metrics
    from larex.tracking import read_run

    _, out, logs = pipeline
    ev = latest(out)
    table = pd.read_csv(ev / "metrics.csv")
    assert set(table["method"]) == {"lared", "larem"}
    assert set(table["ood"]) == {*OODS, "mean"}
    scores = pd.read_parquet(only(layer_dir(out).glob("scores/larem-*.parquet")))
    ids = scores.loc[scores.split == "test", "score"].to_numpy()
    far = OODS[-1]
    ood = scores.loc[scores.split == f"ood/{far}", "score"].to_numpy()
    row = table[(table.method == "larem") & (table.ood == far)].iloc[0]
    assert row["auroc"] == pytest.approx(ood_metrics(ids, ood)["auroc"], abs=1e-12)
    state = io.read_json(ev / "evaluate.json")
    rec = read_run(f"sqlite:///{out}/mlflow.db", state["mlflow_run_id"])
    for o in OODS:
        for m in ("lared", "larem"):
            for k in ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_ood", "threshold"):
                assert f"{o}/{m}/{k}" in rec["metrics"]
    assert rec["metrics"][f"{far}/larem/auroc"] == pytest.approx(row["auroc"])
    assert rec["params"]["hooked_layer.mc_samples"] == str(S)
    assert {"metrics.csv", "metrics.parquet", "results.md", "config.yaml", "plots/roc_lared.png"} <= set(rec["artifacts"])
    md = (ev / "results.md").read_text()
    best = table[table.ood == far]["auroc"].max()
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
    p = cli("larex-run", *tiny(tmp_path / "o"), "+ood=[image_folder]", f"ood.image_folder.root={tmp_path}/nowhere",
            cwd=work, check=False)
    assert p.returncode != 0
    assert f"{tmp_path}/nowhere" in p.stderr + p.stdout


def test_help_cfg_job_and_multirun(pipeline):
    work, out, _ = pipeline
    helptext = cli("larex-run", "--help", cwd=work).stdout
    for group in ("task", "dataset", "model", "hooked_layer", "postprocessor", "ood", "experiment"):
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
    # each job kept its own evaluation folder (one per postprocessor selection) beside the pipeline's
    assert len(list(layer_dir(out).glob("evaluate-*"))) >= 3


def test_added_baselines_extract_only_their_parts_and_missing_features_fail_early(pipeline, tmp_path):
    """Selecting baselines later adds their producers' parts and reuses the MC latents; a method whose features
    were not extracted fails before any compute, naming the command that produces them."""
    from larex import io

    work, out, _ = pipeline
    extract = only(layer_dir(out).glob("extract-*"))
    mc_before = {p: p.stat().st_mtime_ns for p in part_dirs(extract / "fit")["mc"].glob("shard-*")}
    bad = cli("larex-baselines", *tiny(out), "baselines=[msp]", cwd=work, check=False)
    assert bad.returncode != 0
    text = bad.stdout + bad.stderr
    assert "'logits'" in text and "larex-extract" in text
    cli("larex-extract", *tiny(out), "baselines=[msp,knn,mdist]", cwd=work)
    parts = part_dirs(extract / "fit")
    assert set(parts) == {"mc", "labels", "deterministic"}
    assert set(io.read_manifest(parts["deterministic"])["keys"]) == {"logits", "penultimate"}
    assert {p: p.stat().st_mtime_ns for p in parts["mc"].glob("shard-*")} == mc_before  # latents reused
    p = cli("larex-baselines", *tiny(out), "baselines=[msp,knn,mdist]", cwd=work)
    msp = pd.read_parquet(only(layer_dir(out).glob("scores/msp-*.parquet")))
    assert set(msp["split"]) == {"val", "test", *(f"ood/{o}" for o in OODS)}
    assert "knn" in p.stdout and "mdist" in p.stdout


def test_truncated_shard_is_named_and_repaired_alone(pipeline):
    """A truncated shard is noticed (not 'up to date'); reading it names the file and the repair command;
    larex-extract recomputes that shard only, byte-identical to the original."""
    from larex import io

    work, out, _ = pipeline
    mc = part_dirs(only(layer_dir(out).glob("extract-*")) / "fit")["mc"]
    shards = sorted(mc.glob("shard-*.safetensors"))
    assert len(shards) == 3
    original = {p.name: p.read_bytes() for p in shards}
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    os.truncate(shards[1], 1000)
    agg = cli("larex-aggregate", *tiny(out), "force=true", cwd=work, check=False)
    assert agg.returncode != 0
    text = agg.stdout + agg.stderr
    assert shards[1].name in text and "larex-extract" in text and "Traceback" not in agg.stderr
    p = cli("larex-extract", *tiny(out), cwd=work)
    assert "fit: resuming" in p.stdout and "val:" not in p.stdout  # complete splits are skipped
    assert io.read_manifest(mc)["complete"] is True
    for s in shards:
        assert s.read_bytes() == original[s.name], s.name
    assert shards[0].stat().st_mtime_ns == stamps[shards[0].name]  # the good shards were not rewritten
    assert shards[2].stat().st_mtime_ns == stamps[shards[2].name]
    cli("larex-aggregate", *tiny(out), cwd=work)


VAL_OOD = "fmnist_holdout_val" if DATASET == "fashion_mnist" else "digits_holdout_val"


def test_estimator_feature_set_and_validation_ood(pipeline):
    """estimator=gaussian and LaRED on [entropy, latent_mean] reuse the extraction (only the validation OOD set is
    new); val_metrics.csv holds ID val vs the validation OOD set, recomputable from the cached scores."""
    from sklearn.metrics import roc_auc_score

    from larex import io

    work, out, _ = pipeline
    layer = layer_dir(out)
    extract = only(layer.glob("extract-*"))
    p = cli("larex-run", *tiny(out), "estimator=gaussian", "postprocessor=[lared]",  # gaussian: the default
            "postprocessor.lared.features=[entropy,latent_mean]", f"evaluate.val_ood=[{VAL_OOD}]", cwd=work)
    assert only(layer.glob("extract-*")) == extract
    extracted = [ln for ln in p.stdout.splitlines() if ln.startswith("[extract]") and "rows" in ln]
    assert len(extracted) == 1 and f"val_ood/{VAL_OOD}" in extracted[0]
    lat = io.read_features(part_dirs(extract / "val")["mc"], ["latent"])["latent"].astype(np.float64)
    agg_dir = next(d for d in layer.glob("aggregate-*") if set(io.load_arrays(d / "val.safetensors")) == {
        "entropy", "latent_mean"})
    agg = io.load_arrays(agg_dir / "val.safetensors")
    want = 0.5 * np.log(2 * np.pi * np.e * np.maximum(lat.std(axis=1, ddof=1), 1e-5) ** 2)
    np.testing.assert_allclose(agg["entropy"], want, rtol=1e-12)
    np.testing.assert_allclose(agg["latent_mean"], lat.mean(axis=1), rtol=0, atol=1e-12)
    ev = latest(out)
    val = pd.read_csv(ev / "val_metrics.csv")
    assert list(val["ood"]) == [VAL_OOD, "mean"] and list(val["method"]) == ["lared", "lared"]
    scores = next(df for df in map(pd.read_parquet, (layer / "scores").glob("lared-*.parquet"))
                  if f"val_ood/{VAL_OOD}" in set(df["split"]))
    id_s, ood_s = (scores.loc[scores["split"] == s, "score"].to_numpy() for s in ("val", f"val_ood/{VAL_OOD}"))
    want_auroc = roc_auc_score(np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))], np.r_[id_s, ood_s])
    assert val.loc[0, "auroc"] == pytest.approx(want_auroc, abs=1e-12)
    assert "## Validation" in (ev / "results.md").read_text()
    assert VAL_OOD not in set(pd.read_csv(ev / "metrics.csv")["ood"])  # never reported as a test result
    bad = cli("larex-run", *tiny(out), f"evaluate.val_ood=[{OODS[0]}]", cwd=work, check=False)
    assert bad.returncode == 1 and "also reported as OOD test sets" in bad.stdout + bad.stderr
