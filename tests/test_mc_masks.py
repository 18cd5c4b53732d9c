"""Deterministic per-sample MC masks (``mc_mode(..., samples=S, seed=...)``): batch-invariance and semantics."""
from __future__ import annotations

import math

import pytest
import torch
from dropblock import DropBlock2D, DropBlock3D
from torch import nn

from larex.extraction.mc import deterministic_masks, mc_masks_seed, mc_mode
from larex.models.resnet import ResNet18
from larex.models.small_cnn import SmallCNN

S = 4
SEED = 7


def _images(n: int, c: int, hw: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(seed))


def _small_cnn(drop_prob: float = 0.3) -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, num_classes=8, drop_prob=drop_prob).eval()


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return ResNet18(num_classes=10, in_channels=3, dropblock_prob=0.3, dropblock_after="layer3").eval()


def _mc_run(model: nn.Module, layer: nn.Module, x: torch.Tensor, batch: int, *, seed: int = SEED,
            samples: int = S, order: torch.Tensor | None = None, share_prefix: bool = False,
            drop_prob: float | None = None, block_size: int | None = None) -> dict[str, torch.Tensor]:
    """Per image [N, S, ...] outputs of ``layer`` and of the model, as module.py's MC forward computes them
    (rows b*S + s; with ``share_prefix`` the first MC layer's input is repeated S times by a pre-hook)."""
    n = x.shape[0]
    order = torch.arange(n) if order is None else order
    caps: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _a, out: caps.append(out.detach().clone()))
    outs_layer, outs_model = [None] * n, [None] * n
    try:
        with torch.inference_mode(), mc_mode(model, drop_prob, block_size, samples=samples, seed=seed) as layers:
            for i0 in range(0, n, batch):
                idx = order[i0:i0 + batch]
                xb = x[idx]
                pre = []
                if share_prefix:
                    first = layers[0][1]
                    pre.append(first.register_forward_pre_hook(
                        lambda _m, args: (args[0].repeat_interleave(samples, 0), *args[1:])))
                else:
                    xb = xb.repeat_interleave(samples, 0)
                try:
                    caps.clear()
                    y = model(xb)
                finally:
                    for h in pre:
                        h.remove()
                z = caps[0]
                z = z.reshape(len(idx), samples, *z.shape[1:])
                y = y.reshape(len(idx), samples, *y.shape[1:])
                for j, i in enumerate(idx.tolist()):
                    outs_layer[i], outs_model[i] = z[j], y[j]
    finally:
        handle.remove()
    return {"layer": torch.stack(outs_layer), "model": torch.stack(outs_model)}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # CPU convolutions are not bit-identical across batch sizes (oneDNN picks kernels by batch size; a
    # ~1e-6 difference), so whole-model outputs are compared at a tolerance far below any mask change
    for k in a:
        atol = 1e-5 * max(1.0, b[k].abs().max().item())
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=atol), k


def _mc_tail(model: nn.Module, mc_layer: nn.Module, tail, z: torch.Tensor, batch: int,
             order: torch.Tensor | None = None, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Per image [N, S, ...] output of ``mc_layer`` (and ``tail`` of it) on the precomputed MC-layer input
    ``z`` (computed once for all images), rows b*S + s, under ``mc_mode(model, samples=S, seed=seed)``.
    The MC layer output is a pure function of its input rows, so it must match bit for bit."""
    n = z.shape[0]
    order = torch.arange(n) if order is None else order
    outs, tails = [None] * n, [None] * n
    with torch.inference_mode(), mc_mode(model, samples=S, seed=seed):
        for i0 in range(0, n, batch):
            idx = order[i0:i0 + batch]
            o = mc_layer(z[idx].repeat_interleave(S, 0))
            t = tail(o)
            o, t = o.reshape(len(idx), S, *o.shape[1:]), t.reshape(len(idx), S, *t.shape[1:])
            for j, i in enumerate(idx.tolist()):
                outs[i], tails[i] = o[j], t[j]
    return {"layer": torch.stack(outs), "tail": torch.stack(tails)}


def _check_invariance(model, mc_layer, tail, z):
    ref = _mc_tail(model, mc_layer, tail, z, batch=64)
    assert torch.isfinite(ref["layer"]).all() and torch.isfinite(ref["tail"]).all()
    # the masks are active: not all passes equal, and another seed changes the result well beyond tolerance
    assert any(not torch.equal(ref["layer"][:, 0], ref["layer"][:, s]) for s in range(1, S))
    other_seed = _mc_tail(model, mc_layer, tail, z, batch=64, seed=SEED + 1)
    assert (other_seed["tail"] - ref["tail"]).abs().max() > 1e-2
    perm = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(3))
    for batch, order in ((1, None), (7, None), (7, perm), (64, perm)):
        got = _mc_tail(model, mc_layer, tail, z, batch=batch, order=order)
        assert torch.equal(got["layer"], ref["layer"]), (batch, order is None)
        _assert_close({"tail": got["tail"]}, {"tail": ref["tail"]})
    # neighbours replaced by other images: image 5's result unchanged
    other = torch.randn(z.shape, generator=torch.Generator().manual_seed(99))
    other[5] = z[5]
    alt = _mc_tail(model, mc_layer, tail, other, batch=64)
    assert torch.equal(alt["layer"][5], ref["layer"][5])
    return ref


# ---------------------------------------------------------------- batch invariance

def test_small_cnn_mc_layer_output_bit_identical_across_batch_size_order_and_neighbours():
    model = _small_cnn()
    x = _images(64, 1, 28)
    with torch.inference_mode():
        z = model.block2(model.block1(x))
    _check_invariance(model, model.dropblock, lambda o: model.fc(model.flatten(model.pool(model.block3(o)))), z)


def test_resnet18_mc_layer_output_bit_identical_across_batch_size_order_and_neighbours():
    model = _resnet()
    x = _images(64, 3, 16)
    with torch.inference_mode():
        z = model.relu(model.bn1(model.conv1(x)))
        for name in ("layer1", "layer2", "layer3"):
            z = getattr(model, name)(z)
    _check_invariance(model, model.dropblock, model.layer4[0], z)


@pytest.mark.parametrize("hook", ["dropblock", "block3"])
def test_small_cnn_full_forward_independent_of_batch_size_order_and_neighbours(hook):
    model = _small_cnn()
    layer = getattr(model, hook)
    x = _images(64, 1, 28)
    ref = _mc_run(model, layer, x, batch=64)
    assert torch.isfinite(ref["layer"]).all() and torch.isfinite(ref["model"]).all()
    assert not torch.equal(ref["layer"][:, 0], ref["layer"][:, 1])
    other_seed = _mc_run(model, layer, x, batch=64, seed=SEED + 1)
    assert (other_seed["layer"] - ref["layer"]).abs().max() > 1e-2
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    for batch, order in ((1, None), (7, None), (7, perm), (64, perm)):
        _assert_close(ref, _mc_run(model, layer, x, batch=batch, order=order))
    other = _images(64, 1, 28, seed=99)
    other[5] = x[5]
    alt = _mc_run(model, layer, other, batch=64)
    _assert_close({k: v[5] for k, v in alt.items()}, {k: v[5] for k, v in ref.items()})
    # the shared-prefix forward (module.py's default) gives the same samples
    _assert_close(ref, _mc_run(model, layer, x, batch=7, share_prefix=True))
    _assert_close(ref, _mc_run(model, layer, x, batch=1, share_prefix=True))


def test_resnet18_full_forward_independent_of_batch():
    model = _resnet()
    x = _images(64, 3, 16)
    # DropBlock output after layer3 and the logits; prefix run once per image as module.py does
    ref = _mc_run(model, model.dropblock, x, batch=64, share_prefix=True)
    assert any(not torch.equal(ref["layer"][:, 0], ref["layer"][:, s]) for s in range(1, S))
    assert torch.isfinite(ref["model"]).all()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(4))
    for batch, order in ((1, None), (7, None), (64, perm)):
        _assert_close(ref, _mc_run(model, model.dropblock, x, batch=batch, order=order, share_prefix=True))
    # a later layer, full S-fold forward
    sub = x[:8]
    full = _mc_run(model, model.layer4, sub, batch=8)
    for batch in (1, 3):
        _assert_close(full, _mc_run(model, model.layer4, sub, batch=batch))


def test_pass_s_of_every_image_uses_mask_s():
    model = _small_cnn(drop_prob=0.5)
    x = torch.ones(3, 64, 7, 7)
    with torch.inference_mode(), mc_mode(model, samples=S, seed=SEED):
        out = model.dropblock(x.repeat_interleave(S, 0)).reshape(3, S, 64, 7, 7)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert not torch.equal(out[0, 0], out[0, 1])


# ---------------------------------------------------------------- RNG independence, seeds

def test_independent_of_and_leaves_global_rng():
    model = _small_cnn()
    x = _images(6, 1, 28)
    torch.manual_seed(1)
    a = _mc_run(model, model.block3, x, batch=6)
    torch.manual_seed(12345)
    state = torch.random.get_rng_state()
    b = _mc_run(model, model.block3, x, batch=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    _assert_same(a, b)


def test_seeds_change_masks_and_passes_differ():
    model = _small_cnn(drop_prob=0.5)
    x = _images(5, 1, 28)
    a = _mc_run(model, model.dropblock, x, batch=5, seed=7)
    b = _mc_run(model, model.dropblock, x, batch=5, seed=8)
    assert not torch.equal(a["layer"], b["layer"])
    for s1 in range(S):
        for s2 in range(s1 + 1, S):
            assert not torch.equal(a["layer"][:, s1], a["layer"][:, s2])
    m1, _ = deterministic_masks(model.dropblock, (64, 7, 7), S, 7, 0)
    m2, _ = deterministic_masks(model.dropblock, (64, 7, 7), S, 8, 0)
    m3, _ = deterministic_masks(model.dropblock, (64, 7, 7), S, 7, 1)
    assert not torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert torch.equal(m1, deterministic_masks(model.dropblock, (64, 7, 7), S, 7, 0)[0])


def test_mc_masks_seed_is_stable():
    v = mc_masks_seed(7, 0, (64, 7, 7), 16)
    assert v == mc_masks_seed(7, 0, (64, 7, 7), 16) and 0 <= v < 2 ** 63
    # pinned: a change here changes every deterministic MC result (bump _MASKS_VERSION on purpose)
    assert v == 6792963241084662069
    others = {mc_masks_seed(8, 0, (64, 7, 7), 16), mc_masks_seed(7, 1, (64, 7, 7), 16),
              mc_masks_seed(7, 0, (64, 7, 8), 16), mc_masks_seed(7, 0, (64, 7, 7), 15),
              mc_masks_seed(7, 0, (64, 7, 7, 1), 16), mc_masks_seed(-1, 0, (64, 7, 7), 16)}
    assert v not in others and len(others) == 6
    assert all(0 <= o < 2 ** 63 for o in others)


# ---------------------------------------------------------------- DropBlock semantics

def test_dropblock_drop_fraction_matches_dropblock_and_scale_is_numel_over_sum():
    n = 4000
    layer = nn.Sequential(DropBlock2D(drop_prob=0.5, block_size=3))
    with torch.inference_mode(), mc_mode(layer, samples=n, seed=SEED):
        out = layer(torch.ones(n, 2, 7, 7))
    torch.manual_seed(0)
    ref = DropBlock2D(drop_prob=0.5, block_size=3).train()(torch.ones(n, 2, 7, 7))
    ours_drop = (out == 0).float().mean().item()
    ref_drop = (ref == 0).float().mean().item()
    assert 0.25 < ref_drop < 0.45
    assert abs(ours_drop - ref_drop) < 0.02
    # one mask shared by all channels; per-mask scale exactly numel / sum of that mask
    assert torch.equal(out[:, 0], out[:, 1])
    kept = (out[:, 0] != 0).flatten(1).sum(1)
    assert (kept > 0).all()
    scale = torch.tensor([49.0 / k for k in kept.tolist()], dtype=torch.float32)
    nz = out[:, 0].flatten(1)
    for i in range(0, n, 97):
        vals = nz[i][nz[i] != 0]
        assert torch.equal(vals, scale[i].expand_as(vals))
    # the scales differ between masks (per-mask normalisation, not a batch-wide kept fraction)
    assert scale.unique().numel() > 5


def test_dropblock_mask_matches_dropblock_block_mask_definition():
    db = DropBlock2D(drop_prob=0.4, block_size=4)  # even block size: crop
    mul, add = deterministic_masks(db, (3, 9, 9), 50, SEED, 0)
    assert add is None and mul.shape == (50, 1, 9, 9) and mul.dtype == torch.float64
    gen = torch.Generator().manual_seed(mc_masks_seed(SEED, 0, (3, 9, 9), 50))
    seeds = (torch.rand((50, 9, 9), generator=gen, dtype=torch.float64) < 0.4 / 16).float()
    block = db._compute_block_mask(seeds)  # dropblock 0.3.0's own block-mask code
    assert torch.equal((mul[:, 0] > 0).float(), block)


def test_dropblock_tiny_maps_fully_dropped_give_zeros_not_nan():
    for hw in (1, 2):
        layer = nn.Sequential(DropBlock2D(drop_prob=0.9, block_size=3))
        x = torch.randn(3 * 64, 5, hw, hw)
        with torch.inference_mode(), mc_mode(layer, samples=64, seed=SEED):
            out = layer(x)
        assert torch.isfinite(out).all()
        rows = out.reshape(3, 64, -1)
        dropped = (rows == 0).all(dim=2)
        assert dropped.any() and not dropped.all()  # some masks drop everything, some keep
        assert torch.equal(dropped[0], dropped[1])
        kept = ~dropped[0]
        xr = x.reshape(3, 64, -1)
        # hw == 1: nothing partial, kept rows are the input times 1 (1 / 1)
        if hw == 1:
            assert torch.equal(rows[:, kept], xr[:, kept])


def test_dropblock3d_per_mask():
    n = 2000
    layer = nn.Sequential(DropBlock3D(drop_prob=0.5, block_size=3))
    with torch.inference_mode(), mc_mode(layer, samples=n, seed=SEED):
        out = layer(torch.ones(n, 2, 5, 5, 5))
    torch.manual_seed(0)
    ref = DropBlock3D(drop_prob=0.5, block_size=3).train()(torch.ones(n, 2, 5, 5, 5))
    assert abs((out == 0).float().mean().item() - (ref == 0).float().mean().item()) < 0.02
    assert torch.equal(out[:, 0], out[:, 1]) and torch.isfinite(out).all()
    flat = out[:, 0].flatten(1)
    for i in range(0, n, 101):
        vals = flat[i][flat[i] != 0]
        if vals.numel():
            assert torch.equal(vals, torch.tensor(125.0 / vals.numel()).expand_as(vals))


# ---------------------------------------------------------------- dropout semantics

def test_dropout_keep_fraction_and_exact_scale():
    p = 0.3
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(p))
    x = torch.ones(1000 * 8, 200)
    with torch.inference_mode(), mc_mode(model, samples=8, seed=SEED):
        out = model[1](x)
    keep = (out != 0).float().mean().item()
    assert abs(keep - (1 - p)) < 0.01
    assert torch.equal(out[out != 0], torch.tensor(1 / (1 - p), dtype=torch.float32).expand(int((out != 0).sum())))
    r = out.reshape(1000, 8, 200)
    assert torch.equal(r[0], r[999]) and not torch.equal(r[0, 0], r[0, 1])


def test_dropout2d_masks_whole_channels():
    model = nn.Sequential(nn.Dropout2d(0.5))
    with torch.inference_mode(), mc_mode(model, samples=6, seed=SEED):
        out = model(torch.ones(12, 32, 3, 3))
    per_channel = out.flatten(2)
    assert torch.equal(per_channel, per_channel[:, :, :1].expand_as(per_channel))
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(out[:6], out[6:])


@pytest.mark.parametrize("cls", [nn.AlphaDropout, nn.FeatureAlphaDropout])
def test_alpha_dropouts_follow_torch_formula(cls):
    p = 0.2
    model = nn.Sequential(cls(p))
    x = torch.randn(40, 16, 4, generator=torch.Generator().manual_seed(1))
    xs = x.repeat_interleave(50, 0)
    with torch.inference_mode(), mc_mode(model, samples=50, seed=SEED):
        out = model(xs)
    torch.manual_seed(0)
    ref = cls(p).train()(xs)
    alpha = 1.7580993408473766
    a = 1.0 / math.sqrt((alpha ** 2 * p + 1) * (1 - p))
    dropped_value = -alpha * a + alpha * a * p
    for y in (out, ref):  # ours and torch's: every element is kept (a*x + alpha*a*p) or the dropped constant
        kept = ~torch.isclose(y, torch.tensor(dropped_value), atol=1e-6)
        assert torch.allclose(y[kept], (a * xs + alpha * a * p)[kept], atol=1e-5)
    ours_drop = torch.isclose(out, torch.tensor(dropped_value), atol=1e-6).float().mean().item()
    assert abs(ours_drop - p) < 0.03
    is_drop = torch.isclose(out, torch.tensor(dropped_value), atol=1e-6)
    mul, add = deterministic_masks(model[0], (16, 4), 50, SEED, 0)
    assert add is not None and mul.shape == ((50, 16, 1) if cls is nn.FeatureAlphaDropout else (50, 16, 4))
    if cls is nn.FeatureAlphaDropout:  # whole channels dropped
        assert torch.equal(is_drop.all(dim=2), is_drop.any(dim=2))
    else:  # single elements dropped
        assert not torch.equal(is_drop.all(dim=2), is_drop.any(dim=2))
    r = out.reshape(40, 50, -1)
    assert not torch.equal(r[:, 0], r[:, 1])
    # self-normalising: standard-normal input keeps mean ~0 and std ~1
    z = torch.randn(50 * 400, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), mc_mode(model, samples=50, seed=SEED):
        oz = model(z)
    assert abs(oz.mean().item()) < 0.05 and abs(oz.std().item() - 1) < 0.05


# ---------------------------------------------------------------- overrides, errors, restoration

def test_overrides_respected_in_deterministic_mode():
    model = _small_cnn(drop_prob=0.3)
    x = _images(4, 1, 28)
    with torch.inference_mode():
        base = model(x).repeat_interleave(S, 0).reshape(4, S, -1)
    off = _mc_run(model, model.block3, x, batch=4, drop_prob=0.0)
    assert torch.allclose(off["model"], base, atol=1e-5)
    a = _mc_run(model, model.dropblock, x, batch=4, block_size=3)
    b = _mc_run(model, model.dropblock, x, batch=4, block_size=2)
    assert not torch.equal(a["layer"], b["layer"])
    lo = _mc_run(model, model.dropblock, torch.ones(2, 1, 28, 28), batch=2, drop_prob=0.1, samples=64)
    hi = _mc_run(model, model.dropblock, torch.ones(2, 1, 28, 28), batch=2, drop_prob=0.6, samples=64)
    assert (hi["layer"] == 0).float().mean() > (lo["layer"] == 0).float().mean() + 0.1
    assert model.dropblock.drop_prob == 0.3 and model.dropblock.block_size == 3


def test_rows_not_multiple_of_samples_is_clear_error_and_all_restored():
    model = _small_cnn().train()
    model.block1[1].eval()
    flags = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(RuntimeError, match=r"MC layer 'dropblock'.*5 rows.*samples=4"):
        with mc_mode(model, drop_prob=0.5, block_size=2, samples=4, seed=SEED):
            assert "forward" in model.dropblock.__dict__
            model(torch.randn(5, 1, 28, 28))
    assert "forward" not in model.dropblock.__dict__
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert model.dropblock.drop_prob == 0.3 and model.dropblock.block_size == 3
    with pytest.raises(ValueError, match="both samples and seed"):
        with mc_mode(model, samples=4):
            pass
    with pytest.raises(ValueError, match="samples"):
        with mc_mode(model, samples=0, seed=1):
            pass


def test_masks_made_under_inference_mode_work_with_autograd_and_float64():
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 2))
    x = torch.randn(2 * 3, 6)
    with mc_mode(model, samples=3, seed=SEED):
        with torch.inference_mode():
            y0 = model(x)
        xi = x.clone().requires_grad_(True)
        y1 = model(xi)
        y1.sum().backward()
        assert xi.grad is not None
        y2 = model.double()(x.double())
    model.float()
    assert torch.allclose(y0, y1.detach()) and torch.allclose(y2.float(), y0, atol=1e-5)


def test_without_samples_layers_use_their_own_rng():
    model = _small_cnn(drop_prob=0.5)
    x = _images(4, 1, 28).repeat_interleave(S, 0)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    with torch.inference_mode(), mc_mode(model) as layers:
        assert "forward" not in model.dropblock.__dict__ and [n for n, _ in layers] == ["dropblock"]
        a, b = model(x), model(x)
    assert not torch.equal(a, b)
    assert not torch.equal(torch.random.get_rng_state(), state)  # drew from the global RNG
    torch.manual_seed(0)
    with torch.inference_mode(), mc_mode(model):
        assert torch.equal(model(x), a)  # reproducible through the global seed, as before


# ---------------------------------------------------------------- per_image masks

from larex import io  # noqa: E402
from larex.extraction.mc import (_M64, _hash_uniforms, _s64, _splitmix64, _splitmix64_t, image_seeds,  # noqa: E402
                                 per_image_masks, row_seeds)
from larex.extraction.module import FeatureExtractor  # noqa: E402
from larex.extraction.producers.monte_carlo import MonteCarlo  # noqa: E402
from _batches import predict_shuffled  # noqa: E402

PINNED_ZERO_IMAGE_SEED = 5802590204868490777


def _per_image(layer_model: nn.Module, x: torch.Tensor, samples: int = S, seed: int = SEED,
               images: torch.Tensor | None = None) -> torch.Tensor:
    """``layer_model`` on ``x`` repeated S times, per_image masks seeded by ``images`` (default ``x``): [B, S, ...]."""
    with torch.inference_mode(), mc_mode(layer_model, samples=samples, seed=seed, masks="per_image"):
        with row_seeds(layer_model, image_seeds(x if images is None else images, seed)):
            out = layer_model(x.repeat_interleave(samples, 0))
    return out.reshape(x.shape[0], samples, *out.shape[1:])


def test_splitmix64_on_int64_tensors_matches_python_bits():
    vals = [0, 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 0x9E3779B97F4A7C15, 12345678901234567890, 7]
    got = _splitmix64_t(torch.tensor([_s64(v) for v in vals], dtype=torch.int64)).tolist()
    assert got == [_s64(_splitmix64(v)) for v in vals]
    # uniforms: element j of row key k = top 53 bits of splitmix64(k + j * gamma) / 2**53
    keys = torch.tensor([_s64(3), _s64(2 ** 64 - 5)], dtype=torch.int64)
    u = _hash_uniforms(keys, (2, 3))
    for r, k in enumerate((3, 2 ** 64 - 5)):
        ref = [(_splitmix64((k + j * 0x9E3779B97F4A7C15) & _M64) >> 11) / 2 ** 53 for j in range(6)]
        assert u[r].flatten().tolist() == ref
    assert u.dtype == torch.float64 and (u >= 0).all() and (u < 1).all()


def test_image_seeds_hash_the_image_bytes():
    x = _images(300, 3, 8)
    seeds = image_seeds(x, SEED)
    assert seeds.dtype == torch.int64 and seeds.shape == (300,)
    assert seeds.unique().numel() == 300  # different images, different seeds
    # python reference of the documented hash, on one image
    words = [w & 0xFFFFFFFF for w in x[4].contiguous().view(torch.int32).flatten().tolist()]
    total = sum(_splitmix64((j << 32) | w) for j, w in enumerate(words)) & _M64
    key = _splitmix64(_splitmix64(1) ^ SEED)
    assert seeds[4].item() == _s64(_splitmix64(_splitmix64(total ^ key) ^ len(words)))
    # per image, not per batch: alone, in another order, with a duplicate -- the same seed
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    assert torch.equal(image_seeds(x[perm], SEED), seeds[perm])
    assert image_seeds(x[7:8], SEED).item() == seeds[7].item()
    dup = torch.stack([x[3], x[9], x[3]])
    d = image_seeds(dup, SEED)
    assert d[0] == d[2] and d[0] == seeds[3] and d[1] == seeds[9]
    # one float changed by one ulp, another seed, float64 input of the same values
    y = x[:1].clone()
    y[0, 1, 2, 3] = torch.nextafter(y[0, 1, 2, 3], torch.tensor(10.0))
    assert image_seeds(y, SEED).item() != seeds[0].item()
    assert image_seeds(x[:1], SEED + 1).item() != seeds[0].item()
    assert image_seeds(x[:2].double(), SEED).tolist() == seeds[:2].tolist()
    # swapping two pixels changes it (positions are mixed in)
    z = x[:1].clone()
    z[0, 0, 0, 0], z[0, 0, 0, 1] = x[0, 0, 0, 1], x[0, 0, 0, 0]
    assert image_seeds(z, SEED).item() != seeds[0].item()
    # pinned: a change here changes every per_image MC result (bump _PER_IMAGE_VERSION on purpose)
    assert image_seeds(torch.zeros(1, 1, 2, 2), 0).item() == PINNED_ZERO_IMAGE_SEED


def test_per_image_dropblock_masks_bit_identical_across_batch_size_order_and_neighbours():
    model = _small_cnn(drop_prob=0.5)
    x = _images(64, 1, 28)
    with torch.inference_mode():
        z = model.block2(model.block1(x))
    ref = _per_image(model.dropblock, z)
    assert torch.isfinite(ref).all()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    for batch, order in ((1, torch.arange(64)), (7, torch.arange(64)), (7, perm), (64, perm)):
        got = torch.empty_like(ref)
        for i0 in range(0, 64, batch):
            idx = order[i0:i0 + batch]
            got[idx] = _per_image(model.dropblock, z[idx])
        assert torch.equal(got, ref), batch
    # neighbours replaced: image 5 unchanged; another seed changes it
    other = torch.randn(z.shape, generator=torch.Generator().manual_seed(99)).relu()
    other[5] = z[5]
    assert torch.equal(_per_image(model.dropblock, other)[5], ref[5])
    assert not torch.equal(_per_image(model.dropblock, z, seed=SEED + 1), ref)
    # passes differ, images differ (unlike shared mode, where pass s of every image is mask s)
    with torch.inference_mode(), mc_mode(model, samples=S, seed=SEED):
        shared = model.dropblock(z.repeat_interleave(S, 0)).reshape(ref.shape)
    ones = torch.ones(64, 1, 7, 7)
    masks = _per_image(model.dropblock, ones.expand(64, 3, 7, 7).contiguous(), images=z)[:, :, 0]  # [64, S, 7, 7]
    assert not torch.equal(shared, ref)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0, 0], masks[0, 1])


def test_per_image_duplicates_share_masks_and_different_images_are_uncorrelated():
    n, s = 2000, 2
    layer = nn.Sequential(DropBlock2D(drop_prob=0.5, block_size=3))
    imgs = _images(n, 1, 4)
    imgs[1] = imgs[0]  # a duplicate
    imgs[3] = imgs[2].clone()
    imgs[3, 0, 0, 0] += 1e-3  # a near-duplicate is a different image
    keep = _per_image(layer, torch.ones(n, 1, 7, 7), samples=s, images=imgs)[:, :, 0] != 0  # [n, s, 7, 7]
    assert torch.equal(keep[0], keep[1])
    assert not torch.equal(keep[2], keep[3])
    # agreement of two different images' masks = that of independent masks with the per-position keep rates
    q = keep.float().mean(dim=(0, 1))
    expected = (q * q + (1 - q) * (1 - q)).mean().item()
    a, b = keep[2::2, 0].float(), keep[3::2, 0].float()
    agree = (a == b).float().mean().item()
    assert abs(agree - expected) < 0.01, (agree, expected)
    # and across passes of one image
    assert abs((keep[2:, 0] == keep[2:, 1]).float().mean().item() - expected) < 0.01
    # the masks as a whole: as many distinct masks as among independent draws (shared mode's S masks)
    flat = keep[4:, 0].flatten(1)
    with torch.inference_mode(), mc_mode(layer, samples=flat.shape[0], seed=SEED):
        indep = (layer(torch.ones(flat.shape[0], 1, 7, 7))[:, 0] != 0).flatten(1)
    n_ours, n_indep = torch.unique(flat, dim=0).shape[0], torch.unique(indep, dim=0).shape[0]
    assert abs(n_ours - n_indep) < 0.05 * n_indep, (n_ours, n_indep)


def test_per_image_dropblock_drop_fraction_scale_and_channel_sharing():
    n = 4000
    layer = nn.Sequential(DropBlock2D(drop_prob=0.5, block_size=3))
    out = _per_image(layer, torch.ones(n // 4, 2, 7, 7), samples=4, images=_images(n // 4, 1, 5)).flatten(0, 1)
    torch.manual_seed(0)
    ref = DropBlock2D(drop_prob=0.5, block_size=3).train()(torch.ones(n, 2, 7, 7))
    assert abs((out == 0).float().mean().item() - (ref == 0).float().mean().item()) < 0.02
    assert torch.equal(out[:, 0], out[:, 1])
    flat = out[:, 0].flatten(1)
    for i in range(0, n, 97):
        vals = flat[i][flat[i] != 0]
        assert vals.numel() and torch.equal(vals, torch.tensor(49.0 / vals.numel()).expand_as(vals))
    # even block size: dropblock 0.3.0's own block-mask code on the same seed mask
    db = DropBlock2D(drop_prob=0.4, block_size=4)
    seeds = image_seeds(_images(50, 1, 3), SEED)
    passes = torch.arange(50) % 3
    mul, add = per_image_masks(db, (3, 9, 9), seeds, passes, 0)
    assert add is None and mul.shape == (50, 1, 9, 9) and mul.dtype == torch.float64
    lo, _ = per_image_masks(db, (3, 9, 9), seeds, passes, 0, drop_prob=0.2)
    assert ((mul == 0) | (lo != 0)).all()  # common random numbers: a higher drop_prob only adds drops
    # the seed mask u < 0.4 / 16 is what a block size 1 layer with that drop_prob drops (same uniforms)
    seed_mask = (per_image_masks(DropBlock2D(0.4 / 16, 1), (3, 9, 9), seeds, passes, 0)[0][:, 0] == 0).float()
    assert torch.equal((mul[:, 0] > 0).float(), db._compute_block_mask(seed_mask))


def test_per_image_tiny_maps_and_dropouts():
    for hw in (1, 2):
        layer = nn.Sequential(DropBlock2D(drop_prob=0.9, block_size=3))
        x = torch.randn(40, 5, hw, hw)
        out = _per_image(layer, x, samples=16)
        assert torch.isfinite(out).all()
        dropped = (out.flatten(2) == 0).all(dim=2)
        assert dropped.any() and not dropped.all()
    p = 0.3
    drop = nn.Sequential(nn.Linear(4, 4), nn.Dropout(p))
    x = _images(500, 1, 20).flatten(1)
    with torch.inference_mode(), mc_mode(drop, samples=8, seed=SEED, masks="per_image"):
        with row_seeds(drop, image_seeds(x, SEED)):
            out = drop[1](torch.ones(500 * 8, 400))
    assert abs((out != 0).float().mean().item() - (1 - p)) < 0.01
    assert set(out.unique().tolist()) == {0.0, torch.tensor(1 / (1 - p)).item()}
    r = out.reshape(500, 8, 400)
    assert not torch.equal(r[0], r[1]) and not torch.equal(r[0, 0], r[0, 1])
    d2 = nn.Sequential(nn.Dropout2d(0.5))
    o2 = _per_image(d2, torch.ones(6, 32, 3, 3), samples=4).flatten(0, 1)
    per_channel = o2.flatten(2)
    assert torch.equal(per_channel, per_channel[:, :, :1].expand_as(per_channel))
    assert set(o2.unique().tolist()) == {0.0, 2.0}
    fa = nn.Sequential(nn.FeatureAlphaDropout(0.2))
    of = _per_image(fa, torch.randn(50, 16, 4), samples=20)
    alpha = 1.7580993408473766
    a = 1.0 / math.sqrt((alpha ** 2 * 0.2 + 1) * 0.8)
    dropped = torch.isclose(of, torch.tensor(-alpha * a + alpha * a * 0.2), atol=1e-6)
    assert torch.equal(dropped.all(dim=3), dropped.any(dim=3))
    assert abs(dropped.float().mean().item() - 0.2) < 0.03


def test_per_image_errors_and_global_rng_untouched():
    model = _small_cnn(drop_prob=0.5)
    x = _images(3, 1, 28)
    with pytest.raises(ValueError, match="masks"):
        with mc_mode(model, samples=S, seed=SEED, masks="bogus"):
            pass
    with pytest.raises(ValueError, match="needs samples"):
        with mc_mode(model, masks="per_image"):
            pass
    with pytest.raises(RuntimeError, match="row_seeds"):
        with row_seeds(model, image_seeds(x, SEED)):
            pass
    with pytest.raises(RuntimeError, match="row_seeds"), torch.inference_mode():
        with mc_mode(model, samples=S, seed=SEED, masks="per_image"):
            model(x.repeat_interleave(S, 0))
    with pytest.raises(RuntimeError, match="2 images"), torch.inference_mode():
        with mc_mode(model, samples=S, seed=SEED, masks="per_image"), row_seeds(model, image_seeds(x[:2], SEED)):
            model(x.repeat_interleave(S, 0))
    with pytest.raises(ValueError, match="masks"):
        MonteCarlo("dropblock", 4, masks="independent")
    torch.manual_seed(12345)
    state = torch.random.get_rng_state()
    a = _per_image(model, x)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(_per_image(model, x), a)
    assert "forward" not in model.dropblock.__dict__ and not model.dropblock.training


def test_per_image_latents_of_an_image_do_not_depend_on_its_batch():
    model = _small_cnn(drop_prob=0.3)
    x = _images(64, 1, 28)

    def fe(masks="per_image", seed=0, share_prefix=True, mc_batch=40):
        return FeatureExtractor(model, producers=[MonteCarlo(
            "dropblock", 8, keys=("latent", "mc_logits"), seed=seed, drop_prob=0.5, block_size=3,
            mc_batch=mc_batch, share_prefix=share_prefix, masks=masks)])

    ext = fe()
    ref = ext.predict_step((x, torch.zeros(64), torch.arange(64)))
    scale = float(ref["latent"].abs().max())
    for bs in (1, 7, 64):
        got = predict_shuffled(ext, x, bs, ("latent", "mc_logits"))
        torch.testing.assert_close(got["latent"], ref["latent"], rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(got["mc_logits"], ref["mc_logits"], rtol=0, atol=1e-4)
    # the full S-fold forward (no shared prefix) gives the same samples
    full = fe(share_prefix=False).predict_step((x, torch.zeros(64), torch.arange(64)))
    torch.testing.assert_close(full["latent"], ref["latent"], rtol=0, atol=1e-5 * scale)
    # a duplicated image gets its copy's samples; shared masks and another seed differ well beyond rounding
    dup = torch.cat([x[:5], x[2:3]])
    d = ext.predict_step((dup, torch.zeros(6), torch.arange(6)))["latent"]
    torch.testing.assert_close(d[5], d[2], rtol=0, atol=1e-5 * scale)
    for other in (fe(masks="shared"), fe(seed=1)):
        lat = other.predict_step((x, torch.zeros(64), torch.arange(64)))["latent"]
        assert float((lat - ref["latent"]).abs().max()) > 1e-2 * scale


def test_masks_mode_in_part_only_when_not_shared():
    kw = dict(keys=("latent", "mc_logits"), seed=3, drop_prob=0.5, block_size=3)
    before = {"producer": "larex.extraction.producers.monte_carlo.MonteCarlo", "keys": ["latent", "mc_logits"],
              "hooked_layer": "dropblock", "mc_samples": 8, "seed": 3, "drop_prob": 0.5, "block_size": 3,
              "reduction": "auto", "masks": "per-pass-v1"}
    shared = MonteCarlo("dropblock", 8, masks="shared", mask_norm="per_mask", **kw)
    assert shared.part == f"mc-{io.config_hash(before)}" == "mc-d45ce14ced104ef0"
    assert MonteCarlo("dropblock", 8, masks="per_image", mask_norm="per_mask", **kw).part != "mc-d45ce14ced104ef0"
    ctx = {"seed": 3, "hooked_layer": {"path": "dropblock", "mc_samples": 8, "drop_prob": 0.5, "block_size": 3}}
    default = MonteCarlo.from_plan(("latent",), [], ctx)  # the hooked_layer YAMLs' defaults
    assert (default.masks, default.mask_norm) == ("shared", "expected")
    ctx["hooked_layer"]["masks"] = "per_image"
    assert MonteCarlo.from_plan(("latent",), [], ctx).masks == "per_image"


# ---------------------------------------------------------------- mask_norm="expected"

from larex.extraction.mc import dropblock_keep_fraction  # noqa: E402


def test_dropblock_keep_fraction_closed_form_and_dropblocks_own_factor():
    # 7x7 map, block 3: a position's window holds 9 in-map positions inside, 6 on an edge, 4 at a corner
    q = 1.0 - 0.5 / 9
    assert dropblock_keep_fraction((7, 7), 0.5, 3) == pytest.approx((25 * q ** 9 + 20 * q ** 6 + 4 * q ** 4) / 49,
                                                                    rel=1e-14)
    # even block 4 on 5x5 (window rows i-2..i+1 after the crop): in-map counts per axis 2,3,4,4,3
    q4 = 1.0 - 0.4 / 16
    per_axis = [2, 3, 4, 4, 3]
    want = sum(q4 ** (a * b) for a in per_axis for b in per_axis) / 25
    assert dropblock_keep_fraction((5, 5), 0.4, 4) == pytest.approx(want, rel=1e-14)
    q3 = 1.0 - 0.3 / 27  # 3-D, 2x2x2 map, block 3: every window covers the whole map
    assert dropblock_keep_fraction((2, 2, 2), 0.3, 3) == pytest.approx(q3 ** 8, rel=1e-14)
    assert dropblock_keep_fraction((7, 7), 0.0, 3) == 1.0
    # dropblock 0.3.0's chunk-wide factor numel / kept over many masks tends to it
    torch.manual_seed(0)
    out = DropBlock2D(drop_prob=0.5, block_size=3).train()(torch.ones(20000, 1, 7, 7))
    assert (out != 0).double().mean().item() == pytest.approx(dropblock_keep_fraction((7, 7), 0.5, 3), abs=3e-3)


@pytest.mark.parametrize("masks", ["shared", "per_image"])
def test_expected_norm_one_constant_scale_same_drops_and_batch_independent(masks):
    layer = nn.Sequential(DropBlock2D(drop_prob=0.5, block_size=3))
    x = torch.ones(64, 2, 7, 7)
    imgs = _images(64, 1, 5)

    def run(norm, idx):
        with torch.inference_mode(), mc_mode(layer, samples=S, seed=SEED, masks=masks, mask_norm=norm):
            xb = x[idx].repeat_interleave(S, 0)
            if masks == "per_image":
                with row_seeds(layer, image_seeds(imgs[idx], SEED)):
                    return layer(xb).reshape(len(idx), S, 2, 7, 7)
            return layer(xb).reshape(len(idx), S, 2, 7, 7)

    ref = run("expected", torch.arange(64))
    per_mask = run("per_mask", torch.arange(64))
    assert torch.equal(ref == 0, per_mask == 0)  # same drops, only the gain differs
    gain = torch.tensor(1.0 / dropblock_keep_fraction((7, 7), 0.5, 3), dtype=torch.float32)
    assert torch.equal(ref[ref != 0].unique(), gain.reshape(1))
    assert per_mask[per_mask != 0].unique().numel() > 3
    for batch in (1, 7):
        got = torch.cat([run("expected", torch.arange(i, min(i + batch, 64))) for i in range(0, 64, batch)])
        assert torch.equal(got, ref)
    # a fully dropped tiny map gives zeros, not NaN
    tiny = nn.Sequential(DropBlock2D(drop_prob=0.9, block_size=3))
    with torch.inference_mode(), mc_mode(tiny, samples=64, seed=SEED, mask_norm="expected"):
        out = tiny(torch.ones(64, 1, 1, 1))
    assert torch.isfinite(out).all() and (out == 0).any()
    with pytest.raises(ValueError, match="mask_norm"):
        with mc_mode(layer, samples=S, seed=SEED, mask_norm="chunk"):
            pass


def test_mask_norm_in_part_only_when_expected():
    kw = dict(keys=("latent",), seed=3, drop_prob=0.5, block_size=3)
    assert MonteCarlo("dropblock", 8, **kw).part == MonteCarlo("dropblock", 8, mask_norm="expected", **kw).part
    per_mask = MonteCarlo("dropblock", 8, mask_norm="per_mask", **kw)
    assert per_mask.part != MonteCarlo("dropblock", 8, **kw).part
    assert "mask_norm" not in per_mask.identity()  # per_mask parts keep their hashes from before mask_norm
    ctx = {"seed": 3, "hooked_layer": {"path": "dropblock", "mc_samples": 8, "mask_norm": "per_mask"}}
    assert MonteCarlo.from_plan(("latent",), [], ctx).mask_norm == "per_mask"
    with pytest.raises(ValueError, match="mask_norm"):
        MonteCarlo("dropblock", 8, mask_norm="chunk", **kw)


def test_keep_fraction_is_the_mean_kept_fraction_of_our_masks():
    for shape, p, bs in (((9, 9), 0.4, 4), ((7, 7), 0.5, 3), ((3, 4, 5), 0.3, 2)):
        db = (DropBlock3D if len(shape) == 3 else DropBlock2D)(drop_prob=p, block_size=bs)
        mul, _ = deterministic_masks(db, (1, *shape), 20000, SEED, 0)
        assert (mul != 0).double().mean().item() == pytest.approx(dropblock_keep_fraction(shape, p, bs), abs=4e-3)
