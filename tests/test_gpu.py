"""CUDA paths give the CPU results (run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere)."""
import numpy as np
import pytest
import torch

from larex.entropy import knn_entropy
from larex.extraction.module import FeatureExtractor
from larex.models.small_cnn import SmallCNN
from larex.postprocessors.lared import LaRED

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_entropy_on_cuda_equals_cpu():
    x = torch.randn(40, 16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).round(decimals=1)
    cpu = knn_entropy(x)
    gpu = knn_entropy(x.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-12)


def test_lared_on_cuda_equals_cpu():
    rng = np.random.default_rng(0)
    fit, val, test = (rng.normal(size=(n, 8)) for n in (300, 100, 50))
    kw = dict(pca=None, bandwidth=0.7, standardize=False)
    cpu = LaRED(**kw).fit({"entropy": fit}, {"entropy": val}).score({"entropy": test})
    gpu = LaRED(device="cuda", **kw).fit({"entropy": fit}, {"entropy": val}).score({"entropy": test})
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-9)


def test_feature_extractor_on_cuda_matches_cpu_deterministic_outputs():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=5, width=8).eval()
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    batch = (x, torch.zeros(6, dtype=torch.long), torch.arange(6))
    keys = ("latent", "logits", "penultimate")
    cpu = FeatureExtractor(model, hooked_layer="block3", mc_samples=4, keys=keys).predict_step(batch)
    gpu = FeatureExtractor(model.cuda(), hooked_layer="block3", mc_samples=4, keys=keys).predict_step(batch)
    torch.testing.assert_close(gpu["logits"], cpu["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu["penultimate"], cpu["penultimate"], rtol=1e-4, atol=1e-4)
    assert gpu["latent"].shape == cpu["latent"].shape and gpu["latent"].device.type == "cpu"


def test_topk_search_on_cuda_is_exact_also_with_tf32_allowed():
    # float32 candidates on the GPU, float64 values; TF32 must not leak into the certified float32 GEMM
    from larex.postprocessors.knn import topk_inner

    rng = np.random.default_rng(2)
    q, bank = rng.normal(size=(300, 64)), rng.normal(size=(5000, 64))
    full = -np.sort(-(q @ bank.T), axis=1)[:, :20]
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        got = topk_inner(q, bank, 20, batch_size=128, bank_chunk=1024, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-12)


def test_roi_means_on_cuda_equal_cpu():
    from larex.extraction.producers.boxes import roi_means

    g = torch.Generator().manual_seed(2)
    for size, channels in (((5, 5), 64), ((20, 20), 16)):  # the separable path and roi_align itself
        fmap = torch.rand((2, channels, *size), generator=g)
        xy = torch.rand((9, 2), generator=g) * (size[1] - 2)
        boxes = torch.cat([xy, xy + 1.5], 1)
        image = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
        masks = torch.rand((4, 7, 7), generator=g)
        cpu = roi_means(fmap, image, boxes, 7, 2, True, masks)
        gpu = roi_means(fmap.cuda(), image.cuda(), boxes.cuda(), 7, 2, True, masks.cuda())
        for a, b in zip(cpu, gpu):
            assert b.device.type == "cuda"
            torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


def test_ddp_extraction_on_cuda_equals_the_single_process_run(tmp_path, monkeypatch):
    """extract.strategy=ddp on every visible GPU (NCCL; a world of one on a one-GPU machine) writes the same shards
    as the plain one-process CUDA extraction of the same trained model."""
    import shutil

    from _cli import cli, layer_dir, tiny
    from test_distributed_extraction import _shards

    monkeypatch.setenv("LAREX_TEST_ALLOW_LOOPBACK", "1")  # the ranks meet on a loopback TCP store
    one, many = tmp_path / "one", tmp_path / "many"
    args = [*tiny(one, "digits", s=4), "limit.fit=200", "limit.ood=64", "tracking.enabled=false", "device=cuda"]
    cli("larex-run", *args, "evaluate.plots=false", cwd=tmp_path)
    (checkpoint,) = (one / "classification" / "digits" / "small_cnn").glob("checkpoint-*")
    shutil.copytree(checkpoint, many / "classification" / "digits" / "small_cnn" / checkpoint.name)
    n = torch.cuda.device_count()
    p = cli("larex-extract", *[a.replace(str(one), str(many)) for a in args], f"extract.devices={min(n, 2)}",
            "extract.strategy=ddp", cwd=tmp_path)
    assert p.returncode == 0
    (a,) = layer_dir(one, "digits").glob("extract-*")
    (b,) = layer_dir(many, "digits").glob("extract-*")
    assert _shards(b) == _shards(a)
