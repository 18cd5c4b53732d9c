"""Helpers shared by the stages: the run (task, methods, extraction plan, layout, hashes), datasets per split,
device, console.

This is the only layer (with the stage modules) that reads Hydra/OmegaConf configs; everything it hands
down to ``data``, ``models``, ``extraction`` and ``postprocessors`` is plain Python objects.
"""
from __future__ import annotations

import importlib.resources
import logging
import os
import random
from pathlib import Path
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from larex import io

console = Console(stderr=False, highlight=False)


def worker_rank() -> int:
    """0 for the first (or only) process of a distributed extraction, > 0 for the ranks Lightning or the cluster
    started beside it (from ``RANK`` / ``SLURM_PROCID`` / ``LOCAL_RANK`` and ``NODE_RANK``, as Lightning reads them)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    local = os.environ.get("LOCAL_RANK", "")
    return int(local) + int(os.environ.get("NODE_RANK", "0") or 0) if local.isdigit() else 0


def log(stage: str, message: str) -> None:
    """One progress line of a stage, e.g. ``[extract] fit: 10000 images`` (rank 0 only)."""
    from rich.markup import escape

    if worker_rank() == 0:
        console.print(f"\\[{stage}] {escape(message)}")


ID_SPLITS = ("fit", "val", "test")


class ConfigError(ValueError):
    """A configuration value is missing or invalid."""


def quiet_lightning() -> None:
    """Keep the console for larex's own lines: no Lightning/MLflow info chatter or known deprecations."""
    import warnings

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*custom batch sampler.*")  # the extraction's whole-shard batches


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads) -> None:
    """``torch.set_num_threads(threads)`` unless None: parallel sweep jobs on a few cores must not each start
    one thread per core (two 2-thread jobs on 2 cores run several times slower than two 1-thread jobs)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer or null (torch's default); got {threads!r}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def resolve_device(spec: str) -> torch.device:
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec} but no CUDA device is available; use device=cpu or device=auto")
    return dev


def lightning_accelerator(device: torch.device) -> dict[str, Any]:
    from larex.models.classifier import lightning_accelerator as accelerator

    return accelerator(device)


def plain(node: Any) -> Any:
    """Resolved plain-Python copy of a config node."""
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def sweep_info() -> dict[str, str] | None:
    """Sweep directory, job number, the job's own folder and overrides when running as one job of a Hydra
    multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not launched by Hydra (tests, notebooks)
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return {"dir": str(Path(hc.sweep.dir).resolve()), "job": str(hc.job.num),
            "job_dir": str(Path(hc.runtime.output_dir).resolve()), "overrides": " ".join(hc.overrides.task)}


def optimizing() -> bool:
    """True inside a job of a Hydra sweeper that optimizes the app's return value (Optuna)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        target = str(HydraConfig.get().sweeper.get("_target_", ""))
    except (ImportError, ValueError):
        return False
    return "optuna" in target.lower()


def overrides() -> str:
    """The command-line overrides of this Hydra job (``""`` when not launched by Hydra), for the output index."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return " ".join(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return ""


# ---------------------------------------------------------------------------------------------------
# splits and datasets
# ---------------------------------------------------------------------------------------------------
def packaged_options(group: str) -> list[str]:
    """Names of the YAML options of a config group shipped with the package."""
    d = importlib.resources.files("larex.configs") / group
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml")) if d.is_dir() else []


def load_packaged_option(group: str, name: str) -> DictConfig:
    """Load ``configs/<group>/<name>.yaml`` from the installed package (dataset.default_ood, baselines=all)."""
    res = importlib.resources.files("larex.configs") / group / f"{name}.yaml"
    if not res.is_file():
        raise ConfigError(f"unknown {group} config {name!r}; available: {packaged_options(group)}")
    return OmegaConf.create(res.read_text())


def ensure_ood(cfg: DictConfig) -> DictConfig:
    """Make ``cfg.ood`` hold the OOD sets (the ``+ood=[...]`` selection, else ``dataset.default_ood``) and
    ``cfg.val_ood`` the validation OOD sets named in ``evaluate.val_ood`` (configs/ood options; disjoint from the
    reported ones)."""
    if not cfg.get("ood"):
        names = list(cfg.dataset.get("default_ood") or [])
        if not names:
            raise ConfigError("no OOD sets: add +ood=[name,...] (see configs/ood/) or set dataset.default_ood")
        with open_dict(cfg):
            cfg.ood = {n: load_packaged_option("ood", n) for n in names}
    val_names = list((cfg.get("evaluate") or {}).get("val_ood") or [])
    if val_names and cfg.get("val_ood") is None:
        clash = sorted(set(val_names) & set(cfg.ood.keys()))
        if clash:
            raise ConfigError(f"evaluate.val_ood {clash} also reported as OOD test sets: choices made on them would be "
                              "tuned on test; use validation OOD sets disjoint from +ood / dataset.default_ood")
        with open_dict(cfg):
            cfg.val_ood = {n: load_packaged_option("ood", n) for n in val_names}
    return cfg


def ood_names(cfg: DictConfig) -> list[str]:
    return list(ensure_ood(cfg).ood.keys())


def val_ood_names(cfg: DictConfig) -> list[str]:
    """Validation OOD sets (``evaluate.val_ood``): scored against ID ``val``, never reported as test results."""
    return list((ensure_ood(cfg).get("val_ood") or {}).keys())


def all_splits(cfg: DictConfig) -> list[str]:
    return [*ID_SPLITS, *(f"ood/{n}" for n in ood_names(cfg)), *(f"val_ood/{n}" for n in val_ood_names(cfg))]


def split_spec(cfg: DictConfig, split: str) -> DictConfig:
    if split in ID_SPLITS:
        return cfg.dataset.splits[split]
    if split.startswith("ood/"):
        return ensure_ood(cfg).ood[split[4:]]
    if split.startswith("val_ood/") and split[8:] in val_ood_names(cfg):
        return cfg.val_ood[split[8:]]
    raise ConfigError(f"unknown split {split!r}; expected one of {all_splits(cfg)}")


def split_limit(cfg: DictConfig, split: str, stage: str = "extract") -> int | None:
    """Subsample size of a split: ``train.limit.<split>`` for training, ``limit.<split>`` for extraction."""
    key = "ood" if split.startswith(("ood/", "val_ood/")) else split
    limits = cfg.train.limit if stage == "train" else cfg.limit
    return limits.get(key)


def build_dataset(cfg: DictConfig, split: str, stage: str = "extract", task=None, raw: bool = False):
    """Instantiate a split's dataset, subsample it (``limit``) and let the Task turn it into model inputs
    (``raw``: without the Task's input transform, for trainers with their own pipeline)."""
    from larex.data.base import Subsample

    spec = split_spec(cfg, split)
    try:
        ds = instantiate(spec)
    except Exception as err:  # Hydra wraps constructor errors; surface the original message
        cause = err
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        if cause is not err and isinstance(cause, (FileNotFoundError, ValueError)):
            raise type(cause)(f"split {split}: {cause}") from err
        raise
    limit = split_limit(cfg, split, stage)
    if limit is not None:
        ds = Subsample(ds, int(limit), seed=int(cfg.seed))
    if raw:
        return ds
    task = task if task is not None else build_task(cfg)
    return task.input_dataset(ds, input_spec(cfg))


def input_spec(cfg: DictConfig) -> dict:
    """What the Task's input transform reads from the ID dataset config (channels, size, normalization)."""
    d = cfg.dataset
    spec = {"channels": d.channels, "image_size": plain(d.image_size), "mean": plain(d.mean), "std": plain(d.std)}
    if d.get("resize") is not None:
        spec["resize"] = d.resize
    return spec


# ---------------------------------------------------------------------------------------------------
# the run: task, methods, extraction plan and layout, built once and handed to every stage
# ---------------------------------------------------------------------------------------------------
def build_task(cfg: DictConfig):
    from larex.tasks.base import Task

    node = cfg.task
    if "_target_" not in node:
        raise ConfigError(f"task config {node.get('name')!r} has no _target_; configs/task/<name>.yaml must name "
                          "a larex.tasks.base.Task subclass, e.g. _target_: larex.tasks.classification.Classification")
    task = instantiate(node)
    if not isinstance(task, Task):
        raise ConfigError(f"task._target_={node._target_} is not a larex.tasks.base.Task")
    return task


def baseline_specs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The selected baselines; ``baselines=all`` expands to every packaged ``configs/baselines/*.yaml``.

    Expanded options are merged into ``cfg.baselines`` so their interpolations (``${model.nac_layers}``)
    resolve against the run's config, as a hand-selected option's do."""
    node = cfg.get("baselines") or {}
    if "all" in node:
        with open_dict(cfg):
            for name in packaged_options("baselines"):
                if name != "all" and name not in node:
                    cfg.baselines[name] = load_packaged_option("baselines", name)
            del cfg.baselines["all"]
        node = cfg.baselines
    return {name: spec for name, spec in node.items()}


def method_specs(cfg: DictConfig) -> dict[str, DictConfig]:
    """Every selected method (``postprocessor`` + ``baselines``) by name."""
    specs: dict[str, DictConfig] = {}
    for node in (cfg.get("postprocessor") or {}, baseline_specs(cfg)):
        for name, spec in node.items():
            if name in specs:
                raise ConfigError(f"method {name!r} is selected twice (postprocessor and baselines)")
            specs[name] = spec
    return specs


def method_keys(pp) -> tuple[str, ...]:
    """Every key a method reads: its fit needs, then its score needs."""
    return tuple(dict.fromkeys((*pp.fit_requires, *pp.requires)))


def method_requests(methods: Mapping[str, Any]) -> dict[str, list[dict]]:
    """Feature key -> the producer parameters each method attaches to it (fit and score needs together)."""
    out: dict[str, list[dict]] = {}
    for pp in methods.values():
        params = pp.extraction_params()
        for key in method_keys(pp):
            out.setdefault(key, []).append(dict(params.get(key) or {}))
    return out


def producer_context(cfg: DictConfig) -> dict:
    """The plain values producers take from the run (``Producer.from_plan``)."""
    ex = plain(cfg.extract)
    return {"seed": int(cfg.seed), "hooked_layer": plain(cfg.hooked_layer), "head": cfg.model.get("head"),
            "extract": {"mc_batch": ex.get("mc_batch")}, "task": plain(cfg.task)}


def aggregate_params(cfg: DictConfig) -> dict:
    """What the Task's aggregation steps are built from: the estimator (``aggregate.estimator``, from
    ``configs/estimator``) instantiated, and the device."""
    est = cfg.aggregate.get("estimator")
    return {"estimator": None if est is None else instantiate(est),
            "device": str(resolve_device(str(cfg.aggregate.device)))}


def _dataset_identity(cfg: DictConfig) -> dict:
    d = plain(cfg.dataset)
    d.pop("default_ood", None)
    return d


def task_identity(cfg: DictConfig, task=None) -> dict:
    """The task config without the settings that neither training nor the extracted rows depend on
    (``Task.scoring_settings``, ``Task.producer_settings``)."""
    task = task if task is not None else build_task(cfg)
    skip = {*getattr(task, "scoring_settings", ()), *getattr(task, "producer_settings", ())}
    return {k: v for k, v in plain(cfg.task).items() if k not in skip}


def train_hash(cfg: DictConfig) -> str:
    return io.config_hash({
        "task": task_identity(cfg), "dataset": _dataset_identity(cfg), "model": plain(cfg.model),
        "seed": cfg.seed, "limit": {k: cfg.train.limit.get(k) for k in ("fit", "val")},
        "checkpoint": cfg.train.checkpoint,
    })


def split_hash(cfg: DictConfig, split: str) -> str:
    """What fixes a split's rows: its dataset spec and limit (with the extraction's hash, the part hashes)."""
    return io.config_hash({"split": plain(split_spec(cfg, split)), "limit": split_limit(cfg, split)})


def extract_hash(cfg: DictConfig, task=None) -> str:
    """Everything that fixes the model and the rows: trained weights, ID data, limits, seed, input transform.

    Producer parameters are not in it: each producer part has its own hash, so runs needing other features
    add parts beside the shared ones; nor are the task settings that only the scoring reads
    (``Task.scoring_settings``: detection's image-score policy, in the method hashes) or that producers take
    (``Task.producer_settings``: detection's box selection, in the box part's hash)."""
    weights = {"given": str(cfg.train.checkpoint)} if cfg.train.get("checkpoint") else {"train": train_hash(cfg)}
    return io.config_hash({"model": weights, "task": task_identity(cfg, task), "dataset": _dataset_identity(cfg),
                           "limit": plain(cfg.limit), "seed": cfg.seed, "input": input_spec(cfg)})


@dataclass
class Run:
    """Built once per run (:func:`prepare`) and handed to every stage."""

    cfg: DictConfig
    task: Any
    specs: dict[str, DictConfig]
    methods: dict[str, Any]
    plan: Any
    layout: Any
    splits: list[str]
    step_hashes: dict[str, str] | None = None
    """Derived key -> hash of what it is computed from (extraction, its input part, its step's identity)."""
    bases: dict[str, str] = field(default_factory=dict)
    """Evaluated method (a task view such as ``box.lared``) -> the selected method it comes from (``lared``)."""
    _split_hashes: dict[str, str] = field(default_factory=dict, repr=False)

    def split_hash(self, split: str) -> str:
        """:func:`split_hash` of this run's config, computed once per split (the config is fixed once prepared)."""
        if split not in self._split_hashes:
            self._split_hashes[split] = split_hash(self.cfg, split)
        return self._split_hashes[split]

    def part_hash(self, split: str, part: str) -> str:
        """Config hash recorded in a part's manifest: the part (producer + parameters) and the split's rows."""
        return io.config_hash({"extract": self.layout.extract_hash, "part": part,
                               "split": self.split_hash(split)})

    def aggregate_split_hash(self, split: str) -> str:
        return io.config_hash({"aggregate": self.layout.aggregate_hash, "split": self.split_hash(split)})

    def derived_needed(self) -> list[str]:
        """Stage-written keys the methods read that the aggregate stage computes (not those the extraction
        stored itself, ``extract.keep_latent=false``)."""
        derived = self.task.derived_keys()
        return [k for k in dict.fromkeys(k for pp in self.methods.values() for k in method_keys(pp))
                if k in derived and k not in self.plan.parts]

    def method_hash(self, name: str) -> str:
        """What a method's scores depend on: its config and every input it reads, for every split."""
        pp = self.methods[name]
        keys = sorted(method_keys(pp))
        derived = self.task.derived_keys()
        steps = self.step_hashes or {}
        inputs = {k: (steps.get(k, self.layout.aggregate_hash) if k in derived and k not in self.plan.parts
                      else self.plan.parts.get(k))
                  for k in keys}  # a method on latent_mean keeps its scores when only the entropy estimator changes
        return io.config_hash({"method": plain(self.specs[name]), "extract": self.layout.extract_hash,
                               "inputs": inputs, "splits": {s: self.split_hash(s) for s in self.splits}})


def prepare(cfg: DictConfig) -> Run:
    """Validate the config and build the run: task, methods, extraction plan and output layout.

    Every config error (unknown method key, a feature no producer writes, a feature the task cannot produce)
    fails here, before any compute."""
    from larex.extraction.plan import plan_extraction
    from larex.layout import Layout

    ensure_ood(cfg)
    set_threads(cfg.get("threads"))
    task = build_task(cfg)
    selected = method_specs(cfg)
    try:
        views = task.expand_methods({name: instantiate(spec) for name, spec in selected.items()},
                                    lambda name: instantiate(selected[name]))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    methods = {name: pp for name, (pp, _) in views.items()}
    scoring = {k: plain(cfg.task[k]) for k in getattr(task, "scoring_settings", ()) if k in cfg.task}
    specs = {name: selected[base] if name == base else {**plain(selected[base]), "view": name, "task": scoring}
             for name, (_, base) in views.items()}
    requests = method_requests(methods)
    derived = task.derived_keys()
    task.check_keys(list(requests))
    try:
        plan = plan_extraction(requests, producer_context(cfg), derived=derived, always=task.always_keys)
    except (KeyError, ValueError) as err:
        raise ConfigError(str(err)) from err
    task.check_keys(list(plan.parts))
    if not cfg.extract.get("keep_latent", True):
        plan = _aggregate_in_extraction(cfg, task, plan, requests)
    splits = all_splits(cfg)
    ex_hash = extract_hash(cfg, task)
    latent_parts = sorted({plan.parts[i] for k in derived if k in requests and k not in plan.parts
                           for i in derived[k] if i in plan.parts})
    steps = [s for s in task.aggregation_steps(aggregate_params(cfg)) if s.output in requests
             and s.output not in plan.parts]  # stored by the extraction (extract.keep_latent=false): no step
    agg_hash = io.config_hash({"extract": ex_hash, "inputs": latent_parts, "steps": [dict(s.identity) for s in steps]})
    step_hashes = {s.output: io.config_hash({"extract": ex_hash, "inputs": sorted({plan.parts[i] for i in s.inputs}),
                                             "step": dict(s.identity)}) for s in steps}
    run = Run(cfg, task, specs, methods, plan, None, splits, step_hashes,
              bases={name: base for name, (_, base) in views.items()})
    eval_hash = io.config_hash({
        "methods": {n: plain(s) for n, s in specs.items()}, "extract": ex_hash, "aggregate": agg_hash,
        "parts": dict(sorted(plan.parts.items())), "splits": {s: run.split_hash(s) for s in splits},
        "evaluate": plain(cfg.evaluate), "tracking": plain(cfg.tracking),
    })
    run.layout = Layout(output_root(cfg), str(cfg.task.name), str(cfg.dataset.name), str(cfg.model.name),
                        str(cfg.hooked_layer.name), train_hash(cfg), ex_hash, agg_hash, eval_hash, dict(plan.parts))
    return run


def _aggregate_in_extraction(cfg: DictConfig, task, plan, requests):
    """``extract.keep_latent=false``: the aggregation steps the methods read run inside the extraction, on its
    device; the parts store their outputs (``entropy`` [N, D]) and not the MC samples, unless a method reads them."""
    from larex.extraction.producers.aggregating import aggregate_in_extraction

    params = {**aggregate_params(cfg), "device": str(resolve_device(str(cfg.device)))}
    steps = [s for s in task.aggregation_steps(params) if s.output in requests]
    if not steps:
        log("extract", "extract.keep_latent=false: no selected method reads an aggregated feature; the MC samples "
                       "are stored as usual")
        return plan
    try:
        return aggregate_in_extraction(plan, steps, keep=list(requests))
    except (KeyError, ValueError) as err:
        raise ConfigError(f"extract.keep_latent=false: {err}") from err


def part_problem(directory: Path) -> str:
    """What is wrong with an extracted part, naming the bad shard files (for error messages)."""
    m = io.read_manifest(directory)
    if m is None:
        return f"not extracted yet ({directory} has no manifest)"
    bad = io.verify_split(directory)
    if bad:
        return f"corrupt or missing shard(s) {', '.join(str(directory / b) for b in bad)}"
    return f"{directory} is incomplete or from another config"


CHECKPOINT = "model.safetensors"
"""File name of the weights larex-train writes in ``checkpoint-<hash>/``."""


def checkpoint_dir(cfg: DictConfig) -> Path:
    from larex.layout import Layout

    h = train_hash(cfg)
    return Layout(output_root(cfg), str(cfg.task.name), str(cfg.dataset.name), str(cfg.model.name),
                  str(cfg.hooked_layer.name), h, "", "", "").checkpoint_dir


def checkpoint_path(cfg: DictConfig) -> Path | None:
    """The weights file the run's model loads: ``train.checkpoint`` if given, else this config's train output;
    None when the net brings its own weights (``model.train`` null: ``model.net.weights`` or random init)."""
    given = cfg.train.get("checkpoint")
    if not given and cfg.model.get("train") is None:
        return None
    if given:
        path = Path(str(given)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"train.checkpoint={path} does not exist (a safetensors state_dict is expected)")
        return path
    if not io.is_complete(checkpoint_dir(cfg), train_hash(cfg)):
        raise FileNotFoundError(f"no trained model for this config at {checkpoint_dir(cfg)}: run larex-train "
                                "(or larex-run), or set train.checkpoint=PATH.safetensors")
    return checkpoint_dir(cfg) / CHECKPOINT


def output_root(cfg: DictConfig) -> Path:
    return Path(str(cfg.output_root)).expanduser().resolve()
