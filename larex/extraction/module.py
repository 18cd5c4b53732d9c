"""LightningModule that extracts the LaREx feature set (latent, logits, mc_logits, ...) per batch."""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from larex.extraction.hooks import capture_input, capture_output, resolve_module
from larex.extraction.mc import REDUCTIONS, check_overrides, eval_mode, mc_mode, reduce_activation, \
    require_mc_modules

KNOWN_KEYS = ("latent", "logits", "mc_logits", "penultimate", "labels")
SEED_STRIDE = 1_000_003


def _first_tensor(value: Any, what: str) -> torch.Tensor:
    """``value`` if a tensor, else the first tensor in a tuple/list/mapping."""
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError(f"{what} produced {type(value).__name__} with no tensor; hook a layer (or wrap "
                    "the model so that it returns) a tensor")


def _logits_of(out: Any) -> torch.Tensor:
    """``[B, C]`` logits from a model output (a tensor, or a mapping with a ``logits`` entry)."""
    t = out["logits"] if isinstance(out, Mapping) and "logits" in out else out
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"keys 'logits'/'mc_logits' need a model that returns logits [B, C]; got {got}. "
                        "Wrap the model so that forward returns [B, C] logits, or drop those keys")
    return t


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the CPU generator (and ``device``'s CUDA generator) inside; global RNG state restored after."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for d in devices:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield


class FeatureExtractor(pl.LightningModule):
    """Per batch ``(x, y, index)``: a deterministic pass and S Monte-Carlo passes of ``model``.

    ``predict_step`` returns CPU tensors for the requested ``keys``:

    * ``logits`` [B, C] float32 and ``penultimate`` [B, F] float32 (input of ``head``): one pass in
      eval mode, no MC.
    * ``latent`` [B, S, D] float32: output of ``hooked_layer`` in S passes under ``mc_mode`` (only
      dropout/DropBlock layers stochastic), reduced by ``reduce_activation`` (conv maps -> per-channel
      spatial mean, FC kept raw, sequences -> token mean). ``mc_logits`` [B, S, C]: the model output
      of those passes.
    * ``labels`` [B] int64.

    The S passes run as one forward on the batch repeated S times (row ``b*S + s`` is sample b, pass
    s), split into chunks of at most ``mc_batch`` rows. BatchNorm is in eval, so this equals S
    separate passes up to the random masks. Note that ``dropblock.DropBlock2D`` rescales by the kept
    fraction of the whole (chunk) batch. The masks come from a generator seeded with
    ``seed * 1_000_003 + index[0]``, so a batch's output depends only on ``seed``, its contents and
    ``mc_batch``, not on the order batches run in; the global RNG state is left untouched.
    If ``mc_logits`` is not requested, each MC pass stops right after ``hooked_layer``.

    Args:
        model: any ``nn.Module``; ``hooked_layer`` must run exactly once per forward.
        hooked_layer: dotted path of the layer whose output becomes ``latent``.
        head: dotted path of the final ``nn.Linear`` (``penultimate`` is its input), or None.
        mc_samples: S, the number of MC passes.
        keys: subset of ``KNOWN_KEYS`` to return.
        seed: non-negative base seed of the MC masks.
        drop_prob, block_size: MC-layer overrides during the MC passes (None = as trained); see
            ``mc_mode``.
        mc_batch: rows per MC forward chunk (None = all B*S rows at once).
        reduction: ``reduce_activation`` layout for the hooked output.
    """

    def __init__(self, model: nn.Module, hooked_layer: str, head: str | None = "fc",
                 mc_samples: int = 16, keys: Sequence[str] = KNOWN_KEYS, seed: int = 0,
                 drop_prob: float | None = None, block_size: int | None = None,
                 mc_batch: int | None = None, reduction: str = "auto") -> None:
        super().__init__()
        keys = (keys,) if isinstance(keys, str) else tuple(keys)
        unknown = [k for k in keys if k not in KNOWN_KEYS]
        if unknown or not keys:
            raise ValueError(f"FeatureExtractor keys {unknown or '(empty)'} invalid; choose a non-empty "
                             f"subset of {KNOWN_KEYS}")
        for name, value, low in (("mc_samples", mc_samples, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"FeatureExtractor {name} must be an integer >= {low}; got {value!r}")
        if mc_batch is not None and (isinstance(mc_batch, bool) or not isinstance(mc_batch, int)
                                     or mc_batch < 1):
            raise ValueError(f"FeatureExtractor mc_batch must be a positive integer or None; got {mc_batch!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"FeatureExtractor reduction={reduction!r} is unknown; use one of {REDUCTIONS}")
        check_overrides(drop_prob, block_size)
        resolve_module(model, hooked_layer)
        if head is not None:
            head_module = resolve_module(model, head)
            if not isinstance(head_module, nn.Linear):
                raise TypeError(f"head {head!r} is a {type(head_module).__name__}, not nn.Linear; set head "
                                "to the dotted path of the final linear layer (or None without "
                                "'penultimate' in keys)")
        elif "penultimate" in keys:
            raise ValueError("key 'penultimate' needs head= the dotted path of the final linear layer; "
                             "set head or drop 'penultimate' from keys")
        if "latent" in keys or "mc_logits" in keys:
            require_mc_modules(model)
        self.model = model
        self.hooked_layer = hooked_layer
        self.head = head
        self.mc_samples = mc_samples
        self.keys = keys
        self.seed = seed
        self.drop_prob = drop_prob
        self.block_size = block_size
        self.mc_batch = mc_batch
        self.reduction = reduction
        self._checked_variation = False

    def _model_device(self) -> torch.device:
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 3:
            raise ValueError("FeatureExtractor batches must be (x, y, index) tuples (index = dataset row "
                             "numbers, used to seed the MC masks); wrap the dataset so it returns them")
        x, y, index = batch
        index = torch.as_tensor(index)
        if index.numel() == 0:
            raise ValueError("FeatureExtractor got an empty batch; drop empty batches from the loader")
        return x, torch.as_tensor(y), index

    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x, y, index = self._unpack(batch)
        x = x.to(self._model_device())
        out: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            if "logits" in self.keys or "penultimate" in self.keys:
                out.update(self._deterministic(x))
            if "latent" in self.keys or "mc_logits" in self.keys:
                out.update(self._monte_carlo(x, int(index.reshape(-1)[0])))
        if "labels" in self.keys:
            out["labels"] = y.detach().to(device="cpu", dtype=torch.int64)
        return {k: out[k] for k in self.keys}

    def _deterministic(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        res = {}
        with eval_mode(self.model), ExitStack() as stack:
            pen = None
            if "penultimate" in self.keys:
                pen = stack.enter_context(capture_input(resolve_module(self.model, self.head)))
            y = self.model(x)
        if "logits" in self.keys:
            res["logits"] = _logits_of(y).float().cpu()
        if pen is not None:
            value = pen.value
            if pen.calls != 1 or not isinstance(value, torch.Tensor) or value.dim() != 2:
                raise RuntimeError(
                    f"head {self.head!r} must run once per forward on a [B, F] input; it ran {pen.calls} "
                    f"times" + (f" on {tuple(value.shape)}" if isinstance(value, torch.Tensor) else "")
                    + ". Set head to the final linear layer of the model")
            res["penultimate"] = value.float().cpu()
        return res

    def _monte_carlo(self, x: torch.Tensor, first_index: int) -> dict[str, torch.Tensor]:
        n, s = x.shape[0], self.mc_samples
        rows = n * s
        chunk = self.mc_batch or rows
        source = torch.arange(n, device=x.device).repeat_interleave(s)
        want_latent, want_logits = "latent" in self.keys, "mc_logits" in self.keys
        layer = resolve_module(self.model, self.hooked_layer)
        latents, logits = [], []
        with mc_mode(self.model, self.drop_prob, self.block_size) as layers, \
                seeded_rng(self.seed * SEED_STRIDE + first_index, x.device):
            active = any(float(getattr(m, "drop_prob", getattr(m, "p", 0.0))) > 0 for _, m in layers)
            for r0 in range(0, rows, chunk):
                xi = x.index_select(0, source[r0:r0 + chunk])
                with ExitStack() as stack:
                    cap = stack.enter_context(capture_output(layer, stop_forward=not want_logits)) \
                        if want_latent else None
                    y = self.model(xi)
                    if want_logits:
                        logits.append(_logits_of(y).float())
                if cap is not None:
                    if cap.calls == 0 or (want_logits and cap.calls > 1):
                        raise RuntimeError(
                            f"hooked layer {self.hooked_layer!r} ran {cap.calls} times in one forward of "
                            f"{type(self.model).__name__}; choose a layer that runs exactly once")
                    value = _first_tensor(cap.value, f"hooked layer {self.hooked_layer!r}")
                    latents.append(reduce_activation(value, self.reduction).float())
        res = {}
        if want_latent:
            latent = torch.cat(latents).reshape(n, s, -1)
            self._warn_if_constant(latent, active)
            res["latent"] = latent.cpu()
        if want_logits:
            res["mc_logits"] = torch.cat(logits).reshape(n, s, -1).cpu()
        return res

    def _warn_if_constant(self, latent: torch.Tensor, active: bool) -> None:
        if self._checked_variation or latent.shape[1] < 2 or not active:
            return
        self._checked_variation = True
        if torch.equal(latent, latent[:, :1].expand_as(latent)):
            warnings.warn(
                f"all {latent.shape[1]} MC samples of hooked layer {self.hooked_layer!r} are identical: it "
                "runs before every active dropout/DropBlock layer. Hook a layer after one (e.g. the "
                "DropBlock layer itself)", RuntimeWarning, stacklevel=3)

    def head_weights(self) -> dict[str, torch.Tensor]:
        """``{"head.weight": [C, F], "head.bias": [C]}`` of the head linear layer (float32, CPU)."""
        if self.head is None:
            raise ValueError("head_weights() needs head= the dotted path of the final linear layer")
        head = resolve_module(self.model, self.head)
        weight = head.weight.detach().float().cpu().clone()
        bias = head.bias.detach().float().cpu().clone() if head.bias is not None \
            else torch.zeros(weight.shape[0], dtype=torch.float32)
        return {"head.weight": weight, "head.bias": bias}
