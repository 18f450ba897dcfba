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
def bss_official_base_samples(out_t, out_s, targets, attack_size: int = 64):
    """train_BSS_distillation.py at HEAD (since commit "Reproducing"): the samples the teacher AND the
    student classify correctly (``attack_flag = condition1 & condition2``); above ``attack_size``, the
    ``attack_size`` largest distill scores (T = 1), in descending order. Returns the row indices."""
    condition1 = targets == out_t.sort(dim=1, descending=True)[1][:, 0]
    condition2 = targets == out_s.sort(dim=1, descending=True)[1][:, 0]
    attack_flag = condition1 & condition2
    attack_idx = attack_flag.nonzero().squeeze(1)  # squeeze(1): the official squeeze() breaks on one sample
    if attack_idx.shape[0] > attack_size:
        diff = (F.softmax(out_t[attack_idx, :], 1) - F.softmax(out_s[attack_idx, :], 1)) ** 2
        distill_score = diff.sum(dim=1) - diff.gather(1, targets[attack_idx].unsqueeze(1)).squeeze(1)
        attack_idx = attack_idx[distill_score.sort(descending=True)[1][:attack_size]]
    return attack_idx


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


# ------------------------------------------------------------------------------- data-free KD
# The generator losses and one training iteration of each method, written the way the official code
# writes them (read in the repositories; no code copied): DAFL huawei-noah/Efficient-Computing
# Data-Efficient-Model-Compression/DAFL/DAFL-train.py; RDSKD PengchaoHan/RDSKD generator-train.py and
# student-train.py; DFAD VainF/Data-Free-Adversarial-Distillation DFAD_mnist.py. The iterations take
# their noise z as an argument so that a benchmark can feed both sides the same draws.
def _official_kdloss(y, teacher_scores):
    # DAFL / RDSKD utils.kdloss: KL(softmax(t) || softmax(y)) summed, divided by the batch size.
    return F.kl_div(F.log_softmax(y, dim=1), F.softmax(teacher_scores, dim=1), reduction="sum") / y.shape[0]


def dafl_official_generator_losses(outputs_T, features_T):
    """DAFL-train.py: (one_hot, activation, information_entropy) with log10 and .data argmax."""
    pred = outputs_T.data.max(1)[1]
    loss_activation = -features_T.abs().mean()
    loss_one_hot = F.cross_entropy(outputs_T, pred)
    softmax_o_T = F.softmax(outputs_T, dim=1).mean(dim=0)
    loss_information_entropy = (softmax_o_T * torch.log10(softmax_o_T)).sum()
    return loss_one_hot, loss_activation, loss_information_entropy


def dafl_official_iteration(generator, teacher_with_features, student, optimizer_G, optimizer_S, z,
                            oh=1.0, ie=5.0, a=0.1):
    """One DAFL-train.py iteration: one backward of (generator losses + KD(student(G(z).detach()), T = 1)),
    then optimizer_G.step() and optimizer_S.step(). ``teacher_with_features(x) -> (logits, features)``
    stands for the official ``teacher(gen_imgs, out_feature=True)``."""
    optimizer_G.zero_grad()
    optimizer_S.zero_grad()
    gen_imgs = generator(z)
    outputs_T, features_T = teacher_with_features(gen_imgs)
    loss_one_hot, loss_activation, loss_information_entropy = dafl_official_generator_losses(outputs_T, features_T)
    loss = loss_one_hot * oh + loss_information_entropy * ie + loss_activation * a
    loss_kd = _official_kdloss(student(gen_imgs.detach()), outputs_T.detach())
    loss = loss + loss_kd
    loss.backward()
    optimizer_G.step()
    optimizer_S.step()
    return loss.detach()


def rdskd_official_generator_losses(teacher, gen_imgs1, gen_imgs2):
    """generator-train.py: two teacher passes (one per half), then one_hot and information entropy
    (natural log) over the concatenated logits and the diversity-seeking loss."""
    outputs_T1 = teacher(gen_imgs1)
    outputs_T2 = teacher(gen_imgs2)
    outputs_T = torch.cat((outputs_T1, outputs_T2))
    pred = outputs_T.data.max(1)[1]
    loss_one_hot = F.cross_entropy(outputs_T, pred)
    mean_softmax_T = F.softmax(outputs_T, dim=1).mean(dim=0)
    loss_information_entropy = (mean_softmax_T * torch.log(mean_softmax_T)).sum()
    softmax_o_T1 = F.softmax(outputs_T1, dim=1)
    softmax_o_T2 = F.softmax(outputs_T2, dim=1)
    lz = torch.norm(gen_imgs2 - gen_imgs1) / torch.norm(softmax_o_T2 - softmax_o_T1)
    loss_diversity_seeking = 1 / (lz + 1 * 1e-20)
    return loss_one_hot, loss_information_entropy, loss_diversity_seeking


def rdskd_official_generator_iteration(generator, teacher, optimizer_G, z, state, i):
    """One generator-train.py iteration (``i``: iteration index in the 120-iteration epoch; ``state``:
    dict holding loss_oh_prev / loss_ie_pre, initially 0). The code writes four ``.item()`` values
    per iteration to a CSV file; the ``.item()`` calls (host syncs) are kept, the file I/O is not."""
    optimizer_G.zero_grad()
    gen_imgs = generator(z)
    gen_imgs1, gen_imgs2 = torch.split(gen_imgs, z.shape[0] // 2, dim=0)
    loss_one_hot, loss_information_entropy, loss_diversity_seeking = rdskd_official_generator_losses(
        teacher, gen_imgs1, gen_imgs2)
    loss = (torch.exp(loss_one_hot - state.get("loss_oh_prev", 0.0))
            + torch.exp(loss_information_entropy - state.get("loss_ie_pre", 0.0)) + loss_diversity_seeking)
    loss.backward()
    optimizer_G.step()
    if i == 1:
        state["loss_oh_prev"] = loss_one_hot.detach()
        state["loss_ie_pre"] = loss_information_entropy.detach()
    _ = (loss_one_hot.item(), loss_information_entropy.item(), loss_diversity_seeking.item(), loss.item())
    return loss.detach()


def rdskd_official_student_iteration(generator, teacher, student, optimizer_S, z, temperature=10.0):
    """One student-train.py iteration: the (eval-mode) generator and the teacher run with autograd
    on (their graphs are built and discarded), KD at T with the T^2 factor on detached images."""
    optimizer_S.zero_grad()
    gen_imgs = generator(z)
    outputs_T = teacher(gen_imgs)
    T = float(temperature)
    loss = T * T * _official_kdloss(student(gen_imgs.detach()) / T, outputs_T.detach() / T)
    loss.backward()
    optimizer_S.step()
    return loss.detach()


def dfad_official_iteration(generator, teacher, student, optimizer_S, optimizer_G, zs):
    """One DFAD_mnist.py iteration: for each of the first len(zs) - 1 noise draws a student step on
    L1(student(G(z).detach()), teacher(...).detach()), then a generator step on -L1 with the last draw.
    The official teacher keeps requires_grad (never frozen), so its weight gradients are computed in
    the generator step; pass the teacher as the code has it."""
    for z in zs[:-1]:
        optimizer_S.zero_grad()
        fake = generator(z).detach()
        t_logit = teacher(fake)
        s_logit = student(fake)
        loss_S = F.l1_loss(s_logit, t_logit.detach())
        loss_S.backward()
        optimizer_S.step()
    optimizer_G.zero_grad()
    fake = generator(zs[-1])
    t_logit = teacher(fake)
    s_logit = student(fake)
    loss_G = -F.l1_loss(s_logit, t_logit)
    loss_G.backward()
    optimizer_G.step()
    return loss_S.detach(), loss_G.detach()


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
