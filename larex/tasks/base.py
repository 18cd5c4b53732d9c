"""The Task contract: everything that differs per task, so that stages never branch on the task name.

A Task owns
* the input pipeline: :meth:`Task.input_dataset` (transform a split's raw dataset into model inputs) and
  :meth:`Task.collate` (batch them);
* which model outputs exist: every registry key names the tasks whose models have it (``FeatureSpec.tasks``;
  ``None`` = any task, e.g. a hooked layer's activations); the plan is checked against the task before any
  compute (:meth:`Task.check_keys`);
* the aggregation steps (:meth:`Task.aggregation_steps`): stage-written keys computed from extracted ones
  (LaREx ``entropy`` from ``latent``; detection adds box -> image steps);
* task summary metrics (:meth:`Task.summary_metrics`; classification: accuracy), reported beside the OOD metrics.

Tasks are plain objects built by Hydra from ``configs/task/<name>.yaml`` (``_target_``); no Hydra, I/O or MLflow
inside. The stages hand them plain values.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from larex import features


@dataclass(frozen=True)
class AggregationStep:
    """``output`` = ``fn({input: array})`` per shard of one split (rows of ``output`` follow the inputs')."""

    output: str
    inputs: tuple[str, ...]
    fn: Callable[[Mapping[str, np.ndarray]], np.ndarray]
    identity: Mapping[str, Any]


class Task(ABC):
    """Base class; subclasses set ``name`` and implement :meth:`input_dataset` and what else differs."""

    name: str = "task"
    scoring_settings: tuple[str, ...] = ()
    """Keys of the task config that only the scoring reads (not the extracted rows): out of the extraction hash,
    in the hashes of the methods the task expands (:meth:`expand_methods`)."""
    producer_settings: tuple[str, ...] = ()
    """Keys of the task config that producers read (``Producer.from_plan`` context ``task``) and put in their part
    hashes: out of the extraction hash, so other settings keep the other parts."""
    always_keys: tuple[str, ...] = ()
    """Keys extracted in every plan of this task, whatever the methods read (cheap ones the reports use)."""

    def __init__(self, name: str | None = None):
        if name is not None:
            self.name = name

    # ------------------------------------------------------------------ inputs
    @abstractmethod
    def input_dataset(self, dataset, input_spec: Mapping[str, Any]):
        """Wrap a split's raw dataset so it yields model inputs ``(x, target, index)``."""

    def collate(self, items: Sequence[Any]) -> Any:
        return torch.utils.data.default_collate(list(items))

    # ------------------------------------------------------------------ features
    def can_produce(self, key: str) -> bool:
        spec = features.spec(key)
        return spec.tasks is None or self.name in spec.tasks

    def check_keys(self, keys: Sequence[str]) -> None:
        bad = {k: features.spec(k).tasks for k in keys if not self.can_produce(k)}
        if bad:
            raise ValueError(f"task {self.name!r} has no feature(s) {sorted(bad)} (those belong to the tasks "
                             f"{sorted({t for ts in bad.values() for t in ts})}); select methods this task supports")

    def aggregation_steps(self, params: Mapping[str, Any]) -> list[AggregationStep]:
        return []

    def derived_keys(self) -> dict[str, tuple[str, ...]]:
        """Stage-written key -> the extracted keys it is computed from (for the extraction plan)."""
        return {s.output: s.inputs for s in self.aggregation_steps({})}

    # ------------------------------------------------------------------ training
    def train_model(self, model, dataset: Callable[..., Any], settings: Mapping[str, Any], device: torch.device,
                    workdir) -> tuple[torch.nn.Module, dict[str, float]]:
        """Train ``model`` on the ID ``fit`` split (``dataset("fit")``; ``dataset(split, raw=True)`` without the
        input transform), validating on ``val``; returns the model (eval mode) and figures to record
        (``val_...``). ``settings``: the model's ``train`` config plus ``seed``, ``progress``, ``num_workers``,
        ``image_size``, ``names``. Default: this task trains no models (a configuration error naming the fix)."""
        raise ValueError(f"task {self.name!r} has no trainer: set model.train=null and give the model's weights "
                         "(train.checkpoint=PATH or model.net.weights)")

    # ------------------------------------------------------------------ methods
    def expand_methods(self, methods: Mapping[str, Any], build: Callable[[str], Any]) -> dict[str, tuple[Any, str]]:
        """The methods the task evaluates, from the selected ones: name -> ``(postprocessor, selected name)``.
        Default: each selected method as it is; detection evaluates each at box and image level
        (``box.<name>``, ``image.<name>``; ``build(name)`` makes another instance of a selected method)."""
        return {n: (pp, n) for n, pp in methods.items()}

    # ------------------------------------------------------------------ metrics
    summary_requires: tuple[str, ...] = ()
    split_requires: tuple[str, ...] = ()
    """Keys :meth:`split_metrics` reads on every reported split."""

    def summary_metrics(self, feats: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {}

    method_requires: tuple[str, ...] = ()
    """Keys :meth:`method_metrics` reads on ID ``test`` and every OOD split."""

    def method_metrics(self, method, scores: Mapping[str, np.ndarray], feats: Callable[[str], Mapping[str, np.ndarray]],
                       oods: Sequence[str], threshold: float) -> dict[str, dict[str, float]]:
        """Task figures of one method per OOD set at its ID-val ``threshold`` (detection: the open-set figures of a
        box-level method), ``{ood: {name: value}}``; ``scores``: split -> the method's scores, ``feats(split)``:
        the :attr:`method_requires` keys of a split. Default none."""
        return {}

    def plots(self, directory, all_scores: Mapping[str, Mapping[str, np.ndarray]], feats: Callable[[str], Any],
              images: Callable[[str, Sequence[int]], list], oods: Sequence[str], thresholds: Mapping[str, float]
              ) -> list:
        """Task figures written under ``directory`` (detection: images with boxes coloured by OOD score); the
        paths. ``feats(split)``: the split's :attr:`method_requires` keys; ``images(split, rows)``: raw images."""
        return []

    # ------------------------------------------------------------------ a saved detector's outputs
    report_keys: tuple[str, ...] = ()
    """Keys a saved detector extracts besides its methods' to describe its rows (detection: the boxes)."""

    def blank_target(self) -> Any:
        """The target of an input with no annotation (a saved detector scoring new images): ``-1``."""
        return -1

    def report_columns(self, feats: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """Row axis -> columns describing its rows in a saved detector's results (from :attr:`report_keys`);
        ``image`` rows always carry their position. Default none."""
        return {}

    def split_metrics(self, feats: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Figures of one split reported beside the OOD metrics (detection: the no-object share); default none."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
