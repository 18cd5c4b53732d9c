"""``head.weight`` [C, F] / ``head.bias`` [C]: the final linear layer, stored once per model."""
from __future__ import annotations

import torch
from torch import nn

from larex.extraction.hooks import resolve_module
from larex.extraction.producers.base import Producer


def check_head(model: nn.Module, head: str | None, what: str) -> nn.Linear:
    if head is None:
        raise ValueError(f"{what} needs head= the dotted path of the final linear layer (model.head in the "
                         "model YAML)")
    module = resolve_module(model, head)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"head {head!r} is a {type(module).__name__}, not nn.Linear; set head (model.head) "
                        "to the dotted path of the final linear layer")
    return module


class Head(Producer):
    name = "head"
    provides = ("head.weight", "head.bias")

    def __init__(self, head: str, keys=("head.weight", "head.bias")):
        super().__init__(("head.weight", "head.bias"))
        self.head = head

    @classmethod
    def from_plan(cls, keys, requests, context):
        return cls(head=context.get("head"))

    def identity(self):
        return {"head": self.head}

    def setup(self, model):
        check_head(model, self.head, "the head weights (head.weight / head.bias)")

    def model_arrays(self, model):
        head = check_head(model, self.head, "head.weight / head.bias")
        weight = head.weight.detach().float().cpu().clone()
        bias = head.bias.detach().float().cpu().clone() if head.bias is not None \
            else torch.zeros(weight.shape[0], dtype=torch.float32)
        return {"head.weight": weight, "head.bias": bias}
