"""RDSKD: Robustness and Diversity Seeking data-free KD (Han, Park, Wang, Liu, ICASSP 2021, arXiv 2011.03749).

The generator seeks authenticity (the teacher is confident), class diversity (balanced classes)
and inter-sample diversity (images far apart relative to how far apart the teacher's outputs are),
with no loss weights: each of the first two losses enters as exp(loss - its value at a reference
iteration), which penalises increments exponentially. The generator is trained first (teacher
frozen), then the student against the frozen generator with KD at T = 10 and the T^2 factor.
Formulas as the official code computes them (PengchaoHan/RDSKD ``generator-train.py``):

* one_hot = CE over both halves' logits against their argmax
* class_diversity = sum_k p_k ln p_k, p = mean softmax over both halves (natural log)
* sample_diversity = 1 / (||x_2 - x_1||_F / ||softmax(z_T2) - softmax(z_T1)||_F + 1e-20), Frobenius
  norms over the whole half-batch tensors (one scalar per batch)
* objective = exp(one_hot - prev one_hot) + exp(class_diversity - prev class_diversity) + sample_diversity,
  prev detached, 0 at the start, refreshed after iteration 1 of each epoch.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from .. import _checks
from .dafl import neg_entropy_of_mean, one_hot_loss

NAME = "rdskd"
TITLE = "RDSKD: robustness- and diversity-seeking data-free KD (two stages, exponential loss increments)"
PAPER = ("Han, Park, Wang, Liu, 'Robustness and Diversity Seeking Data-Free Knowledge Distillation', ICASSP 2021; "
         "code: PengchaoHan/RDSKD (generator-train.py, student-train.py)")

DIVERSITY_EPS = 1e-20  # the code's `1 / (lz + 1 * 1e-20)`


def sample_diversity(t_logits_1: torch.Tensor, t_logits_2: torch.Tensor, x_1: torch.Tensor,
                     x_2: torch.Tensor) -> torch.Tensor:
    """1 / (||x_2 - x_1||_F / ||softmax(z_2) - softmax(z_1)||_F + 1e-20) over the whole half-batches."""
    lz = torch.linalg.vector_norm(x_2 - x_1) / torch.linalg.vector_norm(
        torch.softmax(t_logits_2, dim=1) - torch.softmax(t_logits_1, dim=1))
    return 1.0 / (lz + DIVERSITY_EPS)


def generator_losses(t_logits_1: torch.Tensor, t_logits_2: torch.Tensor, x_1: torch.Tensor,
                     x_2: torch.Tensor) -> Dict[str, torch.Tensor]:
    """RDSKD's three generator losses over the two halves of a batch (logits (B, K), images (B, ...))."""
    _checks.logits("t_logits_1", t_logits_1)
    _checks.logits("t_logits_2", t_logits_2)
    if t_logits_1.shape != t_logits_2.shape:
        raise ValueError(f"the halves must have the same shape: t_logits_1 is {tuple(t_logits_1.shape)} but "
                         f"t_logits_2 is {tuple(t_logits_2.shape)}")
    for name, x in (("x_1", x_1), ("x_2", x_2)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() < 2 or x.shape[0] != t_logits_1.shape[0]:
            raise ValueError(f"{name} must be (B, ...) with B = {t_logits_1.shape[0]} (the logits' batch), "
                             f"got shape {tuple(x.shape)}")
    if x_1.shape != x_2.shape:
        raise ValueError(f"the halves must have the same shape: x_1 is {tuple(x_1.shape)} but x_2 is {tuple(x_2.shape)}")
    logits = torch.cat([t_logits_1, t_logits_2])
    return {
        "one_hot": one_hot_loss(logits),
        "class_diversity": neg_entropy_of_mean(logits),
        "sample_diversity": sample_diversity(t_logits_1, t_logits_2, x_1, x_2),
    }


def generator_objective(losses: Mapping[str, torch.Tensor],
                        previous: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
    """exp(one_hot - prev) + exp(class_diversity - prev) + sample_diversity; ``previous`` holds the
    reference values of "one_hot" and "class_diversity" (None or missing: 0, the code's start)."""
    previous = previous or {}
    prev_oh = previous.get("one_hot", 0.0)
    prev_cd = previous.get("class_diversity", 0.0)
    prev_oh = prev_oh.detach() if isinstance(prev_oh, torch.Tensor) else prev_oh
    prev_cd = prev_cd.detach() if isinstance(prev_cd, torch.Tensor) else prev_cd
    return (torch.exp(losses["one_hot"] - prev_oh) + torch.exp(losses["class_diversity"] - prev_cd)
            + losses["sample_diversity"])
