"""Plain-PyTorch formulations of the same losses as peers write them: the benchmarks' baselines
and the tests' cross-checks. Written for kdfast from the peers' documented math (see
shared reference ANCHORS.md / METHODS.md); no peer code is copied.

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


# ------------------------------------------------------------------------------- SRM
# The official SRM code's dense formulation (viebboy/SRM, cifar100/code/Layers.py: SparseRep,
# GlobalLocalLabel, 77a12ba7), written from its math: the full (N, H, W, K) sigmoid similarity,
# torch.topk, a mask of s >= the k-th largest (ties with it all kept), a dense reconstruction.
def srm_similarity(x, dictionary, bias) -> torch.Tensor:
    """(N, H, W, K) = sigmoid(C^T x + b) per pixel, as a 1x1 linear map over the channels-last map."""
    return torch.sigmoid(F.linear(x.permute(0, 2, 3, 1), dictionary.t()) + bias)


def srm_masked_similarity(x, dictionary, bias, k: int) -> torch.Tensor:
    s = srm_similarity(x, dictionary, bias)
    kth = torch.topk(s, k, dim=-1).values[..., -1:]
    return s * (s >= kth).to(s.dtype)


def srm_reconstruct_official(x, dictionary, bias, k: int) -> torch.Tensor:
    """SparseRep.forward: C s_hat with s_hat the top-k masked similarity; (N, D, H, W)."""
    return F.linear(srm_masked_similarity(x, dictionary, bias, k), dictionary).permute(0, 3, 1, 2)


def srm_labels_official(x, dictionary, bias, k: int):
    """GlobalLocalLabel.forward: (spatial mean of the masked similarity (N, K), argmax codeword (N, H, W))."""
    masked = srm_masked_similarity(x, dictionary, bias, k)
    return masked.mean(dim=(1, 2)), masked.argmax(dim=-1)
