"""DAFL: Data-Free Learning of student networks (Chen et al., ICCV 2019, arXiv 1904.01186).

A generator learns, against the frozen teacher, to produce images the teacher classifies
confidently (one-hot loss), with strong penultimate activations (activation loss) and balanced
classes over the batch (information-entropy loss); the student learns from those images by KD at
T = 1. Formulas and normalisations as the official code computes them (huawei-noah/Efficient-Computing,
``Data-Efficient-Model-Compression/DAFL/DAFL-train.py``):

* one_hot = CE(z_T, argmax z_T)
* activation = -mean |f_T| over the batch AND the feature dimension (the paper's per-sample L1 norm / d)
* info_entropy = sum_k p_k log10 p_k, p = batch mean of softmax(z_T) (log10, no 1/K; minimised)
* generator objective = oh * one_hot + ie * info_entropy + a * activation (MNIST: 1 / 5 / 0.1)
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from .. import _checks

NAME = "dafl"
TITLE = "DAFL: data-free learning with a generator (one-hot, activation, information entropy)"
PAPER = ("Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu, Tian, 'Data-Free Learning of Student Networks', ICCV 2019; "
         "code: huawei-noah/Efficient-Computing, Data-Efficient-Model-Compression/DAFL/DAFL-train.py")

LOG10 = 2.302585092994046  # ln(10)


def _batch_features(name: str, x, batch: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] != batch or x.numel() == 0:
        raise ValueError(f"{name} must be (B, ...) with B = {batch} (the logits' batch) and at least one feature, "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def neg_entropy_of_mean(logits: torch.Tensor, log_base: float = 1.0) -> torch.Tensor:
    """sum_k p_k log p_k / log_base with p the batch mean of softmax(logits): minimising it balances
    the classes. ``log_base = ln 10`` gives DAFL's log10, 1.0 RDSKD's natural log.

    p is clamped to the smallest normal float before the log: equal to the official formula wherever
    that is finite, and finite (not 0 * -inf = NaN) when a class's mean probability underflows to 0.
    """
    p = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=1).mean(dim=0)
    return (p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum() / log_base


def one_hot_loss(logits: torch.Tensor) -> torch.Tensor:
    """CE(z, argmax z): the teacher should be confident on generated images (pseudo-labels, no grad)."""
    return F.cross_entropy(logits, logits.detach().argmax(dim=1))


def generator_losses(t_logits: torch.Tensor, t_features: torch.Tensor) -> Dict[str, torch.Tensor]:
    """DAFL's three generator losses from the teacher's logits (B, K) and penultimate features (B, ...)."""
    _checks.logits("t_logits", t_logits)
    _batch_features("t_features", t_features, t_logits.shape[0])
    return {
        "one_hot": one_hot_loss(t_logits),
        "activation": -t_features.abs().mean(),
        "info_entropy": neg_entropy_of_mean(t_logits, LOG10),
    }


def generator_objective(losses: Dict[str, torch.Tensor], oh: float = 1.0, ie: float = 5.0,
                        a: float = 0.1) -> torch.Tensor:
    """oh * one_hot + ie * info_entropy + a * activation (official MNIST weights 1 / 5 / 0.1)."""
    return oh * losses["one_hot"] + ie * losses["info_entropy"] + a * losses["activation"]
