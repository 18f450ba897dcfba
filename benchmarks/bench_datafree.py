"""One data-free training iteration per method: kdfast's engine step against the same iteration written
as the official code writes it, timed in alternation (harness.time_paired).

    KDFAST_BENCH_QUICK=1 pytest benchmarks/bench_datafree.py --benchmark-json=bench-datafree.json  # quick
    pytest benchmarks/bench_datafree.py --benchmark-json=bench-datafree.json                     # full
    python benchmarks/report.py bench-datafree.json --out benchmarks/results/<device>/datafree

Shapes are the digits experiment's: 16x16x1 images, teacher vgg8 width 0.25, student lenet5 width 0.5,
generator ngf 16, latent 100, batch 128 (quick: 64). One round = one iteration of the method:

* ``dafl``: generator step + student step from one forward (``DAFLDistiller.training_step``) against
  ``baselines.dafl_official_iteration`` (DAFL-train.py);
* ``dfad``: 5 student steps + 1 generator step (``DFADDistiller.training_step``) against
  ``baselines.dfad_official_iteration`` (DFAD_mnist.py; its teacher keeps requires_grad, as the code);
* ``rdskd-generator``: one generator step, ONE teacher pass over the batch (``RDSKDGeneratorStage``)
  against ``baselines.rdskd_official_generator_iteration`` (two teacher passes, .item() per iteration);
* ``rdskd-student``: one student step, generator and teacher under no_grad (``RDSKDStudentStage``)
  against ``baselines.rdskd_official_student_iteration`` (both run with autograd on).

Both sides start from the same weights (copies) and get the same noise; each trains its own copy
while timed (the cost of an iteration does not depend on the weights' values). The kdfast side is the
real engine step (monitoring, per-step loss dict, KD through kdfast.ops.kd_loss). ``bf16`` rows run
the kdfast step under CPU/CUDA autocast (bfloat16) against the official fp32 iteration.
"""
from __future__ import annotations

import copy

import pytest
import torch

from harness import QUICK, time_paired
from kdfast import models
from kdfast.methods import dafl, datafree_base, dfad, rdskd
from kdfast.testing import baselines

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCH = 64 if QUICK else 128
LATENT = 100
CASES = ["dafl", "dfad", "rdskd-generator", "rdskd-student"]
VARIANTS = ["fp32"] if QUICK else ["fp32", "bf16"]


def _setup(device):
    torch.manual_seed(0)
    teacher = models.build("vgg8", num_classes=10, in_channels=1, width_mult=0.25).to(device).eval()
    teacher.requires_grad_(False)
    student = models.build("lenet5", num_classes=10, in_channels=1, width_mult=0.5).to(device)
    generator = datafree_base.Generator(LATENT, 16, 1, ngf=16, bn_eps_quirk=True).to(device)
    return teacher, student, generator


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _steps(case, device, amp):
    teacher, student, generator = _setup(device)
    s_ref, g_ref, t_ref = copy.deepcopy(student), copy.deepcopy(generator), copy.deepcopy(teacher)
    common = dict(num_classes=10, batch_size=BATCH, steps_per_epoch=1, device=device, amp=amp, progress=False)
    gen = torch.Generator(device="cpu").manual_seed(1)
    if case == "dafl":
        engine = dafl.DAFLDistiller(teacher, student, generator=generator, gen_lr=0.2, optimizer="adam", lr=2e-3,
                                    weight_decay=0.0, **common)
        tap = datafree_base.PenultimateTap(t_ref)
        opt_g, opt_s = torch.optim.Adam(g_ref.parameters(), lr=0.2), torch.optim.Adam(s_ref.parameters(), lr=2e-3)
        z = torch.randn(BATCH, LATENT, generator=gen).to(device)
        kdfast_step = lambda: engine.training_step(z)  # noqa: E731
        baseline_step = lambda: baselines.dafl_official_iteration(  # noqa: E731
            g_ref, lambda x: (t_ref(x), tap.pop()), s_ref, opt_g, opt_s, z)
    elif case == "dfad":
        engine = dfad.DFADDistiller(teacher, student, generator=generator, gen_lr=1e-3, optimizer="sgd", lr=0.01,
                                    momentum=0.9, weight_decay=1e-4, **common)
        t_ref.requires_grad_(True)  # DFAD_mnist.py never freezes its teacher
        opt_s = torch.optim.SGD(s_ref.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        opt_g = torch.optim.Adam(g_ref.parameters(), lr=1e-3)
        z = torch.randn(6 * BATCH, LATENT, generator=gen).to(device)
        zs = list(z.chunk(6))
        kdfast_step = lambda: engine.training_step(z)  # noqa: E731
        baseline_step = lambda: baselines.dfad_official_iteration(g_ref, t_ref, s_ref, opt_s, opt_g, zs)  # noqa: E731
    elif case == "rdskd-generator":
        engine = rdskd.RDSKDGeneratorStage(teacher, student, generator=generator, gen_lr=1e-3, **common)
        engine.on_epoch_start(0)
        opt_g = torch.optim.Adam(g_ref.parameters(), lr=1e-3)
        z = torch.randn(BATCH, LATENT, generator=gen).to(device)
        state = {}
        kdfast_step = lambda: engine.training_step(z)  # noqa: E731
        baseline_step = lambda: baselines.rdskd_official_generator_iteration(g_ref, t_ref, opt_g, z, state, 5)  # noqa: E731
    else:
        generator.eval()
        g_ref.eval()
        engine = rdskd.RDSKDStudentStage(teacher, student, generator=generator, optimizer="adam", lr=2e-3,
                                         weight_decay=0.0, **common)
        opt_s = torch.optim.Adam(s_ref.parameters(), lr=2e-3)
        z = torch.randn(BATCH, LATENT, generator=gen).to(device)
        kdfast_step = lambda: engine.training_step(z)  # noqa: E731
        baseline_step = lambda: baselines.rdskd_official_student_iteration(g_ref, t_ref, s_ref, opt_s, z, 10.0)  # noqa: E731
    engine.on_epoch_start(0)
    engine.train_module.train()
    s_ref.train()

    def k():
        kdfast_step()
        _sync(device)

    def b():
        baseline_step()
        _sync(device)

    return k, b, engine


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_datafree_iteration(benchmark, case, variant, device):
    amp = "bf16" if variant == "bf16" else None
    kdfast_step, baseline_step, engine = _steps(case, device, amp)
    try:
        time_paired(benchmark, f"data-free iteration {case} {variant} {device}", kdfast_step, baseline_step, device,
                    {"loss": f"{case} iteration", "shape": f"B={BATCH} 16x16x1 vgg8-0.25 -> lenet5-0.5",
                     "dtype": variant, "baseline": "official code's iteration (fp32)", "case": case})
    finally:
        engine.close()
