"""Contract test: every YAML in configs/postprocessor/ and configs/baselines/ instantiates and runs
fit/score on small synthetic features: finite float output of shape [N], deterministic, inputs unmodified.
Separation quality is tested per method in the method's own test file."""
from __future__ import annotations

import importlib.resources

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONFIGS = importlib.resources.files("larex.configs")
N, D, S, C, F = 120, 12, 6, 5, 16


def yamls():
    out = []
    for group in ("postprocessor", "baselines"):
        d = CONFIGS / group
        if d.is_dir():
            out += [(group, p.name[:-5]) for p in sorted(d.iterdir(), key=lambda p: p.name)
                    if p.name.endswith(".yaml") and p.name != "all.yaml"]  # all.yaml selects the others
    return out


def synthetic(seed: int, shift: float = 0.0, n: int = N, requires: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pen = np.abs(rng.normal(shift, 1.0, size=(n, F)))
    w = np.random.default_rng(99).normal(size=(C, F))
    logits = pen @ w.T + rng.normal(0, 0.1, size=(n, C))
    feats = {
        "entropy": rng.normal(shift, 1.0, size=(n, D)),
        "latent": rng.normal(shift, 1.0, size=(n, S, D)).astype(np.float32),
        "logits": logits.astype(np.float32),
        "odin_logits": (logits + 0.1 * pen[:, :C]).astype(np.float32),  # perturbed-input logits (extract.odin)
        "mc_logits": (logits[:, None, :] + rng.normal(0, 0.3, size=(n, S, C))).astype(np.float32),
        "penultimate": pen.astype(np.float32),
        "labels": rng.integers(0, C, size=n),
        "head.weight": w.astype(np.float32),
        "head.bias": np.zeros(C, dtype=np.float32),
    }
    for k in requires:  # raw NAC neuron statistics (any real numbers) of whichever layers the method names
        if k.startswith("nac."):
            feats[k] = rng.normal(0, 1e-3, size=(n, 8)).astype(np.float32)
    return feats


@pytest.mark.parametrize("group,name", yamls(), ids=[f"{g}/{n}" for g, n in yamls()])
def test_yaml_fit_score_contract(group, name):
    spec = OmegaConf.load(str(CONFIGS / group / f"{name}.yaml"))
    pp = instantiate(spec)
    assert pp.requires, f"{name} declares no required features"
    fit, val, test = (synthetic(i, requires=pp.requires) for i in range(3))
    copies = {k: v.copy() for k, v in test.items()}
    a = pp.fit({k: fit[k] for k in pp.requires}, {k: val[k] for k in pp.requires}).score(test)
    b = pp.score(test)
    assert a.shape == (N,) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    for k in test:
        np.testing.assert_array_equal(test[k], copies[k])
    again = instantiate(spec).fit({k: fit[k] for k in pp.requires}, {k: val[k] for k in pp.requires}).score(test)
    np.testing.assert_array_equal(a, again)
