"""The extraction plan: which producers run, derived from the keys the selected methods need.

Every key a method reads (``fit_requires`` + ``requires``) is looked up in the feature registry
(:mod:`larex.features`); its producer class builds one instance from all requested keys of that producer, the
parameters methods attached to them (``Postprocessor.extraction_params``) and the run context. Keys written by a
stage (``entropy`` by aggregate) are replaced by their inputs first (the Task's aggregation steps), and the Task's
``always_keys`` are added. So ``postprocessor=[lared] baselines=[]`` plans the MC latents only (plus labels), and a method that brings its own
producer module works without any list being edited.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from larex import features
from larex.extraction.producers.base import Producer

class PlanError(ValueError):
    """A requested feature has no producer, or producers disagree."""


def producer_class(key: str) -> type[Producer]:
    spec = features.spec(key)
    path = spec.producer
    if path.startswith("stage:"):
        raise PlanError(f"feature {key!r} is written by the {path[6:]} stage, not by an extraction producer")
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise PlanError(f"feature {key!r}: its producer {path!r} cannot be imported ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, Producer)):
        raise PlanError(f"feature {key!r}: {path!r} is not a larex Producer subclass")
    return cls


@dataclass
class Plan:
    """Producers to run and, per key, the part (folder) that holds it."""

    producers: list[Producer] = field(default_factory=list)
    parts: dict[str, str] = field(default_factory=dict)

    @property
    def row_keys(self) -> list[str]:
        return [k for k in self.parts if not features.is_model_key(k)]

    @property
    def model_keys(self) -> list[str]:
        return [k for k in self.parts if features.is_model_key(k)]

    def producer_of(self, key: str) -> Producer:
        for p in self.producers:
            if key in p.keys:
                return p
        raise KeyError(f"feature {key!r} is not in the extraction plan (planned: {sorted(self.parts)})")

    def describe(self) -> str:
        return ", ".join(f"{p.name}[{','.join(p.keys)}]" for p in self.producers)


def expand_derived(keys: Iterable[str], derived: Mapping[str, Sequence[str]]) -> list[str]:
    """``keys`` with every stage-written key replaced by its inputs (``entropy`` -> ``latent``)."""
    out: list[str] = []
    for k in keys:
        for item in (derived[k] if k in derived else (k,)):
            if item not in out:
                out.append(item)
    return out


def plan_extraction(requests: Mapping[str, Sequence[Mapping[str, Any]]], context: Mapping[str, Any],
                    derived: Mapping[str, Sequence[str]] | None = None, always: Sequence[str] = ()) -> Plan:
    """Build the plan for ``requests`` (key -> the parameter dicts methods attached to it).

    Args:
        requests: per feature key, one parameter dict per method that reads it (``{}`` when it has none).
        context: plain run context handed to ``Producer.from_plan`` (``seed``, ``hooked_layer``, ``head``,
            ``extract``).
        derived: stage-written keys -> their inputs (the Task's aggregation steps).
        always: keys added to every plan (the Task's ``always_keys``, e.g. classification's ``labels``).
    """
    derived = dict(derived or {})
    wanted: dict[str, list[Mapping[str, Any]]] = {}
    for key, params in requests.items():
        for k in expand_derived([key], derived):
            wanted.setdefault(k, []).extend(params if k == key else [])
    for k in always:
        wanted.setdefault(k, [])
    by_class: dict[type[Producer], dict[str, list[Mapping[str, Any]]]] = {}
    for key in wanted:
        by_class.setdefault(producer_class(key), {})[key] = wanted[key]
    plan = Plan()
    for cls, keyed in by_class.items():
        reqs = [p for ps in keyed.values() for p in ps]
        producer = cls.from_plan(sorted(keyed), reqs, context)
        plan.producers.append(producer)
        for k in producer.keys:
            plan.parts[k] = producer.part
    return plan
