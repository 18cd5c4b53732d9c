"""``latent`` [N, S, D] and ``mc_logits`` [N, S, C]: S Monte-Carlo passes with only dropout/DropBlock active.

``latent`` is the output of the hooked layer, reduced by ``reduce_activation`` (conv maps -> per-channel spatial
mean, FC kept raw, sequences -> token mean); ``mc_logits`` the model output of the same passes. The S passes run
as one forward of the batch repeated S times (row ``b*S + s`` is image b, pass s), in chunks of at most
``mc_batch`` rows; by default (``share_prefix``) the layers before the first MC layer run once per image and only
the rest runs on the S-fold batch. BatchNorm stays in eval, so this equals S separate passes.

Masks (``hooked_layer.masks``): by default (``shared``, the LaREx study's choice, docs/larex-study.md) pass s of
every image uses the same mask s, drawn from ``seed`` per MC layer and input shape, so an image's entropy is a
deterministic function of the image; with ``per_image`` every image gets its own S masks, as in classic MC
dropout, drawn from a hash of the image's bytes and ``seed`` (:func:`larex.extraction.mc.image_seeds`). Either
way an image's latents depend only on the image and the seed -- not on the batch size, the order, ``mc_batch``
or the other images -- so a deployed detector scores an image alone as it scores it in a batch; the global RNG is
untouched (:func:`larex.extraction.mc.mc_mode`). ``hooked_layer.mask_norm`` sets the DropBlock gain: ``expected``
(default; one constant, the limit of dropblock 0.3.0's batch-wide factor) or ``per_mask`` (each mask by its own
kept fraction).
If ``mc_logits`` is not requested, each MC pass stops right after the hooked layer.
"""
from __future__ import annotations

import warnings
from contextlib import ExitStack

import torch
from torch import nn

from larex.extraction.hooks import capture_output, resolve_module
from larex.extraction.mc import (MASK_MODES, MASK_NORMS, REDUCTIONS, check_overrides, image_seeds, mc_mode,
                                 reduce_activation, require_mc_modules, row_seeds)
from larex.extraction.producers.base import Producer, first_tensor, logits_of


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"MonteCarlo {name} must be an integer >= {low}; got {value!r}")
    return value


class MonteCarlo(Producer):
    """Args: hooked_layer (dotted path), mc_samples (S), seed, drop_prob / block_size (MC-layer overrides at
    extraction, None = as trained), mc_batch (rows per MC forward; does not change the result), reduction,
    share_prefix (run the layers before the first MC layer once per image; falls back to S full passes, with a
    warning, when later layers reuse earlier activations, e.g. a skip connection around the dropout), masks
    ("shared": pass s of every image uses mask s; "per_image": each image its own masks, from its bytes and seed),
    mask_norm (DropBlock scale: "expected" = one constant, 1 / expected kept fraction; "per_mask" = each mask by
    its own kept fraction)."""

    name = "mc"
    provides = ("latent", "mc_logits")

    def __init__(self, hooked_layer: str, mc_samples: int = 16, keys=("latent",), seed: int = 0,
                 drop_prob: float | None = None, block_size: int | None = None, mc_batch: int | None = None,
                 reduction: str = "auto", share_prefix: bool = True, masks: str = "shared",
                 mask_norm: str = "expected"):
        keys = tuple(k for k in self.provides if k in keys)
        if not keys:
            raise ValueError(f"MonteCarlo produces {self.provides}; got keys {keys}")
        super().__init__(keys)
        _check_int("mc_samples", mc_samples, 1)
        _check_int("seed", seed, 0)
        if mc_batch is not None:
            _check_int("mc_batch", mc_batch, 1)
        if reduction not in REDUCTIONS:
            raise ValueError(f"MonteCarlo reduction={reduction!r} is unknown; use one of {REDUCTIONS}")
        check_overrides(drop_prob, block_size)
        if masks not in MASK_MODES:
            raise ValueError(f"MonteCarlo masks={masks!r} is unknown; use one of {MASK_MODES}")
        if mask_norm not in MASK_NORMS:
            raise ValueError(f"MonteCarlo mask_norm={mask_norm!r} is unknown; use one of {MASK_NORMS}")
        self.masks = masks
        self.mask_norm = mask_norm
        self.hooked_layer = hooked_layer
        self.mc_samples = mc_samples
        self.seed = seed
        self.drop_prob = drop_prob
        self.block_size = block_size
        self.mc_batch = mc_batch
        self.reduction = reduction
        self.share_prefix = share_prefix
        self._prefix_ok: bool | None = None  # None: not tried yet
        self._checked_variation = False
        self._mask_cache: dict = {}  # shared masks drawn once for this producer (mc_mode cache=)
        self.keep_on_device = False  # True: arrays stay on the model's device (aggregated there, Aggregating)

    @classmethod
    def from_plan(cls, keys, requests, context):
        hl = dict(context["hooked_layer"])
        return cls(hooked_layer=str(hl["path"]), mc_samples=int(hl["mc_samples"]), keys=keys,
                   seed=int(hl["mask_seed"] if hl.get("mask_seed") is not None else context.get("seed", 0)),
                   drop_prob=hl.get("drop_prob"),
                   block_size=hl.get("block_size"), mc_batch=(context.get("extract") or {}).get("mc_batch"),
                   reduction=str(hl.get("reduction", "auto")), masks=str(hl.get("masks", "shared")),
                   mask_norm=str(hl.get("mask_norm", "expected")))

    def identity(self):
        ident = {"keys": sorted(self.keys), "hooked_layer": self.hooked_layer, "mc_samples": self.mc_samples,
                 "seed": self.seed, "drop_prob": self.drop_prob, "block_size": self.block_size,
                 "reduction": self.reduction,
                 "masks": "per-pass-v1" if self.masks == "shared" else "per-image-v1"}  # shared: hashes as before
        if self.mask_norm != "per_mask":  # per_mask parts keep the hashes they had before mask_norm existed
            ident["mask_norm"] = self.mask_norm
        return ident

    def setup(self, model):
        resolve_module(model, self.hooked_layer)
        require_mc_modules(model)

    def produce(self, model, x, y, index):
        n, s = x.shape[0], self.mc_samples
        per_chunk = max(1, (self.mc_batch or n * s) // s)  # images per stochastic forward
        want_latent, want_logits = "latent" in self.keys, "mc_logits" in self.keys
        layer = resolve_module(model, self.hooked_layer)
        with torch.inference_mode(), \
                mc_mode(model, self.drop_prob, self.block_size, samples=s, seed=self.seed, masks=self.masks,
                        mask_norm=self.mask_norm, cache=self._mask_cache) as layers:
            active = any(float(getattr(m, "drop_prob", getattr(m, "p", 0.0))) > 0 for _, m in layers)
            latents, logits = [], []
            if self.share_prefix and self._prefix_ok is not False:
                try:
                    for i0 in range(0, n, per_chunk):
                        self._forward(model, x[i0:i0 + per_chunk], layer, [m for _, m in layers], latents, logits,
                                      want_latent, want_logits, expand_at_mc_layer=True)
                    self._prefix_ok = True
                except RuntimeError as err:
                    if self._prefix_ok:  # it worked on earlier batches: a real error, not the graph
                        raise
                    self._prefix_ok = False
                    warnings.warn(f"running the layers before the first dropout/DropBlock layer once per batch "
                                  f"failed for {type(model).__name__} ({err}); falling back to S full "
                                  "forward passes (slower, same result)", RuntimeWarning, stacklevel=3)
                    latents, logits = [], []
            if not self._prefix_ok:
                for i0 in range(0, n, per_chunk):
                    xc = x[i0:i0 + per_chunk]
                    self._forward(model, xc.repeat_interleave(s, dim=0), layer, [], latents, logits, want_latent,
                                  want_logits, expand_at_mc_layer=False, images=xc)
        res = {}
        if want_latent:
            latent = torch.cat(latents).reshape(n, s, -1)
            self._warn_if_constant(latent, active)
            res["latent"] = latent
        if want_logits:
            res["mc_logits"] = torch.cat(logits).reshape(n, s, -1)
        return res if self.keep_on_device else {k: v.cpu() for k, v in res.items()}

    def _forward(self, model: nn.Module, xi: torch.Tensor, layer: nn.Module, mc_layers: list[nn.Module],
                 latents: list, logits: list, want_latent: bool, want_logits: bool, expand_at_mc_layer: bool,
                 images: torch.Tensor | None = None) -> None:
        """One stochastic forward whose rows are ``b * S + s``.

        With ``expand_at_mc_layer`` the input holds each image once: the deterministic layers before the first
        MC layer run once per image and that layer's input is repeated S times (same rows as for the repeated
        input, so the samples are identical). ``images``: the chunk's images before repetition (default ``xi``),
        whose seeds the per_image masks use (row ``r`` is image ``r // S``).
        """
        s = self.mc_samples
        rows = xi.shape[0] * s if expand_at_mc_layer else xi.shape[0]
        expanded = [False]

        def expand(module: nn.Module, args: tuple) -> tuple | None:
            # the first MC layer's input, and that of any MC layer on the same once-per-image activations (one per
            # FPN level), is repeated S times; MC layers further on already see the S-fold rows
            if not args or not isinstance(args[0], torch.Tensor) or (expanded[0] and args[0].shape[0] != xi.shape[0]):
                return None
            expanded[0] = True
            return (args[0].repeat_interleave(s, dim=0), *args[1:])

        with ExitStack() as stack:
            if self.masks == "per_image":
                stack.enter_context(row_seeds(model, image_seeds(xi if images is None else images, self.seed)))
            if expand_at_mc_layer:
                for m in mc_layers:
                    stack.callback(m.register_forward_pre_hook(expand).remove)
            cap = stack.enter_context(capture_output(layer, stop_forward=not want_logits)) if want_latent else None
            y = model(xi)
            if want_logits:
                out = logits_of(y)
                if out.shape[0] != rows:
                    raise RuntimeError(f"model output has {out.shape[0]} rows, expected {rows}")
                logits.append(out.float())
        if cap is not None:
            if cap.calls == 0 or (want_logits and cap.calls > 1):
                raise RuntimeError(
                    f"hooked layer {self.hooked_layer!r} ran {cap.calls} times in one forward of "
                    f"{type(model).__name__}; choose a layer that runs exactly once")
            out = cap.value if isinstance(cap.value, dict) else first_tensor(cap.value,
                                                                              f"hooked layer {self.hooked_layer!r}")
            value = reduce_activation(out, self.reduction).float()  # a dict of FPN levels: their means concatenated
            if value.shape[0] * s == rows and value.shape[0] != rows:  # hooked layer runs before every MC layer
                value = value.repeat_interleave(s, dim=0)
            if value.shape[0] != rows:
                raise RuntimeError(f"hooked layer output has {value.shape[0]} rows, expected {rows}")
            latents.append(value)

    def _warn_if_constant(self, latent: torch.Tensor, active: bool) -> None:
        if self._checked_variation or latent.shape[1] < 2 or not active:
            return
        self._checked_variation = True
        if torch.equal(latent, latent[:, :1].expand_as(latent)):
            warnings.warn(
                f"all {latent.shape[1]} MC samples of hooked layer {self.hooked_layer!r} are identical: it "
                "runs before every active dropout/DropBlock layer. Hook a layer after one (e.g. the "
                "DropBlock layer itself)", RuntimeWarning, stacklevel=3)
