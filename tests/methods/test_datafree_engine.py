"""Data-free methods on the engine: one training step of each equals the official code's iteration,
collapse stops the run naming the epoch, exact resume after SIGKILL (generator, its optimizer, the noise
stream, RDSKD's reference losses and stage), DDP (each rank its own noise, reproducible), the registry,
and tiny runs of the experiment and the demo section."""
import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from helpers import load_ranks_assert_identical
from kdfast import methods, models
from kdfast.methods import dafl, datafree_base, dfad, rdskd
from kdfast.testing import baselines

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workers")
ROOT = os.path.dirname(os.path.dirname(HERE))
QUIET = dict(device="cpu", progress=False)


def _models(seed=0, classes=4):
    torch.manual_seed(seed)
    teacher = models.build("vgg8", num_classes=classes, in_channels=1, width_mult=0.125).eval().requires_grad_(False)
    student = models.build("vgg8", num_classes=classes, in_channels=1, width_mult=0.0625)
    generator = datafree_base.Generator(latent_dim=8, image_size=8, channels=1, ngf=4, bn_eps_quirk=True)
    return teacher, student, generator


def _assert_modules_close(a, b, **tol):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=name, **tol)


# ------------------------------------------------------------------------------------------ one step = the code
def test_dafl_step_equals_official_iteration():
    teacher, student, generator = _models()
    s_ref, g_ref = copy.deepcopy(student), copy.deepcopy(generator)
    engine = dafl.DAFLDistiller(teacher, student, generator=generator, num_classes=4, batch_size=6, steps_per_epoch=1,
                                gen_lr=0.05, gen_optimizer="sgd", optimizer="sgd", lr=0.05, momentum=0.0,
                                weight_decay=0.0, **QUIET)
    tap = datafree_base.PenultimateTap(teacher)
    opt_g = torch.optim.SGD(g_ref.parameters(), lr=0.05)
    opt_s = torch.optim.SGD(s_ref.parameters(), lr=0.05)
    g_ref.train(), s_ref.train()
    engine.on_epoch_start(0)
    engine.train_module.train()
    for _ in range(3):
        z = torch.randn(6, 8)
        out = engine.training_step(z)
        ref = baselines.dafl_official_iteration(g_ref, lambda x: (teacher(x), tap.pop()), s_ref, opt_g, opt_s, z)
    _assert_modules_close(generator, g_ref, rtol=1e-4, atol=1e-5)
    _assert_modules_close(student, s_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["parts"]["generator"] + out["parts"]["kd"], ref, rtol=1e-4, atol=1e-5)
    tap.remove()
    engine.close()


def test_dfad_step_equals_official_iteration():
    teacher, student, generator = _models(1)
    s_ref, g_ref = copy.deepcopy(student), copy.deepcopy(generator)
    t_ref = copy.deepcopy(teacher).requires_grad_(True)  # the official teacher is never frozen
    engine = dfad.DFADDistiller(teacher, student, generator=generator, num_classes=4, batch_size=5, steps_per_epoch=1,
                                gen_lr=0.05, gen_optimizer="sgd", optimizer="sgd", lr=0.01, momentum=0.9,
                                weight_decay=1e-4, **QUIET)
    opt_s = torch.optim.SGD(s_ref.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    opt_g = torch.optim.SGD(g_ref.parameters(), lr=0.05)
    g_ref.train(), s_ref.train()
    engine.on_epoch_start(0)
    engine.train_module.train()
    for _ in range(2):
        z = torch.randn(30, 8)
        out = engine.training_step(z)
        loss_s, loss_g = baselines.dfad_official_iteration(g_ref, t_ref, s_ref, opt_s, opt_g, list(z.chunk(6)))
    _assert_modules_close(generator, g_ref, rtol=1e-4, atol=1e-5)
    _assert_modules_close(student, s_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["parts"]["generator"], loss_g, rtol=1e-4, atol=1e-6)
    assert all(p.requires_grad for p in student.parameters())  # the generator step's freeze is undone
    engine.close()


def test_rdskd_generator_stage_equals_official_with_reference_refresh():
    teacher, student, generator = _models(2)
    g_ref = copy.deepcopy(generator)
    engine = rdskd.RDSKDGeneratorStage(teacher, student, generator=generator, num_classes=4, batch_size=8,
                                       steps_per_epoch=4, gen_lr=0.01, gen_optimizer="sgd", **QUIET)
    opt_g = torch.optim.SGD(g_ref.parameters(), lr=0.01)
    g_ref.train()
    state = {}
    for epoch in range(2):
        engine.on_epoch_start(epoch)
        for i in range(4):
            z = torch.randn(8, 8)
            out = engine.training_step(z)
            ref = baselines.rdskd_official_generator_iteration(g_ref, teacher, opt_g, z, state, i)
            torch.testing.assert_close(out["loss"], ref, rtol=1e-4, atol=1e-6)
        # previous = the losses of iteration 1 of this epoch, as the code's `if i == 1`
        torch.testing.assert_close(engine.previous["one_hot"], state["loss_oh_prev"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(engine.previous["class_diversity"], state["loss_ie_pre"], rtol=1e-4, atol=1e-6)
    _assert_modules_close(generator, g_ref, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), _models(2)[1].state_dict().values()))
    engine.close()


def test_rdskd_student_stage_equals_official_kd_t10():
    teacher, student, generator = _models(3)
    generator.eval()
    s_ref, g_ref = copy.deepcopy(student), copy.deepcopy(generator)
    engine = rdskd.RDSKDStudentStage(teacher, student, generator=generator, num_classes=4, batch_size=6,
                                     steps_per_epoch=1, optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.0,
                                     **QUIET)
    opt_s = torch.optim.SGD(s_ref.parameters(), lr=0.05)
    s_ref.train()
    engine.on_epoch_start(0)
    engine.train_module.train()
    assert not generator.training and not any(p.requires_grad for p in generator.parameters())
    for _ in range(3):
        z = torch.randn(6, 8)
        out = engine.training_step(z)
        ref = baselines.rdskd_official_student_iteration(g_ref, teacher, s_ref, opt_s, z, 10.0)
        torch.testing.assert_close(out["loss"], ref, rtol=1e-4, atol=1e-5)
    _assert_modules_close(student, s_ref, rtol=1e-4, atol=1e-5)
    _assert_modules_close(generator, g_ref, rtol=0, atol=0)  # frozen, eval mode: BN statistics do not move
    engine.close()


# ------------------------------------------------------------------------------------------ collapse
class _NaNAfter(nn.Module):
    """A generator whose output turns NaN from its ``bad_from``-th call on."""

    def __init__(self, inner, bad_from):
        super().__init__()
        self.inner, self.bad_from, self.calls = inner, bad_from, 0
        self.latent_dim = inner.latent_dim

    def forward(self, z):
        self.calls += 1
        x = self.inner(z)
        return x * float("nan") if self.calls >= self.bad_from else x


@pytest.mark.parametrize("cls", [dafl.DAFLDistiller, dfad.DFADDistiller])
def test_nan_generator_stops_the_run_naming_the_epoch(cls):
    teacher, student, generator = _models(4)
    gen = _NaNAfter(generator, bad_from=3 * (6 if cls is dfad.DFADDistiller else 1) + 2)  # in epoch 1
    engine = cls(teacher, student, generator=gen, num_classes=4, batch_size=6, steps_per_epoch=3, gen_lr=1e-3,
                 epochs=3, collapse_warmup=100, **QUIET)
    with pytest.raises(datafree_base.GeneratorCollapse, match=r"generator collapsed in epoch 1 \(0-based\).*NaN"):
        engine.fit()
    assert engine.epoch == 1 and len(engine.history) == 1
    engine.close()


class _OneClassTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(x.flatten(1)) * 0 + torch.tensor([5.0, 0, 0, 0])


def test_one_class_for_a_whole_epoch_stops_after_the_warmup():
    _, student, generator = _models(5)
    engine = dafl.DAFLDistiller(_OneClassTeacher(), student, generator=generator, num_classes=4, batch_size=6,
                                steps_per_epoch=2, gen_lr=1e-3, epochs=4, collapse_warmup=2, **QUIET)
    with pytest.raises(datafree_base.GeneratorCollapse, match=r"epoch 2 \(0-based\): all 12 generated samples were "
                                                          r"predicted as class 0"):
        engine.fit()
    assert [r["class_counts"] for r in engine.history] == [[12, 0, 0, 0]] * 3
    assert "collapsed" in engine.history[-1] and "collapsed" not in engine.history[1]
    engine.close()


# ------------------------------------------------------------------------------------------ resume
def _run(out_dir, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, os.path.join(HERE, "datafree_worker.py"), str(out_dir), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _final(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("method,kill_at,stage", [
    ("dafl", 3 + 2, "None"),           # second step of epoch 2 (0-based 1)
    ("rdskd", 3 + 1, "generator"),     # generator stage, epoch 2: the reference losses are mid-epoch
    ("rdskd", 3 + 2, "student"),       # student stage, epoch 2 (the generator stage is complete)
])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, method, kill_at, stage):
    full = _run(tmp_path / "full", method)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run(tmp_path / "killed", method, kill_at, stage)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    assert not (tmp_path / "killed" / "final.pt").exists()
    resumed = _run(tmp_path / "killed", method)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _final(tmp_path / "full" / "final.pt"), _final(tmp_path / "killed" / "final.pt")
    for part in ("student", "generator"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    hist_a = a["history"] if isinstance(a["history"], list) else a["history"]["student"]
    hist_b = b["history"] if isinstance(b["history"], list) else b["history"]["student"]
    assert [h["loss"] for h in hist_a] == [h["loss"] for h in hist_b]
    records = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "resume" for r in records)


# ------------------------------------------------------------------------------------------ DDP
def test_ddp_each_rank_own_noise_ranks_identical_and_reproducible(tmp_path):
    # torchrun, 2 CPU processes (gloo), DFAD (5 student steps and 1 generator step per batch)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        _torchrun(tmp_path / sub, "dfad")
    r0, r1 = load_ranks_assert_identical(tmp_path / "a", ("student", "generator"))
    assert not torch.equal(r0["first_batch"][None], r1["first_batch"][None])  # each rank draws its own noise
    s0, _ = load_ranks_assert_identical(tmp_path / "b", ("student", "generator"))
    for part in ("student", "generator"):  # same seed, same world size: the same result
        for k in r0[part]:
            assert torch.equal(r0[part][k], s0[part][k]), f"{part}.{k} differs between two identical DDP runs"


def _torchrun(out_dir, method):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "datafree_worker.py"), str(out_dir), method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------ registry, options
def test_registry_and_options():
    assert {"dafl", "dfad", "rdskd"} <= set(methods.available())
    teacher, student, _ = _models(6)
    for name in ("dafl", "dfad"):
        engine = methods.build(name, teacher, student, image_size=8, ngf=4, batch_size=4, steps_per_epoch=1,
                               epochs=1, **QUIET)
        assert isinstance(engine, datafree_base.GeneratorDistiller) and engine.generator.image_shape == (1, 8, 8)
        engine.fit()
        engine.close()
    assert dafl.build(teacher, student, image_size=8).optimizer.defaults["lr"] == 2e-3
    assert isinstance(dfad.build(teacher, student, image_size=8).optimizer, torch.optim.SGD)
    run = methods.build("rdskd", teacher, student, image_size=8, ngf=4, batch_size=4, steps_per_epoch=2,
                        generator_epochs=1, epochs=1, collapse_warmup=100, **QUIET)
    history = run.fit(None)
    assert set(history) == {"generator", "student"} and run.generator.image_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="has no option"):
        methods.check_options("dafl", {"lr_gen": 1})
    with pytest.raises(ValueError, match="batch_size must be even"):
        rdskd.RDSKDGeneratorStage(teacher, student, generator=_models()[2], num_classes=4, batch_size=5,
                                  steps_per_epoch=1, gen_lr=1e-3, **QUIET)
    with pytest.raises(ValueError, match="gen_lr must be a positive number"):
        dafl.DAFLDistiller(teacher, student, generator=_models()[2], num_classes=4, batch_size=4, steps_per_epoch=1,
                           gen_lr=0, **QUIET)
    with pytest.raises(ValueError, match="needs a teacher"):
        dfad.DFADDistiller(None, student, generator=_models()[2], num_classes=4, batch_size=4, steps_per_epoch=1,
                           gen_lr=1e-3, **QUIET)
