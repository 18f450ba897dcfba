"""Small VGG networks for CIFAR-sized images (Simonyan & Zisserman, ICLR 2015), in the layout of
RepDistiller's ``models/vgg.py`` (HobbitLong/RepDistiller): five blocks of 3x3 conv-BN layers
(64/128/256/512/512 channels times ``width_mult``), 2x2 max pooling after the first four, global
average pooling and one linear classifier. vgg8 (one conv per block) is RepDistiller's usual student
of a vgg13 teacher.

Module names: ``block0`` ... ``block4`` (each ends with a BatchNorm; the ReLU after it is applied in
``forward``, so a hook on ``blockN`` sees the pre-activation map like RepDistiller's features),
``pool0`` ... ``pool3``, ``classifier``. Pools use ceil_mode, so any input size >= 1 works (for even
sizes this equals plain 2x2 pooling).
"""
from __future__ import annotations

import torch
from torch import nn

from .resnet import _check_common, _init_weights, _scaled

# Convs per block for each depth (RepDistiller's cfg 'S', 'A', 'B').
_CONFIGS = {
    8: (1, 1, 1, 1, 1),
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
}
_BLOCK_WIDTHS = (64, 128, 256, 512, 512)


class VGG(nn.Module):
    """VGG with BatchNorm for small images.

    Args:
        depth: 8, 11 or 13 (weighted layers including the classifier).
        num_classes, in_channels, width_mult: as for the ResNets.
    """

    feature_layers = ("block0", "block1", "block2", "block3", "block4")

    def __init__(self, depth: int = 8, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        if depth not in _CONFIGS:
            raise ValueError(f"depth must be one of {sorted(_CONFIGS)}, got {depth!r}")
        _check_common(num_classes, in_channels, width_mult)
        self.depth = depth
        channels = in_channels
        for i, (n_convs, width) in enumerate(zip(_CONFIGS[depth], _BLOCK_WIDTHS)):
            width = _scaled(width, width_mult)
            layers = []
            for j in range(n_convs):
                if j > 0:
                    layers.append(nn.ReLU(inplace=True))
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width)]
                channels = width
            setattr(self, f"block{i}", nn.Sequential(*layers))
            if i < 4:
                setattr(self, f"pool{i}", nn.MaxPool2d(2, 2, ceil_mode=True))
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.relu(self.block0(x)))
        x = self.pool1(self.relu(self.block1(x)))
        x = self.pool2(self.relu(self.block2(x)))
        x = self.pool3(self.relu(self.block3(x)))
        x = self.relu(self.block4(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def vgg8(**kwargs) -> VGG:
    return VGG(8, **kwargs)


def vgg11(**kwargs) -> VGG:
    return VGG(11, **kwargs)


def vgg13(**kwargs) -> VGG:
    return VGG(13, **kwargs)
