"""Extraction: layer lookup, hooks, MC switch, reductions and the FeatureExtractor LightningModule."""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from larex.extraction.hooks import LayerNotFoundError, capture_input, capture_output, resolve_module
from larex.extraction.mc import MC_LAYER_TYPES, eval_mode, mc_mode, mc_modules, reduce_activation
from larex.extraction.module import KNOWN_KEYS, FeatureExtractor
from larex.models.resnet import ResNet18
from larex.models.small_cnn import SmallCNN
from _batches import predict_shuffled

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1, num_classes=5, width=8, drop_prob=0.1, block_size=3)
    for m in model.modules():  # non-trivial BN statistics, so eval != train behaviour
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _batch(n: int = 6, first: int = 0, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.arange(n) % 5, torch.arange(first, first + n)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3))


# ---------------------------------------------------------------- hooks

def test_resolve_module_and_close_name_suggestion():
    model = _cnn()
    assert resolve_module(model, "block3") is model.block3
    assert resolve_module(model, "block3.0") is model.block3[0]
    assert resolve_module(ResNet18(), "layer3.1.conv2").kernel_size == (3, 3)
    with pytest.raises(LayerNotFoundError) as err:
        resolve_module(model, "blok3")
    assert isinstance(err.value, KeyError)
    msg = str(err.value)
    assert "'blok3'" in msg and "SmallCNN" in msg and "block3" in msg and "named_modules" in msg
    assert not msg.startswith('"')  # printed as a sentence, not as a KeyError repr


def test_capture_hooks_record_and_are_removed_on_error():
    model = _cnn().eval()
    x = _batch()[0]
    with capture_output(model.block3) as out, capture_input(model.fc) as inp:
        logits = model(x)
    expected = model.block3(model.dropblock(model.block2(model.block1(x))))
    assert torch.equal(out.value, expected) and out.calls == 1 and not out.value.requires_grad
    assert torch.allclose(inp.value, expected.mean((2, 3)), atol=1e-6)
    assert torch.allclose(model.fc(inp.value), logits)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_output(model.block3), capture_input(model.fc):
            raise RuntimeError("boom")
    assert not model.block3._forward_hooks and not model.fc._forward_pre_hooks
    with capture_output(model.block2, stop_forward=True) as cap:
        model(x)
        pytest.fail("forward should stop after block2")
    assert cap.value.shape == (6, 16, 4, 4) and not model.block2._forward_hooks


# ---------------------------------------------------------------- MC switch

def test_mc_mode_only_mc_layers_train_and_bn_untouched():
    model = _cnn().train()
    model.block2[0].eval()  # a mixed state that must come back exactly
    before_flags = {n: m.training for n, m in model.named_modules()}
    before_buffers = {k: v.clone() for k, v in model.state_dict().items()}
    assert [n for n, _ in mc_modules(model)] == ["dropblock"]
    with mc_mode(model, drop_prob=0.4, block_size=2) as layers:
        assert [n for n, _ in layers] == ["dropblock"]
        assert model.dropblock.training and model.dropblock.drop_prob == 0.4 and model.dropblock.block_size == 2
        assert not any(m.training for m in model.modules() if not isinstance(m, MC_LAYER_TYPES))
        x = _batch()[0]
        outs = [model(x) for _ in range(3)]
    assert not torch.equal(outs[0], outs[1])  # DropBlock active
    after = model.state_dict()
    assert all(torch.equal(before_buffers[k], after[k]) for k in before_buffers)  # BN running stats unchanged
    assert {n: m.training for n, m in model.named_modules()} == before_flags
    assert model.dropblock.drop_prob == 0.1 and model.dropblock.block_size == 3
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert {n: m.training for n, m in model.named_modules()} == before_flags


def test_mc_mode_dropout_override_restored_on_error_and_bad_values():
    model = _mlp().eval()
    with pytest.raises(RuntimeError, match="inside"):
        with mc_mode(model, drop_prob=0.0, block_size=5):
            assert model[2].p == 0.0 and model[2].training and not model[0].training
            raise RuntimeError("inside")
    assert model[2].p == 0.2 and not model[2].training
    with pytest.raises(ValueError, match="drop_prob"):
        with mc_mode(model, drop_prob=1.0):
            pass
    with pytest.raises(ValueError, match="block_size"):
        with mc_mode(model, block_size=0):
            pass


def test_no_mc_layer_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Sequential has no dropout/DropBlock layer.*Add a DropBlock2D"):
        with mc_mode(model):
            pass
    with pytest.raises(ValueError, match="no dropout/DropBlock"):
        FeatureExtractor(model, hooked_layer="1", head="2")
    # deterministic keys only: no MC layer needed
    fe = FeatureExtractor(model, hooked_layer="1", head="2", keys=("logits", "penultimate"))
    out = fe.predict_step((torch.randn(3, 4), torch.zeros(3), torch.arange(3)))
    assert set(out) == {"logits", "penultimate"}


# ---------------------------------------------------------------- reductions

def test_reduce_activation():
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    by_hand = conv.sum(dim=3).sum(dim=2) / 20.0
    assert torch.allclose(reduce_activation(conv), by_hand, atol=1e-12)
    fc = torch.randn(2, 7, generator=g)
    assert reduce_activation(fc) is fc
    seq = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(reduce_activation(seq), seq.sum(dim=1) / 5.0, atol=1e-12)
    assert torch.allclose(reduce_activation(seq, "channels_first"), seq.sum(dim=2) / 3.0, atol=1e-12)
    vol = torch.randn(2, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(reduce_activation(vol), vol.reshape(2, 3, 8).sum(-1) / 8.0, atol=1e-12)
    with pytest.raises(ValueError, match="batch and a feature"):
        reduce_activation(torch.ones(4))
    with pytest.raises(ValueError, match="layout"):
        reduce_activation(conv, "nchw")


# ---------------------------------------------------------------- FeatureExtractor

def test_extractor_contract_shapes_and_deterministic_logits():
    model = _cnn()
    x, y, idx = _batch()
    fe = FeatureExtractor(model, "block3", head="fc", mc_samples=5, drop_prob=0.5, block_size=3)
    out = fe.predict_step((x, y, idx), 0)
    assert list(out) == list(KNOWN_KEYS)
    assert out["latent"].shape == (6, 5, 32) and out["latent"].dtype == torch.float32
    assert out["logits"].shape == (6, 5) and out["mc_logits"].shape == (6, 5, 5)
    assert out["penultimate"].shape == (6, 32) and out["labels"].dtype == torch.int64
    assert torch.equal(out["labels"], y)
    assert all(t.device.type == "cpu" for t in out.values())
    assert torch.equal(out["logits"], model.eval()(x))
    lat = out["latent"]
    assert not torch.equal(lat[:, 0], lat[:, 1])  # the S samples differ
    assert lat.std(dim=1).amax(dim=1).min() > 0  # ... for every image (dead ReLU channels stay 0)
    head = fe.head_weights()
    assert head["head.weight"].shape == (5, 32) and head["head.bias"].shape == (5,)
    recomputed = out["penultimate"] @ head["head.weight"].T + head["head.bias"]
    assert torch.allclose(recomputed, out["logits"], atol=1e-5)


def test_extractor_masks_depend_on_seed_only_and_leave_global_rng_alone():
    x, y, idx = _batch()
    fe = FeatureExtractor(_cnn(), "block3", mc_samples=4, drop_prob=0.5, keys=("latent", "mc_logits"))
    state = torch.get_rng_state()
    a = fe.predict_step((x, y, idx))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # the global RNG plays no part
    b = fe.predict_step((x, y, idx))
    assert torch.equal(a["latent"], b["latent"]) and torch.equal(a["mc_logits"], b["mc_logits"])
    c = fe.predict_step((x, y, idx + 100))  # the row number plays no part either (it did before: per-batch seeds)
    assert torch.equal(a["latent"], c["latent"])
    fe2 = FeatureExtractor(_cnn(), "block3", mc_samples=4, drop_prob=0.5, keys=("latent",), seed=1)
    assert not torch.equal(a["latent"], fe2.predict_step((x, y, idx))["latent"])
    # latent-only extraction stops after the hooked layer but draws the same masks
    fe3 = FeatureExtractor(_cnn(), "block3", mc_samples=4, drop_prob=0.5, keys=("latent",))
    calls = []
    fe3.model.fc.register_forward_hook(lambda *args: calls.append(1))
    assert torch.equal(fe3.predict_step((x, y, idx))["latent"], a["latent"])
    assert calls == []


def test_extractor_drop_prob_zero_equals_deterministic_activation():
    model = _cnn()
    x, y, idx = _batch()
    fe = FeatureExtractor(model, "block3", mc_samples=3, drop_prob=0.0, mc_batch=4)
    out = fe.predict_step((x, y, idx))
    with torch.no_grad():
        m = model.eval()
        expected = m.block3(m.dropblock(m.block2(m.block1(x)))).mean(dim=(2, 3))
    assert torch.allclose(out["latent"], expected[:, None, :].expand(-1, 3, -1), atol=1e-6)
    assert torch.allclose(out["mc_logits"], out["logits"][:, None, :].expand(-1, 3, -1), atol=1e-6)


def test_extractor_fc_layer_kept_raw_and_chunking():
    model = _mlp()
    x, y, idx = torch.randn(5, 6), torch.zeros(5), torch.arange(5)
    full = FeatureExtractor(model, "3", head="5", mc_samples=4, drop_prob=0.0).predict_step((x, y, idx))
    chunked = FeatureExtractor(model, "3", head="5", mc_samples=4, drop_prob=0.0, mc_batch=3).predict_step((x, y, idx))
    with torch.no_grad():
        expected = model.eval()[:4](x)
    assert full["latent"].shape == (5, 4, 7)
    assert torch.allclose(full["latent"], expected[:, None].expand(-1, 4, -1), atol=1e-6)
    assert torch.allclose(chunked["latent"], full["latent"], atol=1e-6)
    noisy = FeatureExtractor(model, "3", head="5", mc_samples=4, drop_prob=0.5, mc_batch=3).predict_step((x, y, idx))
    assert noisy["latent"].shape == (5, 4, 7) and not torch.equal(noisy["latent"][:, 0], noisy["latent"][:, 1])
    assert noisy["penultimate"].shape == (5, 7)


def test_extractor_validates_before_compute():
    model = _cnn()
    with pytest.raises(LayerNotFoundError, match="block3"):
        FeatureExtractor(model, "blok3")
    with pytest.raises(LayerNotFoundError, match="fc"):
        FeatureExtractor(model, "block3", head="fcc")
    with pytest.raises(TypeError, match="not nn.Linear"):
        FeatureExtractor(model, "block3", head="block3")
    with pytest.raises(ValueError, match="penultimate"):
        FeatureExtractor(model, "block3", head=None)
    with pytest.raises(ValueError, match="latnet"):
        FeatureExtractor(model, "block3", keys=("latnet",))
    with pytest.raises(ValueError, match="mc_samples"):
        FeatureExtractor(model, "block3", mc_samples=0)
    with pytest.raises(ValueError, match="drop_prob"):
        FeatureExtractor(model, "block3", drop_prob=1.5)
    fe = FeatureExtractor(model, "block3", head=None, keys=("latent", "labels"))
    with pytest.raises(ValueError, match="head"):
        fe.head_weights()
    with pytest.raises(ValueError, match=r"\(x, y, index\)"):
        fe.predict_step(_batch()[:2])


def test_extractor_warns_when_hooked_layer_precedes_mc_layers():
    fe = FeatureExtractor(_cnn(), "block1", mc_samples=3, drop_prob=0.5, keys=("latent",))
    with pytest.warns(RuntimeWarning, match="identical"):
        out = fe.predict_step(_batch())
    assert torch.equal(out["latent"][:, 0], out["latent"][:, 2])


def test_trainer_predict_returns_contract_batches():
    model = _cnn()
    x, y, idx = _batch(n=10)
    loader = DataLoader(TensorDataset(x, y, idx), batch_size=4)
    fe = FeatureExtractor(model, "dropblock", mc_samples=3, drop_prob=0.3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    preds = trainer.predict(fe, loader)
    assert [p["latent"].shape for p in preds] == [(4, 3, 16), (4, 3, 16), (2, 3, 16)]
    assert [p["logits"].shape for p in preds] == [(4, 5), (4, 5), (2, 5)]
    assert [p["mc_logits"].shape for p in preds] == [(4, 3, 5), (4, 3, 5), (2, 3, 5)]
    assert [p["penultimate"].shape for p in preds] == [(4, 32), (4, 32), (2, 32)]
    assert torch.equal(torch.cat([p["labels"] for p in preds]), y)
    # same result as calling predict_step directly on the same batch (order-independent seeding)
    direct = fe.predict_step((x[8:], y[8:], idx[8:]))
    assert torch.equal(direct["latent"], preds[2]["latent"])
    assert torch.equal(torch.cat([p["logits"] for p in preds]), model.eval()(x).detach())


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize("model_cfg,layers", [
    ("small_cnn", ["small_cnn_block3", "small_cnn_dropblock"]),
    ("resnet18", ["resnet18_layer3", "resnet18_layer4"]),
])
def test_model_and_hooked_layer_configs_instantiate_and_vary(model_cfg, layers):
    cfg = OmegaConf.create({"dataset": {"channels": 3, "num_classes": 4},
                            "model": OmegaConf.load(CONFIGS / "model" / f"{model_cfg}.yaml")})
    assert cfg.model.name == model_cfg
    assert {"epochs", "batch_size", "lr", "weight_decay", "optimizer"} <= set(cfg.model.train)
    torch.manual_seed(0)
    net = instantiate(cfg.model.net)
    assert isinstance(resolve_module(net, cfg.model.head), nn.Linear)
    x = torch.randn(2, 3, 32, 32)
    for name in layers:
        hl = OmegaConf.load(CONFIGS / "hooked_layer" / f"{name}.yaml")
        assert set(hl) == {"name", "path", "mc_samples", "drop_prob", "block_size", "mask_seed", "masks", "mask_norm"}
        fe = FeatureExtractor(net, hooked_layer=hl.path, head=cfg.model.head, mc_samples=3, keys=("latent",),
                              drop_prob=hl.drop_prob, block_size=hl.block_size)
        latent = fe.predict_step((x, torch.zeros(2), torch.arange(2)))["latent"]
        assert not torch.equal(latent[:, 0], latent[:, 1]), f"{name}: MC samples must differ"


# ---------------------------------------------------------------- shared deterministic prefix

class _SkipAroundDropout(nn.Module):
    """A residual connection around the dropout: the prefix output is reused after the MC layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 12)
        self.drop = nn.Dropout(0.3)
        self.mid = nn.Linear(12, 12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.fc(torch.relu(self.mid(self.drop(h))) + h)


@pytest.mark.parametrize("mc_batch", [None, 20])
@pytest.mark.parametrize("keys", [("latent", "mc_logits"), ("latent",)])
def test_shared_prefix_gives_the_same_samples_as_full_passes(mc_batch, keys):
    model = _cnn()
    batch = _batch(n=5, first=11)
    kw = dict(hooked_layer="block3", mc_samples=8, keys=keys, seed=3, drop_prob=0.3, mc_batch=mc_batch)
    fast = FeatureExtractor(model, share_prefix=True, **kw).predict_step(batch)
    slow = FeatureExtractor(model, share_prefix=False, **kw).predict_step(batch)
    for k in keys:
        assert fast[k].shape == slow[k].shape
        torch.testing.assert_close(fast[k], slow[k], rtol=0, atol=1e-6)
    assert not torch.equal(fast["latent"][:, 0], fast["latent"][:, 1])  # really stochastic


def test_shared_prefix_runs_the_prefix_once_per_image():
    model = _cnn()
    calls = []
    model.block1.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    FeatureExtractor(model, hooked_layer="block3", mc_samples=8, keys=("latent",), seed=0,
                     drop_prob=0.3).predict_step(_batch(n=4))
    assert calls == [4]  # not 4 * 8


def test_shared_prefix_falls_back_when_a_skip_connection_reuses_the_prefix():
    model = _SkipAroundDropout()
    batch = (torch.randn(5, 6, generator=torch.Generator().manual_seed(2)), torch.zeros(5), torch.arange(5))
    kw = dict(hooked_layer="mid", head="fc", mc_samples=6, keys=("latent", "mc_logits"), seed=1)
    with pytest.warns(RuntimeWarning, match="falling back"):
        fast = FeatureExtractor(model, share_prefix=True, **kw).predict_step(batch)
    slow = FeatureExtractor(model, share_prefix=False, **kw).predict_step(batch)
    for k in ("latent", "mc_logits"):
        torch.testing.assert_close(fast[k], slow[k], rtol=0, atol=1e-6)


def test_latents_of_an_image_do_not_depend_on_its_batch():
    """Same images at batch sizes 1, 7 and 64, shuffled, with other neighbours: the same latents and MC logits.

    The masks are exactly the same (pass s of every image uses mask s); what differs is float32 rounding of the
    CPU convolutions, whose kernels depend on the batch size (measured ~1e-7 even for the deterministic eval
    pass), so the comparison allows that rounding and nothing more: another seed moves latents by > 1e-2."""
    torch.manual_seed(0)
    model = _cnn()
    x = torch.randn(64, 1, 28, 28)
    fe = FeatureExtractor(model, "dropblock", mc_samples=8, drop_prob=0.5, block_size=3,
                          keys=("latent", "mc_logits"), mc_batch=40)
    ref = fe.predict_step((x, torch.zeros(64), torch.arange(64)))
    scale = float(ref["latent"].abs().max())
    with torch.no_grad():
        det_gap = float((model.eval()(x) - torch.cat([model.eval()(x[i:i + 1]) for i in range(64)])).abs().max())
    for bs in (1, 7, 64):
        got = predict_shuffled(fe, x, bs, ("latent", "mc_logits"))
        torch.testing.assert_close(got["latent"], ref["latent"], rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(got["mc_logits"], ref["mc_logits"], rtol=0, atol=max(100 * det_gap, 1e-5))
    alone = fe.predict_step((x[5:6], torch.zeros(1), torch.tensor([0])))  # alone, with another row number
    torch.testing.assert_close(alone["latent"][0], ref["latent"][5], rtol=0, atol=1e-5 * scale)
    other = FeatureExtractor(model, "dropblock", mc_samples=8, drop_prob=0.5, block_size=3, keys=("latent",),
                             seed=1).predict_step((x, torch.zeros(64), torch.arange(64)))
    assert float((other["latent"] - ref["latent"]).abs().max()) > 1e-2 * scale
