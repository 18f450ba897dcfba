"""DFAD: Data-Free Adversarial Distillation (Fang, Song, Wang, Shen, Wang, Song, arXiv 1912.11006).

A min-max game on the model discrepancy, the mean absolute error of the logits: per iteration the
student takes 5 steps minimising it on detached generated images, then the generator one step
maximising it. As the official code (VainF/Data-Free-Adversarial-Distillation ``DFAD_mnist.py``,
``DFAD_cifar.py``): ``F.l1_loss(s_logit, t_logit)``, averaged over B * K.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks

NAME = "dfad"
TITLE = "DFAD: data-free adversarial distillation (student/generator min-max on the logit MAE)"
PAPER = ("Fang, Song, Wang, Shen, Wang, Song, 'Data-Free Adversarial Distillation', arXiv 1912.11006; "
         "code: VainF/Data-Free-Adversarial-Distillation (DFAD_mnist.py, DFAD_cifar.py)")

STUDENT_STEPS = 5  # student steps per generator step in the official code


def discrepancy(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute error between student and teacher logits: sum |z_S - z_T| / (B * K)."""
    _checks.logits("s_logits", s_logits)
    _checks.logits("t_logits", t_logits)
    if s_logits.shape != t_logits.shape:
        raise ValueError(f"shape mismatch: s_logits is {tuple(s_logits.shape)} but t_logits is "
                         f"{tuple(t_logits.shape)}; expected the same (B, K)")
    return F.l1_loss(s_logits, t_logits)
