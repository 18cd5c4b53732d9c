"""MLflow tracking — the only module of larex that imports mlflow.

Default store: a SQLite file under the output root (no server needed); ``tracking.uri=http://host:5000``
points at a server (which then keeps the artifacts too). An unreachable server fails fast with one clear error,
before any compute; one that stops answering mid-run becomes one :class:`TrackingUnavailableError` after a few
retries (:meth:`Tracker.failures`).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# MLflow's param value limit; longer values are truncated (and marked) rather than failing the run.
_MAX_PARAM_LEN = 6000


def metric_key(name: str) -> str:
    """``name`` with every character MLflow does not allow in a metric name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-./ :]", "_", name)


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server cannot be reached (before the run, or it stopped answering during it)."""


def is_remote(uri: str) -> bool:
    """A tracking server (``http(s)://``), as opposed to a local store (SQLite file, folder)."""
    return uri.startswith(("http://", "https://"))


def default_uri(output_root: str | Path) -> str:
    return f"sqlite:///{Path(output_root).resolve() / 'mlflow.db'}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested mapping into ``a.b.c`` keys (lists become their string form)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock beside a ``sqlite:///`` store (no-op for other stores)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from larex.layout import claim

    with claim(Path(uri[len("sqlite:///"):]), "mlflow store"):
        yield


class Tracker:
    """A thin wrapper over one MLflow run: params, metrics, artifacts."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | Path | None = None,
                 http_retries: int = 3, http_timeout: float = 60):
        """``artifact_root``: where a local store's new experiment keeps artifacts (a server uses its own
        artifact root). ``http_retries`` / ``http_timeout``: a server's request retries and timeout (seconds); the
        environment's ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``..._TIMEOUT`` win when set."""
        import mlflow

        for name in ("mlflow", "alembic"):  # no database-migration chatter on the console
            logging.getLogger(name).setLevel(logging.WARNING)
        self._mlflow = mlflow
        self.uri = uri
        self.remote = is_remote(uri)
        if self.remote:
            # MLflow's defaults (7 retries, backoff x2) wait minutes on a dead server before failing
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(http_retries)))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(http_timeout)))
            check_reachable(uri)
        mlflow.set_tracking_uri(uri)
        # parallel sweep jobs must not create / migrate one SQLite store at once (alembic races), nor create
        # the experiment twice: the first job does it under a lock beside the database file
        with _store_lock(uri), self.failures():
            client = mlflow.MlflowClient(uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                location = Path(artifact_root).resolve().as_uri() if artifact_root and not self.remote else None
                try:
                    exp_id = client.create_experiment(experiment, artifact_location=location)
                except mlflow.exceptions.MlflowException:  # another job of a sweep created it just now
                    exp = client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
        self.experiment_id = exp_id
        self.run_id: str | None = None

    @contextmanager
    def failures(self) -> Iterator[None]:
        """A server that stops answering (connection refused, timeout, 5xx after the retries) becomes one
        :class:`TrackingUnavailableError`; a local store's errors pass unchanged."""
        if not self.remote:
            yield
            return
        try:
            yield
        except TrackingUnavailableError:
            raise
        except Exception as err:  # MlflowException, requests' ConnectionError / Timeout, OSError
            raise TrackingUnavailableError(
                f"MLflow tracking server {self.uri} stopped answering ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:300] if str(err) else ''})") from err

    @contextmanager
    def start_run(self, run_name: str | None = None, tags: Mapping[str, str] | None = None,
                  parent_run_id: str | None = None) -> Iterator["Tracker"]:
        """Start a run (a child of ``parent_run_id`` when given, shown nested in the MLflow UI)."""
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        with self.failures():
            run = self._mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        with self._ending():
            yield self

    @contextmanager
    def resume_run(self, run_id: str) -> Iterator["Tracker"]:
        """Reopen an earlier run of this store (to add artifacts to it)."""
        with self.failures():
            self._mlflow.start_run(run_id=run_id)
        self.run_id = run_id
        with self._ending():
            yield self

    @contextmanager
    def _ending(self) -> Iterator[None]:
        """End the active run FINISHED, or FAILED when the body raised; a dead server while ending a failed
        run does not hide the body's error."""
        try:
            with self.failures():
                yield
        except BaseException:
            try:
                self._mlflow.end_run("FAILED")
            except Exception:  # noqa: BLE001 - the server is gone; the run stays RUNNING there
                pass
            raise
        with self.failures():
            self._mlflow.end_run()

    def sweep_parent(self, sweep_dir: str | Path, name: str) -> str:
        """The parent run of a Hydra multirun sweep, created once by whichever job gets there first.

        Jobs of one sweep (possibly parallel processes) agree on it through ``<sweep_dir>/mlflow_parent.json``
        written under an exclusive file lock.
        """
        import fcntl
        import json

        sweep_dir = Path(sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        record = sweep_dir / "mlflow_parent.json"
        with open(sweep_dir / ".mlflow_parent.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if record.is_file():
                data = json.loads(record.read_text())
                if data.get("tracking_uri") == self.uri:
                    return data["run_id"]
            client = self._mlflow.MlflowClient(self.uri)
            with self.failures():
                run = client.create_run(self.experiment_id, run_name=name, tags={"larex.sweep_dir": str(sweep_dir)})
                client.set_terminated(run.info.run_id)
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": self.uri}))
            os.replace(tmp, record)
            return run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        clean = {}
        for k, v in flatten(params).items():
            s = "null" if v is None else str(v)
            clean[k] = s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 12] + "...[truncated]"
        items = list(clean.items())
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Log metrics; characters MLflow rejects in names (e.g. ``+``) become ``_``."""
        self._mlflow.log_metrics({metric_key(k): float(v) for k, v in metrics.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._mlflow.log_text(text, artifact_file)

    def log_detector(self, name: str, directory: str | Path, files: Mapping[str, str | Path]) -> str:
        """Log a saved detector folder as an MLflow pyfunc model of this run (models-from-code, nothing
        pickled): artifacts ``detector`` (the folder) and ``files`` (artifact name -> the weights it references:
        ``checkpoint``, ``net.<key>``), so ``mlflow models serve -m <uri>`` hosts it. Returns the model URI."""
        from importlib.metadata import version

        from larex.serving import detector_model

        artifacts = {"detector": str(directory), **{k: str(v) for k, v in files.items()}}
        info = self._mlflow.pyfunc.log_model(name=name, python_model=detector_model.__file__.replace(".pyc", ".py"),
                                             artifacts=artifacts, pip_requirements=[f"larex=={version('larex')}"])
        return info.model_uri


def set_detector_model() -> None:
    """``mlflow.models.set_model`` of a fresh :func:`detector_pyfunc` (called by the models-from-code file)."""
    import mlflow

    mlflow.models.set_model(detector_pyfunc())


def detector_pyfunc():
    """A pyfunc model over :class:`larex.detector.Detector`. Input: a DataFrame with a column ``image`` (each an
    encoded image file as base64 text) or ``path`` (image files on the serving machine); output: one row per
    input with ``score``, ``is_ood``, ``threshold``, each view's score and ``error`` (and for detection ``box_rows``:
    the input's box rows as JSON). Env ``LAREX_DEVICE`` picks the device (default auto)."""
    import mlflow

    return _detector_model_class(mlflow.pyfunc.PythonModel)()


def _detector_model_class(base):
    class DetectorModel(base):
        _skip_type_hint_validation = True  # the input is a plain DataFrame, checked in predict
        def load_context(self, context):
            from larex.detector import Detector

            arts = dict(context.artifacts)
            files = {k[4:]: v for k, v in arts.items() if k.startswith("net.")}
            self.detector = Detector.load(arts["detector"], device=os.environ.get("LAREX_DEVICE", "auto"),
                                          checkpoint=arts.get("checkpoint"), files=files)

        def predict(self, context, model_input, params=None):
            import json

            from larex.detector import decode_image, read_image

            cols = list(getattr(model_input, "columns", []))
            if "image" in cols:
                sources, read = list(model_input["image"]), decode_image
            elif "path" in cols:
                sources, read = list(model_input["path"]), read_image
            else:
                raise ValueError(f"the larex detector takes a DataFrame with a column 'image' (base64 image files) "
                                 f"or 'path'; got columns {cols}")
            params = dict(params or {})
            res = self.detector.score_sources(sources, read, threshold=params.get("threshold"),
                                              batch_size=int(params.get("batch_size", 64)))
            table = res.images.drop(columns=["source"])
            if res.boxes is not None:
                per = {i: g.drop(columns=["image", "source"]).to_dict("records") for i, g in res.boxes.groupby("image")}
                table["box_rows"] = [json.dumps(per.get(i, []), default=float) for i in table["image"]]
            return table

    return DetectorModel


def check_reachable(uri: str) -> None:
    """Raise :class:`TrackingUnavailableError` naming the fixes unless the server at ``uri`` answers."""
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=5):  # noqa: S310 - user-configured tracking server
            return
    except urllib.error.HTTPError:
        return  # the server answered (some deployments have no /health); good enough
    except Exception as err:  # connection refused, DNS failure, timeout, blocked socket
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} is unreachable ({err}). Start it (mlflow server ...), fix "
            "tracking.uri, or drop tracking.uri to use the local SQLite store (tracking.enabled=false "
            "turns tracking off)."
        ) from err


def read_run(uri: str, run_id: str) -> dict[str, Any]:
    """Params, metrics and artifact paths of a run (used by tests and `larex` tooling)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)

    def walk(path: str | None = None) -> list[str]:
        out = []
        for f in client.list_artifacts(run_id, path):
            out.extend(walk(f.path) if f.is_dir else [f.path])
        return out

    return {"params": dict(run.data.params), "metrics": dict(run.data.metrics), "tags": dict(run.data.tags),
            "artifacts": walk(), "status": run.info.status}


def list_runs(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Run id, name and tags of every run of an experiment (newest first)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [{"run_id": r.info.run_id, "name": r.info.run_name, "tags": dict(r.data.tags)}
            for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])]
