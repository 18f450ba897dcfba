"""Pure-PyTorch reference implementations: the oracle of the tests.

Written for clarity, straight from the formulas, with no concern for memory or speed.
Spatial mismatch: where two maps' spatial sizes differ, the larger is adaptive-average-pooled to
the smaller before anything else (RepDistiller's convention, generalised to non-square maps).
"""
from __future__ import annotations

import math

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


# ------------------------------------------------------------------ BSS (Heo et al., AAAI 2019)
# The rules of the official code (bhheo/BSS_distillation, train_BSS_distillation.py and
# attacks/attack_BSS.py), restated in float64 one rule at a time, with no concern for speed.
def bss_weights(epoch: int, epochs: int):
    """(clean-KD weight, BSS weight) of epoch 1..E: max(3(1 - e/E), 0) + 1 and max(2(1 - 4e/(3E)), 0)."""
    return max(3 * (1 - epoch / epochs), 0) + 1, max(2 * (1 - 4 / 3 * epoch / epochs), 0) + 0


def bss_soft_ce(s_logits, t_logits, temperature: float = 3.0):
    """-(1/N) sum_n sum_c softmax(t/T)_nc log softmax(s/T)_nc (the official KD and BSS terms, no T^2)."""
    s, t = s_logits.double(), t_logits.double()
    return -(F.softmax(t / temperature, 1) * F.log_softmax(s / temperature, 1)).sum() / s.shape[0]


def bss_select_base_samples(t_logits, s_logits, targets, max_samples=64, require_student_correct=True):
    """Indices of the samples whose teacher and student top-1 are the label (the teacher's alone with
    require_student_correct=False); above
    max_samples, the max_samples largest distill scores sum_{c != y} (softmax(t) - softmax(s))^2 (T = 1),
    in descending score order (ties: lower index first); otherwise all, in index order."""
    t, s = t_logits.double(), s_logits.double()
    keep = [n for n in range(t.shape[0]) if int(t[n].argmax()) == int(targets[n])
            and (not require_student_correct or int(s[n].argmax()) == int(targets[n]))]
    if max_samples is None or len(keep) <= max_samples:
        return torch.tensor(keep, dtype=torch.int64)
    diff = (F.softmax(t, 1) - F.softmax(s, 1)) ** 2
    score = {n: float(diff[n].sum() - diff[n, targets[n]]) for n in keep}
    ranked = sorted(keep, key=lambda n: (-score[n], n))
    return torch.tensor(ranked[:max_samples], dtype=torch.int64)


def bss_target_probabilities(t_logits):
    """(N, K) probability of each class being the target: q_k / sum_{k' != b} q_k' for k != b, 0 for the
    teacher's top-1 b, q = softmax(t)."""
    q = F.softmax(t_logits.double(), 1)
    top = q.argmax(1)
    q = q.clone()
    q[torch.arange(q.shape[0]), top] = 0.0
    return q / q.sum(1, keepdim=True)


def bss_target_from_uniform(t_logits, uniforms):
    """The class drawn by inverse-CDF sampling for each row's uniform u in [0, 1): classes other than
    the top-1 in order of decreasing softmax, the first whose cumulative probability reaches u times
    the total."""
    out = []
    for row, u in zip(t_logits.double(), uniforms.double()):
        q = F.softmax(row, 0)
        order = sorted(range(q.numel()), key=lambda c: -float(q[c]))[1:]
        total = sum(float(q[c]) for c in order)
        acc, pick = 0.0, order[-1]
        for c in order:
            acc += float(q[c])
            if acc >= float(u) * total:
                pick = c
                break
        out.append(pick)
    return torch.tensor(out, dtype=torch.int64)


def bss_attack(teacher, x, target_classes, steps: int = 10, step_size: float = 0.3, clamp=(-2.5, 2.5),
               overshoot: float = 1e-4):
    """The official AttackBSS (targeted, L2), whole batch every step, float64.

    b = argmax f(x^0). Step i: a_n = 1[argmax f(x^i)_n = b_n]; if every a_n = 0, stop; otherwise
    g = grad_x sum_n (f_k - f_b)(x^i), x^{i+1} = clamp(x^i + step_size a (f_b - f_k + overshoot) g / ||g||_2)
    with the per-sample L2 norm over all non-batch dims (a zero norm moves nothing). At most ``steps``.
    Returns (x_final, number of teacher calls).
    """
    x = x.detach().double().clone()
    base, calls = None, 0
    for step in range(steps):
        xv = x.clone().requires_grad_(True)
        out = teacher(xv).double()
        calls += 1
        if step == 0:
            base = out.argmax(1)
        active = (out.argmax(1) == base).double()
        if active.sum() == 0:
            break
        f_b = out.gather(1, base[:, None])[:, 0]
        f_k = out.gather(1, target_classes[:, None])[:, 0]
        (g,) = torch.autograd.grad((f_k - f_b).sum(), xv)
        norm = g.flatten(1).pow(2).sum(1).sqrt()
        scale = step_size * active * (f_b - f_k).detach() + step_size * active * overshoot
        scale = torch.where(norm > 0, scale / torch.where(norm > 0, norm, torch.ones_like(norm)),
                            torch.zeros_like(norm))
        x = x + scale.view(-1, *([1] * (x.dim() - 1))) * g
        if clamp is not None:
            x = x.clamp(clamp[0], clamp[1])
    return x, calls


# ------------------------------------------------------------------ data-free KD (DAFL, RDSKD, DFAD)
# Straight from the formulas in float64: CE as logsumexp minus the max logit, entropies with explicit
# log bases, Frobenius norms as square roots of sums of squares.
def _log_softmax64(z):
    z = z.double()
    return z - torch.logsumexp(z, dim=1, keepdim=True)


def _one_hot_ce(z):
    # CE(z, argmax z) = mean_i (logsumexp_k z_ik - max_k z_ik)
    z = z.double()
    return (torch.logsumexp(z, dim=1) - z.max(dim=1).values).mean()


def _sum_p_log_p(z, log_base):
    p = _log_softmax64(z).exp().mean(dim=0)
    return (p * torch.log(p)).sum() / math.log(log_base)


def dafl_generator_losses(t_logits, t_features):
    """DAFL (Chen et al., ICCV 2019) as its code normalises: one_hot = CE(z, argmax z);
    activation = -(1 / (B d)) sum |f| (mean over batch and features); info_entropy =
    sum_k p_k log10 p_k with p the batch-mean softmax."""
    f = t_features.double()
    return {
        "one_hot": _one_hot_ce(t_logits),
        "activation": -f.abs().sum() / f.numel(),
        "info_entropy": _sum_p_log_p(t_logits, 10.0),
    }


def rdskd_generator_losses(t_logits_1, t_logits_2, x_1, x_2):
    """RDSKD (Han et al., ICASSP 2021) as its code computes them: one_hot and class_diversity
    (natural log) over both halves; sample_diversity = 1 / (||x2 - x1||_F / ||p2 - p1||_F + 1e-20)."""
    z = torch.cat([t_logits_1, t_logits_2]).double()
    dx = (x_2.double() - x_1.double()).pow(2).sum().sqrt()
    dp = (_log_softmax64(t_logits_2).exp() - _log_softmax64(t_logits_1).exp()).pow(2).sum().sqrt()
    return {
        "one_hot": _one_hot_ce(z),
        "class_diversity": _sum_p_log_p(z, math.e),
        "sample_diversity": 1.0 / (dx / dp + 1e-20),
    }


def rdskd_generator_objective(losses, previous=None):
    """exp(one_hot - prev_one_hot) + exp(class_diversity - prev_class_diversity) + sample_diversity."""
    previous = previous or {}
    prev_oh = float(previous.get("one_hot", 0.0))
    prev_cd = float(previous.get("class_diversity", 0.0))
    return (torch.exp(losses["one_hot"].double() - prev_oh) + torch.exp(losses["class_diversity"].double() - prev_cd)
            + losses["sample_diversity"].double())


def dfad_discrepancy(s_logits, t_logits):
    """DFAD (Fang et al. 2019) model discrepancy: (1 / (B K)) sum |z_S - z_T|."""
    return (s_logits.double() - t_logits.double()).abs().sum() / s_logits.numel()


# ------------------------------------------------------------------ SRM: sparse codes
def sparse_codes(x, dictionary, bias, k: int):
    """SRM's sparse codes (Tran et al., arXiv 2103.17012): per pixel s = sigmoid(C^T x + b) and its k
    largest entries, (values, indices) of shape (N, H, W, k), descending. Entries are ranked by the
    pre-activation C^T x (the order of s in exact arithmetic, also where the sigmoid saturates), ties
    by lower codeword index (a stable sort)."""
    z = torch.einsum("ndhw,dk->nhwk", x, dictionary)
    s = torch.sigmoid(z + bias.reshape(()))
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :k]
    return s.gather(-1, order), order


def srm_masked_codes(x, dictionary, bias, k: int) -> torch.Tensor:
    """The dense masked codes s_hat (N, H, W, K): s on the k selected codewords, 0 elsewhere."""
    values, indices = sparse_codes(x, dictionary, bias, k)
    z = torch.einsum("ndhw,dk->nhwk", x, dictionary)
    return torch.zeros_like(z).scatter(-1, indices, values)


def srm_reconstruct(x, dictionary, bias, k: int) -> torch.Tensor:
    """SRM's reconstruction C s_hat per pixel, (N, D, H, W)."""
    return torch.einsum("dk,nhwk->ndhw", dictionary, srm_masked_codes(x, dictionary, bias, k))


def srm_labels(x, dictionary, bias, k: int):
    """SRM's labels: image labels (N, K) = the spatial mean of the masked codes; pixel labels (N, H, W)
    = the codeword of the largest code."""
    masked = srm_masked_codes(x, dictionary, bias, k)
    return masked.mean(dim=(1, 2)), sparse_codes(x, dictionary, bias, 1)[1][..., 0]
