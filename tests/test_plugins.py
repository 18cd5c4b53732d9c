"""Extending larex with one module + one YAML and nothing else: a baseline that reads a feature of a producer
its own module brings (registered in the feature registry), planned and run through ``larex-run``."""
from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd

from _cli import cli, layer_dir, latest, only, part_dirs, tiny
from larex import io

PLUGIN = '''
"""Per-channel maximum of a layer's maps (a producer) and a baseline scoring its distance to the ID mean."""
import numpy as np
import torch

from larex import features
from larex.extraction.hooks import capture_output, resolve_module
from larex.extraction.mc import eval_mode
from larex.extraction.producers.base import Producer
from larex.postprocessors.base import Postprocessor

features.register(features.FeatureSpec("pooled_max.", "image", 2, "larex_test_plugin.PooledMax",
                                       "per-channel max of layer <path> [N, C]"))


class PooledMax(Producer):
    name = "pooled_max"
    provides = ("pooled_max.",)

    def __init__(self, keys):
        super().__init__(keys)
        self.layers = [k[len("pooled_max."):] for k in self.keys]

    @classmethod
    def from_plan(cls, keys, requests, context):
        return cls(sorted(keys))

    def identity(self):
        return {"layers": self.layers}

    def setup(self, model):
        for layer in self.layers:
            resolve_module(model, layer)

    def produce(self, model, x, y, index):
        out = {}
        for layer in self.layers:
            with torch.no_grad(), eval_mode(model), capture_output(resolve_module(model, layer)) as cap:
                model(x)
            out["pooled_max." + layer] = cap.value.amax(dim=(2, 3)).float().cpu()
        return out


class PooledNorm(Postprocessor):
    name = "pooled_norm"

    def __init__(self, layer="block2"):
        self.layer = layer
        self.requires = ("pooled_max." + layer,)

    def _fit(self, arrays, val):
        self.mean_ = arrays[self.requires[0]].astype(np.float64).mean(axis=0)

    def _score(self, arrays):
        return -np.linalg.norm(arrays[self.requires[0]].astype(np.float64) - self.mean_, axis=1)

    def _fitted_state(self):
        return {"mean": self.mean_}

    def _set_fitted_state(self, state):
        self.mean_ = state["mean"]
'''

YAML = """\
# @package baselines.pooled_norm
_target_: larex_test_plugin.PooledNorm
layer: block2
"""


def test_a_baseline_with_its_own_producer_runs_through_larex_run(tmp_path):
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "larex_test_plugin.py").write_text(textwrap.dedent(PLUGIN))
    conf = tmp_path / "conf" / "baselines"
    conf.mkdir(parents=True)
    (conf / "pooled_norm.yaml").write_text(YAML)
    out = tmp_path / "outputs"
    cli("larex-run", *tiny(out, "digits"), "limit.ood=64", "postprocessor=[lared]", "baselines=[pooled_norm]",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", cwd=tmp_path, pythonpath=(str(tmp_path / "plugin"),))
    layer = layer_dir(out, "digits")
    extract = only(layer.glob("extract-*"))
    parts = part_dirs(extract / "test")
    assert set(parts) == {"mc", "labels", "pooled_max"}
    feats = io.read_features(parts["pooled_max"], ["pooled_max.block2"])["pooled_max.block2"]
    assert feats.shape[0] == 200 and feats.ndim == 2 and np.isfinite(feats).all()
    table = pd.read_csv(latest(out, dataset="digits") / "metrics.csv")
    assert set(table["method"]) == {"lared", "pooled_norm"}
    # the scores are the plugin's formula on the stored features (fit mean from the stored fit split)
    fit = io.read_features(part_dirs(extract / "fit")["pooled_max"], ["pooled_max.block2"])["pooled_max.block2"]
    scores = pd.read_parquet(only(layer.glob("scores/pooled_norm-*.parquet")))
    expected = -np.linalg.norm(feats.astype(np.float64) - fit.astype(np.float64).mean(0), axis=1)
    np.testing.assert_allclose(scores.loc[scores.split == "test", "score"].to_numpy(), expected, rtol=1e-12)
