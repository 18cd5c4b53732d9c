"""NAC-UE: Neuron Activation Coverage for OOD detection (Liu et al., ICLR 2024).

The NAC producer (:mod:`larex.extraction.producers.nac`) writes the raw neuron statistic ``nac.<layer>``
[N, D] = ``mean_spatial(z * dKL(u || softmax)/dz)`` (it needs a backward pass) for every layer of this
method's ``layers``: the method requires those keys, so the extraction plan derived from the selected methods
requests them (the YAML sets ``layers: ${model.nac_layers}``, so they are named once, in the model config).
This module turns it into the neuron states ``sigmoid(alpha * raw)`` (alpha per layer: given, or chosen from
the fit split), builds the coverage histograms and scores.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from larex.postprocessors.base import FeatureSet, MissingFeatureError, Postprocessor

EPS = 1e-6
"""States are clamped to [EPS, 1 - EPS] before binning (pytorch-ood)."""

AUTO_LOGIT = math.log(19.0)
"""``alpha="auto"``: alpha * (median |raw|) = log(19), i.e. the median neuron maps to sigmoid 0.05 or 0.95."""

FLOAT32_TINY, FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
SIGN_ONLY_FRACTION = 0.95
"""``fit`` refuses a layer with more than this fraction of its fit states in the bins that only tell the
statistic's sign: the two next to 0.5 (alpha too small) and the two end bins (alpha too large)."""
DEGENERATE_FRACTION = 0.99
"""``fit`` refuses a layer whose neurons put on average more than this fraction of their fit states in one bin."""


def geometric_edges(m: int) -> np.ndarray:
    """``m + 1`` float32 bin edges from EPS to 1 - EPS, log-spaced towards 0 and 1 and meeting at 0.5.

    ``m // 2`` bins on [EPS, 0.5] with edges ``logspace(log10 EPS, log10 0.5)`` and ``m - m // 2`` bins
    mirrored (``1 - edge``) on [0.5, 1 - EPS], as pytorch-ood's ``_bin_indices_geometric`` (for even
    ``m`` the same edges). The edges are float32 numbers like pytorch-ood's: the states are float32 sigmoid
    outputs, and near 1 a bin is only a few float32 steps wide, so a state that equals a float32 edge must
    be compared with that same float32 edge. The middle edge is the float32 number just below 0.5
    (pytorch-ood's float32 ``logspace`` ends there): a state of exactly 0.5 (z * dKL/dz = 0, e.g. a dead
    ReLU channel) lands in the upper half.
    """
    m1, m2 = m // 2, m - m // 2
    half = np.nextafter(np.float32(0.5), np.float32(0.0))

    def side(k: int) -> np.ndarray:
        e = np.logspace(np.log10(EPS), np.log10(0.5), k + 1).astype(np.float32)
        e[0], e[-1] = np.float32(EPS), half
        return e

    left, right = side(m1), np.float32(1.0) - side(m2)[::-1]
    right[0] = half
    return np.concatenate([left, right[1:]])


def bin_indices(states: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index in ``{0..M-1}`` of each state: bin k is ``(edges[k], edges[k+1]]``; states below/above
    the edges fall into the first/last bin (pytorch-ood clamps to [EPS, 1 - EPS] and uses
    ``torch.bucketize(..., right=False)``, the same rule)."""
    idx = np.searchsorted(edges, states, side="left") - 1
    return np.clip(idx, 0, len(edges) - 2)


class NACUE(Postprocessor):
    """NAC-UE score: the average neuron coverage of a sample, averaged over layers.

    States: ``s = sigmoid(alpha * raw)`` (float32, as pytorch-ood) for the raw ``nac.<layer>`` statistic.
    Fit: for every layer and neuron j, a histogram ``count_j[k]`` of the fit split's states over M
    geometric bins (dense near 0 and 1). Score of x with state ``s_j`` in bin ``k_j``::

        score(x) = mean_layers mean_j min(count_j[k_j] / O*, 1)

    (higher = more ID). pytorch-ood's ``NACUE.predict`` returns minus the *sum* over layers; the layer mean
    here equals that up to the factor ``-1 / len(layers)`` (the authors' code also averages over layers).

    ``alpha="auto"`` sets, per layer, ``alpha = log(19) / s`` with s the median of the non-zero ``|raw|`` over
    the fit samples and neurons: the typical neuron then lands at state 0.05 / 0.95, so the states spread
    over the bins between 0.5 and the dense ends instead of piling up at 0.5 (too small an alpha: every
    sample in one bin, constant scores) or at 0 and 1 (too large). The median is robust to the heavy tails of
    the statistic, and zeros (dead ReLU channels: z = 0) are excluded so they cannot drive s to 0. The raw
    statistic's scale differs by orders of magnitude between models and layers (the paper tunes alpha per
    layer); this uses the ID fit split only, never OOD data.

    Args:
        layers: layer paths (dotted module names) whose ``nac.<layer>`` features are used; the method
            requires ``nac.<layer>`` for each, so the extraction plan computes exactly these layers (the YAML
            takes them from ``model.nac_layers``).
        alpha: sigmoid steepness: ``"auto"`` (above), a positive number, or one positive number per layer.
        bins: M, bins per neuron (one int, or one per layer). Default 50 (pytorch-ood).
        o_star: O*, the count that gives a bin full coverage (one int, or one per layer). Default 50
            (pytorch-ood).
        valid_num: build the histograms (and choose ``"auto"`` alpha) from this many fit samples (a seeded
            random subset; None or a number >= the fit size = all), the paper's ``valid_num``. O* is an
            absolute count, so it should be chosen together with the number of samples.
        seed: seed of that subset.

    Fitted: ``alpha_[layer]`` float, ``counts_[layer]`` int64 [D, M]. ``fit`` raises ``ValueError`` naming
    the layer and the fix when its fit states are degenerate (nearly constant scores): more than 95% of them
    in the bins that only tell the statistic's sign, the two next to 0.5 (alpha too small) and the two end
    bins (alpha too large), or more than 99% in each neuron's single most filled bin.
    """

    name = "nac_ue"

    def __init__(self, layers: Sequence[str], alpha: str | float | Sequence[float] = "auto",
                 bins: int | Sequence[int] = 50, o_star: int | Sequence[int] = 50, valid_num: int | None = None,
                 seed: int = 0) -> None:
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers or not all(isinstance(l, str) and l for l in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"nac_ue: layers must be a non-empty list of distinct layer paths such as "
                             f"['block3']; got {layers!r}")
        self.layers = layers
        self.alpha = _check_alpha(alpha, len(layers))
        self.bins = _per_layer_ints(bins, "bins", len(layers), low=2)
        self.o_star = _per_layer_ints(o_star, "o_star", len(layers), low=1)
        if valid_num is not None and (isinstance(valid_num, bool) or not isinstance(valid_num, numbers.Integral)
                                      or valid_num < 1):
            raise ValueError(f"nac_ue: valid_num must be a positive integer or None (= all fit samples); "
                             f"got {valid_num!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"nac_ue: seed must be a non-negative integer; got {seed!r}")
        self.valid_num = None if valid_num is None else int(valid_num)
        self.seed = int(seed)
        self.requires = tuple(f"nac.{l}" for l in layers)
        self.feature_ndim = {k: 2 for k in self.requires}

    def _layer_bins(self) -> list[int]:
        return self.bins if isinstance(self.bins, list) else [self.bins] * len(self.layers)

    def _layer_o_star(self) -> list[int]:
        return self.o_star if isinstance(self.o_star, list) else [self.o_star] * len(self.layers)

    def check_features(self, feats: FeatureSet, *, split: str = "input",
                       shapes: Mapping[str, tuple[int, ...]] | None = None,
                       keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """As :meth:`Postprocessor.check_features`; a missing ``nac.<layer>`` says how the extraction
        plan gets it (this method's ``layers``)."""
        if isinstance(feats, Mapping):
            missing = [k for k in (self.requires if keys is None else keys) if k not in feats]
            if missing:
                raise MissingFeatureError(
                    f"{self.name} needs feature(s) {missing} in the {split} split, which has {sorted(feats)}. "
                    "NAC neuron statistics need a backward pass, so the extraction computes them only for the "
                    "layers that the selected methods request: the plan is derived from the methods' YAMLs, here "
                    f"{self.name}.layers=[{','.join(self.layers)}] (default: model.nac_layers). Rerun the "
                    f"extraction with {self.name} selected so that it writes them."
                )
        return super().check_features(feats, split=split, shapes=shapes, keys=keys)

    def states(self, raw: np.ndarray, alpha: float) -> np.ndarray:
        """Neuron states ``sigmoid(alpha * raw)`` as float32, computed exactly as pytorch-ood does (float32
        torch ops), so that states on a bin edge fall on the same side."""
        t = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
        return torch.sigmoid(alpha * t).numpy()

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        n = arrays[self.requires[0]].shape[0]
        rows = slice(None)
        if self.valid_num is not None and self.valid_num < n:
            rows = np.sort(np.random.default_rng(self.seed).choice(n, self.valid_num, replace=False))
        alphas = self.alpha if isinstance(self.alpha, list) else [self.alpha] * len(self.layers)
        self.alpha_, self.counts_ = {}, {}
        for layer, key, m, a in zip(self.layers, self.requires, self._layer_bins(), alphas):
            raw = arrays[key][rows]
            a = _auto_alpha(raw, layer) if a == "auto" else float(a)
            idx = bin_indices(self.states(raw, a), geometric_edges(m))  # [n, D]
            d = idx.shape[1]
            flat = (np.arange(d) * m + idx).ravel()
            counts = np.bincount(flat, minlength=d * m).reshape(d, m).astype(np.int64)
            _check_spread(counts, float(np.mean(raw == 0)), layer, a, m)
            self.alpha_[layer], self.counts_[layer] = a, counts

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        total = 0.0
        for layer, key, m, o in zip(self.layers, self.requires, self._layer_bins(), self._layer_o_star()):
            counts = self.counts_[layer]
            idx = bin_indices(self.states(arrays[key], self.alpha_[layer]), geometric_edges(m))  # [N, D]
            hits = counts[np.arange(counts.shape[0])[None, :], idx]  # [N, D]: fit count of each state's bin
            total = total + np.minimum(hits / float(o), 1.0).mean(axis=1)
        return total / len(self.layers)

    def _fitted_state(self) -> dict[str, np.ndarray]:
        state = {f"counts.{layer}": c for layer, c in self.counts_.items()}
        state.update({f"alpha.{layer}": np.array([a], dtype=np.float64) for layer, a in self.alpha_.items()})
        return state

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        want = {f"counts.{layer}" for layer in self.layers} | {f"alpha.{layer}" for layer in self.layers}
        if set(state) != want:
            raise ValueError(f"NACUE state needs exactly {sorted(want)}, got {sorted(state)}; restore it into an "
                             "instance built with the same layers")
        alpha_ = {}
        for layer, m in zip(self.layers, self._layer_bins()):
            c = np.asarray(state[f"counts.{layer}"])
            if c.ndim != 2 or c.shape[1] != m:
                raise ValueError(f"NACUE state 'counts.{layer}' has shape {c.shape}; expected [D, {m}] (bins={m})")
            a = np.asarray(state[f"alpha.{layer}"], dtype=np.float64).reshape(-1)
            if a.shape != (1,) or not (np.isfinite(a[0]) and a[0] > 0):
                raise ValueError(f"NACUE state 'alpha.{layer}' must hold one positive finite number; got {a}")
            alpha_[layer] = float(a[0])
        self.counts_ = {layer: np.asarray(state[f"counts.{layer}"], dtype=np.int64) for layer in self.layers}
        self.alpha_ = alpha_


def _check_alpha(alpha, n_layers: int) -> str | float | list:
    """``alpha``: ``"auto"``, a positive finite number, or one of those per layer."""
    def ok(v) -> bool:
        return v == "auto" if isinstance(v, str) else (
            isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < FLOAT32_MAX)

    if isinstance(alpha, Sequence) and not isinstance(alpha, str):
        items = list(alpha)
        if len(items) != n_layers or not all(ok(v) for v in items):
            raise ValueError(f"nac_ue: alpha has {len(items)} values for {n_layers} layers or a value that is not "
                             f"'auto' or a positive number: {items!r}; give 'auto', one number, or one per layer")
        return [v if isinstance(v, str) else float(v) for v in items]
    if not ok(alpha):
        raise ValueError(f"nac_ue: alpha must be 'auto' or a positive finite float32 number (or one per layer); "
                         f"got {alpha!r}")
    return alpha if isinstance(alpha, str) else float(alpha)


def _auto_alpha(raw: np.ndarray, layer: str) -> float:
    """``AUTO_LOGIT / median(|raw| != 0)`` over fit samples and neurons (see :class:`NACUE`)."""
    mag = np.abs(raw[raw != 0]).astype(np.float64)
    scale = float(np.median(mag)) if mag.size else 0.0
    if scale < FLOAT32_TINY:  # then alpha would overflow float32
        raise ValueError(f"nac_ue: the NAC statistic of layer {layer!r} is zero for every fit sample and neuron "
                         f"(median non-zero |value| {scale:g}): the layer's gradients vanish, so alpha='auto' has "
                         "no scale; choose another layer (nac_ue.layers, by default model.nac_layers)")
    return AUTO_LOGIT / scale


def _check_spread(counts: np.ndarray, zero_frac: float, layer: str, alpha: float, m: int) -> None:
    """Raise when the fit states of ``layer`` (histograms ``counts`` [D, M]) cannot give varying scores.

    Degenerate (M >= 4): more than ``SIGN_ONLY_FRACTION`` of the states lie in the four sign-only bins, the
    two next to 0.5 (alpha too small, when most states are there) and the two end bins (saturated: alpha
    too large); any M: on average over neurons, more than ``DEGENERATE_FRACTION`` of a neuron's states in
    its most filled bin. With ``alpha="auto"`` and M >= 12 (the bins next to 0.5 end before |alpha * raw| =
    log 19, the end bins start after it), the first check fails only for a layer with many exact zeros
    (inactive neurons) or a |statistic| split into tiny and huge values.
    """
    n = int(counts[0].sum())
    total = counts.sum()
    central = counts[:, [m // 2 - 1, m // 2]].sum() / total if m >= 4 else 0.0
    extreme = counts[:, [0, m - 1]].sum() / total if m >= 4 else 0.0
    modal = (counts.max(axis=1) / n).mean()
    if central + extreme > SIGN_ONLY_FRACTION:
        what = (f"{100 * central:.2f}% of the states lie in the two bins next to 0.5 and {100 * extreme:.2f}% "
                "in the two end bins (0 or 1), which only tell the sign of the statistic")
        if central >= extreme:
            hint = "use a larger alpha (or alpha='auto')"
            if zero_frac > 0.5:
                hint += (f"; {100 * zero_frac:.0f}% of its statistics are exactly 0 (inactive neurons): "
                         "consider another layer")
        else:
            hint = "use a smaller alpha (or alpha='auto')"
    elif modal > DEGENERATE_FRACTION:
        what = f"each neuron puts on average {100 * modal:.2f}% of its states in a single bin"
        hint = "the layer's statistic barely varies between samples: choose another layer"
    else:
        return
    raise ValueError(f"nac_ue: with alpha={alpha:g} and {m} bins, the {n} fit samples of layer {layer!r} are "
                     f"degenerate: {what}, so nearly every sample would get the same score; {hint}")


def _per_layer_ints(value, name: str, n_layers: int, low: int) -> int | list[int]:
    """``value`` (an int, or one int per layer) validated as integers >= ``low``."""
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if isinstance(value, Sequence) and not isinstance(value, str) and len(items) != n_layers:
        raise ValueError(f"nac_ue: {name} has {len(items)} values for {n_layers} layers; give one int or one "
                         "per layer")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"nac_ue: {name} must be an integer >= {low} (or one per layer); got {value!r}")
    ints = [int(v) for v in items]
    return ints if isinstance(value, Sequence) and not isinstance(value, str) else ints[0]
