"""Score stage (``larex-score``): a saved detector (:mod:`larex.detector`) scores the images of a file or folder.

Writes ``scores.csv`` + ``scores.parquet`` (one row per input file: its path, the primary score, ``is_ood``, the
threshold, every view's score and an ``error`` column) and, for tasks with object rows, ``boxes.csv`` +
``boxes.parquet`` (one row per kept box, with its file) into ``output`` (default
``<output_root>/score/<method>-<time>``), atomically. A file that cannot be read or that the detector's input
policy refuses (e.g. ``resize: none`` and another size) gets its error in the ``error`` column (``on_error=raise``:
stop at it instead); no file is skipped silently. A missing input or a folder without images is one clear error.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from larex import io
from larex.stages import common


def input_files(path: Path, extensions) -> list[Path]:
    """The image files at ``path`` (itself, or every file under a folder with one of ``extensions``), sorted."""
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    if not path.exists():
        raise FileNotFoundError(f"input={path} does not exist; give an image file or a folder of images")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise common.ConfigError(f"input={path} holds no image files (looked for {sorted(exts)} in it and its "
                                 "subfolders); point input at a folder of images or set score.extensions")
    return files


def _threshold(node):
    if node is None:
        return None
    plain = common.plain(node)
    return {str(k): float(v) for k, v in plain.items()} if isinstance(plain, dict) else float(plain)


def run(cfg: DictConfig) -> Path:
    from rich.progress import Progress

    from larex.detector import Detector, read_image

    if cfg.get("detector") is None or cfg.get("input") is None:
        raise common.ConfigError("larex-score needs detector=PATH (a saved detector folder, "
                                 "evaluate-<hash>/detector/<method>) and input=FILE_OR_FOLDER")
    common.set_threads(cfg.get("threads"))
    files = input_files(Path(str(cfg.input)).expanduser(), list(cfg.extensions))
    detector = Detector.load(Path(str(cfg.detector)).expanduser(), device=str(cfg.device), versions=str(cfg.versions),
                             checkpoint=cfg.get("checkpoint"))
    thresholds = detector.resolve_thresholds(_threshold(cfg.get("threshold")))
    out = Path(str(cfg.output)).expanduser() if cfg.get("output") else \
        common.output_root(cfg) / "score" / f"{detector.spec['method']}-{time.strftime('%Y%m%d-%H%M%S')}"
    common.log("score", f"{detector!r}: {len(files)} file(s) from {cfg.input}")
    with Progress(disable=not cfg.progress, transient=True) as bar:
        task = bar.add_task("scoring", total=len(files))
        res = detector.score_sources(files, read_image, thresholds, int(cfg.batch_size), str(cfg.on_error),
                                     advance=lambda n: bar.advance(task, n))
    table = res.images.drop(columns="image").rename(columns={"source": "file"})
    errors = dict(zip(table["file"], table["error"]))
    errors = {f: e for f, e in errors.items() if e}
    _write(out, "scores", table)
    if res.boxes is not None:
        _write(out, "boxes", res.boxes.drop(columns="image").rename(columns={"source": "file"}))
    io.write_json(out / "score.json", {"detector": str(detector.path), "input": str(cfg.input), "files": len(files),
                                       "errors": len(errors), "thresholds": thresholds})
    n_ood = int(table["is_ood"].fillna(False).astype(bool).sum()) if "is_ood" in table else 0
    common.log("score", f"{len(files) - len(errors)} scored, {n_ood} flagged OOD, {len(errors)} error(s) -> "
                        f"{out / 'scores.csv'}")
    for f, e in list(errors.items())[:5]:
        common.log("score", f"error: {f}: {e}")
    return out


def _write(out: Path, name: str, df: pd.DataFrame) -> None:
    io.write_text(out / f"{name}.csv", df.to_csv(index=False))
    io.write_bytes(out / f"{name}.parquet", df.to_parquet(index=False))
