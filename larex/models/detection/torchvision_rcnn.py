"""torchvision Faster R-CNN (ResNet-50-FPN, MobileNetV3-Large-FPN) behind the :class:`DetectorAdapter` contract.

Built with ``torchvision.models.detection.fasterrcnn_resnet50_fpn`` / ``fasterrcnn_mobilenet_v3_large_fpn``
(``weights=None, weights_backbone=None``: offline, random init) with ``num_classes + 1`` outputs (torchvision's
class 0 is the background; larex labels are the ID classes 0..C-1), then loaded from ``weights``:

* ``None``: random init (tests calibrate BatchNorm, see ``tests/_detection_rcnn.py``);
* a path: a larex ``.safetensors`` state dict (keys with or without the adapter's ``model.`` prefix), or a
  torchvision ``.pth`` / ``.pt`` state dict, read with ``torch.load(weights_only=True)`` (tensors only, no code);
* ``"DEFAULT"`` or a torchvision weights name (``"COCO_V1"``, ``"FasterRCNN_ResNet50_FPN_Weights.COCO_V1"``):
  torchvision's own pretrained weights, downloaded by torchvision (internet, or its cache). COCO weights have
  91 outputs, so ``num_classes`` must be 90 (``dataset.num_classes``), and they expect ImageNet-normalized
  inputs: set ``dataset.mean=[0.485,0.456,0.406] dataset.std=[0.229,0.224,0.225]``.

Inputs and the transform. larex's detection task letterboxes every image to ``dataset.image_size`` and normalizes
it by ``dataset.mean`` / ``dataset.std``, so :meth:`TorchvisionFasterRCNN.forward` and :meth:`detect` run the
network on ``x`` as given and never call torchvision's ``GeneralizedRCNNTransform`` (no second normalization, no
resize to an 800-px short side, no padding): ``backbone(x)``, then ``rpn``, then ``roi_heads``' RoI pool, box head
and box predictor, step by step (the steps of ``GeneralizedRCNN.forward``). Boxes are therefore in the input frame
without any rescaling, and a hooked backbone map covers the whole input. The input sides must be multiples of
32 (torchvision's ``size_divisible``; the FPN strides), else a ValueError says so. ``model.transform`` is
still configured identity-like (``image_mean=0``, ``image_std=1``, ``min_size`` / ``max_size``) for anyone who
calls the torchvision model directly on a list of images: with ``min_size = min(H, W)`` and ``max_size = max(H,
W)`` of fixed-size inputs it leaves them unchanged, and ``model.model(list(x))`` then gives exactly the boxes,
scores and labels of ``detect(x)`` (tests/test_detection_faster_rcnn.py).

Post-processing (:meth:`detect`) is torchvision's ``RoIHeads.postprocess_detections`` re-implemented over the
whole batch at once, keeping for every kept box the proposal it came from, so that its class logits can be
returned (torchvision drops them): softmax scores, per-class boxes decoded by the box coder and clipped to the
input, background dropped, every (proposal, class) pair a candidate, score > ``conf``, boxes smaller than 0.01 px
removed, class-aware NMS per image at ``iou``, the ``max_det`` best per image. ``logits`` [K, C] are the box
predictor's ``cls_score`` logits of the box's proposal without the background column (softmax over the C + 1
logits, background included, gives the box's score at its label).

Hooked layers: the Boxes producer and the image-level MC latents need one module that runs once per forward and
returns a map [B, C, h, w] over the whole input: ``model.backbone.body.layer4`` (ResNet-50, 2048 channels,
stride 32) or ``model.backbone.body.16`` (MobileNetV3-Large's last conv, 960 channels, stride 32). Modules of the
RPN head run once per FPN level; the FPN (``model.backbone.fpn``) returns a dict of levels (see the hooked-layer
configs).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from larex.models.detection.base import Detections, DetectorAdapter, top_per_image

BACKBONES = {"resnet50_fpn": "fasterrcnn_resnet50_fpn", "mobilenet_v3_large_fpn": "fasterrcnn_mobilenet_v3_large_fpn"}
WEIGHT_ENUMS = {"resnet50_fpn": "FasterRCNN_ResNet50_FPN_Weights",
                "mobilenet_v3_large_fpn": "FasterRCNN_MobileNet_V3_Large_FPN_Weights"}
SIZE_DIVISIBLE = 32
MIN_BOX_SIZE = 1e-2  # torchvision's remove_small_boxes threshold in postprocess_detections


def _is_path(weights: str) -> bool:
    return Path(weights).suffix in (".safetensors", ".pth", ".pt") or "/" in weights or Path(weights).exists()


def torchvision_weights(backbone: str, name: str):
    """The torchvision weights enum member of ``name`` (``DEFAULT``, ``COCO_V1`` or ``Enum.MEMBER``)."""
    from torchvision.models import detection

    enum = getattr(detection, WEIGHT_ENUMS[backbone])
    member = name.split(".")[-1]
    if "." in name and name.split(".")[0] != enum.__name__:
        raise ValueError(f"weights {name!r} are not {enum.__name__} weights (backbone={backbone!r})")
    try:
        return enum[member] if member != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ValueError(f"weights {name!r} unknown for backbone {backbone!r}: use a .safetensors/.pth path, "
                         f"DEFAULT or one of {[w.name for w in enum]}") from None


class TorchvisionFasterRCNN(DetectorAdapter):
    """Args: backbone (``resnet50_fpn`` | ``mobilenet_v3_large_fpn``), num_classes (ID classes, without the
    background), weights (None = random init; a .safetensors / .pth state dict path; ``DEFAULT`` or a torchvision
    weights name, downloaded), min_size / max_size (torchvision's transform, used only when the torchvision model
    is called directly; larex never resizes, see the module docstring), rpn_pre_nms_top_n_test /
    rpn_post_nms_top_n_test (proposals per image at inference), rpn_score_thresh (None = torchvision's default for
    the backbone), box_score_thresh / box_nms_thresh / box_detections_per_img (torchvision's own
    post-processing, again only for direct calls; :meth:`detect` takes ``conf`` / ``iou`` / ``max_det``)."""

    def __init__(self, backbone: str = "resnet50_fpn", num_classes: int = 90, weights: str | None = None,
                 min_size: int = 800, max_size: int = 1333, rpn_pre_nms_top_n_test: int = 1000,
                 rpn_post_nms_top_n_test: int = 1000, rpn_score_thresh: float | None = None,
                 box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5, box_detections_per_img: int = 100):
        super().__init__()
        from torchvision.models import detection

        if backbone not in BACKBONES:
            raise ValueError(f"TorchvisionFasterRCNN backbone={backbone!r} is unknown; use one of {list(BACKBONES)}")
        self.backbone_name, self.num_classes = str(backbone), int(num_classes)
        weights = None if weights in (None, "", "null", "none", "None") else str(weights)
        hub = torchvision_weights(backbone, weights) if weights and not _is_path(weights) else None
        kwargs = dict(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], min_size=int(min_size),
                      max_size=int(max_size), rpn_pre_nms_top_n_test=int(rpn_pre_nms_top_n_test),
                      rpn_post_nms_top_n_test=int(rpn_post_nms_top_n_test), box_score_thresh=float(box_score_thresh),
                      box_nms_thresh=float(box_nms_thresh), box_detections_per_img=int(box_detections_per_img))
        if rpn_score_thresh is not None:
            kwargs["rpn_score_thresh"] = float(rpn_score_thresh)
        build = getattr(detection, BACKBONES[backbone])
        try:
            self.model = build(weights=hub, weights_backbone=None, num_classes=self.num_classes + 1, **kwargs)
        except ValueError as err:  # torchvision: num_classes does not fit the pretrained weights
            raise ValueError(f"torchvision weights {weights!r}: {err} (larex num_classes = outputs - 1, without the "
                             "background: set dataset.num_classes accordingly)") from err
        if weights and hub is None:
            self.load_weights(weights)

    def load_weights(self, weights: str) -> None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model weights {path} do not exist; set model.net.weights to a .safetensors "
                                    "(or torchvision .pth) state dict, DEFAULT, or null for random init")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # tensors only: weights_only refuses pickled code
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            state = state.get("model", state) if isinstance(state, dict) else state
        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches (another number of classes)
            raise ValueError(f"weights {path} do not fit Faster R-CNN {self.backbone_name} with "
                             f"{self.num_classes} + 1 classes: {err}") from err
        # torchvision's pretrained state dicts come from FrozenBatchNorm2d (no num_batches_tracked)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"weights {path} do not fit Faster R-CNN {self.backbone_name} with {self.num_classes} "
                             f"+ 1 classes: missing {missing[:5]}, unexpected {unexpected[:5]}")

    # ------------------------------------------------------------------ network
    def forward(self, x: torch.Tensor) -> dict:
        """The network on ``x`` [B, 3, H, W] (already letterboxed and normalized; no transform): ``class_logits``
        [P, C + 1] and ``box_regression`` [P, 4 (C + 1)] of all P proposals of the batch, ``proposals`` (list
        of [P_b, 4] per image, input frame), ``box_features`` [P, 1024] (the box head's output, the box
        predictor's input). Every backbone module runs once."""
        from torchvision.models.detection.image_list import ImageList

        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Faster R-CNN takes inputs [B, 3, H, W]; got {tuple(x.shape)}")
        h, w = (int(v) for v in x.shape[-2:])
        if h % SIZE_DIVISIBLE or w % SIZE_DIVISIBLE:
            raise ValueError(f"Faster R-CNN inputs must have sides that are multiples of {SIZE_DIVISIBLE} (the FPN "
                             f"strides; larex does not pad them); got {h}x{w}: set dataset.image_size")
        net = self.model
        images = ImageList(x, [(h, w)] * x.shape[0])
        features = net.backbone(x)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = net.rpn(images, features)
        heads = net.roi_heads
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, images.image_sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        return {"class_logits": class_logits, "box_regression": box_regression, "proposals": proposals,
                "box_features": box_features}

    @torch.inference_mode()
    def detect(self, x: torch.Tensor, conf: float = 0.05, iou: float = 0.5, max_det: int = 100) -> Detections:
        from torch.nn import functional as F
        from torchvision.ops import boxes as box_ops

        out = self(x)
        logits, regression, proposals = out["class_logits"], out["box_regression"], out["proposals"]
        b, c1 = x.shape[0], logits.shape[-1]
        c = c1 - 1
        counts = torch.as_tensor([len(p) for p in proposals], device=logits.device)
        prop_image = torch.repeat_interleave(torch.arange(b, device=logits.device), counts)  # [P]
        boxes = self.model.roi_heads.box_coder.decode(regression, proposals)  # [P, C + 1, 4]
        boxes = box_ops.clip_boxes_to_image(boxes, tuple(x.shape[-2:]))[:, 1:].reshape(-1, 4)
        scores = F.softmax(logits, -1)[:, 1:].reshape(-1)  # candidate (p, k) is row p * C + k
        cand = torch.arange(scores.shape[0], device=logits.device)
        keep = cand[scores > conf]
        keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=MIN_BOX_SIZE)]
        prop, label = keep // c, keep % c
        img = prop_image[prop]
        kept = box_ops.batched_nms(boxes[keep], scores[keep], img * c + label, float(iou))
        kept = kept[top_per_image(img[kept], scores[keep][kept], int(max_det))]
        keep, prop = keep[kept], prop[kept]
        return Detections(img[kept], boxes[keep].float(), scores[keep].float(), label[kept],
                          logits[prop, 1:].float(), out["box_features"][prop].float())

    def box_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The box predictor's ``cls_score`` without the background row: ``Detections.logits = features @ W.T +
        b`` (features = the box head's 1024-d output of the box's proposal)."""
        cls = self.model.roi_heads.box_predictor.cls_score
        return cls.weight[1:], cls.bias[1:]
