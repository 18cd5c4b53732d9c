"""ResNet-18 for small images (CIFAR stem), with optional spectral norm, DropBlock and dropout."""
from __future__ import annotations

import torch
from dropblock import DropBlock2D
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

STAGES = ("layer1", "layer2", "layer3", "layer4")


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity (or 1x1 conv + BN projection) shortcut."""

    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) with a CIFAR stem: 3x3 conv, stride 1, no max-pool.

    Submodules: ``conv1, bn1, relu, layer1..layer4, [dropblock], avgpool, flatten, [dropout], fc``.

    Args:
        num_classes: output classes of ``fc``.
        in_channels: input image channels.
        spectral_norm: wrap every conv layer in ``torch.nn.utils.parametrizations.spectral_norm``.
        dropblock_prob: DropBlock drop probability during training (0 = identity during training).
        dropblock_size: DropBlock block size.
        dropblock_after: stage (``layer1``..``layer4``) after which a ``DropBlock2D`` named
            ``dropblock`` runs, or ``None`` for none. The module exists even when ``dropblock_prob``
            is 0, so MC extraction can switch it on with a drop-probability override.
        dropout_prob: if > 0, an ``nn.Dropout`` named ``dropout`` runs right before ``fc``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, spectral_norm: bool = False,
                 dropblock_prob: float = 0.0, dropblock_size: int = 3,
                 dropblock_after: str | None = "layer3", dropout_prob: float = 0.0) -> None:
        super().__init__()
        if dropblock_after is not None and dropblock_after not in STAGES:
            raise ValueError(f"ResNet18 dropblock_after={dropblock_after!r} is not a stage; "
                             f"use one of {STAGES} or null")
        if not 0.0 <= dropblock_prob < 1.0 or not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"ResNet18 dropblock_prob and dropout_prob must be in [0, 1); got "
                             f"{dropblock_prob} and {dropout_prob}")
        self.dropblock_after = dropblock_after
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        widths, c_in = (64, 128, 256, 512), 64
        for i, (name, c_out) in enumerate(zip(STAGES, widths)):
            stride = 1 if i == 0 else 2
            self.add_module(name, nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        if dropblock_after is not None:
            self.dropblock = DropBlock2D(drop_prob=dropblock_prob, block_size=dropblock_size)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        if dropout_prob > 0:
            self.dropout = nn.Dropout(dropout_prob)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if spectral_norm:
            for m in list(self.modules()):
                if isinstance(m, nn.Conv2d):
                    _spectral_norm(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for name in STAGES:
            x = getattr(self, name)(x)
            if name == self.dropblock_after:
                x = self.dropblock(x)
        x = self.flatten(self.avgpool(x))
        if hasattr(self, "dropout"):
            x = self.dropout(x)
        return self.fc(x)
