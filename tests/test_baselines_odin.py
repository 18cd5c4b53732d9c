"""ODIN with input perturbation (Liang et al., ICLR 2018): the extractor's ``odin_logits`` and their scores.

References: pytorch-ood 0.4's ``odin_preprocessing`` / ``ODIN`` run on the same model and inputs, and the
paper's formula written out here one sample at a time."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from pytorch_ood.detector import ODIN as OodODIN
from pytorch_ood.detector import odin_preprocessing
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from larex.tasks.classification import Classification
from larex.extraction.module import FeatureExtractor
from larex.extraction.plan import plan_extraction
from larex.extraction.producers.odin import ODIN as OdinProducer
from larex.models.small_cnn import SmallCNN
from larex.postprocessors.logits import ODIN
from larex.stages.common import method_requests
from larex.stages.evaluate import check_requirements

PAPER = {"temperature": 1000.0, "epsilon": 0.0014}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1, num_classes=5, width=8)
    for m in model.modules():  # non-trivial BN statistics, so train mode would differ from eval
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 5))


def _cnn_input(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _mlp_input(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))


def _batch(x: torch.Tensor):
    return x, torch.arange(x.shape[0]) % 5, torch.arange(x.shape[0])


CASES = [("cnn", "block3", "fc", 1000.0, 0.0014), ("cnn", "block3", "fc", 1.0, 0.05),
         ("mlp", "2", "4", 1000.0, 0.0014), ("mlp", "2", "4", 10.0, 0.1)]


@pytest.mark.parametrize("kind,layer,head,t,eps", CASES)
def test_odin_logits_and_scores_equal_pytorch_ood_also_inside_trainer_predict(kind, layer, head, t, eps):
    model = _cnn() if kind == "cnn" else _mlp()
    x = _cnn_input() if kind == "cnn" else _mlp_input()
    ext = FeatureExtractor(model, hooked_layer=layer, head=head, keys=("logits",),
                           odin={"temperature": t, "epsilon": eps})
    direct = ext.predict_step(_batch(x))
    assert set(direct) == {"logits", "odin_logits"}
    assert direct["odin_logits"].dtype == torch.float32 and direct["odin_logits"].shape == (16, 5)
    loader = DataLoader(TensorDataset(*_batch(x)), batch_size=8, shuffle=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    via_trainer = torch.cat([p["odin_logits"] for p in trainer.predict(ext, dataloaders=loader)])

    model.eval()
    with torch.no_grad():
        ref_logits = model(odin_preprocessing(model, x, eps=eps, temperature=t))
    ref_scores = OodODIN(model, eps=eps, temperature=t).predict(x).numpy()  # negated: higher = more OOD
    scale = ref_logits.abs().max().item()
    for got in (direct["odin_logits"], via_trainer):
        torch.testing.assert_close(got, ref_logits, atol=1e-5 * scale, rtol=1e-5)
        ours = ODIN(temperature=t, key="odin_logits").score({"odin_logits": got.numpy()})
        assert ours.shape == (16,)
        # pytorch-ood's float32 softmax resolves ~3e-8 here; at T=1000 the scores span only ~1e-6
        assert abs(ours + ref_scores).max() < 1e-7
    # the perturbation is real, and ODIN's step raises the max softmax (at T) of (almost) every input
    plain = ODIN(temperature=t, key="logits").score({"logits": direct["logits"].numpy()})
    perturbed = ODIN(temperature=t, key="odin_logits").score({"odin_logits": direct["odin_logits"].numpy()})
    assert (direct["odin_logits"] - direct["logits"]).abs().max() > 20 * 1e-5 * scale  # >> the tolerance above
    assert (perturbed > plain).mean() >= 0.9


def test_odin_perturbation_follows_the_paper_formula_per_sample():
    model = _cnn().eval()
    x = _cnn_input(n=6, seed=3)
    t, eps = 1000.0, 0.0014
    got = FeatureExtractor(model, hooked_layer="block3", keys=("labels",),
                           odin={"temperature": t, "epsilon": eps}).predict_step(_batch(x))
    assert set(got) == {"labels", "odin_logits"}
    for i in range(x.shape[0]):  # x~ = x - eps * sign(-grad_x log max_c softmax(f(x) / T)_c), one sample alone
        xi = x[i:i + 1].clone().requires_grad_(True)
        log_msp = torch.log_softmax(model(xi) / t, dim=1).max()
        (g,) = torch.autograd.grad(log_msp, xi)
        with torch.no_grad():
            ref = model(x[i:i + 1] - eps * torch.sign(-g))[0]
        torch.testing.assert_close(got["odin_logits"][i], ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_zero_epsilon_gives_the_plain_logits():
    for model, x, layer in ((_cnn(), _cnn_input(), "block3"), (_mlp(), _mlp_input(), "2")):
        out = FeatureExtractor(model, hooked_layer=layer, head=None, keys=("logits",),
                               odin={"temperature": 1000, "epsilon": 0}).predict_step(_batch(x))
        torch.testing.assert_close(out["odin_logits"], out["logits"], atol=0, rtol=0)


def test_no_parameter_grads_and_training_flags_restored():
    model = _cnn()
    model.train()
    model.block2.eval()  # a mixed state, which must come back as it was
    flags = {n: m.training for n, m in model.named_modules()}
    bn = model.block1[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    ext = FeatureExtractor(model, hooked_layer="block3", keys=("logits",), odin=PAPER)
    with torch.inference_mode():  # as Lightning's predict loop runs it
        a = ext.predict_step(_batch(_cnn_input()))
    b = ext.predict_step(_batch(_cnn_input()))
    torch.testing.assert_close(a["odin_logits"], b["odin_logits"], atol=0, rtol=0)  # deterministic
    assert all(p.grad is None for p in model.parameters())
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]


def test_odin_arguments_and_the_plan_from_the_method():
    model = _cnn()
    with pytest.raises(ValueError, match="odin="):
        FeatureExtractor(model, hooked_layer="block3", keys=("logits", "odin_logits"))
    for bad in ({"temperature": 1000.0}, {"temperature": 1.0, "epsilon": 0.1, "eps": 0.1}, [1000.0, 0.0014]):
        with pytest.raises(ValueError, match="exactly the keys"):
            FeatureExtractor(model, hooked_layer="block3", odin=bad)
    for bad in ({"temperature": 0.0, "epsilon": 0.1}, {"temperature": 1.0, "epsilon": -0.1},
                {"temperature": float("nan"), "epsilon": 0.1}, {"temperature": 1.0, "epsilon": "0.1"}):
        with pytest.raises(ValueError, match="finite number"):
            FeatureExtractor(model, hooked_layer="block3", odin=bad)
    with pytest.raises(TypeError, match="floating"):
        FeatureExtractor(model, hooked_layer="block3", keys=("labels",), odin=PAPER).predict_step(
            _batch(torch.zeros(2, 1, 8, 8, dtype=torch.int64)))

    # the method carries the producer's parameters: the plan builds the ODIN producer from them
    method = ODIN(temperature=1000, key="odin_logits", epsilon=0.0014)
    assert method.extraction_params() == {"odin_logits": PAPER}
    assert ODIN().extraction_params() == {"logits": {}}  # temperature-only ODIN asks the producer for nothing
    context = {"seed": 0, "hooked_layer": {"path": "block3", "mc_samples": 2}, "head": "fc", "extract": {}}
    plan = plan_extraction(method_requests({"odin_perturbed": method}), context, always=Classification.always_keys)
    (producer,) = [p for p in plan.producers if isinstance(p, OdinProducer)]
    assert producer.identity() == PAPER and "odin_logits" in plan.parts
    ext = FeatureExtractor(model, producers=plan.producers)
    assert set(ext.predict_step(_batch(_cnn_input(n=3)))) == {"labels", "odin_logits"}
    with pytest.raises(ValueError, match="different parameters"):  # two ODIN methods must agree
        plan_extraction(method_requests({"a": method, "b": ODIN(key="odin_logits", epsilon=0.01)}), context)


def test_odin_perturbed_yaml_plans_the_perturbed_logits():
    with initialize_config_module(config_module="larex.configs", version_base="1.3"):
        cfg = compose("run", overrides=["baselines=[odin_perturbed]"])
        assert "odin" not in cfg.extract  # no extract.odin: the method's YAML holds T and epsilon
        run = check_requirements(cfg)
        assert run.methods["odin_perturbed"].extraction_params() == {"odin_logits": PAPER}
        (producer,) = [p for p in run.plan.producers if isinstance(p, OdinProducer)]
        assert producer.identity() == PAPER
        run = check_requirements(compose("run", overrides=["baselines=[odin,odin_perturbed]"]))
        assert "odin_logits" in run.plan.parts and run.methods["odin"].requires == ("logits",)
        with pytest.raises(Exception, match="ODIN epsilon must be a finite number >= 0"):  # Hydra wraps it
            check_requirements(compose("run", overrides=["baselines=[odin_perturbed]",
                                                         "baselines.odin_perturbed.epsilon=-1"]))
        cfg = compose("run", overrides=["experiment=fmnist_demo"])
        assert "odin_perturbed" in cfg.baselines or "all" in cfg.baselines
        assert "odin_logits" in check_requirements(cfg).plan.parts
