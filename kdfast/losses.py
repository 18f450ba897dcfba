"""Distillation losses as ``nn.Module``s, over kdfast's compiled ops where one exists.

Loss-call protocol (what :class:`kdfast.distill.Distiller` relies on):

* every kdfast loss class has a class attribute ``kdfast_inputs``, ``"logits"`` or ``"features"``;
* ``"logits"`` losses: ``forward(student_logits, teacher_logits, targets=None)``;
* ``"features"`` losses: ``forward(student_feats, teacher_feats)``, each a Tensor or a list/tuple of
  Tensors paired by position; the result is the scalar sum over the pairs;
* a plain module without the attribute (e.g. ``nn.CrossEntropyLoss``) is a task loss,
  ``forward(student_logits, targets)``.

Where two feature maps of a pair differ in spatial size, the larger is adaptive-average-pooled to
the smaller (RepDistiller's convention; see kdfast._spatial.pool_to_common).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, ops
from ._spatial import pool_to_common

__all__ = ["KDLoss", "LogitMSELoss", "ATLoss", "HintLoss", "NSTLoss", "FSPLoss", "attention_map", "as_pairs",
           "sum_terms"]


def sum_terms(terms):
    """The sum of a non-empty list of loss tensors (per layer pair, per group), keeping the first's dtype
    and device (``sum(terms)`` would start from the int 0)."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _as_list(name: str, feats) -> list:
    if isinstance(feats, torch.Tensor):
        return [feats]
    if isinstance(feats, (list, tuple)) and all(isinstance(f, torch.Tensor) for f in feats):
        return list(feats)
    raise TypeError(f"{name} must be a Tensor or a list/tuple of Tensors, got {type(feats).__name__}")


def as_pairs(student_feats, teacher_feats) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs (student, teacher) by position; both lists must have the same, non-zero length."""
    s = _as_list("student_feats", student_feats)
    t = _as_list("teacher_feats", teacher_feats)
    if len(s) != len(t):
        raise ValueError(f"student_feats has {len(s)} feature maps but teacher_feats has {len(t)}; they are paired by position")
    if not s:
        raise ValueError("student_feats and teacher_feats are empty; expected at least one pair")
    return list(zip(s, t))


# =============================================================================================== logits
class KDLoss(nn.Module):
    """Hinton et al. 2015 KD: ``(1 - alpha) CE(targets, z_s) + alpha c KL(softmax(z_t/T) || softmax(z_s/T))``,
    ``c = T^2`` if ``t2_scale`` else 1, batch mean (CE over non-ignored rows). One fused kernel
    (:func:`kdfast.ops.kd_loss`).

    ``targets`` may be None only when ``alpha == 1``. Conventions of other code bases:
    RepDistiller ``DistillKL(T)`` (its CE weighted separately) = ``KDLoss(T, alpha=1)``;
    RepDistiller's CIFAR recipe 0.1 CE + 0.9 KD = ``KDLoss(4, alpha=0.9)``; BSS (soft CE, T = 3, no
    T^2; KL has the same gradient) and DAFL/Liger-Kernel (no T^2) = ``t2_scale=False``.
    """

    kdfast_inputs = "logits"

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, t2_scale: bool = True, ignore_index: int = -100):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.t2_scale = bool(t2_scale)
        self.ignore_index = int(ignore_index)

    def forward(self, student_logits, teacher_logits, targets=None):
        if targets is None and self.alpha != 1.0:
            raise ValueError(
                f"KDLoss(alpha={self.alpha:g}) needs targets for its CE term (weight 1 - alpha); "
                "pass targets, or use alpha=1 for the pure soft-target loss"
            )
        return ops.kd_loss(student_logits, teacher_logits, targets, self.temperature, self.alpha, self.t2_scale,
                           self.ignore_index)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, alpha={self.alpha:g}, t2_scale={self.t2_scale}"


class LogitMSELoss(nn.Module):
    """Mean squared error between student and teacher logits (mean over B*K; Ba & Caruana 2014
    logit regression). ``targets`` are accepted and unused."""

    kdfast_inputs = "logits"

    def forward(self, student_logits, teacher_logits, targets=None):
        _checks.logits("student_logits", student_logits)
        _checks.logits("teacher_logits", teacher_logits)
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"shape mismatch: student_logits is {list(student_logits.shape)} but teacher_logits is "
                f"{list(teacher_logits.shape)}; expected the same (B, K)"
            )
        _checks.compatible("student_logits", student_logits, "teacher_logits", teacher_logits)
        return F.mse_loss(student_logits, teacher_logits)


# =============================================================================================== features
def attention_map(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017 spatial attention: mean over channels of |x|^p, flattened over
    H*W and L2-normalised per sample (eps 1e-12). (B, C, H, W) -> (B, H*W)."""
    return F.normalize(x.abs().pow(p).mean(1).flatten(1), dim=1)


class ATLoss(nn.Module):
    """Attention Transfer (Zagoruyko & Komodakis, ICLR 2017), as in the official code
    (szagoruyko/attention-transfer ``at_loss``, ``cifar.py``) and RepDistiller ``Attention``:

        loss = beta * sum over pairs of mean_{b, hw} (Q_s - Q_t)^2,  Q = attention_map(F, p)

    i.e. a squared difference averaged over B*H*W, beta = 1000 by default. The paper writes
    (beta/2) * sum ||Q_s - Q_t||_p with a non-squared norm instead (Zagoruyko & Komodakis, ICLR 2017, Eq. 2); the code's form is
    the one behind the reported numbers. Channel counts may differ; spatial sizes are pooled to the
    smaller. For odd p the official code takes x^p where this takes |x|^p (the paper's definition);
    for the default p = 2 they agree.
    """

    kdfast_inputs = "features"

    def __init__(self, p: float = 2.0, beta: float = 1000.0):
        super().__init__()
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not p > 0:
            raise ValueError(f"p must be a positive number, got {p!r}")
        self.p = float(p)
        self.beta = float(beta)

    def forward(self, student_feats, teacher_feats):
        terms = []
        for i, (fs, ft) in enumerate(as_pairs(student_feats, teacher_feats)):
            _checks.feature_map(f"student_feats[{i}]", fs)
            _checks.feature_map(f"teacher_feats[{i}]", ft)
            _checks.compatible(f"student_feats[{i}]", fs, f"teacher_feats[{i}]", ft)
            fs, ft = pool_to_common(fs, ft)
            term = (attention_map(fs, self.p) - attention_map(ft, self.p)).pow(2).mean()
            terms.append(term)
        return self.beta * sum_terms(terms)

    def extra_repr(self) -> str:
        return f"p={self.p:g}, beta={self.beta:g}"


def _regressor(student_shape, teacher_shape) -> nn.Sequential:
    """FitNets regressor from the student's (C, H, W) to the teacher's, then BatchNorm:
    same H, W: 1x1 conv; student larger by an integer factor r (both axes): 3x3 conv, stride r,
    padding 1; teacher larger by r: transposed conv, kernel 2r, stride r, padding r/2 (r even) —
    RepDistiller's ConvReg uses these for r = 2. Other ratios raise ValueError."""
    cs, hs, ws = student_shape
    ct, ht, wt = teacher_shape
    if (hs, ws) == (ht, wt):
        conv = nn.Conv2d(cs, ct, kernel_size=1, bias=False)
    elif hs % ht == 0 and ws % wt == 0 and hs // ht == ws // wt:
        conv = nn.Conv2d(cs, ct, kernel_size=3, stride=hs // ht, padding=1, bias=False)
    elif ht % hs == 0 and wt % ws == 0 and ht // hs == wt // ws and (ht // hs) % 2 == 0:
        r = ht // hs
        conv = nn.ConvTranspose2d(cs, ct, kernel_size=2 * r, stride=r, padding=r // 2, bias=False)
    else:
        raise ValueError(
            f"HintLoss cannot map a student map of spatial size {hs}x{ws} to the teacher's {ht}x{wt}: expected equal "
            "sizes, or one an integer multiple of the other (same factor on both axes; even when the teacher is larger)"
        )
    return nn.Sequential(conv, nn.BatchNorm2d(ct))


def _shape_list(name: str, shape) -> list[tuple[int, int, int]]:
    def ok(s):
        return isinstance(s, (tuple, list)) and len(s) == 3 and all(isinstance(v, int) and v > 0 for v in s)

    if ok(shape):
        return [tuple(shape)]
    if isinstance(shape, (tuple, list)) and shape and all(ok(s) for s in shape):
        return [tuple(s) for s in shape]
    raise ValueError(f"{name} must be a (C, H, W) tuple of positive ints or a list of them, got {shape!r}")


class HintLoss(nn.Module):
    """FitNets hint loss (Romero et al., ICLR 2015) with a learnable regressor per pair, as
    RepDistiller trains it (single stage, jointly with the student):

        loss = sum over pairs of MSE(regressor(f_s), f_t)   (mean over all elements)

    The paper's stage-1 loss is (1/2)||u_h - r(v_g)||^2 (a sum); the mean is RepDistiller's form
    (weighted by beta = 100 there). Shapes are given at construction, without the batch axis,
    so the regressor's parameters exist before the optimizer is built:
    ``HintLoss(student_shape=(C, H, W), teacher_shape=(C, H, W))``, or lists of such shapes for
    several pairs. Regressor choice: see :func:`_regressor`. The regressors are trainable: this
    module's parameters must go into the optimizer with the student's.
    """

    kdfast_inputs = "features"

    def __init__(self, student_shape, teacher_shape):
        super().__init__()
        s_shapes = _shape_list("student_shape", student_shape)
        t_shapes = _shape_list("teacher_shape", teacher_shape)
        if len(s_shapes) != len(t_shapes):
            raise ValueError(f"student_shape lists {len(s_shapes)} maps but teacher_shape lists {len(t_shapes)}")
        self.student_shapes, self.teacher_shapes = s_shapes, t_shapes
        self.regressors = nn.ModuleList(_regressor(s, t) for s, t in zip(s_shapes, t_shapes))

    def forward(self, student_feats, teacher_feats):
        pairs = as_pairs(student_feats, teacher_feats)
        if len(pairs) != len(self.regressors):
            raise ValueError(f"HintLoss was built for {len(self.regressors)} feature pairs, got {len(pairs)}")
        terms = []
        for i, ((fs, ft), s_shape, t_shape, reg) in enumerate(
            zip(pairs, self.student_shapes, self.teacher_shapes, self.regressors)
        ):
            for name, x, shape in ((f"student_feats[{i}]", fs, s_shape), (f"teacher_feats[{i}]", ft, t_shape)):
                _checks.feature_map(name, x)
                if tuple(x.shape[1:]) != shape:
                    raise ValueError(f"{name} has shape {list(x.shape)}; HintLoss was built for (B, {', '.join(map(str, shape))})")
            _checks.compatible(f"student_feats[{i}]", fs, f"teacher_feats[{i}]", ft)
            term = F.mse_loss(reg(fs), ft)
            terms.append(term)
        return sum_terms(terms)


class NSTLoss(nn.Module):
    """Neuron Selectivity Transfer (Huang & Wang 2017): per pair :func:`kdfast.ops.nst_loss`
    (MMD^2 between L2-normalised channel rows, batch mean), summed over pairs. kernel "poly"
    (d = 2, c = 0; paper and RepDistiller), "linear" or "gaussian" (``sigma``). Unweighted: the
    paper uses lambda/2, the official code lambda = 50, RepDistiller beta = 50 (HobbitLong/RepDistiller train_student.py)."""

    kdfast_inputs = "features"

    def __init__(self, kernel: str = "poly", sigma: float | None = None):
        super().__init__()
        if kernel not in ops.NST_KERNELS:
            raise ValueError(f"kernel must be one of {ops.NST_KERNELS}, got {kernel!r}")
        if sigma is not None:
            _checks.sigma(sigma)
        self.kernel, self.sigma = kernel, sigma

    def forward(self, student_feats, teacher_feats):
        terms = []
        for fs, ft in as_pairs(student_feats, teacher_feats):
            term = ops.nst_loss(fs, ft, self.kernel, "mean", self.sigma)
            terms.append(term)
        return sum_terms(terms)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, sigma={self.sigma}"


class FSPLoss(nn.Module):
    """FSP (Yim et al., CVPR 2017). Input convention: ``student_feats`` and ``teacher_feats`` are
    lists of L >= 2 maps from consecutive layers/stages (same length); the loss sums over the L-1
    consecutive pairs (i, i+1) the batch mean of ||G(s_i, s_i+1) - G(t_i, t_i+1)||_F^2, with
    G(a, b) = a b^T / (H W) (:func:`kdfast.ops.fsp_loss`; the paper's loss with lambda = 1).
    RepDistiller also takes consecutive pairs of its ``feat[:-1]`` list but averages over the Gram
    entries too (a factor C_i * C_i+1 smaller; RepDistiller distiller_zoo/FSP.py). Within a pair the larger map is pooled;
    student and teacher channel counts must match (the Grams are compared entrywise).
    """

    kdfast_inputs = "features"

    def forward(self, student_feats, teacher_feats):
        s = _as_list("student_feats", student_feats)
        t = _as_list("teacher_feats", teacher_feats)
        if len(s) != len(t):
            raise ValueError(f"student_feats has {len(s)} feature maps but teacher_feats has {len(t)}")
        if len(s) < 2:
            raise ValueError(
                f"FSPLoss needs lists of at least 2 maps of consecutive layers (it compares the FSP matrices of "
                f"each consecutive pair), got {len(s)}"
            )
        terms = []
        for i in range(len(s) - 1):
            term = ops.fsp_loss(s[i], s[i + 1], t[i], t[i + 1], "mean")
            terms.append(term)
        return sum_terms(terms)
