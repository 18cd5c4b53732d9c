"""The extraction plan: derived from the selected methods' fit and score needs, producer settings taken from
the method and model YAMLs, part hashes that change only with what the arrays depend on."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

from larex import features
from larex.extraction.module import FeatureExtractor
from larex.extraction.plan import PlanError, plan_extraction
from larex.models.small_cnn import SmallCNN
from larex.stages.common import ConfigError, prepare

CONTEXT = {"seed": 0, "hooked_layer": {"path": "dropblock", "mc_samples": 4, "drop_prob": 0.5, "block_size": 3},
           "head": "fc", "extract": {"mc_batch": None}}


def run_of(*overrides):
    with initialize_config_module("larex.configs", version_base="1.3"):
        return prepare(compose("run", overrides=["output_root=/nonexistent", *overrides]))


def producers(run):
    return {p.name: set(p.keys) for p in run.plan.producers}


def test_lared_and_larem_plan_the_mc_latents_only():
    run = run_of()
    assert producers(run) == {"mc": {"latent"}, "labels": {"labels"}}
    fe = FeatureExtractor(SmallCNN(in_channels=1, num_classes=8), producers=run.plan.producers)
    calls = []
    fe.model.fc.register_forward_hook(lambda *a: calls.append(1))
    out = fe.predict_step((torch.randn(3, 1, 28, 28), torch.zeros(3), torch.arange(3)))
    assert set(out) == {"latent", "labels"} and out["latent"].shape == (3, 16, 64)
    assert calls == []  # no logits, no MC logits: the head never ran


def test_baselines_add_the_producers_of_what_they_read():
    assert producers(run_of("baselines=[msp]")) == {"mc": {"latent"}, "deterministic": {"logits"},
                                                    "labels": {"labels"}}
    run = run_of("postprocessor=[]", "baselines=[mdist,vim,mcd_mi]")
    assert producers(run) == {"deterministic": {"logits", "penultimate"}, "head": {"head.weight", "head.bias"},
                              "mc": {"mc_logits"}, "labels": {"labels"}}


def test_producer_settings_come_from_the_method_and_model_yaml():
    run = run_of("baselines=[odin_perturbed,nac_ue]", "baselines.odin_perturbed.temperature=10",
                 "baselines.odin_perturbed.epsilon=0.002")
    odin = run.plan.producer_of("odin_logits")
    assert (odin.temperature, odin.epsilon) == (10.0, 0.002)
    assert run.plan.producer_of("nac.block3").layers == ("block3",)
    resnet = run_of("model=resnet18", "hooked_layer=resnet18_layer3", "dataset=cifar10", "baselines=[nac_ue]")
    assert "nac.layer4" in resnet.plan.parts and "nac.block3" not in resnet.plan.parts  # layers in one place


def test_part_hashes_follow_what_the_arrays_depend_on():
    base = run_of("baselines=[msp]")
    more_samples = run_of("baselines=[msp]", "hooked_layer.mc_samples=8")
    chunks = run_of("baselines=[msp]", "extract.batch_size=7", "extract.mc_batch=13")
    assert more_samples.plan.parts["latent"] != base.plan.parts["latent"]
    assert more_samples.plan.parts["logits"] == base.plan.parts["logits"]
    assert more_samples.layout.extract_dir == base.layout.extract_dir  # same rows and model: one folder
    assert chunks.plan.parts == base.plan.parts and chunks.layout.extract_dir == base.layout.extract_dir
    assert run_of("baselines=[msp]", "limit.fit=100").layout.extract_dir != base.layout.extract_dir
    assert run_of("baselines=[msp]", "evaluate.tpr=0.9").layout.evaluate_dir != base.layout.evaluate_dir


def test_conflicting_producer_settings_and_unknown_keys_are_config_errors():
    with pytest.raises(ValueError, match="different parameters"):
        plan_extraction({"odin_logits": [{"temperature": 1000.0, "epsilon": 0.0}, {"temperature": 1.0, "epsilon": 0.0}]},
                        CONTEXT)
    with pytest.raises(features.UnknownFeatureError, match="close keys.*'logits'"):
        plan_extraction({"logit": [{}]}, CONTEXT)
    with pytest.raises(PlanError, match="aggregate stage"):
        plan_extraction({"entropy": [{}]}, CONTEXT)  # without the task's derived keys
    assert set(plan_extraction({"entropy": [{}]}, CONTEXT, derived={"entropy": ("latent",)},
                               always=("labels",)).parts) == {"latent", "labels"}
    assert set(plan_extraction({"logits": [{}]}, CONTEXT).parts) == {"logits"}  # nothing added unless asked


def test_features_of_another_task_fail_before_compute():
    features.register(features.FeatureSpec("test_box_logits", "box", 2, "larex.extraction.producers.labels.Labels",
                                           "per-box logits (test)", ("detection",)))
    from larex.tasks.classification import Classification

    with pytest.raises(ValueError, match="classification.*test_box_logits.*detection"):
        Classification().check_keys(["latent", "test_box_logits"])
    Classification().check_keys(["latent", "entropy", "logits"])


def test_unknown_method_key_fails_at_composition():
    with pytest.raises(Exception, match="temprature"):
        run_of("baselines=[odin]", "baselines.odin.temprature=2")
    with pytest.raises(ConfigError, match="selected twice"):
        run_of("postprocessor=[lared]", "+baselines.lared._target_=larex.postprocessors.lared.LaRED")
