"""Monte-Carlo switch (only dropout/DropBlock layers stochastic), deterministic per-sample MC masks, and
activation reductions."""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
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


_M64 = (1 << 64) - 1
_MASKS_VERSION = 1  # bump when the mask draw changes (it changes every deterministic-MC result)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mc_masks_seed(seed: int, ordinal: int, shape: tuple[int, ...], samples: int) -> int:
    """Seed of the ``torch.Generator`` that draws the S deterministic MC masks of one layer and row shape.

    A SplitMix64 chain over ``(version, seed, ordinal, samples, len(shape), *shape)`` (each int taken mod
    2**64, i.e. two's complement for negatives): pure integer arithmetic, so the value is the same in every
    process, Python version and platform (unlike the salted built-in ``hash``). ``ordinal`` is the layer's
    position among the MC layers of the model (``mc_modules`` order, i.e. ``named_modules()`` order) and
    ``shape`` the per-row input shape (without the row dimension). The result is in ``[0, 2**63)``.
    ``drop_prob`` and ``block_size`` are deliberately not mixed in: the masks for two drop probabilities
    come from the same uniforms (common random numbers), so raising ``drop_prob`` only adds drops.
    """
    h = _splitmix64(_MASKS_VERSION)
    for v in (seed, ordinal, samples, len(shape), *shape):
        h = _splitmix64(h ^ (int(v) & _M64))
    return h >> 1


def _layer_params(m: nn.Module) -> tuple[float, int | None]:
    if isinstance(m, _DROPBLOCK_TYPES):
        return float(m.drop_prob), int(m.block_size)
    return float(m.p), None


def _mask_shape_error(m: nn.Module, row_shape: tuple[int, ...], need: str) -> ValueError:
    return ValueError(f"deterministic MC masks: {type(m).__name__} needs a batched input {need}; got rows of "
                      f"shape {list(row_shape)} (the first input dimension must be the rows b*S + s)")


def deterministic_masks(module: nn.Module, row_shape: tuple[int, ...], samples: int, seed: int, ordinal: int,
                        drop_prob: float | None = None, block_size: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The S fixed masks of MC layer ``module`` for inputs whose rows have shape ``row_shape``.

    Returns ``(mul, add)`` as float64 CPU tensors of shape ``[S, *m]``, ``m`` broadcastable to
    ``row_shape``: pass s of a row ``x`` gives ``x * mul[s] (+ add[s])``; ``add`` is None except for the
    alpha dropouts. ``drop_prob`` / ``block_size`` default to the module's current values. Drawn on CPU from
    ``torch.Generator().manual_seed(mc_masks_seed(seed, ordinal, row_shape, samples))`` in float64, so they
    do not depend on the device, the global RNG or anything but these arguments.

    * DropBlock2D/3D (dropblock 0.3.0 semantics, one mask shared by all channels): seed mask
      ``u < drop_prob / block_size**d`` over the spatial dims, ``block = 1 - max_pool(seed, block_size,
      stride 1, padding block_size // 2)`` (cropped by one at the end of each dim for even block sizes),
      ``mul = block * (block.numel() / block.sum())`` per mask, or all zeros when the mask drops everything.
    * Dropout: keep = ``u < 1 - p`` over the whole row shape, ``mul = keep / (1 - p)``.
      Dropout1d/2d/3d: one keep per channel, broadcast over the spatial dims.
    * AlphaDropout / FeatureAlphaDropout (keep per element / per channel): torch's formula, ``a = 1 /
      sqrt((alpha**2 p + 1)(1 - p))``, ``mul = keep * a``, ``add = (keep - 1) * alpha * a + alpha * a * p``
      with alpha = 1.7580993408473766 (the SELU negative saturation).
    * ``p`` (drop_prob) 0: identity masks; ``p`` 1 (plain dropouts only): zeros.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"deterministic MC masks: samples must be an integer >= 1; got {samples!r}")
    row_shape = tuple(int(d) for d in row_shape)
    p, bs = _layer_params(module)
    p = p if drop_prob is None else float(drop_prob)
    bs = bs if block_size is None else int(block_size)
    gen = torch.Generator(device="cpu").manual_seed(mc_masks_seed(seed, ordinal, row_shape, samples))
    f64 = dict(dtype=torch.float64)
    nd = len(row_shape)
    if isinstance(module, _DROPBLOCK_TYPES):
        d = 3 if isinstance(module, DropBlock3D) else 2
        if nd != d + 1:
            raise _mask_shape_error(module, row_shape, f"[R, C, {', '.join('DHW'[3 - d:])}]")
        spatial = row_shape[1:]
        if p == 0.0:
            return torch.ones((samples, 1, *spatial), **f64), None
        u = torch.rand((samples, *spatial), generator=gen, **f64)
        seeds = (u < p / bs ** d).to(torch.float64)[:, None]
        pool = F.max_pool3d if d == 3 else F.max_pool2d
        block = pool(seeds, kernel_size=(bs,) * d, stride=(1,) * d, padding=bs // 2)
        if bs % 2 == 0:
            block = block[(..., *(slice(None, -1),) * d)]
        block = 1.0 - block  # [S, 1, *spatial]
        kept = block.flatten(1).sum(1)
        numel = float(math.prod(spatial))
        scale = torch.where(kept > 0, numel / kept.clamp_min(1.0), torch.zeros_like(kept))
        return block * scale.view(-1, *(1,) * (d + 1)), None
    channelwise = isinstance(module, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout))
    if isinstance(module, nn.Dropout1d) and nd != 2:
        raise _mask_shape_error(module, row_shape, "[R, C, L]")
    if isinstance(module, nn.Dropout2d) and nd not in (2, 3):
        raise _mask_shape_error(module, row_shape, "[R, C, H, W] (or [R, C, L])")
    if isinstance(module, nn.Dropout3d) and nd != 4:
        raise _mask_shape_error(module, row_shape, "[R, C, D, H, W]")
    if isinstance(module, nn.FeatureAlphaDropout) and nd < 1:
        raise _mask_shape_error(module, row_shape, "[R, C, ...]")
    mshape = (row_shape[0], *(1,) * (nd - 1)) if channelwise else row_shape
    alpha_type = isinstance(module, (nn.AlphaDropout, nn.FeatureAlphaDropout))
    if p == 0.0:
        return torch.ones((samples, *mshape), **f64), None
    if p >= 1.0:
        return torch.zeros((samples, *mshape), **f64), None
    keep = (torch.rand((samples, *mshape), generator=gen, **f64) < 1.0 - p).to(torch.float64)
    if not alpha_type:
        return keep * (1.0 / (1.0 - p)), None
    alpha = 1.7580993408473766
    a = 1.0 / math.sqrt((alpha * alpha * p + 1) * (1 - p))
    return keep * a, (keep - 1.0) * (alpha * a) + alpha * a * p


class _MaskEngine:
    """Cache of deterministic masks for one ``mc_mode`` context; patches each MC layer's ``forward``."""

    def __init__(self, samples: int, seed: int) -> None:
        self.samples, self.seed = samples, seed
        self._cpu: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._dev: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def masks(self, m: nn.Module, ordinal: int, row_shape: tuple[int, ...], device: torch.device,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        p, bs = _layer_params(m)
        key = (ordinal, row_shape, self.samples, p, bs)
        dkey = (*key, device, dtype)
        hit = self._dev.get(dkey)
        if hit is not None:
            return hit
        # normal tensors even inside inference_mode, so they may later meet autograd
        with torch.inference_mode(False), torch.no_grad():
            cpu = self._cpu.get(key)
            if cpu is None:
                cpu = self._cpu[key] = deterministic_masks(m, row_shape, self.samples, self.seed, ordinal)
            mul, add = cpu
            hit = (mul.to(device=device, dtype=dtype),
                   None if add is None else add.to(device=device, dtype=dtype))
        self._dev[dkey] = hit
        return hit

    def forward_for(self, name: str, m: nn.Module, ordinal: int):
        s = self.samples

        def forward(x: torch.Tensor) -> torch.Tensor:
            p, _ = _layer_params(m)
            if not m.training or p == 0.0:
                return x
            if not isinstance(x, torch.Tensor) or x.dim() < 1:
                raise TypeError(f"MC layer {name!r} ({type(m).__name__}) got {type(x).__name__}, not a batched tensor")
            rows = x.shape[0]
            if rows % s:
                raise RuntimeError(
                    f"MC layer {name!r} ({type(m).__name__}) got {rows} rows, not a multiple of samples={s}: "
                    f"deterministic MC masks need inputs whose row b*S + s is image b, pass s (repeat each "
                    f"image S times with repeat_interleave)")
            row_shape = tuple(x.shape[1:])
            mul, add = self.masks(m, ordinal, row_shape, x.device, x.dtype)
            out = x.reshape(rows // s, s, *row_shape) * mul
            if add is not None:
                out = out + add
            return out.reshape(x.shape)

        return forward


@contextmanager
def mc_mode(model: nn.Module, drop_prob: float | None = None, block_size: int | None = None, *,
            samples: int | None = None, seed: int | None = None) -> Iterator[list[tuple[str, nn.Module]]]:
    """Whole model in eval, only its MC layers in train mode; yields ``mc_modules(model)``.

    BatchNorm, spectral-norm power iterations etc. stay in eval, so a pass changes no buffer.
    ``drop_prob`` (if not None) overrides ``p`` of every dropout layer and ``drop_prob`` of every
    DropBlock layer; ``block_size`` (if not None) overrides ``block_size`` of every DropBlock layer
    (dropout layers have none). All training flags and overridden attributes are restored on exit.

    Without ``samples``/``seed`` the MC layers draw their masks from the global RNG as usual. With both,
    masks are deterministic and per sample: every MC layer's ``forward`` is replaced (instance
    attribute, removed on exit) so that for an input ``[R, *feat]`` (R a multiple of S) row ``r`` uses
    mask ``r % S`` of ``deterministic_masks(layer, feat, S, seed, ordinal)`` (ordinal = position in
    ``mc_modules``), the same S masks for every image and batch. A row's output then depends only on the
    row, its pass index and ``seed``, not on the batch size, order, chunking or the other rows;
    DropBlock normalises each mask by its own kept fraction (a fully dropped mask gives zeros, not NaN).
    Masks are drawn once per (layer, row shape, S, drop_prob, block_size) and cached for the context;
    the global RNG is neither used nor changed. A layer called several times in one forward with the same
    row shape applies the same mask s each time.

    Raises:
        ValueError: the model has no MC layer, an override is out of range, or only one of
            ``samples``/``seed`` is given or they are not integers (samples >= 1).
        RuntimeError (in a forward, deterministic mode): an MC layer got a row count not divisible by S.
    """
    layers = require_mc_modules(model)
    check_overrides(drop_prob, block_size)
    if (samples is None) != (seed is None):
        raise ValueError(f"mc_mode needs both samples and seed for deterministic masks, or neither; got "
                         f"samples={samples!r}, seed={seed!r}")
    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"mc_mode samples must be an integer >= 1; got {samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"mc_mode seed must be an integer; got {seed!r}")
    saved: list[tuple[nn.Module, str, object]] = []
    patched: list[tuple[nn.Module, bool, object]] = []
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
            if samples is not None:
                engine = _MaskEngine(samples, seed)
                for ordinal, (name, m) in enumerate(layers):
                    had = "forward" in m.__dict__
                    patched.append((m, had, m.__dict__.get("forward")))
                    m.forward = engine.forward_for(name, m, ordinal)
            model.eval()
            for _, m in layers:
                m.train()
            yield layers
        finally:
            for m, had, old in reversed(patched):
                if had:
                    m.__dict__["forward"] = old
                else:
                    m.__dict__.pop("forward", None)
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
