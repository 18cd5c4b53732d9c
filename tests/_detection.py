"""Shared helpers of the detection tests: random-init ultralytics weights with calibrated BatchNorm statistics.

A random-init detector built from its YAML has BatchNorm running statistics (0, 1) that do not match its
activations, which shrink layer after layer (YOLOv8n's SPPF map is ~1e-9): every box and feature is then the
same. Re-estimating the running statistics on a batch of generated images (BatchNorm calibration, no gradient
step) gives a random network whose maps and boxes differ per image, as a trained one's do, in a second."""
from __future__ import annotations

from pathlib import Path

import torch


def calibrated_weights(config: str, path: Path, num_classes: int = 3, image_size: int = 160, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    from larex.data.shapes import ShapesDetection
    from larex.models.detection.ultralytics import UltralyticsDetector
    from larex.tasks.detection.geometry import letterbox

    torch.manual_seed(seed)
    m = UltralyticsDetector(config, num_classes=num_classes)
    ds = ShapesDetection(length=12, image_size=image_size, seed=seed + 99)
    x = torch.stack([letterbox(ds[i][0], image_size)[0] for i in range(len(ds))])
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.momentum = None  # cumulative average: the running stats become this batch's statistics
            mod.reset_running_stats()
    m.train()
    with torch.no_grad():
        m(x)
    m.eval()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path
