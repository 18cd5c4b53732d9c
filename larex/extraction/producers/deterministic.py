"""``logits`` [N, C] and ``penultimate`` [N, F]: one eval-mode pass (no MC); penultimate = input of the head."""
from __future__ import annotations

from contextlib import ExitStack

import torch

from larex.extraction.hooks import capture_input, resolve_module
from larex.extraction.mc import eval_mode
from larex.extraction.producers.base import Producer, logits_of
from larex.extraction.producers.head import check_head


class Deterministic(Producer):
    name = "deterministic"
    provides = ("logits", "penultimate")

    def __init__(self, keys=("logits", "penultimate"), head: str | None = None):
        keys = tuple(k for k in self.provides if k in keys)
        if not keys:
            raise ValueError(f"Deterministic produces {self.provides}; got keys {keys}")
        super().__init__(keys)
        self.head = head if "penultimate" in keys else None

    @classmethod
    def from_plan(cls, keys, requests, context):
        return cls(keys, head=context.get("head"))

    def identity(self):
        return {"keys": sorted(self.keys), "head": self.head}

    def setup(self, model):
        if "penultimate" in self.keys:
            check_head(model, self.head, "key 'penultimate'")

    def produce(self, model, x, y, index):
        res = {}
        with torch.inference_mode(), eval_mode(model), ExitStack() as stack:
            pen = stack.enter_context(capture_input(resolve_module(model, self.head))) if self.head else None
            out = model(x)
        if "logits" in self.keys:
            res["logits"] = logits_of(out).float().cpu()
        if pen is not None:
            value = pen.value
            if pen.calls != 1 or not isinstance(value, torch.Tensor) or value.dim() != 2:
                raise RuntimeError(
                    f"head {self.head!r} must run once per forward on a [B, F] input; it ran {pen.calls} "
                    f"times" + (f" on {tuple(value.shape)}" if isinstance(value, torch.Tensor) else "")
                    + ". Set head to the final linear layer of the model")
            res["penultimate"] = value.float().cpu()
        return res
