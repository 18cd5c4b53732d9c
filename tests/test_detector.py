"""A saved detector (larex.detector): evaluate saves every method with its ID-val threshold, Detector.load rebuilds it
and scores raw images exactly as the evaluate stage scored them; tampered or mismatched files are refused;
larex-score writes per-file scores with an error column."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module

from larex import io, metrics
from larex.detector import SPEC_FILE, STATE_FILE, Detector, DetectorFileError
from larex.stages import common
from larex.stages import run as run_stage

from _cli import cli

POSTPROCESSORS = ["lared", "larem"]


def _overrides(out: Path) -> list[str]:
    return [f"output_root={out}", "tracking.enabled=false", "progress=false", "dataset=digits", "device=cpu",
            "hooked_layer.mc_samples=6", "extract.batch_size=64", "extract.shard_size=100", "model.train.epochs=2",
            "limit.fit=300", "limit.val=100", "limit.test=64", "limit.ood=40", "evaluate.plots=false",
            "baselines=all", "save_detector=all", "+ood=[digits_shift,noise]"]


def _cfg(out: Path):
    with initialize_config_module("larex.configs", version_base="1.3"):
        return compose("run", overrides=_overrides(out))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One digits run with every postprocessor and baseline, all saved as detectors; the evaluate folder."""
    out = tmp_path_factory.mktemp("detector")
    cfg = _cfg(out)
    table = run_stage.run(cfg)
    ev = Path(io.read_json(out / "classification" / "digits" / "small_cnn" / "dropblock" / "latest.json")["path"])
    return out, ev, table


def _cached_scores(out: Path, method: str, split: str) -> np.ndarray:
    files = sorted((out / "classification" / "digits" / "small_cnn" / "dropblock" / "scores").glob(f"{method}-*.parquet"))
    assert len(files) == 1, files
    df = pd.read_parquet(files[0])
    return df.loc[df["split"] == split, "score"].to_numpy()


def _raw_images(out: Path, split: str) -> list:
    ds = common.build_dataset(_cfg(out), split, raw=True)
    return [ds[i][0] for i in range(len(ds))]


def _methods() -> list[str]:
    return [*POSTPROCESSORS, *(n for n in common.packaged_options("baselines") if n != "all")]


def test_every_selected_method_is_saved_with_its_val_threshold(evaluated):
    out, ev, table = evaluated
    saved = sorted(p.name for p in (ev / "detector").iterdir())
    assert saved == sorted(_methods())
    spec = io.read_json(ev / "detector" / "lared" / SPEC_FILE)
    val = _cached_scores(out, "lared", "val")
    info = spec["views"]["lared"]
    assert info["threshold"] == metrics.threshold_at_tpr(val, 0.95)
    assert info["val_tpr"] == pytest.approx(np.mean(val >= info["threshold"])) and info["val_tpr"] >= 0.95
    assert set(info["zscore_thresholds"]) == {"z_p90", "z_p95", "z_p99"}
    row = table[(table["method"] == "lared") & (table["ood"] == "noise")].iloc[0]
    assert row["threshold"] == info["threshold"]  # the threshold of the metrics table
    assert spec["model"]["checkpoint"]["sha256"] == io.file_sha256(Path(spec["model"]["checkpoint"]["path"]))
    assert spec["hooked_layer"]["mc_samples"] == 6 and spec["method_spec"]["_target_"].endswith("LaRED")
    assert {"larex", "torch", "numpy", "python"} <= set(spec["versions"])


@pytest.mark.parametrize("method", _methods())
def test_loaded_detector_scores_equal_the_evaluate_stage(evaluated, method):
    """Round trip for every postprocessor and baseline YAML: the same raw test and OOD images through
    Detector.score give the evaluate stage's scores (one batch: identical; in chunks: to float64 rounding)."""
    out, ev, _ = evaluated
    det = Detector.load(ev / "detector" / method, device="cpu")
    for split in ("test", "ood/noise"):
        ref = _cached_scores(out, method, split)
        res = det.score(_raw_images(out, split))
        np.testing.assert_array_equal(res.scores, ref)
        assert (res.is_ood == (ref < det.thresholds[method])).all()
    chunked = det.score(_raw_images(out, "test"), batch_size=13)
    np.testing.assert_allclose(chunked.scores, _cached_scores(out, method, "test"), rtol=1e-10, atol=1e-10)


def test_detector_flags_noise_as_ood_and_accepts_the_val_share_of_id(evaluated):
    out, ev, _ = evaluated
    det = Detector.load(ev / "detector" / "larem", device="cpu")
    val = det.score(_raw_images(out, "val"))
    assert np.mean(~val.is_ood) == pytest.approx(det.spec["views"]["larem"]["val_tpr"])
    lower = det.score(_raw_images(out, "val"), threshold=float(np.max(val.scores)) + 1)
    assert lower.is_ood.all() and (lower.images["threshold"] > det.thresholds["larem"]).all()


def _copy(ev: Path, method: str, tmp_path: Path) -> Path:
    dst = tmp_path / method
    shutil.copytree(ev / "detector" / method, dst)
    return dst


def test_a_tampered_detector_json_is_refused(evaluated, tmp_path):
    _, ev, _ = evaluated
    d = _copy(ev, "lared", tmp_path)
    spec = io.read_json(d / SPEC_FILE)
    spec["views"]["lared"]["threshold"] = -1e9  # would accept everything
    (d / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(DetectorFileError, match="modified after it was saved"):
        Detector.load(d)


def test_a_tampered_state_file_is_refused(evaluated, tmp_path):
    _, ev, _ = evaluated
    d = _copy(ev, "larem", tmp_path)
    state = io.load_arrays(d / STATE_FILE)
    key = next(iter(state))
    state[key] = state[key] + 1
    io.save_arrays(d / STATE_FILE, state)
    with pytest.raises(DetectorFileError, match="state.safetensors differs"):
        Detector.load(d)


def test_changed_weights_and_versions_are_refused_naming_what_differs(evaluated, tmp_path):
    _, ev, _ = evaluated
    d = _copy(ev, "msp", tmp_path)
    spec = io.read_json(d / SPEC_FILE)
    weights = tmp_path / "model.safetensors"
    shutil.copy(spec["model"]["checkpoint"]["path"], weights)
    with open(weights, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(DetectorFileError, match="differs from the one the detector was saved with"):
        Detector.load(d, checkpoint=weights)
    spec["versions"]["torch"] = "0.0.1"
    from larex.detector import content_hash

    spec["content_sha256"] = content_hash(spec)  # a consistent file saved under another torch
    (d / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(DetectorFileError, match=r"torch 0\.0\.1 \(saved\)"):
        Detector.load(d)
    with pytest.warns(UserWarning, match="package versions differ"):
        Detector.load(d, versions="warn")
    with pytest.raises(DetectorFileError, match="no saved detector"):
        Detector.load(tmp_path / "nothing")


def test_save_detector_names_an_unselected_method(tmp_path):
    from larex.stages.evaluate import check_requirements

    with initialize_config_module("larex.configs", version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"output_root={tmp_path}", "dataset=digits", "save_detector=[vim]"])
    with pytest.raises(common.ConfigError, match=r"save_detector=\['vim'\]: not among the evaluated methods"):
        check_requirements(cfg)


def test_larex_score_writes_per_file_scores_with_an_error_column(evaluated, tmp_path):
    from PIL import Image

    out, ev, _ = evaluated
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    raw = _raw_images(out, "test")[:5]
    for i, x in enumerate(raw):  # 8-bit PNGs: what the detector reads back is x rounded to 1/255
        Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8)).save(images / f"{i}.png")
    Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)).save(images / "sub" / "rgb.jpg")
    (images / "broken.png").write_bytes(b"not an image")
    dst = tmp_path / "scored"
    cli("larex-score", f"detector={ev / 'detector' / 'lared'}", f"input={images}", f"output={dst}", "device=cpu",
        "progress=false", cwd=tmp_path)
    df = pd.read_csv(dst / "scores.csv")
    assert pd.read_parquet(dst / "scores.parquet").shape == df.shape
    assert [Path(f).name for f in df["file"]] == ["0.png", "1.png", "2.png", "3.png", "4.png", "broken.png", "rgb.jpg"]
    broken = df[df["file"].str.endswith("broken.png")].iloc[0]
    assert "cannot identify image file" in broken["error"] and np.isnan(broken["score"])
    det = Detector.load(ev / "detector" / "lared", device="cpu")
    pngs = [Image.open(images / f"{i}.png") for i in range(5)]
    np.testing.assert_allclose(df["score"].to_numpy()[:5], det.score(pngs).scores, rtol=1e-10)
    assert df["is_ood"].iloc[:5].tolist() == list(det.score(pngs).is_ood)
    # threshold override; an empty folder and a missing input are one clear error each
    cli("larex-score", f"detector={ev / 'detector' / 'lared'}", f"input={images / '0.png'}", f"output={dst}2",
        "threshold=1e9", "device=cpu", "progress=false", cwd=tmp_path)
    one = pd.read_csv(f"{dst}2/scores.csv")
    assert len(one) == 1 and bool(one["is_ood"].iloc[0]) and one["threshold"].iloc[0] == 1e9
    (tmp_path / "empty").mkdir()
    p = cli("larex-score", f"detector={ev / 'detector' / 'lared'}", f"input={tmp_path / 'empty'}", cwd=tmp_path,
            check=False)
    assert p.returncode == 1 and "holds no image files" in p.stderr
    p = cli("larex-score", f"detector={ev / 'detector' / 'lared'}", f"input={tmp_path / 'missing'}", cwd=tmp_path,
            check=False)
    assert p.returncode == 1 and "does not exist" in p.stderr


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_served_detector_answers_on_loopback_with_the_in_process_scores(evaluated, tmp_path, loopback):
    """evaluate logs the saved detector as an MLflow pyfunc model (models-from-code); `mlflow models serve
    --env-manager local` hosts it on 127.0.0.1 and answers a batch of base64 images with the in-process scores."""
    import base64
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from PIL import Image

    out, _, _ = evaluated
    uri = f"sqlite:///{out}/mlflow.db"
    with initialize_config_module("larex.configs", version_base="1.3"):
        cfg = compose("run", overrides=[*_overrides(out), "tracking.enabled=true", f"tracking.uri={uri}",
                                        "baselines=[msp]", "save_detector=[lared]"])
    run_stage.run(cfg)
    ev = Path(io.read_json(out / "classification" / "digits" / "small_cnn" / "dropblock" / "latest.json")["path"])
    info = io.read_json(ev / "evaluate.json")
    model_uri = info["detectors"]["lared"]["mlflow_model_uri"]
    import mlflow

    logged = mlflow.MlflowClient(uri).get_logged_model(model_uri.split("/")[-1])
    assert logged.source_run_id == info["mlflow_run_id"] and logged.name == "detector-lared"

    files = []
    for i, x in enumerate(_raw_images(out, "test")[:4]):
        Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8)).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    files.append(tmp_path / "broken.png")
    payload = [base64.b64encode(f.read_bytes()).decode() for f in files]

    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "LAREX_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        deadline = time.time() + 240
        while True:
            try:
                if opener.open(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"mlflow models serve did not come up:\n{server.stdout.read()[-3000:]}")
                time.sleep(0.5)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[p] for p in payload]}}).encode()
        reply = opener.open(urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                                   {"Content-Type": "application/json"}), timeout=120)
        served = pd.DataFrame(json.loads(reply.read())["predictions"])
    finally:
        server.terminate()
        server.wait(timeout=30)
    det = Detector.load(ev / "detector" / "lared", device="cpu")
    from larex.detector import decode_image

    local = det.score_sources(payload, decode_image)
    assert len(served) == 5 and served["error"].iloc[4].startswith("UnidentifiedImageError")
    # the server ran one thread (OMP_NUM_THREADS=1), this process two: float32 convolutions round differently
    np.testing.assert_allclose(served["score"].to_numpy()[:4], local.scores[:4], rtol=1e-6)
    assert served["is_ood"].iloc[:4].tolist() == local.is_ood[:4].tolist()
    assert (served["threshold"].iloc[:4] == det.thresholds["lared"]).all()
