"""Shared helper of the batch-independence tests: run an extractor on shuffled batches and restore the order."""
from __future__ import annotations

import torch


def predict_shuffled(extractor, x: torch.Tensor, batch_size: int, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``extractor.predict_step`` over ``x`` in batches of ``batch_size`` of a seeded random order (seed =
    ``batch_size``, row numbers = the original indices), outputs ``keys`` put back in the original order."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(batch_size))
    parts = [extractor.predict_step((x[order[i:i + batch_size]], torch.zeros(len(order[i:i + batch_size])),
                                     order[i:i + batch_size])) for i in range(0, x.shape[0], batch_size)]
    back = torch.argsort(order)
    return {k: torch.cat([p[k] for p in parts])[back] for k in keys}
