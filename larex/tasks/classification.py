"""Image classification: one prediction per image, features per image row."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from larex.tasks.base import AggregationStep, Task


def _entropy_step(params: Mapping[str, Any]) -> AggregationStep:
    from larex.entropy import knn_entropy

    k = params.get("k")
    k = None if k is None else int(k)
    min_dist = float(params.get("min_dist", 1e-5))
    device = torch.device(params.get("device") or "cpu")

    def entropy(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        lat = torch.from_numpy(np.ascontiguousarray(arrays["latent"])).to(device=device, dtype=torch.float64)
        return knn_entropy(lat, k=k, min_dist=min_dist).cpu().numpy()

    return AggregationStep("entropy", ("latent",), entropy, {"estimator": "knn", "k": k, "min_dist": min_dist})


class Classification(Task):
    """Inputs: images converted to the ID model's channels / size / normalization (:class:`ModelInput`);
    targets: class indices (-1 for OOD). Aggregation: LaREx kNN entropy of the MC latents. Summary: accuracy."""

    name = "classification"
    always_keys = ("labels",)  # the scores table, accuracy and the methods that fit on labels read them
    summary_requires = ("logits", "labels")

    def input_dataset(self, dataset, input_spec):
        from larex.data.base import ModelInput

        extra = {"resize": input_spec["resize"]} if input_spec.get("resize") is not None else {}
        return ModelInput(dataset, channels=int(input_spec["channels"]), image_size=input_spec["image_size"],
                          mean=list(input_spec["mean"]), std=list(input_spec["std"]), **extra)

    def aggregation_steps(self, params):
        return [_entropy_step(params)]

    def summary_metrics(self, feats):
        if not set(self.summary_requires) <= set(feats):
            return {}
        labels = np.asarray(feats["labels"])
        known = labels >= 0
        if not known.any():
            return {}
        pred = np.asarray(feats["logits"])[known].argmax(1)
        return {"accuracy": float(np.mean(pred == labels[known]))}
