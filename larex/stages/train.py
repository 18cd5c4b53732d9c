"""Train stage: fit the classifier on the ID ``fit`` split (Lightning), save weights as safetensors.

Output: ``<root>/<task>/<dataset>/<model>/checkpoint-<hash>/model.safetensors`` + ``manifest.json`` (the folder is
keyed by the training config's hash, so sweeps over model settings keep every model). Skipped when the manifest is
complete, or when ``train.checkpoint`` points at given weights. Two jobs that need the same model train it once
(a claim lock; the second waits and reuses it).
"""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from safetensors.torch import load_file, save

from larex import io
from larex.stages import common

CHECKPOINT = "model.safetensors"


def checkpoint_dir(cfg: DictConfig) -> Path:
    from larex.layout import Layout

    h = common.train_hash(cfg)
    return Layout(common.output_root(cfg), str(cfg.task.name), str(cfg.dataset.name), str(cfg.model.name),
                  str(cfg.hooked_layer.name), h, "", "", "").checkpoint_dir


def build_model(cfg: DictConfig) -> torch.nn.Module:
    return instantiate(cfg.model.net)


def load_model(cfg: DictConfig) -> torch.nn.Module:
    """The trained network (``train.checkpoint`` if given, else this config's train output), in eval mode."""
    given = cfg.train.get("checkpoint")
    path = Path(str(given)).expanduser() if given else checkpoint_dir(cfg) / CHECKPOINT
    if given is None and not io.is_complete(checkpoint_dir(cfg), common.train_hash(cfg)):
        raise FileNotFoundError(f"no trained model for this config at {checkpoint_dir(cfg)}: run larex-train "
                                "(or larex-run), or set train.checkpoint=PATH.safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"train.checkpoint={path} does not exist (a safetensors state_dict is expected)")
    model = build_model(cfg)
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match model={cfg.model.name}: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    return model.eval()


def run(cfg: DictConfig, run=None) -> Path:
    from larex.layout import claim

    common.quiet_lightning()
    if cfg.train.get("checkpoint"):
        load_model(cfg)  # validates the given weights early
        common.log("train", f"using given weights {cfg.train.checkpoint}")
        return Path(str(cfg.train.checkpoint))
    run = run or common.prepare(cfg)
    out = checkpoint_dir(cfg)
    h = common.train_hash(cfg)
    if io.is_complete(out, h) and not cfg.force:
        return _up_to_date(out)
    with claim(out, "larex-train", on_wait=lambda who: common.log("train", f"waiting for {who} to train {out}")):
        if io.is_complete(out, h) and not cfg.force:  # another job trained it while we waited
            return _up_to_date(out)
        path = _train(cfg, out, h)
    run.layout.record("train", out, h, {"overrides": common.overrides()})
    return path


def _up_to_date(out: Path) -> Path:
    m = io.read_manifest(out)
    common.log("train", f"up to date: {out} (val acc {m.get('val_accuracy', float('nan')):.4f})")
    return out / CHECKPOINT


def _train(cfg: DictConfig, out: Path, h: str) -> Path:
    from larex.models.classifier import LitClassifier, accuracy
    common.seed_everything(int(cfg.seed))
    device = common.resolve_device(cfg.device)
    tcfg = cfg.model.train
    fit_ds = common.build_dataset(cfg, "fit", stage="train")
    val_ds = common.build_dataset(cfg, "val", stage="train")
    g = torch.Generator().manual_seed(int(cfg.seed))
    fit_dl = torch.utils.data.DataLoader(fit_ds, batch_size=int(tcfg.batch_size), shuffle=True, generator=g,
                                         num_workers=int(cfg.train.num_workers), drop_last=len(fit_ds) > tcfg.batch_size)
    val_dl = torch.utils.data.DataLoader(val_ds, batch_size=512, num_workers=int(cfg.train.num_workers))
    model = build_model(cfg)
    lit = LitClassifier(model, lr=float(tcfg.lr), weight_decay=float(tcfg.weight_decay),
                        optimizer=str(tcfg.optimizer), epochs=int(tcfg.epochs),
                        **({"momentum": float(tcfg.momentum)} if "momentum" in tcfg else {}))
    trainer = pl.Trainer(max_epochs=int(tcfg.epochs), logger=False, enable_checkpointing=False,
                         enable_progress_bar=bool(cfg.progress), enable_model_summary=False,
                         deterministic=False, **common.lightning_accelerator(device))
    common.log("train", f"{cfg.model.name} on {cfg.dataset.name}: {len(fit_ds)} fit / {len(val_ds)} val "
                         f"images, {tcfg.epochs} epochs on {device}")
    trainer.fit(lit, fit_dl, val_dl)
    model = lit.model.eval()
    val_acc = accuracy(model, val_dl, device)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    io.write_bytes(out / CHECKPOINT, save(state))
    io.write_json(out / io.MANIFEST, {"complete": True, "config_hash": h, "val_accuracy": val_acc,
                                      "model": cfg.model.name, "dataset": cfg.dataset.name,
                                      "epochs": int(tcfg.epochs)})
    common.log("train", f"val accuracy {val_acc:.4f} -> {out / CHECKPOINT}")
    return out / CHECKPOINT
