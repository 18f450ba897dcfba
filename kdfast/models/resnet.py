"""CIFAR-style ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2).

Depth 6n + 2: a 3x3 stem conv, three stages of n BasicBlocks with 16, 32, 64 channels (times
``width_mult``), the second and third stage starting with stride 2, global average pooling and a
linear classifier. Shortcuts that change shape are a 1x1 conv + BN (option B), as in RepDistiller
(HobbitLong/RepDistiller ``models/resnet.py``); the module names ``conv1, bn1, layer1, layer2,
layer3, fc`` follow it so feature taps written for RepDistiller's students find the same layers.
Pooling is adaptive, so any input size works (32x32 gives the paper's 8x8 final map).
"""
from __future__ import annotations

import torch
from torch import nn


def _scaled(channels: int, width_mult: float) -> int:
    return max(1, int(round(channels * width_mult)))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut, ReLU after the sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet of depth 6n + 2 for small images.

    Args:
        depth: total number of weighted layers, 6n + 2 (8, 14, 20, 26, 32, 44, 56, 110, ...).
        num_classes: classifier outputs.
        in_channels: input image channels (3 for RGB, 1 for grayscale).
        width_mult: multiplies the stage widths 16/32/64 (and the default stem width).
        stem_channels: output channels of the stem conv; default the first stage's width. RepDistiller's
            resnet8x4 / resnet32x4 use a 32-channel stem before 64/128/256-channel stages.
    """

    feature_layers = ("layer1", "layer2", "layer3")  # names of the stage outputs, for feature taps

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        stem_channels: int | None = None,
    ):
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 26, 32, 56, ...), got {depth!r}")
        _check_common(num_classes, in_channels, width_mult)
        blocks_per_stage = (depth - 2) // 6
        widths = [_scaled(c, width_mult) for c in (16, 32, 64)]
        if stem_channels is None:
            stem_channels = widths[0]
        elif not isinstance(stem_channels, int) or isinstance(stem_channels, bool) or stem_channels < 1:
            raise ValueError(f"stem_channels must be a positive int or None, got {stem_channels!r}")
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self._in_planes = stem_channels
        self.layer1 = self._make_stage(widths[0], blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(widths[1], blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(widths[2], blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        _init_weights(self)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(BasicBlock(self._in_planes, planes, stride if i == 0 else 1))
            self._in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _check_common(num_classes, in_channels, width_mult) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if not isinstance(width_mult, (int, float)) or isinstance(width_mult, bool) or not width_mult > 0:
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU), BN weight 1 / bias 0: RepDistiller's and torchvision's init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet8(**kwargs) -> CifarResNet:
    return CifarResNet(8, **kwargs)


def resnet14(**kwargs) -> CifarResNet:
    return CifarResNet(14, **kwargs)


def resnet20(**kwargs) -> CifarResNet:
    return CifarResNet(20, **kwargs)


def resnet26(**kwargs) -> CifarResNet:
    return CifarResNet(26, **kwargs)


def resnet32(**kwargs) -> CifarResNet:
    return CifarResNet(32, **kwargs)


def resnet44(**kwargs) -> CifarResNet:
    return CifarResNet(44, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    return CifarResNet(56, **kwargs)


def resnet110(**kwargs) -> CifarResNet:
    return CifarResNet(110, **kwargs)


def resnet8x4(**kwargs) -> CifarResNet:
    """RepDistiller's wide student: 32-channel stem, stages of 64/128/256 channels, depth 8."""
    kwargs.setdefault("width_mult", 4.0)
    kwargs.setdefault("stem_channels", 32)
    return CifarResNet(8, **kwargs)


def resnet32x4(**kwargs) -> CifarResNet:
    """RepDistiller's wide teacher: 32-channel stem, stages of 64/128/256 channels, depth 32."""
    kwargs.setdefault("width_mult", 4.0)
    kwargs.setdefault("stem_channels", 32)
    return CifarResNet(32, **kwargs)
