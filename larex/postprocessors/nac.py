"""NAC-UE: Neuron Activation Coverage for OOD detection (Liu et al., ICLR 2024).

The neuron states ``nac.<layer>`` [N, D] in [0, 1] are computed by ``larex-extract`` (they need a backward
pass): ``sigmoid(alpha * mean_spatial(z * dKL(u || softmax)/dz))`` for every layer listed in
``extract.nac_layers``. This module only builds the coverage histograms and scores.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import numpy as np

from larex.postprocessors.base import FeatureError, FeatureSet, MissingFeatureError, Postprocessor

EPS = 1e-6
"""States are clamped to [EPS, 1 - EPS] before binning (pytorch-ood)."""


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

    Fit: for every layer and neuron j, a histogram ``count_j[k]`` of the fit split's states over M
    geometric bins (dense near 0 and 1). Score of x with state ``s_j`` in bin ``k_j``::

        score(x) = mean_layers mean_j min(count_j[k_j] / O*, 1)

    (higher = more ID). pytorch-ood's ``NACUE.predict`` returns minus the *sum* over layers; the layer mean
    here equals that up to the factor ``-1 / len(layers)`` (the authors' code also averages over layers).

    Args:
        layers: layer paths whose ``nac.<layer>`` features are used; the same list must be given to
            ``extract.nac_layers``.
        bins: M, bins per neuron (one int, or one per layer). Default 50 (pytorch-ood).
        o_star: O*, the count that gives a bin full coverage (one int, or one per layer). Default 50
            (pytorch-ood).
        valid_num: build the histograms from this many fit samples (a seeded random subset; None or a
            number >= the fit size = all), the paper's ``valid_num``. O* is an absolute count, so it should
            be chosen together with the number of samples.
        seed: seed of that subset.

    Fitted: ``counts_[layer]`` int64 [D, M].
    """

    name = "nac_ue"

    def __init__(self, layers: Sequence[str] = ("block3",), bins: int | Sequence[int] = 50,
                 o_star: int | Sequence[int] = 50, valid_num: int | None = None, seed: int = 0) -> None:
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers or not all(isinstance(l, str) and l for l in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"nac_ue: layers must be a non-empty list of distinct layer paths such as "
                             f"['block3']; got {layers!r}")
        self.layers = layers
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
                       shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
        """As :meth:`Postprocessor.check_features`, plus: a missing ``nac.<layer>`` names the
        ``extract.nac_layers`` setting that produces it, and states must lie in [0, 1]."""
        if isinstance(feats, Mapping):
            missing = [k for k in self.requires if k not in feats]
            if missing:
                raise MissingFeatureError(
                    f"{self.name} needs feature(s) {missing} in the {split} split, which has {sorted(feats)}. "
                    "NAC neuron states need a backward pass, so larex-extract writes them only for the layers "
                    f"in extract.nac_layers: rerun larex-extract with extract.nac_layers=[{','.join(self.layers)}]"
                    f" (the same layers as {self.name}.layers)."
                )
        arrays = super().check_features(feats, split=split, shapes=shapes)
        for key, arr in arrays.items():
            if arr.min() < 0 or arr.max() > 1:
                raise FeatureError(
                    f"{self.name}: feature {key!r} of the {split} split has values in [{arr.min():g}, "
                    f"{arr.max():g}]; NAC states are sigmoid outputs in [0, 1]: use the nac.<layer> features "
                    "written by larex-extract"
                )
        return arrays

    def _fit(self, arrays: dict[str, np.ndarray], val: dict[str, np.ndarray] | None) -> None:
        n = arrays[self.requires[0]].shape[0]
        rows = slice(None)
        if self.valid_num is not None and self.valid_num < n:
            rows = np.sort(np.random.default_rng(self.seed).choice(n, self.valid_num, replace=False))
        self.counts_ = {}
        for layer, key, m in zip(self.layers, self.requires, self._layer_bins()):
            idx = bin_indices(arrays[key][rows], geometric_edges(m))  # [n, D]
            d = idx.shape[1]
            flat = (np.arange(d) * m + idx).ravel()
            self.counts_[layer] = np.bincount(flat, minlength=d * m).reshape(d, m).astype(np.int64)

    def _score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        total = 0.0
        for layer, key, m, o in zip(self.layers, self.requires, self._layer_bins(), self._layer_o_star()):
            counts = self.counts_[layer]
            idx = bin_indices(arrays[key], geometric_edges(m))  # [N, D]
            hits = counts[np.arange(counts.shape[0])[None, :], idx]  # [N, D]: fit count of each state's bin
            total = total + np.minimum(hits / float(o), 1.0).mean(axis=1)
        return total / len(self.layers)

    def _fitted_state(self) -> dict[str, np.ndarray]:
        return {f"counts.{layer}": c for layer, c in self.counts_.items()}

    def _set_fitted_state(self, state: dict[str, np.ndarray]) -> None:
        want = {f"counts.{layer}": m for layer, m in zip(self.layers, self._layer_bins())}
        if set(state) != set(want):
            raise ValueError(f"NACUE state needs exactly {sorted(want)}, got {sorted(state)}; restore it into an "
                             "instance built with the same layers")
        for key, m in want.items():
            c = np.asarray(state[key])
            if c.ndim != 2 or c.shape[1] != m:
                raise ValueError(f"NACUE state {key!r} has shape {c.shape}; expected [D, {m}] (bins={m})")
        self.counts_ = {layer: np.asarray(state[f"counts.{layer}"], dtype=np.int64) for layer in self.layers}


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
