"""``memory/*`` rows: peak RSS of the extraction stage (``Trainer.predict`` streaming to safetensors
shards) at N and 10N images, each in a fresh process (``scripts/bench.py --memory-child N BATCH DIR``); and the
disk bytes per image of the stored MC latents vs the entropy computed during extraction
(``extract.keep_latent=false``)."""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import MC_SAMPLES, Ctx, Row, error_row

BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "bench.py"  # its --memory-child runs memory_child()
MEM_GROWTH = 1.2  # goal: peak RSS at 10x the images < 1.2 x peak RSS at 1x


class LazyImages(torch.utils.data.Dataset):
    """``n`` deterministic 1x28x28 images made on demand from their index (memory does not grow with n):
    items ``(x, y, index)``."""

    def __init__(self, n: int, shape: tuple[int, ...] = (1, 28, 28), classes: int = 8) -> None:
        self.n, self.shape, self.classes = n, shape, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        g = torch.Generator().manual_seed(int(i))
        return torch.rand(self.shape, generator=g), int(i) % self.classes, int(i)


def _peak_rss_mib() -> float:
    """This process's peak resident set size in MiB: ``VmHWM`` of /proc/self/status (Linux), else
    ``ru_maxrss``. (On Linux ``ru_maxrss`` survives exec: a child would report its parent's peak.)"""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    import resource

    scale = 1.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024.0


def memory_child(n: int, batch: int, directory: Path) -> dict[str, float]:
    """Extraction of ``n`` lazy images as in the extract stage (SmallCNN, every feature key, S=16,
    shards of 1024 rows): peak RSS (MiB) after set-up and at the end, wall seconds of predict + close."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from larex.extraction.module import KNOWN_KEYS, FeatureExtractor
    from larex.extraction.writer import ShardPredictionWriter
    from larex.io import ShardWriter
    from larex.models.small_cnn import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=8).eval()
    ext = FeatureExtractor(model, hooked_layer="block3", head="fc", mc_samples=MC_SAMPLES, keys=KNOWN_KEYS,
                           seed=0, drop_prob=0.5)
    loader = DataLoader(LazyImages(n), batch_size=batch, shuffle=False, num_workers=0)
    writer = ShardWriter(directory, "bench", shard_size=1024, total=n)
    callback = ShardPredictionWriter(writer)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(directory), callbacks=[callback])
    setup = _peak_rss_mib()
    t0 = time.perf_counter()
    trainer.predict(ext, loader, return_predictions=False)
    writer.close()
    wall = time.perf_counter() - t0
    if callback.rows != n:
        raise RuntimeError(f"the writer got {callback.rows} rows, expected {n}")
    return {"n": n, "batch": batch, "setup_mib": setup, "peak_mib": _peak_rss_mib(), "wall_s": wall}


def run_memory_child(n: int, batch: int, timeout: float) -> dict[str, float]:
    """``memory_child(n, batch)`` in a fresh interpreter (so its peak RSS is its own), shards in a temp folder."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="larex-bench-mem-") as tmp:
        proc = subprocess.run([sys.executable, str(BENCH_SCRIPT), "--memory-child", str(n), str(batch), tmp],
                              cwd=tmp, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " ".join(proc.stderr.split()[-60:])
        raise RuntimeError(f"memory child (N={n}) exited with {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def disk_row(ctx: Ctx) -> Row:
    """Bytes per image on disk: the S MC latents [N, S, D] float32 (then larex-aggregate) vs the LaREx entropy
    computed per batch on the extraction device (:class:`~larex.extraction.producers.aggregating.Aggregating`)
    and stored as [N, D] float64; the entropies must be identical."""
    import tempfile

    import numpy as np

    from larex import io
    from larex.aggregation.gaussian import GaussianEntropy
    from larex.extraction.module import FeatureExtractor, extract_features
    from larex.extraction.producers.aggregating import Aggregating
    from larex.extraction.producers.monte_carlo import MonteCarlo
    from larex.models.small_cnn import SmallCNN
    from larex.tasks.classification import estimator_step

    n = ctx.sizes.mem_images
    name, goal = "memory/extract_disk", f">= {0.95 * MC_SAMPLES / 2:g}x (S/2 less 5% for file headers)"
    inputs = f"N={n} images 1x28x28, SmallCNN block3, S={MC_SAMPLES}"
    try:
        torch.manual_seed(0)
        model = SmallCNN(in_channels=1, num_classes=8).eval().to(ctx.device)
        loader = torch.utils.data.DataLoader(LazyImages(n), batch_size=ctx.sizes.mem_batch)
        estimator = GaussianEntropy()

        def two_stage():
            mc = MonteCarlo("block3", MC_SAMPLES, seed=0, drop_prob=0.5)
            lat = extract_features(FeatureExtractor(model, producers=[mc]), loader, progress=False)["latent"]
            return lat, estimator.transform(lat, ctx.device)

        def in_extraction():
            agg = Aggregating(MonteCarlo("block3", MC_SAMPLES, seed=0, drop_prob=0.5),
                              [estimator_step(estimator, str(ctx.device))])
            return extract_features(FeatureExtractor(model, producers=[agg]), loader, progress=False)["entropy"]

        ref_s, (latent, want) = ctx.time(two_stage, sync=True)
        larex_s, got = ctx.time(in_extraction, sync=True)
        with tempfile.TemporaryDirectory(prefix="larex-bench-disk-") as tmp:
            io.save_arrays(f"{tmp}/latent.safetensors", {"latent": latent})
            io.save_arrays(f"{tmp}/entropy.safetensors", {"entropy": got})
            full, small = (Path(tmp, f).stat().st_size / n for f in ("latent.safetensors", "entropy.safetensors"))
    except Exception as exc:  # noqa: BLE001
        return error_row(name, inputs, goal, exc)
    ratio = full / small
    err = float(np.max(np.abs(got - want))) if len(got) else math.nan
    note = (f"bytes per image on disk: {full:.0f} B (latent [N, {MC_SAMPLES}, {latent.shape[2]}] float32) vs "
            f"{small:.0f} B (entropy [N, {latent.shape[2]}] float64, extract.keep_latent=false); ratio = bytes "
            f"ratio; ImageNet-1k at S=16, D=512: 42 GB vs 5.2 GB; larex_s = extraction with the Gaussian "
            f"entropy per batch, reference_s = extraction of the latents + the entropy afterwards; max_abs_err "
            f"= entropy difference (must be 0)")
    return Row(name, inputs, larex_s, ref_s, ratio, goal, ratio >= 0.95 * MC_SAMPLES / 2 and err == 0.0, err, note)


def memory_rows(ctx: Ctx) -> list[Row]:
    return [*rss_rows(ctx), disk_row(ctx)]


def rss_rows(ctx: Ctx) -> list[Row]:
    n = ctx.sizes.mem_images
    name, goal_s = "memory/extract", f"<{MEM_GROWTH:g} (growth <{MEM_GROWTH - 1:.0%})"
    inputs = f"N={n} vs {10 * n} images 1x28x28, batch {ctx.sizes.mem_batch}"
    try:
        ctx.log(f"memory: extraction of {n} images (subprocess)")
        one = run_memory_child(n, ctx.sizes.mem_batch, timeout=600)
        ctx.log(f"memory: extraction of {10 * n} images (subprocess)")
        ten = run_memory_child(10 * n, ctx.sizes.mem_batch, timeout=1800)
    except Exception as exc:  # noqa: BLE001
        return [error_row(name, inputs, goal_s, exc)]
    ratio = ten["peak_mib"] / one["peak_mib"]
    inputs += f"; peak RSS {one['peak_mib']:.0f} MiB vs {ten['peak_mib']:.0f} MiB"
    growth = [r["peak_mib"] - r["setup_mib"] for r in (one, ten)]
    note = (f"SmallCNN FeatureExtractor (every feature key, S={MC_SAMPLES}, batch {ctx.sizes.mem_batch}) in "
            f"pl.Trainer.predict(return_predictions=False) + ShardPredictionWriter (shards of 1024 rows), images "
            f"made per index, each size in a fresh process; peak RSS (VmHWM) {one['peak_mib']:.1f} MiB at "
            f"1x, {ten['peak_mib']:.1f} MiB at 10x, of which set-up (imports, model) {one['setup_mib']:.1f} / "
            f"{ten['setup_mib']:.1f} MiB and extraction {growth[0]:.1f} / {growth[1]:.1f} MiB; ratio = peak "
            f"RSS(10x)/peak RSS(1x); larex_s = wall time of predict + close at 10x, reference_s = the same at 1x")
    return [Row(name, inputs, ten["wall_s"], one["wall_s"], ratio, goal_s, ratio < MEM_GROWTH, math.nan, note)]
