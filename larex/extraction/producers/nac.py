"""``nac.<layer>`` [N, D]: raw NAC neuron statistics (Liu et al., ICLR 2024) of the layers named by the keys.

``reduce(z * dKL/dz)``, z the layer output, KL = KL(uniform || softmax(logits)), ``reduce`` as for ``latent``
(conv maps -> per-channel spatial mean, as pytorch-ood's ``NACUE``). No sigmoid: the steepness alpha is a
hyperparameter of the ``nac_ue`` postprocessor. One forward + backward in eval mode, with gradients enabled even
inside ``Trainer.predict``. The layers are the ones in the requested keys (``nac_ue.layers``, by default
``model.nac_layers``): they are given in one place.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from larex.extraction.hooks import resolve_module
from larex.extraction.mc import eval_mode, reduce_activation
from larex.extraction.producers.base import Producer, logits_of

PREFIX = "nac."


class NAC(Producer):
    name = "nac"
    provides = (PREFIX,)

    def __init__(self, layers=None, keys=None, reduction: str = "auto"):
        if layers is None:
            layers = [k[len(PREFIX):] for k in (keys or ())]
        layers = (layers,) if isinstance(layers, str) else tuple(str(p) for p in layers)
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"NAC layers {list(layers)} must be a non-empty list of distinct dotted layer paths")
        super().__init__(tuple(PREFIX + p for p in layers))
        self.layers = layers
        self.reduction = reduction

    @classmethod
    def from_plan(cls, keys, requests, context):
        return cls(keys=sorted(keys))

    def identity(self):
        return {"layers": sorted(self.layers), "reduction": self.reduction}

    def setup(self, model):
        for path in self.layers:
            resolve_module(model, path)

    def produce(self, model, x, y, index):
        """Lightning predicts under ``torch.inference_mode``, whose tensors cannot enter autograd: the input is
        cloned with inference mode off and gradients on. The loss is the sum over the batch of each sample's
        KL(u || p_b); in eval mode samples do not interact, so one batched backward gives every sample's own
        gradient exactly."""
        modules = [resolve_module(model, p) for p in self.layers]
        captured: list[list[Any]] = [[] for _ in modules]

        def hook_for(i: int):
            def hook(_m: nn.Module, _args: tuple, value: Any) -> torch.Tensor:
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"NAC layer {self.layers[i]!r} returned {type(value).__name__}, not a "
                                    "tensor; choose a layer whose output is a single tensor")
                captured[i].append(value)
                # downstream layers get a copy, so an in-place op after this layer (e.g. ResNet's
                # `out += identity` after bn2) cannot overwrite z; the copy's gradient is z's gradient
                return value.clone()
            return hook

        with torch.inference_mode(False), torch.enable_grad(), eval_mode(model), ExitStack() as stack:
            for i, m in enumerate(modules):
                stack.callback(m.register_forward_hook(hook_for(i)).remove)
            xi = x.clone()
            if xi.is_floating_point():  # layer outputs then need grad even when all parameters are frozen
                xi.requires_grad_(True)
            logits = logits_of(model(xi))
            for path, caps in zip(self.layers, captured):
                if len(caps) != 1:
                    raise RuntimeError(f"NAC layer {path!r} ran {len(caps)} times in one forward of "
                                       f"{type(model).__name__}; choose a layer that runs exactly once")
                if not caps[0].requires_grad:
                    raise RuntimeError(f"NAC layer {path!r} output does not depend on differentiable inputs "
                                       "(no grad); choose a layer on the path from the input to the logits")
            zs = [caps[0] for caps in captured]
            # KL(u || softmax(f)) = -log C - mean_c log_softmax(f)_c; the constant has no gradient
            loss = -torch.log_softmax(logits.float(), dim=1).mean(dim=1).sum()
            grads = torch.autograd.grad(loss, zs, allow_unused=True)
            res = {}
            for path, z, g in zip(self.layers, zs, grads):
                if g is None:
                    raise RuntimeError(f"the logits do not depend on NAC layer {path!r}; choose a layer on the "
                                       "path from the input to the logits")
                res[PREFIX + path] = reduce_activation(z.detach() * g, self.reduction).float().cpu()
        return res
