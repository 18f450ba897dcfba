"""Pure-PyTorch reference implementations: the oracle of the tests.

Written for clarity, straight from the formulas, with no concern for memory or speed.
Spatial mismatch: where two maps' spatial sizes differ, the larger is adaptive-average-pooled to
the smaller before anything else (RepDistiller's convention, generalised to non-square maps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._spatial import pool_to_common  # noqa: F401  (the runtime convention; re-exported for the tests)

NORMALIZE_EPS = 1e-12


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """FSP matrix (Yim et al. 2017): G[n, i, j] = sum_s a[n, i, s] b[n, j, s] / (H W)."""
    a, b = pool_to_common(a, b)
    hw = a.shape[2] * a.shape[3]
    return torch.einsum("nis,njs->nij", a.flatten(2), b.flatten(2)) / hw


def fsp_loss(s_a, s_b, t_a, t_b, reduction: str = "mean") -> torch.Tensor:
    """Per sample ||G(s_a, s_b) - G(t_a, t_b)||_F^2 (the paper's squared Frobenius distance, lambda = 1)."""
    diff = fsp_matrix(s_a, s_b) - fsp_matrix(t_a, t_b)
    return reduce(diff.pow(2).sum(dim=(1, 2)), reduction)


def _kernel_matrix(x: torch.Tensor, y: torch.Tensor, kernel: str, sigma: float) -> torch.Tensor:
    """k(x_i, y_j) for all rows i of x (B, M, D) and j of y (B, N, D)."""
    if kernel == "linear":
        return x @ y.transpose(1, 2)
    if kernel == "poly":
        return (x @ y.transpose(1, 2)).pow(2)
    if kernel == "gaussian":
        dist_sq = (x.unsqueeze(2) - y.unsqueeze(1)).pow(2).sum(-1)
        return torch.exp(-dist_sq / (2.0 * sigma**2))
    raise ValueError(f"kernel must be one of ('linear', 'poly', 'gaussian'), got {kernel!r}")


def nst_loss(fs, ft, kernel: str = "poly", reduction: str = "mean", sigma: float | None = None) -> torch.Tensor:
    """Neuron Selectivity Transfer MMD^2 (Huang & Wang 2017), per sample, then reduced.

    Each channel's H*W vector is L2-normalised (eps 1e-12), then
    MMD^2 = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') - 2 mean_{i,j} k(s_i, t_j).
    sigma=None means sigma^2 = 1 for the gaussian kernel.
    """
    fs, ft = pool_to_common(fs, ft)
    s = F.normalize(fs.flatten(2), dim=2, eps=NORMALIZE_EPS)
    t = F.normalize(ft.flatten(2), dim=2, eps=NORMALIZE_EPS)
    sigma = 1.0 if sigma is None else float(sigma)
    per_sample = (
        _kernel_matrix(s, s, kernel, sigma).mean(dim=(1, 2))
        + _kernel_matrix(t, t, kernel, sigma).mean(dim=(1, 2))
        - 2.0 * _kernel_matrix(s, t, kernel, sigma).mean(dim=(1, 2))
    )
    return reduce(per_sample, reduction)


def tucker_conv2d(x, first, core, last, bias=None, stride=1, padding=0, dilation=1, *, scale=None, shift=None,
                  residual=None, relu=False) -> torch.Tensor:
    """Tucker-2 convolution as the explicit three-convolution composition (Kim et al., ICLR 2016):
    1x1 conv with ``first`` (R_in, C), k x k conv with ``core`` (R_out, R_in, kh, kw) carrying
    stride / zero padding / dilation, 1x1 conv with ``last`` (O, R_out), then ``bias`` (O,).
    Then the inference epilogue: ``y * scale + shift`` per output channel (a folded BatchNorm),
    ``+ residual`` (y's shape), ``relu`` if asked."""
    z1 = F.conv2d(x, first[:, :, None, None])
    z2 = F.conv2d(z1, core, stride=stride, padding=padding, dilation=dilation)
    y = F.conv2d(z2, last[:, :, None, None], bias)
    if scale is not None:
        y = y * scale[None, :, None, None]
    if shift is not None:
        y = y + shift[None, :, None, None]
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y

def kd_loss(student_logits, teacher_logits, targets=None, temperature: float = 4.0, alpha: float = 0.9,
            t2_scale: bool = True, ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Hinton KD: (1 - alpha) CE(targets, s) + alpha c KL(softmax(t/T) || softmax(s/T)), c = T^2 or 1.

    Per row KL = sum_k p_t (log p_t - log p_s). "mean": KL over B rows, CE over the non-ignored rows
    (0 if none); "sum": sums; "none": per-row (B,), CE 0 on ignored rows. ignore_index affects CE only.
    """
    T = float(temperature)
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    kl_rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    per_row = alpha * (T * T if t2_scale else 1.0) * kl_rows
    ce_total = None
    if targets is not None and alpha < 1:
        valid = targets != ignore_index
        ce_rows = F.cross_entropy(student_logits, targets, ignore_index=ignore_index, reduction="none")
        ce_rows = torch.where(valid, ce_rows, torch.zeros_like(ce_rows))
        if reduction == "mean":
            ce_total = (1 - alpha) * ce_rows.sum() / valid.sum().clamp_min(1)
        else:
            per_row = per_row + (1 - alpha) * ce_rows
    if reduction == "mean":
        loss = per_row.mean()
        return loss if ce_total is None else loss + ce_total
    return reduce(per_row, reduction)


# ------------------------------------------------------------------ KR: sparse recoding
def sparse_recoding_(grads, params, taus, boost: float, damp: float, shrink: float, tau_rate: float) -> None:
    """Sparse recoding (kdfast's interpretation of Knowledge Representing, Liu et al. 2019, whose
    equations are not available), per tensor in plain PyTorch ops, in place:

        |theta| >  tau:  g <- boost * g
        |theta| <= tau:  g <- damp * g + shrink * sign(theta)
        then tau <- tau + tau_rate * (mean |theta| - tau)

    float16/bfloat16 are computed in float32 and rounded once; taus stays float32 (the update is
    computed in float64 from the float32 tau). A tensor without entries keeps its tau.
    """
    for i, (g, theta) in enumerate(zip(grads, params)):
        acc = torch.float64 if theta.dtype == torch.float64 else torch.float32
        th, gr = theta.to(acc), g.to(acc)
        tau = taus[i].to(acc)
        dominant = th.abs() > tau
        recoded = torch.where(dominant, boost * gr, damp * gr + shrink * torch.sign(th))
        g.copy_(recoded)
        if theta.numel() > 0:
            mean = th.abs().sum(dtype=torch.float64) / theta.numel()
            taus[i] = (taus[i].double() + tau_rate * (mean - taus[i].double())).float()
