"""Image classification: one prediction per image, features per image row."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from larex.tasks.base import AggregationStep, Task


def estimator_step(estimator, device: str = "cpu") -> AggregationStep:
    """An aggregation step running ``estimator`` (:mod:`larex.aggregation`) on ``device``."""
    return AggregationStep(estimator.output, tuple(estimator.inputs), lambda arrays: estimator(arrays, device),
                           estimator.identity())


def entropy_estimator(params):
    """The configured entropy estimator (``params["estimator"]``; kNN by default), checked to write ``entropy``."""
    from larex.aggregation.knn import KNNEntropy

    estimator = params.get("estimator") or KNNEntropy()
    if estimator.output != "entropy":
        raise ValueError(f"the entropy estimator {estimator!r} writes {estimator.output!r}, not 'entropy'")
    return estimator


class Classification(Task):
    """Inputs: images converted to the ID model's channels / size / normalization (:class:`ModelInput`);
    targets: class indices (-1 for OOD). Aggregation: the LaREx entropy of the MC latents (``entropy``, by the
    configured estimator; kNN by default) and their MC mean (``latent_mean``). Summary: accuracy."""

    name = "classification"
    always_keys = ("labels",)  # the scores table, accuracy and the methods that fit on labels read them
    summary_requires = ("logits", "labels")

    def input_dataset(self, dataset, input_spec):
        from larex.data.base import ModelInput

        extra = {"resize": input_spec["resize"]} if input_spec.get("resize") is not None else {}
        return ModelInput(dataset, channels=int(input_spec["channels"]), image_size=input_spec["image_size"],
                          mean=list(input_spec["mean"]), std=list(input_spec["std"]), **extra)

    def aggregation_steps(self, params):
        from larex.aggregation.mean import LatentMean

        device = str(params.get("device") or "cpu")
        return [estimator_step(entropy_estimator(params), device), estimator_step(LatentMean(), device)]

    def train_model(self, model, dataset, settings, device, workdir):
        """Cross-entropy training with Lightning (:class:`~larex.models.classifier.LitClassifier`); records
        ``val_accuracy``."""
        import pytorch_lightning as pl
        import torch

        from larex.models.classifier import LitClassifier, accuracy, lightning_accelerator

        fit_ds, val_ds = dataset("fit"), dataset("val")
        bs = int(settings["batch_size"])
        g = torch.Generator().manual_seed(int(settings["seed"]))
        workers = int(settings.get("num_workers", 0))
        fit_dl = torch.utils.data.DataLoader(fit_ds, batch_size=bs, shuffle=True, generator=g, num_workers=workers,
                                             drop_last=len(fit_ds) > bs)
        val_dl = torch.utils.data.DataLoader(val_ds, batch_size=512, num_workers=workers)
        lit = LitClassifier(model, lr=float(settings["lr"]), weight_decay=float(settings["weight_decay"]),
                            optimizer=str(settings["optimizer"]), epochs=int(settings["epochs"]),
                            **({"momentum": float(settings["momentum"])} if "momentum" in settings else {}))
        trainer = pl.Trainer(max_epochs=int(settings["epochs"]), logger=False, enable_checkpointing=False,
                             enable_progress_bar=bool(settings.get("progress", True)), enable_model_summary=False,
                             deterministic=False, **lightning_accelerator(device))
        trainer.fit(lit, fit_dl, val_dl)
        model = lit.model.eval()
        return model, {"val_accuracy": accuracy(model, val_dl, device)}

    def summary_metrics(self, feats):
        if not set(self.summary_requires) <= set(feats):
            return {}
        labels = np.asarray(feats["labels"])
        known = labels >= 0
        if not known.any():
            return {}
        pred = np.asarray(feats["logits"])[known].argmax(1)
        return {"accuracy": float(np.mean(pred == labels[known]))}
