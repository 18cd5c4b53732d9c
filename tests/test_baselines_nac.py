"""NAC-UE (Liu et al., ICLR 2024): the extractor's raw ``nac.<layer>`` statistics and the NACUE postprocessor.

References: the statistics are checked against a per-sample autograd loop written here from the paper's
definition; the scores (fixed alpha) against pytorch-ood 0.4's ``NACUE`` run on the same model and images."""
from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from larex.tasks.classification import Classification
from larex.extraction.hooks import LayerNotFoundError
from larex.extraction.module import FeatureExtractor
from larex.extraction.plan import plan_extraction
from larex.extraction.producers.nac import NAC
from larex.metrics import auroc
from larex.models.small_cnn import SmallCNN
from larex.postprocessors.base import MissingFeatureError
from larex.postprocessors.nac import NACUE, bin_indices, geometric_edges
from larex.stages.common import method_requests

ALPHA = 1e5  # steep enough that the states of a random-init net are spread over (0, 1), not all ~0.5


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: threads only add contention (and run-to-run noise)
    yield
    torch.set_num_threads(n)


def _cnn(seed: int = 0, num_classes: int = 5) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1, num_classes=num_classes, width=8)
    for m in model.modules():  # non-trivial BN statistics, so train mode would differ from eval
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _manual_forward(model: SmallCNN, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SmallCNN's eval forward written out without in-place ops, returning the NAC layers' outputs."""
    out = {}
    h = out["block1.1"] = model.block1[1](model.block1[0](x))  # BN output (followed by ReLU(inplace=True))
    h = model.block1[3](F.relu(h))
    h = out["block2"] = model.block2(h)
    h = out["block3"] = model.block3(h)  # DropBlock is the identity in eval mode
    return model.fc(h.mean(dim=(2, 3))), out


def _reference_raw(model: SmallCNN, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """Paper definition, one sample at a time: mean_hw(z * dKL(u || p)/dz) (before the sigmoid)."""
    model.eval()
    rows = {k: [] for k in layers}
    with torch.enable_grad():
        for i in range(x.shape[0]):
            logits, acts = _manual_forward(model, x[i:i + 1])
            p = torch.softmax(logits, dim=1)[0]
            u = torch.full_like(p, 1.0 / p.numel())
            kl = (u * (u.log() - p.log())).sum()
            grads = torch.autograd.grad(kl, [acts[k] for k in layers])
            for k, g in zip(layers, grads):
                rows[k].append((acts[k] * g).mean(dim=(2, 3))[0])
    return {k: torch.stack(v).detach() for k, v in rows.items()}


def _batch(n: int = 10, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.arange(n) % 5, torch.arange(n)


def test_nac_statistics_equal_per_sample_autograd_also_inside_trainer_predict():
    model = _cnn()
    model.train()  # the extractor must switch to eval for the NAC pass and restore the flags
    layers = ["block1.1", "block2", "block3"]  # block1.1 is overwritten in place by the next ReLU
    ext = FeatureExtractor(model, hooked_layer="block3", head="fc", keys=("logits",), nac_layers=layers)
    x, y, idx = _batch()
    ref = _reference_raw(model, x, layers)
    model.train()

    direct = ext.predict_step((x, y, idx))
    assert set(direct) == {"logits", "nac.block1.1", "nac.block2", "nac.block3"}
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    preds = trainer.predict(ext, DataLoader(TensorDataset(x, y, idx), batch_size=4))
    via_trainer = {k: torch.cat([p[k] for p in preds]) for k in direct}

    for k in layers:
        got, scale = direct[f"nac.{k}"], ref[k].abs().max().item()
        assert got.dtype == torch.float32 and got.shape == (10, ref[k].shape[1])
        states = torch.sigmoid(ALPHA * got)  # raw, no sigmoid applied: spread over (0, 1) at this alpha
        assert states.std() > 0.01 and ((states > 0.01) & (states < 0.99)).float().mean() > 0.5
        torch.testing.assert_close(got, ref[k], atol=1e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(via_trainer[f"nac.{k}"], ref[k], atol=1e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(states, torch.sigmoid(ALPHA * ref[k]), atol=1e-5, rtol=0)
    torch.testing.assert_close(via_trainer["logits"], direct["logits"])


class _Residual(nn.Module):
    """conv -> BN, then ``h += skip`` in place (as torchvision's BasicBlock does after bn2) -> ReLU -> fc."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x, manual: bool = False):
        z = self.bn(self.conv(x))
        h = z + x if manual else z.add_(x)
        h = torch.relu(h).mean(dim=(2, 3))
        return (self.fc(h), z) if manual else self.fc(h)


def test_nac_statistics_of_a_layer_modified_in_place_later():
    model = _Residual().eval()
    x, y, idx = _batch(n=5)
    got = FeatureExtractor(model, hooked_layer="bn", head="fc", keys=("logits",),
                           nac_layers=["bn"]).predict_step((x, y, idx))["nac.bn"]
    for i in range(5):
        logits, z = model(x[i:i + 1], manual=True)
        kl = -torch.log_softmax(logits, dim=1).mean() - np.log(1 / 3)  # KL(u || p), u uniform on 3 classes
        (g,) = torch.autograd.grad(kl, [z])
        ref = (z * g).mean(dim=(2, 3))[0].detach()
        torch.testing.assert_close(got[i], ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4)


def test_extractor_nac_arguments_and_the_plan_from_the_method():
    model = _cnn()
    with pytest.raises(LayerNotFoundError, match="blok3"):
        FeatureExtractor(model, hooked_layer="block3", nac_layers=["blok3"])
    with pytest.raises(ValueError, match="nac_layers"):
        FeatureExtractor(model, hooked_layer="block3", keys=("logits", "nac.block3"))
    # the method's layers are its required keys; the plan builds the NAC producer for exactly those
    method = NACUE(layers=["block2", "block3"])
    assert method.requires == ("nac.block2", "nac.block3") and method.fit_requires == method.requires
    assert method.extraction_params() == {"nac.block2": {}, "nac.block3": {}}
    context = {"seed": 0, "hooked_layer": {"path": "block3", "mc_samples": 2}, "head": "fc", "extract": {}}
    plan = plan_extraction(method_requests({"nac_ue": method}), context, always=Classification.always_keys)
    (producer,) = [p for p in plan.producers if isinstance(p, NAC)]
    assert producer.layers == ("block2", "block3")
    out = FeatureExtractor(model, producers=plan.producers).predict_step(_batch(n=3))
    assert set(out) == {"labels", "nac.block2", "nac.block3"}
    assert out["nac.block2"].shape == (3, 16) and out["nac.block3"].shape == (3, 32)


def test_nac_ue_yaml_takes_its_layers_from_the_model_config():
    import importlib.resources

    from hydra.utils import instantiate

    spec = OmegaConf.load(str(importlib.resources.files("larex.configs") / "baselines" / "nac_ue.yaml"))
    assert OmegaConf.to_container(spec)["layers"] == "${model.nac_layers}"  # no layer named in the method YAML
    for layers in (["block3"], ["layer3", "layer4"]):
        cfg = OmegaConf.create({"model": {"nac_layers": layers}, "m": spec})
        pp = instantiate(cfg.m)
        assert pp.layers == layers and pp.requires == tuple(f"nac.{l}" for l in layers)


def test_bins_equal_pytorch_ood_geometric_bins():
    from pytorch_ood.detector.nac import _bin_indices_geometric

    rng = np.random.default_rng(0)
    one = np.float32(1.0)
    near_one = one - np.arange(300, dtype=np.float32) * np.spacing(np.float32(0.9))  # float32 steps below 1
    states = np.concatenate([
        rng.uniform(0, 1, 2000), 1 / (1 + np.exp(-rng.normal(0, 8, 2000))), near_one,
        [0.0, 1e-6, 1e-7, 0.5, np.nextafter(np.float32(0.5), np.float32(0)), 1.0],
    ]).astype(np.float32)
    for m in (2, 10, 50, 64):
        expected = _bin_indices_geometric(torch.from_numpy(states), m).numpy()
        np.testing.assert_array_equal(bin_indices(states, geometric_edges(m)), expected)
    for m in (7, 50):
        e = geometric_edges(m)
        assert e.shape == (m + 1,) and np.all(np.diff(e) > 0)
        np.testing.assert_array_equal(bin_indices(e[1:], e), np.arange(m))  # bin k = (e[k], e[k+1]]: all m used


@pytest.fixture(scope="module")
def digits():
    """SmallCNN trained for a few seconds on sklearn's digits (ID), with held-out and shifted images."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = load_digits()
    x = (torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None] - 0.3) / 0.4
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, width=8)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(10):
        for i in range(0, 1200, 100):
            opt.zero_grad()
            F.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
    model.eval()
    test = x[1200:]
    with torch.no_grad():
        acc = (model(test).argmax(1) == y[1200:]).float().mean().item()
    torch.set_num_threads(n)
    assert acc > 0.9
    shifted = {"inverted": 2 * test.mean() - test, "noise": torch.randn_like(test) * test.std() + test.mean()}
    return model, x[:1200], test, shifted


def _raw(model, x, layers) -> dict[str, np.ndarray]:
    ext = FeatureExtractor(model, hooked_layer="block3", head="fc", keys=("logits",), nac_layers=layers)
    return {k: v.numpy() for k, v in ext.predict_step((x, torch.zeros(len(x)), torch.arange(len(x)))).items()}


@pytest.mark.parametrize("layers,alpha", [(["block3"], 100.0), (["block2", "block3"], [300.0, 100.0])])
def test_nacue_scores_equal_pytorch_ood_at_a_fixed_alpha(digits, layers, alpha):
    from pytorch_ood.detector import NACUE as RefNACUE

    model, fit_x, test_x, shifted = digits
    pp = NACUE(layers=layers, alpha=alpha).fit(_raw(model, fit_x, layers))  # ours: raw statistics + alpha
    ref = RefNACUE(model, layers=[model.get_submodule(k) for k in layers], alpha=alpha)  # m_bins=50, o_star=50
    ref.fit(DataLoader(TensorDataset(fit_x), batch_size=300))
    for x in (test_x, shifted["noise"]):
        ours = pp.score(_raw(model, x, layers))
        # pytorch-ood returns minus the sum over layers of the per-layer coverage; ours is the layer mean
        theirs = -ref.predict(x).double().numpy() / len(layers)
        assert np.ptp(ours) > 0.05
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    for layer, counts in zip(layers, (s.counts for s in ref._stats)):
        np.testing.assert_array_equal(pp.counts_[layer], counts.numpy())


def test_nacue_auto_alpha_gives_varying_scores_that_separate_shifted_digits(digits):
    model, fit_x, test_x, shifted = digits
    fit = _raw(model, fit_x, ["block3"])
    pp = NACUE(layers=["block3"]).fit(fit)  # alpha="auto" is the default
    raw = fit["nac.block3"].astype(np.float64)
    median = np.median(np.abs(raw[raw != 0]))
    assert pp.alpha_["block3"] == pytest.approx(math.log(19) / median, rel=1e-12)
    # definition: the median non-zero |statistic| maps to state 0.95 (or 0.05)
    states = 1 / (1 + np.exp(-pp.alpha_["block3"] * raw[raw != 0]))
    assert np.median(np.abs(states - 0.5)) == pytest.approx(0.45, abs=1e-3)
    s_id = pp.score(_raw(model, test_x, ["block3"]))
    assert np.ptp(s_id) > 0.2 and len(np.unique(s_id)) > 50
    for name, x in shifted.items():
        assert auroc(s_id, pp.score(_raw(model, x, ["block3"]))) > 0.8, name


def test_nacue_refuses_degenerate_states(digits):
    model, fit_x, _, _ = digits
    fit = _raw(model, fit_x, ["block2", "block3"])
    with pytest.raises(ValueError, match=r"'block3'.*next to 0\.5.*larger alpha"):
        NACUE(layers=["block2", "block3"], alpha=[100.0, 1e-3]).fit(fit)  # all states ~0.5: one score for all
    rng = np.random.default_rng(0)
    positive = {"nac.a": rng.uniform(1e-3, 2e-3, size=(200, 4)).astype(np.float32)}
    positive["nac.a"][:32, 0] = 0  # 4% exact zeros (state 0.5): sign-only bins hold 4% + 96% of the states
    with pytest.raises(ValueError, match=r"'a'.* 4\.00% .*next to 0\.5 and 96\.00% .*end bins.*smaller alpha"):
        NACUE(layers=["a"], alpha=1e6).fit(positive)  # every other state 1.0
    assert NACUE(layers=["a"]).fit(positive).alpha_["a"] < 1e6  # auto is fine on the same data
    constant = {"nac.a": np.tile(np.linspace(-2e-3, 2e-3, 6, dtype=np.float32), (200, 1))}
    with pytest.raises(ValueError, match=r"'a'.*single bin.*barely varies"):
        NACUE(layers=["a"]).fit(constant)
    with pytest.raises(ValueError, match=r"'a'.*gradients vanish"):
        NACUE(layers=["a"]).fit({"nac.a": np.zeros((50, 4), dtype=np.float32)})


def test_nacue_fit_counts_valid_num_and_state_round_trip():
    rng = np.random.default_rng(0)
    alpha = {"a": 100.0, "b": 10.0}  # u = alpha * raw ~ N(0, 6) and N(2, 4): states over all bins
    fit = {"nac.a": (rng.normal(0, 6, size=(400, 6)) / 100).astype(np.float32),
           "nac.b": (rng.normal(2, 4, size=(400, 3)) / 10).astype(np.float32)}
    test = {k: v[:50] for k, v in fit.items()}
    pp = NACUE(layers=["a", "b"], alpha=[100, 10], bins=[8, 10], o_star=[5, 20]).fit(fit)
    assert pp.requires == ("nac.a", "nac.b") and pp.alpha_ == alpha
    # independent states, histogram per neuron and coverage formula, one neuron at a time
    expected = np.zeros(50)
    for key, layer, m, o in (("nac.a", "a", 8, 5), ("nac.b", "b", 10, 20)):
        e = geometric_edges(m).astype(np.float64)
        states = 1 / (1 + np.exp(-alpha[layer] * fit[key].astype(np.float64)))
        for j in range(fit[key].shape[1]):
            z = np.clip(states[:, j], e[0], e[-1])
            counts = np.array([np.sum((z > e[k]) & (z <= e[k + 1])) + (k == 0) * np.sum(z <= e[0])
                               for k in range(m)])
            np.testing.assert_array_equal(pp.counts_[layer][j], counts)
            assert np.count_nonzero(counts) >= m - 2  # the states use (nearly) every bin
            expected += np.minimum(counts[bin_indices(states[:50, j], e)] / o, 1.0) / fit[key].shape[1] / 2
    np.testing.assert_allclose(pp.score(test), expected, rtol=1e-12)

    state = pp.fitted_state()
    assert state["alpha.a"].tolist() == [100.0] and state["alpha.b"].tolist() == [10.0]
    restored = NACUE(layers=["a", "b"], bins=[8, 10], o_star=[5, 20]).set_fitted_state(state)  # alpha "auto"
    assert restored.alpha_ == alpha
    np.testing.assert_array_equal(restored.score(test), pp.score(test))
    with pytest.raises(ValueError, match="alpha.b"):
        NACUE(layers=["a", "b"], bins=[8, 10]).set_fitted_state({k: v for k, v in state.items() if k != "alpha.b"})

    sub = NACUE(layers=["a"], valid_num=100, seed=3).fit(fit)  # auto alpha, from the same 100 rows
    rows = np.sort(np.random.default_rng(3).choice(400, 100, replace=False))
    assert sub.alpha_["a"] == pytest.approx(math.log(19) / np.median(np.abs(fit["nac.a"][rows])), rel=1e-12)
    assert np.all(sub.counts_["a"].sum(axis=1) == 100)
    assert not np.array_equal(sub.counts_["a"], NACUE(layers=["a"], valid_num=100, seed=4).fit(fit).counts_["a"])


def test_nacue_missing_feature_and_bad_arguments():
    pp = NACUE(layers=["block3"])
    with pytest.raises(MissingFeatureError) as err:
        pp.fit({"logits": np.zeros((4, 3), dtype=np.float32)})
    assert "'nac.block3'" in str(err.value) and "nac_ue.layers=[block3]" in str(err.value)
    assert "extract.nac_layers" not in str(err.value)  # no such setting: the plan follows the method
    with pytest.raises(ValueError, match="bins"):
        NACUE(layers=["a", "b"], bins=[10])
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "Auto", [1.0], [1.0, "x"]):
        with pytest.raises(ValueError, match="alpha"):
            NACUE(layers=["a", "b"], alpha=bad)
    assert NACUE(layers=["a", "b"], alpha=["auto", 5]).alpha == ["auto", 5.0]
