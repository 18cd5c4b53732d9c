"""``detector/*`` rows: per-batch scoring latency of a saved LaRED and LaREM detector (``larex.Detector``: the
task's collate, S=16 MC samples of the hooked DropBlock output with the shared prefix, the entropy, PCA and the
density) vs plain deterministic inference of the same model on the same batch, batch 1 and 64, timed
alternately (median of 101 each: load changes hit both sides alike).

The default classifier (SmallCNN, 28x28, hooked at ``dropblock``) is trained for one epoch on the bundled digits
and saved through ``larex-run save_detector=[lared,larem]`` (in this process, under a temp folder); both sides
start from the same model inputs (the task's input transform is not timed on either side). The error column is
the largest difference between the detector's scores and the evaluate stage's scores of the same test images."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import MC_SAMPLES, Ctx, Row, alternating, error_row

BATCHES = (1, 64)
GOAL = 1.5
REPEATS = 101  # calls of milliseconds: the median of many, the two sides alternating


def _saved_detectors(out: Path, device: str):
    from hydra import compose, initialize_config_module

    from larex import io
    from larex.stages import run as run_stage

    overrides = [f"output_root={out}", "tracking.enabled=false", "progress=false", "dataset=digits",
                 f"device={device}", f"hooked_layer.mc_samples={MC_SAMPLES}", "model.train.epochs=1",
                 "limit.fit=300", "limit.val=100", "limit.test=64", "limit.ood=16", "+ood=[noise]",
                 "evaluate.plots=false", "save_detector=[lared,larem]"]
    with initialize_config_module("larex.configs", version_base="1.3"):
        cfg = compose("run", overrides=overrides)
    run_stage.run(cfg)
    layer = out / "classification" / "digits" / "small_cnn" / "dropblock"
    return cfg, layer, Path(io.read_json(layer / "latest.json")["path"])


def detector_rows(ctx: Ctx) -> list[Row]:
    import pandas as pd

    from larex.detector import Detector
    from larex.stages import common

    rows: list[Row] = []
    dev = "cuda" if ctx.device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="larex-bench-detector-") as tmp:
        try:
            ctx.log("detector: training the default classifier on digits and saving LaRED / LaREM")
            cfg, layer, ev = _saved_detectors(Path(tmp), dev)
            raw = common.build_dataset(cfg, "test", raw=True)
            images = [raw[i][0] for i in range(len(raw))]
        except Exception as exc:  # noqa: BLE001
            return [error_row(f"detector/{m}/b{b}", "", f"<={GOAL}x plain", exc) for m in ("lared", "larem")
                    for b in BATCHES]
        for method in ("lared", "larem"):
            try:
                det = Detector.load(ev / "detector" / method, device=dev)
                prepared = [det.prepare(im) for im in images]
                scores = pd.read_parquet(next((layer / "scores").glob(f"{method}-*.parquet")))
                ref = scores.loc[scores["split"] == "test", "score"].to_numpy()
                err = float(np.abs(det.score(prepared=prepared).scores - ref).max())
            except Exception as exc:  # noqa: BLE001
                rows += [error_row(f"detector/{method}/b{b}", "", f"<={GOAL}x plain", exc) for b in BATCHES]
                continue
            for b in BATCHES:
                name, inputs = f"detector/{method}/b{b}", f"batch {b}, S={MC_SAMPLES}, 28x28"
                try:
                    items = prepared[:b]
                    x = torch.stack([it[0] for it in items]).to(det.device)

                    def plain():
                        with torch.no_grad():
                            return det.model(x)

                    t_plain, t_det, _ = alternating(ctx, plain, lambda: det.score(prepared=items), REPEATS)
                    ratio = t_det / t_plain
                    rows.append(Row(name, inputs, t_det, t_plain, t_plain / t_det, f"<={GOAL}x plain",
                                    ratio <= GOAL, err,
                                    f"detector {ratio:.1f}x the plain forward; err = max |detector - evaluate| "
                                    f"over {len(prepared)} test images"))
                except Exception as exc:  # noqa: BLE001
                    rows.append(error_row(name, inputs, f"<={GOAL}x plain", exc))
    return rows
