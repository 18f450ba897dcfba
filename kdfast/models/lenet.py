"""LeNet-5 (LeCun et al., "Gradient-based learning applied to document recognition", Proc. IEEE 1998)
with the usual modern substitutions: ReLU instead of scaled tanh, max instead of trainable
sub-sampling, a full conv2 connection table and a linear output layer instead of RBF units.

conv1 5x5 -> 6, pool, conv2 5x5 -> 16, pool, fc1 120, fc2 84, fc3 num_classes. A 32x32 input gives
the paper's 16x5x5 map before fc1; other sizes are adaptive-average-pooled to 5x5, so any input of
at least 13x13 works (28x28 MNIST included). Pools use ceil_mode (equal to plain 2x2
pooling on even sizes). Module names: conv1, conv2, fc1, fc2, fc3.

``width_mult`` scales every width, the fully connected layers included: ``width_mult=0.5`` is the
"LeNet-5-half" of the data-free KD papers (DAFL's ``lenet.py``, huawei-noah/Efficient-Computing:
conv 1->3->8, conv3 8->60, fc 60->42->10; 15,738 parameters; LeNet-5 itself has 61,706). kdfast's fc1
is the official ``conv3`` (a 5x5 convolution of a 5x5 map is a linear layer), so the official
``feature`` (the ReLU'd 120-d conv3 output that DAFL's activation loss reads) is the input of fc2:
:attr:`LeNet5.representation_layer` names it.
"""
from __future__ import annotations

import torch
from torch import nn

from .resnet import _check_common, _init_weights

MIN_INPUT_SIZE = 13  # two unpadded 5x5 convs around a 2x2 ceil-mode pool need at least 13x13


class LeNet5(nn.Module):
    feature_layers = ("conv1", "conv2")
    #: the layer whose input is the model's representation (the official DAFL code's ``out_feature``)
    representation_layer = "fc2"

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        _check_common(num_classes, in_channels, width_mult)
        c1, c2 = max(1, round(6 * width_mult)), max(1, round(16 * width_mult))
        f1, f2 = max(1, round(120 * width_mult)), max(1, round(84 * width_mult))
        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)  # ceil: odd sizes keep their last row and column
        self.avgpool = nn.AdaptiveAvgPool2d(5)
        self.fc1 = nn.Linear(c2 * 25, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.fc3 = nn.Linear(f2, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and (x.shape[-2] < MIN_INPUT_SIZE or x.shape[-1] < MIN_INPUT_SIZE):
            raise ValueError(
                f"LeNet5 needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, got {x.shape[-2]}x{x.shape[-1]}"
            )
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


def lenet5(**kwargs) -> LeNet5:
    return LeNet5(**kwargs)
