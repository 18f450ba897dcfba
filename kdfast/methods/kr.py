"""Knowledge Representing (KR): knowledge aggregation and the two-optimizer trainer.

Liu, Wen, Gao, Tao, Chen, Osa, Kato, "Knowledge Representing: Efficient, Sparse Representation of
Prior Knowledge for Knowledge Distillation", CVPR 2019 Workshops, arXiv 1911.05329. No public code
exists and the paper's equations are not available: what follows is **kdfast's interpretation** of
the paper's text, not a transcription.

* Knowledge aggregation: the teacher's layers are taken k neighbouring layers at a time (k = 3 as
  the paper's CIFAR setting); each group is aggregated into one "abstract" layer matched to one
  student layer. :class:`Aggregator`: per teacher layer a 1x1 convolution to the student layer's
  channels and adaptive average pooling to its spatial size (the paper bridges spatial scales with
  identity-mapping layers), summed with softmax-normalised learnable weights and rescaled to the
  group's own energy ("the transportation preserving has equal total measure").
* :func:`aggregation_loss`: over groups, a convex combination of squared errors measured in units of
  the teacher's feature energy, ``MSE(a_l, s_l) / E_l`` with ``E_l`` = mean square of the teacher's
  maps of group l at the student layer's resolution (:func:`teacher_anchors`), weighted by the
  residual's std in the same units ("the standard deviation serves as the measure that weighs layers
  with larger accumulated error more"). The anchor comes from the frozen teacher, so training cannot
  shrink it: see the function's docstring for why that matters.
* Sparse recoding of the student's gradients: :class:`kdfast.methods.kr.SparseRecoding`.
* Training (the paper's Algorithm 1): :class:`KRDistiller`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _checks, _ext
from ..distill import STUDENT, Auxiliary, Distiller, FeatureTap, to_float, unwrap_model
from ..losses import sum_terms
from . import options as T

__all__ = ["Aggregator", "KnowledgeAggregation", "KRDistiller", "SparseRecoding", "aggregation_loss",
           "capture_feature_shapes", "group_layers", "teacher_anchors"]


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"student_size must be an int or (H, W), got {size!r}")
    return size


def _pool_to(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(f, size)`` for (B, C, H, W) maps, computed as a plain average pooling where H
    and W are multiples of the target and as a repetition of pixels where the target is a multiple of them
    (the same values, several times faster on CPU); adaptive pooling otherwise."""
    h, w = f.shape[2:]
    if (h, w) == tuple(size):
        return f
    if h % size[0] == 0 and w % size[1] == 0:
        return F.avg_pool2d(f, (h // size[0], w // size[1]))
    if size[0] % h == 0 and size[1] % w == 0:
        return f.repeat_interleave(size[0] // h, 2).repeat_interleave(size[1] // w, 3)
    return F.adaptive_avg_pool2d(f, size)


class Aggregator(nn.Module):
    """Aggregates one group of teacher feature maps into one map shaped like a student layer's.

    ``raw = sum_i softmax(logits)_i * conv1x1_i(p_i)``, ``p_i = adaptive_avg_pool(t_i, (H_s, W_s))``, and with
    ``preserve_energy`` (the default) ``out = raw * sqrt(E / mean(raw^2))``, ``E = mean_i mean(p_i^2)``: the
    aggregated map carries the group's own energy (kdfast's reading of the paper's optimal-transport view,
    "the transportation preserving has equal total measure"). The rescaling is part of the graph, so the
    aggregator learns which pattern to pass on, not how large it is: trained jointly with the student on
    :func:`aggregation_loss`, it cannot shrink towards a shrinking student (without it, aggregator and
    student shrank together and the tour's weak KR students fell to chance).

    Pooling comes before the 1x1 convolution: both are linear and the convolution acts per pixel,
    so the order does not change the result, and pooling first makes the convolution cheaper.

    Args:
        teacher_channels: channels of each teacher layer of the group.
        student_channels: channels of the student layer.
        student_size: (H, W) of the student layer.
        preserve_energy: rescale the output to the group's energy (see above).
    """

    def __init__(self, teacher_channels: Sequence[int], student_channels: int, student_size, preserve_energy: bool = True):
        super().__init__()
        teacher_channels = [int(c) for c in teacher_channels]
        if not teacher_channels or min(teacher_channels) < 1:
            raise ValueError(f"teacher_channels must be a non-empty list of positive ints, got {teacher_channels!r}")
        if int(student_channels) < 1:
            raise ValueError(f"student_channels must be a positive int, got {student_channels!r}")
        if not isinstance(preserve_energy, bool):
            raise TypeError(f"preserve_energy must be a bool, got {preserve_energy!r}")
        self.teacher_channels = teacher_channels
        self.student_channels = int(student_channels)
        self.student_size = _pair(student_size)
        self.preserve_energy = preserve_energy
        self.projections = nn.ModuleList(nn.Conv2d(c, self.student_channels, 1, bias=False) for c in teacher_channels)
        # Equal weights at the start (softmax of zeros).
        self.logits = nn.Parameter(torch.zeros(len(teacher_channels)))

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)

    def forward(self, teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(teacher_features) != len(self.projections):
            raise ValueError(f"expected {len(self.projections)} teacher feature maps, got {len(teacher_features)}")
        weights = self.weights()
        out, energy = None, 0.0
        for i, (f, proj) in enumerate(zip(teacher_features, self.projections)):
            if f.dim() != 4 or f.shape[1] != self.teacher_channels[i]:
                raise ValueError(
                    f"teacher feature {i} must be (B, {self.teacher_channels[i]}, H, W), got shape {tuple(f.shape)}"
                )
            f = _pool_to(f, self.student_size)
            if self.preserve_energy:
                energy = energy + _wide(f).pow(2).mean()
            term = weights[i] * proj(f)
            out = term if out is None else out + term
        if self.preserve_energy:
            energy = energy / len(self.projections)
            # differentiable in out (the aggregator's gradient cannot change the scale); the teacher's energy
            # is a constant (its maps are detached)
            own = (out if out.dtype in (torch.float32, torch.float64) else out.float()).pow(2).mean()
            out = out * (energy / own.clamp_min(1e-24)).sqrt().to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"teacher_channels={self.teacher_channels}, student_channels={self.student_channels}, "
                f"student_size={self.student_size}, preserve_energy={self.preserve_energy}")


def group_layers(num_teacher: int, num_student: int, k: int | None = 3) -> list[list[int]]:
    """Indices of the teacher layers aggregated for each student layer: consecutive groups of k
    (``num_teacher`` must equal ``k * num_student``), or with ``k=None`` ``num_student`` consecutive
    groups of nearly equal size (the first groups get the extra layers)."""
    if num_student < 1:
        raise ValueError(f"need at least one student layer, got {num_student}")
    if k is None:
        if num_teacher < num_student:
            raise ValueError(f"{num_teacher} teacher layers cannot be split over {num_student} student layers")
        base, extra = divmod(num_teacher, num_student)
        groups, start = [], 0
        for g in range(num_student):
            size = base + (1 if g < extra else 0)
            groups.append(list(range(start, start + size)))
            start += size
        return groups
    if k < 1:
        raise ValueError(f"k must be a positive int or None, got {k!r}")
    if num_teacher != k * num_student:
        raise ValueError(
            f"{num_teacher} teacher layers do not form groups of k = {k} for {num_student} student layers "
            f"(need {k * num_student}); pass k=None to split them into {num_student} near-equal groups"
        )
    return [list(range(g * k, (g + 1) * k)) for g in range(num_student)]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, in float32 at least (half-precision maps under AMP are widened; float64 stays)."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def teacher_anchors(teacher_groups: Sequence[Sequence[torch.Tensor]], student_sizes) -> list[torch.Tensor]:
    """The anchors of :func:`aggregation_loss`: per group, the mean square of the teacher's maps of that
    group after adaptive average pooling to the student layer's (H, W) (what the aggregator's 1x1
    convolutions read), averaged over the group's maps; detached scalars (float32, or float64 for float64
    maps).

    The teacher is frozen, so an anchor depends on the batch only: no parameter that training updates
    can make it smaller. A group whose maps are all zero has no scale and raises a ValueError."""
    if len(teacher_groups) != len(student_sizes) or not teacher_groups:
        raise ValueError(f"need one group of teacher maps per student size (>= 1), got {len(teacher_groups)} "
                         f"groups and {len(student_sizes)} sizes")
    anchors = []
    for l, (group, size) in enumerate(zip(teacher_groups, student_sizes)):
        if not group:
            raise ValueError(f"group {l} holds no teacher map")
        size = _pair(size)
        energies = []
        for f in group:
            f = _wide(f)
            if f.dim() != 4:
                raise ValueError(f"group {l}: teacher maps must be (B, C, H, W), got shape {tuple(f.shape)}")
            energies.append(_pool_to(f, size).pow(2).mean())
        anchor = torch.stack(energies).mean()
        if not bool(anchor > 0):
            raise ValueError(f"group {l}: the teacher's maps are all zero (or not finite) on this batch, so they give "
                             "the aggregation loss no scale; aggregate other teacher layers")
        anchors.append(anchor)
    return anchors


def aggregation_loss(aggregated: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                     anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_l w_l * MSE(a_l, s_l) / E_l`` (kdfast's interpretation; the paper's equations are not
    available). a_l: the aggregated teacher map of group l, s_l: the student's map, E_l: the group's
    anchor from :func:`teacher_anchors` (the teacher's feature energy at the student's resolution), and
    detached weights ``w_l = sigma_l / sum_j sigma_j`` with ``sigma_l = std(a_l - s_l) / sqrt(E_l)`` (population
    std; equal weights when every sigma is 0) ("the
    standard deviation serves as the measure that weighs layers with larger accumulated error more").

    Why this form:

    * Dimensionless, so ``aggregation_weight`` means the same at every feature size: scaling the
      teacher's, the aggregated and the student's maps together by any c, changing the maps' channel
      count or resolution (the MSE is a mean) or the number of groups (the weights sum to 1) leaves
      the loss's range the same; a map that is off by the teacher's own scale costs about 1.
    * Anchored to the frozen teacher, not to the trained maps. The aggregator and the student are both
      trained on this loss; a loss normalised by their own energy (kdfast tried
      ``MSE / (mean a^2 + mean s^2)``) is invariant to both shrinking together, and its gradient grows
      as 1/scale while they shrink, which sent the tour's KR students to chance. Here shrinking a and s
      by c scales the loss by c^2 and its gradient by c, as a plain MSE does; and the
      :class:`Aggregator` keeps a at the group's energy E_l, so a student that shrinks its maps moves
      away from the target (the loss tends to 1, not 0): the two cannot shrink together.
    * (An earlier kdfast version summed ``std(a_l - s_l) * MSE(a_l, s_l)`` unnormalised: cubic in the
      features' scale, so one weight meant different things for different networks.)"""
    if len(aggregated) != len(student) or not aggregated:
        raise ValueError(f"need as many aggregated maps as student maps (>= 1), got {len(aggregated)} and {len(student)}")
    if len(anchors) != len(aggregated):
        raise ValueError(f"need one anchor per group ({len(aggregated)}), got {len(anchors)}")
    relative, sigmas = [], []
    for l, (a, s, anchor) in enumerate(zip(aggregated, student, anchors)):
        if a.shape != s.shape:
            raise ValueError(f"group {l}: aggregated map has shape {tuple(a.shape)} but the student map {tuple(s.shape)}")
        anchor = _wide(torch.as_tensor(anchor)).to(a.device)
        if anchor.dim() != 0 or not bool(anchor > 0):
            raise ValueError(f"group {l}: the anchor must be a positive scalar, got {anchor.tolist()!r}")
        residual = a - s
        relative.append(residual.pow(2).mean() / anchor.to(residual.dtype))
        sigmas.append(_wide(residual).std(correction=0) / anchor.sqrt())  # the population std: size-free
    sigma = torch.stack(sigmas)
    weights = sigma / sigma.sum() if bool(sigma.sum() > 0) else torch.full_like(sigma, 1.0 / len(sigmas))
    return sum_terms([w.to(r.dtype) * r for w, r in zip(weights, relative)])


class KnowledgeAggregation(nn.Module):
    """One :class:`Aggregator` per student layer.

    Args:
        teacher_channels_groups: per student layer, the channels of the teacher layers aggregated for it.
        student_channels: channels of each student layer.
        student_sizes: (H, W) of each student layer.
        preserve_energy: each aggregated map carries its group's energy (:class:`Aggregator`).

    ``forward(teacher_features)`` takes the teacher's maps as a flat list in group order (or a list
    of per-group lists) and returns one aggregated map per student layer.
    """

    def __init__(self, teacher_channels_groups: Sequence[Sequence[int]], student_channels: Sequence[int], student_sizes,
                 preserve_energy: bool = True):
        super().__init__()
        if not (len(teacher_channels_groups) == len(student_channels) == len(student_sizes)) or not student_channels:
            raise ValueError(
                "teacher_channels_groups, student_channels and student_sizes need one entry per student layer, got "
                f"{len(teacher_channels_groups)}, {len(student_channels)} and {len(student_sizes)}"
            )
        self.aggregators = nn.ModuleList(
            Aggregator(tc, sc, size, preserve_energy)
            for tc, sc, size in zip(teacher_channels_groups, student_channels, student_sizes)
        )
        self.group_sizes = [len(tc) for tc in teacher_channels_groups]

    @classmethod
    def from_shapes(cls, teacher_shapes, student_shapes, k: int | None = 3) -> "KnowledgeAggregation":
        """From (C, H, W) (or (B, C, H, W)) shapes of the teacher's and the student's layers, grouping
        consecutive teacher layers with :func:`group_layers`."""
        teacher_shapes = [tuple(s)[-3:] for s in teacher_shapes]
        student_shapes = [tuple(s)[-3:] for s in student_shapes]
        groups = group_layers(len(teacher_shapes), len(student_shapes), k)
        return cls(
            [[teacher_shapes[i][0] for i in g] for g in groups],
            [s[0] for s in student_shapes],
            [s[1:] for s in student_shapes],
        )

    @classmethod
    def from_models(cls, teacher: nn.Module, teacher_layers: Sequence[str], student: nn.Module,
                    student_layers: Sequence[str], example_input: torch.Tensor, k: int | None = 3) -> "KnowledgeAggregation":
        """Infers the shapes by running ``example_input`` through both models once (no grad)."""
        return cls.from_shapes(capture_feature_shapes(teacher, teacher_layers, example_input),
                               capture_feature_shapes(student, student_layers, example_input), k)

    def _split(self, teacher_features):
        if teacher_features and isinstance(teacher_features[0], (list, tuple)):
            groups = [list(g) for g in teacher_features]
        else:
            if len(teacher_features) != sum(self.group_sizes):
                raise ValueError(f"expected {sum(self.group_sizes)} teacher feature maps, got {len(teacher_features)}")
            groups, start = [], 0
            for size in self.group_sizes:
                groups.append(list(teacher_features[start:start + size]))
                start += size
        if len(groups) != len(self.aggregators):
            raise ValueError(f"expected {len(self.aggregators)} groups of teacher maps, got {len(groups)}")
        return groups

    def forward(self, teacher_features) -> list[torch.Tensor]:
        return [agg(group) for agg, group in zip(self.aggregators, self._split(teacher_features))]

    def pool(self, teacher_features) -> list[list[torch.Tensor]]:
        """The teacher's maps grouped and pooled to their student layer's size: what the aggregators and
        :meth:`anchors` read (pass the result to both to pool once per step)."""
        return [[_pool_to(f, agg.student_size) for f in group]
                for agg, group in zip(self.aggregators, self._split(teacher_features))]

    def anchors(self, teacher_features) -> list[torch.Tensor]:
        """:func:`teacher_anchors` of ``teacher_features`` for this aggregation's groups and student sizes."""
        return teacher_anchors(self._split(teacher_features), [agg.student_size for agg in self.aggregators])

    def loss(self, teacher_features, student_features) -> torch.Tensor:
        """:func:`aggregation_loss` of this aggregation of ``teacher_features`` against the student's maps,
        anchored to the teacher's feature energy."""
        return aggregation_loss(self(teacher_features), student_features, self.anchors(teacher_features))


# ------------------------------------------------------------------ shapes from one batch
@torch.no_grad()
def capture_feature_shapes(model: nn.Module, names: Sequence[str], example_input: torch.Tensor) -> list[tuple]:
    """(C, H, W) of the outputs of the named submodules for one forward pass of ``example_input``
    (model in eval mode for that pass; its mode is restored)."""
    from ..distill.tap import FeatureTap

    was_training = model.training
    model.eval()
    try:
        with FeatureTap(model, names, detach=True) as tap:
            model(example_input)
            return [tuple(f.shape[1:]) for f in tap.features]
    finally:
        model.train(was_training)


# ------------------------------------------------------------------ sparse recoding of the gradients
# Where to call it in a training step::
# 
#     scaler.scale(loss).backward()        # DDP all-reduces the gradients during backward
#     scaler.unscale_(optimizer)           # AMP: the rule must see true (unscaled) gradients
#     recoding.step()                      # <- here
#     scaler.step(optimizer); scaler.update()
# 
# ``step()`` after ``unscale_`` and after backward (so after DDP's all-reduce) is always right.
# ``attach()`` instead applies the rule per tensor from ``Tensor.register_post_accumulate_grad_hook``,
# i.e. during backward. That is the same computation only when
# 
# * there is one backward per optimizer step (with gradient accumulation the hook fires after each
#   micro-batch's accumulation and the rule would compound), and
# * no GradScaler is used, or ``shrink == 0`` (the gradients are still scaled inside backward: boost
#   and damp commute with the scale, the additive ``shrink * sign(theta)`` term does not).
# 
# Under DDP the post-accumulate hook of a parameter runs on each rank's local gradient before DDP
# copies it into its bucket and all-reduces it. That is still exact: the rule is affine in g with
# coefficients that depend only on theta and tau, which are identical on every rank, so averaging
# recoded local gradients equals recoding the averaged gradient (tests/ops/test_sparse_recoding.py checks
# both variants on 2 gloo ranks). ``step()`` remains the advice: it is right in every setting above.

class SparseRecoding:
    """Sparse recoding of the gradients of ``params`` (kdfast's interpretation of KR, see module doc).

    Args:
        params: iterable of tensors (e.g. ``model.parameters()``); those with ``requires_grad=False``
            are ignored, duplicates counted once.
        boost: factor on the gradients of dominant entries (>= 1).
        damp: factor on the gradients of inactive entries, in [0, 1).
        shrink: constant pull of inactive entries towards 0 (>= 0; in gradient units, so the
            step it causes is lr * shrink).
        tau_rate: how fast each threshold follows mean |theta| (0 keeps the initial one).

    Defaults (boost 2, damp 0.9, shrink 0, tau_rate 0.01) come from benchmarks/kr_experiment.py
    (digits, a 438-parameter student, 3 seeds; experiments/results/kr-digits-full/report.md): the more the
    inactive entries are slowed, the more accuracy the weak student lost (damp 0: 0.32, damp 0.5:
    0.79-0.84, damp 0.9: 0.86, KR without recoding: 0.86), while the share of near-zero weights
    grew (0.065 without recoding, 0.097 at damp 0.9, 0.17 at damp 0). damp 0.9 was the only setting
    tried that kept KR-without-recoding's accuracy, so it is the default: a mild sparsifier. Lower
    damp / add shrink for sparser students when capacity allows. Thresholds start at mean |theta|
    of each tensor when the object is built (``reset_taus()`` re-reads them, e.g. after loading
    weights).
    """

    def __init__(self, params, boost: float = 2.0, damp: float = 0.9, shrink: float = 0.0, tau_rate: float = 0.01):
        _checks.sparse_recoding_hyperparameters(boost, damp, shrink, tau_rate)
        self.boost, self.damp, self.shrink, self.tau_rate = float(boost), float(damp), float(shrink), float(tau_rate)
        seen, self.params = set(), []
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must be tensors, got {type(p).__name__}")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        if not self.params:
            raise ValueError("params contains no tensor that requires grad")
        for i, p in enumerate(self.params):
            if p.dtype not in _checks.FLOAT_DTYPES:
                raise TypeError(f"params[{i}] must be float32, float64, float16 or bfloat16, got {p.dtype}")
        # One float32 threshold tensor per (device, dtype) group, so step() calls the op once per group
        # with the group's thresholds updated in place. _where[i] = (group key, position in group).
        self._groups: "OrderedDict[tuple, list[int]]" = OrderedDict()
        for i, p in enumerate(self.params):
            self._groups.setdefault((p.device, p.dtype), []).append(i)
        self._where = {}
        for key, members in self._groups.items():
            for pos, i in enumerate(members):
                self._where[i] = (key, pos)
        self._taus = {}
        self._handles = []
        self.reset_taus()

    # ------------------------------------------------------------------ thresholds
    @torch.no_grad()
    def reset_taus(self) -> None:
        """Set every threshold to the current mean |theta| of its tensor (0 for an empty tensor)."""
        for key, members in self._groups.items():
            values = [self.params[i].detach().abs().float().mean() if self.params[i].numel() else
                      torch.zeros((), device=key[0]) for i in members]
            self._taus[key] = torch.stack(values).to(device=key[0], dtype=torch.float32).contiguous()

    @property
    def taus(self) -> list[torch.Tensor]:
        """Current thresholds, one 0-d float32 tensor per parameter (in ``params`` order; views)."""
        return [self._taus[key][pos] for key, pos in (self._where[i] for i in range(len(self.params)))]

    # ------------------------------------------------------------------ applying the rule
    @torch.no_grad()
    def step(self) -> None:
        """Recode every current gradient (params whose ``.grad`` is None are skipped and keep their
        thresholds). Call after backward, after ``GradScaler.unscale_``, before ``optimizer.step()``."""
        _ext.require_ops()
        for key, members in self._groups.items():
            present = [pos for pos, i in enumerate(members) if self.params[i].grad is not None]
            if not present:
                continue
            params = [self.params[members[pos]] for pos in present]
            grads = [p.grad for p in params]
            taus = self._taus[key]
            if len(present) == len(members):
                self._apply(grads, params, taus)
            else:
                index = torch.tensor(present, device=taus.device)
                subset = taus.index_select(0, index)
                self._apply(grads, params, subset)
                taus.index_copy_(0, index, subset)

    def _apply(self, grads, params, taus) -> None:
        # .grad tensors normally share the parameter's layout (torch's gradient layout contract); a
        # grad that does not (set by hand) is recoded through a copy in the parameter's layout. The
        # op checks shapes, dtypes and devices itself.
        fixed = [g if g.stride() == p.stride() or g.shape != p.shape else torch.empty_like(p).copy_(g)
                 for g, p in zip(grads, params)]
        torch.ops.kdfast.sparse_recoding_(fixed, [p.detach() for p in params], taus,
                                          self.boost, self.damp, self.shrink, self.tau_rate)
        for g, f in zip(grads, fixed):
            if f is not g:
                g.copy_(f)

    def attach(self) -> "SparseRecoding":
        """Apply the rule per tensor during backward (``register_post_accumulate_grad_hook``) instead
        of calling :meth:`step`. See the module docstring for when this is equivalent (one backward
        per optimizer step; no GradScaler unless shrink == 0). Returns self."""
        if self._handles:
            raise RuntimeError("SparseRecoding.attach(): hooks are already attached; call detach() first")
        _ext.require_ops()
        for i, p in enumerate(self.params):
            key, pos = self._where[i]
            tau_slot = self._taus[key][pos:pos + 1]  # a (1,) view: the op updates the group's threshold in place

            def hook(param, tau_slot=tau_slot):
                with torch.no_grad():
                    self._apply([param.grad], [param], tau_slot)

            self._handles.append(p.register_post_accumulate_grad_hook(hook))
        return self

    def detach(self) -> None:
        """Remove the hooks installed by :meth:`attach` (no-op when none are)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "taus": [t.detach().cpu().clone() for t in self.taus],
            "boost": self.boost, "damp": self.damp, "shrink": self.shrink, "tau_rate": self.tau_rate,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        taus = state["taus"]
        if len(taus) != len(self.params):
            raise ValueError(f"state_dict has {len(taus)} thresholds but this SparseRecoding has {len(self.params)} parameters")
        _checks.sparse_recoding_hyperparameters(state["boost"], state["damp"], state["shrink"], state["tau_rate"])
        self.boost, self.damp = float(state["boost"]), float(state["damp"])
        self.shrink, self.tau_rate = float(state["shrink"]), float(state["tau_rate"])
        for i, value in enumerate(taus):
            key, pos = self._where[i]
            self._taus[key][pos] = torch.as_tensor(value, dtype=torch.float32)


# ------------------------------------------------------------------ the trainer (Algorithm 1)

AGGREGATOR = "aggregator"  # the name of the aggregators among the trainables


class KRDistiller(Distiller):
    """Knowledge Representing training (the paper's Algorithm 1, kdfast's interpretation) on the
    :class:`kdfast.distill.Distiller` engine (data order, DDP, AMP, checkpoints, logging, resume).

    Each iteration, on one batch:

    1. **aggregators**: one optimizer (SGD, ``aggregator_lr``; the paper's Eq. 9) updates the
       :class:`KnowledgeAggregation` on :func:`aggregation_loss` with the student's features detached;
    2. **student**: a second optimizer (the Distiller's, ``lr``; Eq. 10) updates the student on
       ``sum of losses (task + KD ...) + aggregation_weight * aggregation_loss`` with the aggregators fixed (their
       output recomputed after step 1, without grad), and sparse recoding of the student's gradients
       (:class:`kdfast.methods.kr.SparseRecoding`) applied after ``GradScaler.unscale_`` and after DDP's
       all-reduce (backward has finished), before ``optimizer.step()``.

    Args:
        teacher, student, losses: as for :class:`~kdfast.distill.Distiller` (e.g.
            ``{"ce": nn.CrossEntropyLoss(), "kd": KDLoss(4, alpha=1)}``; feature losses work too).
        teacher_layers: names of the teacher layers to aggregate, in order; grouped k at a time.
        student_layers: names of the student layers, one per group.
        k: teacher layers per group (``None``: near-equal consecutive groups, see :func:`group_layers`).
        aggregation: a ready :class:`KnowledgeAggregation`; otherwise built from the shapes seen on
            ``example_input`` (one batch of inputs; required then).
        aggregation_weight: weight of the aggregation term in the student's loss (the paper's
            trade-off weight; named so because the Distiller's ``gamma`` is the LR decay factor).
        aggregator_lr, aggregator_momentum, aggregator_weight_decay: SGD of the aggregators (paper:
            0.1, 0.9, 1e-5; the paper found Adam/RMSprop to oscillate). Their LR follows the same
            schedule as the student's (the Distiller's ``schedule``, ``milestones``, ``gamma``).
        sparse_recoding: True (SparseRecoding defaults), False, or a dict of SparseRecoding kwargs.
        **kwargs: the Distiller's keyword arguments (lr, schedule, amp, device, checkpoint_dir, ...).
            ``cache_teacher_logits`` is not allowed: the teacher's features are needed every step.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, losses, *, teacher_layers: Sequence[str],
                 student_layers: Sequence[str], k: int | None = 3, aggregation: KnowledgeAggregation | None = None,
                 example_input: torch.Tensor | None = None, aggregation_weight: float = 1.0, aggregator_lr: float = 0.1,
                 aggregator_momentum: float = 0.9, aggregator_weight_decay: float = 1e-5,
                 sparse_recoding=True, **kwargs):
        if teacher is None:
            raise ValueError("KRDistiller needs a teacher (its features are aggregated)")
        if kwargs.get("cache_teacher_logits"):
            raise ValueError("KRDistiller cannot cache teacher logits: the teacher's features are needed every step")
        if not (isinstance(aggregation_weight, (int, float)) and not isinstance(aggregation_weight, bool)
                and aggregation_weight >= 0):
            raise ValueError(f"aggregation_weight must be a number >= 0, got {aggregation_weight!r}")
        if not (isinstance(aggregator_lr, (int, float)) and aggregator_lr >= 0):
            raise ValueError(f"aggregator_lr must be a number >= 0, got {aggregator_lr!r}")
        self.teacher_layer_names = list(teacher_layers)
        self.student_layer_names = list(student_layers)
        if aggregation is None:
            if example_input is None:
                raise ValueError("KRDistiller needs aggregation=KnowledgeAggregation(...) or example_input "
                                 "(one batch of inputs) to infer the layer shapes")
            aggregation = KnowledgeAggregation.from_models(teacher, self.teacher_layer_names, student,
                                                           self.student_layer_names, example_input, k)
        if not isinstance(aggregation, KnowledgeAggregation):
            raise TypeError(f"aggregation must be a KnowledgeAggregation, got {type(aggregation).__name__}")
        if sum(aggregation.group_sizes) != len(self.teacher_layer_names) or \
                len(aggregation.aggregators) != len(self.student_layer_names):
            raise ValueError(
                f"aggregation groups {aggregation.group_sizes} teacher layers for {len(aggregation.aggregators)} student "
                f"layers, but {len(self.teacher_layer_names)} teacher and {len(self.student_layer_names)} student "
                "layers were named"
            )
        aggregator = Auxiliary(aggregation, optimizer="sgd", lr=aggregator_lr, momentum=aggregator_momentum,
                               weight_decay=aggregator_weight_decay, schedule=kwargs.get("schedule"),
                               milestones=kwargs.get("milestones"), gamma=kwargs.get("gamma", 0.1),
                               grad_clip=kwargs.get("grad_clip"))
        super().__init__(teacher, student, losses, auxiliaries={AGGREGATOR: aggregator}, **kwargs)
        self.aggregation_weight = float(aggregation_weight)
        self.aggregation = aggregation  # on the device now (the engine moved it)
        self._kr_student_tap = FeatureTap(self.student, self.student_layer_names)
        self._kr_teacher_tap = FeatureTap(self.teacher, self.teacher_layer_names, detach=True)
        if sparse_recoding is True:
            sparse_recoding = {}
        self.recoding = SparseRecoding(unwrap_model(self.student).parameters(), **sparse_recoding) \
            if sparse_recoding is not False and sparse_recoding is not None else None

    # ------------------------------------------------------------------ the two steps
    def compute_loss(self, batch):
        out = super().compute_loss(batch)  # teacher and student forward: the KR taps fill here
        out["teacher_features"] = [to_float(f) for f in self._kr_teacher_tap.features]
        out["student_features"] = [to_float(f) for f in self._kr_student_tap.features]
        return out

    def training_step(self, batch):
        out = self.compute_loss(batch)
        t_feats, s_feats = out.pop("teacher_features"), out.pop("student_features")
        t_feats = self.aggregation.pool(t_feats)  # once per step, for both aggregator calls and the anchors
        anchors = self.aggregation.anchors(t_feats)  # the frozen teacher's scale: the same for both steps
        with torch.autocast(device_type=self.device.type, enabled=False):
            # (1) aggregators on the aggregation loss, student fixed (its features detached).
            fit = aggregation_loss(self.auxiliary_model(AGGREGATOR)(t_feats), [f.detach() for f in s_feats], anchors)
        self.backward_step(fit, AGGREGATOR, update_scaler=False)
        # (2) student on task/KD losses + aggregation_weight * aggregation loss, aggregators fixed.
        with torch.autocast(device_type=self.device.type, enabled=False):
            with torch.no_grad():
                target = self.aggregation(t_feats)
            prior = aggregation_loss(target, s_feats, anchors)
        loss = out["loss"] + self.aggregation_weight * prior
        self.backward_step(loss, STUDENT)  # sparse recoding runs in before_optimizer_step
        out["loss"] = loss
        out["parts"] = {**out["parts"], "aggregation": prior.detach(), "aggregator_fit": fit.detach()}
        return out

    def before_optimizer_step(self, name, optimizer) -> None:
        # After backward (so after DDP's all-reduce) and GradScaler.unscale_: the rule sees true gradients.
        if name == STUDENT and self.recoding is not None:
            self.recoding.step()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self):
        state = super().checkpoint_state()
        state["sparse_recoding"] = self.recoding.state_dict() if self.recoding is not None else None
        return state

    def load_checkpoint_state(self, ckpt) -> None:
        super().load_checkpoint_state(ckpt)
        if self.recoding is not None and ckpt.get("sparse_recoding") is not None:
            self.recoding.load_state_dict(ckpt["sparse_recoding"])

    def close(self) -> None:
        self._kr_student_tap.remove()
        self._kr_teacher_tap.remove()
        super().close()


# ------------------------------------------------------------------ registry entry
NAME = "kr"
TITLE = "Knowledge Representing: knowledge aggregation and sparse recoding of the student's gradients"
PAPER = ("Liu, Wen, Gao, Tao, Chen, Osa, Kato, \"Knowledge Representing: Efficient, Sparse Representation of Prior "
         "Knowledge for Knowledge Distillation\", CVPR Workshops 2019 (arXiv 1911.05329); no public code")
OPTIONS = {"losses": None, "teacher_layers": None, "student_layers": None, "k": 3, "aggregation": None,
           "example_input": None, "aggregation_weight": 1.0, "aggregator_lr": 0.1, "aggregator_momentum": 0.9,
           "aggregator_weight_decay": 1e-5, "sparse_recoding": True}
OPTION_TYPES = {  # checked by kdfast.methods.check_options before build
    "losses": T.optional(T.instance_of(dict, what="a dict {name: loss module or (module, weight)}")),
    "teacher_layers": T.optional(T.names()), "student_layers": T.optional(T.names()), "k": T.optional(T.POSITIVE_INT),
    "aggregation": T.optional(T.instance_of(KnowledgeAggregation, what="a KnowledgeAggregation")), "example_input": T.optional(T.instance_of(torch.Tensor, what="a Tensor (a batch of inputs)")),
    "aggregation_weight": T.NON_NEGATIVE, "aggregator_lr": T.POSITIVE, "aggregator_momentum": T.NON_NEGATIVE,
    "aggregator_weight_decay": T.NON_NEGATIVE, "sparse_recoding": T.BOOL,
}


def build(teacher, student, *, losses=None, teacher_layers=None, student_layers=None, **options):
    """A :class:`KRDistiller`. ``losses`` default to Hinton KD (T = 4, alpha = 0.9); the layer lists
    default to the models' ``feature_layers`` (kdfast.models list their stage outputs)."""
    from ..losses import KDLoss

    teacher_layers = teacher_layers or list(getattr(teacher, "feature_layers", ()))
    student_layers = student_layers or list(getattr(student, "feature_layers", ()))
    if not teacher_layers or not student_layers:
        raise ValueError("kr needs teacher_layers and student_layers (the models list no feature_layers)")
    return KRDistiller(teacher, student, losses or {"kd": KDLoss(4.0, alpha=0.9)}, teacher_layers=teacher_layers,
                       student_layers=student_layers, **options)

