"""The producer contract and helpers shared by the built-in producers."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from larex import io


class Producer:
    """Computes some feature keys of a batch. Subclasses set ``provides`` and implement ``produce``.

    * ``provides``: keys (or ``prefix.`` families) this producer can write; each is registered in
      :mod:`larex.features` with this class as its producer.
    * ``keys``: the concrete keys this instance writes (a subset of ``provides``, families expanded).
    * ``identity()``: the parameters its output depends on; the part folder is ``<name>-<hash(identity)>``.
      Parameters that do not change the arrays (chunk sizes) stay out of it.
    * ``setup(model)``: validate layer names etc. before any compute.
    * ``produce(model, x, y, index)``: ``{key: tensor [B, ...]}`` for per-row keys (CPU tensors).
    * ``model_arrays(model)``: ``{key: tensor}`` for ``model``-axis keys (stored once), default none.
    * ``from_plan(keys, requests, context)``: build an instance from the requested keys, the parameter dicts
      that methods attached to them (``Postprocessor.extraction_params``) and the run context (plain dict:
      ``seed``, ``hooked_layer``, ``head``, ``extract``).
    """

    name: ClassVar[str] = "producer"
    provides: ClassVar[tuple[str, ...]] = ()

    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)

    @classmethod
    def from_plan(cls, keys: Sequence[str], requests: Sequence[Mapping[str, Any]],
                  context: Mapping[str, Any]) -> "Producer":
        return cls(keys)

    def identity(self) -> dict[str, Any]:
        return {"keys": sorted(self.keys)}

    @property
    def part(self) -> str:
        """Folder name of this producer's part: ``<name>-<hash of class and identity>``."""
        cls = type(self)
        return f"{self.name}-{io.config_hash({'producer': f'{cls.__module__}.{cls.__qualname__}', **self.identity()})}"

    def setup(self, model: nn.Module) -> None:
        """Validate against the model before any compute (default: nothing to check)."""

    def produce(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def model_arrays(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.identity().items())})"


def first_tensor(value: Any, what: str) -> torch.Tensor:
    """``value`` if a tensor, else the first tensor in a tuple/list/mapping."""
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError(f"{what} produced {type(value).__name__} with no tensor; hook a layer (or wrap "
                    "the model so that it returns) a tensor")


def logits_of(out: Any) -> torch.Tensor:
    """``[B, C]`` logits from a model output (a tensor, or a mapping with a ``logits`` entry)."""
    t = out["logits"] if isinstance(out, Mapping) and "logits" in out else out
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"keys 'logits'/'mc_logits' need a model that returns logits [B, C]; got {got}. "
                        "Wrap the model so that forward returns [B, C] logits, or drop those keys")
    return t


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def single_request(name: str, key: str, requests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The one parameter set that every method requesting ``key`` agrees on (conflicts are an error)."""
    distinct = []
    for r in requests:
        if r and dict(r) not in distinct:
            distinct.append(dict(r))
    if len(distinct) > 1:
        raise ValueError(f"{name}: the selected methods request {key!r} with different parameters {distinct}; "
                         "give them the same settings or select one of them")
    return distinct[0] if distinct else {}
