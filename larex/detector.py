"""A saved, loadable OOD detector: the model reference, hooked layer and MC settings, the extraction plan, the
aggregation, the fitted postprocessor(s) and the decision threshold chosen on ID ``val``.

On disk (written by ``larex-evaluate save_detector=[...]`` under ``evaluate-<hash>/detector/<method>/``, never
pickled)::

    detector.json        what to rebuild (plain ``_target_`` specs), thresholds, feature schema, versions, hashes
    state.safetensors    the fitted state of each view (``<view>/<key>``)

A method is saved with every view the task evaluates it at (classification: the method; detection: ``box.<m>``
and ``image.<m>``). :meth:`Detector.load` rebuilds the network exactly as the evaluation ran it (the checkpoint is
referenced by path and sha256, or the net builds its own weights, e.g. a hub name), and refuses a file whose
content hash, state keys / shapes, checkpoint hash or package versions differ from what was saved, naming what
differs. :meth:`Detector.score` takes raw images and applies the task's own input transform, producers and
aggregation, so its scores equal the evaluate stage's for the same inputs and seed.

Objects are rebuilt from their saved ``_target_`` mappings with ``hydra.utils.instantiate`` on plain dicts (the
project's one registry); nothing here reads a Hydra config or touches MLflow.
"""
from __future__ import annotations

import copy
import hashlib
import json
import platform
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from larex import io

FORMAT = "larex-detector"
FORMAT_VERSION = 1
SPEC_FILE = "detector.json"
STATE_FILE = "state.safetensors"
VERSION_PACKAGES = ("larex", "torch", "numpy")
"""Packages whose versions are recorded; a loaded detector whose recorded versions differ is refused (or warned
about with ``versions="warn"``): scores are only promised equal under the same code."""


class DetectorFileError(ValueError):
    """A saved detector is missing, tampered with or does not match this installation; the message names what."""


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def content_hash(spec: Mapping[str, Any]) -> str:
    """sha256 of the spec's canonical JSON without its own ``content_sha256`` entry."""
    body = {k: v for k, v in spec.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=io._json_default)
                          .encode()).hexdigest()


def save_detector(directory: str | Path, spec: Mapping[str, Any], views: Mapping[str, Any]) -> Path:
    """Write a detector: ``spec`` (plain, see :func:`detector_spec`) and the fitted ``views`` (view name ->
    postprocessor). The state is written first, then the JSON that names its sha256 (both atomically), so a
    half-written detector never loads."""
    directory = Path(directory)
    state: dict[str, np.ndarray] = {}
    schema: dict[str, list] = {}
    for name, pp in views.items():
        for k, v in pp.fitted_state().items():
            arr = np.ascontiguousarray(v)
            state[f"{name}/{k}"] = arr
            schema[f"{name}/{k}"] = [list(arr.shape), str(arr.dtype)]
    io.save_arrays(directory / STATE_FILE, state, metadata={"format": FORMAT})
    spec = copy.deepcopy(dict(spec))
    spec.update({"format": FORMAT, "format_version": FORMAT_VERSION, "state_schema": schema,
                 "files": {STATE_FILE: io.file_sha256(directory / STATE_FILE)}})
    spec.setdefault("versions", package_versions())
    spec["content_sha256"] = content_hash(spec)
    io.write_json(directory / SPEC_FILE, spec)
    return directory


def detector_spec(*, method: str, method_spec: Mapping[str, Any], task: Mapping[str, Any],
                  model: Mapping[str, Any], hooked_layer: Mapping[str, Any], input_spec: Mapping[str, Any],
                  context: Mapping[str, Any], estimator: Mapping[str, Any] | None,
                  thresholds: Mapping[str, Mapping[str, Any]], source: Mapping[str, Any] | None = None) -> dict:
    """The plain description of a detector (what :func:`save_detector` writes beside the fitted state).

    ``model``: ``name``, ``net`` (the ``_target_`` spec), ``head``, ``checkpoint`` (path or None: the net brings
    its weights; a file the net names, e.g. ``weights: PATH``, is hashed too); ``thresholds``: view -> ``threshold``, ``tpr``, ``val_tpr``, ``zscore_thresholds``,
    ``score_axis``. The checkpoint's sha256 is recorded here."""
    model = dict(model)
    ckpt = model.get("checkpoint")
    model["checkpoint"] = None if ckpt is None else {"path": str(Path(ckpt).resolve()),
                                                     "sha256": io.file_sha256(Path(ckpt))}
    model["files"] = {k: {"path": str(Path(v).resolve()), "sha256": io.file_sha256(Path(v))}
                      for k, v in (model.get("net") or {}).items()
                      if isinstance(v, str) and k != "_target_" and Path(v).is_file()}
    return {"method": method, "method_spec": dict(method_spec), "task": dict(task), "model": model,
            "hooked_layer": dict(hooked_layer), "input": dict(input_spec), "context": dict(context),
            "estimator": None if estimator is None else dict(estimator),
            "views": {k: dict(v) for k, v in thresholds.items()}, "source": dict(source or {}),
            "versions": package_versions()}


def read_spec(directory: str | Path, versions: str = "error") -> dict:
    """The checked ``detector.json`` of ``directory`` (format, content hash, state file hash and versions)."""
    directory = Path(directory)
    path = directory / SPEC_FILE
    if not path.is_file():
        hint = (f"; it holds {sorted(p.name for p in directory.iterdir())}" if directory.is_dir() else "")
        raise DetectorFileError(f"no saved detector at {directory} (no {SPEC_FILE}{hint}); save one with "
                                "larex-evaluate ... save_detector=[lared] (it lands in evaluate-<hash>/detector/<method>)")
    try:
        spec = io.read_json(path)
    except json.JSONDecodeError as err:
        raise DetectorFileError(f"{path} is not valid JSON ({err}); the file is damaged: save the detector again")
    if spec.get("format") != FORMAT or spec.get("format_version") != FORMAT_VERSION:
        raise DetectorFileError(f"{path} is format {spec.get('format')!r} version {spec.get('format_version')!r}; "
                                f"this larex reads {FORMAT!r} version {FORMAT_VERSION}: save the detector again")
    if spec.get("content_sha256") != content_hash(spec):
        raise DetectorFileError(f"{path} was modified after it was saved (its content sha256 differs from the one "
                                "recorded in it); a detector is never edited by hand: save it again")
    state = directory / STATE_FILE
    if not state.is_file():
        raise DetectorFileError(f"{state} is missing; save the detector again")
    got = io.file_sha256(state)
    if got != spec["files"][STATE_FILE]:
        raise DetectorFileError(f"{state} differs from the one saved with {path} (sha256 {got[:12]} != "
                                f"{spec['files'][STATE_FILE][:12]}): it was modified or replaced; save the detector again")
    _check_versions(spec.get("versions") or {}, versions, path)
    return spec


def _check_versions(saved: Mapping[str, str], policy: str, path: Path) -> None:
    if policy not in ("error", "warn", "ignore"):
        raise ValueError(f"versions={policy!r}: use 'error', 'warn' or 'ignore'")
    now = package_versions()
    diff = {k: (saved[k], now.get(k)) for k in VERSION_PACKAGES if k in saved and saved[k] != now.get(k)}
    if not diff or policy == "ignore":
        return
    text = ", ".join(f"{k} {a} (saved) != {b} (installed)" for k, (a, b) in diff.items())
    if policy == "error":
        raise DetectorFileError(f"{path} was saved with other package versions: {text}; install those versions, "
                                "or load with versions='warn' (larex-score versions=warn) to score anyway")
    warnings.warn(f"{path}: package versions differ from the saved ones: {text}; scores may differ", stacklevel=3)


def _load_state(directory: Path, spec: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    arrays = io.load_arrays(directory / STATE_FILE, sha256=spec["files"][STATE_FILE])
    schema = spec["state_schema"]
    missing, extra = sorted(set(schema) - set(arrays)), sorted(set(arrays) - set(schema))
    if missing or extra:
        raise DetectorFileError(f"{directory / STATE_FILE}: keys differ from the saved schema (missing {missing}, "
                                f"unexpected {extra}); save the detector again")
    for k, (shape, dtype) in schema.items():
        if list(arrays[k].shape) != list(shape) or str(arrays[k].dtype) != dtype:
            raise DetectorFileError(f"{directory / STATE_FILE}: {k} has shape {list(arrays[k].shape)} {arrays[k].dtype}"
                                    f", the schema says {shape} {dtype}; save the detector again")
    out: dict[str, dict[str, np.ndarray]] = {v: {} for v in spec["views"]}
    for k, a in arrays.items():
        view, _, key = k.partition("/")
        if view not in out:
            raise DetectorFileError(f"{directory / STATE_FILE}: state of an unknown view {view!r} (views: "
                                    f"{sorted(out)})")
        out[view][key] = a
    return out


def read_image(path: str | Path):
    """The decoded image file at ``path`` (PIL, fully loaded, so a truncated file fails here)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.copy()


def decode_image(data: str | bytes):
    """An encoded image file (PNG, JPEG...) given as bytes or base64 text, decoded (PIL)."""
    import base64
    import io as _io

    raw = base64.b64decode(data, validate=True) if isinstance(data, str) else bytes(data)
    return read_image(_io.BytesIO(raw))


class _Images(torch.utils.data.Dataset):
    """Raw images with the task's blank target, for the task's input transform."""

    def __init__(self, images: Sequence[Any], target: Any):
        self.images, self.target = images, target

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], copy.deepcopy(self.target)


def as_image_list(images) -> list:
    """A batch as a list of images: a tensor ``[B, C, H, W]`` (or one ``[C, H, W]`` image), PIL images, HWC uint8
    arrays, or a list of any of these."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        return list(images) if images.dim() == 4 else [images]
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    out = []
    for i, im in enumerate(images):
        if isinstance(im, np.ndarray):
            arr = np.ascontiguousarray(im)
            if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3, 4):
                arr = arr.transpose(2, 0, 1)  # HWC -> CHW
            im = torch.from_numpy(arr.copy())
        if not isinstance(im, (torch.Tensor, Image.Image)):
            raise TypeError(f"image {i} is a {type(im).__name__}; score takes tensors [C, H, W] in [0, 1] (or uint8), "
                            "HWC uint8 arrays or PIL images")
        out.append(im)
    if not out:
        raise ValueError("score got an empty batch: pass at least one image")
    return out


class DetectorResult:
    """Scores and decisions of one batch: ``images`` (one row per input) and, for tasks with object rows,
    ``boxes`` (one row per kept box, ``image`` = the input's position). Per view ``<view>`` (score), and for the
    detector's primary views ``score`` / ``is_ood`` / ``threshold`` (``is_ood``: score below the threshold;
    higher score = more in-distribution). The tables are built on first access (``scores`` / ``is_ood`` read the
    arrays directly)."""

    def __init__(self, images: pd.DataFrame | Mapping[str, np.ndarray],
                 boxes: pd.DataFrame | Mapping[str, np.ndarray] | None = None):
        self._images, self._boxes = images, boxes

    @staticmethod
    def _frame(t):
        return t if t is None or isinstance(t, pd.DataFrame) else pd.DataFrame(dict(t))

    @property
    def images(self) -> pd.DataFrame:
        self._images = self._frame(self._images)
        return self._images

    @property
    def boxes(self) -> pd.DataFrame | None:
        self._boxes = self._frame(self._boxes)
        return self._boxes

    def _column(self, name: str) -> np.ndarray:
        t = self._images
        if name not in t:
            raise KeyError(f"this detector has no image-level view (its views score {sorted(t)}); read result.boxes")
        return np.asarray(t[name])

    @property
    def scores(self) -> np.ndarray:
        return self._column("score")

    @property
    def is_ood(self) -> np.ndarray:
        return self._column("is_ood")


class Detector:
    """A loaded detector (:meth:`load`); :meth:`score` scores raw images. See the module docstring."""

    def __init__(self, spec: Mapping[str, Any], views: Mapping[str, Any], model: torch.nn.Module, task,
                 producers: Sequence[Any], steps: Sequence[Any], device: torch.device, path: Path | None = None):
        from larex.extraction.module import FeatureExtractor

        self.spec, self.views, self.task, self.device, self.path = dict(spec), dict(views), task, device, path
        self.model = model.to(device).eval()
        self.extractor = FeatureExtractor(self.model, producers=list(producers))
        self.steps = list(steps)
        self.model_arrays = {k: io.to_numpy(v) for p in producers for k, v in p.model_arrays(self.model).items()}
        self.thresholds = {v: float(info["threshold"]) for v, info in self.spec["views"].items()}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, device: str = "auto", versions: str = "error",
             checkpoint: str | Path | None = None, files: Mapping[str, str | Path] | None = None) -> "Detector":
        """Load and check a saved detector (``path``: its folder or its ``detector.json``). ``device``: ``auto``
        (CUDA when available), ``cpu``, ``cuda:1``...; ``versions``: ``error`` (default) / ``warn`` / ``ignore``
        when the recorded package versions differ; ``checkpoint``: the model weights at another path (a copy,
        e.g. an MLflow artifact), checked against the saved sha256; ``files``: the same for files the net names
        (``model.net.<key>`` -> path)."""
        path = Path(path)
        directory = path.parent if path.name == SPEC_FILE else path
        spec = read_spec(directory, versions)
        state = _load_state(directory, spec)
        return cls.assemble(spec, state, device=device, checkpoint=checkpoint, files=files, path=directory)

    @classmethod
    def assemble(cls, spec: Mapping[str, Any], state: Mapping[str, Mapping[str, np.ndarray]], device: str = "auto",
                 checkpoint: str | Path | None = None, files: Mapping[str, str | Path] | None = None,
                 path: Path | None = None) -> "Detector":
        """Rebuild model, task, producers, aggregation and views from a checked spec and the views' states."""
        from hydra.utils import instantiate

        from larex.extraction.plan import plan_extraction
        from larex.models.loading import load_network

        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           "cpu" if device == "auto" else device)
        model_spec = spec["model"]
        weights = _checked_checkpoint(model_spec.get("checkpoint"), checkpoint)
        net = dict(model_spec["net"])
        saved_files = model_spec.get("files") or {}
        unknown = sorted(set(files or {}) - set(saved_files))
        if unknown:
            raise DetectorFileError(f"files={unknown}: the saved net names no such file (it names {sorted(saved_files)})")
        for key, f in saved_files.items():
            net[key] = str((files or {}).get(key, f["path"]))
            _check_file(Path(net[key]), f["sha256"], f"model.net.{key}")
        model = load_network(net, spec["hooked_layer"], weights, f"model={model_spec.get('name')}")
        task = instantiate(spec["task"])
        method, method_spec = spec["method"], spec["method_spec"]
        built = task.expand_methods({method: instantiate(method_spec)}, lambda name: instantiate(method_spec))
        missing = sorted(set(spec["views"]) - set(built))
        if missing:
            raise DetectorFileError(f"the task {task.name!r} no longer evaluates {method!r} at {missing} (it gives "
                                    f"{sorted(built)}); save the detector again")
        views = {v: built[v][0] for v in spec["views"]}
        for v, pp in views.items():
            try:
                pp.set_fitted_state(state[v])
            except (KeyError, ValueError) as err:
                raise DetectorFileError(f"the saved state of {v} does not fit {type(pp).__name__}: {err}") from err
        requests: dict[str, list[dict]] = {}
        for pp in views.values():
            params = pp.extraction_params()
            for k in pp.requires:
                requests.setdefault(k, []).append(dict(params.get(k) or {}))
        for k in task.report_keys:
            requests.setdefault(k, [])
        plan = plan_extraction(requests, spec["context"], derived=task.derived_keys())
        estimator = None if spec.get("estimator") is None else instantiate(spec["estimator"])
        steps = [s for s in task.aggregation_steps({"estimator": estimator, "device": str(dev)}) if s.output in requests]
        return cls(spec, views, model, task, plan.producers, steps, dev, path)

    # ------------------------------------------------------------------ scoring
    @property
    def primary(self) -> dict[str, str]:
        """Row axis -> the view whose score and decision are a row's ``score`` / ``is_ood`` (one per axis)."""
        out: dict[str, str] = {}
        for v, info in self.spec["views"].items():
            out.setdefault(str(info["score_axis"]), v)
        return out

    def prepare(self, image) -> tuple:
        """One raw image as the model input item ``(x, target, 0)`` of the task's input transform (channels, size
        policy, normalization); raises the transform's error for an image it cannot take."""
        return self.task.input_dataset(_Images(as_image_list(image), self.task.blank_target()), self.spec["input"])[0]

    def features(self, images=None, *, prepared: Sequence[tuple] | None = None) -> dict[str, np.ndarray]:
        """The feature keys the views read (and the task's report keys) for a batch of raw ``images`` (or of
        items from :meth:`prepare`)."""
        if prepared is None:
            prepared = [self.prepare(im) for im in as_image_list(images)]
        batch = self.task.collate([(x, y, i) for i, (x, y, _) in enumerate(prepared)])
        with torch.no_grad():
            out = self.extractor.run_producers(batch, self.extractor.producers)
        feats = {k: io.to_numpy(v) for k, v in out.items()}
        for step in self.steps:
            feats[step.output] = np.asarray(step.fn({k: feats[k] for k in step.inputs}))
        feats.update(self.model_arrays)
        return feats

    def score(self, images=None, threshold: float | Mapping[str, float] | None = None,
              batch_size: int | None = None, *, prepared: Sequence[tuple] | None = None) -> DetectorResult:
        """Scores and ``is_ood`` flags for a batch of raw images (tensors ``[C, H, W]`` in [0, 1] or uint8, a
        ``[B, C, H, W]`` tensor, PIL images or HWC uint8 arrays; or items from :meth:`prepare`). ``threshold``: a
        float (detectors with one view) or view -> float, instead of the saved ID-val thresholds. ``batch_size``:
        score in chunks of this many images."""
        thresholds = self.resolve_thresholds(threshold)
        if prepared is None:
            prepared = [self.prepare(im) for im in as_image_list(images)]
        if not prepared:
            raise ValueError("score got an empty batch: pass at least one image")
        step = len(prepared) if batch_size is None else int(batch_size)
        parts = [self._score_batch(prepared[i:i + step], thresholds, offset=i) for i in range(0, len(prepared), step)]
        if len(parts) == 1:
            return parts[0]
        images_df = pd.concat([p.images for p in parts], ignore_index=True)
        boxes = [p.boxes for p in parts if p.boxes is not None]
        return DetectorResult(images_df, pd.concat(boxes, ignore_index=True) if boxes else None)

    def score_sources(self, sources: Sequence[Any], read: Callable[[Any], Any], threshold=None, batch_size: int = 64,
                      on_error: str = "column", advance: Callable[[int], None] | None = None) -> DetectorResult:
        """Score the images ``read(source)`` gives for each of ``sources`` (file paths, encoded bytes...), in
        batches. ``images`` keeps every source in order (column ``source``) with an ``error`` column: a source
        that cannot be read or that the input policy refuses gets its error there (``on_error="raise"``: raise
        at it instead), never a silent skip. ``boxes`` rows carry their ``source``. ``advance(n)``: progress."""
        if on_error not in ("column", "raise"):
            raise ValueError(f"on_error={on_error!r}: use column (an error column per input) or raise")
        if not len(sources):
            raise ValueError("nothing to score: no inputs given")
        thresholds = self.resolve_thresholds(threshold)
        names = [str(x) if isinstance(x, (str, Path)) else f"#{i}" for i, x in enumerate(sources)]
        images, boxes, errors = [], [], {}
        for start in range(0, len(sources), int(batch_size)):
            prepared, rows = [], []
            for i in range(start, min(start + int(batch_size), len(sources))):
                try:
                    prepared.append(self.prepare(read(sources[i])))
                    rows.append(i)
                except Exception as err:  # noqa: BLE001  (every failure is reported per input)
                    if on_error == "raise":
                        raise ValueError(f"{names[i]}: {type(err).__name__}: {err}") from err
                    errors[i] = f"{type(err).__name__}: {err}"
            if prepared:
                res = self._score_batch(prepared, thresholds)
                res.images["image"] = rows
                images.append(res.images)
                if res.boxes is not None:
                    res.boxes["image"] = np.asarray(rows)[res.boxes["image"].to_numpy()]
                    boxes.append(res.boxes)
            if advance is not None:
                advance(min(int(batch_size), len(sources) - start))
        table = pd.concat([*images, pd.DataFrame({"image": list(errors)})], ignore_index=True)
        table = table.set_index("image").reindex(range(len(sources))).reset_index()
        table.insert(1, "source", names)
        table["error"] = [errors.get(i, "") for i in range(len(sources))]
        box_table = None
        if boxes or self.task.report_keys:
            box_table = pd.concat(boxes, ignore_index=True) if boxes else pd.DataFrame(columns=["image"])
            box_table.insert(1, "source", [names[int(i)] for i in box_table["image"]])
        return DetectorResult(table, box_table)

    def resolve_thresholds(self, threshold) -> dict[str, float]:
        """View -> threshold: the saved ones, with ``threshold`` (a float for a one-view detector, or view ->
        float) instead."""
        if threshold is None:
            return dict(self.thresholds)
        if isinstance(threshold, Mapping):
            unknown = sorted(set(threshold) - set(self.thresholds))
            if unknown:
                raise ValueError(f"threshold for unknown view(s) {unknown}; this detector has {sorted(self.thresholds)}")
            return {**self.thresholds, **{k: float(v) for k, v in threshold.items()}}
        if len(self.thresholds) != 1:
            raise ValueError(f"this detector has several views {sorted(self.thresholds)}: give the threshold per view, "
                             f"e.g. threshold={{{next(iter(self.thresholds))}: 1.5}}")
        return {next(iter(self.thresholds)): float(threshold)}

    def _score_batch(self, prepared: Sequence[tuple], thresholds: Mapping[str, float], offset: int = 0
                     ) -> DetectorResult:
        feats = self.features(prepared=prepared)
        columns: dict[str, dict[str, np.ndarray]] = {"image": {"image": np.arange(len(prepared)) + offset}}
        for axis, cols in self.task.report_columns(feats).items():
            columns.setdefault(axis, {}).update(cols)
        if "box" in columns and "image" in columns["box"]:
            columns["box"]["image"] = columns["box"]["image"] + offset
        primary = self.primary
        for v, pp in self.views.items():
            axis = str(self.spec["views"][v]["score_axis"])
            s = pp.score(feats)
            columns.setdefault(axis, {})[v] = s
            if primary.get(axis) == v:
                columns[axis].update({"score": s, "threshold": np.full(len(s), thresholds[v]),
                                      "is_ood": s < thresholds[v]})
        return DetectorResult(columns["image"], columns.get("box"))

    def __repr__(self) -> str:
        return (f"Detector(method={self.spec['method']!r}, views={sorted(self.views)}, "
                f"model={self.spec['model'].get('name')!r}, device={str(self.device)!r})")


def _checked_checkpoint(saved: Mapping[str, Any] | None, override: str | Path | None) -> Path | None:
    """The checkpoint to load: ``override`` or the saved path, whose sha256 must be the saved one."""
    if saved is None:
        if override is not None:
            raise DetectorFileError("this detector's model brings its own weights (no checkpoint was saved); "
                                    "do not pass checkpoint=")
        return None
    path = Path(override if override is not None else saved["path"])
    if not path.is_file():
        raise DetectorFileError(f"the detector's checkpoint {path} does not exist; copy it there or pass "
                                "checkpoint=PATH (larex-score checkpoint=PATH) to the same file elsewhere")
    _check_file(path, saved["sha256"], "checkpoint")
    return path


def _check_file(path: Path, sha256: str, what: str) -> None:
    if not path.is_file():
        raise DetectorFileError(f"{what} {path} (named by the saved detector) does not exist; put the file back")
    got = io.file_sha256(path)
    if got != sha256:
        raise DetectorFileError(f"{what} {path} differs from the one the detector was saved with (sha256 "
                                f"{got[:12]} != {sha256[:12]}); scores would not be the evaluated ones: "
                                "use the original weights or save the detector again")
