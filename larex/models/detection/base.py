"""The detector adapter contract, shared post-processing (class-aware NMS, top-k per image) and the insertion of
an MC layer (DropBlock / dropout) after a hooked layer.

An adapter is an ``nn.Module`` around one detector family whose ``forward(x)`` runs the network on a batch of
network inputs ``x`` [B, 3, H, W] (so hooks by dotted path work, ``model.model.9`` for YOLOv8's SPPF) and whose
:meth:`DetectorAdapter.detect` returns the kept detections of the batch as one flat :class:`Detections`, boxes in
the *input* frame (the Task maps them to the original image with each image's
:class:`~larex.tasks.detection.geometry.BoxTransform`). Vectorized over images: no Python loop per image.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import batched_nms


@dataclass
class Detections:
    """The kept detections of a batch, flat: row k is a box of image ``image_index[k]`` (0..B-1).

    ``boxes`` [K, 4] xyxy in input pixels, ``scores`` [K] (the detector's confidence), ``labels`` [K] (class
    index), ``logits`` [K, C] (per-class logits of the box: sigmoid logits for YOLO/DETR-style heads, softmax
    logits without the background for Faster R-CNN), ``features`` [K, F] or None: the input of the detector's
    linear class head for each box, so that ``logits = features @ W.T + b`` with ``(W, b) =``
    :meth:`DetectorAdapter.box_head` (Faster R-CNN's box-head output, a DETR query's last decoder state)."""

    image_index: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    features: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.image_index.shape[0])


def top_per_image(image_index: torch.Tensor, scores: torch.Tensor, max_det: int) -> torch.Tensor:
    """Indices of the ``max_det`` highest-scoring rows of every image, ordered by image then score (descending)."""
    if image_index.numel() == 0:
        return image_index.new_zeros(0, dtype=torch.long)
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(image_index[order], stable=True)]  # by image, score-descending within each
    img = image_index[order]
    first = torch.searchsorted(img, img, right=False)  # position of each image's first row (img is sorted)
    rank = torch.arange(len(img), device=img.device) - first
    return order[rank < max_det]


def select_detections(boxes: torch.Tensor, probs: torch.Tensor, logits: torch.Tensor, conf: float, iou: float,
                      max_det: int) -> Detections:
    """Class-aware NMS over a batch of candidates.

    Args:
        boxes: [B, A, 4] xyxy candidates in input pixels; probs: [B, A, C] class scores; logits: [B, A, C].
        conf: keep candidates whose best class score is > conf (``conf=0`` keeps every candidate).
        iou: NMS IoU threshold (per image and class); max_det: boxes kept per image.
    """
    b, a, c = probs.shape
    score, label = probs.max(-1)
    keep = score > conf
    img = torch.arange(b, device=boxes.device)[:, None].expand(b, a)[keep]
    bx, sc, lb, lg = boxes[keep], score[keep], label[keep], logits[keep]
    kept = batched_nms(bx.float(), sc.float(), img * c + lb, float(iou))
    kept = kept[top_per_image(img[kept], sc[kept], int(max_det))]
    return Detections(img[kept], bx[kept].float(), sc[kept].float(), lb[kept], lg[kept].float())


def keep_best_queries(boxes: torch.Tensor, logits: torch.Tensor, conf: float, max_det: int,
                      features: torch.Tensor | None = None) -> Detections:
    """Set-prediction decoding (no NMS): boxes [B, Q, 4] xyxy input pixels, sigmoid class logits [B, Q, C]; the
    queries whose best sigmoid score > ``conf``, the ``max_det`` best per image. ``features`` [B, Q, F]: the
    class head's input per query, kept with the boxes."""
    logits = logits.float()
    score, label = logits.sigmoid().max(-1)
    keep = score > conf
    img = torch.arange(logits.shape[0], device=logits.device)[:, None].expand_as(score)[keep]
    sel = top_per_image(img, score[keep], int(max_det))
    return Detections(img[sel], boxes[keep][sel].float(), score[keep][sel], label[keep][sel], logits[keep][sel],
                      None if features is None else features[keep][sel].float())


HEAD_METHODS = "vim, react, ash, dice, ..."


class NoBoxHead(ValueError):
    """The detector has no single linear class head over per-box features."""


class DetectorAdapter(nn.Module, ABC):
    """Base class of the detector adapters (see the module docstring).

    Subclasses set ``num_classes`` and implement :meth:`forward` (the raw network, for hooks and MC passes) and
    :meth:`detect`. :meth:`train_detector` trains the wrapped network where the family has a trainer larex
    drives (ultralytics); the others are used with given weights."""

    num_classes: int
    trainable: bool = False
    """True where :meth:`train_detector` trains the family (checked before any data is built)."""

    @abstractmethod
    def forward(self, x: torch.Tensor):
        """The raw network output for inputs ``x`` [B, 3, H, W]."""

    @abstractmethod
    def detect(self, x: torch.Tensor, conf: float = 0.25, iou: float = 0.7, max_det: int = 100) -> Detections:
        """One deterministic forward of ``x`` and the kept detections (eval mode, no gradients)."""

    def box_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W [C, F], b [C])``: the linear class head whose input is :attr:`Detections.features`, ``logits =
        features @ W.T + b`` (rows = the C classes of ``logits``). Families without one raise :class:`NoBoxHead`,
        so methods that read a head (``head.weight``) are refused before any compute."""
        raise NoBoxHead(f"{type(self).__name__} has no single linear class head over per-box features, so "
                        f"box-level methods that read a head ({HEAD_METHODS}) cannot run on it; use methods on "
                        "the RoI features and logits (mahalanobis, knn, energy, ...) or a family with one "
                        "(faster_rcnn, rtdetr, deformable_detr)")

    def check_trainable(self) -> None:
        """A ValueError naming the fix where larex has no trainer for this family (before any data is built)."""
        if self.trainable:
            return
        raise ValueError(f"{type(self).__name__} has no larex trainer (only the ultralytics families train): set "
                         "model.train=null and give its weights (model.net.weights=PATH or a hub name, or "
                         "train.checkpoint=PATH)")

    def train_detector(self, fit, val, settings: dict, device: torch.device, workdir) -> dict:
        """Train on ``fit`` / ``val`` (the trainable families override it)."""
        self.check_trainable()
        raise TypeError(f"{type(self).__name__} sets trainable=True but does not override train_detector")


# -------------------------------------------------------------------------------------------------------- MC layer
class WithMCLayer(nn.Module):
    """``mc(inner(x))``: an MC layer inserted after a hooked module. Keeps the attributes a parent reads off its
    children (ultralytics' ``f`` / ``i`` / ``type`` / ``np`` routing), so the network runs as before; in eval mode
    the MC layer is the identity, so deterministic outputs do not change."""

    def __init__(self, inner: nn.Module, mc: nn.Module):
        super().__init__()
        self.inner = inner
        self.mc = mc
        for attr in ("f", "i", "type", "np"):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))

    def forward(self, *args, **kwargs):
        return self.mc(self.inner(*args, **kwargs))


class PerLevelMC(nn.Module):
    """One MC layer per level of a mapping of maps (an FPN's ``{"0": [B, C, h, w], ...}``), applied in the
    mapping's order; returns a mapping of the same type. Each level gets its own masks (its own MC layer)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.levels = nn.ModuleList(layers)

    def forward(self, maps):
        if len(maps) != len(self.levels):
            raise ValueError(f"the hooked layer gives {len(maps)} levels; hooked_layer.insert.levels is "
                             f"{len(self.levels)}")
        return type(maps)((k, m(v)) for (k, v), m in zip(maps.items(), self.levels))


MC_LAYERS = ("dropblock", "dropout2d", "dropout")


def insert_mc_layer(model: nn.Module, path: str, kind: str = "dropblock", drop_prob: float = 0.5,
                    block_size: int = 3, levels: int | None = None) -> nn.Module:
    """Replace the module at ``path`` by :class:`WithMCLayer` (the module, then a ``kind`` layer) in place; the
    hooked layer keeps its path and its output is the MC layer's. ``levels``: the module returns a mapping of that
    many maps (an FPN), each followed by its own MC layer (:class:`PerLevelMC`). Returns ``model``."""
    from dropblock import DropBlock2D

    from larex.extraction.hooks import resolve_module

    if kind not in MC_LAYERS:
        raise ValueError(f"hooked_layer.insert.kind={kind!r} is unknown; use one of {MC_LAYERS}")
    inner = resolve_module(model, path)
    if isinstance(inner, WithMCLayer):
        return model
    make = {"dropblock": lambda: DropBlock2D(drop_prob=float(drop_prob), block_size=int(block_size)),
            "dropout2d": lambda: nn.Dropout2d(float(drop_prob)), "dropout": lambda: nn.Dropout(float(drop_prob))}[kind]
    mc = make() if levels is None else PerLevelMC([make() for _ in range(int(levels))])
    parent_path, _, name = path.rpartition(".")
    parent = resolve_module(model, parent_path)
    wrapped = WithMCLayer(inner, mc)
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and name.isdigit():
        parent[int(name)] = wrapped
    else:
        setattr(parent, name, wrapped)
    return model
