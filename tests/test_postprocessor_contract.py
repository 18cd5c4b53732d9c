"""Contract test: every YAML in configs/postprocessor/ and configs/baselines/ (all.yaml excepted) on small
synthetic features.

For every method: it declares its score keys (``requires``, never ``labels``) and fit keys (``fit_requires``),
all registered features of one row axis; it fits on ``fit_requires`` only (val: ``requires`` only) and scores
inputs holding only ``requires`` (no labels), finite, one float per row, deterministic, inputs unmodified; its
``fitted_state()`` survives a safetensors round trip into a fresh instance with identical scores; its scores do
not depend on row order or batch size; it separates a clearly shifted synthetic OOD set (AUROC > 0.9); and a
method that reads labels to fit fails clearly without them. Method-specific values (parity with reference
implementations) are tested in the method's own test file.

The synthetic ID data is a labelled 5-class problem whose OOD counterpart is shifted in every key family a
method can read (see :func:`synthetic`). A new method that reads a new key adds that key here, ID and OOD.
"""
from __future__ import annotations

import functools
import importlib.resources

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.numpy import load, save
from sklearn.metrics import roc_auc_score

from larex import features
from larex.postprocessors.base import MissingFeatureError

CONFIGS = importlib.resources.files("larex.configs")
N, N_FIT, D, S, C, F, D_NAC = 120, 500, 12, 6, 5, 16, 8
MODEL = {"nac_layers": ["block3"]}
"""The model-config keys that method YAMLs interpolate (``nac_ue``: ``layers: ${model.nac_layers}``)."""

# 5 classes, each with its own block of 3 strongly active penultimate units on top of a broad activation of
# every unit; the head reads those blocks, so ID logits are confident (margin ~12).
CENTERS = np.zeros((C, F))
for _c in range(C):
    CENTERS[_c, 3 * _c:3 * _c + 3] = 4.0
W = np.where(CENTERS > 0, 0.9, -0.1)
B = np.linspace(-0.1, 0.1, C)


def yamls() -> list[tuple[str, str]]:
    out = []
    for group in ("postprocessor", "baselines"):
        d = CONFIGS / group
        if d.is_dir():
            out += [(group, p.name[:-5]) for p in sorted(d.iterdir(), key=lambda p: p.name)
                    if p.name.endswith(".yaml") and p.name != "all.yaml"]  # all.yaml selects the others
    return out


YAMLS = yamls()
IDS = [f"{g}/{n}" for g, n in YAMLS]


def build(group: str, name: str):
    """A fresh instance from the YAML, composed as the stages do: method YAMLs resolve against the run config."""
    spec = OmegaConf.load(str(CONFIGS / group / f"{name}.yaml"))
    return instantiate(OmegaConf.create({"model": MODEL, "m": spec}).m)


def synthetic(seed: int, n: int = N, ood: bool = False, requires: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """One split's features. ID: broad non-negative penultimate features with the class block on top,
    confident logits, MC passes that agree, entropy features around 0, NAC statistics of scale 1e-3.
    OOD (labels -1), every family shifted: low-norm penultimate features concentrated on 2 random units (no
    class block: low-energy, unconfident logits; a large top-k share of the activation sum, the SCALE / ASH
    signal; off the ID class clusters and directions), MC passes that disagree (noise 5 vs 0.3), entropy
    features shifted by 6 standard deviations, NAC statistics 30x larger (their states fall in bins the ID
    fit never filled)."""
    rng = np.random.default_rng(seed)
    labels = np.full(n, -1) if ood else rng.integers(0, C, size=n)
    if ood:
        pen = np.abs(rng.normal(0.0, 0.1, size=(n, F)))
        spikes = np.argsort(rng.random((n, F)), axis=1)[:, :2]
        np.put_along_axis(pen, spikes, 2.0 + np.abs(rng.normal(0.0, 0.3, size=(n, 2))), axis=1)
    else:
        pen = np.abs(CENTERS[labels] + 1.0 + rng.normal(0.0, 0.5, size=(n, F)))
    logits = pen @ W.T + B + rng.normal(0.0, 0.05, size=(n, C))
    shift = 6.0 if ood else 0.0
    feats = {
        "entropy": rng.normal(shift, 1.0, size=(n, D)),
        "latent": rng.normal(shift, 1.0, size=(n, S, D)).astype(np.float32),
        "logits": logits.astype(np.float32),
        "odin_logits": (logits + 0.1 * pen[:, :C]).astype(np.float32),  # logits of perturbed inputs
        "mc_logits": (logits[:, None, :] + rng.normal(0, 5.0 if ood else 0.3, size=(n, S, C))).astype(np.float32),
        "penultimate": pen.astype(np.float32),
        "labels": labels,
        "head.weight": W.astype(np.float32),
        "head.bias": B.astype(np.float32),
    }
    for k in requires:  # raw NAC neuron statistics of whichever layers the method names
        if k.startswith("nac."):
            feats[k] = rng.normal(0, 3e-2 if ood else 1e-3, size=(n, D_NAC)).astype(np.float32)
    return feats


def only(feats: dict[str, np.ndarray], keys) -> dict[str, np.ndarray]:
    return {k: feats[k] for k in keys}


@functools.lru_cache(maxsize=None)
def data(group: str, name: str):
    keys = build(group, name).requires
    fit, val, test = synthetic(0, N_FIT, requires=keys), synthetic(1, requires=keys), synthetic(2, requires=keys)
    return fit, val, test, synthetic(3, ood=True, requires=keys)


def fitted(group: str, name: str):
    pp = build(group, name)
    fit, val, _, _ = data(group, name)
    return pp.fit(only(fit, pp.fit_requires), only(val, pp.requires))


@pytest.mark.parametrize("group,name", YAMLS, ids=IDS)
def test_declares_registered_fit_and_score_keys_of_one_axis(group, name):
    pp = build(group, name)
    assert isinstance(pp.requires, tuple) and pp.requires, f"{name} declares no score features"
    assert isinstance(pp.fit_requires, tuple) and pp.fit_requires
    assert "labels" not in pp.requires, "scores must not read labels: OOD splits have none"
    for key in (*pp.fit_requires, *pp.requires):
        features.spec(key)  # registered: the extraction plan finds its producer
    assert pp.score_axis == "image"
    params = pp.extraction_params()
    assert set(params) == set(pp.fit_requires) | set(pp.requires)
    assert all(isinstance(v, dict) for v in params.values())


@pytest.mark.parametrize("group,name", YAMLS, ids=IDS)
def test_fits_on_fit_keys_and_scores_without_labels(group, name):
    pp = fitted(group, name)
    _, _, test, _ = data(group, name)
    copies = {k: v.copy() for k, v in test.items()}
    a = pp.score(only(test, pp.requires))
    assert a.dtype == np.float64 and a.shape == (N,) and np.isfinite(a).all()
    np.testing.assert_array_equal(pp.score(only(test, pp.requires)), a)
    np.testing.assert_array_equal(pp.score(test), a)  # extra keys (labels, ...) are ignored
    for k in test:
        np.testing.assert_array_equal(test[k], copies[k])
    np.testing.assert_array_equal(fitted(group, name).score(only(test, pp.requires)), a)  # deterministic fit


@pytest.mark.parametrize("group,name", YAMLS, ids=IDS)
def test_fitted_state_round_trips_through_safetensors(group, name):
    pp = fitted(group, name)
    _, _, test, _ = data(group, name)
    state = load(save(pp.fitted_state()))
    assert all(isinstance(v, np.ndarray) for v in state.values())
    restored = build(group, name).set_fitted_state(state)
    np.testing.assert_array_equal(restored.score(only(test, pp.requires)), pp.score(only(test, pp.requires)))


@pytest.mark.parametrize("group,name", YAMLS, ids=IDS)
def test_scores_do_not_depend_on_row_order_or_batch_size(group, name):
    pp = fitted(group, name)
    _, _, test, _ = data(group, name)
    test = only(test, pp.requires)
    rows = [k for k in test if not features.is_model_key(k)]
    model = {k: v for k, v in test.items() if features.is_model_key(k)}  # go with every batch
    ref = pp.score(test)

    perm = np.random.default_rng(5).permutation(N)
    permuted = pp.score({**model, **{k: test[k][perm] for k in rows}})
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(N)
    np.testing.assert_allclose(permuted[inverse], ref, rtol=1e-12, atol=1e-12)
    for size in (1, 7, 50):
        chunked = np.concatenate([pp.score({**model, **{k: test[k][i:i + size] for k in rows}})
                                  for i in range(0, N, size)])
        np.testing.assert_allclose(chunked, ref, rtol=1e-12, atol=1e-12, err_msg=f"batches of {size} rows")


@pytest.mark.parametrize("group,name", YAMLS, ids=IDS)
def test_separates_a_clearly_shifted_ood_set(group, name):
    pp = fitted(group, name)
    _, _, test, ood = data(group, name)
    s_id, s_ood = pp.score(only(test, pp.requires)), pp.score(only(ood, pp.requires))
    assert np.isfinite(s_ood).all()
    assert s_id.mean() > s_ood.mean(), f"{name}: mean ID score {s_id.mean():.4g} <= mean OOD {s_ood.mean():.4g}"
    auroc = roc_auc_score(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])
    assert auroc > 0.9, f"{name}: AUROC {auroc:.3f} (ID positive)"


LABELLED = [(g, n) for g, n in YAMLS if "labels" in build(g, n).fit_requires]


def test_some_methods_read_labels_to_fit():
    assert {"mdist", "rmd", "ddu", "she"} <= {n for _, n in LABELLED}


@pytest.mark.parametrize("group,name", LABELLED, ids=[f"{g}/{n}" for g, n in LABELLED])
def test_fit_without_labels_names_labels(group, name):
    pp = build(group, name)
    fit, val, _, _ = data(group, name)
    with pytest.raises(MissingFeatureError) as err:
        pp.fit(only(fit, [k for k in pp.fit_requires if k != "labels"]), only(val, pp.requires))
    msg = str(err.value)
    assert "'labels'" in msg and "fit split" in msg and "known labels" in msg
