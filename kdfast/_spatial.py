"""Spatial conventions shared by the feature losses and their oracles."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_to_common(x: torch.Tensor, y: torch.Tensor):
    """Adaptive-average-pool each map to (min H, min W) of the two; maps already that size are kept.

    RepDistiller's convention for feature maps of different spatial sizes (it pools the larger to the
    smaller in ``distiller_zoo``), generalised to non-square maps.
    """
    size = (min(x.shape[2], y.shape[2]), min(x.shape[3], y.shape[3]))
    if tuple(x.shape[2:]) != size:
        x = F.adaptive_avg_pool2d(x, size)
    if tuple(y.shape[2:]) != size:
        y = F.adaptive_avg_pool2d(y, size)
    return x, y
