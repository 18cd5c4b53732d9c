"""LightningModule that runs the planned feature producers on every batch (``predict_step``)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from larex.extraction.producers.base import Producer, model_device
from larex.extraction.producers.deterministic import Deterministic
from larex.extraction.producers.head import Head, check_head
from larex.extraction.producers.labels import Labels
from larex.extraction.producers.monte_carlo import MonteCarlo
from larex.extraction.producers.nac import NAC, PREFIX as NAC_PREFIX
from larex.extraction.producers.odin import ODIN

KNOWN_KEYS = ("latent", "logits", "mc_logits", "penultimate", "labels")
"""Keys of the convenience constructor (``keys=``); other producers come through ``producers=`` or the plan."""
ODIN_KEY = "odin_logits"
ODIN_ARGS = ("temperature", "epsilon")


def _odin_producer(odin: Mapping[str, float] | None) -> ODIN | None:
    if odin is None:
        return None
    if not isinstance(odin, Mapping) or set(odin) != set(ODIN_ARGS):
        got = sorted(map(str, odin)) if isinstance(odin, Mapping) else type(odin).__name__
        raise ValueError(f"FeatureExtractor odin must be None or a mapping with exactly the keys {list(ODIN_ARGS)}; "
                         f"got {got}. Use e.g. odin={{'temperature': 1000.0, 'epsilon': 0.0014}}")
    return ODIN(odin["temperature"], odin["epsilon"])


def producers_for(model: nn.Module, hooked_layer: str | None, head: str | None = "fc", mc_samples: int = 16,
                  keys: Sequence[str] = KNOWN_KEYS, seed: int = 0, drop_prob: float | None = None,
                  block_size: int | None = None, mc_batch: int | None = None, reduction: str = "auto",
                  share_prefix: bool = True, nac_layers: Sequence[str] = (),
                  odin: Mapping[str, float] | None = None) -> list[Producer]:
    """The producers of the classic key list (``latent``, ``logits``, ``mc_logits``, ``penultimate``,
    ``labels``, plus NAC layers and ODIN), for code that builds an extractor by hand (tests, benchmarks)."""
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    unknown = [k for k in keys if k not in KNOWN_KEYS]
    if any(isinstance(k, str) and k.startswith(NAC_PREFIX) for k in unknown):
        raise ValueError(f"FeatureExtractor keys {unknown}: NAC statistics are not requested through keys; pass "
                         "nac_layers=[...] (or select the nac_ue method: the plan adds them)")
    if ODIN_KEY in unknown:
        raise ValueError(f"FeatureExtractor keys: {ODIN_KEY!r} is not requested through keys; pass "
                         "odin={'temperature': 1000.0, 'epsilon': 0.0014}")
    if unknown or not keys:
        raise ValueError(f"FeatureExtractor keys {unknown or '(empty)'} invalid; choose a non-empty subset of "
                         f"{KNOWN_KEYS}")
    if "penultimate" in keys and head is None:
        raise ValueError("key 'penultimate' needs head= the dotted path of the final linear layer; "
                         "set head or drop 'penultimate' from keys")
    out: list[Producer] = []
    mc = [k for k in ("latent", "mc_logits") if k in keys]
    if mc:
        out.append(MonteCarlo(str(hooked_layer), mc_samples, keys=mc, seed=seed, drop_prob=drop_prob,
                              block_size=block_size, mc_batch=mc_batch, reduction=reduction,
                              share_prefix=share_prefix))
    det = [k for k in ("logits", "penultimate") if k in keys]
    if det:
        out.append(Deterministic(det, head=head))
    if "labels" in keys:
        out.append(Labels())
    nac_layers = (nac_layers,) if isinstance(nac_layers, str) else tuple(nac_layers)
    if nac_layers:
        out.append(NAC(layers=nac_layers, reduction=reduction))
    od = _odin_producer(odin)
    if od is not None:
        out.append(od)
    return out


class FeatureExtractor(pl.LightningModule):
    """Per batch ``(x, y, index)``: every producer's arrays, as CPU tensors, in one dict.

    Build it from a plan (``FeatureExtractor(model, producers=[...])``) or with the classic arguments, which
    make the matching producers (see :func:`producers_for`): ``latent`` / ``mc_logits`` (MonteCarlo),
    ``logits`` / ``penultimate`` (Deterministic), ``labels``, ``nac.<layer>`` (``nac_layers``) and
    ``odin_logits`` (``odin``). Every producer validates its layers against the model here, before any compute.
    A sample's arrays depend only on the sample and the seed (MonteCarlo draws the same S masks for every image).
    """

    def __init__(self, model: nn.Module, hooked_layer: str | None = None, head: str | None = "fc",
                 mc_samples: int = 16, keys: Sequence[str] = KNOWN_KEYS, seed: int = 0,
                 drop_prob: float | None = None, block_size: int | None = None,
                 mc_batch: int | None = None, reduction: str = "auto", share_prefix: bool = True,
                 nac_layers: Sequence[str] = (), odin: Mapping[str, float] | None = None,
                 producers: Sequence[Producer] | None = None) -> None:
        super().__init__()
        if producers is None:
            producers = producers_for(model, hooked_layer, head, mc_samples, keys, seed, drop_prob, block_size,
                                      mc_batch, reduction, share_prefix, nac_layers, odin)
        if not producers:
            raise ValueError("FeatureExtractor needs at least one producer")
        self.model = model
        self.producers = list(producers)
        for p in self.producers:
            p.setup(model)
        self.head = head
        self.keys = tuple(k for p in self.producers for k in p.keys)
        self.select = None  # optional: (batch index tensor, batch_idx) -> the producers to run on that batch
        # a rank may have no shard left to write (a resume with fewer shards than ranks): it predicts nothing
        self.allow_zero_length_dataloader_with_multiple_devices = True


    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 3:
            raise ValueError("FeatureExtractor batches must be (x, y, index) tuples (index = dataset row "
                             "numbers); wrap the dataset so it returns them")
        x, y, index = batch
        index = torch.as_tensor(index)
        if index.numel() == 0:
            raise ValueError("FeatureExtractor got an empty batch; drop empty batches from the loader")
        return x, (y if isinstance(y, (list, tuple, dict)) else torch.as_tensor(y)), index  # detection: targets

    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        producers = self.producers if self.select is None else self.select(self._unpack(batch)[2], batch_idx)
        return self.run_producers(batch, producers)

    def run_producers(self, batch: Any, producers: Sequence[Producer]) -> dict[str, torch.Tensor]:
        x, y, index = self._unpack(batch)
        x = x.to(model_device(self.model))
        out: dict[str, torch.Tensor] = {}
        for p in producers:
            out.update(p.produce(self.model, x, y, index))
        order = [k for k in KNOWN_KEYS if k in out] + [k for k in out if k not in KNOWN_KEYS]
        return {k: out[k] for k in order}

    def head_weights(self) -> dict[str, torch.Tensor]:
        """``{"head.weight": [C, F], "head.bias": [C]}`` of the head linear layer (float32, CPU)."""
        if self.head is None:
            raise ValueError("head_weights() needs head= the dotted path of the final linear layer")
        check_head(self.model, self.head, "head_weights()")
        return Head(self.head).model_arrays(self.model)


def extract_features(extractor: FeatureExtractor, loader, progress: bool = True) -> dict[str, "np.ndarray"]:
    """Run ``extractor`` over every batch of ``loader`` and return its keys as numpy arrays, rows in loader order
    (the notebook path; the extract stage streams large splits to safetensors shards instead). Batches may be
    ``(x, y, index)``, ``(x, y)`` or ``x`` alone (``y = -1``, ``index`` = running row number). Model-axis keys
    (``head.weight``) are not rows: read them with :meth:`FeatureExtractor.head_weights`."""
    import numpy as np
    from rich.progress import Progress

    from larex import io

    parts: dict[str, list] = {}
    row = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("extracting", total=total)
        for batch in loader:
            if isinstance(batch, (tuple, list)) and len(batch) == 3:
                x, y, index = batch
            else:
                x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
                n = len(x)
                y = torch.full((n,), -1, dtype=torch.int64) if y is None else y
                index = torch.arange(row, row + n)
            with torch.no_grad():  # producers that need gradients (ODIN, NAC) enable them themselves
                out = extractor.run_producers((x, y, index), extractor.producers)
            for k, v in out.items():
                parts.setdefault(k, []).append(io.to_numpy(v))
            row += len(torch.as_tensor(index).reshape(-1))
            bar.advance(task)
    if not parts:
        raise ValueError("extract_features: the loader gave no batches (empty dataset?)")
    return {k: np.concatenate(v) for k, v in parts.items()}
