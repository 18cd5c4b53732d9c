"""Every option of every config group composes (the in-process equivalent of `--cfg job`), typos fail
early naming the key, and the packaged configs are the ones the console scripts use."""
from __future__ import annotations

import importlib.resources

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

CONFIGS = importlib.resources.files("larex.configs")
GROUPS = ("task", "dataset", "model", "hooked_layer", "estimator", "postprocessor", "ood", "experiment", "baselines")
STAGES = ("train", "extract", "aggregate", "evaluate", "run")


def options(group):
    d = CONFIGS / group
    if not d.is_dir():
        return []
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))


def override(group, opt):
    if group == "ood":
        return f"+ood=[{opt}]"
    if group in ("postprocessor", "baselines"):
        return f"{group}=[{opt}]"
    return f"{group}={opt}"


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.fixture(scope="module", autouse=True)
def hydra_ctx():
    with initialize_config_module(config_module="larex.configs", version_base="1.3"):
        yield


@pytest.mark.parametrize("stage", STAGES)
def test_default_config_of_every_stage_composes_and_resolves(stage):
    cfg = compose(stage)
    OmegaConf.resolve(cfg)
    assert cfg.stage == stage
    assert cfg.dataset.name == "fashion_mnist" and cfg.model.name == "small_cnn"
    assert set(cfg.postprocessor) == {"lared", "larem"}
    assert "ood" not in cfg  # +ood=[...] adds sets; dataset.default_ood is used otherwise


def test_every_group_has_options():
    for g in ("task", "dataset", "model", "hooked_layer", "postprocessor", "ood", "experiment"):
        assert options(g), f"configs/{g}/ is empty"


@pytest.mark.parametrize("group,opt", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes(group, opt):
    cfg = compose("run", overrides=[override(group, opt)])
    if group == "ood":
        assert opt in cfg.ood
    elif group in ("postprocessor", "baselines"):
        assert list(cfg[group]) == [opt]
        assert "_target_" in cfg[group][opt] or opt == "all"
    try:
        OmegaConf.resolve(cfg)
    except MissingMandatoryValue as err:  # e.g. image folders whose root the user must give
        assert "root" in str(err)


def test_multi_select_ood_and_image_folder_root():
    cfg = compose("evaluate", overrides=["+ood=[image_folder,digits]", "ood.image_folder.root=/some/dir"])
    assert list(cfg.ood) == ["image_folder", "digits"]
    assert "/some/dir" in OmegaConf.to_yaml(cfg, resolve=True)


def test_typo_in_key_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="batchsize"):
        compose("extract", overrides=["extract.batchsize=3"])


def test_default_ood_names_exist():
    cfg = compose("run")
    for name in cfg.dataset.default_ood:
        assert name in options("ood")
    for ds in options("dataset"):
        for name in compose("run", overrides=[f"dataset={ds}"]).dataset.get("default_ood") or []:
            assert name in options("ood"), f"dataset {ds}: default_ood {name} has no configs/ood/{name}.yaml"


def test_demo_experiment_selects_every_baseline_and_plans_their_features():
    from larex.stages.common import prepare

    run = prepare(compose("run", overrides=["experiment=fmnist_demo"]))
    names = set(run.methods)
    assert {"lared", "larem", "msp", "vim", "knn", "nac_ue", "mcd_mi"} <= names and len(names) >= 12
    assert {"latent", "mc_logits", "logits", "penultimate", "labels", "nac.block3", "odin_logits",
            "head.weight", "head.bias"} == set(run.plan.parts)


def test_reference_recipe_and_study_experiments():
    from larex.aggregation.knn import KNNEntropy
    from larex.stages.common import all_splits, prepare

    ref = prepare(compose("run", overrides=["experiment=larex_reference"]))
    lared, larem = ref.methods["lared"], ref.methods["larem"]
    assert (lared.pca, lared.whiten, lared.bandwidth, lared.standardize, lared.features) == \
        ("auto", True, 1.0, False, ("entropy",))
    assert (larem.standardize, larem.features) == (False, ("entropy",))
    assert ref.cfg.hooked_layer.masks == "per_image" and ref.cfg.hooked_layer.name == "dropblock"
    est = ref.task.aggregation_steps({"estimator": KNNEntropy()})[0].identity
    assert est["estimator"] == "knn" and est["k"] is None
    study = compose("run", overrides=["experiment=larex_study"], return_hydra_config=True)
    assert str(study.hydra.mode) in ("MULTIRUN", "RunMode.MULTIRUN")
    params = study.hydra.sweeper.params
    with open_dict(study):
        del study["hydra"]
    assert set(params["estimator"].split(",")) <= set(options("estimator"))
    assert [int(s) for s in str(params["hooked_layer.mc_samples"]).split(",")] == [8, 16, 32]
    run = prepare(study)
    assert set(run.plan.parts) == {"latent", "labels"}  # LaRED/LaREM variants only: no logits extracted
    assert {"val_ood/fmnist_holdout_val", "val_ood/fmnist_shift_val"} <= set(all_splits(study))
    assert not set(study.evaluate.val_ood) & set(study.dataset.default_ood)


def test_threads_key_pins_torch_threads_and_rejects_bad_values():
    import torch

    from larex.stages.common import ConfigError, set_threads

    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)  # null keeps whatever is set
        assert torch.get_num_threads() == 1
        for bad in (0, -2, 1.5, True, "2"):
            with pytest.raises(ConfigError, match="threads"):
                set_threads(bad)
    finally:
        torch.set_num_threads(before)
    assert compose("run").threads is None
    assert compose("run", overrides=["experiment=larex_study"]).threads == 1
