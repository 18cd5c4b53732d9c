"""Shared helpers of the end-to-end tests: run the console scripts offline, tiny configs, and find outputs
through the layout's index instead of hard-coded hashes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from larex import io

FMNIST = Path("/usr/share/datasets/fashion-mnist")
HAS_FMNIST = (FMNIST / "train-images-idx3-ubyte.gz").is_file()
BIN = Path(sys.executable).parent
OFFLINE = Path(__file__).parent / "_offline"

# Debian's Fashion-MNIST where installed (make install as root), else scikit-learn's bundled digits: the
# end-to-end tests always run on real, package-shipped data.
DATASET = "fashion_mnist" if HAS_FMNIST else "digits"
OODS = ["fmnist_holdout", "fmnist_shift", "digits", "noise"] if HAS_FMNIST else ["digits_holdout", "digits_shift", "noise"]


def tiny(out: Path, dataset: str = DATASET, s: int = 6) -> list[str]:
    common = [f"output_root={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", "progress=false",
              f"dataset={dataset}", f"hooked_layer.mc_samples={s}", "extract.batch_size=64", "extract.shard_size=100"]
    if dataset == "fashion_mnist":
        return [*common, "train.limit.fit=768", "train.limit.val=128", "model.train.epochs=1",
                "limit.fit=300", "limit.val=200", "limit.test=200", "limit.ood=120"]
    return [*common, "model.train.epochs=3", "limit.fit=300", "limit.val=100", "limit.test=200", "limit.ood=100"]


def expected_rows(dataset: str = DATASET) -> dict[str, int]:
    if dataset == "fashion_mnist":
        return {"fit": 300, "val": 200, "test": 200, **{f"ood/{o}": 120 for o in OODS}}
    return {"fit": 300, "val": 100, "test": 200, "ood/digits_holdout": 100, "ood/digits_shift": 100,
            "ood/noise": 100}


def cli(name: str, *args: str, cwd: Path, check: bool = True, timeout: int = 900,
        pythonpath: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(OFFLINE), *map(str, pythonpath)]),
           "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "HYDRA_FULL_ERROR": "0", "COLUMNS": "200",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(BIN / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def layer_dir(out: Path, dataset: str = DATASET, model: str = "small_cnn", hooked: str = "dropblock") -> Path:
    return out / "classification" / dataset / model / hooked


def latest(out: Path, **kw) -> Path:
    """The newest evaluation folder (``latest.json``, the pointer a person uses)."""
    return Path(io.read_json(layer_dir(out, **kw) / "latest.json")["path"])


def only(paths) -> Path:
    paths = sorted(paths)
    assert len(paths) == 1, paths
    return paths[0]


def part_dirs(split_dir: Path) -> dict[str, Path]:
    """Producer part folders of one split by producer name (``mc``, ``labels``, ...), one per name expected."""
    out: dict[str, Path] = {}
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        name = d.name.rsplit("-", 1)[0]
        assert name not in out, f"two {name} parts in {split_dir}"
        out[name] = d
    return out
