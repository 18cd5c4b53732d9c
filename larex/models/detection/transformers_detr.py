"""transformers' Deformable DETR (``DeformableDetrForObjectDetection``) behind the :class:`DetectorAdapter` contract.

Two ways to build it:

* ``pretrained`` = a hub name or a local folder (``SenseTime/deformable-detr``, a fine-tuned checkpoint): loaded
  with ``from_pretrained`` (never ``trust_remote_code``); ``num_classes`` must match the checkpoint's
  ``num_labels`` (or be None to take the checkpoint's). Give it inputs as it was trained on (ImageNet
  ``dataset.mean`` / ``std``, ``dataset.image_size``).
* ``pretrained: null``: a random-init model from a small ``DeformableDetrConfig`` (offline, no download): a
  transformers ``ResNetConfig`` backbone (``use_timm_backbone=False``, no pretrained backbone), ``d_model``,
  ``num_queries``, encoder / decoder layers from the arguments, drawn from ``seed`` without touching the global RNG,
  so the same config always gives the same network. ``weights`` (a safetensors state dict of this adapter) then
  replaces the random weights.

``forward(x)`` is the HF model on ``pixel_values=x`` (``pixel_mask`` all ones: the letterboxed input is one image
including its padding, as for the other detectors). Hook ``model.model.input_proj.2`` (the projection of the backbone's
last stage, C5 at stride 32, onto ``d_model`` channels: a ``[B, d_model, H/32, W/32]`` map that runs once per
forward; with ``num_feature_levels: 1`` it is ``model.model.input_proj.0``). The encoder output is a token sequence over
all levels, which has no single map to RoIAlign.

:meth:`DeformableDETRDetector.detect` decodes the last decoder layer as ``post_process_object_detection`` does,
but with one label per query, as the RT-DETR branch of :mod:`.ultralytics`: sigmoid of the class logits
[B, Q, C] (focal classification, no background class), the queries whose best class score > ``conf``, the
``max_det`` best per image (no NMS: a set prediction; ``iou`` is unused); boxes = ``pred_boxes`` (normalized
cxcywh) times the input size, xyxy input pixels; logits = the kept queries' raw class logits; features = their
last decoder states, the input of the linear class head (:meth:`DeformableDETRDetector.box_head`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from larex.models.detection.base import Detections, DetectorAdapter, keep_best_queries

DEFAULT_BACKBONE = {"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
                    "layer_type": "basic"}


def cxcywh_to_xyxy(b: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Normalized cxcywh [..., 4] -> xyxy in pixels of a ``width`` x ``height`` input."""
    xy, wh = b[..., :2], b[..., 2:4] / 2
    return torch.cat([xy - wh, xy + wh], dim=-1) * b.new_tensor([width, height, width, height])


def load_adapter_weights(adapter: nn.Module, weights: str) -> None:
    """A safetensors state dict of ``adapter`` (``safetensors.torch.save_model(adapter, path)``, or every entry
    of ``adapter.state_dict()`` saved), strict: every tensor is set, a tied one (Deformable DETR shares its
    class / box heads across decoder layers) through any of its names."""
    from safetensors.torch import load_file

    path = Path(str(weights)).expanduser()
    if not path.is_file() or path.suffix != ".safetensors":
        raise FileNotFoundError(f"model weights {path} do not exist or are not a .safetensors state dict; set "
                                "model.net.weights to one, or model.net.pretrained to a hub name / local folder")
    state = load_file(str(path))
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    own = adapter.state_dict()
    loaded = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) for k, t in own.items()
              if k in state}
    missing = [k for k in missing  # a name of a tensor tied to one the file set is not missing
               if (own[k].untyped_storage().data_ptr(), own[k].storage_offset(), tuple(own[k].shape)) not in loaded]
    if missing or unexpected:
        raise ValueError(f"weights {path} do not fit {type(adapter).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def plain(value: Any) -> Any:
    """``value`` with every mapping / list made a plain ``dict`` / ``list`` (transformers' strict configs reject
    the container types a config system hands in)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


def seeded_init(seed: int, build):
    """``build()`` with the global RNG forked and seeded (the random init is a function of ``seed`` only)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


class DeformableDETRDetector(DetectorAdapter):
    """Args: num_classes (ID classes; None with ``pretrained`` = the checkpoint's), pretrained (hub name / local
    folder, or None = random init from the arguments below), revision (hub revision of ``pretrained``), weights
    (a safetensors state dict of this adapter), d_model, num_queries, encoder_layers, decoder_layers, ffn_dim,
    attention_heads, num_feature_levels, n_points (encoder and decoder sampling points), backbone (a
    ``ResNetConfig`` mapping), seed (random init), extra (any other ``DeformableDetrConfig`` field)."""

    def __init__(self, num_classes: int | None = 91, pretrained: str | None = None, revision: str | None = None,
                 weights: str | None = None, d_model: int = 64, num_queries: int = 50, encoder_layers: int = 1,
                 decoder_layers: int = 2, ffn_dim: int = 128, attention_heads: int = 4, num_feature_levels: int = 3,
                 n_points: int = 2, backbone: Mapping[str, Any] | None = None, seed: int = 0,
                 extra: Mapping[str, Any] | None = None):
        super().__init__()
        from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

        if pretrained:
            self.model = DeformableDetrForObjectDetection.from_pretrained(str(pretrained), revision=revision,
                                                                          trust_remote_code=False)
            labels = int(self.model.config.num_labels)
            if num_classes is not None and int(num_classes) != labels:
                raise ValueError(f"model.net.pretrained={pretrained} predicts {labels} classes, the dataset has "
                                 f"{num_classes}: use a checkpoint trained on the ID classes, or set "
                                 "model.net.num_classes=null to take the checkpoint's labels")
            self.num_classes = labels
        else:
            if num_classes is None:
                raise ValueError("DeformableDETRDetector needs num_classes without a pretrained checkpoint")
            if int(decoder_layers) < 1 or int(d_model) % 32:
                raise ValueError("Deformable DETR needs decoder_layers >= 1 and d_model a multiple of 32 (its "
                                 f"input projections use GroupNorm(32)); got {decoder_layers}, {d_model}")
            bb = {**DEFAULT_BACKBONE, **plain(backbone or {})}
            n_stages = len(bb["hidden_sizes"])
            bb.setdefault("out_features", [f"stage{k}" for k in range(max(2, n_stages - 2), n_stages + 1)]
                          if int(num_feature_levels) > 1 else [f"stage{n_stages}"])
            config = DeformableDetrConfig(
                backbone_config=ResNetConfig(**bb), use_timm_backbone=False, use_pretrained_backbone=False,
                num_labels=int(num_classes), d_model=int(d_model), num_queries=int(num_queries),
                encoder_layers=int(encoder_layers), decoder_layers=int(decoder_layers),
                encoder_ffn_dim=int(ffn_dim), decoder_ffn_dim=int(ffn_dim),
                encoder_attention_heads=int(attention_heads), decoder_attention_heads=int(attention_heads),
                num_feature_levels=int(num_feature_levels), encoder_n_points=int(n_points),
                decoder_n_points=int(n_points), **plain(extra or {}))
            self.model = seeded_init(seed, lambda: DeformableDetrForObjectDetection(config))
            self.num_classes = int(num_classes)
        if weights:
            load_adapter_weights(self, weights)
        self.model.eval()

    def forward(self, x: torch.Tensor):
        mask = torch.ones((x.shape[0], *x.shape[-2:]), dtype=torch.long, device=x.device)
        return self.model(pixel_values=x, pixel_mask=mask)

    @torch.inference_mode()
    def detect(self, x: torch.Tensor, conf: float = 0.25, iou: float = 0.7, max_det: int = 100) -> Detections:
        out = self(x)
        h, w = x.shape[-2:]
        return keep_best_queries(cxcywh_to_xyxy(out.pred_boxes.float(), w, h), out.logits, conf, max_det,
                                 out.intermediate_hidden_states[:, -1])

    def box_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last decoder layer's class head: ``logits = class_embed[L - 1](last decoder state)``, the features
        of :meth:`detect`."""
        head = self.model.class_embed[self.model.config.decoder_layers - 1]
        return head.weight, head.bias
