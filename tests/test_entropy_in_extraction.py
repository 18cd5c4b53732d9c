"""``extract.keep_latent=false``: the LaREx entropy computed per batch during extraction equals the two-stage path
(extract the S samples, then larex-aggregate), and only the [N, D] results are stored."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from _cli import cli, layer_dir, only, part_dirs, tiny
from larex import io
from larex.aggregation.knn import KNNEntropy
from larex.aggregation.mean import LatentMean
from larex.extraction.module import FeatureExtractor, extract_features
from larex.extraction.producers.aggregating import Aggregating
from larex.extraction.producers.monte_carlo import MonteCarlo
from larex.layout import split_dirname
from larex.models.small_cnn import SmallCNN
from larex.tasks.classification import estimator_step


def _model():
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, num_classes=5, width=8, drop_prob=0.2, block_size=3).eval()


def _loader(n=40, batch=16):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 16, 16, generator=g)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(n, dtype=torch.int64), torch.arange(n))
    return torch.utils.data.DataLoader(ds, batch_size=batch)


@pytest.mark.parametrize("estimator", [KNNEntropy(), KNNEntropy(k=2)], ids=["knn", "knn_k2"])
def test_aggregating_producer_equals_aggregating_the_stored_samples(estimator):
    mc = MonteCarlo("block3", mc_samples=8, keys=("latent", "mc_logits"), seed=5)
    two_stage = extract_features(FeatureExtractor(_model(), producers=[mc]), _loader(), progress=False)
    want_entropy = estimator.transform(two_stage["latent"])
    want_mean = LatentMean().transform(two_stage["latent"])

    inner = MonteCarlo("block3", mc_samples=8, keys=("latent", "mc_logits"), seed=5)
    agg = Aggregating(inner, [estimator_step(estimator), estimator_step(LatentMean())])
    assert agg.keys == ("mc_logits", "entropy", "latent_mean")  # the samples are consumed, mc_logits kept
    one_pass = extract_features(FeatureExtractor(_model(), producers=[agg]), _loader(batch=7), progress=False)
    assert set(one_pass) == {"mc_logits", "entropy", "latent_mean"}
    assert one_pass["entropy"].dtype == np.float64 and one_pass["entropy"].shape == (40, two_stage["latent"].shape[2])
    assert np.array_equal(one_pass["entropy"], want_entropy)  # bit-identical, whatever the batch size
    assert np.array_equal(one_pass["latent_mean"], want_mean)
    assert np.array_equal(one_pass["mc_logits"], two_stage["mc_logits"])

    kept = Aggregating(MonteCarlo("block3", mc_samples=8, seed=5), [estimator_step(estimator)], keep=["latent"])
    assert kept.keys == ("latent", "entropy")
    # the part (folder) names the inner producer, the steps and what is stored: never the full-latent part's
    assert len({agg.part, kept.part, mc.part}) == 3 and agg.part.startswith("mc_agg-")
    other = Aggregating(MonteCarlo("block3", mc_samples=8, keys=("latent", "mc_logits"), seed=5),
                        [estimator_step(KNNEntropy(k=3)), estimator_step(LatentMean())])
    assert other.part != agg.part


def test_aggregating_refuses_inputs_its_producer_does_not_write():
    with pytest.raises(ValueError, match="not written by"):
        Aggregating(MonteCarlo("block3", mc_samples=4, keys=("mc_logits",)), [estimator_step(KNNEntropy())])


@pytest.mark.slow  # make test checks the same equality on the producer (above) without two larex-run processes
def test_keep_latent_false_run_equals_the_two_stage_run(tmp_path):
    """larex-run twice on the same trained model: the default (latents on disk, then larex-aggregate) and
    extract.keep_latent=false. The entropies, and hence every metric, are identical; the parts hold no latents."""
    out = tmp_path / "outputs"
    args = [*tiny(out, "digits", s=8), "limit.fit=200", "limit.ood=64", "evaluate.plots=false",
            "tracking.enabled=false", "estimator=knn"]
    cli("larex-run", *args, cwd=tmp_path)
    p = cli("larex-run", *args, "extract.keep_latent=false", cwd=tmp_path)
    assert "nothing to aggregate" in p.stdout
    layer = layer_dir(out, "digits")
    extract = only(layer.glob("extract-*"))
    aggregate = only(layer.glob("aggregate-*"))  # the second run wrote no aggregate file
    splits = ["fit", "val", "test", "ood/digits_holdout", "ood/digits_shift", "ood/noise"]
    for split in splits:
        parts = part_dirs(extract / split)
        assert set(parts) == {"mc", "mc_agg", "labels"}
        stored = io.read_manifest(parts["mc_agg"])["keys"]
        assert set(stored) == {"entropy"}  # lared and larem read the entropy only
        inline = io.read_features(parts["mc_agg"], ["entropy"])["entropy"]
        two_stage = io.load_arrays(aggregate / f"{split_dirname(split)}.safetensors", ["entropy"])["entropy"]
        assert inline.dtype == np.float64 and np.array_equal(inline, two_stage)
        latent = io.read_manifest(parts["mc"])["keys"]["latent"]
        n, s, d = latent["shape"]
        assert stored["entropy"]["shape"] == [n, d] and s == 8
    evaluations = sorted(layer.glob("evaluate-*"), key=lambda e: e.stat().st_mtime_ns)
    assert len(evaluations) == 2
    first, second = (pd.read_csv(e / "metrics.csv") for e in evaluations)
    pd.testing.assert_frame_equal(first, second)
