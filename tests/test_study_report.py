"""The LaREx study report (larex.reporting.study, scripts/larex_study.py): collect jobs, choose on validation only."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from larex.reporting.study import axis_effects, choose, collect, estimator_label

ROOT = Path(__file__).resolve().parents[1]
OODS = ["fmnist_holdout", "noise"]


def _job(layer: Path, name: str, est: dict, s: int, val: dict[str, float], test: dict[str, float],
         run_name: str = "larex-study") -> None:
    ev = layer / f"evaluate-{name}"
    ev.mkdir(parents=True)
    cfg = {"tracking": {"run_name": run_name}, "aggregate": {"estimator": est},
           "hooked_layer": {"name": layer.name, "mc_samples": s, "drop_prob": 0.5, "masks": "per_image"},
           "limit": {"fit": 10, "val": 5}, "evaluate": {"val_ood": ["fmnist_holdout_val"]},
           "model": {"name": "small_cnn"}, "dataset": {"name": "fashion_mnist", "classes": [0, 1]}}
    (ev / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    (ev / "evaluate.json").write_text("{}")
    rows = [{"ood": "fmnist_holdout_val", "method": m, "auroc": a, "fpr95": 1 - a} for m, a in val.items()]
    rows += [{"ood": "mean", "method": m, "auroc": a, "fpr95": 1 - a} for m, a in val.items()]
    pd.DataFrame(rows).to_csv(ev / "val_metrics.csv", index=False)
    trows = []
    for m, a in test.items():
        trows += [{"ood": o, "method": m, "auroc": a + d, "fpr95": 0.5} for o, d in zip(OODS, (-0.1, 0.1))]
        trows.append({"ood": "mean", "method": m, "auroc": a, "fpr95": 0.5})
    pd.DataFrame(trows).to_csv(ev / "metrics.csv", index=False)


@pytest.fixture
def study(tmp_path):
    layer = tmp_path / "classification" / "fashion_mnist" / "small_cnn" / "dropblock"
    knn, gauss = {"_target_": "larex.aggregation.knn.KNNEntropy", "k": None}, \
        {"_target_": "larex.aggregation.gaussian.GaussianEntropy"}
    # test AUROC is best for knn S=8, but validation prefers gaussian S=16: the choice must follow validation
    _job(layer, "a", knn, 8, {"lared": 0.70, "larem": 0.60}, {"lared": 0.99, "larem": 0.50})
    _job(layer, "b", gauss, 16, {"lared": 0.90, "larem": 0.65}, {"lared": 0.80, "larem": 0.70})
    _job(layer, "c", gauss, 8, {"lared": 0.85, "larem": 0.95}, {"lared": 0.75, "larem": 0.60})
    _job(layer, "d", knn, 16, {"lared": 0.99}, {"lared": 0.99}, run_name="something-else")  # not the study
    return tmp_path, layer


def test_collect_and_choose_on_validation_only(study):
    _, layer = study
    df = collect([layer])
    assert len(df) == 6 and set(df["estimator"]) == {"knn k=5", "gaussian"}
    row = df[(df["estimator"] == "knn k=5") & (df["method"] == "lared")].iloc[0]
    assert (row["val_auroc"], row["test_auroc"]) == (0.70, 0.99)
    assert row["test_auroc/noise"] == pytest.approx(1.09)
    best = choose(df, ["lared"])
    assert (best["estimator"], best["mc_samples"], best["method"]) == ("gaussian", 16, "lared")
    assert choose(df)["method"] == "larem" and choose(df)["val_auroc"] == 0.95
    eff = axis_effects(df, best)
    s_rows = eff[eff["axis"] == "mc_samples"]
    assert list(s_rows["value"]) == [8, 16] and list(s_rows["chosen"]) == ["", "yes"]
    with pytest.raises(ValueError, match="no study results"):
        choose(df, ["vim"])


def test_estimator_labels():
    assert estimator_label({"_target_": "x.KNNEntropy", "k": None}) == "knn k=5"
    assert estimator_label({"_target_": "x.KNNEntropy", "k": "sqrt"}) == "knn k=sqrt"
    assert estimator_label({"_target_": "x.JointKNNEntropy", "k": None}) == "joint"
    assert estimator_label({"_target_": "x.GaussianEntropy"}) == "gaussian"


def test_report_script_writes_page_plot_and_table(study, tmp_path):
    root, _ = study
    out = tmp_path / "docs"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "larex_study.py"), "--root", str(root), "--out",
                        str(out), "--minutes", "3"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    page = (out / "larex-study.md").read_text()
    assert "gaussian" in page and "Choices are made on validation only" in page and "larex-study.png" in page
    assert (out / "larex-study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(out / "larex-study.csv")
    assert len(table) == 6
    assert "chosen on val (lared): estimator=gaussian, mc_samples=16" in p.stdout
    empty = subprocess.run([sys.executable, str(ROOT / "scripts" / "larex_study.py"), "--root", str(tmp_path / "none"),
                            "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert empty.returncode != 0 and "no larex-study evaluations" in empty.stderr
