"""Monte-Carlo switch (only dropout/DropBlock layers stochastic), deterministic MC masks (shared per pass or per
image), and activation reductions."""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
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
def _restore_modes(model: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[None]:
    """Every module's training flag as on entry when the context exits (``modules``: ``list(model.modules())``
    when the caller has it). Only changed flags are written: ``nn.Module.__setattr__`` is slow enough to matter
    when a saved detector scores one image at a time."""
    flags = [(m, m.training) for m in (model.modules() if modules is None else modules)]
    try:
        yield
    finally:
        for m, flag in flags:
            if m.training != flag:
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


MASK_NORMS = ("expected", "per_mask")


def dropblock_keep_fraction(spatial: tuple[int, ...], drop_prob: float, block_size: int) -> float:
    """Expected kept fraction of a DropBlock mask (dropblock 0.3.0 semantics) over a map of size ``spatial``.

    A position is dropped when a seed (Bernoulli ``gamma = drop_prob / block_size**d``, d = len(spatial), at
    every position of the map) lies in its block window, so it is kept with probability ``(1 - gamma)**c``, c the
    number of in-map positions of its window (fewer at the borders; the even-size crop included). The result is
    the mean of that over the map: the limit of dropblock's own normalisation ``numel / kept`` over a large
    chunk of masks, and the DropBlock analogue of dropout's ``1 - p``.
    """
    d = len(spatial)
    if drop_prob == 0.0:
        return 1.0
    gamma = drop_prob / block_size ** d
    counts = torch.ones((), dtype=torch.float64)
    for n in spatial:  # the window of position i spans i - bs//2 ... i - bs//2 + bs - 1 on each axis
        start = torch.arange(n, dtype=torch.float64) - block_size // 2
        per_axis = (start + block_size - 1).clamp(max=n - 1) - start.clamp(min=0) + 1
        counts = counts[..., None] * per_axis
    return float(torch.pow(1.0 - gamma, counts).mean())


def _check_norm(norm: str) -> None:
    if norm not in MASK_NORMS:
        raise ValueError(f"MC mask_norm={norm!r} is unknown; use one of {MASK_NORMS}")


def deterministic_masks(module: nn.Module, row_shape: tuple[int, ...], samples: int, seed: int, ordinal: int,
                        drop_prob: float | None = None, block_size: int | None = None, norm: str = "per_mask"
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The S fixed masks of MC layer ``module`` for inputs whose rows have shape ``row_shape``.

    Returns ``(mul, add)`` as float64 CPU tensors of shape ``[S, *m]``, ``m`` broadcastable to
    ``row_shape``: pass s of a row ``x`` gives ``x * mul[s] (+ add[s])``; ``add`` is None except for the
    alpha dropouts. ``drop_prob`` / ``block_size`` default to the module's current values. Drawn on CPU from
    ``torch.Generator().manual_seed(mc_masks_seed(seed, ordinal, row_shape, samples))`` in float64, so they
    do not depend on the device, the global RNG or anything but these arguments.

    * DropBlock2D/3D (dropblock 0.3.0 semantics, one mask shared by all channels): seed mask
      ``u < drop_prob / block_size**d`` over the spatial dims, ``block = 1 - max_pool(seed, block_size,
      stride 1, padding block_size // 2)`` (cropped by one at the end of each dim for even block sizes), then
      ``norm="per_mask"``: ``mul = block * (block.numel() / block.sum())`` per mask, or all zeros when the mask
      drops everything; ``norm="expected"``: ``mul = block / dropblock_keep_fraction(...)``, one constant for
      every mask (what dropblock's chunk-wide factor tends to over many masks).
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
    _check_norm(norm)
    gen = torch.Generator(device="cpu").manual_seed(mc_masks_seed(seed, ordinal, row_shape, samples))
    return _build_masks(module, row_shape, samples, p, bs, torch.device("cpu"),
                        lambda shape: torch.rand((samples, *shape), generator=gen, dtype=torch.float64), norm)


def _build_masks(module: nn.Module, row_shape: tuple[int, ...], n: int, p: float, bs: int | None,
                 device: torch.device, draw, norm: str = "per_mask") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` masks ``(mul, add)`` [n, *m] float64 on ``device`` from ``draw(shape)``: float64 uniforms in
    [0, 1) of shape ``[n, *shape]`` (called at most once). The mask semantics of :func:`deterministic_masks`."""
    f64 = dict(dtype=torch.float64, device=device)
    nd = len(row_shape)
    if isinstance(module, _DROPBLOCK_TYPES):
        d = 3 if isinstance(module, DropBlock3D) else 2
        if nd != d + 1:
            raise _mask_shape_error(module, row_shape, f"[R, C, {', '.join('DHW'[3 - d:])}]")
        spatial = row_shape[1:]
        if p == 0.0:
            return torch.ones((n, 1, *spatial), **f64), None
        u = draw(spatial)
        seeds = (u < p / bs ** d).to(torch.float64)[:, None]
        pool = F.max_pool3d if d == 3 else F.max_pool2d
        block = pool(seeds, kernel_size=(bs,) * d, stride=(1,) * d, padding=bs // 2)
        if bs % 2 == 0:
            block = block[(..., *(slice(None, -1),) * d)]
        block = 1.0 - block  # [n, 1, *spatial]
        if norm == "expected":
            return block * (1.0 / dropblock_keep_fraction(tuple(spatial), p, bs)), None
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
        return torch.ones((n, *mshape), **f64), None
    if p >= 1.0:
        return torch.zeros((n, *mshape), **f64), None
    keep = (draw(mshape) < 1.0 - p).to(torch.float64)
    if not alpha_type:
        return keep * (1.0 / (1.0 - p)), None
    alpha = 1.7580993408473766
    a = 1.0 / math.sqrt((alpha * alpha * p + 1) * (1 - p))
    return keep * a, (keep - 1.0) * (alpha * a) + alpha * a * p


# ---------------------------------------------------------------- per-image masks (masks="per_image")

MASK_MODES = ("shared", "per_image")
_PER_IMAGE_VERSION = 1  # bump when the per-image draw changes (it changes every per_image MC result)
_GAMMA = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _s64(v: int) -> int:
    """``v`` mod 2**64 as a signed int64 (the bits torch holds for it)."""
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` on int64 is arithmetic: mask the sign copies)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64_t(z: torch.Tensor) -> torch.Tensor:
    """Element-wise :func:`_splitmix64` on int64 tensors (wrap-around arithmetic, same bits as the Python one)."""
    z = z + _s64(_GAMMA)
    z = (z ^ _shr(z, 30)) * _s64(_MIX1)
    z = (z ^ _shr(z, 27)) * _s64(_MIX2)
    return z ^ _shr(z, 31)


def image_seeds(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Seed ``[B]`` int64 of each image of ``x`` ``[B, ...]`` for ``masks="per_image"``: a hash of its bytes.

    Each image is cast to float32 (a no-op for float32 input) and its n words read as unsigned 32-bit ints
    ``w_j``; word j contributes ``splitmix64((j << 32) | w_j)`` (an injective key of position and value through
    a bijective mixer, so every word has a position-dependent pseudo-random contribution); the contributions are
    summed with wrap-around int64 arithmetic (exact, so any reduction order gives the same bits) and the sum is
    finalised with ``seed`` and n: ``splitmix64(splitmix64(sum ^ splitmix64(seed, version)) ^ n)``. Integer
    torch ops only, on ``x``'s device, vectorized over the images (no loop). Identical bytes give identical
    seeds, so an image's seed does not depend on its batch; different images collide with probability ~2**-64.
    It hashes bits: ``-0.0`` and ``0.0`` (or two NaN payloads) are different images, and so is an image after
    any change to its preprocessing.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"image_seeds needs a batched tensor [B, ...]; got {type(x).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"image_seeds seed must be an integer; got {seed!r}")
    b = x.shape[0]
    with torch.no_grad():
        words = x.detach().to(torch.float32).contiguous().reshape(b, -1).view(torch.int32).to(torch.int64)
        n = words.shape[1]
        if n >= 1 << 31:
            raise ValueError(f"image_seeds: images of {n} float32 words are too large (at most 2**31 - 1)")
        pos = torch.arange(n, device=x.device, dtype=torch.int64) << 32
        total = _splitmix64_t((words & 0xFFFFFFFF) | pos).sum(dim=1, dtype=torch.int64)
        key = _s64(_splitmix64(_splitmix64(_PER_IMAGE_VERSION) ^ (int(seed) & _M64)))
        return _splitmix64_t(_splitmix64_t(total ^ key) ^ n)


def _layer_key(ordinal: int, shape: tuple[int, ...]) -> int:
    h = _splitmix64(_splitmix64(_PER_IMAGE_VERSION) ^ 0x5045525F494D4147)  # "PER_IMAG"
    for v in (ordinal, len(shape), *shape):
        h = _splitmix64(h ^ (int(v) & _M64))
    return _s64(h)


def _hash_uniforms(row_keys: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniforms [R, *shape] float64 in [0, 1): element j of row r is the (j+1)-th SplitMix64 output of state
    ``row_keys[r]``, ``splitmix64(key + j * gamma)``, its top 53 bits / 2**53."""
    numel = math.prod(shape)
    pos = torch.arange(numel, device=row_keys.device, dtype=torch.int64) * _s64(_GAMMA)
    z = _splitmix64_t(row_keys[:, None] + pos)
    return (_shr(z, 11).to(torch.float64) * 2.0 ** -53).reshape(row_keys.shape[0], *shape)


def per_image_masks(module: nn.Module, row_shape: tuple[int, ...], seeds: torch.Tensor, passes: torch.Tensor,
                    ordinal: int, drop_prob: float | None = None, block_size: int | None = None,
                    norm: str = "per_mask") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masks ``(mul, add)`` [R, *m] float64 (on ``seeds``' device) of MC layer ``module`` for R rows whose
    image seeds (:func:`image_seeds`) are ``seeds`` [R] and pass indices ``passes`` [R].

    Row r's uniforms come from the counter-based hash :func:`_hash_uniforms` with state
    ``splitmix64(splitmix64(seeds[r] ^ layer_key) ^ passes[r])``, ``layer_key`` a SplitMix64 chain over
    (version, ordinal, len(row_shape), *row_shape), the element's flat position the counter. So a row's mask is a
    function of (image, run seed, pass, layer, row shape) only; the number of passes S is not mixed in (the first
    S passes of S' > S are the S passes) nor are ``drop_prob`` / ``block_size`` (common random numbers). The mask
    semantics (DropBlock seed mask shared by channels, max-pool expansion with the even-size crop, scale per
    ``norm``; dropout per element or per channel; alpha dropouts) are those of :func:`deterministic_masks`.
    """
    row_shape = tuple(int(d) for d in row_shape)
    seeds = seeds.to(torch.int64).reshape(-1)
    passes = passes.to(device=seeds.device, dtype=torch.int64).reshape(-1)
    if passes.shape != seeds.shape:
        raise ValueError(f"per_image_masks: {seeds.numel()} seeds but {passes.numel()} pass indices")
    p, bs = _layer_params(module)
    p = p if drop_prob is None else float(drop_prob)
    bs = bs if block_size is None else int(block_size)
    _check_norm(norm)
    keys = _splitmix64_t(_splitmix64_t(seeds ^ _layer_key(ordinal, row_shape)) ^ passes)
    return _build_masks(module, row_shape, seeds.shape[0], p, bs, seeds.device,
                        lambda shape: _hash_uniforms(keys, tuple(shape)), norm)


_ENGINES: dict[int, list["_MaskEngine"]] = {}  # id(model) -> engines of its open per_image mc_mode contexts


@contextmanager
def row_seeds(model: nn.Module, seeds: torch.Tensor) -> Iterator[None]:
    """Inside ``mc_mode(model, ..., masks="per_image")``: the image seeds ``[B]`` (:func:`image_seeds` of the
    B images, before any repetition) of the forwards run in this context; an MC layer that gets R = B*S rows
    gives row ``b*S + s`` the masks of image b, pass s. The previous seeds are restored on exit."""
    engines = _ENGINES.get(id(model))
    if not engines:
        raise RuntimeError(f"row_seeds needs an open mc_mode({type(model).__name__}, ..., masks='per_image') "
                           "context on the same model")
    if not isinstance(seeds, torch.Tensor) or seeds.dim() != 1 or seeds.dtype != torch.int64:
        raise ValueError(f"row_seeds needs a 1-D int64 tensor of image seeds (image_seeds(x, seed)); got "
                         f"{getattr(seeds, 'dtype', type(seeds).__name__)} {tuple(getattr(seeds, 'shape', ()))}")
    engine = engines[-1]
    previous, engine.image_seeds = engine.image_seeds, seeds
    try:
        yield
    finally:
        engine.image_seeds = previous


class _MaskEngine:
    """Cache of deterministic masks for one ``mc_mode`` context; patches each MC layer's ``forward``."""

    def __init__(self, samples: int, seed: int, masks: str = "shared", norm: str = "per_mask",
                 cache: dict | None = None) -> None:
        self.samples, self.seed, self.mode, self.norm = samples, seed, masks, norm
        self.image_seeds: torch.Tensor | None = None  # per_image: seeds [B] of the current forward's images
        # a caller's cache outlives the context (masks depend only on these settings and the key below)
        store = {} if cache is None else cache.setdefault(("masks", samples, seed, norm), {})
        self._cpu: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = store.setdefault("cpu", {})
        self._dev: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = store.setdefault("dev", {})

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
                cpu = self._cpu[key] = deterministic_masks(m, row_shape, self.samples, self.seed, ordinal,
                                                           norm=self.norm)
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
            if self.mode == "per_image":
                return self.per_image(name, m, ordinal, x)
            mul, add = self.masks(m, ordinal, row_shape, x.device, x.dtype)
            out = x.reshape(rows // s, s, *row_shape) * mul
            if add is not None:
                out = out + add
            return out.reshape(x.shape)

        return forward

    def per_image(self, name: str, m: nn.Module, ordinal: int, x: torch.Tensor) -> torch.Tensor:
        seeds, s, rows = self.image_seeds, self.samples, x.shape[0]
        if seeds is None:
            raise RuntimeError(f"MC layer {name!r} ({type(m).__name__}): masks='per_image' needs the images' seeds; "
                               f"run the forward inside row_seeds(model, image_seeds(x, seed)) (x: the B images "
                               f"before repetition)")
        if seeds.shape[0] * s != rows:
            raise RuntimeError(f"MC layer {name!r} ({type(m).__name__}) got {rows} rows, but row_seeds holds "
                               f"{seeds.shape[0]} images x samples={s}: rows must be b*S + s of those images")
        dev = x.device if x.device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 / int64 ops
        with torch.no_grad():
            per_row = seeds.to(dev).repeat_interleave(s)
            passes = torch.arange(rows, device=dev, dtype=torch.int64) % s
            mul, add = per_image_masks(m, tuple(x.shape[1:]), per_row, passes, ordinal, norm=self.norm)
            mul = mul.to(device=x.device, dtype=x.dtype)
            add = None if add is None else add.to(device=x.device, dtype=x.dtype)
        out = x * mul
        return out if add is None else out + add


@contextmanager
def mc_mode(model: nn.Module, drop_prob: float | None = None, block_size: int | None = None, *,
            samples: int | None = None, seed: int | None = None, masks: str = "shared",
            mask_norm: str = "per_mask", cache: dict | None = None) -> Iterator[list[tuple[str, nn.Module]]]:
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
    row shape applies the same mask s each time. ``cache`` (a dict the caller keeps) keeps the drawn shared
    masks across contexts, so a caller scoring one small batch at a time draws them once.

    ``masks="per_image"`` (needs ``samples``/``seed``): row ``b*S + s`` gets its own masks, drawn from image
    b's seed (:func:`image_seeds` of the image's bytes and the run seed, handed in with :func:`row_seeds`
    around each forward), pass s, the layer ordinal and the row shape (:func:`per_image_masks`): independent
    masks per image as in classic MC dropout, still independent of the batch (a duplicated image gets its
    copy's masks). Drawn per forward (no cache), on the input's device, integer hashing only.

    ``mask_norm`` (deterministic masks, DropBlock layers): ``"per_mask"`` scales each mask by its own
    ``numel / kept``; ``"expected"`` by the constant ``1 / dropblock_keep_fraction`` (the limit of dropblock's
    chunk-wide factor, so masks vary only in where they drop, not in their gain). Dropouts always use
    ``1 / (1 - p)``.

    Raises:
        ValueError: the model has no MC layer, an override is out of range, or only one of
            ``samples``/``seed`` is given or they are not integers (samples >= 1).
        RuntimeError (in a forward, deterministic mode): an MC layer got a row count not divisible by S
            (per_image: not S times the images of ``row_seeds``, or no ``row_seeds`` open).
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
    if masks not in MASK_MODES:
        raise ValueError(f"mc_mode masks={masks!r} is unknown; use one of {MASK_MODES}")
    if masks != "shared" and samples is None:
        raise ValueError(f"mc_mode masks={masks!r} needs samples and seed (deterministic masks)")
    _check_norm(mask_norm)
    engine = None
    saved: list[tuple[nn.Module, str, object]] = []
    patched: list[tuple[nn.Module, bool, object]] = []
    modules = list(model.modules())
    with _restore_modes(model, modules):
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
                engine = _MaskEngine(samples, seed, masks, mask_norm, cache)
                if masks == "per_image":
                    _ENGINES.setdefault(id(model), []).append(engine)
                for ordinal, (name, m) in enumerate(layers):
                    had = "forward" in m.__dict__
                    patched.append((m, had, m.__dict__.get("forward")))
                    m.forward = engine.forward_for(name, m, ordinal)
            if any(m.training for m in modules):  # model.eval() walks and writes every module: only when needed
                model.eval()
            for _, m in layers:
                m.train()
            yield layers
        finally:
            if engine is not None and engine in _ENGINES.get(id(model), []):
                _ENGINES[id(model)].remove(engine)
                if not _ENGINES[id(model)]:
                    del _ENGINES[id(model)]
            for m, had, old in reversed(patched):
                if had:
                    m.__dict__["forward"] = old
                else:
                    m.__dict__.pop("forward", None)
            for m, attr, value in reversed(saved):
                setattr(m, attr, value)


def reduce_activation(t: torch.Tensor, layout: str = "auto") -> torch.Tensor:
    """Reduce a batch of activations to ``[B, D]``.

    * a mapping of maps (an FPN's levels, ``{"0": [B, C, h0, w0], ...}``): the per-level reductions concatenated
      in the mapping's order, ``[B, sum C]`` (5 x 256 = 1280 for Faster R-CNN's FPN);

    * ``[B, D]``: kept raw (fully-connected layer).
    * ``"channels_first"`` (``auto`` for >= 4-D): ``[B, C, *spatial]`` -> per-channel mean over
      all spatial dims, ``[B, C]``.
    * ``"sequence"`` (``auto`` for 3-D): ``[B, T, D]`` -> mean over the T tokens, ``[B, D]``.
      Use ``layout="channels_first"`` for 1-D conv maps ``[B, C, L]``.
    """
    if layout not in REDUCTIONS:
        raise ValueError(f"reduce_activation layout={layout!r} is unknown; use one of {REDUCTIONS}")
    if isinstance(t, Mapping) and t and all(isinstance(v, torch.Tensor) for v in t.values()):
        return torch.cat([reduce_activation(v, layout) for v in t.values()], dim=1)
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
