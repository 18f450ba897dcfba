"""ImageNet ResNets with torchvision's structure (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016, Table 1), for latency studies of compressed students at ImageNet shapes.

Module names and layout follow torchvision ``torchvision/models/resnet.py`` (pytorch/vision): a 7x7
stride-2 stem conv, BN, ReLU and 3x3 stride-2 max pool, four stages ``layer1``-``layer4`` of 64, 128,
256, 512 planes (BasicBlock for ResNet-18, Bottleneck with expansion 4 for ResNet-50, the stride on
the Bottleneck's 3x3 conv as in torchvision's "ResNet V1.5"), 1x1 conv + BN projection shortcuts,
global average pooling and ``fc``. Parameter counts equal torchvision's (11,689,512 and 25,557,032 at
1000 classes). No pretrained weights: Kaiming-normal init like torchvision's.
"""
from __future__ import annotations

import torch
from torch import nn

from .resnet import BasicBlock, _check_common, _init_weights, _scaled


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4), each with BN; ReLU after the residual sum."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    """torchvision-structured ResNet.

    Args:
        block: BasicBlock or Bottleneck.
        blocks: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-50.
        num_classes: classifier outputs (default 1000, ImageNet).
        in_channels: input image channels.
        width_mult: multiplies every stage's planes and the stem's 64 channels.
    """

    feature_layers = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, block, blocks, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        _check_common(num_classes, in_channels, width_mult)
        if block not in (BasicBlock, Bottleneck):
            raise TypeError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        if len(blocks) != 4 or not all(isinstance(b, int) and b >= 1 for b in blocks):
            raise ValueError(f"blocks must be four positive ints (blocks per stage), got {blocks!r}")
        stem = _scaled(64, width_mult)
        self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._in_planes = stem
        planes = [_scaled(p, width_mult) for p in (64, 128, 256, 512)]
        self.layer1 = self._make_stage(block, planes[0], blocks[0], 1)
        self.layer2 = self._make_stage(block, planes[1], blocks[1], 2)
        self.layer3 = self._make_stage(block, planes[2], blocks[2], 2)
        self.layer4 = self._make_stage(block, planes[3], blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self._in_planes, num_classes)
        _init_weights(self)

    def _make_stage(self, block, planes: int, count: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(count):
            layers.append(block(self._in_planes, planes, stride if i == 0 else 1))
            self._in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_imagenet(**kwargs) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet50_imagenet(**kwargs) -> ImageNetResNet:
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), **kwargs)
