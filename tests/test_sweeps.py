"""Sweeps through the console scripts with the joblib launcher (2 jobs at once) on scikit-learn's bundled digits:
every job keeps its outputs, a repeated sweep recomputes nothing, and jobs that need the same extraction share it
(one extracts, the other waits on the claim and reuses it)."""
from __future__ import annotations

import re

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

    before = _stamps(layer)
    again = cli("larex-run", *sweep, cwd=tmp_path)
    assert _extraction_lines(again.stdout) == []
    assert again.stdout.count("[evaluate] up to date") == 4
    assert _stamps(layer) == before  # nothing rewritten


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
