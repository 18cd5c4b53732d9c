"""Monte-Carlo switch (only dropout/DropBlock layers stochastic) and activation reductions."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from dropblock import DropBlock2D, DropBlock3D
from torch import nn

MC_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    DropBlock2D, DropBlock3D,
)
_DROPBLOCK_TYPES = (DropBlock2D, DropBlock3D)
REDUCTIONS = ("auto", "channels_first", "sequence")


def mc_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(dotted name, module)`` of every MC layer (instance of ``MC_LAYER_TYPES``) in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MC_LAYER_TYPES)]


def require_mc_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``mc_modules(model)``, or ValueError naming the model class and the fix when there are none."""
    found = mc_modules(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no dropout/DropBlock layer, so MC sampling would return S "
            f"identical copies. Add a DropBlock2D/nn.Dropout layer to the model (e.g. ResNet18("
            f"dropblock_after='layer3')) or choose a model that has one. Recognized types: "
            f"{[t.__name__ for t in MC_LAYER_TYPES]}")
    return found


def check_overrides(drop_prob: float | None, block_size: int | None) -> None:
    """ValueError unless ``drop_prob`` is None or in [0, 1) and ``block_size`` None or an int >= 1."""
    if drop_prob is not None and (isinstance(drop_prob, bool) or not isinstance(drop_prob, (int, float))
                                  or not 0.0 <= drop_prob < 1.0):
        raise ValueError(f"MC drop_prob must be in [0, 1) or None (= as trained); got {drop_prob!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size < 1):
        raise ValueError(f"MC block_size must be a positive integer or None (= as trained); "
                         f"got {block_size!r}")


@contextmanager
def _restore_modes(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the context; every module's training flag is restored on exit."""
    with _restore_modes(model):
        model.eval()
        yield model


@contextmanager
def mc_mode(model: nn.Module, drop_prob: float | None = None,
            block_size: int | None = None) -> Iterator[list[tuple[str, nn.Module]]]:
    """Whole model in eval, only its MC layers in train mode; yields ``mc_modules(model)``.

    BatchNorm, spectral-norm power iterations etc. stay in eval, so a pass changes no buffer.
    ``drop_prob`` (if not None) overrides ``p`` of every dropout layer and ``drop_prob`` of every
    DropBlock layer; ``block_size`` (if not None) overrides ``block_size`` of every DropBlock layer
    (dropout layers have none). All training flags and overridden attributes are restored on exit.

    Raises:
        ValueError: the model has no MC layer, or an override is out of range.
    """
    layers = require_mc_modules(model)
    check_overrides(drop_prob, block_size)
    saved: list[tuple[nn.Module, str, object]] = []
    with _restore_modes(model):
        try:
            for _, m in layers:
                is_db = isinstance(m, _DROPBLOCK_TYPES)
                if drop_prob is not None:
                    attr = "drop_prob" if is_db else "p"
                    saved.append((m, attr, getattr(m, attr)))
                    setattr(m, attr, float(drop_prob))
                if block_size is not None and is_db:
                    saved.append((m, "block_size", m.block_size))
                    m.block_size = int(block_size)
            model.eval()
            for _, m in layers:
                m.train()
            yield layers
        finally:
            for m, attr, value in reversed(saved):
                setattr(m, attr, value)


def reduce_activation(t: torch.Tensor, layout: str = "auto") -> torch.Tensor:
    """Reduce a batch of activations to ``[B, D]``.

    * ``[B, D]``: kept raw (fully-connected layer).
    * ``"channels_first"`` (``auto`` for >= 4-D): ``[B, C, *spatial]`` -> per-channel mean over
      all spatial dims, ``[B, C]``.
    * ``"sequence"`` (``auto`` for 3-D): ``[B, T, D]`` -> mean over the T tokens, ``[B, D]``.
      Use ``layout="channels_first"`` for 1-D conv maps ``[B, C, L]``.
    """
    if layout not in REDUCTIONS:
        raise ValueError(f"reduce_activation layout={layout!r} is unknown; use one of {REDUCTIONS}")
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"reduce_activation needs a tensor [B, D] or larger; got {shape}. "
                         "Hook a layer whose output has a batch and a feature dimension")
    if t.dim() == 2:
        return t
    if layout == "sequence" or (layout == "auto" and t.dim() == 3):
        if t.dim() != 3:
            raise ValueError(f"layout='sequence' needs [B, T, D]; got {tuple(t.shape)}")
        return t.mean(dim=1)
    return t.mean(dim=tuple(range(2, t.dim())))
