"""BSS: knowledge distillation with adversarial samples supporting the decision boundary.

Heo, Lee, Yun, Choi, "Knowledge Distillation with Adversarial Samples Supporting Decision Boundary",
AAAI 2019 (arXiv 1805.05532). kdfast follows the official code, bhheo/BSS_distillation
(``train_BSS_distillation.py``, ``attacks/attack_BSS.py``), rule for rule; where the paper's text
offers a variant it is an option.

One training step (on top of cross-entropy and Hinton KD on the clean batch):

1. :func:`select_base_samples`: the samples the teacher classifies correctly (``require_student_correct``:
   the paper's "teacher and student both correct"); more than ``max_samples`` (64): the top ones by the
   distill score ``sum_{c != y} (softmax(z_T)_c - softmax(z_S)_c)^2``.
2. :func:`sample_target_classes`: one target class per base sample, drawn with probability
   proportional to the teacher's softmax over every class except its top-1 (vectorised inverse-CDF
   sampling; the official double loop calls ``.cpu()`` per element).
3. :func:`bss_attack`: the iterative targeted attack on the teacher's logits toward the boundary
   between the base class ``b`` and the target ``k``:
   ``x <- clamp(x + eta * a * (f_b - f_k + 1e-4) * g / ||g||_2, -2.5, 2.5)``, ``g = grad_x (f_k - f_b)``,
   ``a = 1`` while the teacher still predicts ``b`` (else the sample stops), at most 10 steps.
4. :func:`bss_loss`: soft cross-entropy between the teacher's and the student's tempered softmax on
   the attacked samples (T = 3, no T^2), weighted by :func:`bss_weights`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

NAME = "bss"
TITLE = "BSS: distillation with adversarial samples supporting the decision boundary"
PAPER = ("Heo, Lee, Yun, Choi, \"Knowledge Distillation with Adversarial Samples Supporting Decision Boundary\", "
         "AAAI 2019 (arXiv 1805.05532); follows the official code bhheo/BSS_distillation "
         "(train_BSS_distillation.py, attacks/attack_BSS.py)")

#: The attack's offset past the boundary (official ``pert + 1e-4``).
OVERSHOOT = 1e-4

__all__ = ["bss_attack", "bss_loss", "bss_weights", "distill_scores", "base_sample_mask", "sample_target_classes",
           "select_base_samples", "soft_cross_entropy"]


# ------------------------------------------------------------------------------------------ checks
def _logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of logits (N, K), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D logits (N, K), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _labels(name: str, y, n: int, k: Optional[int], device) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 class indices, got {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one class per sample), got {tuple(y.shape)}")
    if y.device != torch.device(device):
        raise ValueError(f"{name} is on {y.device} but the logits/inputs are on {device}")


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


# ------------------------------------------------------------------------------------------ weights
def bss_weights(epoch: int, epochs: int) -> Tuple[float, float]:
    """(clean-KD weight, BSS weight) of epoch ``epoch`` in 1..``epochs`` (the official schedule).

    ``kd = max(3 (1 - e/E), 0) + 1`` (4 -> 1) and ``bss = max(2 (1 - (4/3) e/E), 0)`` (2 -> 0, zero for
    the last quarter of training). Epochs count from 1 as in the official loop.
    """
    _positive_int("epochs", epochs)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= epochs:
        raise ValueError(f"epoch must be an int in 1..epochs={epochs} (counted from 1), got {epoch!r}")
    e = epoch / epochs
    return max(3.0 * (1.0 - e), 0.0) + 1.0, max(2.0 * (1.0 - 4.0 / 3.0 * e), 0.0)


# ------------------------------------------------------------------------------------------ losses
def soft_cross_entropy(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """``-(1/N) sum_n sum_c softmax(z_T/T)_nc log softmax(z_S/T)_nc``: the official KD and BSS term (no T^2).

    The teacher side is detached. ``N = 0`` gives a zero that keeps the student's graph.
    """
    _logits("s_logits", s_logits)
    _logits("t_logits", t_logits)
    if s_logits.shape != t_logits.shape:
        raise ValueError(f"s_logits {tuple(s_logits.shape)} and t_logits {tuple(t_logits.shape)} must have the same shape")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if s_logits.shape[0] == 0:
        return s_logits.sum() * 0.0
    p_t = F.softmax(t_logits.detach() / temperature, dim=1)
    return -(p_t * F.log_softmax(s_logits / temperature, dim=1)).sum(dim=1).mean()


def bss_loss(s_adv_logits: torch.Tensor, t_adv_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """The BSS term: :func:`soft_cross_entropy` on the attacked samples (mean over them, T = 3, no T^2)."""
    return soft_cross_entropy(s_adv_logits, t_adv_logits, temperature)


# ------------------------------------------------------------------------------------------ base samples
def base_sample_mask(t_logits: torch.Tensor, s_logits: Optional[torch.Tensor], targets: torch.Tensor, *,
                     require_student_correct: bool = False) -> torch.Tensor:
    """Bool (N,): the teacher's top-1 is the label (and the student's too with ``require_student_correct``)."""
    _logits("t_logits", t_logits)
    _labels("targets", targets, t_logits.shape[0], None, t_logits.device)
    mask = t_logits.argmax(dim=1) == targets
    if require_student_correct:
        if s_logits is None:
            raise ValueError("require_student_correct=True needs s_logits")
        mask = mask & (s_logits.argmax(dim=1) == targets)
    return mask


def distill_scores(t_logits: torch.Tensor, s_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) ``sum_{c != y} (softmax(z_T)_c - softmax(z_S)_c)^2`` at T = 1 (float32 or the logits' float64)."""
    _logits("t_logits", t_logits)
    _logits("s_logits", s_logits)
    if s_logits.shape != t_logits.shape:
        raise ValueError(f"s_logits {tuple(s_logits.shape)} and t_logits {tuple(t_logits.shape)} must have the same shape")
    _labels("targets", targets, t_logits.shape[0], None, t_logits.device)
    dtype = torch.float64 if t_logits.dtype == torch.float64 else torch.float32
    diff = (F.softmax(t_logits.detach().to(dtype), 1) - F.softmax(s_logits.detach().to(dtype), 1)).square()
    return diff.sum(dim=1) - diff.gather(1, targets.unsqueeze(1)).squeeze(1)


def top_scored(mask: torch.Tensor, scores: torch.Tensor, max_samples: Optional[int]) -> torch.Tensor:
    """Row indices where ``mask``; if more than ``max_samples``, the ``max_samples`` highest ``scores``
    (descending, ties by index). Otherwise in increasing index order (the official code's orders)."""
    idx = mask.nonzero().squeeze(1)
    if max_samples is not None and idx.numel() > max_samples:
        order = scores[idx].sort(descending=True, stable=True).indices[:max_samples]
        idx = idx[order]
    return idx


def select_base_samples(t_logits: torch.Tensor, s_logits: torch.Tensor, targets: torch.Tensor,
                        max_samples: Optional[int] = 64, *, require_student_correct: bool = False) -> torch.Tensor:
    """Row indices (int64) of the base samples of a batch (official rule; see the module docstring).

    The teacher must classify a base sample correctly (``require_student_correct=True``: the student
    too). With more than ``max_samples`` candidates (None: no cap), the ``max_samples`` with the
    largest distill score are kept, in descending score order; otherwise all of them in row order.
    A batch with no candidate gives an empty tensor.
    """
    _positive_int("max_samples", max_samples, allow_none=True)
    mask = base_sample_mask(t_logits, s_logits, targets, require_student_correct=require_student_correct)
    scores = distill_scores(t_logits, s_logits, targets)
    return top_scored(mask, scores, max_samples)


# ------------------------------------------------------------------------------------------ target classes
def sample_target_classes(t_logits: torch.Tensor, generator: Optional[torch.Generator] = None, *,
                          uniforms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One target class per row, ``P(k) = q_k / sum_{k' != b} q_k'`` for ``k != b``, ``q = softmax(z_T)``,
    ``b`` the teacher's top-1 (it is never drawn).

    Inverse-CDF sampling over the classes sorted by decreasing ``q`` (the official order), all rows at
    once on the logits' device: no host synchronisation. ``generator`` (on any device) draws the
    uniforms; ``uniforms`` (N,) in [0, 1) supplies them instead (DDP: one draw per sample of the global
    batch). The threshold is ``u`` times the last cumulative sum, so rounding can never run past the
    last class (the official code multiplies by a separately computed sum and falls back to the
    second-ranked class when rounding does).
    """
    _logits("t_logits", t_logits)
    n, k = t_logits.shape
    if k < 2:
        raise ValueError(f"t_logits needs at least 2 classes to draw a target other than the top-1, got K = {k}")
    dtype = torch.float64 if t_logits.dtype == torch.float64 else torch.float32
    if uniforms is None:
        gen_device = generator.device if generator is not None else t_logits.device
        uniforms = torch.rand(n, generator=generator, device=gen_device, dtype=dtype)
    else:
        if generator is not None:
            raise ValueError("pass either generator or uniforms, not both")
        if not isinstance(uniforms, torch.Tensor) or uniforms.shape != (n,) or not uniforms.is_floating_point():
            raise ValueError(f"uniforms must be a floating-point tensor of shape ({n},), got "
                             f"{tuple(uniforms.shape) if isinstance(uniforms, torch.Tensor) else type(uniforms).__name__}")
    q = F.softmax(t_logits.detach().to(dtype), dim=1)
    q_sorted, classes = q.sort(dim=1, descending=True)
    cdf = q_sorted[:, 1:].cumsum(dim=1)                      # classes 2..K by decreasing probability
    threshold = uniforms.to(device=cdf.device, dtype=dtype) * cdf[:, -1]
    # first position whose cumulative probability reaches the threshold (the official ">=" rule)
    pos = (cdf < threshold.unsqueeze(1)).sum(dim=1).clamp_(max=k - 2)
    return classes[:, 1:].gather(1, pos.unsqueeze(1)).squeeze(1)


# ------------------------------------------------------------------------------------------ the attack
def _l2_rows(g: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm over all but the first dim, shaped (N, 1, ..., 1) for broadcasting."""
    return torch.linalg.vector_norm(g.flatten(1), dim=1).view(-1, *([1] * (g.dim() - 1)))


def bss_attack(teacher: nn.Module, x: torch.Tensor, target_classes: torch.Tensor, steps: int = 10,
               step_size: float = 0.3, clamp: Optional[Tuple[float, float]] = (-2.5, 2.5), *,
               shrink_below: float = 0.75) -> torch.Tensor:
    """Boundary-supporting samples: ``x`` moved toward the teacher's boundary between its top-1 class
    ``b`` (at the start) and ``target_classes`` (official ``AttackBSS``, targeted, L2, no epsilon-ball).

    Each step, for the samples still predicted as ``b``: ``g = grad_x (f_k - f_b)`` of the teacher's
    logits ``f``, ``x <- clamp(x + step_size (f_b - f_k + 1e-4) g / ||g||_2)`` with the per-sample L2 norm
    over C*H*W (not squared). A sample whose teacher prediction left ``b`` stops (it has crossed the
    boundary, just past it); the attack ends when all have stopped or after ``steps`` steps. A zero
    gradient moves nothing (the official code divides 0 by 0 there).

    Speed: one teacher forward + backward per step on the batch of the still-moving samples. Stopped
    samples never move again (the teacher is in eval mode, so a sample's logits do not depend on the
    others), so when the moving ones fall under ``shrink_below`` of the batch being attacked the batch
    shrinks to them (1.0: shrink at every stop; 0: never). The early-stop test is one host sync per step.

    AMP: the teacher runs under the caller's autocast (its dtype); the gradient, the step and ``x``
    stay in float32 (float64 inputs stay float64). The teacher is put in eval mode for the call (and
    restored); no gradient reaches its weights. Returns a new tensor like ``x`` (no grad).
    """
    if not isinstance(teacher, nn.Module) and not callable(teacher):
        raise TypeError(f"teacher must be an nn.Module (or a callable returning logits), got {type(teacher).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating-point tensor (N, ...) with at least 2 dims, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    _labels("target_classes", target_classes, x.shape[0], None, x.device)
    _positive_int("steps", steps)
    if not (isinstance(step_size, (int, float)) and not isinstance(step_size, bool) and step_size > 0
            and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a positive finite number, got {step_size!r}")
    if clamp is not None:
        if not (isinstance(clamp, (tuple, list)) and len(clamp) == 2 and float(clamp[0]) < float(clamp[1])):
            raise ValueError(f"clamp must be None or (low, high) with low < high, got {clamp!r}")
        lo, hi = float(clamp[0]), float(clamp[1])
    if not (isinstance(shrink_below, (int, float)) and 0.0 <= shrink_below <= 1.0):
        raise ValueError(f"shrink_below must be in [0, 1], got {shrink_below!r}")

    n = x.shape[0]
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.detach().to(work_dtype, copy=True)
    if n == 0:
        return out.to(x.dtype)

    # eval mode for the call; each submodule's own mode is restored afterwards (a recursive train()
    # would also switch submodules the caller keeps in eval mode)
    modes = [(m, m.training) for m in teacher.modules()] if isinstance(teacher, nn.Module) else []
    for m, _ in modes:
        m.training = False
    try:
        with torch.enable_grad():
            rows = None                        # indices into out of the batch being attacked (None: all)
            xs = out                           # the batch being attacked
            tgt = target_classes
            base = None
            for step in range(steps):
                xs = xs.detach().requires_grad_(True)
                logits = teacher(xs)
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != xs.shape[0]:
                    raise ValueError(f"the teacher must return logits (N, K) for N = {xs.shape[0]} inputs, got "
                                     f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
                logits = logits.to(work_dtype)
                pred = logits.detach().argmax(dim=1)
                if base is None:               # step 0: every sample moves; validate the targets (one sync)
                    base = pred
                    out_of_range, is_base = torch.stack(
                        [((tgt < 0) | (tgt >= logits.shape[1])).any(), (tgt == base).any()]).tolist()
                    if out_of_range:
                        raise ValueError(f"target_classes must be in [0, {logits.shape[1]}) (the teacher's classes)")
                    if is_base:
                        raise ValueError("target_classes must differ from the teacher's top-1 class of each sample "
                                         "(the attack moves toward the boundary between the two)")
                moving = pred == base
                n_moving = xs.shape[0] if step == 0 else int(moving.sum())  # early-stop test: one sync per step
                if n_moving == 0:
                    break
                f_b = logits.gather(1, base.unsqueeze(1)).squeeze(1)
                f_k = logits.gather(1, tgt.unsqueeze(1)).squeeze(1)
                (g,) = torch.autograd.grad((f_k - f_b).sum(), xs)
                g = g.to(work_dtype)
                norm = _l2_rows(g)
                coef = step_size * moving.to(work_dtype) * ((f_b - f_k).detach() + OVERSHOOT)
                coef = coef.view_as(norm) / torch.where(norm > 0, norm, torch.ones_like(norm))
                new = xs.detach() + coef * g
                if clamp is not None:
                    new = new.clamp_(lo, hi)
                xs = new
                if n_moving < shrink_below * xs.shape[0] and step + 1 < steps:
                    # write the batch back, keep attacking only the moving samples
                    if rows is None:
                        out = xs
                    else:
                        out.index_copy_(0, rows, xs)
                    keep = moving.nonzero().squeeze(1)
                    rows = keep if rows is None else rows[keep]
                    xs, tgt, base = xs[keep], tgt[keep], base[keep]
            if rows is None:
                out = xs.detach()
            else:
                out.index_copy_(0, rows, xs.detach())
    finally:
        for m, mode in modes:
            m.training = mode
    return out.to(x.dtype)

