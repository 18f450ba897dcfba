"""One knowledge-distillation training step, kdfast against the plain-PyTorch and RepDistiller ways
of writing it: steps per second and peak memory.

A step = teacher forward (no grad, stage outputs tapped) + student forward (stage outputs tapped) +
losses + backward + SGD (momentum) step, on random CIFAR-sized inputs (32x32, 100 classes). The
teacher is a CIFAR ResNet; the student is that teacher Tucker-2 decomposed (every 3x3 conv with
ranks = half of each mode, weights by HOSVD), the student of Sadhukhan et al. (ICIP 2020).

Formulations (one pytest-benchmark group per (losses, teacher, batch, device), so they sit side by side):

| impl | student's Tucker layers | KD | NST |
|---|---|---|---|
| kdfast | kdfast.nn.TuckerConv2d (one fused op) | kdfast.losses.KDLoss (fused op) | kdfast.losses.NSTLoss (fused op) |
| pytorch | nn.Sequential(1x1, kxk, 1x1 nn.Conv2d), as tensorly / jacobgil build it | F.kl_div DistillKL + F.cross_entropy | baselines.nst_poly_loss_bmm (bmm Grams) |
| repdistiller | nn.Sequential(1x1, kxk, 1x1) | DistillKL (F.kl_div, batchmean, T^2) + CE | baselines.repdistiller_nst_loss (broadcast product) |
| dense-student | the undecomposed teacher architecture (extra row: what decomposition buys) | kdfast KDLoss | kdfast NSTLoss |

Losses: "kd" = 0.1 CE + 0.9 KD(T = 4); "kd+nst" = that + 50 x NST(poly) summed over layer1..layer3
(RepDistiller's recipe). All formulations start from the same weights.

    KDFAST_BENCH_QUICK=1 pytest benchmarks/bench_train_step.py --benchmark-json=train.json
    python benchmarks/report_train_step.py train.json --out benchmarks/results/<device>/train-step

Quick mode: resnet20 teacher, batch 32, 3 rounds. Full mode adds resnet56 (batch 64) and
resnet32x4 (batch 32 on CPU, 128 on CUDA). Peak memory: harness.peak_bytes (CPU: torch.profiler
allocation events; CUDA: max_memory_allocated), one extra untimed step.
"""
from __future__ import annotations

import copy
import math
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import harness
from harness import QUICK
from kdfast import models
from kdfast.testing import baselines
from kdfast.distill import FeatureTap

TEMPERATURE, KD_WEIGHT, CE_WEIGHT, NST_WEIGHT = 4.0, 0.9, 0.1, 50.0
FEATURE_LAYERS = ["layer1", "layer2", "layer3"]
NUM_CLASSES, IMAGE = 100, 32

# (teacher, batch on CPU, batch on CUDA, tier)
SETUPS = [
    ("resnet20", 32, 128, "quick"),
    ("resnet56", 64, 128, "full"),
    ("resnet32x4", 32, 128, "full"),
]
IMPLS = ["kdfast", "pytorch", "repdistiller", "dense-student"]
LOSS_SETS = ["kd", "kd+nst"]


# =============================================================================================== models
def _tucker_student(teacher: nn.Module) -> nn.Module:
    """The teacher with each 3x3 conv (more than 3 input channels) replaced by a TuckerConv2d of
    half ranks (HOSVD of the teacher's weights)."""
    from kdfast.nn import TuckerConv2d

    student = copy.deepcopy(teacher)
    for name, module in list(student.named_modules()):
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.in_channels > 3:
            parent_name, _, child = name.rpartition(".")
            parent = student.get_submodule(parent_name) if parent_name else student
            setattr(parent, child, TuckerConv2d.from_conv(module, ranks=0.5))
    return student


def _as_three_convs(student: nn.Module) -> nn.Module:
    """Same weights, each TuckerConv2d as nn.Sequential(1x1 conv, kxk conv, 1x1 conv) of nn.Conv2d."""
    from kdfast.nn import TuckerConv2d

    out = copy.deepcopy(student)
    for name, m in list(out.named_modules()):
        if not isinstance(m, TuckerConv2d):
            continue
        r_out, r_in = m.ranks
        seq = nn.Sequential(
            nn.Conv2d(m.in_channels, r_in, 1, bias=False),
            nn.Conv2d(r_in, r_out, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation, bias=False),
            nn.Conv2d(r_out, m.out_channels, 1, bias=m.bias is not None),
        )
        with torch.no_grad():
            seq[0].weight.copy_(m.first[:, :, None, None])
            seq[1].weight.copy_(m.core)
            seq[2].weight.copy_(m.last[:, :, None, None])
            if m.bias is not None:
                seq[2].bias.copy_(m.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, seq)
    return out


_MODEL_CACHE: dict = {}


def _models(teacher_name: str, device: str):
    key = (teacher_name, device)
    if key not in _MODEL_CACHE:
        torch.manual_seed(0)
        teacher = models.build(teacher_name, num_classes=NUM_CLASSES).to(device).eval().requires_grad_(False)
        tucker = _tucker_student(teacher.cpu()).to(device)
        teacher = teacher.to(device)
        _MODEL_CACHE.clear()  # one teacher's models at a time (memory)
        _MODEL_CACHE[key] = {"teacher": teacher, "tucker": tucker, "three_convs": _as_three_convs(tucker)}
    return _MODEL_CACHE[key]


# =============================================================================================== losses
def _distill_kl(s_logits, t_logits):
    # RepDistiller DistillKL: KL(p_t || p_s) at temperature T, batchmean, times T^2
    p_s = F.log_softmax(s_logits / TEMPERATURE, dim=1)
    p_t = F.softmax(t_logits / TEMPERATURE, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * TEMPERATURE**2


def _loss_fn(impl: str, loss_set: str):
    if impl in ("kdfast", "dense-student"):
        from kdfast.losses import KDLoss, NSTLoss

        kd, nst = KDLoss(TEMPERATURE, alpha=KD_WEIGHT), NSTLoss("poly")

        def fn(s_logits, t_logits, y, s_feats, t_feats):
            loss = kd(s_logits, t_logits, y)  # = 0.1 CE + 0.9 KD in one op
            if loss_set == "kd+nst":
                loss = loss + NST_WEIGHT * nst(s_feats, t_feats)
            return loss

        return fn
    nst_pair = baselines.nst_poly_loss_bmm if impl == "pytorch" else baselines.repdistiller_nst_loss

    def fn(s_logits, t_logits, y, s_feats, t_feats):
        loss = CE_WEIGHT * F.cross_entropy(s_logits, y) + KD_WEIGHT * _distill_kl(s_logits, t_logits)
        if loss_set == "kd+nst":
            loss = loss + NST_WEIGHT * sum(nst_pair(fs, ft) for fs, ft in zip(s_feats, t_feats))
        return loss

    return fn


# =============================================================================================== cases
def _setups():
    out = []
    for dev in harness.devices():
        for teacher, b_cpu, b_cuda, tier in SETUPS:
            if QUICK and tier != "quick":
                continue
            for loss_set in LOSS_SETS:
                for impl in IMPLS:
                    batch = b_cuda if dev == "cuda" else b_cpu
                    out.append(pytest.param(dev, teacher, batch, loss_set, impl, id=f"{loss_set}-{teacher}-B{batch}-{impl}-{dev}"))
    return out


class _Case:
    """One formulation's training step on shared inputs; ``remove()`` takes its feature taps off."""

    def __init__(self, device, teacher_name, batch, loss_set, impl):
        nets = _models(teacher_name, device)
        self.device, self.teacher = device, nets["teacher"]
        student = {"kdfast": nets["tucker"], "dense-student": self.teacher, "pytorch": nets["three_convs"],
                   "repdistiller": nets["three_convs"]}[impl]
        self.student = copy.deepcopy(student).train().requires_grad_(True)  # a fresh copy per case: same start
        self.opt = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.loss_fn = _loss_fn(impl, loss_set)
        torch.manual_seed(0)
        self.x = torch.randn(batch, 3, IMAGE, IMAGE, device=device)
        self.y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
        self.t_tap = FeatureTap(self.teacher, FEATURE_LAYERS, detach=True)
        self.s_tap = FeatureTap(self.student, FEATURE_LAYERS)

    def step(self):
        with torch.no_grad():
            t_logits = self.teacher(self.x)
        t_feats = self.t_tap.features
        s_logits = self.student(self.x)
        loss = self.loss_fn(s_logits, t_logits, self.y, self.s_tap.features, t_feats)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        harness.synchronize(self.device)
        return loss.detach()

    def remove(self):
        self.t_tap.remove()
        self.s_tap.remove()


@pytest.mark.parametrize("device, teacher_name, batch, loss_set, impl", _setups())
def test_train_step(benchmark, device, teacher_name, batch, loss_set, impl):
    benchmark.group = f"train-step {loss_set} {teacher_name} B{batch} float32 {device}"
    case = _Case(device, teacher_name, batch, loss_set, impl)
    step = case.step
    budget, budget_source = harness.memory_budget(device)
    benchmark.extra_info.update({
        "loss": "train-step", "loss_set": loss_set, "impl": impl, "teacher": teacher_name, "batch": batch,
        "device": device, "dtype": "float32", "threads": torch.get_num_threads(),
        "student_params": sum(p.numel() for p in case.student.parameters()),
        "teacher_params": sum(p.numel() for p in case.teacher.parameters()),
        "budget_bytes": budget, "budget_source": budget_source,
    })

    try:
        if benchmark.disabled:
            loss = benchmark.pedantic(step, rounds=1, iterations=1)
            assert torch.isfinite(loss)
            benchmark.extra_info["status"] = "ok (not timed: --benchmark-disable)"
            return
        t0 = time.perf_counter()
        loss = step()
        first = time.perf_counter() - t0
        assert torch.isfinite(loss), f"{impl}: non-finite loss"
        harness.time_rounds(benchmark, step, device, first)
    except Exception as exc:  # noqa: BLE001 - only OOM is a result; anything else fails the case
        if not harness.is_oom(exc):
            raise
        harness.release_memory(device)
        benchmark.extra_info["status"] = f"out of memory ({type(exc).__name__})"
        harness.NOT_RUN.append({"name": benchmark.name, "fullname": benchmark.fullname, "group": benchmark.group,
                                "kind": "oom", "status": benchmark.extra_info["status"], "extra_info": dict(benchmark.extra_info)})
        benchmark.skipped = True
    finally:
        case.remove()
        harness.release_memory(device)


def _paired_setups():
    return list(dict.fromkeys(p.values[:4] for p in _setups()))  # _setups() order, one per implementation set


@pytest.mark.parametrize("device, teacher_name, batch, loss_set", _paired_setups())
def test_train_step_interleaved(benchmark, device, teacher_name, batch, loss_set):
    """All formulations of one group in turns (the order rotated every round), so that slow drift of
    the machine (other tenants, clock changes: up to +-15% between minutes on a shared 2-core VM)
    hits each formulation alike. Records each one's median step and, per formulation, the median over
    rounds of (its step / kdfast's step in the same round): the paired ratio docs/performance.md quotes."""
    benchmark.group = f"train-step-interleaved {loss_set} {teacher_name} B{batch} float32 {device}"
    cases = {impl: _Case(device, teacher_name, batch, loss_set, impl) for impl in IMPLS}
    try:
        t0 = time.perf_counter()
        for case in cases.values():  # warm-up: first calls pay allocator and oneDNN setup
            case.step()
        round_s = time.perf_counter() - t0
        # About 8 x the per-case time budget, as all formulations share the rounds; 8..40 rounds.
        rounds = 3 if QUICK else int(min(40, max(8, math.ceil(8 * harness.TARGET_SECONDS / round_s))))
        times = harness.time_interleaved(benchmark, {impl: case.step for impl, case in cases.items()}, device, rounds)
    finally:
        for case in cases.values():
            case.remove()
        harness.release_memory(device)
    medians = {impl: statistics.median(ts) for impl, ts in times.items()}
    ratios = {impl: statistics.median(t / k for t, k in zip(times[impl], times["kdfast"])) for impl in IMPLS}
    benchmark.extra_info.update({
        "loss": "train-step-interleaved", "loss_set": loss_set, "teacher": teacher_name, "batch": batch,
        "device": device, "dtype": "float32", "threads": torch.get_num_threads(), "rounds": len(times["kdfast"]),
        "median_s": medians, "paired_ratio_vs_kdfast": ratios, "status": "ok",
    })
