"""LightningModule that extracts the LaREx feature set (latent, logits, mc_logits, ...) per batch."""
from __future__ import annotations

import math
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
NAC_PREFIX = "nac."
"""Key family ``nac.<layer path>``: raw NAC neuron statistics of the layers in ``FeatureExtractor(nac_layers=...)``."""
ODIN_KEY = "odin_logits"
"""Logits of ODIN-perturbed inputs, written when ``FeatureExtractor(odin={...})`` is set."""
ODIN_ARGS = ("temperature", "epsilon")
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


def _odin_args(odin: Mapping[str, float] | None) -> dict[str, float] | None:
    """Validated ``{"temperature": T > 0, "epsilon": eps >= 0}`` as floats, or None."""
    if odin is None:
        return None
    example = "odin={'temperature': 1000.0, 'epsilon': 0.0014}"
    if not isinstance(odin, Mapping) or set(odin) != set(ODIN_ARGS):
        got = sorted(map(str, odin)) if isinstance(odin, Mapping) else type(odin).__name__
        raise ValueError(f"FeatureExtractor odin must be None or a mapping with exactly the keys {list(ODIN_ARGS)}; "
                         f"got {got}. Use e.g. {example}")
    out = {}
    for name, bound in (("temperature", "> 0"), ("epsilon", ">= 0")):
        value = odin[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and (value > 0 if name == "temperature" else value >= 0)
        if not ok:
            raise ValueError(f"FeatureExtractor odin {name} must be a finite number {bound}; got {value!r}. "
                             f"Use e.g. {example}")
        out[name] = float(value)
    return out


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
    * ``nac.<layer path>`` [B, D] float32 for every layer in ``nac_layers`` (returned in addition to
      ``keys``): the raw NAC neuron statistic (Liu et al., ICLR 2024) ``reduce(z * dKL/dz)``, z the layer
      output, KL = KL(uniform || softmax(logits)), ``reduce`` as for ``latent`` (conv maps -> per-channel
      spatial mean of the product, as pytorch-ood's ``NACUE``). No sigmoid: the steepness alpha is a
      hyperparameter of the ``nac_ue`` postprocessor, which computes the states ``sigmoid(alpha * raw)``.
      One forward + backward in eval mode, with gradients enabled even inside ``Trainer.predict``.
    * ``odin_logits`` [B, C] float32 when ``odin`` is set (returned in addition to ``keys``): eval-mode
      logits of ODIN's perturbed input (Liang et al., ICLR 2018)
      ``x~ = x - epsilon * sign(-grad_x log max_c softmax(f(x) / T)_c)``, i.e. one step down the
      cross-entropy of ``f(x) / T`` w.r.t. the predicted label, as pytorch-ood's ``ODIN``. ``x`` is the
      model input, already normalized by the data pipeline, so ``epsilon`` is in normalized-input units
      (pytorch-ood given a normalized tensor and no ``norm_std``). Score them with
      ``ODIN(temperature=T, key="odin_logits")``.

    The S passes run as one forward on the batch repeated S times (row ``b*S + s`` is sample b, pass
    s), split into chunks of at most ``mc_batch`` rows; by default (``share_prefix``) the layers before
    the first MC layer run once per image and only the rest runs on the S-fold batch. BatchNorm is in eval, so this equals S
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
        mc_batch: rows per MC forward chunk, rounded down to whole images (None = all B*S rows at once).
        reduction: ``reduce_activation`` layout for the hooked output.
        share_prefix: run the layers before the first MC layer once per image and repeat only that
            layer's input S times (exact: nothing before it is stochastic). Falls back to S full passes,
            with a warning, for models where later layers reuse earlier activations (e.g. a skip
            connection around the dropout layer).
        nac_layers: dotted paths of the layers whose NAC statistics become ``nac.<path>`` (empty = none).
        odin: ``{"temperature": T, "epsilon": eps}`` (paper: 1000 and 0.0014) to extract ``odin_logits``,
            or None (off).
    """

    def __init__(self, model: nn.Module, hooked_layer: str, head: str | None = "fc",
                 mc_samples: int = 16, keys: Sequence[str] = KNOWN_KEYS, seed: int = 0,
                 drop_prob: float | None = None, block_size: int | None = None,
                 mc_batch: int | None = None, reduction: str = "auto", share_prefix: bool = True,
                 nac_layers: Sequence[str] = (), odin: Mapping[str, float] | None = None) -> None:
        super().__init__()
        keys = (keys,) if isinstance(keys, str) else tuple(keys)
        unknown = [k for k in keys if k not in KNOWN_KEYS]
        nac_keys = [k for k in unknown if isinstance(k, str) and k.startswith(NAC_PREFIX)]
        if nac_keys:
            raise ValueError(f"FeatureExtractor keys {nac_keys}: NAC statistics are not requested through keys; "
                             f"pass nac_layers={[k[len(NAC_PREFIX):] for k in nac_keys]} (extract.nac_layers) "
                             "instead")
        if ODIN_KEY in unknown:
            raise ValueError(f"FeatureExtractor keys: {ODIN_KEY!r} is not requested through keys; pass "
                             "odin={'temperature': 1000.0, 'epsilon': 0.0014} (extract.odin) instead")
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
        nac_layers = (nac_layers,) if isinstance(nac_layers, str) else tuple(nac_layers)
        for path in nac_layers:
            resolve_module(model, path)
        if len(set(nac_layers)) != len(nac_layers):
            raise ValueError(f"FeatureExtractor nac_layers {list(nac_layers)} lists a layer twice; list each once")
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
        self.share_prefix = share_prefix
        self.nac_layers = nac_layers
        self.odin = _odin_args(odin)
        self._prefix_ok: bool | None = None  # None: not tried yet
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
        if self.nac_layers:
            out.update(self._nac(x))
        extra: tuple[str, ...] = ()
        if self.odin is not None:
            out[ODIN_KEY], extra = self._odin_logits(x), (ODIN_KEY,)
        return {k: out[k] for k in (*self.keys, *(NAC_PREFIX + p for p in self.nac_layers), *extra)}

    def _odin_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``odin_logits`` [B, C]: eval-mode logits of ODIN's perturbed input (see the class docstring).

        The loss is the sum over the batch of each sample's ``-log softmax(f(x_b) / T)_{y^_b}``; in eval mode
        samples do not interact, so one batched backward gives every sample's own input gradient exactly.
        Only the input gradient is computed (``torch.autograd.grad``): no parameter ``.grad`` accumulates.
        """
        if not x.is_floating_point():
            raise TypeError(f"ODIN perturbs the input, which must be a floating tensor; got {x.dtype}. Convert "
                            "the inputs to float in the data pipeline or set extract.odin=null")
        t, eps = self.odin["temperature"], self.odin["epsilon"]
        with torch.inference_mode(False), eval_mode(self.model):
            xi = x.clone().detach()  # a normal tensor even when x was created under inference mode
            if eps > 0:
                with torch.enable_grad():
                    xi.requires_grad_(True)
                    logp = torch.log_softmax(_logits_of(self.model(xi)) / t, dim=1)
                    nll = -logp.gather(1, logp.argmax(dim=1, keepdim=True)).sum()  # CE w.r.t. predicted label
                    (grad,) = torch.autograd.grad(nll, xi)
                xi = (xi.detach() - eps * grad.sign()).detach()
            with torch.no_grad():
                return _logits_of(self.model(xi)).float().cpu()

    def _nac(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``nac.<path>`` [B, D]: raw NAC statistics of ``nac_layers`` from one eval-mode forward + backward.

        Lightning predicts under ``torch.inference_mode``, whose tensors cannot enter autograd: the input is
        cloned with inference mode switched off and gradients enabled. The loss is the sum over the batch
        of each sample's KL(u || p_b); in eval mode samples do not interact (BatchNorm uses running
        statistics, dropout/DropBlock are off), so d(sum_b KL_b)/dz_b = dKL_b/dz_b: one batched backward
        gives every sample's own gradient exactly.
        """
        modules = [resolve_module(self.model, p) for p in self.nac_layers]
        captured: list[list[Any]] = [[] for _ in modules]

        def hook_for(i: int):
            def hook(_m: nn.Module, _args: tuple, value: Any) -> torch.Tensor:
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"NAC layer {self.nac_layers[i]!r} returned {type(value).__name__}, not a "
                                    "tensor; choose a layer whose output is a single tensor")
                captured[i].append(value)
                # downstream layers get a copy, so an in-place op after this layer (e.g. ResNet's
                # `out += identity` after bn2) cannot overwrite z; the copy's gradient is z's gradient
                return value.clone()
            return hook

        with torch.inference_mode(False), torch.enable_grad(), eval_mode(self.model), ExitStack() as stack:
            for i, m in enumerate(modules):
                stack.callback(m.register_forward_hook(hook_for(i)).remove)
            xi = x.clone()
            if xi.is_floating_point():  # layer outputs then need grad even when all parameters are frozen
                xi.requires_grad_(True)
            logits = _logits_of(self.model(xi))
            for path, caps in zip(self.nac_layers, captured):
                if len(caps) != 1:
                    raise RuntimeError(f"NAC layer {path!r} ran {len(caps)} times in one forward of "
                                       f"{type(self.model).__name__}; choose a layer that runs exactly once")
                if not caps[0].requires_grad:
                    raise RuntimeError(f"NAC layer {path!r} output does not depend on differentiable inputs "
                                       "(no grad); choose a layer on the path from the input to the logits")
            zs = [caps[0] for caps in captured]
            # KL(u || softmax(f)) = -log C - mean_c log_softmax(f)_c; the constant has no gradient
            loss = -torch.log_softmax(logits.float(), dim=1).mean(dim=1).sum()
            grads = torch.autograd.grad(loss, zs, allow_unused=True)
            res = {}
            for path, z, g in zip(self.nac_layers, zs, grads):
                if g is None:
                    raise RuntimeError(f"the logits do not depend on NAC layer {path!r}; choose a layer on the "
                                       "path from the input to the logits")
                prod = reduce_activation(z.detach() * g, self.reduction)  # spatial mean of z * dKL/dz
                res[NAC_PREFIX + path] = prod.float().cpu()
        return res

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
        per_chunk = max(1, (self.mc_batch or n * s) // s)  # images per stochastic forward
        want_latent, want_logits = "latent" in self.keys, "mc_logits" in self.keys
        layer = resolve_module(self.model, self.hooked_layer)
        with mc_mode(self.model, self.drop_prob, self.block_size) as layers, \
                seeded_rng(self.seed * SEED_STRIDE + first_index, x.device):
            active = any(float(getattr(m, "drop_prob", getattr(m, "p", 0.0))) > 0 for _, m in layers)
            state = torch.random.get_rng_state(), (torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
            latents, logits = [], []
            if self.share_prefix and self._prefix_ok is not False:
                try:
                    for i0 in range(0, n, per_chunk):
                        self._mc_forward(x[i0:i0 + per_chunk], layer, [m for _, m in layers], latents, logits,
                                         want_latent, want_logits, expand_at_mc_layer=True)
                    self._prefix_ok = True
                except RuntimeError as err:
                    if self._prefix_ok:  # it worked on earlier batches: a real error, not the graph
                        raise
                    self._prefix_ok = False
                    warnings.warn(f"running the layers before the first dropout/DropBlock layer once per batch "
                                  f"failed for {type(self.model).__name__} ({err}); falling back to S full "
                                  "forward passes (slower, same result)", RuntimeWarning, stacklevel=3)
                    latents, logits = [], []
                    torch.random.set_rng_state(state[0])
                    if state[1] is not None:
                        torch.cuda.set_rng_state(state[1], x.device)
            if not self._prefix_ok:
                for i0 in range(0, n, per_chunk):
                    xi = x[i0:i0 + per_chunk].repeat_interleave(s, dim=0)
                    self._mc_forward(xi, layer, [], latents, logits, want_latent, want_logits,
                                     expand_at_mc_layer=False)
        res = {}
        if want_latent:
            latent = torch.cat(latents).reshape(n, s, -1)
            self._warn_if_constant(latent, active)
            res["latent"] = latent.cpu()
        if want_logits:
            res["mc_logits"] = torch.cat(logits).reshape(n, s, -1).cpu()
        return res

    def _mc_forward(self, xi: torch.Tensor, layer: nn.Module, mc_layers: list[nn.Module], latents: list,
                    logits: list, want_latent: bool, want_logits: bool, expand_at_mc_layer: bool) -> None:
        """One stochastic forward whose rows are ``b * S + s``.

        With ``expand_at_mc_layer`` the input holds each image once: the deterministic layers before the
        first MC layer run once per image and that layer's input is repeated S times (row order and RNG
        draws are the same as for the repeated input, so the samples are identical).
        """
        s = self.mc_samples
        rows = xi.shape[0] * s if expand_at_mc_layer else xi.shape[0]
        expanded = [False]

        def expand(module: nn.Module, args: tuple) -> tuple | None:
            if expanded[0] or not args or not isinstance(args[0], torch.Tensor):
                return None
            expanded[0] = True
            return (args[0].repeat_interleave(s, dim=0), *args[1:])

        with ExitStack() as stack:
            if expand_at_mc_layer:
                for m in mc_layers:
                    stack.callback(m.register_forward_pre_hook(expand).remove)
            cap = stack.enter_context(capture_output(layer, stop_forward=not want_logits)) if want_latent else None
            y = self.model(xi)
            if want_logits:
                out = _logits_of(y)
                if out.shape[0] != rows:
                    raise RuntimeError(f"model output has {out.shape[0]} rows, expected {rows}")
                logits.append(out.float())
        if cap is not None:
            if cap.calls == 0 or (want_logits and cap.calls > 1):
                raise RuntimeError(
                    f"hooked layer {self.hooked_layer!r} ran {cap.calls} times in one forward of "
                    f"{type(self.model).__name__}; choose a layer that runs exactly once")
            value = reduce_activation(_first_tensor(cap.value, f"hooked layer {self.hooked_layer!r}"),
                                      self.reduction).float()
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

    def head_weights(self) -> dict[str, torch.Tensor]:
        """``{"head.weight": [C, F], "head.bias": [C]}`` of the head linear layer (float32, CPU)."""
        if self.head is None:
            raise ValueError("head_weights() needs head= the dotted path of the final linear layer")
        head = resolve_module(self.model, self.head)
        weight = head.weight.detach().float().cpu().clone()
        bias = head.bias.detach().float().cpu().clone() if head.bias is not None \
            else torch.zeros(weight.shape[0], dtype=torch.float32)
        return {"head.weight": weight, "head.bias": bias}
