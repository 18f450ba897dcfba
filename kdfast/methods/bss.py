"""BSS: knowledge distillation with adversarial samples supporting the decision boundary.

Heo, Lee, Yun, Choi, "Knowledge Distillation with Adversarial Samples Supporting Decision Boundary",
AAAI 2019 (arXiv 1805.05532). kdfast follows the official code, bhheo/BSS_distillation
(``train_BSS_distillation.py``, ``attacks/attack_BSS.py``), rule for rule; where the paper's text
offers a variant it is an option.

One training step (on top of cross-entropy and Hinton KD on the clean batch):

1. :func:`select_base_samples`: the samples that the teacher **and** the student classify correctly
   (the official code since its commit "Reproducing", ``attack_flag = condition1 & condition2``; the
   repository's first commit checked the teacher alone, kept as ``require_student_correct=False``,
   "teacher-only"); more than ``max_samples`` (64): the top ones by the distill score
   ``sum_{c != y} (softmax(z_T)_c - softmax(z_S)_c)^2``.
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
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distill import Distiller, StepTensors, autocast, mix_seed
from . import options as T

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
    return _weights(epoch, epochs)


def _check_kd_scale(kd_scale) -> float:
    """``kd_scale``: the factor on the official clean-KD weight kd_w(e) (1 = official), a positive finite number."""
    if isinstance(kd_scale, bool) or not isinstance(kd_scale, (int, float)) or not (
            kd_scale > 0 and math.isfinite(kd_scale)):
        raise ValueError(f"kd_scale must be a positive finite number (1 = the official KD weight), got {kd_scale!r}")
    return float(kd_scale)


def _weights(epoch: int, epochs: int) -> Tuple[float, float]:
    e = epoch / epochs  # past the last epoch: (1, 0)
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
                     require_student_correct: bool = True) -> torch.Tensor:
    """Bool (N,): the teacher's and the student's top-1 are the label (the official rule); with
    ``require_student_correct=False`` ("teacher-only", the official code's first commit) the teacher's alone."""
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
                        max_samples: Optional[int] = 64, *, require_student_correct: bool = True) -> torch.Tensor:
    """Row indices (int64) of the base samples of a batch (official rule; see the module docstring).

    The teacher and the student must both classify a base sample correctly (``require_student_correct=False``:
    teacher-only, the official code's first commit). With more than ``max_samples`` candidates (None: no cap), the ``max_samples`` with the
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
               shrink_below: float = 0.75, stats: Optional[dict] = None) -> torch.Tensor:
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

    ``stats``: a dict to fill with ``"moving"``, the number of still-moving samples at each teacher
    call (the number of calls is its length).
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

    if stats is not None:
        stats["moving"] = []
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
                if stats is not None:
                    stats.setdefault("moving", []).append(n_moving)
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


# ------------------------------------------------------------------------------------------ the trainer

#: The method's options (``build`` keywords) and their defaults: the official code's values.
OPTIONS = {
    "temperature": 3.0,               # T of the clean KD and the BSS terms (no T^2)
    "max_samples": 64,                # base samples per (global) batch
    "attack_steps": 10,
    "step_size": 0.3,
    "clamp": (-2.5, 2.5),             # pixel range in normalised space (CIFAR normalisation)
    "require_student_correct": True,  # official: teacher and student both correct (False: teacher-only)
    "shrink_below": 0.75,             # see bss_attack
    "epochs": 80,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "milestones": None,               # None: LR x0.1 at epochs E/2 and 3E/4 (official 40, 60 of 80)
}
OPTION_TYPES = {  # checked by kdfast.methods.check_options before build
    "temperature": T.POSITIVE, "max_samples": T.optional(T.POSITIVE_INT), "attack_steps": T.POSITIVE_INT,
    "step_size": T.POSITIVE, "clamp": T.optional(T.pair_of_numbers("(lo, hi)")), "require_student_correct": T.BOOL,
    "shrink_below": T.FRACTION, "epochs": T.POSITIVE_INT, "lr": T.POSITIVE, "momentum": T.NON_NEGATIVE,
    "weight_decay": T.NON_NEGATIVE, "milestones": T.MILESTONES,
}


class SoftCrossEntropy(nn.Module):
    """The official clean KD term as an engine loss: ``soft_cross_entropy(s, t, T)`` (no T^2)."""

    kdfast_inputs = "logits"

    def __init__(self, temperature: float = 3.0):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, student_logits, teacher_logits, targets=None):
        return soft_cross_entropy(student_logits, teacher_logits, self.temperature)


class BSSDistiller(Distiller):
    """BSS training on the :class:`kdfast.distill.Distiller` engine (data order, DDP, AMP, checkpoints).

    Each step: ``CE(z_S, y) + kd_scale * kd_w(e) * softCE_T(z_S, z_T)`` (``kd_scale`` 1: official) on the
    clean batch (the engine's losses ``"ce"`` and ``"kd"``), plus, while ``bss_w(e) > 0``, ``bss_w(e) * softCE_T(z_S(x_hat), z_T(x_hat))``
    over the boundary-supporting samples ``x_hat`` (:func:`select_base_samples`,
    :func:`sample_target_classes`, :func:`bss_attack`), with the weights of :func:`bss_weights` over
    ``schedule_epochs`` (default: ``epochs``). A step where no sample qualifies has no BSS term, nor
    one where a single sample qualifies in the global batch and the student has BatchNorm (train-mode
    BatchNorm cannot normalise one sample whose maps are 1x1; the official code raises there).

    The adversarial forward runs the student in train mode on the attacked batch alone (its BatchNorm
    sees that batch's statistics and updates its running statistics with them, as in the official code).

    DDP: each rank attacks the base samples of its own shard, and the step equals one process on the
    global batch: the base samples are chosen among the whole global batch (the ranks exchange each
    sample's eligibility and distill score, so ``max_samples`` counts over the global batch), the
    uniforms of the target draws come from a generator seeded by (seed, step) and indexed by the sample's
    position in the global batch (rank r's row i is global row ``i * world_size + r``, the order of the
    engine's DistributedSampler), and each rank's BSS term is scaled by ``world_size * n_rank / N`` so
    DDP's gradient average is the mean over all ``N`` attacked samples. Exact equality with one process
    also needs a student without BatchNorm (per-rank statistics otherwise), as for any DDP run. The
    ranks' batches must have equal sizes (the engine's sampler guarantees it).

    AMP: the attack's teacher forward runs in the autocast dtype, its update in float32; the losses
    are computed in float32.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, *, temperature: float = 3.0,
                 max_samples: Optional[int] = 64, attack_steps: int = 10, step_size: float = 0.3,
                 clamp: Optional[Tuple[float, float]] = (-2.5, 2.5), require_student_correct: bool = True,
                 shrink_below: float = 0.75, schedule_epochs: Optional[int] = None, kd_scale: float = 1.0, **kwargs):
        if teacher is None:
            raise ValueError("BSSDistiller needs a teacher")
        _positive_int("max_samples", max_samples, allow_none=True)
        _positive_int("attack_steps", attack_steps)
        _positive_int("schedule_epochs", schedule_epochs, allow_none=True)
        _positive_int("epochs", kwargs.get("epochs", 1))  # before the schedule divides by it
        if "losses" in kwargs:
            raise ValueError("BSSDistiller defines its own losses (CE + soft-CE KD + BSS); do not pass losses")
        self.temperature = float(temperature)
        self.max_samples = max_samples
        self.attack = dict(steps=attack_steps, step_size=step_size, shrink_below=shrink_below,
                           clamp=None if clamp is None else tuple(float(c) for c in clamp))
        self.require_student_correct = bool(require_student_correct)
        self.schedule_epochs = schedule_epochs or kwargs.get("epochs", 1)
        self._bss_weight = _weights(1, self.schedule_epochs)[1]
        self.kd_scale = _check_kd_scale(kd_scale)
        kd_weight = lambda epoch: self.kd_scale * _weights(epoch + 1, self.schedule_epochs)[0]  # noqa: E731 (0-based)
        super().__init__(teacher, student, {"ce": nn.CrossEntropyLoss(),
                                            "kd": (SoftCrossEntropy(temperature), kd_weight)}, **kwargs)
        #: per epoch: steps, steps with a BSS term, attacked samples, teacher calls of the attacks (this rank)
        self.bss_epoch_stats: dict = {"steps": 0, "bss_steps": 0, "attacked": 0, "teacher_calls": 0}
        self._student_has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
        # validated once here rather than at the first step
        soft_cross_entropy(torch.zeros(1, 2), torch.zeros(1, 2), self.temperature)
        if all(_weights(e, self.schedule_epochs)[1] == 0 for e in range(1, self.epochs + 1)):
            # the schedule switches BSS's own term off for the whole run: it would be plain KD under BSS's name
            warnings.warn(
                f"BSS term off for the whole run: its weight 2 max(1 - 4e / 3E, 0) is 0 in every epoch e of "
                f"{self.epochs} with E = schedule_epochs = {self.schedule_epochs}, so this run is plain KD; train for "
                "at least 2 epochs (or a longer schedule_epochs)", stacklevel=2)

    def on_epoch_start(self, epoch: int) -> None:
        self._bss_weight = _weights(epoch + 1, self.schedule_epochs)[1]
        self.bss_epoch_stats = {"steps": 0, "bss_steps": 0, "attacked": 0, "teacher_calls": 0}
        super().on_epoch_start(epoch)

    # ------------------------------------------------------------------ one step
    def _global_base_samples(self, t_logits, s_logits, targets) -> Tuple[torch.Tensor, int]:
        """(local row indices of this rank's base samples, number N of base samples in the global batch)."""
        mask = base_sample_mask(t_logits, s_logits, targets, require_student_correct=self.require_student_correct)
        scores = distill_scores(t_logits, s_logits, targets).float()
        if self.world_size == 1:
            idx = top_scored(mask, scores, self.max_samples)
            return idx, idx.numel()
        import torch.distributed as dist

        local = torch.stack([mask.float(), scores])                          # (2, B)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)  # (gloo has no all_gather_into_tensor)
        gathered = torch.stack(parts)                                        # (W, 2, B)
        # global row i * W + r = rank r's row i (DistributedSampler's interleaving)
        g_mask = gathered[:, 0].t().reshape(-1) > 0.5
        g_scores = gathered[:, 1].t().reshape(-1)
        chosen = top_scored(g_mask, g_scores, self.max_samples)
        mine = chosen[chosen % self.world_size == self.rank] // self.world_size
        return mine, chosen.numel()

    def _uniforms(self, batch_size: int) -> torch.Tensor:
        """This rank's (batch_size,) uniforms of the target draws, from the global batch's stream."""
        gen = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, self.step, 7) % (2**63))
        u = torch.rand(batch_size * self.world_size, generator=gen, device=self.device)
        return u.view(batch_size, self.world_size)[:, self.rank]

    def bss_term(self, inputs, targets, t_logits, s_logits) -> Optional[torch.Tensor]:
        """The BSS loss of this rank (scaled for DDP), or None when no sample of the global batch qualifies."""
        idx, n_global = self._global_base_samples(t_logits, s_logits.detach(), targets)
        if n_global == 0 or (n_global == 1 and self._student_has_batchnorm):
            # One attacked sample cannot pass a train-mode BatchNorm whose maps are 1x1 (the official
            # code raises there); with both-correct base samples a lone qualifier is common early on.
            return None
        self.bss_epoch_stats["bss_steps"] += 1
        self.bss_epoch_stats["attacked"] += idx.numel()
        if idx.numel() == 0:  # other ranks attack; this one adds nothing
            return s_logits.sum() * 0.0
        u = self._uniforms(inputs.shape[0])[idx]
        target_classes = sample_target_classes(t_logits[idx], uniforms=u)
        stats: dict = {}
        with autocast(self.device, self.amp):
            x_adv = bss_attack(self.teacher, inputs[idx], target_classes, stats=stats, **self.attack)
            with torch.no_grad():
                t_adv = self.teacher(x_adv)
            s_adv = self.student(x_adv)
        self.bss_epoch_stats["teacher_calls"] += len(stats["moving"])
        with torch.autocast(device_type=self.device.type, enabled=False):
            loss = soft_cross_entropy(s_adv.float(), t_adv.float(), self.temperature)
        return loss * (idx.numel() * self.world_size / n_global)

    def extra_losses(self, step: StepTensors):
        """The BSS term on top of the engine's clean CE + KD (:meth:`kdfast.distill.Distiller.extra_losses`):
        ``bss_w(e) * bss_term`` while the epoch's weight is positive and some sample qualifies."""
        self.bss_epoch_stats["steps"] += 1
        if self._bss_weight <= 0:
            return {"bss": (0.0, None)}
        term = self.bss_term(step.inputs, step.targets, step.teacher_logits, step.student_logits)
        return {"bss": (self._bss_weight, term)}

def build(teacher: nn.Module, student: nn.Module, **options) -> BSSDistiller:
    """A ready :class:`BSSDistiller` with the official defaults (:data:`OPTIONS`); other keywords go to
    the Distiller (``device``, ``amp``, ``seed``, ``batch_size``, ``checkpoint_dir``, ``resume``, ...)."""
    method = {k: options.pop(k) for k in list(options) if k in OPTIONS}
    cfg = {**OPTIONS, **method}
    epochs = cfg["epochs"]
    milestones = cfg["milestones"] or sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
    return BSSDistiller(teacher, student, temperature=cfg["temperature"], max_samples=cfg["max_samples"],
                        attack_steps=cfg["attack_steps"], step_size=cfg["step_size"], clamp=cfg["clamp"],
                        require_student_correct=cfg["require_student_correct"], shrink_below=cfg["shrink_below"],
                        epochs=epochs, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                        **{"schedule": "step", "milestones": list(milestones), "gamma": 0.1, **options})


def kd_baseline(teacher: nn.Module, student: nn.Module, *, temperature: float = 3.0,
                schedule_epochs: Optional[int] = None, kd_scale: float = 1.0, **engine) -> Distiller:
    """The official script without the BSS term (the paper's "Hinton" row): ``CE + kd_scale kd_w(e) softCE_T``
    (``kd_scale`` 1: the official weight; an experiment tunes it and ``temperature`` on a validation split)."""
    epochs = schedule_epochs or engine.get("epochs", 1)
    scale = _check_kd_scale(kd_scale)
    kd_weight = lambda epoch: scale * _weights(epoch + 1, epochs)[0]  # noqa: E731
    return Distiller(teacher, student, {"ce": nn.CrossEntropyLoss(), "kd": (SoftCrossEntropy(temperature), kd_weight)},
                     **engine)

