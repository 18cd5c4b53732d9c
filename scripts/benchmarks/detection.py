"""``detection/*`` rows: box-level LaREx extraction (the Boxes producer: one deterministic forward, RoIAlign of
every kept box over the hooked map and S = 16 DropBlock samples of the RoI grid) vs a plain deterministic
``detect`` of the same model on the same images -- goal: at most 1.3x its time; and image-level MC latents of the
hooked map with the shared prefix vs S full passes (same seed: the latents must agree). Random-init models from
their YAML / configs with ``predict_conf=0`` and ``max_det=100``: every image keeps 100 boxes, the worst case for
the RoI work. Box rows time the two calls alternately (median of 7 each)."""
from __future__ import annotations

import importlib

import torch

from benchmarks.common import MC_SAMPLES, Ctx, Row, alternating, error_row

BOX_GOAL = 1.3
MC_ERR_TOL = 1e-5


def _cases():
    """(name, builder of the adapter, hooked layer, input size, images)."""
    def yolo():
        from larex.models.detection.ultralytics import UltralyticsDetector

        return UltralyticsDetector("yolov8n.yaml", num_classes=3)

    def rcnn_mobilenet():
        mod = importlib.import_module("larex.models.detection.torchvision_rcnn")
        return mod.TorchvisionFasterRCNN("mobilenet_v3_large_fpn", num_classes=3, min_size=320, max_size=320)

    return [("yolov8n", yolo, "model.model.9", 160, 8),
            ("faster_rcnn_mobilenet", rcnn_mobilenet, "model.backbone.body.16", 320, 4)]


def detection_rows(ctx: Ctx) -> list[Row]:
    from larex.extraction.producers.boxes import Boxes
    from larex.extraction.producers.monte_carlo import MonteCarlo
    from larex.models.detection.base import insert_mc_layer

    rows: list[Row] = []
    s = MC_SAMPLES
    for name, build, layer, size, n in _cases():
        inputs = f"{n} images {size}px, S={s}, 100 boxes/image"
        try:
            torch.manual_seed(ctx.seed)
            model = insert_mc_layer(build(), layer, "dropblock", 0.5, 3).eval().to(ctx.device)
            x = torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(ctx.seed)).to(ctx.device)
            y = [{"transform": torch.tensor([1.0, 1.0, 0.0, 0.0, size, size], dtype=torch.float64)}] * n
            index = torch.arange(n)
            boxes = Boxes(layer, keys=("box_logits", "roi_features", "roi_latent"), predict_conf=0.0, max_det=100,
                          mc_samples=s)
            boxes.setup(model)
            ctx.log(f"detection {name}: plain detect vs box-level LaREx")
            t_plain, t_box, out = alternating(ctx, lambda: model.detect(x, conf=0.0, iou=0.7, max_det=100),
                                               lambda: boxes.produce(model, x, y, index))
            m = len(out["image_index"])
            rows.append(Row(f"detection/{name}/boxes", inputs.replace("100 boxes/image", f"{m} boxes"), t_box,
                            t_plain, t_plain / t_box, f"<={BOX_GOAL:g}x plain detect", t_box <= BOX_GOAL * t_plain,
                            note="reference_s = the adapter's deterministic detect() alone; larex_s = the same "
                                 "forward + RoIAlign + S DropBlock samples of the RoI features (roi_latent), no "
                                 "extra network forward"))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            rows.append(error_row(f"detection/{name}/boxes", inputs, f"<={BOX_GOAL:g}x plain detect", exc))
            continue
        try:
            ctx.log(f"detection {name}: image-level MC, shared prefix vs S passes")
            shared = MonteCarlo(layer, s, keys=("latent",), seed=ctx.seed)
            full = MonteCarlo(layer, s, keys=("latent",), seed=ctx.seed, share_prefix=False)
            t_shared, a = ctx.time(lambda: shared.produce(model, x, None, index)["latent"], sync=True)
            t_full, b = ctx.time(lambda: full.produce(model, x, None, index)["latent"], sync=True)
            err = float((a - b).abs().max())
            rows.append(Row(f"detection/{name}/image_mc", f"{n} images {size}px, S={s}", t_shared, t_full,
                            t_full / t_shared, f">=1x S full passes, err<={MC_ERR_TOL:g}",
                            t_shared <= t_full and err <= MC_ERR_TOL, err,
                            note=f"latent of {layer} (inserted DropBlock): the layers before it run once per image "
                                 "and each MC pass stops after it"))
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row(f"detection/{name}/image_mc", inputs, ">=1x S full passes", exc))
    return rows
