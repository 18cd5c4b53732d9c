"""larex-report (larex.reporting.sweep, larex.stages.report): one long table of a sweep's metrics from a sweep
folder, an output tree or MLflow, the swept parameters detected, the metric pivot and its heatmap / line PNG."""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from _cli import cli, layer_dir, only, tiny
from larex import io, tracking
from larex.reporting import sweep

ROOT = Path(__file__).resolve().parents[1]
PCA = [16, 4]          # written in this order: the table must order them as numbers (4 before 16)
BW = [0.5, "scott"]
OODS = ["far", "near"]
METHODS = ["lared", "larem"]
PARAMS = ["postprocessor.lared.pca", "postprocessor.lared.bandwidth"]


def _auroc(method: str, pca: int, bw, ood: str) -> float:
    """Known metric values: lared depends on both swept parameters, larem on pca only."""
    far = 0.05 if ood == "far" else 0.0
    if method == "lared":
        return 0.5 + pca / 100 + (0.2 if bw == "scott" else 0.1) + far
    return 0.4 + pca / 100 + far


def _expected_auroc(method: str, pca: int, bw, ood: str) -> float:
    if ood == "mean":
        return float(np.mean([_auroc(method, pca, bw, o) for o in OODS]))
    return _auroc(method, pca, bw, ood)


def _metrics(pca: int, bw) -> pd.DataFrame:
    """A metrics.csv as larex-evaluate writes it: rows per (method, OOD set), then one mean row per method."""
    rows = [{"ood": o, "method": m, "auroc": _auroc(m, pca, bw, o), "aupr_in": 0.9, "aupr_out": 0.8,
             "fpr95": 1 - _auroc(m, pca, bw, o), "fpr95_ood": 0.3, "threshold": -float(pca)}
            for m in METHODS for o in OODS]
    df = pd.DataFrame(rows)
    mean = df.groupby("method", sort=False)[["auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_ood"]].mean()
    mean = mean.reset_index()
    mean.insert(0, "ood", "mean")
    return pd.concat([df, mean], ignore_index=True)


def _config(root: Path, pca: int, bw, threads: int = 1, run_name: str = "r") -> dict:
    return {"output_root": str(root), "seed": 0, "threads": threads, "progress": False,
            "dataset": {"name": "digits"},
            "postprocessor": {"lared": {"pca": pca, "bandwidth": bw, "features": ["entropy"]},
                              "larem": {"pca": "auto", "shrinkage": None}},
            "evaluate": {"tpr": 0.95}, "tracking": {"run_name": run_name, "uri": None}}


def _evaluation(directory: Path, config: dict, metrics: pd.DataFrame, val: pd.DataFrame | None = None) -> Path:
    directory.mkdir(parents=True)
    metrics.to_csv(directory / "metrics.csv", index=False)
    if val is not None:
        val.to_csv(directory / "val_metrics.csv", index=False)
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    (directory / "evaluate.json").write_text(json.dumps({"config_hash": directory.name}))
    return directory


def _job(sweep_dir: Path, job: int, evaluate_dir: Path, overrides: list[str]) -> None:
    d = sweep_dir / str(job)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    (d / sweep.JOB_POINTER).write_text(json.dumps({"evaluate_dir": str(evaluate_dir), "config_hash": "h",
                                                   "job": str(job), "overrides": " ".join(overrides)}))


def _grid_sweep(tmp_path: Path) -> Path:
    """A 2x2 sweep folder (pca x bandwidth, jobs 0..3 in product order) and a failed job 4 without a pointer."""
    out = tmp_path / "outputs"
    sweep_dir = out / "hydra" / "multirun" / "2026-01-01_00-00-00"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    for job, (pca, bw) in enumerate(itertools.product(PCA, BW)):
        ev = _evaluation(out / "layer" / f"evaluate-{job}", _config(out, pca, bw), _metrics(pca, bw))
        _job(sweep_dir, job, ev, [f"output_root={out}", "dataset=digits", r"tracking.uri=sqlite\:///x.db",
                                  f"postprocessor.lared.pca={pca}", f"postprocessor.lared.bandwidth={bw}"])
    (sweep_dir / "4" / ".hydra").mkdir(parents=True)
    return sweep_dir


def _expected_rows(jobs) -> list[tuple]:
    """(run, pca, bw, method, ood) in the report's order: by job, method, OOD set with the mean last."""
    return [(str(j), pca, bw, m, o) for j, (pca, bw) in jobs for m in METHODS for o in [*OODS, "mean"]]


# ------------------------------------------------------------------------------------------- values and overrides
def test_typed_values_and_parsed_overrides():
    assert [sweep.typed(v) for v in ["4", "-2", "0.5", "1e-3", ".5", "true", "False", "null", "None", "auto",
                                     None, 3, ["a", "b"], "[a,b]"]] == \
        [4, -2, 0.5, 0.001, 0.5, True, False, "null", "null", "auto", "null", 3, "['a', 'b']", "[a,b]"]
    over = sweep.parse_overrides([r"tracking.uri=sqlite\:////tmp/x.db", "+ood=[a,b]", "++seed=3", "~limit.fit",
                                  "estimator=knn", "evaluate.tpr=0.9", "tracking.run_name='my run'"])
    assert over == {"tracking.uri": "sqlite:////tmp/x.db", "ood": "[a,b]", "seed": 3, "limit.fit": "null",
                    "estimator": "knn", "evaluate.tpr": 0.9, "tracking.run_name": "my run"}
    assert sweep.parse_overrides("a.b=4 c=x") == {"a.b": 4, "c": "x"}
    assert sweep.ordered([16, "scott", 4, 0.5, "auto", 4]) == [0.5, 4, 16, "auto", "scott"]


# ------------------------------------------------------------------------------------------- sweep folder
def test_sweep_folder_gives_every_jobs_rows_with_the_swept_overrides(tmp_path):
    sweep_dir = _grid_sweep(tmp_path)
    table = sweep.collect_folder(sweep_dir)
    assert list(table.columns) == ["run", "source", *PARAMS, "method", "ood", "auroc", "aupr_in", "aupr_out",
                                   "fpr95", "fpr95_ood", "threshold"]
    assert sweep.table_params(table) == PARAMS  # the constant overrides (output_root, dataset, uri) are not swept
    jobs = list(enumerate(itertools.product(PCA, BW)))
    assert list(table[["run", *PARAMS, "method", "ood"]].itertuples(index=False, name=None)) == _expected_rows(jobs)
    want = [_expected_auroc(m, pca, bw, o) for _, (pca, bw) in jobs for m in METHODS for o in [*OODS, "mean"]]
    np.testing.assert_allclose(table["auroc"], want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(table["fpr95"][table["ood"] != "mean"],
                               [1 - _auroc(m, pca, bw, o) for _, (pca, bw) in jobs for m in METHODS for o in OODS])
    assert table["postprocessor.lared.pca"].dtype.kind == "i"  # typed back: ints, not strings
    assert set(table["source"]) == {str(tmp_path / "outputs" / "layer" / f"evaluate-{j}") for j in range(4)}
    assert table.loc[table["ood"] == "mean", "threshold"].isna().all()


def test_sweep_folder_group_choices_ignored_keys_and_a_shared_evaluation(tmp_path):
    out = tmp_path / "outputs"
    sweep_dir = out / "sweep"
    shared = _evaluation(out / "evaluate-shared", _config(out, 4, 0.5), _metrics(4, 0.5))
    other = _evaluation(out / "evaluate-other", _config(out, 16, 0.5), _metrics(16, 0.5))
    # estimator is a config group (no `estimator` key in the config), threads a bookkeeping key, and jobs 0 and 1
    # differ only in extract.batch_size, which does not change the evaluation they share
    _job(sweep_dir, 0, shared, ["estimator=knn", "threads=1", "extract.batch_size=64"])
    _job(sweep_dir, 1, shared, ["estimator=knn", "threads=2", "extract.batch_size=128"])
    _job(sweep_dir, 2, other, ["estimator=gaussian", "threads=1", "extract.batch_size=64"])
    table = sweep.collect_folder(sweep_dir)
    assert sweep.table_params(table) == ["estimator", "extract.batch_size"]
    per_run = table.drop_duplicates("run").set_index("run")
    assert per_run["estimator"].to_dict() == {"0": "knn", "1": "knn", "2": "gaussian"}
    assert per_run["extract.batch_size"].to_dict() == {"0": 64, "1": 128, "2": 64}  # the job's value, not config's
    assert per_run["source"].to_dict() == {"0": str(shared), "1": str(shared), "2": str(other)}
    assert len(table) == 3 * len(METHODS) * 3


def test_sweep_folder_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; give a Hydra sweep folder"):
        sweep.collect_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no evaluations under .*empty: looked for job folders .*"
                                                 r"larex_evaluate.json .* metrics.csv, config.yaml, evaluate.json"):
        sweep.collect_folder(tmp_path / "empty")
    failed = tmp_path / "failed"
    (failed / "0" / ".hydra").mkdir(parents=True)
    (failed / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(FileNotFoundError, match=r"no evaluations in the sweep folder .* rerun the sweep"):
        sweep.collect_folder(failed)
    moved = tmp_path / "moved"
    _job(moved, 0, tmp_path / "gone" / "evaluate-x", ["a=1"])
    with pytest.raises(FileNotFoundError, match=r"names the evaluation .*evaluate-x, which does not exist"):
        sweep.collect_folder(moved)
    sweep_dir = _grid_sweep(tmp_path / "grid")
    with pytest.raises(FileNotFoundError, match=r"val_metrics.csv does not exist.*set evaluate.val_ood"):
        sweep.collect_folder(sweep_dir, split="val")
    with pytest.raises(ValueError, match=r"params=\['nope.key'\]: not a config key or override.*detected swept "
                                         r"parameters: \['postprocessor.lared.pca', 'postprocessor.lared.bandwidth'\]"):
        sweep.collect_folder(sweep_dir, params=["nope.key"])


# ------------------------------------------------------------------------------------------- output tree
def test_output_tree_finds_each_evaluation_once_and_detects_the_differing_config_keys(tmp_path):
    out = tmp_path / "outputs"
    layer = out / "classification" / "digits" / "small_cnn" / "dropblock"
    evs = []
    for i, pca in enumerate([8, 2, 32]):
        # output_root-like paths and run names differ too, but are bookkeeping; threads as well
        cfg = _config(tmp_path / f"root{i}", pca, 0.5, threads=i + 1, run_name=f"run{i}")
        evs.append(_evaluation(layer / f"evaluate-{i}", cfg, _metrics(pca, 0.5),
                               val=_metrics(pca, 0.5).assign(auroc=lambda d, p=pca: p / 100)))
    os.symlink(evs[0].name, layer / "latest")  # the layout's pointer: must not count twice
    (layer / "evaluate-incomplete").mkdir()
    _metrics(1, 0.5).to_csv(layer / "evaluate-incomplete" / "metrics.csv", index=False)  # no config / evaluate.json
    (evs[1] / "plots").mkdir()
    assert sweep.evaluation_dirs(out) == sorted(evs)
    table = sweep.collect_folder(out)
    assert sweep.table_params(table) == ["postprocessor.lared.pca"]
    assert list(table.drop_duplicates("run")["run"]) == ["evaluate-0", "evaluate-1", "evaluate-2"]
    lared_mean = table[(table["method"] == "lared") & (table["ood"] == "mean")]
    assert dict(zip(lared_mean["postprocessor.lared.pca"], lared_mean["auroc"])) == \
        pytest.approx({p: _expected_auroc("lared", p, 0.5, "mean") for p in [8, 2, 32]})
    val = sweep.collect_folder(out, split="val")
    np.testing.assert_allclose(val["auroc"], val["postprocessor.lared.pca"] / 100)
    # an evaluation folder alone: one evaluation, nothing swept
    single = sweep.collect_folder(evs[2])
    assert sweep.table_params(single) == [] and set(single["run"]) == {"evaluate-2"} and len(single) == 6
    # params= names keys to show even where they do not differ (or are bookkeeping)
    forced = sweep.collect_folder(out, params=["threads", "seed"])
    assert sweep.table_params(forced) == ["threads", "seed"]
    assert list(forced.drop_duplicates("run")["threads"]) == [1, 2, 3]


# ------------------------------------------------------------------------------------------- MLflow
def _flat_metrics(frame: pd.DataFrame) -> dict[str, float]:
    """What larex-evaluate logs: ``<ood>/<method>/<metric>`` (mean rows: the five metrics), plus keys that are no
    such rows (val/, id/, time/, a split figure ood/<set>/<k>)."""
    flat = {}
    for r in frame.to_dict("records"):
        for k, v in r.items():
            if k not in ("ood", "method") and not pd.isna(v):
                flat[f"{r['ood']}/{r['method']}/{k}"] = float(v)
    flat.update({"val/far/lared/auroc": 0.1, "id/test_accuracy": 0.9, "time/evaluate_s": 3.0,
                 "ood/far/no_object_share": 0.2})
    return flat


class _FakeStore:
    """list_runs / read_run of larex.tracking over an in-memory experiment (newest run first)."""

    def __init__(self):
        self.runs: list[dict] = []
        self.data: dict[str, dict] = {}

    def add(self, run_id: str, tags: dict, params: dict | None = None, metrics: dict | None = None) -> None:
        self.runs.insert(0, {"run_id": run_id, "name": "digits-small_cnn-dropblock", "tags": tags})
        self.data[run_id] = {"params": params or {}, "metrics": metrics or {}, "tags": tags, "artifacts": [],
                             "status": "FINISHED"}

    def list_runs(self, uri, experiment):
        assert uri == "sqlite:///fake.db"
        return list(self.runs) if experiment == "larex" else []

    def read_run(self, uri, run_id):
        return self.data[run_id]


def _params(config: dict) -> dict[str, str]:
    return {k: "null" if v is None else str(v) for k, v in tracking.flatten(config).items()}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The MLflow side of :func:`_grid_sweep`: a parent run, one child per job (job 0 logged twice: an older run
    with other metrics), and a run of another sweep."""
    fake = _FakeStore()
    monkeypatch.setattr(tracking, "list_runs", fake.list_runs)
    monkeypatch.setattr(tracking, "read_run", fake.read_run)
    sweep_dir = _grid_sweep(tmp_path)
    out = tmp_path / "outputs"
    fake.add("parent", {"larex.sweep_dir": str(sweep_dir)})
    fake.add("other-sweep-job", {"larex.stage": "evaluate", "mlflow.parentRunId": "other", "larex.job": "0",
                                 "larex.sweep_dir": "/elsewhere", "larex.run_dir": "/elsewhere/evaluate-9"},
             _params(_config(out, 64, 0.5)), _flat_metrics(_metrics(64, 0.5)))
    for job, (pca, bw) in enumerate(itertools.product(PCA, BW)):
        over = f"output_root={out} dataset=digits postprocessor.lared.pca={pca} postprocessor.lared.bandwidth={bw}"
        tags = {"larex.stage": "evaluate", "mlflow.parentRunId": "parent", "larex.job": str(job),
                "larex.sweep_dir": str(sweep_dir), "larex.overrides": over,
                "larex.run_dir": str(out / "layer" / f"evaluate-{job}")}
        if job == 0:
            fake.add("job0-old", tags, _params(_config(out, pca, bw)), _flat_metrics(_metrics(pca, bw).assign(auroc=0)))
        fake.add(f"job{job}", tags, _params(_config(out, pca, bw)), _flat_metrics(_metrics(pca, bw)))
    return fake, sweep_dir


def test_metric_rows_of_flat_mlflow_metrics():
    flat = {"near/lared/auroc": 0.7, "near/lared/fpr95": 0.4, "mean/lared/auroc": 0.75, "far/larem/auroc": 0.6,
            "val/near/lared/auroc": 0.55, "id/test_accuracy": 0.9, "time/evaluate_s": 2.0,
            "ood/near/no_object_share": 0.3}
    rows = sweep.metric_rows(flat).sort_values(["method", "ood"], ignore_index=True)
    assert list(rows.columns) == ["method", "ood", "auroc", "fpr95"]
    assert list(rows[["method", "ood"]].itertuples(index=False, name=None)) == \
        [("lared", "mean"), ("lared", "near"), ("larem", "far")]
    assert rows["auroc"].tolist() == [0.75, 0.7, 0.6]
    assert np.isnan(rows["fpr95"][0]) and rows["fpr95"][1] == 0.4
    val = sweep.metric_rows(flat, split="val")
    assert val.to_dict("records") == [{"method": "lared", "ood": "near", "auroc": 0.55}]


def test_mlflow_table_equals_the_sweep_folder_table(store):
    _, sweep_dir = store
    folder = sweep.collect_folder(sweep_dir)
    for kw in ({"parent_run": "parent"}, {"sweep_dir": sweep_dir}):
        table = sweep.collect_mlflow("sqlite:///fake.db", "larex", **kw)
        # job 0 was logged twice (a forced rerun): its newest run counts, the older one (auroc 0) not
        assert list(table.drop_duplicates("run")["source"]) == ["job0", "job1", "job2", "job3"]
        pd.testing.assert_frame_equal(table.drop(columns="source"), folder.drop(columns="source"))
    # without a filter: two sweeps, so runs are labelled by run id; the other sweep's job adds pca=64
    every = sweep.collect_mlflow("sqlite:///fake.db", "larex")
    assert list(every.drop_duplicates("run")["run"]) == ["other-sweep-job", "job0", "job1", "job2", "job3"]
    assert sorted(set(every["postprocessor.lared.pca"])) == [4, 16, 64]


def test_mlflow_errors_name_the_problem_and_the_fix(store):
    fake, _ = store
    with pytest.raises(ValueError, match=r"experiment 'nope' at sqlite:///fake.db does not exist or has no runs"):
        sweep.collect_mlflow("sqlite:///fake.db", "nope")
    with pytest.raises(ValueError, match=r"none of the evaluate runs .* has parent run abc; check report.parent_run"):
        sweep.collect_mlflow("sqlite:///fake.db", "larex", parent_run="abc")
    val = sweep.collect_mlflow("sqlite:///fake.db", "larex", parent_run="parent", split="val")
    assert list(val[["run", "method", "ood", "auroc"]].itertuples(index=False, name=None)) == \
        [(str(j), "lared", "far", 0.1) for j in range(4)]
    del fake.data["job1"]["metrics"]["val/far/lared/auroc"]
    with pytest.raises(ValueError, match=r"MLflow run job1 .* has no val metrics .*set evaluate.val_ood"):
        sweep.collect_mlflow("sqlite:///fake.db", "larex", parent_run="parent", split="val")
    fake.runs = [r for r in fake.runs if r["run_id"] == "parent"]
    with pytest.raises(ValueError, match=r"has 1 run\(s\) but none from larex-evaluate \(tag larex.stage=evaluate\)"):
        sweep.collect_mlflow("sqlite:///fake.db", "larex")


# ------------------------------------------------------------------------------------------- pivot, figure, tables
def test_metric_pivot_orders_values_and_checks_metric_method_ood(tmp_path):
    table = sweep.collect_folder(_grid_sweep(tmp_path))
    pivot = sweep.metric_pivot(table)
    assert list(pivot.index) == [(4, 0.5), (4, "scott"), (16, 0.5), (16, "scott")]
    assert list(pivot.index.names) == PARAMS and list(pivot.columns) == METHODS
    for (pca, bw), row in pivot.iterrows():
        assert row.to_dict() == pytest.approx({m: _expected_auroc(m, pca, bw, "mean") for m in METHODS})
    near = sweep.metric_pivot(table, "fpr95", "larem", "near")
    assert list(near.columns) == ["larem"]
    assert near["larem"].tolist() == pytest.approx([1 - _auroc("larem", p, b, "near") for p, b in near.index])
    # one parameter named: larem (pca only) agrees within each pca, lared (both) does not
    by_pca = sweep.long_table(sweep.read_folder(tmp_path / "outputs" / "hydra" / "multirun" / "2026-01-01_00-00-00"),
                              params=["postprocessor.lared.pca"])
    assert sweep.metric_pivot(by_pca, method="larem")["larem"].to_dict() == \
        pytest.approx({4: _expected_auroc("larem", 4, 0.5, "mean"), 16: _expected_auroc("larem", 16, 0.5, "mean")})
    with pytest.raises(ValueError, match=r"runs \['0', '1'\] share postprocessor.lared.pca=16 but their auroc of "
                                         r"lared differs.*report.params"):
        sweep.metric_pivot(by_pca)
    with pytest.raises(ValueError, match=r"metric 'acc' is not a column of the report; available: \['auroc', "
                                         r"'aupr_in', 'aupr_out', 'fpr95', 'fpr95_ood', 'threshold'\]"):
        sweep.metric_pivot(table, "acc")
    with pytest.raises(ValueError, match=r"method 'msp' not in the report; available: \['lared', 'larem'\]"):
        sweep.metric_pivot(table, method="msp")
    with pytest.raises(ValueError, match=r"ood 'cifar' not in the report; available: \['far', 'near', 'mean'\]"):
        sweep.metric_pivot(table, ood="cifar")


def _png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_heatmap_per_method_and_line_plot(tmp_path):
    sweep_dir = _grid_sweep(tmp_path)
    table = sweep.collect_folder(sweep_dir)
    w2, _ = _png(sweep.sweep_figure(table, tmp_path / "both.png"))
    w1, h1 = _png(sweep.sweep_figure(table, tmp_path / "one.png", method="lared"))
    assert w2 > w1 * 1.4 and min(w1, h1) > 100  # one heatmap panel per method
    line = sweep.long_table(sweep.read_folder(sweep_dir), params=["postprocessor.lared.pca"])
    w, h = _png(sweep.sweep_figure(line, tmp_path / "line.png", method="larem"))
    assert w > 200 and h > 150
    # one parameter with a string value (bandwidth 0.5 / scott): a categorical axis
    fixed = [e for e in sweep.read_folder(sweep_dir) if e.overrides["postprocessor.lared.pca"] == 4]
    by_bw = sweep.long_table(fixed)
    assert sweep.table_params(by_bw) == ["postprocessor.lared.bandwidth"]
    _png(sweep.sweep_figure(by_bw, tmp_path / "bw.png"))


def test_figure_refuses_nothing_swept_and_more_than_two_parameters(tmp_path):
    sweep_dir = _grid_sweep(tmp_path)
    evals = sweep.read_folder(sweep_dir)
    with pytest.raises(ValueError, match=r"nothing was swept: .*report.params=\[a.b,c.d\].*report.plot=false"):
        sweep.sweep_figure(sweep.long_table(evals[:1]), tmp_path / "x.png")
    three = sweep.long_table(evals, params=[*PARAMS, "seed"])
    with pytest.raises(ValueError, match=r"3 parameters were swept \(postprocessor.lared.pca, "
                                         r"postprocessor.lared.bandwidth, seed\); the figure shows 1 or 2: pass "
                                         r"report.params=\[p1,p2\]"):
        sweep.sweep_figure(three, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    # the tables need no figure: one row per combination of the three
    assert len(sweep.metric_pivot(three)) == 4


def test_markdown_and_rich_tables_mark_the_best_per_method(tmp_path):
    from rich.console import Console

    table = sweep.collect_folder(_grid_sweep(tmp_path))
    pivot = sweep.metric_pivot(table)
    md = sweep.report_markdown(table, pivot, "auroc", "mean", "my sweep")
    lines = md.splitlines()
    assert lines[0] == "# Sweep report: my sweep"
    assert "4 evaluation(s); swept: `postprocessor.lared.pca`, `postprocessor.lared.bandwidth`." in lines
    best_lared = _expected_auroc("lared", 16, "scott", "mean")
    best_larem = _expected_auroc("larem", 16, 0.5, "mean")
    assert f"| 16 | scott | **{best_lared:.4f}** | **{best_larem:.4f}** |" in lines
    assert f"| 4 | 0.5 | {_expected_auroc('lared', 4, 0.5, 'mean'):.4f} | " \
           f"{_expected_auroc('larem', 4, 0.5, 'mean'):.4f} |" in lines
    every = lines[lines.index("## Every evaluation") + 2:]
    assert every[0] == ("| run | postprocessor.lared.pca | postprocessor.lared.bandwidth | method | ood | auroc | "
                        "aupr_in | aupr_out | fpr95 | fpr95_ood |")
    assert len([x for x in every[2:] if x.startswith("|")]) == len(table)
    console = Console(record=True, width=200, color_system=None)
    console.print(sweep.pivot_rich(pivot, "auroc", "mean", "4 evaluation(s)"))
    text = console.export_text()
    assert "auroc ↑ on mean" in text and f"{best_lared:.4f}" in text and "scott" in text


# ------------------------------------------------------------------------------------------- the stage
def _cfg(**report):
    cfg = OmegaConf.load(ROOT / "configs" / "report.yaml")
    for key in ("defaults", "hydra"):
        del cfg[key]
    return OmegaConf.merge(cfg, {"report": report})


def test_stage_writes_csv_markdown_png_and_checks_before_writing(tmp_path, capsys):
    from larex.stages import common, report

    sweep_dir = _grid_sweep(tmp_path)
    table = report.run(_cfg(sweep=str(sweep_dir)))
    out = sweep_dir / "report"
    assert sorted(p.name for p in out.iterdir()) == ["auroc.png", "report.csv", "report.md"]
    assert (out / "report.csv").read_text() == table.to_csv(index=False)
    assert len(table) == 4 * 2 * 3 and sweep.table_params(table) == PARAMS
    assert (out / "report.md").read_text().startswith(f"# Sweep report: {sweep_dir.resolve()}")
    _png(out / "auroc.png")
    assert "auroc ↑ on mean" in capsys.readouterr().out
    # explicit output, a lower-is-better metric of one method on one set
    report.run(_cfg(sweep=str(sweep_dir), out=str(tmp_path / "r"), metric="fpr95", method="larem", ood="near",
                    params=["postprocessor.lared.pca"]))
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["fpr95.png", "report.csv", "report.md"]
    # errors come before any file is written
    for bad, match in (({"metric": "acc"}, "metric 'acc'"), ({"params": [*PARAMS, "seed"]}, "3 parameters"),
                       ({"ood": "x"}, "ood 'x'")):
        with pytest.raises(ValueError, match=match):
            report.run(_cfg(sweep=str(sweep_dir), out=str(tmp_path / "bad"), **bad))
        assert not (tmp_path / "bad").exists()
    # tables only: any number of parameters
    report.run(_cfg(sweep=str(sweep_dir), out=str(tmp_path / "three"), params=[*PARAMS, "seed"], plot=False))
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == ["report.csv", "report.md"]
    with pytest.raises(common.ConfigError, match=r"needs report.sweep=FOLDER .* or report.experiment=NAME"):
        report.run(_cfg())
    with pytest.raises(FileNotFoundError, match=r"tracking.uri=sqlite:///.*nope.db: no such SQLite store"):
        report.run(OmegaConf.merge(_cfg(experiment="larex"), {"tracking": {"uri": f"sqlite:///{tmp_path}/nope.db"}}))
    with pytest.raises(tracking.TrackingUnavailableError, match=r"MLflow tracking server http://127.0.0.1:9 is "
                                                                r"unreachable"):
        report.run(OmegaConf.merge(_cfg(experiment="larex"), {"tracking": {"uri": "http://127.0.0.1:9"}}))


def test_stage_reads_mlflow_into_reports_of_the_output_root(store, tmp_path, monkeypatch):
    from larex.stages import report

    _, sweep_dir = store
    (tmp_path / "fake.db").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.merge(_cfg(experiment="larex", parent_run="parent"),
                          {"tracking": {"uri": "sqlite:///fake.db"}, "output_root": str(tmp_path / "outputs")})
    table = report.run(cfg)
    out = tmp_path / "outputs" / "reports" / "larex"
    assert sorted(p.name for p in out.iterdir()) == ["auroc.png", "report.csv", "report.md"]
    pd.testing.assert_frame_equal(table.drop(columns="source"),
                                  sweep.collect_folder(sweep_dir).drop(columns="source"))


# ------------------------------------------------------------------------------------------- console scripts
def test_cli_error_is_one_line(tmp_path):
    p = cli("larex-report", f"report.sweep={tmp_path / 'missing'}", cwd=tmp_path, check=False)
    assert p.returncode == 1
    message = (f"larex-report: error: {tmp_path / 'missing'} does not exist; give a Hydra sweep folder "
               "(<output_root>/hydra/multirun/<time>) or an output root")
    assert p.stderr.strip().splitlines() == [message]
    assert sorted(tmp_path.iterdir()) == []  # no .hydra/ or log file where it was launched


@pytest.mark.slow  # make test: test_sweeps.py reports its 2 x 2 sweep from the folder
def test_report_of_a_real_sweep_from_its_folder_and_from_mlflow(tmp_path):
    out = tmp_path / "outputs"
    cli("larex-run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *tiny(out, "digits", s=4),
        "limit.fit=200", "limit.test=100", "limit.ood=64", "evaluate.plots=false", "threads=1", "model.train.epochs=1",
        "postprocessor=lared", "postprocessor.lared.pca=4,8", "postprocessor.lared.bandwidth=0.5,2", cwd=tmp_path)
    sweep_dir = only((out / "hydra" / "multirun").iterdir())
    before = sorted(p.name for p in sweep_dir.iterdir())
    cli("larex-report", f"report.sweep={sweep_dir}", cwd=tmp_path)
    assert sorted(p.name for p in sweep_dir.iterdir()) == sorted([*before, "report"])  # no hydra clutter
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
    table = pd.read_csv(sweep_dir / "report" / "report.csv")
    swept = ["postprocessor.lared.pca", "postprocessor.lared.bandwidth"]
    assert list(table.columns[2:4]) == swept and list(table.columns[4:6]) == ["method", "ood"]
    # independently: every job's own overrides and metrics.csv
    expected, run_ids = [], set()
    for job in sorted(p for p in sweep_dir.iterdir() if p.name.isdigit()):
        over = dict(o.split("=", 1) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        ev = Path(io.read_json(job / "larex_evaluate.json")["evaluate_dir"])
        assert ev.parent == layer_dir(out, "digits")
        run_ids.add(io.read_json(ev / "evaluate.json")["mlflow_run_id"])
        m = pd.read_csv(ev / "metrics.csv")
        expected.append(m.assign(run=int(job.name), **{p: float(over[p]) for p in swept})[
            ["run", *swept, "method", "ood", "auroc"]])
    expected = pd.concat(expected)
    assert len(table) == 4 * 1 * 4 == len(expected)  # 4 jobs x {lared} x (3 OOD sets + mean)
    assert sorted(set(zip(table[swept[0]], table[swept[1]]))) == [(4, 0.5), (4, 2), (8, 0.5), (8, 2)]
    merged = table.merge(expected, on=["run", *swept, "method", "ood"], suffixes=("", "_job"), validate="1:1")
    assert len(merged) == 16
    np.testing.assert_array_equal(merged["auroc"], merged["auroc_job"])
    _png(sweep_dir / "report" / "auroc.png")
    assert "postprocessor.lared.pca" in (sweep_dir / "report" / "report.md").read_text()

    parent = io.read_json(sweep_dir / "mlflow_parent.json")["run_id"]
    cli("larex-report", "report.experiment=larex", f"tracking.uri=sqlite:///{out}/mlflow.db",
        f"report.parent_run={parent}", f"output_root={out}", cwd=tmp_path)
    ml = pd.read_csv(out / "reports" / "larex" / "report.csv")
    assert set(ml["source"]) == run_ids  # one MLflow run per job, the ones the evaluations recorded
    pd.testing.assert_frame_equal(ml.drop(columns="source"), table.drop(columns="source"))
    _png(out / "reports" / "larex" / "auroc.png")
