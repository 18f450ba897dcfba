"""Small image-classification models for distillation experiments (no torchvision dependency).

    model = kdfast.models.build("resnet20", num_classes=100)
    kdfast.models.available()  # names build() accepts

Every model takes ``num_classes`` (default 10; the ImageNet ResNets ``resnet18_imagenet`` and
``resnet50_imagenet``, torchvision's structure without weights: 1000), ``in_channels`` (default 3) and ``width_mult``
(default 1.0) and pools adaptively before its classifier, so it runs on any input size (LeNet5: at
least 13x13). Each class lists the module names of its stage outputs in ``feature_layers``, for
feature-based distillation hooks.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .imagenet_resnet import Bottleneck, ImageNetResNet, resnet18_imagenet, resnet50_imagenet
from .lenet import LeNet5, lenet5
from .resnet import (
    BasicBlock,
    CifarResNet,
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet26,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from .vgg import VGG, vgg8, vgg11, vgg13

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet26": resnet26,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "lenet5": lenet5,
    "resnet18_imagenet": resnet18_imagenet,
    "resnet50_imagenet": resnet50_imagenet,
}


def available() -> list[str]:
    """Sorted names accepted by :func:`build`."""
    return sorted(_REGISTRY)


def build(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name, e.g. ``build("resnet20", num_classes=100, width_mult=2)``.

    Names are case-insensitive. Unknown names raise ValueError listing the available ones; unknown
    keyword arguments raise TypeError from the model's constructor.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; available: {', '.join(available())}")
    return _REGISTRY[key](**kwargs)


__all__ = [
    "BasicBlock", "Bottleneck", "CifarResNet", "ImageNetResNet", "LeNet5", "VGG", "available", "build",
    *sorted(_REGISTRY),
]
