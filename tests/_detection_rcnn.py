"""Shared helpers of the Faster R-CNN tests: random-init torchvision Faster R-CNN weights with calibrated BatchNorm.

As for the ultralytics detectors (``tests/_detection.py``), a random-init backbone's BatchNorm running statistics
(0, 1) do not match its activations; re-estimating them on a batch of generated shapes images (the backbone alone
in train mode, no gradient step: Faster R-CNN's train mode needs targets) gives a random network whose maps,
proposals and boxes differ per image. Only the backbone has BatchNorm (the FPN, RPN and box heads have none)."""
from __future__ import annotations

from pathlib import Path

import torch

FAST = {"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 100}  # proposals per image: CPU-sized tests


def shapes_batch(n: int = 8, image_size: int = 128, seed: int = 99) -> torch.Tensor:
    """``n`` generated shapes images letterboxed to ``image_size`` ([n, 3, s, s] in [0, 1])."""
    from larex.data.shapes import ShapesDetection
    from larex.tasks.detection.geometry import letterbox

    ds = ShapesDetection(length=n, image_size=160, seed=seed)
    return torch.stack([letterbox(ds[i][0], image_size, fill=114 / 255)[0] for i in range(len(ds))])


def calibrated_rcnn(backbone: str, num_classes: int = 3, image_size: int = 128, seed: int = 0, **kwargs):
    """A random-init :class:`TorchvisionFasterRCNN` with BatchNorm statistics of generated images, in eval mode."""
    from larex.models.detection.torchvision_rcnn import TorchvisionFasterRCNN

    torch.manual_seed(seed)
    m = TorchvisionFasterRCNN(backbone, num_classes=num_classes, **kwargs)
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.momentum = None  # cumulative average: the running stats become this batch's statistics
            mod.reset_running_stats()
    body = m.model.backbone.body
    body.train()
    with torch.no_grad():
        body(shapes_batch(12, image_size, seed + 99))
    return m.eval()


def calibrated_rcnn_weights(backbone: str, path: Path, **kwargs) -> Path:
    """:func:`calibrated_rcnn`'s state dict as a larex ``.safetensors`` file at ``path``."""
    from safetensors.torch import save_file

    m = calibrated_rcnn(backbone, **kwargs)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return Path(path)
