"""The engine's extension points for methods: auxiliary trainables, backward_step by name and the
before_optimizer_step hook, batch sources, stages, strict JSON logs, and the methods registry.
(Exact resume of auxiliaries, noise sources and stages under SIGKILL: tests/engine/test_resume.py.)"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill_helpers import SoftKL, models, synthetic
from kdfast import methods
from kdfast.distill import Auxiliary, Distiller, NoiseSource, Stage, StagedRun, json_record


class _Gen(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3 * 8 * 8)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 3, 8, 8)


class _TwoStep(Distiller):
    """Student step on generated images, then a generator step; records the hook's calls."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def training_step(self, z):
        x = self.auxiliary_model("gen")(z)
        loss_s = F.l1_loss(self.student(x.detach()), self.teacher(x.detach()))
        self.backward_step(loss_s, "student", update_scaler=False)
        loss_g = -F.l1_loss(self.student(x), self.teacher(x))
        self.backward_step(loss_g, "gen")
        return {"loss": loss_s.detach(), "parts": {"gen": loss_g.detach()}, "logits": None, "targets": None}

    def before_optimizer_step(self, name, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.calls.append((name, optimizer is self.optimizers[name], len(grads) > 0))


def _two_step(**kw):
    teacher, student = models(seed=0)
    return _TwoStep(teacher, student, {}, auxiliaries={"gen": Auxiliary(_Gen(), lr=1e-2, **kw)}, device="cpu",
                    progress=False, lr=0.05)


def test_auxiliary_gets_its_own_optimizer_hook_and_updates():
    d = _two_step(schedule="step", milestones=[1], gamma=0.5)
    gen0 = [p.detach().clone() for p in d.auxiliaries["gen"].module.parameters()]
    student0 = [p.detach().clone() for p in d.student.parameters()]
    history = d.fit(NoiseSource(5, 4, steps_per_epoch=3), epochs=2)
    assert len(history) == 2 and "loss/gen" in history[0] and "train_accuracy" not in history[0]
    assert d.calls == [("student", True, True), ("gen", True, True)] * 6
    assert isinstance(d.optimizers["gen"], torch.optim.Adam) and isinstance(d.optimizers["student"], torch.optim.SGD)
    assert d.schedulers["gen"].get_last_lr() == [pytest.approx(1e-2 * 0.5)]
    assert all(not torch.equal(a, b) for a, b in zip(gen0, d.auxiliaries["gen"].module.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(student0, d.student.parameters()))
    s_ids = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert not s_ids & {id(p) for p in d.auxiliaries["gen"].module.parameters()}
    d.close()


def test_auxiliary_gradients_are_clipped():
    d = _two_step(grad_clip=1e-3)
    seen = []
    d.before_optimizer_step = lambda name, opt: None
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        seen.append(max_norm)
        return original(params, max_norm, *a, **k)

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        d.fit(NoiseSource(5, 4, steps_per_epoch=2), epochs=1)
    finally:
        torch.nn.utils.clip_grad_norm_ = original
    assert seen == [1e-3, 1e-3]  # the generator's steps only: the student has no grad_clip
    d.close()


def test_noise_source_is_a_function_of_seed_epoch_and_rank():
    src = NoiseSource(3, (2, 2), steps_per_epoch=2)
    a = list(src.batches(0, torch.Generator().manual_seed(1)))
    b = list(src.batches(0, torch.Generator().manual_seed(1)))
    assert len(a) == 2 and a[0].shape == (3, 2, 2) and all(torch.equal(x, y) for x, y in zip(a, b))
    seen = []

    class Probe(_TwoStep):
        def training_step(self, z):
            seen.append(z.clone())
            return super().training_step(z)

    teacher, student = models(seed=0)
    d = Probe(teacher, student, {}, auxiliaries={"gen": Auxiliary(_Gen())}, device="cpu", progress=False, seed=4)
    d.fit(NoiseSource(2, 4, steps_per_epoch=2), epochs=2)
    assert not torch.equal(seen[0], seen[2])  # epochs draw different noise
    d.close()


@pytest.mark.parametrize("kw, exc, fragment", [
    (dict(optimizer="rmsprop"), ValueError, "optimizer must be 'sgd', 'adam'"),
    (dict(grad_clip=-1), ValueError, "grad_clip must be None or a positive number"),
    (dict(lr=-1.0), ValueError, "lr must be a non-negative number"),
    (dict(schedule="step"), ValueError, "needs milestones"),
    (dict(bogus=1), TypeError, "valid options"),
])
def test_auxiliary_errors(kw, exc, fragment):
    with pytest.raises(exc, match=fragment):
        Auxiliary(_Gen(), **kw)


def test_engine_errors_for_auxiliaries_and_sources():
    teacher, student = models(seed=0)
    with pytest.raises(TypeError, match="must be a kdfast.distill.Auxiliary"):
        _TwoStep(teacher, student, {}, auxiliaries={"gen": _Gen()}, device="cpu")
    with pytest.raises(ValueError, match="identifiers other than 'student'"):
        _TwoStep(teacher, student, {}, auxiliaries={"student": Auxiliary(_Gen())}, device="cpu")
    with pytest.raises(ValueError, match="shares parameters with the student"):
        _TwoStep(teacher, student, {}, auxiliaries={"gen": Auxiliary(student)}, device="cpu")
    with pytest.raises(ValueError, match="losses is empty"):
        Distiller(teacher, student, {}, device="cpu")
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive int"):
        NoiseSource(2, 4, steps_per_epoch=0)
    d = _two_step()
    with pytest.raises(KeyError, match="no trainable named 'nope'"):
        d.backward_step(torch.zeros((), requires_grad=True), "nope")
    with pytest.raises(KeyError, match="no auxiliary named 'nope'"):
        d.auxiliary_model("nope")
    d.close()


def test_staged_run_shares_modules_and_records_histories(tmp_path):
    teacher, student = models(seed=0)
    data = torch.utils.data.DataLoader(synthetic(12), batch_size=6)
    built = []

    def stage(losses):
        def make():
            built.append(len(built))
            return Distiller(teacher, student, losses, device="cpu", progress=False)
        return make

    run = StagedRun([Stage("first", 1, stage({"ce": nn.CrossEntropyLoss()})),
                     Stage("second", 2, stage({"kd": SoftKL()}), eval=False)], checkpoint_dir=tmp_path)
    history = run.fit(data, eval_loader=data)
    assert list(history) == ["first", "second"] and len(history["second"]) == 2
    assert "eval_accuracy" in history["first"][0] and "eval_accuracy" not in history["second"][0]
    assert built == [0, 1] and (tmp_path / "second" / "last.pt").is_file()
    with pytest.raises(ValueError, match="unique"):
        StagedRun([Stage("a", 1, stage({})), Stage("a", 1, stage({}))])
    with pytest.raises(ValueError, match="identifier"):
        Stage("no spaces", 1, stage({}))


def test_json_records_write_non_finite_values_as_null():
    line = json_record({"loss": float("nan"), "lr": 0.1, "big": float("inf"), "t": torch.tensor(2.0)})
    assert json.loads(line) == {"loss": None, "lr": 0.1, "big": None, "t": 2.0}
    from kdfast.experiments import common

    assert common.json_safe({"a": [1.0, math.nan]}) == {"a": [1.0, None]}


def test_registry_lists_builds_and_rejects_bad_names_and_options():
    assert methods.available()[0] == "kd" and {"kr", "bss", "dafl", "dfad", "rdskd", "srm"} <= set(methods.available())
    for name in methods.available():
        module = methods.get(name)
        for attr in ("NAME", "TITLE", "PAPER", "OPTIONS", "build"):
            assert hasattr(module, attr), (name, attr)
        assert module.NAME == name
    teacher, student = models(seed=0)
    d = methods.build("kd", teacher, student, recipe="kd", device="cpu", progress=False)
    assert isinstance(d, Distiller) and set(d.losses) == {"kd"}
    d.close()
    with pytest.raises(ValueError, match="unknown method 'nope'; registered methods: kd, bss, "):
        methods.build("nope", teacher, student)
    with pytest.raises(ValueError, match=r"method 'kd' has no option\(s\) temprature; valid options: recipe"):
        methods.build("kd", teacher, student, temprature=3)


def test_distill_package_imports_no_method():
    import ast
    import pathlib

    import kdfast.distill

    root = pathlib.Path(kdfast.distill.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                assert "methods" not in module and "cli" not in module, (path.name, module)
