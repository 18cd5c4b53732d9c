"""A small, fast CNN for 28x28 / 32x32 images with a DropBlock layer for MC sampling."""
from __future__ import annotations

import torch
from dropblock import DropBlock2D
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three conv blocks, DropBlock between block2 and block3, global average pool, linear head.

    Layout for a 28x28 input (w = ``width``)::

        block1     conv3x3(in -> w)   + BN + ReLU + maxpool         -> [w, 14, 14]
        block2     conv3x3(w -> 2w)   + BN + ReLU + maxpool         -> [2w, 7, 7]
        dropblock  DropBlock2D(drop_prob, block_size)               -> [2w, 7, 7]
        block3     2 x (conv3x3 -> 4w + BN + ReLU)                  -> [4w, 7, 7]
        pool       global average pool, flatten                     -> [4w]
        fc         Linear(4w -> num_classes)

    About 240k parameters with the defaults (width 32); two epochs of Adam with a per-step cosine
    schedule reach about 88% test accuracy on Fashion-MNIST classes 0-7 in well under a minute on
    a CPU. Any input of at least 4x4 pixels works (32x32 gives 8x8 maps after block2).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 8, width: int = 32,
                 drop_prob: float = 0.1, block_size: int = 3) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or width < 1:
            raise ValueError(
                f"SmallCNN needs positive in_channels, num_classes and width; got "
                f"in_channels={in_channels}, num_classes={num_classes}, width={width}")
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"SmallCNN drop_prob must be in [0, 1); got {drop_prob}")
        self.block1 = nn.Sequential(*_conv_bn_relu(in_channels, width), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2))
        self.dropblock = DropBlock2D(drop_prob=drop_prob, block_size=block_size)
        self.block3 = nn.Sequential(*_conv_bn_relu(2 * width, 4 * width), *_conv_bn_relu(4 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(x))
        x = self.block3(self.dropblock(x))
        return self.fc(self.flatten(self.pool(x)))
