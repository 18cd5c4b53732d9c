"""The README's "Python quick start" block runs as it is, on the public API importable from ``larex``, and gives
what an independent computation from the same features gives."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _quick_start_code() -> str:
    text = README.read_text()
    section = text.split("## Python quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the quick start section holds one python block"
    return blocks[0]


def test_readme_python_quick_start_runs_and_separates_held_out_digits(capsys):
    import larex
    from larex import metrics

    scope: dict = {}
    exec(compile(_quick_start_code(), str(README) + ":quick-start", "exec"), scope)  # noqa: S102 - our README
    feats, scores, threshold = scope["feats"], scope["scores"], scope["threshold"]
    n = {"fit": 800, "val": 200}
    for name, f in feats.items():
        assert f["latent"].shape[1:] == (16, 512) and f["entropy"].shape == (len(f["latent"]), 512)
        assert len(scores[name]) == len(f["latent"]) and (name not in n or len(f["latent"]) == n[name])
    # the entropy is the Gaussian one of the MC samples: 1/2 log(2 pi e var), var over S with ddof=1
    var = np.maximum(feats["test"]["latent"].astype(np.float64).var(axis=1, ddof=1), 1e-10)
    np.testing.assert_allclose(feats["test"]["entropy"], 0.5 * np.log(2 * np.pi * np.e * var), rtol=1e-6, atol=1e-6)
    # the threshold is the 95%-TPR score of ID val, and the printed metrics are the library's on these scores
    assert np.mean(scores["val"] >= threshold) >= 0.95 > np.mean(scores["val"] > threshold)
    m = metrics.ood_metrics(scores["test"], scores["ood"])
    assert str(m) in capsys.readouterr().out
    assert m["auroc"] > 0.7  # digits 8 and 9 are told apart from 0-7 by the LaREx density
    assert (scope["is_ood"] == (scores["ood"] < threshold)).all()
    assert set(larex.__all__) >= {"FeatureExtractor", "extract_features", "LaRED", "LaREM", "Detector"}
