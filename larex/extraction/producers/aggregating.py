"""A producer whose MC samples are aggregated on the extraction device, batch by batch (``extract.keep_latent=false``).

ImageNet-1k with S=16 latents of 512 dims is 1.28M x 16 x 512 x 4 B ~ 42 GB; the methods read only the LaREx
entropy (and the MC mean) [N, D]. :class:`Aggregating` wraps a planned producer (``MonteCarlo``, the box producer)
and runs the Task's aggregation steps on each batch's samples before they leave the device, so its part stores
``entropy`` [N, D] (and ``latent_mean``, ``box_entropy``, ... whichever the selected methods read) instead of
``latent`` [N, S, D]: S times less disk. The steps are the aggregate stage's own functions on the same samples, so
the values equal the two-stage path's (every estimator is row-wise). The part hash holds the inner producer's
identity and the steps', so a changed estimator writes a new part and the full-latent part is never mistaken for it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from larex.extraction.producers.base import Producer


class Aggregating(Producer):
    """Args: inner (the producer whose keys the steps read), steps (``AggregationStep``\\ s whose inputs ``inner``
    writes), keep (inner keys to store as well, e.g. ``latent`` when a method reads it directly)."""

    name = "agg"

    def __init__(self, inner: Producer, steps: Sequence, keep: Sequence[str] = ()):
        if not steps:
            raise ValueError("Aggregating needs at least one aggregation step")
        foreign = sorted({i for s in steps for i in s.inputs} - set(inner.keys))
        if foreign:
            raise ValueError(f"aggregation inputs {foreign} are not written by {inner!r} (it writes {inner.keys})")
        self.inner = inner
        self.steps = list(steps)
        self.consumed = tuple(k for k in inner.keys if any(k in s.inputs for s in steps) and k not in keep)
        super().__init__([*(k for k in inner.keys if k not in self.consumed), *(s.output for s in steps)])
        self.name = f"{inner.name}_agg"
        if hasattr(inner, "keep_on_device"):
            inner.keep_on_device = True  # the samples stay on the extraction device for the steps

    def identity(self):
        return {"inner": {"producer": f"{type(self.inner).__module__}.{type(self.inner).__qualname__}",
                          **self.inner.identity()},
                "steps": [{"output": s.output, "inputs": list(s.inputs), **dict(s.identity)} for s in self.steps],
                "stored": sorted(self.keys)}

    def setup(self, model: nn.Module) -> None:
        self.inner.setup(model)

    def produce(self, model, x, y, index):
        out = self.inner.produce(model, x, y, index)
        for s in self.steps:
            value = s.fn({k: out[k] for k in s.inputs})
            out[s.output] = torch.as_tensor(value).cpu()
        return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in out.items() if k in self.keys}

    def model_arrays(self, model):
        return self.inner.model_arrays(model)


def aggregate_in_extraction(plan, steps: Sequence, keep: Sequence[str] = ()):
    """``plan`` with each producer that writes the inputs of ``steps`` wrapped in :class:`Aggregating`: its part
    stores the steps' outputs, and the inputs only where listed in ``keep`` (keys a method reads directly)."""
    by_producer: dict[int, list] = {}
    for s in steps:
        owners = {id(plan.producer_of(i)) for i in s.inputs}
        if len(owners) != 1:
            raise ValueError(f"aggregation step {s.output}: its inputs {s.inputs} come from several producers")
        by_producer.setdefault(owners.pop(), []).append(s)
    producers = []
    for p in plan.producers:
        if id(p) in by_producer:
            p = Aggregating(p, by_producer[id(p)], keep=[k for k in p.keys if k in keep])
        producers.append(p)
    plan.producers = producers
    plan.parts = {k: p.part for p in producers for k in p.keys}
    return plan
