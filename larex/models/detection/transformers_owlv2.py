"""transformers' OWLv2 (``Owlv2ForObjectDetection``, open-vocabulary detection) behind the :class:`DetectorAdapter`
contract, its text queries = the ID class names.

Two ways to build it:

* ``pretrained`` = a hub name or a local folder (``google/owlv2-base-patch16-ensemble``): ``from_pretrained``
  (never ``trust_remote_code``), the queries tokenized by the checkpoint's own tokenizer (``padding=max_length``,
  as ``Owlv2Processor`` does). Give it inputs as it was trained on: CLIP ``dataset.mean`` / ``std``, square inputs
  padded at the bottom / right (``task.input.resize=pad_end``), ``dataset.image_size`` = the vision config's (960
  for the base models; other sizes interpolate the position embeddings).
* ``pretrained: null``: a random-init model from a small ``Owlv2Config`` (tiny text and vision towers, the vision
  ``image_size`` = the input size), drawn from ``seed`` without touching the global RNG. There is no tokenizer
  offline, so the queries are tokenized by :func:`byte_tokens` (deterministic: ``<bos> bytes <eos> <pad>...``
  into the config's vocabulary). ``weights`` (a safetensors state dict of this adapter) replaces the random weights.

``forward(x)`` is ``Owlv2ForObjectDetection.forward`` (image-text embedder, class / box / objectness heads, same
outputs) with one hook point added: the vision tower's patch tokens [B, P, D] (its last hidden state without the
class token) reshaped to the patch grid [B, D, H/p, W/p] pass through ``patch_map`` (an identity), so hooking
``patch_map`` gives one map that covers the input and runs once per forward (the default hooked layer, with a
DropBlock inserted after it). The text tower runs once per forward on the Q queries (not once per image) and
after the vision tower, so an MC pass that stops at the hooked layer skips it. When the MC layer repeats its input
S times (``share_prefix``), the class token is repeated to match, so the heads also run on the S-fold batch.

:meth:`OWLv2Detector.detect` decodes as ``post_process_object_detection`` does: per patch, sigmoid of the
query logits [B, P, Q]; the patches whose best query score > ``conf``; boxes = ``pred_boxes`` (normalized cxcywh)
times the input size, xyxy input pixels; then (``nms``, default) class-aware NMS at ``iou`` (OWL-ViT's per-class
NMS) and the ``max_det`` best per image (:func:`~larex.models.detection.base.select_detections`); logits = the
kept patches' query-logit rows.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from larex.models.detection.base import Detections, DetectorAdapter, keep_best_queries, select_detections
from larex.models.detection.transformers_detr import cxcywh_to_xyxy, load_adapter_weights, plain, seeded_init

BYTE_OFFSET = 1  # token id of byte b = b + 1; 0 = padding


def byte_tokens(queries: Sequence[str], vocab_size: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic offline tokenization: ``<bos> utf-8 bytes <eos>`` padded with 0 to ``max_length``.

    Byte ``b`` is token ``b + 1``; ``<bos>`` = ``vocab_size - 2`` (non-zero: OWL's query mask is
    ``input_ids[:, 0] > 0``); ``<eos>`` = ``vocab_size - 1``, the highest id, since OWL / CLIP pool the text at
    ``argmax(input_ids)``. Strings longer than ``max_length - 2`` bytes are truncated (eos kept). Returns
    ``input_ids`` and ``attention_mask`` [Q, max_length] (int64)."""
    if int(vocab_size) < 256 + BYTE_OFFSET + 2:
        raise ValueError(f"byte_tokens needs a text vocabulary of >= {256 + BYTE_OFFSET + 2} ids; got {vocab_size}")
    if int(max_length) < 3:
        raise ValueError(f"byte_tokens needs max_length >= 3; got {max_length}")
    bos, eos = int(vocab_size) - 2, int(vocab_size) - 1
    ids = torch.zeros((len(queries), int(max_length)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for q, text in enumerate(queries):
        row = [bos, *(b + BYTE_OFFSET for b in str(text).encode("utf-8")[:int(max_length) - 2]), eos]
        ids[q, :len(row)] = torch.tensor(row)
        mask[q, :len(row)] = 1
    return ids, mask


def rescale_heads(model: nn.Module) -> nn.Module:
    """Re-draw the detection heads of a random-init ``Owlv2ForObjectDetection`` at a trainable scale.

    transformers draws their linear layers with std = ``initializer_factor`` (1.0: the heads are only ever loaded
    from a checkpoint), which saturates every box sigmoid and drives ``elu(logit_scale) + 1`` to 0, so a random
    network gives the same box and a zero logit everywhere. Here: hidden layers LeCun-normal (std
    ``fan_in ** -0.5``), output layers (``dense2``, ``logit_shift``, ``logit_scale``) std 0.02 (the towers'
    ``initializer_range``), biases 0: boxes start at their patch cell (the box bias) and logits are the query
    similarities, as in a network at the start of training."""
    for head in (model.class_head, model.box_head, model.objectness_head):
        for name, lin in head.named_modules():
            if isinstance(lin, nn.Linear):
                last = name in ("dense2", "logit_shift", "logit_scale")
                nn.init.normal_(lin.weight, std=0.02 if last else lin.in_features ** -0.5)
                nn.init.zeros_(lin.bias)
    return model


class OWLv2Detector(DetectorAdapter):
    """Args: num_classes (ID classes = number of queries), queries (the class names; default ``class_0``...),
    prompt (template of a query, ``{}`` = the class name, e.g. ``"a photo of a {}"``), pretrained (hub name / local
    folder, or None = random init from the arguments below), revision, weights (a safetensors state dict of this
    adapter), image_size (random init: the vision input size), patch_size, hidden_size (both towers), layers,
    heads, vocab_size, text_length (text positions; queries are padded to it), projection_dim, seed, nms (class-aware
    NMS in :meth:`detect`), extra_text / extra_vision (any other text / vision config field)."""

    def __init__(self, num_classes: int = 3, queries: Sequence[str] | None = None, prompt: str = "{}",
                 pretrained: str | None = None, revision: str | None = None, weights: str | None = None,
                 image_size: int = 160, patch_size: int = 16, hidden_size: int = 64, layers: int = 2,
                 heads: int = 4, vocab_size: int = 512, text_length: int = 16, projection_dim: int = 64,
                 seed: int = 0, nms: bool = True, extra_text: Mapping[str, Any] | None = None,
                 extra_vision: Mapping[str, Any] | None = None):
        super().__init__()
        from transformers import Owlv2Config, Owlv2ForObjectDetection

        names = [str(q) for q in queries] if queries is not None else [f"class_{k}" for k in range(int(num_classes))]
        if len(names) != int(num_classes):
            raise ValueError(f"OWLv2Detector has {len(names)} queries {names} for num_classes={num_classes}: give "
                             "one query per ID class (model.net.queries, default ${dataset.classes})")
        self.num_classes, self.nms = int(num_classes), bool(nms)
        self.queries = [str(prompt).format(n) for n in names]
        if pretrained:
            from transformers import AutoTokenizer

            self.model = Owlv2ForObjectDetection.from_pretrained(str(pretrained), revision=revision,
                                                                 trust_remote_code=False)
            tok = AutoTokenizer.from_pretrained(str(pretrained), revision=revision, trust_remote_code=False)
            enc = tok(self.queries, padding="max_length", truncation=True, return_tensors="pt",
                      max_length=int(self.model.config.text_config.max_position_embeddings))
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:
            text = {"hidden_size": int(hidden_size), "intermediate_size": 4 * int(hidden_size),
                    "num_hidden_layers": int(layers), "num_attention_heads": int(heads),
                    "vocab_size": int(vocab_size), "max_position_embeddings": int(text_length), "pad_token_id": 0,
                    "bos_token_id": int(vocab_size) - 2, "eos_token_id": int(vocab_size) - 1,
                    **plain(extra_text or {})}
            vision = {"hidden_size": int(hidden_size), "intermediate_size": 4 * int(hidden_size),
                      "num_hidden_layers": int(layers), "num_attention_heads": int(heads),
                      "image_size": int(image_size), "patch_size": int(patch_size), **plain(extra_vision or {})}
            config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=int(projection_dim))
            self.model = seeded_init(seed, lambda: rescale_heads(Owlv2ForObjectDetection(config)))
            ids, mask = byte_tokens(self.queries, int(vocab_size), int(text_length))
        self.register_buffer("input_ids", ids.to(torch.long), persistent=False)
        self.register_buffer("attention_mask", mask.to(torch.long), persistent=False)
        self.patch_map = nn.Identity()  # the hook point: patch tokens as a map [B, D, H/p, W/p]
        if weights:
            load_adapter_weights(self, weights)
        self.model.eval()

    # ------------------------------------------------------------------ network
    def query_embeds(self) -> torch.Tensor:
        """The Q text query embeddings [Q, projection_dim], L2-normalized (as ``Owlv2Model`` returns them)."""
        t = self.model.owlv2.get_text_features(input_ids=self.input_ids, attention_mask=self.attention_mask)
        t = t.pooler_output if hasattr(t, "pooler_output") else t
        return t / torch.linalg.norm(t, ord=2, dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor):
        from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

        det, vcfg = self.model, self.model.config.vision_config
        h, w = x.shape[-2:]
        gh, gw = h // vcfg.patch_size, w // vcfg.patch_size
        size = vcfg.image_size if isinstance(vcfg.image_size, (tuple, list)) else (vcfg.image_size,) * 2
        interpolate = (int(h), int(w)) != tuple(int(v) for v in size)
        vision = det.owlv2.vision_model(pixel_values=x, interpolate_pos_encoding=interpolate)
        hidden = vision.last_hidden_state  # [B, 1 + P, D]
        b, _, d = hidden.shape
        fmap = self.patch_map(hidden[:, 1:].transpose(1, 2).reshape(b, d, gh, gw))
        cls = hidden[:, :1]
        if fmap.shape[0] != b:  # the MC layer repeated its input S times (rows b*S + s)
            cls = cls.repeat_interleave(fmap.shape[0] // b, dim=0)
        hidden = torch.cat([cls, fmap.flatten(2).transpose(1, 2)], dim=1)
        # Owlv2ForObjectDetection.image_text_embedder from here on
        image_embeds = det.owlv2.vision_model.post_layernorm(hidden)
        image_embeds = det.layer_norm(image_embeds[:, 1:] * image_embeds[:, :1])
        n = image_embeds.shape[0]
        feature_map = image_embeds.reshape(n, gh, gw, d)
        image_feats = image_embeds  # [n, P, D]
        q = self.query_embeds()
        query_embeds = q[None].expand(n, *q.shape)
        query_mask = (self.input_ids[:, 0] > 0)[None].expand(n, -1)
        pred_logits, class_embeds = det.class_predictor(image_feats, query_embeds, query_mask)
        objectness = det.objectness_predictor(image_feats)
        pred_boxes = det.box_predictor(image_feats, feature_map, interpolate)
        return Owlv2ObjectDetectionOutput(logits=pred_logits, pred_boxes=pred_boxes, objectness_logits=objectness,
                                          image_embeds=feature_map, text_embeds=query_embeds,
                                          class_embeds=class_embeds, vision_model_output=vision)

    # ------------------------------------------------------------------ detections
    @torch.inference_mode()
    def detect(self, x: torch.Tensor, conf: float = 0.25, iou: float = 0.7, max_det: int = 100) -> Detections:
        out = self(x)
        h, w = x.shape[-2:]
        boxes = cxcywh_to_xyxy(out.pred_boxes.float(), w, h)
        logits = out.logits.float()
        if not self.nms:
            return keep_best_queries(boxes, logits, conf, max_det)
        return select_detections(boxes, logits.sigmoid(), logits, conf, iou, max_det)
