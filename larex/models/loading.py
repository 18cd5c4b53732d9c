"""Build a network from its plain spec (``model.net``, a ``_target_`` mapping), load a safetensors state_dict into
it and insert the extraction-time MC layer: the one way both the stages and a loaded :class:`larex.Detector`
get a model, so a saved detector runs the very network the evaluation ran."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def build_network(net: Mapping[str, Any]) -> torch.nn.Module:
    """``net`` instantiated (``_target_`` + arguments, plain values or an OmegaConf node)."""
    from hydra.utils import instantiate

    return instantiate(net)


def load_state(model: torch.nn.Module, path: str | Path, what: str) -> torch.nn.Module:
    """Load the safetensors state_dict at ``path`` into ``model`` (every key must match; ``what`` names the model
    in the error)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (a safetensors state_dict is expected)")
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match {what}: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    return model


def with_mc_layer(model: torch.nn.Module, hooked_layer: Mapping[str, Any]) -> torch.nn.Module:
    """``model`` with the MC layer of ``hooked_layer["insert"]`` (kind, drop_prob, block_size, levels: one per FPN
    level of a hooked mapping) inserted after the hooked layer, for models without dropout there (detectors);
    unchanged when ``insert`` is null. Applied to loaded weights only: training and the deterministic outputs
    never see it (eval mode = identity)."""
    ins = hooked_layer.get("insert")
    if not ins:
        return model
    from larex.models.detection.base import insert_mc_layer

    return insert_mc_layer(model, str(hooked_layer["path"]), str(ins.get("kind", "dropblock")),
                           float(ins.get("drop_prob", 0.5)), int(ins.get("block_size", 3)), ins.get("levels"))


def load_network(net: Mapping[str, Any], hooked_layer: Mapping[str, Any], checkpoint: str | Path | None = None,
                 what: str = "the model") -> torch.nn.Module:
    """The network of ``net`` with the weights of ``checkpoint`` (none: as built, e.g. its own ``weights``
    argument or random init) and the MC layer of ``hooked_layer``, in eval mode."""
    model = build_network(net)
    if checkpoint is not None:
        load_state(model, checkpoint, what)
    return with_mc_layer(model, hooked_layer).eval()
