"""Logit and MC-dropout baselines (larex.postprocessors.logits / mc_dropout): equal to pytorch-ood 0.4's
detectors (its scores are "higher = more OOD", so ours == -theirs) where it has the method, equal to the
published formulas written out independently here, stable for huge logits, and separating confident
from flat logits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import roc_auc_score

from larex.postprocessors import logits as lg
from larex.postprocessors.base import MissingFeatureError
from larex.postprocessors.logits import GEN, MSP, ODIN, Energy, Entropy, KLMatching, MaxLogit
from larex.postprocessors.mc_dropout import MCDEntropy, MCDMutualInfo, MCDVariance

try:
    import pytorch_ood.detector as pod
except ImportError:  # pytorch-ood is a test-extra reference; the formula tests below run without it
    pod = None
needs_pod = pytest.mark.skipif(pod is None, reason="pytorch-ood (reference implementation) is not installed")

ATOL = 1e-9


def rand_logits(n=300, c=10, seed=0, scale=2.0):
    return np.random.default_rng(seed).normal(0.0, scale, size=(n, c))


def rand_mc(n=200, s=8, c=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 2.0, size=(n, 1, c)) + rng.normal(0.0, 1.0, size=(n, s, c))


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


# ----------------------------------------------------------------------------- pytorch-ood reference
@needs_pod
@pytest.mark.parametrize("c", [10, 100])
def test_fit_free_logit_scores_equal_pytorch_ood(c):
    x = rand_logits(c=c, seed=c)
    x_t = t(x)
    cases = {
        "msp": (MSP(), pod.MaxSoftmax.score(x_t, 1.0)),
        "maxlogit": (MaxLogit(), pod.MaxLogit.score(x_t)),
        "energy": (Energy(), pod.EnergyBased.score(x_t, t=1.0)),
        "energy_t2.5": (Energy(temperature=2.5), pod.EnergyBased.score(x_t, t=2.5)),
        "entropy": (Entropy(), pod.Entropy.score(x_t)),
        "odin": (ODIN(), pod.MaxSoftmax.score(x_t, 1000.0)),
    }
    for name, (pp, theirs) in cases.items():
        np.testing.assert_allclose(pp.score({"logits": x}), -theirs.numpy(), rtol=0, atol=ATOL, err_msg=name)


@needs_pod
def test_odin_equals_pytorch_ood_odin_without_perturbation():
    x = rand_logits(c=10, seed=3, scale=5.0)
    det = pod.ODIN(torch.nn.Identity(), eps=0.0, temperature=1000.0)  # identity "model": input = logits
    theirs = det.predict(t(x)).detach().numpy()
    np.testing.assert_allclose(ODIN().score({"logits": x}), -theirs, rtol=0, atol=ATOL)


@needs_pod
@pytest.mark.parametrize("c,m", [(10, 100), (100, 100), (200, 100), (100, 20)])
def test_gen_equals_pytorch_ood_times_m(c, m):
    # pytorch-ood averages the top-M terms (and clamps p to [1e-7, 1 - 1e-7], inactive for these logits);
    # the paper and ours sum them, so ours == -min(M, C) * theirs.
    x = rand_logits(c=c, seed=c + m, scale=1.0)
    theirs = pod.GEN.score(t(x), gamma=0.1, M=m).numpy()
    np.testing.assert_allclose(GEN(gamma=0.1, M=m).score({"logits": x}), -min(m, c) * theirs, rtol=0, atol=ATOL)


@needs_pod
@pytest.mark.parametrize("never_predicted", [False, True])
def test_kl_matching_equals_pytorch_ood(never_predicted):
    fit, test = rand_logits(n=500, seed=1), rand_logits(n=200, seed=2, scale=3.0)
    if never_predicted:  # class 0 is never the arg-max on fit: no template for it (both implementations)
        fit[:, 0] -= 50.0
    ours = KLMatching().fit({"logits": fit})
    det = pod.KLMatching(None).fit_logits(t(fit))
    assert len(det.dists) == len(ours.classes_) == (9 if never_predicted else 10)
    theirs = det.predict_logits(t(test)).numpy()
    np.testing.assert_allclose(ours.score({"logits": test}), -theirs, rtol=0, atol=ATOL)


class _Replay(torch.nn.Module):
    """Returns the stored MC logits of pass s on its s-th call (stands in for a dropout model)."""

    def __init__(self, mc):
        super().__init__()
        self.mc, self.calls = t(mc), 0

    def forward(self, x):
        out = self.mc[:, self.calls]
        self.calls += 1
        return out


@needs_pod
def test_mcd_var_equals_pytorch_ood_mcd_var_mode():
    mc = rand_mc()
    _, theirs = pod.MCD.run(_Replay(mc), torch.zeros(mc.shape[0], 1, dtype=torch.float64), mc.shape[1])
    np.testing.assert_allclose(MCDVariance().score({"mc_logits": mc}), -theirs.numpy(), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- published formulas
def gen_direct(x, gamma, m):
    p = np.sort(softmax(x, axis=1), axis=1)[:, ::-1][:, :m]
    return -np.sum(p**gamma * (1 - p) ** gamma, axis=1)


@pytest.mark.parametrize("c", [10, 100])
def test_logit_scores_equal_direct_formulas(c):
    x = rand_logits(c=c, seed=10 + c)
    p = softmax(x, axis=1)
    direct = {
        "msp": (MSP(), p.max(axis=1)),
        "maxlogit": (MaxLogit(), np.max(x, axis=1)),
        "energy": (Energy(temperature=2.0), 2.0 * np.log(np.exp(x / 2.0).sum(axis=1))),
        "entropy": (Entropy(), -scipy_entropy(p, axis=1)),
        "gen": (GEN(), gen_direct(x, 0.1, 100)),
        "odin": (ODIN(temperature=1000.0), softmax(x / 1000.0, axis=1).max(axis=1)),
    }
    for name, (pp, ref) in direct.items():
        np.testing.assert_allclose(pp.score({"logits": x}), ref, rtol=0, atol=ATOL, err_msg=name)


def test_gen_many_classes_and_m_clamped():
    x = rand_logits(n=100, c=200, seed=5, scale=1.5)
    np.testing.assert_allclose(GEN(M=100).score({"logits": x}), gen_direct(x, 0.1, 100), rtol=0, atol=ATOL)
    np.testing.assert_allclose(GEN(gamma=0.5, M=37).score({"logits": x}), gen_direct(x, 0.5, 37), rtol=0, atol=ATOL)
    small = rand_logits(n=50, c=10, seed=6)  # M > C: all classes, same as M = C
    np.testing.assert_array_equal(GEN(M=100).score({"logits": small}), GEN(M=10).score({"logits": small}))
    np.testing.assert_allclose(GEN(M=100).score({"logits": small}), gen_direct(small, 0.1, 10), rtol=0, atol=ATOL)


def test_gen_keeps_precision_when_one_minus_p_underflows():
    # logits [50, 0, 0]: 1 - p_top = 2e^-50 / (1 + 2e^-50) rounds to 0 in float64 if computed as 1 - p
    eps = 2 * math.exp(-50)
    lp_top, lp_rest = -math.log1p(eps), -50 - math.log1p(eps)
    l1m_top, l1m_rest = math.log(eps) - math.log1p(eps), math.log1p(-math.exp(lp_rest))
    exact = -(math.exp(0.1 * (lp_top + l1m_top)) + 2 * math.exp(0.1 * (lp_rest + l1m_rest)))
    got = GEN().score({"logits": np.array([[50.0, 0.0, 0.0]])})
    np.testing.assert_allclose(got, [exact], rtol=1e-12)
    assert got[0] < gen_direct(np.array([[50.0, 0.0, 0.0]]), 0.1, 3)[0] - 5e-3  # naive 1 - p loses the top term


def test_kl_matching_equals_direct_formula():
    fit, test = rand_logits(n=400, c=6, seed=7), rand_logits(n=150, c=6, seed=8, scale=3.0)
    pf = softmax(fit, axis=1)
    onehot = np.eye(6)[pf.argmax(axis=1)]
    templates = (onehot.T @ pf) / onehot.sum(axis=0)[:, None]
    kl = scipy_entropy(softmax(test, axis=1)[:, None, :], templates[None, :, :], axis=2)
    np.testing.assert_allclose(KLMatching().fit({"logits": fit}).score({"logits": test}), -kl.min(axis=1),
                               rtol=0, atol=ATOL)


def test_mc_scores_equal_direct_formulas():
    mc = rand_mc(c=7, seed=9)
    p = softmax(mc, axis=2)
    pbar = p.mean(axis=1)
    h_bar = scipy_entropy(pbar, axis=1)
    mi = h_bar - scipy_entropy(p, axis=2).mean(axis=1)
    var = ((p - pbar[:, None, :]) ** 2).sum(axis=1).mean(axis=1) / (mc.shape[1] - 1)
    feats = {"mc_logits": mc}
    np.testing.assert_allclose(MCDEntropy().score(feats), -h_bar, rtol=0, atol=ATOL)
    np.testing.assert_allclose(MCDMutualInfo().score(feats), -mi, rtol=0, atol=ATOL)
    np.testing.assert_allclose(MCDVariance().score(feats), -var, rtol=0, atol=ATOL)


def test_mc_scores_hand_example():
    # two passes with softmax [1/2, 1/2] and [3/4, 1/4]
    mc = np.array([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    h = lambda *q: -sum(v * math.log(v) for v in q)  # noqa: E731
    feats = {"mc_logits": mc}
    assert MCDEntropy().score(feats)[0] == pytest.approx(-h(0.625, 0.375), abs=1e-15)
    mi = h(0.625, 0.375) - (h(0.5, 0.5) + h(0.75, 0.25)) / 2
    assert MCDMutualInfo().score(feats)[0] == pytest.approx(-mi, abs=1e-15)
    assert MCDVariance().score(feats)[0] == pytest.approx(-2 * 0.125**2, abs=1e-15)  # per class (2 * .125^2)/(2-1)


def test_identical_mc_samples_give_zero_mi_and_variance():
    x = rand_logits(n=40, c=5, seed=11, scale=4.0)
    mc = np.repeat(x[:, None, :], 6, axis=1)
    np.testing.assert_allclose(MCDMutualInfo().score({"mc_logits": mc}), 0.0, atol=1e-12)
    np.testing.assert_allclose(MCDVariance().score({"mc_logits": mc}), 0.0, atol=1e-15)
    np.testing.assert_allclose(MCDEntropy().score({"mc_logits": mc}), Entropy().score({"logits": x}), atol=1e-12)


# ----------------------------------------------------------------------------- numerics
def all_logit_methods():
    return [MSP(), MaxLogit(), Energy(), Entropy(), GEN(), ODIN(), KLMatching()]


def test_huge_logits_are_finite_and_shift_consistent():
    rng = np.random.default_rng(12)
    x = rng.uniform(-1e3, 1e3, size=(200, 20))
    base = rand_logits(n=200, c=20, seed=13)
    for pp in all_logit_methods():
        pp.fit({"logits": base})
        s = pp.score({"logits": x})
        assert np.isfinite(s).all(), pp.name
        shifted = pp.score({"logits": base + 1e3})
        if pp.name == "maxlogit" or pp.name == "energy":
            np.testing.assert_allclose(shifted - 1e3, pp.score({"logits": base}), rtol=0, atol=1e-9)
        else:  # softmax-based: invariant to adding a constant to all logits
            np.testing.assert_allclose(shifted, pp.score({"logits": base}), rtol=0, atol=1e-9)
    extreme = np.array([[1e3, 0.0, -1e3]])
    assert MSP().score({"logits": extreme})[0] == 1.0
    assert Energy().score({"logits": extreme})[0] == 1e3
    assert Entropy().score({"logits": extreme})[0] == pytest.approx(-1e3 * math.exp(-1e3), abs=1e-300)
    mc = rng.uniform(-1e3, 1e3, size=(50, 4, 20))
    for pp in (MCDEntropy(), MCDMutualInfo(), MCDVariance()):
        assert np.isfinite(pp.score({"mc_logits": mc})).all(), pp.name


def test_row_blocks_do_not_change_results(monkeypatch):
    x, fit = rand_logits(n=97, c=13, seed=14), rand_logits(n=301, c=13, seed=15)
    mc = rand_mc(n=53, s=5, c=13, seed=16)
    methods = all_logit_methods() + [MCDEntropy(), MCDMutualInfo(), MCDVariance()]
    feats = {"logits": x, "mc_logits": mc}
    full = [pp.fit({"logits": fit} if pp.requires == ("logits",) else {"mc_logits": mc}).score(feats)
            for pp in methods]
    monkeypatch.setattr(lg, "BLOCK_ELEMENTS", 50)  # a few rows per block, fit included
    for pp, ref in zip(methods, full):
        fresh = type(pp)(**pp.get_params())
        got = fresh.fit({"logits": fit} if pp.requires == ("logits",) else {"mc_logits": mc}).score(feats)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12, err_msg=pp.name)


# ----------------------------------------------------------------------------- behaviour
def synthetic_logits(n, c, seed):
    rng = np.random.default_rng(seed)
    confident = rng.normal(0, 1, size=(n, c))
    confident[np.arange(n), rng.integers(0, c, n)] += 8.0
    flat = rng.normal(0, 1, size=(n, c))
    return confident, flat


def synthetic_mc(n, s, c, seed):
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, c, n)
    confident = rng.normal(0, 0.3, size=(n, s, c))
    confident[np.arange(n), :, cls] += 8.0  # same class in every pass
    disagree = rng.normal(0, 0.3, size=(n, s, c))
    idx = rng.integers(0, c, size=(n, s))
    np.put_along_axis(disagree, idx[..., None], np.take_along_axis(disagree, idx[..., None], 2) + 4.0, axis=2)
    return confident, disagree


def test_every_method_separates_confident_from_flat():
    fit, _ = synthetic_logits(400, 10, 20)
    id_x, ood_x = synthetic_logits(300, 10, 21)
    for pp in all_logit_methods():
        pp.fit({"logits": fit})
        s_id, s_ood = pp.score({"logits": id_x}), pp.score({"logits": ood_x})
        auroc = roc_auc_score(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])
        assert auroc > 0.95, (pp.name, auroc)
    id_mc, ood_mc = synthetic_mc(300, 8, 10, 22)
    for pp in (MCDEntropy(), MCDMutualInfo(), MCDVariance()):
        s_id, s_ood = pp.score({"mc_logits": id_mc}), pp.score({"mc_logits": ood_mc})
        auroc = roc_auc_score(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])
        assert auroc > 0.95, (pp.name, auroc)


def test_odin_reads_configurable_key():
    x = rand_logits(seed=17)
    pp = ODIN(key="odin_logits")
    assert pp.requires == ("odin_logits",) and ODIN.requires == ("logits",)
    np.testing.assert_array_equal(pp.score({"odin_logits": x}), ODIN().score({"logits": x}))
    with pytest.raises(MissingFeatureError, match="odin_logits"):
        pp.score({"logits": x})
    # the producer's parameters come from the method: only odin_logits asks for T and epsilon
    assert pp.extraction_params() == {"odin_logits": {"temperature": 1000.0, "epsilon": 0.0014}}
    assert ODIN(temperature=10, key="odin_logits", epsilon=0).extraction_params() == {
        "odin_logits": {"temperature": 10.0, "epsilon": 0.0}}
    assert ODIN().extraction_params() == {"logits": {}}
    np.testing.assert_array_equal(ODIN(epsilon=0.5).score({"logits": x}), ODIN().score({"logits": x}))
    for bad in (-0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="epsilon"):
            ODIN(key="odin_logits", epsilon=bad)


def test_kl_matching_state_round_trip():
    fit, test = rand_logits(n=300, seed=18), rand_logits(n=50, seed=19)
    pp = KLMatching().fit({"logits": fit})
    restored = KLMatching().set_fitted_state(pp.fitted_state())
    np.testing.assert_array_equal(restored.score({"logits": test}), pp.score({"logits": test}))


def test_bad_arguments_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="M"):
        GEN(M=0)
    with pytest.raises(ValueError, match="gamma"):
        GEN(gamma=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        Energy(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        ODIN(temperature=float("inf"))
    one_pass = rand_mc(n=5, s=1)
    for pp in (MCDMutualInfo(), MCDVariance()):
        with pytest.raises(ValueError, match="at least 2 MC samples"):
            pp.score({"mc_logits": one_pass})
    assert MCDEntropy().score({"mc_logits": one_pass}).shape == (5,)
