"""Ultralytics detectors (YOLOv8 family and RT-DETR) behind the :class:`DetectorAdapter` contract.

The network is built from its YAML (``yolov8n.yaml``, ``rtdetr-l.yaml``; offline, random init) with ``nc`` =
the ID classes, then loaded from ``weights``: a larex safetensors state dict (what ``larex-train`` writes), or an
ultralytics ``.pt`` checkpoint, which goes through ultralytics' own loader -- that file is unpickled, so it must
come from a source you trust. ``forward`` is the raw ``DetectionModel`` (hook ``model.model.9`` = YOLOv8's SPPF,
``model.model.11`` = RT-DETR's AIFI encoder); :meth:`UltralyticsDetector.detect` decodes it:

* YOLO (anchor-free head, ``[B, 4 + C, A]`` decoded xywh + sigmoid scores, raw class logits in the head's
  ``scores``): best class score > ``conf``, class-aware NMS at ``iou``, ``max_det`` per image -- ultralytics'
  ``non_max_suppression`` for one label per box.
* RT-DETR (the last decoder layer's ``[B, Q, 4]`` normalized xywh and ``[B, Q, C]`` class logits, no NMS): the
  queries whose best sigmoid score > ``conf``, the ``max_det`` best per image; their features are that decoder
  layer's outputs, the input of its linear score head (:meth:`UltralyticsDetector.box_head`).

Set ``YOLO_OFFLINE=1`` and a temporary ``YOLO_CONFIG_DIR`` where nothing may be downloaded (tests do).
"""
from __future__ import annotations

import contextlib
import io as _io
from pathlib import Path

import torch
from torch import nn

from larex.models.detection.base import Detections, DetectorAdapter, keep_best_queries, select_detections

FAMILIES = ("yolo", "rtdetr")


def _xywh2xyxy(b: torch.Tensor) -> torch.Tensor:
    xy, wh = b[..., :2], b[..., 2:4] / 2
    return torch.cat([xy - wh, xy + wh], dim=-1)


def build_ultralytics(config: str, num_classes: int) -> nn.Module:
    """The ultralytics ``DetectionModel`` / ``RTDETRDetectionModel`` of a model YAML, random init, ``nc`` classes."""
    from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel

    cls = RTDETRDetectionModel if "rtdetr" in Path(str(config)).name.lower() else DetectionModel
    with contextlib.redirect_stdout(_io.StringIO()):  # no model summary / "Overriding nc" chatter
        return cls(str(config), ch=3, nc=int(num_classes), verbose=False)


class UltralyticsDetector(DetectorAdapter):
    """Args: config (model YAML, e.g. ``yolov8n.yaml``), num_classes, weights (None = random init; a safetensors
    state dict or a trusted ultralytics ``.pt``), family (``yolo`` | ``rtdetr``; default from the YAML name)."""

    trainable = True

    def __init__(self, config: str = "yolov8n.yaml", num_classes: int = 80, weights: str | None = None,
                 family: str | None = None):
        super().__init__()
        family = family or ("rtdetr" if "rtdetr" in Path(str(config)).name.lower() else "yolo")
        if family not in FAMILIES:
            raise ValueError(f"UltralyticsDetector family={family!r} is unknown; use one of {FAMILIES}")
        self.config, self.family, self.num_classes = str(config), family, int(num_classes)
        self.model = build_ultralytics(config, num_classes)
        if weights:
            self.load_weights(weights)

    def load_weights(self, weights: str) -> None:
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model weights {path} do not exist; set model.net.weights to a .safetensors "
                                    "state dict or a (trusted) ultralytics .pt checkpoint")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
            state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
        else:  # a third-party checkpoint: ultralytics' own loader (it unpickles; the file must be trusted)
            from ultralytics.nn.tasks import load_checkpoint

            state = load_checkpoint(str(path))[0].float().state_dict()
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights {path} do not fit {self.config} with {self.num_classes} classes: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")

    def forward(self, x: torch.Tensor):
        return self.model(x)

    def _decoder_layer(self) -> nn.Module:
        """RT-DETR: the decoder layer whose boxes and classes inference returns (``eval_idx``)."""
        decoder = self.model.model[-1].decoder
        return decoder.layers[decoder.eval_idx]

    def box_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """RT-DETR: the evaluated decoder layer's score head (``dec_score_head[eval_idx]``), whose input is the
        features of :meth:`detect`. YOLO's class head is a separate 1x1 conv per level, not one linear head."""
        if self.family != "rtdetr":
            return super().box_head()
        head = self.model.model[-1]
        linear = head.dec_score_head[head.decoder.eval_idx]
        return linear.weight, linear.bias

    def train_detector(self, fit, val, settings: dict, device: torch.device, workdir) -> dict:
        """Train with ultralytics' own trainer from this adapter's YAML (random init) on ``fit``, validating on
        ``val``; the trained weights replace this adapter's. ``settings``: epochs, batch_size, image_size, lr0,
        seed (+ any ultralytics train argument under ``extra``). Offline: no plots, no AMP check, no workers."""
        from ultralytics import RTDETR, YOLO

        workdir = Path(workdir)
        names = list(settings.get("names") or [str(k) for k in range(self.num_classes)])
        data = write_yolo_dataset({"train": fit, "val": val}, workdir / "data", names)
        cls = RTDETR if self.family == "rtdetr" else YOLO
        with contextlib.redirect_stdout(_io.StringIO()):
            model = cls(self.config)
        args = dict(data=str(data), epochs=int(settings.get("epochs", 10)), imgsz=int(settings["image_size"]),
                    batch=int(settings.get("batch_size", 16)), workers=0, plots=False, amp=False, val=True,
                    device="cpu" if device.type == "cpu" else (device.index or 0), project=str(workdir / "runs"),
                    name="train", exist_ok=True, seed=int(settings.get("seed", 0)), deterministic=True, verbose=False,
                    **({"lr0": float(settings["lr0"])} if settings.get("lr0") is not None else {}),
                    **dict(settings.get("extra") or {}))
        with _no_integrations():
            model.train(**args)
        self.model.load_state_dict(model.model.float().state_dict())
        metrics = getattr(model.trainer, "metrics", None) or {}
        return {"val_map50": float(metrics.get("metrics/mAP50(B)", float("nan"))),
                "val_map": float(metrics.get("metrics/mAP50-95(B)", float("nan")))}

    @torch.inference_mode()
    def detect(self, x: torch.Tensor, conf: float = 0.25, iou: float = 0.7, max_det: int = 100) -> Detections:
        if self.family == "rtdetr":
            # raw decoder outputs of the evaluated layer: boxes [B, Q, 4] normalized xywh, class logits [B, Q, C],
            # and that layer's output [B, Q, hd] (the class head's input), recorded by a hook
            layer = self._decoder_layer()
            seen: list[torch.Tensor] = []
            handle = layer.register_forward_hook(lambda module, args, output: seen.append(output))
            try:
                out = self.model(x)
            finally:
                handle.remove()
            dec_bboxes, dec_scores = out[1][0][-1], out[1][1][-1]
            h, w = x.shape[-2:]
            boxes = _xywh2xyxy(dec_bboxes) * dec_bboxes.new_tensor([w, h, w, h])
            return keep_best_queries(boxes, dec_scores, conf, max_det, seen[-1] if seen else None)
        out = self.model(x)
        y, raw = out if isinstance(out, (tuple, list)) else (out, None)
        y = y.transpose(1, 2)  # [B, A, 4 + C]
        probs = y[..., 4:]
        logits = raw["scores"].transpose(1, 2) if isinstance(raw, dict) and "scores" in raw \
            else torch.logit(probs.double(), eps=1e-12).float()
        return select_detections(_xywh2xyxy(y[..., :4]), probs, logits, conf, iou, max_det)


def write_yolo_dataset(splits: dict, root: Path, names: list[str]) -> Path:
    """Write detection datasets (``{"train": ds, "val": ds}``, items ``(image [3, H, W] in [0, 1], {"boxes",
    "labels"})``) as an ultralytics dataset under ``root`` (PNG images, one label file per image: ``class cx cy w
    h`` normalized); returns the ``data.yaml`` path. Objects labelled -1 (unknown) are left out."""
    import numpy as np
    from PIL import Image

    from larex.data.base import to_image_tensor

    root = Path(root)
    for part, ds in splits.items():
        (root / "images" / part).mkdir(parents=True, exist_ok=True)
        (root / "labels" / part).mkdir(parents=True, exist_ok=True)
        for i in range(len(ds)):
            image, target = ds[i]
            x = to_image_tensor(image)
            if x.shape[0] == 1:
                x = x.expand(3, -1, -1)
            h, w = x.shape[1:]
            arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr).save(root / "images" / part / f"{i:06d}.png")
            b = torch.as_tensor(target["boxes"], dtype=torch.float64).reshape(-1, 4)
            lab = torch.as_tensor(target["labels"]).reshape(-1)
            keep = lab >= 0
            b, lab = b[keep], lab[keep]
            cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                                  (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], 1)
            lines = [f"{int(c)} " + " ".join(f"{v:.6f}" for v in row) for c, row in zip(lab.tolist(), cxcywh.tolist())]
            (root / "labels" / part / f"{i:06d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    data = root / "data.yaml"
    data.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n"
                    + "".join(f"  {k}: {n}\n" for k, n in enumerate(names)))
    return data


@contextlib.contextmanager
def _no_integrations():
    """Ultralytics' trainer without its logger integrations (MLflow, TensorBoard, ...): larex tracks the run
    itself, and ultralytics' MLflow callback would log into whatever store its settings name."""
    from ultralytics.utils import callbacks

    original = callbacks.add_integration_callbacks
    callbacks.add_integration_callbacks = lambda instance: None
    try:
        yield
    finally:
        callbacks.add_integration_callbacks = original
