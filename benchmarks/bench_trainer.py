"""Overhead of kdfast.distill.Distiller per training step against a hand-written KD loop.

    KDFAST_BENCH_QUICK=1 pytest benchmarks/bench_trainer.py --benchmark-min-time=0.1   # quick
    pytest benchmarks/bench_trainer.py --benchmark-json=bench-trainer.json              # full

One timed round = one optimisation step (teacher forward under no_grad, student forward, CE + KD,
backward, SGD step) on a fixed CIFAR-shaped batch. Implementations, one pytest-benchmark group per
(model pair, batch, device):

* ``plain``: the loop RepDistiller's ``train_distill`` runs (minus data loading), written inline;
* ``distiller``: ``Distiller.training_step`` with the same loss modules (hooks, dispatch, DDP-ready
  wrapper, AMP plumbing): the difference to ``plain`` is the trainer's overhead;
* ``distiller-cached``: the same with ``cache_teacher_logits=True`` after the cache is filled (no
  teacher forward), the speed-up available when the data pipeline is deterministic.

These rows are not part of report.py's loss tables (``extra_info["suite"] == "trainer"``); read them
from pytest-benchmark's table or JSON.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import QUICK
from kdfast import models
from kdfast.distill import Distiller

PAIRS = [("resnet14", "resnet8", 32)] if QUICK else [("resnet14", "resnet8", 32), ("resnet56", "resnet20", 64)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
T = 4.0


class KD(nn.Module):
    """Hinton KD, batchmean KL x T^2 (RepDistiller DistillKL), "logits" protocol."""

    kdfast_inputs = "logits"

    def forward(self, s, t, targets=None):
        return F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T


def _setup(teacher_name, student_name, batch, device):
    torch.manual_seed(0)
    teacher = models.build(teacher_name, num_classes=100).to(device).eval()
    student = models.build(student_name, num_classes=100).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    idx = torch.arange(batch, device=device)
    return teacher, student, x, y, idx


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", PAIRS, ids=[f"{t}-{s}-B{b}" for t, s, b in PAIRS])
@pytest.mark.parametrize("impl", ["plain", "distiller", "distiller-cached"])
def test_training_step(benchmark, impl, pair, device):
    teacher_name, student_name, batch = pair
    teacher, student, x, y, idx = _setup(teacher_name, student_name, batch, device)
    benchmark.group = f"trainer step {teacher_name}->{student_name} B={batch} {device}"
    benchmark.extra_info.update({"suite": "trainer", "impl": impl, "device": device, "batch": batch,
                                 "threads": torch.get_num_threads()})
    if impl == "plain":
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        ce, kd = nn.CrossEntropyLoss(), KD()

        def step():
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            loss = 0.1 * ce(s_logits, y) + 0.9 * kd(s_logits, t_logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)
    else:
        cached = impl == "distiller-cached"
        d = Distiller(teacher, student, {"ce": (nn.CrossEntropyLoss(), 0.1), "kd": (KD(), 0.9)}, lr=0.05,
                      device=device, progress=False, cache_teacher_logits=cached)
        d._dataset_len = batch  # normally set by fit() from the dataset; here the "dataset" is one batch
        batch_ = (x, y, idx) if cached else (x, y)

        def step():
            d.training_step(batch_)
            _sync(device)

    step()  # warm-up (and fills the teacher-logit cache)
    benchmark.pedantic(step, rounds=3 if QUICK else 20, warmup_rounds=1 if not QUICK else 0)
