"""``odin_logits`` [N, C]: eval-mode logits of ODIN's perturbed input (Liang et al., ICLR 2018).

``x~ = x - epsilon * sign(-grad_x log max_c softmax(f(x) / T)_c)``: one step down the cross-entropy of
``f(x) / T`` w.r.t. the predicted label, as pytorch-ood's ``ODIN``. ``x`` is the model input, already
normalized by the data pipeline, so ``epsilon`` is in normalized-input units. Temperature and epsilon come
from the method that requests the key (``odin_perturbed``'s YAML).
"""
from __future__ import annotations

import math

import torch

from larex.extraction.mc import eval_mode
from larex.extraction.producers.base import Producer, logits_of, single_request

EXAMPLE = "temperature: 1000.0, epsilon: 0.0014"


def check_odin(temperature, epsilon) -> tuple[float, float]:
    out = []
    for name, value, bound in (("temperature", temperature, "> 0"), ("epsilon", epsilon, ">= 0")):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and (value > 0 if name == "temperature" else value >= 0)
        if not ok:
            raise ValueError(f"ODIN {name} must be a finite number {bound}; got {value!r} (e.g. {EXAMPLE})")
        out.append(float(value))
    return out[0], out[1]


class ODIN(Producer):
    name = "odin"
    provides = ("odin_logits",)

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014, keys=("odin_logits",)):
        super().__init__(("odin_logits",))
        self.temperature, self.epsilon = check_odin(temperature, epsilon)

    @classmethod
    def from_plan(cls, keys, requests, context):
        p = single_request("ODIN", "odin_logits", requests)
        unknown = set(p) - {"temperature", "epsilon"}
        if unknown:
            raise ValueError(f"ODIN: unknown parameters {sorted(unknown)} requested for odin_logits; "
                             f"it takes {EXAMPLE}")
        return cls(**p)

    def identity(self):
        return {"temperature": self.temperature, "epsilon": self.epsilon}

    def produce(self, model, x, y, index):
        """The loss is the sum of each sample's ``-log softmax(f(x_b) / T)_{y^_b}``; in eval mode samples do not
        interact, so one batched backward gives every sample's own input gradient. Only the input gradient is
        computed (``torch.autograd.grad``): no parameter ``.grad`` accumulates."""
        if not x.is_floating_point():
            raise TypeError(f"ODIN perturbs the input, which must be a floating tensor; got {x.dtype}. Convert "
                            "the inputs to float in the data pipeline or drop the odin_perturbed method")
        t, eps = self.temperature, self.epsilon
        with torch.inference_mode(False), eval_mode(model):
            xi = x.clone().detach()  # a normal tensor even when x was created under inference mode
            if eps > 0:
                with torch.enable_grad():
                    xi.requires_grad_(True)
                    logp = torch.log_softmax(logits_of(model(xi)) / t, dim=1)
                    nll = -logp.gather(1, logp.argmax(dim=1, keepdim=True)).sum()  # CE w.r.t. predicted label
                    (grad,) = torch.autograd.grad(nll, xi)
                xi = (xi.detach() - eps * grad.sign()).detach()
            with torch.no_grad():
                return {"odin_logits": logits_of(model(xi)).float().cpu()}
