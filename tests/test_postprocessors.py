"""LaRED / LaREM / PCAReducer / Postprocessor base: values checked against sklearn and scipy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from scipy.special import logsumexp
from sklearn.covariance import LedoitWolf, ShrunkCovariance
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KernelDensity

from larex.postprocessors.base import FeatureError, MissingFeatureError, NotFittedError, Postprocessor
from larex.postprocessors.lared import DEFAULT_BANDWIDTH_GRID, LaRED, scott_bandwidth
from larex.postprocessors.larem import LaREM
from larex.postprocessors.pca import PCAReducer

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "postprocessor"


def _gauss(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def _latent3(rng: np.random.Generator, w: np.ndarray, n: int) -> np.ndarray:
    """3-dim latent (scales 3, 2, 1.5) mapped to 20 dims plus isotropic noise of std 0.1."""
    return (rng.normal(size=(n, 3)) * [3.0, 2.0, 1.5]) @ w + 0.1 * rng.normal(size=(n, w.shape[1]))


# ---------------------------------------------------------------------------- LaRED
def test_lared_equals_sklearn_kde_and_brute_force():
    fit, query = _gauss(0, 300, 5), _gauss(1, 70, 5, shift=0.5)
    h = 0.6
    # chunk_size 32 forces blocking over both queries and fit points
    scores = LaRED(pca=None, bandwidth=h, standardize=False, chunk_size=32).fit({"entropy": fit}).score(
        {"entropy": query}
    )
    ref = KernelDensity(kernel="gaussian", bandwidth=h).fit(fit).score_samples(query)
    np.testing.assert_allclose(scores, ref, rtol=0, atol=1e-8)
    d2 = ((query[:, None, :] - fit[None, :, :]) ** 2).sum(-1)
    brute = logsumexp(-d2 / (2 * h**2), axis=1) - np.log(len(fit)) - 2.5 * np.log(2 * np.pi * h**2)
    np.testing.assert_allclose(scores, brute, rtol=0, atol=1e-10)
    assert scores.dtype == np.float64 and scores.shape == (70,)


def test_lared_chunking_does_not_change_scores():
    fit, query = _gauss(2, 123, 4), _gauss(3, 57, 4)
    a = LaRED(bandwidth="scott", chunk_size=7).fit({"entropy": fit}).score({"entropy": query})
    b = LaRED(bandwidth="scott", chunk_size=4096).fit({"entropy": fit}).score({"entropy": query})
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


def test_lared_scott_on_standardized_data():
    fit = _gauss(4, 200, 6) * np.arange(1, 7)  # very different scales per dimension
    m = LaRED(bandwidth="scott", standardize=True).fit({"entropy": fit})
    assert m.bandwidth_ == pytest.approx(200 ** (-1 / 10), rel=1e-12)
    z = (fit - fit.mean(0)) / fit.std(0)
    query = _gauss(5, 30, 6)
    ref = KernelDensity(bandwidth=m.bandwidth_).fit(z).score_samples((query - fit.mean(0)) / fit.std(0))
    np.testing.assert_allclose(m.score({"entropy": query}), ref, rtol=0, atol=1e-8)


def test_lared_bandwidth_auto_uses_val_only():
    fit, val = _gauss(6, 200, 3), _gauss(7, 150, 3)
    m = LaRED(pca=None, bandwidth="auto", standardize=False).fit({"entropy": fit}, val={"entropy": val})
    scott = scott_bandwidth(fit)
    grid = [scott * g for g in DEFAULT_BANDWIDTH_GRID]
    # brute-force float64 reference (sklearn's tree KDE loses accuracy far out in the tails at small h)
    d2 = ((val[:, None, :] - fit[None, :, :]) ** 2).sum(-1)
    mean_ll = [
        np.mean(logsumexp(-d2 / (2 * h**2), axis=1) - np.log(len(fit)) - 1.5 * np.log(2 * np.pi * h**2))
        for h in grid
    ]
    assert m.bandwidth_ == pytest.approx(grid[int(np.argmax(mean_ll))], rel=1e-12)
    assert m.bandwidth_ in m.bandwidth_selection_
    np.testing.assert_allclose(list(m.bandwidth_selection_.values()), mean_ll, rtol=0, atol=1e-8)
    chosen = m.bandwidth_
    m.score({"entropy": _gauss(8, 40, 3, shift=10.0)})  # very different test data
    assert m.bandwidth_ == chosen
    other = LaRED(bandwidth="auto", standardize=False).fit({"entropy": fit}, val={"entropy": val})
    other.score({"entropy": _gauss(9, 500, 3)})
    assert other.bandwidth_ == chosen
    # a wider val split moves the choice to a larger bandwidth: it really is val that decides
    wide = LaRED(bandwidth="auto", standardize=False).fit({"entropy": fit}, val={"entropy": 3 * val})
    assert wide.bandwidth_ > chosen


def test_lared_auto_without_val_raises():
    with pytest.raises(ValueError, match="validation split"):
        LaRED(bandwidth="auto").fit({"entropy": _gauss(0, 50, 3)})
    with pytest.raises(ValueError, match="validation split"):
        LaRED(pca="auto", bandwidth=1.0).fit({"entropy": _gauss(0, 50, 3)})


# ---------------------------------------------------------------------------- LaREM
def test_larem_equals_scipy_mahalanobis_with_ledoit_wolf():
    fit, query = _gauss(10, 80, 6) @ np.random.default_rng(11).normal(size=(6, 6)), _gauss(12, 25, 6)
    m = LaREM(pca=None, shrinkage="ledoit_wolf").fit({"entropy": fit})
    lw = LedoitWolf().fit(fit)
    ref = np.array([-mahalanobis(x, lw.location_, lw.precision_) ** 2 for x in query])
    np.testing.assert_allclose(m.score({"entropy": query}), ref, rtol=1e-10, atol=1e-8)
    assert m.shrinkage_ == pytest.approx(lw.shrinkage_, rel=1e-12)


def test_larem_fixed_shrinkage_and_empirical():
    fit, query = _gauss(13, 60, 4) * [1, 2, 3, 4], _gauss(14, 10, 4)
    sc = ShrunkCovariance(shrinkage=0.3).fit(fit)
    ref = np.array([-mahalanobis(x, sc.location_, sc.precision_) ** 2 for x in query])
    np.testing.assert_allclose(
        LaREM(shrinkage=0.3).fit({"entropy": fit}).score({"entropy": query}), ref, rtol=1e-10, atol=1e-8
    )
    diff = query - fit.mean(0)
    emp = np.cov(fit, rowvar=False, ddof=0)
    ref_emp = -np.einsum("ij,ij->i", diff, np.linalg.solve(emp, diff.T).T)
    np.testing.assert_allclose(
        LaREM(shrinkage=None).fit({"entropy": fit}).score({"entropy": query}), ref_emp, rtol=1e-10, atol=1e-8
    )


def test_larem_with_pca_equals_mahalanobis_in_pca_space():
    rng = np.random.default_rng(15)
    w = rng.normal(size=(3, 20))
    fit, val, query = _latent3(rng, w, 300), _latent3(rng, w, 200), _latent3(rng, w, 20)
    m = LaREM(pca="auto").fit({"entropy": fit}, val={"entropy": val})
    assert m.reducer_.n_components_ == 3
    ref_pca = PCA(3, svd_solver="full").fit(fit)
    zf, zq = ref_pca.transform(fit), ref_pca.transform(query)
    lw = LedoitWolf().fit(zf)
    ref = np.array([-mahalanobis(x, lw.location_, lw.precision_) ** 2 for x in zq])
    np.testing.assert_allclose(m.score({"entropy": query}), ref, rtol=1e-9, atol=1e-8)


# ---------------------------------------------------------------------------- separation
@pytest.mark.parametrize(
    "make",
    [
        lambda: LaRED(),
        lambda: LaRED(pca=16, bandwidth="scott"),
        lambda: LaREM(),
        lambda: LaREM(shrinkage=None, standardize=True),
    ],
)
def test_separates_shifted_gaussians(make):
    fit, val = _gauss(20, 400, 16), _gauss(21, 200, 16)
    id_test, ood = _gauss(22, 300, 16), _gauss(23, 300, 16, shift=3.0)
    m = make().fit({"entropy": fit}, val={"entropy": val})
    s_id, s_ood = m.score({"entropy": id_test}), m.score({"entropy": ood})
    auroc = roc_auc_score(np.r_[np.ones(300), np.zeros(300)], np.r_[s_id, s_ood])
    assert auroc > 0.99
    assert s_id.mean() > s_ood.mean()


# ---------------------------------------------------------------------------- PCA
def test_pca_auto_finds_latent_dimensionality():
    rng = np.random.default_rng(30)
    w = rng.normal(size=(3, 20))
    r = PCAReducer("auto").fit(_latent3(rng, w, 300), _latent3(rng, w, 300))
    assert r.n_components_ == 3
    assert max(r.selection_, key=r.selection_.get) == 3
    assert r.transform(_latent3(rng, w, 5)).shape == (5, 3)


def test_ppca_loglik_equals_sklearn_pca_score():
    rng = np.random.default_rng(31)
    fit, val = rng.normal(size=(120, 9)) * np.arange(1, 10), rng.normal(size=(40, 9)) * np.arange(1, 10)
    r = PCAReducer("auto", candidates=[1, 2, 4, 8, 9]).fit(fit, val)
    for k, ll in r.selection_.items():
        assert ll == pytest.approx(PCA(k, svd_solver="full").fit(fit).score(val), rel=1e-10), k


def test_pca_fixed_fraction_identity_and_standardize():
    rng = np.random.default_rng(32)
    fit, x = rng.normal(size=(100, 6)) * [5, 4, 3, 2, 1, 0.5], rng.normal(size=(7, 6))
    ref = PCA(2, svd_solver="full").fit(fit)
    z = PCAReducer(2).fit(fit).transform(x)
    np.testing.assert_allclose(np.abs(z), np.abs(ref.transform(x)), rtol=1e-10, atol=1e-12)  # up to sign
    assert PCAReducer(0.9).fit(fit).n_components_ == PCA(0.9, svd_solver="full").fit(fit).n_components_
    np.testing.assert_array_equal(PCAReducer(None).fit(fit).transform(x), x)
    fit_c = np.c_[fit, np.full(100, 7.0)]  # a constant feature: scale guarded, no division by ~0
    zs = PCAReducer(None, standardize=True).fit(fit_c).transform(np.c_[x, np.full(7, 8.0)])
    np.testing.assert_allclose(zs[:, :6], (x - fit.mean(0)) / fit.std(0), rtol=1e-12)
    np.testing.assert_allclose(zs[:, 6], 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="validation split"):
        PCAReducer("auto").fit(fit)


# ---------------------------------------------------------------------------- base-class contract
@pytest.mark.parametrize("cls", [LaRED, LaREM])
def test_missing_key_names_key_and_stage(cls):
    with pytest.raises(MissingFeatureError) as err:
        cls(pca=None).fit({"logits": np.zeros((5, 3))})
    assert isinstance(err.value, KeyError)
    assert "'entropy'" in str(err.value) and "aggregate stage" in str(err.value)


@pytest.mark.parametrize("cls", [LaRED, LaREM])
def test_nan_input_raises_with_count(cls):
    x = _gauss(40, 30, 4)
    x[3, 1], x[5, 2], x[7, 0] = np.nan, np.nan, np.inf
    with pytest.raises(FeatureError, match="2 NaN and 1 Inf"):
        cls(pca=None).fit({"entropy": x})
    m = cls(pca=None).fit({"entropy": _gauss(41, 30, 4)}, val={"entropy": _gauss(42, 30, 4)})
    with pytest.raises(FeatureError, match="NaN"):
        m.score({"entropy": x})


@pytest.mark.parametrize("cls", [LaRED, LaREM])
def test_dimension_mismatch_and_bad_rank(cls):
    m = cls(pca=None).fit({"entropy": _gauss(43, 30, 8)}, val={"entropy": _gauss(44, 30, 8)})
    with pytest.raises(FeatureError, match="mismatched shapes"):
        m.score({"entropy": _gauss(45, 5, 9)})
    with pytest.raises(FeatureError, match="mismatched shapes"):
        cls(pca=None).fit({"entropy": _gauss(43, 30, 8)}, val={"entropy": _gauss(44, 30, 9)})
    with pytest.raises(FeatureError, match="2-D"):
        m.score({"entropy": np.zeros(8)})
    with pytest.raises(FeatureError, match="empty"):
        m.score({"entropy": np.zeros((0, 8))})


@pytest.mark.parametrize("cls", [LaRED, LaREM])
def test_score_before_fit(cls):
    with pytest.raises(NotFittedError, match=r"call \.fit"):
        cls().score({"entropy": _gauss(46, 5, 3)})
    assert issubclass(NotFittedError, RuntimeError)


@pytest.mark.parametrize("make", [lambda: LaRED(pca="auto"), lambda: LaREM(pca="auto", standardize=True)])
def test_inputs_not_mutated_and_deterministic(make):
    rng = np.random.default_rng(47)
    w = rng.normal(size=(3, 20))
    fit, val, test = _latent3(rng, w, 200), _latent3(rng, w, 100), _latent3(rng, w, 50)
    copies = [a.copy() for a in (fit, val, test)]
    s1 = make().fit({"entropy": fit}, val={"entropy": val}).score({"entropy": test})
    s2 = make().fit({"entropy": fit}, val={"entropy": val}).score({"entropy": test})
    for a, c in zip((fit, val, test), copies):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(s1, s2)
    f32 = make().fit({"entropy": fit.astype(np.float32)}, val={"entropy": val.astype(np.float32)})
    assert f32.score({"entropy": test.astype(np.float32)}).dtype == np.float64


@pytest.mark.parametrize(
    "make", [lambda: LaRED(pca="auto"), lambda: LaREM(pca=3, standardize=True), lambda: LaRED(bandwidth=0.5)]
)
def test_fitted_state_roundtrip_through_safetensors(make):
    from safetensors.numpy import load, save

    rng = np.random.default_rng(48)
    w = rng.normal(size=(3, 20))
    fit, val, test = _latent3(rng, w, 150), _latent3(rng, w, 80), _latent3(rng, w, 30)
    m = make().fit({"entropy": fit}, val={"entropy": val})
    state = load(save(m.fitted_state()))
    restored = make().set_fitted_state(state)
    np.testing.assert_array_equal(restored.score({"entropy": test}), m.score({"entropy": test}))
    with pytest.raises(FeatureError, match="mismatched shapes"):
        restored.score({"entropy": test[:, :5]})
    assert restored.get_params() == m.get_params()


def test_get_params_and_bad_hyperparameters():
    assert LaREM(pca=4, shrinkage=0.2).get_params() == {
        "pca": 4, "standardize": False, "shrinkage": 0.2, "pca_candidates": None, "features": ("entropy",)
    }
    assert LaRED().get_params()["bandwidth"] == "auto"
    for bad in (dict(bandwidth=-1.0), dict(bandwidth="silverman"), dict(pca=1.5), dict(pca=0), dict(chunk_size=0)):
        with pytest.raises(ValueError):
            LaRED(**bad)
    with pytest.raises(ValueError):
        LaREM(shrinkage="oas")


@pytest.mark.parametrize("cls", [LaRED, LaREM])
def test_feature_sets_concatenate_the_keys(cls):
    rng = np.random.default_rng(4)
    fit = {"entropy": rng.normal(size=(300, 5)), "latent_mean": rng.normal(size=(300, 3)) * 10 + 2}
    test = {"entropy": rng.normal(size=(50, 5)), "latent_mean": rng.normal(size=(50, 3)) * 10 + 2}
    kw = dict(pca=None, standardize=True, **({"bandwidth": 0.7} if cls is LaRED else {}))
    both = cls(features=["entropy", "latent_mean"], **kw)
    assert both.requires == both.fit_requires == ("entropy", "latent_mean")
    got = both.fit(fit).score(test)
    # the same as the method on one key holding the columns side by side
    cat = lambda f: {"entropy": np.concatenate([f["entropy"], f["latent_mean"]], axis=1)}  # noqa: E731
    np.testing.assert_allclose(got, cls(**kw).fit(cat(fit)).score(cat(test)), rtol=1e-12)
    mean_only = cls(features=["latent_mean"], **kw).fit(fit)
    np.testing.assert_array_equal(mean_only.score({"latent_mean": test["latent_mean"]}),
                                  cls(**kw).fit({"entropy": fit["latent_mean"]}).score({"entropy": test["latent_mean"]}))
    for bad in ([], ["entropy", "entropy"], ["logits"]):
        with pytest.raises(ValueError, match="features"):
            cls(features=bad)


def test_lared_whiten_is_kde_on_sklearn_whitened_pca():
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KernelDensity

    rng = np.random.default_rng(5)
    fit = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 3.0
    test = rng.normal(size=(60, 6)) @ rng.normal(size=(6, 6))
    got = LaRED(pca=3, whiten=True, bandwidth=1.0, standardize=False).fit({"entropy": fit}).score({"entropy": test})
    pca = PCA(3, whiten=True).fit(fit)
    want = KernelDensity(bandwidth=1.0).fit(pca.transform(fit)).score_samples(pca.transform(test))
    np.testing.assert_allclose(got, want, rtol=1e-9)
    plain = LaRED(pca=3, bandwidth=1.0, standardize=False).fit({"entropy": fit}).score({"entropy": test})
    assert not np.allclose(plain, got)


def test_fit_free_subclass_and_missing_score():
    class MaxFeature(Postprocessor):
        requires = ("logits",)
        name = "maxfeat"
        needs_fit = False

        def _score(self, arrays):
            return arrays["logits"].max(axis=1)

    np.testing.assert_array_equal(MaxFeature().score({"logits": np.eye(3) * 2}), [2.0, 2.0, 2.0])

    class NoScore(Postprocessor):
        requires = ("logits",)
        needs_fit = False

    with pytest.raises(TypeError, match="_score"):
        NoScore().score({"logits": np.eye(2)})


@pytest.mark.parametrize("name", ["lared", "larem"])
def test_yaml_configs_instantiate_fit_and_score(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    text = (CONFIGS / f"{name}.yaml").read_text()
    assert text.splitlines()[0] == f"# @package postprocessor.{name}"
    m = instantiate(OmegaConf.create(text))
    assert m.name == name and m.pca == "auto"
    rng = np.random.default_rng(49)
    w = rng.normal(size=(3, 20))
    m.fit({"entropy": _latent3(rng, w, 150)}, val={"entropy": _latent3(rng, w, 80)})
    assert np.isfinite(m.score({"entropy": _latent3(rng, w, 10)})).all()


# ---------------------------------------------------------------------------- fit / score needs, axes
class _Recorder(Postprocessor):
    """Fits on logits + labels, scores logits only; records what ``_fit`` got."""

    requires = ("logits",)
    fit_requires = ("logits", "labels")
    name = "recorder"

    def _fit(self, arrays, val):
        self.seen = (sorted(arrays), None if val is None else sorted(val))

    def _score(self, arrays):
        return arrays["logits"].max(axis=1)


def test_fit_requires_defaults_to_requires_on_classes_and_instances():
    class Plain(Postprocessor):
        requires = ("logits",)

    assert Plain.fit_requires == ("logits",) and Plain().fit_requires == ("logits",)
    assert _Recorder.fit_requires == ("logits", "labels") and _Recorder().fit_requires == ("logits", "labels")
    pp = Plain()
    pp.requires = ("odin_logits",)  # per-instance keys (as ODIN / NAC-UE set them from their parameters)
    assert pp.fit_requires == ("odin_logits",)
    pp.fit_requires = ["odin_logits", "labels"]
    assert pp.fit_requires == ("odin_logits", "labels") and Plain().fit_requires == ("logits",)
    assert Plain().extraction_params() == {"logits": {}}
    assert _Recorder().extraction_params() == {"logits": {}, "labels": {}}


def test_fit_reads_fit_requires_val_and_score_only_requires():
    rng = np.random.default_rng(60)
    fit = {"logits": rng.normal(size=(20, 3)), "labels": rng.integers(0, 3, 20), "entropy": rng.normal(size=(20, 2))}
    pp = _Recorder().fit(fit, {"logits": rng.normal(size=(8, 3))})  # val has no labels
    assert pp.seen == (["labels", "logits"], ["logits"])
    _Recorder().fit(fit, {"logits": rng.normal(size=(8, 3)), "labels": np.zeros(8)})  # extra val keys: ignored
    assert pp.score({"logits": np.eye(3)}).tolist() == [1.0, 1.0, 1.0]
    assert sorted(pp.fitted_state()) == ["input_shape.logits"]  # score keys only
    with pytest.raises(MissingFeatureError) as err:
        _Recorder().fit({"logits": fit["logits"]})
    assert "'labels'" in str(err.value) and "known labels" in str(err.value)
    with pytest.raises(FeatureError, match="mismatched shapes"):
        _Recorder().fit(fit, {"logits": rng.normal(size=(8, 4))})


def test_labels_in_requires_are_refused():
    class ScoresWithLabels(Postprocessor):
        requires = ("logits", "labels")
        needs_fit = False

        def _score(self, arrays):
            return arrays["logits"].max(axis=1)

    for call in (lambda pp: pp.score({"logits": np.eye(2), "labels": np.zeros(2)}),
                 lambda pp: pp.fit({"logits": np.eye(2), "labels": np.zeros(2)})):
        with pytest.raises(TypeError, match="fit_requires"):
            call(ScoresWithLabels())


def test_scores_one_value_per_row_of_the_score_axis():
    class PerBox(Postprocessor):
        requires = ("image_index",)  # a box-axis key: one row per box
        needs_fit = False

        def _score(self, arrays):
            return -arrays["image_index"].astype(np.float64)

    class Mixed(PerBox):
        requires = ("logits", "image_index")

    class WithHead(PerBox):
        requires = ("penultimate", "head.weight", "head.bias")

        def _score(self, arrays):
            return arrays["penultimate"].sum(axis=1)

    assert PerBox().score_axis == "box"
    assert PerBox().score({"image_index": np.array([0, 0, 1, 2, 2])}).shape == (5,)
    assert WithHead().score_axis == "image"  # model keys have no rows
    assert WithHead().score({"penultimate": np.ones((4, 3)), "head.weight": np.ones((2, 3)),
                             "head.bias": np.ones(2)}).shape == (4,)
    with pytest.raises(FeatureError, match="different axes"):
        Mixed().score_axis
    with pytest.raises(FeatureError, match="different axes"):
        Mixed().score({"logits": np.eye(3), "image_index": np.arange(3)})
    with pytest.raises(FeatureError, match="different row counts"):
        _Recorder().fit({"logits": np.eye(3), "labels": np.zeros(2)})


def test_unregistered_keys_are_allowed_without_rank_check():
    class Custom(Postprocessor):
        requires = ("my_feature",)
        needs_fit = False

        def _score(self, arrays):
            return arrays["my_feature"].reshape(len(arrays["my_feature"]), -1).sum(axis=1)

    assert Custom().score_axis == "image"
    assert Custom().score({"my_feature": np.ones((3, 2, 2))}).tolist() == [4.0, 4.0, 4.0]
    with pytest.raises(MissingFeatureError, match="no larex module registers it"):
        Custom().score({"logits": np.eye(2)})
    ranked = Custom()
    ranked.feature_ndim = {"my_feature": 2}  # a class may still give a rank
    with pytest.raises(FeatureError, match="2-D"):
        ranked.score({"my_feature": np.ones((3, 2, 2))})
