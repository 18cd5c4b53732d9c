"""Lightning wrapper to train an image classifier, and a plain accuracy function."""
from __future__ import annotations

import math
from collections.abc import Iterable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", None)


def lightning_accelerator(device: torch.device) -> dict:
    """``pl.Trainer`` accelerator arguments for a torch device (one GPU, or the CPU)."""
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0]}
    return {"accelerator": "cpu", "devices": 1}


def _xy(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from a batch ``(x, y)`` or ``(x, y, index)``."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError("classifier batches must be (x, y) or (x, y, index) tuples; "
                         f"got {type(batch).__name__}" + (f" of length {len(batch)}"
                                                          if isinstance(batch, (tuple, list)) else ""))
    return batch[0], batch[1]


class LitClassifier(pl.LightningModule):
    """Cross-entropy training of ``model`` (any ``nn.Module`` returning logits ``[B, C]``).

    Logs ``train/loss`` and, per validation/test epoch, ``val/loss``, ``val/acc`` (``test/...``).

    Args:
        model: the network; stored as ``self.model``.
        lr, weight_decay: optimizer learning rate and weight decay (coupled L2 for adam/sgd,
            decoupled for adamw).
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (SGD with ``momentum``).
        momentum: SGD momentum.
        epochs: number of training epochs (the cosine horizon when the trainer cannot estimate
            its number of optimizer steps).
        scheduler: ``"cosine"`` (cosine annealing to 0, stepped after every optimizer step over
            ``trainer.estimated_stepping_batches``; per epoch over ``epochs`` as fallback) or
            ``None`` (constant lr).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 5e-4,
                 optimizer: str = "adam", momentum: float = 0.9, epochs: int = 2,
                 scheduler: str | None = "cosine") -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"LitClassifier optimizer={optimizer!r} is unknown; use one of {OPTIMIZERS}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"LitClassifier scheduler={scheduler!r} is unknown; use 'cosine' or null")
        if epochs < 1:
            raise ValueError(f"LitClassifier epochs must be >= 1; got {epochs}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = _xy(batch)
        loss = F.cross_entropy(self.model(x), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        x, y = _xy(batch)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{stage}/loss", loss, prog_bar=True, on_epoch=True, batch_size=len(y))
        self.log(f"{stage}/acc", acc, prog_bar=True, on_epoch=True, batch_size=len(y))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        params = self.model.parameters()
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler is None:
            return opt
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        if math.isfinite(total) and total > 0:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(total))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hp.epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` (eval mode) over ``loader`` batches ``(x, y[, index])``.

    The model's train/eval flags are restored afterwards.
    """
    flags = {m: m.training for m in model.modules()}
    model.eval()
    correct, total = 0, 0
    try:
        for batch in loader:
            x, y = _xy(batch)
            pred = model(x.to(device)).argmax(dim=1)
            correct += int((pred.cpu() == y.cpu()).sum())
            total += int(y.numel())
    finally:
        for m, flag in flags.items():
            m.training = flag
    if total == 0:
        raise ValueError("accuracy() got an empty loader; pass a loader with at least one sample")
    return correct / total
