"""Sweeps through the console scripts with the joblib launcher (2 jobs at once) on scikit-learn's bundled digits:
every job keeps its outputs, a repeated sweep recomputes nothing, and jobs that need the same extraction share it
(one extracts, the other waits on the claim and reuses it)."""
from __future__ import annotations

import re

import pytest

import pandas as pd
from omegaconf import OmegaConf

from _cli import cli, layer_dir, part_dirs, tiny
from larex import io

SPLITS = ["fit", "val", "test", "ood/digits_holdout", "ood/digits_shift", "ood/noise"]


def _tiny(out):
    return [*tiny(out, "digits", s=4), "limit.fit=200", "limit.ood=64", "evaluate.plots=false"]


def _stamps(layer):
    """mtime of every file a stage wrote (the index and the latest pointer are refreshed on every run)."""
    return {p: p.stat().st_mtime_ns for p in layer.parent.rglob("*")
            if p.is_file() and not p.name.startswith((".", "index.json", "latest"))}


def _extraction_lines(text: str) -> list[str]:
    return re.findall(r"\[extract\] (\S+): \d+ rows", text)


def test_joblib_sweep_keeps_every_job_and_a_rerun_recomputes_nothing(tmp_path):
    out = tmp_path / "outputs"
    sweep = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *_tiny(out),
             "hooked_layer.mc_samples=4,6", "evaluate.tpr=0.9,0.95"]
    first = cli("larex-run", *sweep, cwd=tmp_path)
    layer = layer_dir(out, "digits")
    evaluations = sorted(layer.glob("evaluate-*"))
    assert len(evaluations) == 4  # every job kept its own metrics, nothing overwritten
    settings = sorted((OmegaConf.load(e / "config.yaml").hooked_layer.mc_samples,
                       OmegaConf.load(e / "config.yaml").evaluate.tpr) for e in evaluations)
    assert settings == [(4, 0.9), (4, 0.95), (6, 0.9), (6, 0.95)]
    for e in evaluations:
        table = pd.read_csv(e / "metrics.csv")
        assert set(table["method"]) == {"lared", "larem"} and table["auroc"].between(0, 1).all()
    extract = [d for d in layer.glob("extract-*")]
    assert len(extract) == 1  # the rows and the model are the same: one extraction folder ...
    for split in SPLITS:
        mc = [d for d in (extract[0] / split).iterdir() if d.name.startswith("mc-")]
        assert len(mc) == 2  # ... with one MC part per S, each complete, none clobbered
        shapes = sorted(io.read_manifest(d)["keys"]["latent"]["shape"][1] for d in mc)
        assert shapes == [4, 6] and all(io.is_complete(d, verify="sha256") for d in mc)
    assert len(_extraction_lines(first.stdout)) == 2 * len(SPLITS)  # each (S, split) extracted exactly once
    index = io.read_json(layer / "index.json")
    overrides = sorted(e["overrides"] for e in index if e["stage"] == "evaluate")
    assert len(overrides) == 4 and all("hooked_layer.mc_samples=" in o and "evaluate.tpr=" in o for o in overrides)

    # larex-report of this sweep: 4 jobs x 2 methods x (3 OOD sets + mean), the two swept keys, each job's numbers
    (sweep_dir,) = (out / "hydra" / "multirun").iterdir()
    cli("larex-report", f"report.sweep={sweep_dir}", cwd=tmp_path)
    report = pd.read_csv(sweep_dir / "report" / "report.csv")
    assert list(report.columns[2:4]) == ["hooked_layer.mc_samples", "evaluate.tpr"] and len(report) == 4 * 2 * 4
    for e in evaluations:
        cfg = OmegaConf.load(e / "config.yaml")
        mine = report[(report["hooked_layer.mc_samples"] == cfg.hooked_layer.mc_samples)
                      & (report["evaluate.tpr"] == cfg.evaluate.tpr)]
        table = pd.read_csv(e / "metrics.csv")
        cols = ["method", "ood", "auroc", "fpr95"]
        pd.testing.assert_frame_equal(mine[cols].sort_values(cols[:2]).reset_index(drop=True),
                                      table[cols].sort_values(cols[:2]).reset_index(drop=True))
    assert (sweep_dir / "report" / "auroc.png").stat().st_size > 0

    before = _stamps(layer)
    again = cli("larex-run", *sweep, cwd=tmp_path)
    assert _extraction_lines(again.stdout) == []
    assert again.stdout.count("[evaluate] up to date") == 4
    assert _stamps(layer) == before  # nothing rewritten


@pytest.mark.slow  # make test: the submitit_local sweep below asserts the one shared extraction of such a sweep
def test_postprocessor_only_sweep_extracts_once(tmp_path):
    out = tmp_path / "outputs"
    p = cli("larex-run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *_tiny(out),
            "postprocessor=lared,larem", cwd=tmp_path)
    layer = layer_dir(out, "digits")
    lines = _extraction_lines(p.stdout)
    assert sorted(lines) == sorted(SPLITS)  # one job extracted every split, the other reused it
    assert p.stdout.count("[train]") >= 2 and p.stdout.count("val accuracy") == 1  # trained once
    for split in SPLITS:
        assert set(part_dirs(next(layer.glob("extract-*")) / split)) == {"mc", "labels"}
    assert len(list(layer.glob("evaluate-*"))) == 2
    assert len(list(layer.glob("aggregate-*"))) == 1


def test_optuna_sweep_returns_the_validation_objective_and_finds_its_best(tmp_path):
    """hydra/sweeper=optuna (in-memory storage): 4 trials over LaRED's bandwidth and PCA size; each job returns the
    mean AUROC of ID val vs the validation OOD set (val_metrics.csv), never a test figure; one extraction."""
    out = tmp_path / "outputs"
    p = cli("larex-run", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=1",
            "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0",
            "postprocessor.lared.bandwidth=choice(0.5,2.0)", "postprocessor.lared.pca=choice(4,8)",
            "evaluate.val_ood=[digits_holdout_val]", "postprocessor=[lared]", *_tiny(out), cwd=tmp_path)
    layer = layer_dir(out, "digits")
    values = {}
    for e in layer.glob("evaluate-*"):
        c = OmegaConf.load(e / "config.yaml").postprocessor.lared
        val = pd.read_csv(e / "val_metrics.csv")
        values[(float(c.bandwidth), int(c.pca))] = float(val[(val["ood"] == "mean")]["auroc"].iloc[0])
        test = pd.read_csv(e / "metrics.csv")
        assert set(test["ood"]) >= {"digits_holdout", "mean"}  # test sets are reported, not optimized
    (result,) = list((out / "hydra" / "multirun").glob("*/optimization_results.yaml"))
    best = OmegaConf.load(result)
    assert best.best_value == pytest.approx(max(values.values()), abs=1e-4)  # optuna rounds the printed value
    key = (float(best.best_params["postprocessor.lared.bandwidth"]), int(best.best_params["postprocessor.lared.pca"]))
    assert values[key] == max(values.values())
    assert len(list(layer.glob("extract-*"))) == 1 and len(_extraction_lines(p.stdout)) == len(SPLITS) + 1
    # without a validation OOD set the objective cannot be computed from ID val alone: one error, before compute
    bad = cli("larex-run", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1", "postprocessor=[lared]",
              *_tiny(tmp_path / "bad"), cwd=tmp_path, check=False)
    assert bad.returncode == 1 and "set evaluate.val_ood" in bad.stderr
    assert not (tmp_path / "bad" / "classification").exists()


def test_submitit_local_sweep_shares_one_extraction_and_nests_its_runs(tmp_path):
    """hydra/launcher=submitit_local (the Slurm launcher's local executor): two jobs of a postprocessor sweep run
    as separate processes, one extraction serves both, and MLflow has one parent run with a nested run per job."""
    from larex.tracking import list_runs

    out = tmp_path / "outputs"
    p = cli("larex-run", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15", "threads=1",
            "postprocessor=lared,larem", *_tiny(out), cwd=tmp_path)
    layer = layer_dir(out, "digits")
    assert len(list(layer.glob("extract-*"))) == 1 and len(list(layer.glob("evaluate-*"))) == 2
    (sweep,) = list((out / "hydra" / "multirun").iterdir())
    logs = "".join(f.read_text() for f in sweep.rglob("*_log.out"))
    assert sorted(_extraction_lines(logs)) == sorted(SPLITS)  # each split extracted once, by one of the jobs
    parent = io.read_json(sweep / "mlflow_parent.json")["run_id"]
    runs = list_runs(f"sqlite:///{out}/mlflow.db", "larex")
    nested = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parent]
    assert len(nested) == 2 and {r["tags"]["larex.job"] for r in nested} == {"0", "1"}
    assert p.returncode == 0


def test_slurm_launcher_config_sets_partition_gpus_time_array_and_memory(tmp_path):
    p = cli("larex-run", "--cfg", "hydra", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=2", "hydra.launcher.array_parallelism=4", cwd=tmp_path)
    launcher = OmegaConf.create(p.stdout).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 2, 4)
    assert launcher.timeout_min == 240 and launcher.mem_gb == 32
