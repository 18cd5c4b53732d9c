"""larex: out-of-distribution detection with LaREx (the entropy of MC-sampled latent representations) and
baselines.

The public Python API (the stages' building blocks, for a model and DataLoader of your own; README "Python quick
start")::

    FeatureExtractor, extract_features      hook a layer, draw S MC samples, logits, penultimate features
    GaussianEntropy, KNNEntropy, knn_entropy, LatentMean    LaREx entropy of the MC latents
    LaRED, LaREM                            the LaREx scores (kernel density, Mahalanobis); fit / score
    ood_metrics, auroc, fpr_at_tpr, threshold_at_tpr, zscore_thresholds   metrics and thresholds
    Detector                                a saved detector (larex-evaluate save_detector=[...]): load / score

Names are imported on first use, so ``import larex`` stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "FeatureExtractor": "larex.extraction.module",
    "extract_features": "larex.extraction.module",
    "GaussianEntropy": "larex.aggregation.gaussian",
    "KNNEntropy": "larex.aggregation.knn",
    "LatentMean": "larex.aggregation.mean",
    "knn_entropy": "larex.entropy",
    "LaRED": "larex.postprocessors.lared",
    "LaREM": "larex.postprocessors.larem",
    "ood_metrics": "larex.metrics",
    "auroc": "larex.metrics",
    "fpr_at_tpr": "larex.metrics",
    "threshold_at_tpr": "larex.metrics",
    "zscore_thresholds": "larex.metrics",
    "rates_at_threshold": "larex.metrics",
    "Detector": "larex.detector",
    "DetectorResult": "larex.detector",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import version

        return version("larex")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'larex' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
