"""Feature-based baselines (mdist, rmd, ddu, knn, nnguide, vim, react, ash, scale, dice, she, gradnorm)
against pytorch-ood 0.4 fed the same arrays (its scores: higher = more OOD, so compared up to sign and
its normalisation), against independent re-implementations of the published formulas, chunked kNN
against brute force, separation of a shifted cluster, and fitted-state round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, spearmanr
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score

from larex.postprocessors.activation import ASH, DICE, SCALE, ReAct
from larex.postprocessors.base import FeatureError
from larex.postprocessors.gradnorm import GradNorm
from larex.postprocessors.knn import KNN, NNGuide, topk_inner
from larex.postprocessors.mahalanobis import DDU, Mahalanobis, RelativeMahalanobis
from larex.postprocessors.she import SHE
from larex.postprocessors.vim import ViM, default_dim

pood = pytest.importorskip("pytorch_ood.detector", reason="pytorch-ood is the reference implementation")

C, F = 4, 24
CENTERS = np.random.default_rng(7).uniform(0.0, 3.0, size=(C, F))
# head: full rank (well-conditioned pinv for ViM's origin), exactly float32-representable (for DICE)
W = (CENTERS - CENTERS.mean(axis=0) + np.random.default_rng(9).normal(0.0, 0.3, size=(C, F)))
W = W.astype(np.float32).astype(np.float64)
B = np.random.default_rng(8).normal(0.0, 0.1, size=C).astype(np.float32).astype(np.float64)


def feats(seed: int, n: int, ood: bool = False) -> dict[str, np.ndarray]:
    """ID: non-negative features around 4 class centres; OOD: a low-norm cluster off those centres."""
    rng = np.random.default_rng(seed)
    if ood:
        centre = np.abs(np.random.default_rng(11).normal(0.0, 0.8, size=F))
        pen, labels = np.abs(centre + rng.normal(0.0, 0.6, size=(n, F))), np.full(n, -1)
    else:
        labels = rng.integers(0, C, size=n)
        pen = np.abs(CENTERS[labels] + rng.normal(0.0, 0.5, size=(n, F)))
    return {"penultimate": pen, "logits": pen @ W.T + B, "labels": labels, "head.weight": W, "head.bias": B}


FIT, VAL, TEST, OOD = feats(0, 400), feats(1, 150), feats(2, 150), feats(3, 150, ood=True)


def run(pp, test=TEST):
    return pp.fit({k: FIT[k] for k in pp.fit_requires}, {k: VAL[k] for k in pp.requires}).score(
        {k: test[k] for k in pp.requires})


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def linear(dtype=torch.float64) -> torch.nn.Linear:
    lin = torch.nn.Linear(F, C).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(t(W))
        lin.bias.copy_(t(B))
    return lin


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ---------------------------------------------------------------- against pytorch-ood
def test_mdist_matches_pytorch_ood(float64_default):
    ref = pood.Mahalanobis(None).fit_features(t(FIT["penultimate"]), t(FIT["labels"]))
    ref = ref.predict_features(t(TEST["penultimate"])).numpy()
    # pytorch-ood: covariance not divided by N and half the distance -> outlier score = min_k d_k / (2N)
    np.testing.assert_allclose(run(Mahalanobis()), -2 * len(FIT["labels"]) * ref, rtol=1e-6)


def test_rmd_matches_pytorch_ood(float64_default):
    ref = pood.RMD(None).fit_features(t(FIT["penultimate"]), t(FIT["labels"]))
    ref = ref.predict_features(t(TEST["penultimate"])).numpy()
    ours = run(RelativeMahalanobis())  # the 1e-6 ridge of pytorch-ood: absolute differences ~1e-8
    np.testing.assert_allclose(ours, -len(FIT["labels"]) * ref, rtol=1e-6, atol=1e-6 * np.abs(ours).max())


def test_knn_matches_pytorch_ood():
    ref = pood.KNN(None, k=50).fit_features(t(FIT["penultimate"]), t(FIT["labels"]))
    ref = ref.predict_features(t(TEST["penultimate"])).numpy()
    np.testing.assert_allclose(run(KNN(k=50)), -ref, rtol=0, atol=1e-7)


def test_nnguide_matches_pytorch_ood():
    # pytorch-ood keeps its bank in float32
    ref = pood.NNGuide(None, head=linear(torch.float32), k=100)
    ref.fit_features(t(FIT["penultimate"]).float(), t(FIT["labels"]))
    ref = ref.predict_features(t(TEST["penultimate"]).float()).numpy().astype(np.float64)
    ours = run(NNGuide(k=100))
    np.testing.assert_allclose(ours, -ref, rtol=1e-5)
    assert spearmanr(ours, -ref).statistic > 0.999


def test_vim_matches_pytorch_ood():
    d = default_dim(F)
    assert d == F // 2
    ref = pood.ViM(None, d=d, w=t(W), b=t(B)).fit_features(t(FIT["penultimate"]), t(FIT["labels"]))
    ref = ref.predict_features(t(TEST["penultimate"])).numpy().astype(np.float64)  # float32 inside
    ours = run(ViM())
    np.testing.assert_allclose(ours, -ref, rtol=0, atol=1e-4 * np.abs(ours).max())
    assert spearmanr(ours, -ref).statistic > 0.999


def test_react_matches_pytorch_ood():
    ref = pood.ReAct(backbone=None, head=linear(), percentile=0.9)
    ref.fit_feature_maps(t(FIT["penultimate"]), t(FIT["labels"]))
    pp = ReAct(percentile=90)
    ours = run(pp)
    assert pp.threshold_ == pytest.approx(ref.threshold, rel=1e-15)
    np.testing.assert_allclose(ours, -ref.predict_feature_maps(t(TEST["penultimate"])).numpy(), rtol=1e-12)


@pytest.mark.parametrize("variant", ["ash-p", "ash-b", "ash-s"])
def test_ash_matches_pytorch_ood(variant):
    lin = linear()
    ref = pood.ASH(backbone=None, head=lambda z: lin(z.flatten(1)), variant=variant, percentile=0.9)
    ref = ref.predict_feature_maps(t(TEST["penultimate"])[:, :, None, None]).numpy()
    np.testing.assert_allclose(run(ASH(variant=variant, percentile=90)), -ref, rtol=1e-12)


def test_scale_matches_pytorch_ood():
    lin = linear()
    ref = pood.SCALE(backbone=None, head=lambda z: lin(z.flatten(1)), percentile=0.85)
    ref = ref.predict_feature_maps(t(TEST["penultimate"])[:, :, None, None]).numpy()
    np.testing.assert_allclose(run(SCALE(percentile=85)), -ref, rtol=1e-12)


def test_dice_matches_pytorch_ood():
    ref = pood.DICE(None, w=t(W), b=t(B), p=0.9).fit_features(t(FIT["penultimate"]), t(FIT["labels"]))
    pp = DICE(percentile=90)
    ours = run(pp)
    np.testing.assert_array_equal(pp.mask_, ref.masked_w.numpy() != 0)
    assert pp.mask_.sum() == round(0.1 * C * F)
    np.testing.assert_allclose(ours, -ref.predict_features(t(TEST["penultimate"])).numpy(), rtol=1e-12)


def test_she_matches_pytorch_ood():
    pred = FIT["logits"].argmax(1)
    assert all(((pred == FIT["labels"]) & (FIT["labels"] == c)).any() for c in range(C))  # no fallback here
    ref = pood.SHE(None, head=linear()).fit_features(t(FIT["penultimate"]), t(FIT["labels"]))
    np.testing.assert_allclose(run(SHE()), -ref.predict_features(t(TEST["penultimate"])).numpy(), rtol=1e-12)


def test_gradnorm_matches_pytorch_ood_autograd():
    ref = pood.GradNorm(linear(), param_filter=lambda name: name == "weight")
    np.testing.assert_allclose(run(GradNorm()), -ref.predict(t(TEST["penultimate"])).numpy(), rtol=1e-10)


def test_ddu_rank_agrees_with_pytorch_ood_gmm():
    # pytorch-ood's GMM uses 1/N_k covariances + reg; DDU the unbiased 1/(N_k - 1) ones: same ranking
    ref = pood.GMM(None, reg=1e-9).fit_features(t(FIT["penultimate"]), t(FIT["labels"]))
    ref = ref.predict_features(t(TEST["penultimate"])).numpy()
    assert spearmanr(run(DDU()), -ref).statistic > 0.999


# ---------------------------------------------------------------- against independent formulas
def test_ddu_equals_scipy_mixture_density():
    pp = DDU(jitter=1e-6)
    ours = run(pp)
    x, y = FIT["penultimate"], FIT["labels"]
    comps = []
    for c in range(C):
        xc = x[y == c]
        cov = np.cov(xc, rowvar=False) + 1e-6 * np.eye(F)
        comps.append(np.log(len(xc) / len(x)) + multivariate_normal(xc.mean(0), cov).logpdf(TEST["penultimate"]))
    np.testing.assert_allclose(ours, logsumexp(np.stack(comps, 1), axis=1), rtol=1e-9)
    uniform = run(DDU(jitter=1e-6, class_prior="uniform"))
    unweighted = logsumexp(np.stack(comps, 1) - np.log([(y == c).mean() for c in range(C)]), axis=1) - np.log(C)
    np.testing.assert_allclose(uniform, unweighted, rtol=1e-9)


def test_ddu_auto_jitter_handles_rank_deficient_classes():
    few = {"penultimate": FIT["penultimate"][:60], "labels": FIT["labels"][:60]}  # N_k < F: singular
    pp = DDU().fit(few)
    assert pp.jitter_ > 0
    assert np.isfinite(pp.score(TEST)).all()
    assert DDU().fit({k: FIT[k] for k in DDU.fit_requires}).jitter_ == 0.0


def test_mdist_and_rmd_equal_loop_formula():
    x, y, q = FIT["penultimate"], FIT["labels"], TEST["penultimate"]
    means = [x[y == c].mean(0) for c in range(C)]
    pooled = sum((x[y == c] - means[c]).T @ (x[y == c] - means[c]) for c in range(C)) / len(x)
    prec = np.linalg.inv(pooled)
    md = np.array([[(qi - m) @ prec @ (qi - m) for m in means] for qi in q])
    np.testing.assert_allclose(run(Mahalanobis()), -md.min(1), rtol=1e-9)
    prec0 = np.linalg.inv(np.cov(x, rowvar=False, bias=True))
    md0 = np.array([(qi - x.mean(0)) @ prec0 @ (qi - x.mean(0)) for qi in q])
    np.testing.assert_allclose(run(RelativeMahalanobis()), -(md - md0[:, None]).min(1), rtol=1e-9, atol=1e-9)


def test_vim_equals_reference_code_formula():
    d = 10
    ours = run(ViM(dim=d))
    u = -np.linalg.pinv(W) @ B
    ec = EmpiricalCovariance(assume_centered=True).fit(FIT["penultimate"] - u)
    vals, vecs = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray(vecs.T[np.argsort(vals * -1)[d:]].T)
    alpha = FIT["logits"].max(1).mean() / np.linalg.norm((FIT["penultimate"] - u) @ ns, axis=-1).mean()
    ref = logsumexp(TEST["logits"], axis=-1) - alpha * np.linalg.norm((TEST["penultimate"] - u) @ ns, axis=-1)
    np.testing.assert_allclose(ours, ref, rtol=1e-9)


def test_gradnorm_equals_autograd_gradient_with_temperature():
    x, T = TEST["penultimate"][:5], 2.0
    lin = linear()
    expected = []
    for xi in x:  # one backward pass per sample: L = -(1/C) sum log softmax(f / T)
        lin.zero_grad()
        (-torch.log_softmax(lin(t(xi)[None]) / T, dim=1).mean()).backward()
        expected.append(lin.weight.grad.abs().sum().item())
    ours = GradNorm(temperature=T).score({"penultimate": x, "logits": TEST["logits"][:5]})
    np.testing.assert_allclose(ours, expected, rtol=1e-10)


def test_nnguide_equals_loop_formula():
    pp = NNGuide(k=20)
    ours = run(pp)
    e_fit, e_test = logsumexp(FIT["logits"], axis=1), logsumexp(TEST["logits"], axis=1)
    bank = [z / np.linalg.norm(z) * e for z, e in zip(FIT["penultimate"], e_fit)]
    ref = []
    for q, e in zip(TEST["penultimate"], e_test):
        sims = sorted((float(np.dot(q / np.linalg.norm(q), b)) for b in bank), reverse=True)
        ref.append(e * np.mean(sims[:20]))
    np.testing.assert_allclose(ours, ref, rtol=1e-10)


def test_she_falls_back_to_class_mean_without_correct_predictions():
    fit = {k: FIT[k] for k in SHE.fit_requires}
    fit["labels"] = (FIT["logits"].argmax(1) + 1) % C  # nothing is classified correctly
    pp = SHE().fit(fit)
    for c in range(C):
        np.testing.assert_allclose(pp.patterns_[c], FIT["penultimate"][fit["labels"] == c].mean(0))


# ---------------------------------------------------------------- kNN search
@pytest.mark.parametrize("m", [20, 101])  # 20 rows: every row is a candidate (plain float64 search)
def test_topk_inner_chunked_equals_brute_force(m):
    rng = np.random.default_rng(5)
    q, bank = rng.normal(size=(37, 9)), rng.normal(size=(m, 9)) * rng.uniform(0.1, 10, size=(m, 1))
    full = -np.sort(-(q @ bank.T), axis=1)[:, :7]
    for bs, bc in [(1, 1), (5, 13), (37, 101), (1000, 1000)]:
        np.testing.assert_allclose(topk_inner(q, bank, 7, batch_size=bs, bank_chunk=bc), full, rtol=0, atol=1e-12)


def test_topk_inner_near_ties_fall_back_to_float64(monkeypatch):
    # 300 bank rows whose inner products with the queries differ by ~1e-10: float32 cannot rank them, so the
    # float32 candidates miss part of the true top k; the certificate must catch that and redo those queries.
    import larex.postprocessors.knn as knn_mod

    rng = np.random.default_rng(8)
    base = rng.normal(size=(1, 16))
    bank = base + 1e-10 * rng.normal(size=(300, 16))
    q = base + 0.01 * rng.normal(size=(6, 16))
    full = -np.sort(-(q @ bank.T), axis=1)[:, :5]
    calls = []
    real = knn_mod._exact_topk
    monkeypatch.setattr(knn_mod, "_exact_topk", lambda qq, parts, k: calls.append(qq.shape[0]) or real(qq, parts, k))
    torch.set_float32_matmul_precision("medium")
    try:
        got = topk_inner(q, bank, 5, bank_chunk=64)
        assert torch.get_float32_matmul_precision() == "medium"  # restored
    finally:
        torch.set_float32_matmul_precision("highest")
    assert sum(calls) == 6  # every query re-searched in float64
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-13)
    # well-separated rows: the float32 candidates are certified, no float64 re-search
    calls.clear()
    bank2 = rng.normal(size=(300, 16))
    got2 = topk_inner(q, bank2, 5, bank_chunk=64)
    assert calls == []
    np.testing.assert_allclose(got2, -np.sort(-(q @ bank2.T), axis=1)[:, :5], rtol=0, atol=1e-12)


def test_knn_chunked_equals_brute_force_distances():
    ours = run(KNN(k=7, batch_size=13, bank_chunk=29))
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    dist = np.sort(cdist(norm(TEST["penultimate"]), norm(FIT["penultimate"])), axis=1)[:, 6]
    np.testing.assert_allclose(ours, -dist, rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours, run(KNN(k=7)), rtol=0, atol=1e-12)


def test_knn_bank_fraction_is_seeded_subset():
    a, b = KNN(k=5, bank_fraction=0.1, seed=3), KNN(k=5, bank_fraction=0.1, seed=3)
    run(a), run(b)
    assert a.bank_.shape == (40, F)
    np.testing.assert_array_equal(a.bank_, b.bank_)


# ---------------------------------------------------------------- separation and state
ALL = [Mahalanobis(), RelativeMahalanobis(), DDU(), KNN(), NNGuide(), ViM(), ReAct(), ASH(),
       ASH(variant="ash-p"), ASH(variant="ash-b"), SCALE(), DICE(), SHE(), GradNorm()]
IDS = [f"{p.name}-{getattr(p, 'variant', '')}".rstrip("-") for p in ALL]


@pytest.mark.parametrize("pp", ALL, ids=IDS)
def test_separates_shifted_cluster(pp):
    s_id, s_ood = run(pp, TEST), pp.score({k: OOD[k] for k in pp.requires})
    auroc = roc_auc_score(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])
    assert auroc > 0.9, f"{pp.name}: AUROC {auroc:.3f}"


@pytest.mark.parametrize("pp", ALL, ids=IDS)
def test_fitted_state_round_trip(pp):
    scores = run(pp)
    fresh = type(pp)(**pp.get_params()).set_fitted_state(pp.fitted_state())
    np.testing.assert_array_equal(fresh.score({k: TEST[k] for k in pp.requires}), scores)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(FeatureError, match="negative"):
        Mahalanobis().fit({"penultimate": FIT["penultimate"], "labels": FIT["labels"] - 1})
    with pytest.raises(ValueError, match="k=500"):
        KNN(k=500).fit({"penultimate": FIT["penultimate"]})
    with pytest.raises(ValueError, match="dim"):
        ViM(dim=F).fit({k: FIT[k] for k in ViM.requires})
    with pytest.raises(FeatureError, match="head.weight"):
        ReAct().fit({"penultimate": FIT["penultimate"], "head.weight": W.T, "head.bias": B})
    with pytest.raises(ValueError, match="variant"):
        ASH(variant="ash-x")
    with pytest.raises(ValueError, match="percentile"):
        DICE(percentile=0.9 * 1000)
