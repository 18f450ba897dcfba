"""Plain-PyTorch formulations of the same losses as peers write them: the benchmarks' baselines
and the tests' cross-checks. Written for kdfast from the peers' documented math (repositories and
files named below); no peer code is copied.

* ``*_bmm``: the strongest plain-PyTorch formulation (batched-GEMM Grams, autograd backward).
* ``repdistiller_*``: HobbitLong/RepDistiller ``distiller_zoo/{NST,FSP}.py`` (b84f547c): broadcast
  products over (B, C, C, HW), mean over B*C*C. mdistiller's NST is the same formulation.
* ``torchdistill_fsp_loss``: yoshitomo-matsubara/torchdistill ``losses/mid_level.py`` FSPLoss:
  adaptive *max* pooling, non-squared L2 over the first Gram axis, divided by B.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._spatial import pool_to_common


def _rows(x):
    return x.flatten(2)


# ------------------------------------------------------------------------------- bmm formulations
def fsp_loss_bmm(s_a, s_b, t_a, t_b) -> torch.Tensor:
    """kdfast's fsp_loss (reduction="mean") with two bmm Grams and autograd."""
    s_a, s_b = pool_to_common(s_a, s_b)
    t_a, t_b = pool_to_common(t_a, t_b)
    g_s = torch.bmm(_rows(s_a), _rows(s_b).transpose(1, 2)) / (s_a.shape[2] * s_a.shape[3])
    g_t = torch.bmm(_rows(t_a), _rows(t_b).transpose(1, 2)) / (t_a.shape[2] * t_a.shape[3])
    return (g_s - g_t).pow(2).sum(dim=(1, 2)).mean()


def nst_poly_loss_bmm(fs, ft) -> torch.Tensor:
    """kdfast's nst_loss(kernel="poly", reduction="mean") with three bmm channel Grams and autograd."""
    fs, ft = pool_to_common(fs, ft)
    s = F.normalize(_rows(fs), dim=2)
    t = F.normalize(_rows(ft), dim=2)
    k_ss = torch.bmm(s, s.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    k_tt = torch.bmm(t, t.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    k_st = torch.bmm(s, t.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    return (k_ss + k_tt - 2 * k_st).mean()


# ------------------------------------------------------------------------------- RepDistiller
def _repdistiller_pool(a, b):
    # RepDistiller pools the taller map to (H_small, H_small): it assumes square maps.
    if a.shape[2] > b.shape[2]:
        a = F.adaptive_avg_pool2d(a, (b.shape[2], b.shape[2]))
    elif a.shape[2] < b.shape[2]:
        b = F.adaptive_avg_pool2d(b, (a.shape[2], a.shape[2]))
    return a, b


def _repdistiller_poly_kernel(a, b):
    # (B, Cb, Ca) kernel matrix through a (B, Cb, Ca, HW) broadcast product.
    return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)


def repdistiller_nst_loss(fs, ft) -> torch.Tensor:
    """RepDistiller NSTLoss for one feature pair (full_loss=True): equals kdfast's poly nst_loss, mean."""
    fs, ft = _repdistiller_pool(fs, ft)
    s = F.normalize(fs.view(fs.shape[0], fs.shape[1], -1), dim=2)
    t = F.normalize(ft.view(ft.shape[0], ft.shape[1], -1), dim=2)
    return (
        _repdistiller_poly_kernel(t, t).mean().detach()
        + _repdistiller_poly_kernel(s, s).mean()
        - 2 * _repdistiller_poly_kernel(s, t).mean()
    )


def _repdistiller_fsp_matrix(bot, top):
    # (B, C_top, C_bot) through a (B, C_top, C_bot, HW) broadcast product.
    bot, top = _repdistiller_pool(bot, top)
    bot = bot.view(bot.shape[0], bot.shape[1], -1).unsqueeze(1)
    top = top.view(top.shape[0], top.shape[1], -1).unsqueeze(2)
    return (bot * top).mean(-1)


def repdistiller_fsp_loss(s_a, s_b, t_a, t_b) -> torch.Tensor:
    """RepDistiller FSP for one (bot=a, top=b) pair: mean over B*Cb*Ca of the squared Gram
    difference, i.e. kdfast's fsp_loss(reduction="mean") / (Ca * Cb)."""
    return (_repdistiller_fsp_matrix(s_a, s_b) - _repdistiller_fsp_matrix(t_a, t_b)).pow(2).mean()


# ------------------------------------------------------------------------------- torchdistill
def _torchdistill_fsp_matrix(first, second):
    if first.shape[2:] != second.shape[2:]:
        size = (min(first.shape[2], second.shape[2]), min(first.shape[3], second.shape[3]))
        first = F.adaptive_max_pool2d(first, size) if tuple(first.shape[2:]) != size else first
        second = F.adaptive_max_pool2d(second, size) if tuple(second.shape[2:]) != size else second
    hw = first.shape[2] * first.shape[3]
    return torch.matmul(_rows(first), _rows(second).transpose(1, 2)) / hw


def torchdistill_fsp_loss(s_a, s_b, t_a, t_b) -> torch.Tensor:
    """torchdistill FSPLoss for one pair (weight 1): sum over the batch of the non-squared L2 norm
    over the first Gram axis, divided by B. A different quantity from the paper's loss."""
    g_s = _torchdistill_fsp_matrix(s_a, s_b)
    g_t = _torchdistill_fsp_matrix(t_a, t_b)
    return (g_s - g_t).norm(dim=1).sum() / s_a.shape[0]


# ------------------------------------------------------------------------------- Hinton KD
# Plain-PyTorch formulations of kdfast.ops.kd_loss (reduction "mean", ignore_index -100):
# (1 - alpha) CE + alpha T^2 KL(softmax(t/T) || softmax(s/T)), KL a batch mean.
def kd_loss_torch(s, t, targets, temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """torch's own ops: kl_div on two log_softmaxes (log_target=True, batchmean) + cross_entropy."""
    T = float(temperature)
    kl = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean", log_target=True)
    loss = alpha * T * T * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(s, targets)
    return loss


def repdistiller_kd_loss(s, t, targets, temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """RepDistiller DistillKL (kl_div(log_softmax(s/T), softmax(t/T), sum) * T^2 / B) weighted by
    alpha, plus (1 - alpha) cross_entropy, as its train_student.py combines them (-r, -a)."""
    T = float(temperature)
    kd = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="sum") * T * T / s.shape[0]
    loss = alpha * kd
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(s, targets)
    return loss


# ------------------------------------------------------------------------------- BSS (official formulation)
# bhheo/BSS_distillation (586b1411) as it computes target sampling and the attack, restated in current
# PyTorch (Variable / zero_gradients are gone): per-element Python loops with a host read per element
# for the sampling, the whole base-sample batch through the teacher at every attack step.
def bss_official_target_classes(t_logits):
    """train_BSS_distillation.py: default = the second-ranked class; uniform u times the sum of the
    non-top softmax; double loop over (sample, class) with one host read per comparison."""
    attack_class = t_logits.sort(dim=1, descending=True)[1][:, 1].clone()
    class_score, class_idx = F.softmax(t_logits, 1).sort(dim=1, descending=True)
    class_score, class_idx = class_score[:, 1:], class_idx[:, 1:]
    rand_seed = (class_score.sum(dim=1) * torch.rand([t_logits.shape[0]], device=t_logits.device)).unsqueeze(1)
    prob = class_score.cumsum(dim=1)
    for k in range(t_logits.shape[0]):
        for c in range(prob.shape[1]):
            if (prob[k, c] >= rand_seed[k]).cpu().numpy():
                attack_class[k] = class_idx[k, c]
                break
    return attack_class


def bss_official_attack(teacher, inputs, target, num_steps: int = 10, step_alpha: float = 0.3):
    """attacks/attack_BSS.py AttackBSS.run (targeted, norm=2): every step the whole batch goes through
    the teacher, the stop test reads the host, perturbation divided by the per-sample L2 norm, clamp to
    [-2.5, 2.5]."""
    x = inputs.clone().requires_grad_(True)
    gt = None
    input_adv = inputs
    for step in range(num_steps):
        x.grad = None
        output = teacher(x)
        if step == 0:
            gt = output.detach().max(1)[1]
        score_gt = output.gather(1, gt.unsqueeze(1))
        score_target = output.gather(1, target.unsqueeze(1))
        (score_target - score_gt).sum().backward()
        alpha = step_alpha * (gt == output.detach().max(1)[1]).float()
        alpha = alpha.view(-1, 1, 1, 1)
        if alpha.sum() == 0:
            break
        pert = (score_gt.detach() - score_target.detach()).unsqueeze(1).unsqueeze(1)
        grad = x.grad.detach()
        norm = grad.flatten(1).pow(2).sum(1).sqrt().view(-1, 1, 1, 1)
        step_adv = x.detach() + alpha * (pert + 1e-4) * grad / norm
        input_adv = torch.clamp(inputs + (step_adv - inputs), -2.5, 2.5)
        x = input_adv.clone().requires_grad_(True)
    return input_adv
