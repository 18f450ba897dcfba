"""kdfast.distill: FeatureTap, loss dispatch, optimizer/scheduler options, checkpoints, caching, errors; the
engine's extension points for methods: auxiliary trainables, backward_step by name and the
before_optimizer_step hook, batch sources, stages, strict JSON logs, and the methods registry.
(Exact resume under SIGKILL: tests/engine/test_resume.py.)"""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from distill_helpers import HintMSE, Recorder, SoftKL, TinyNet, models, synthetic
from torch import nn
from torch.utils.data import DataLoader

from kdfast import methods
from kdfast.distill import (Auxiliary, Distiller, FeatureTap, IndexedDataset, NoiseSource, Stage, StagedRun,
                            atomic_save, evaluate, json_record, load_checkpoint)


QUIET = dict(progress=False, device="cpu")


# ---------------------------------------------------------------------- FeatureTap
def test_feature_tap_list_dict_order_and_remove():
    model = TinyNet(4)
    x = torch.randn(2, 3, 8, 8)
    with FeatureTap(model, ["conv2", "conv1"]) as tap:
        model(x)
        f2, f1 = tap.features
        torch.testing.assert_close(f1, model.conv1(x))
        torch.testing.assert_close(f2, model.conv2(F.relu(model.conv1(x))))
        assert list(tap.feature_dict) == ["conv2", "conv1"]
    assert not model.conv1._forward_hooks and not model.conv2._forward_hooks
    with pytest.raises(RuntimeError, match="run a forward pass first"):
        tap.features


def test_feature_tap_detach_and_grad():
    model = TinyNet(4)
    tap = FeatureTap(model, "conv1")
    model(torch.randn(2, 3, 8, 8))
    assert tap.features[0].requires_grad
    tap.remove()
    tap = FeatureTap(model, "conv1", detach=True)
    model(torch.randn(2, 3, 8, 8))
    assert not tap.features[0].requires_grad
    tap.remove()
    tap.remove()  # idempotent


def test_feature_tap_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown layer name 'conv3'.*close matches: \['conv1', 'conv2'\]|"
                                         r"unknown layer name 'conv3'.*close matches: \['conv2', 'conv1'\]"):
        FeatureTap(TinyNet(4), ["conv1", "conv3"])
    with pytest.raises(ValueError, match="at least one layer"):
        FeatureTap(TinyNet(4), [])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        FeatureTap("resnet", ["conv1"])


def test_feature_tap_wrapped_model_prefixes():
    # DataParallel (CPU: just calls the module) names submodules "module.x", like DDP.
    model = TinyNet(4)
    wrapped = nn.DataParallel(model)
    x = torch.randn(2, 3, 8, 8)
    with FeatureTap(wrapped, ["module.conv1", "conv2"]) as tap:
        wrapped(x)
        a, b = tap.features
        torch.testing.assert_close(a, model.conv1(x))
        assert b.shape == (2, 8, 4, 4)


def test_feature_tap_under_torch_compile():
    torch._dynamo.reset()
    model = TinyNet(4)
    tap = FeatureTap(model, ["conv1"])  # before compiling: dynamo traces the hook
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8)
    out = compiled(x)
    torch.testing.assert_close(tap.features[0], model.conv1(x))
    torch.testing.assert_close(out, model(x))
    with FeatureTap(compiled, ["_orig_mod.conv2"]) as tap2:
        compiled(x)
        assert tap2.features[0].shape == (2, 8, 4, 4)
    tap.remove()


# ---------------------------------------------------------------------- loss dispatch
def test_loss_dispatch_protocol():
    teacher, student = models()
    data = synthetic(8)
    task, logit, feat = Recorder(None), Recorder("logits"), Recorder("features")
    d = Distiller(teacher, student, {"task": task, "lg": (logit, 0.5), "ft": (feat, 2.0)},
                  feature_layers={"ft": (["conv1", "conv2"], ["conv2", "conv1"])}, lr=0.0, **QUIET)
    x, y = data.tensors
    d.fit(DataLoader(data, batch_size=8), epochs=1)
    s_logits, targets = task.calls[0]
    torch.testing.assert_close(targets, y)
    torch.testing.assert_close(s_logits, student(x))
    s2, t2, tg = logit.calls[0]
    torch.testing.assert_close(s2, student(x))
    torch.testing.assert_close(t2, teacher(x))
    torch.testing.assert_close(tg, y)
    s_feats, t_feats = feat.calls[0]
    assert isinstance(s_feats, list) and isinstance(t_feats, list)
    torch.testing.assert_close(s_feats[0], student.conv1(x))           # student conv1 paired with
    torch.testing.assert_close(t_feats[0], teacher.conv2(F.relu(teacher.conv1(x))))  # teacher conv2
    torch.testing.assert_close(t_feats[1], teacher.conv1(x))


def test_one_step_equals_manual_weighted_sum():
    teacher, student = models()
    ref = copy.deepcopy(student)
    hint = HintMSE([(4, 8)])
    hint_ref = copy.deepcopy(hint)
    data = synthetic(8)
    x, y = data.tensors
    d = Distiller(teacher, student, {"ce": (nn.CrossEntropyLoss(), 0.1), "kd": (SoftKL(), 0.9), "hint": (hint, 3.0)},
                  feature_layers={"hint": ("conv1", "conv1")}, lr=0.1, momentum=0.0, weight_decay=0.0, **QUIET)
    d.fit(DataLoader(data, batch_size=8), epochs=1)
    # Manual step: same loss formula, plain SGD on student + regressor.
    s_feat = ref.conv1(x)
    logits = ref(x)
    with torch.no_grad():
        t_logits, t_feat = teacher(x), teacher.conv1(x)
    loss = (0.1 * F.cross_entropy(logits, y) + 0.9 * SoftKL()(logits, t_logits)
            + 3.0 * hint_ref([s_feat], [t_feat]))
    params = list(ref.parameters()) + list(hint_ref.parameters())
    grads = torch.autograd.grad(loss, params)
    for p, g, q in zip(params, grads, list(student.parameters()) + list(hint.parameters())):
        torch.testing.assert_close(q, p - 0.1 * g, rtol=1e-5, atol=1e-6)
    assert d.history[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_teacher_frozen_and_in_eval_mode():
    teacher, student = models()
    teacher.train()
    before = copy.deepcopy(teacher.state_dict())
    d = Distiller(teacher, student, {"kd": SoftKL()}, **QUIET)
    d.fit(DataLoader(synthetic(16), batch_size=8, shuffle=True), epochs=1)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])


def test_epoch_dependent_weight_and_task_only_training():
    _, student = models()
    seen = []

    def warmup(epoch):
        seen.append(epoch)
        return min(1.0, (epoch + 1) / 2)

    d = Distiller(None, student, {"ce": (nn.CrossEntropyLoss(), warmup)}, lr=0.1, **QUIET)
    hist = d.fit(DataLoader(synthetic(16), batch_size=8), epochs=3)
    assert seen[-3:] == [0, 1, 2] and len(hist) == 3
    assert hist[0]["loss"] == pytest.approx(0.5 * hist[0]["loss/ce"], rel=1e-6)
    assert hist[2]["loss"] == pytest.approx(hist[2]["loss/ce"], rel=1e-6)


# ---------------------------------------------------------------------- optimizer / scheduler
def test_optimizers_and_schedules():
    _, student = models()
    d = Distiller(None, student, {"ce": nn.CrossEntropyLoss()}, optimizer="adam", lr=1e-3, **QUIET)
    assert isinstance(d.optimizer, torch.optim.Adam)
    d = Distiller(None, student, {"ce": nn.CrossEntropyLoss()}, optimizer="sgd", lr=0.2, nesterov=True,
                  schedule="step", milestones=[1, 2], gamma=0.5, **QUIET)
    assert d.optimizer.param_groups[0]["nesterov"]
    hist = d.fit(DataLoader(synthetic(8), batch_size=8), epochs=3)
    assert [h["lr"] for h in hist] == pytest.approx([0.2, 0.1, 0.05])
    d = Distiller(None, student, {"ce": nn.CrossEntropyLoss()}, lr=0.2, schedule="cosine", **QUIET)
    hist = d.fit(DataLoader(synthetic(8), batch_size=8), epochs=2)
    assert [h["lr"] for h in hist] == pytest.approx([0.2, 0.1])
    made = []
    d = Distiller(None, student, {"ce": nn.CrossEntropyLoss()},
                  optimizer=lambda params: made.append(1) or torch.optim.RMSprop(params, lr=1e-3),
                  schedule=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.5), **QUIET)
    hist = d.fit(DataLoader(synthetic(8), batch_size=8), epochs=2)
    assert made == [1] and isinstance(d.optimizer, torch.optim.RMSprop)
    assert [h["lr"] for h in hist] == pytest.approx([1e-3, 5e-4])


def test_loss_module_parameters_are_optimised():
    teacher, student = models()
    hint = HintMSE([(4, 8)])
    w0 = hint.regressors[0].weight.detach().clone()
    d = Distiller(teacher, student, {"hint": hint}, feature_layers={"hint": {"student": "conv1", "teacher": "conv1"}},
                  lr=0.1, **QUIET)
    assert any(p is hint.regressors[0].weight for g in d.optimizer.param_groups for p in g["params"])
    d.fit(DataLoader(synthetic(8), batch_size=8), epochs=1)
    assert not torch.equal(w0, hint.regressors[0].weight)


def test_grad_clip_limits_update():
    _, student = models()
    ref = copy.deepcopy(student)
    d = Distiller(None, student, {"ce": (nn.CrossEntropyLoss(), 1e4)}, lr=1.0, momentum=0.0, weight_decay=0.0,
                  grad_clip=1e-3, **QUIET)
    d.fit(DataLoader(synthetic(8), batch_size=8), epochs=1)
    delta = torch.cat([(a - b).flatten() for a, b in zip(student.parameters(), ref.parameters())])
    assert delta.norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_compiled_student_with_feature_loss_matches_eager():
    torch._dynamo.reset()
    results = []
    for compile in (False, {"backend": "aot_eager"}):
        teacher, student = models()
        hint = HintMSE([(4, 8)])
        d = Distiller(teacher, student, {"ce": nn.CrossEntropyLoss(), "hint": hint}, compile=compile,
                      feature_layers={"hint": ("conv1", "conv1")}, **QUIET)
        d.fit(DataLoader(synthetic(16), batch_size=8), epochs=1)
        results.append([p.detach().clone() for p in student.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_cuda_amp(amp):
    teacher, student = models()
    hint = HintMSE([(4, 8)])
    d = Distiller(teacher, student, {"ce": nn.CrossEntropyLoss(), "kd": SoftKL(), "hint": hint}, amp=amp,
                  feature_layers={"hint": ("conv1", "conv1")}, progress=False, device="cuda", grad_clip=5.0)
    assert d.scaler.is_enabled() == (amp == "fp16")
    data = synthetic(32)
    hist = d.fit(DataLoader(data, batch_size=8, shuffle=True), epochs=2, eval_loader=DataLoader(data, batch_size=8))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"] * 1.5
    assert next(student.parameters()).device.type == "cuda"


def test_bf16_autocast_on_cpu():
    teacher, student = models()
    d = Distiller(teacher, student, {"ce": nn.CrossEntropyLoss(), "kd": SoftKL()}, amp="bf16", **QUIET)
    hist = d.fit(DataLoader(synthetic(16), batch_size=8), epochs=1)
    assert torch.isfinite(torch.tensor(hist[0]["loss"]))


# ---------------------------------------------------------------------- logging, evaluate, caching
def test_metrics_log_and_evaluate(tmp_path):
    teacher, student = models()
    log = tmp_path / "m.jsonl"
    data = synthetic(16)
    d = Distiller(teacher, student, {"ce": nn.CrossEntropyLoss(), "kd": SoftKL()}, log_path=str(log), log_every=1,
                  **QUIET)
    d.fit(DataLoader(data, batch_size=8), epochs=2, eval_loader=DataLoader(data, batch_size=5))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["type"] for r in records] == ["step", "step", "epoch"] * 2
    assert {"loss", "loss/ce", "loss/kd", "lr", "time"} <= set(records[0])
    ev = evaluate(student, DataLoader(data, batch_size=5))
    assert records[-1]["eval_accuracy"] == pytest.approx(ev["accuracy"])
    x, y = data.tensors
    with torch.no_grad():
        logits = student(x)
    assert ev["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert ev["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert ev["count"] == 16 and student.training


class CountingNet(TinyNet):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.samples = 0

    def forward(self, x):
        self.samples += x.shape[0]
        return super().forward(x)


def test_cache_teacher_logits_same_result_fewer_teacher_calls():
    data = IndexedDataset(synthetic(16))
    results = []
    for cache in (False, True):
        torch.manual_seed(0)
        teacher, student = CountingNet(8), TinyNet(4)
        d = Distiller(teacher, student, {"kd": SoftKL()}, cache_teacher_logits=cache, **QUIET)
        d.fit(DataLoader(data, batch_size=4, shuffle=True), epochs=3)
        results.append((teacher.samples, [p.detach().clone() for p in student.parameters()]))
    assert results[0][0] == 48 and results[1][0] == 16
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_cache_teacher_logits_needs_indices_and_no_augmentation():
    teacher, student = models()
    d = Distiller(teacher, student, {"kd": SoftKL()}, cache_teacher_logits=True, **QUIET)
    with pytest.raises(ValueError, match="IndexedDataset"):
        d.fit(DataLoader(synthetic(8), batch_size=4), epochs=1)

    def collate(items):
        x, y, i = torch.utils.data.default_collate(items)
        return x + torch.randn(x.shape, generator=collate.generator), y, i

    collate.generator = torch.Generator()
    with pytest.raises(ValueError, match="random-augmentation collate_fn"):
        d.fit(DataLoader(IndexedDataset(synthetic(8)), batch_size=4, collate_fn=collate), epochs=1)


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_weights_only_and_contents(tmp_path):
    teacher, student = models()
    d = Distiller(teacher, student, {"kd": SoftKL()}, checkpoint_dir=str(tmp_path), keep_checkpoints=True,
                  schedule="step", milestones=[1], **QUIET)
    d.fit(DataLoader(synthetic(8), batch_size=4, shuffle=True), epochs=2)
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pt", "epoch_2.pt", "last.pt"]
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert raw["epoch"] == 2 and raw["step"] == 4
    for k, v in student.state_dict().items():
        assert torch.equal(raw["student"][k], v)
    assert raw["scheduler"]["last_epoch"] == 2 and raw["sampler"] == {"seed": 0, "epoch": 2}
    assert isinstance(raw["rng"][0]["torch"], torch.Tensor)
    assert load_checkpoint(tmp_path / "epoch_1.pt")["epoch"] == 1


def test_rng_state_roundtrip_through_weights_only_file(tmp_path):
    import random

    import numpy as np

    from kdfast.distill import capture_rng_state, restore_rng_state

    np.random.randn(), random.gauss(0, 1)  # leave cached Gaussians in both generators
    atomic_save(capture_rng_state(), tmp_path / "rng.pt")
    draw = lambda: (torch.rand(3), np.random.rand(3), np.random.randn(), random.random(), random.gauss(0, 1))  # noqa: E731
    a = draw()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = draw()
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"format": "x", "v": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **kw):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"format": "x", "v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))


def test_load_checkpoint_rejects_foreign_files(tmp_path):
    torch.save({"a": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a kdfast.distill checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


class NoisyCollate:
    """Batch augmentation drawing from its own torch.Generator (like kdfast.data's crop/flip collate):
    the trainer reseeds ``generator`` from (seed, epoch) so a resumed epoch sees the same noise."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(123)

    def __call__(self, items):
        x, y = torch.utils.data.default_collate(items)
        return x + 0.1 * torch.randn(x.shape, generator=self.generator), y


def test_resume_in_process_equals_uninterrupted(tmp_path):
    # The SIGKILL version is in test_resume.py; this checks fit(resume=True) continues from last.pt,
    # with dropout (torch RNG) and a collate_fn with its own generator.
    data = synthetic(16)

    def run(epochs, ckdir, resume):
        teacher, student = models(dropout=0.3)
        d = Distiller(teacher, student, {"ce": nn.CrossEntropyLoss(), "kd": SoftKL()}, checkpoint_dir=str(ckdir),
                      resume=resume, schedule="step", milestones=[2], seed=3, **QUIET)
        d.fit(DataLoader(data, batch_size=4, shuffle=True, collate_fn=NoisyCollate()), epochs=epochs)
        return student, d

    full, _ = run(3, tmp_path / "a", False)
    run(2, tmp_path / "b", False)
    resumed, d = run(3, tmp_path / "b", True)
    assert [h["epoch"] for h in d.history] == [0, 1, 2]
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- errors
def _d(**kw):
    teacher, student = models()
    args = dict(losses={"kd": SoftKL()})
    args.update(kw)
    losses = args.pop("losses")
    return Distiller(args.pop("teacher", teacher), student, losses, **QUIET, **args)


@pytest.mark.parametrize("kw,exc,fragment", [
    (dict(losses={"nst": Recorder("features")}), ValueError, r"feature losses \['nst'\] need feature_layers"),
    (dict(losses={"nst": Recorder("features")}, feature_layers={"nst": (["conv1", "conv2"], ["conv1"])}),
     ValueError, "pairs layers by position but has 2 student and 1 teacher"),
    (dict(losses={"nst": Recorder("features")}, feature_layers={"nst": (["conv9"], ["conv1"])}),
     ValueError, "unknown layer name 'conv9'"),
    (dict(feature_layers={"kd": ("conv1", "conv1")}), ValueError, "not feature losses"),
    (dict(feature_layers={"at": ("conv1", "conv1")}), ValueError, r"names losses \['at'\]"),
    (dict(losses={"x": Recorder("probs")}), ValueError, "kdfast_inputs must be 'logits' or 'features'"),
    (dict(losses={"kd": lambda a, b: a}), TypeError, "must be an nn.Module"),
    (dict(losses={}), ValueError, "losses is empty"),
    (dict(teacher=None), ValueError, "teacher is None"),
    (dict(amp="fp16"), ValueError, "amp='fp16' needs a CUDA device"),
    (dict(amp="fp8"), ValueError, "amp must be None"),
    (dict(optimizer="lbfgs"), ValueError, "optimizer must be 'sgd', 'adam'"),
    (dict(schedule="step"), ValueError, "schedule='step' needs milestones"),
    (dict(schedule="poly"), ValueError, "schedule must be 'step', 'cosine'"),
    (dict(lr=-1.0), ValueError, "lr must be a non-negative"),
    (dict(epochs=0), ValueError, "epochs must be >= 1"),
    (dict(resume=True), ValueError, "resume=True needs checkpoint_dir"),
    (dict(grad_clip=0), ValueError, "grad_clip must be None or a positive"),
    (dict(sync_bn=True), ValueError, "sync_bn=True needs CUDA"),
    (dict(cache_teacher_logits=True, losses={"nst": Recorder("features")}, feature_layers={"nst": ("conv1", "conv1")}),
     ValueError, "cache_teacher_logits=True caches logits only"),
])
def test_constructor_errors(kw, exc, fragment):
    with pytest.raises(exc, match=fragment):
        _d(**kw)


def test_fit_errors(tmp_path):
    d = _d()
    with pytest.raises(TypeError, match="train_loader must be a torch DataLoader"):
        d.fit([(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(ValueError, match="set Distiller\\(batch_size"):
        d.fit(synthetic(8))
    sampler = torch.utils.data.WeightedRandomSampler([1.0] * 8, 8)
    with pytest.raises(ValueError, match="custom sampler WeightedRandomSampler"):
        d.fit(DataLoader(synthetic(8), batch_size=4, sampler=sampler))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        _d(resume=str(tmp_path / "nope.pt")).fit(DataLoader(synthetic(8), batch_size=4))


# ---------------------------------------------------------------------- subclass hooks
class TwoOptimizerDistiller(Distiller):
    """Alternating optimisation through the documented hooks: student step on the full loss, then a second
    optimizer on the regressor only; its state goes into the checkpoint."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.reg_optimizer = torch.optim.SGD(self.losses["hint"].parameters(), lr=0.5)
        self.reg_steps = 0

    def trainable_parameters(self):
        return list(self.student.parameters())

    def training_step(self, batch):
        out = self.compute_loss(batch)
        self.backward_step(out["loss"], update_scaler=False)
        hint_only = self.compute_loss(batch)["parts"]["hint"]
        self.backward_step(hint_only, self.reg_optimizer)
        self.reg_steps += 1
        return out

    def checkpoint_state(self):
        return {**super().checkpoint_state(), "reg_optimizer": self.reg_optimizer.state_dict()}

    def load_checkpoint_state(self, ckpt):
        super().load_checkpoint_state(ckpt)
        self.reg_optimizer.load_state_dict(ckpt["reg_optimizer"])


def test_subclass_two_optimizers_and_checkpoint_state(tmp_path):
    teacher, student = models()
    hint = HintMSE([(4, 8)])
    d = TwoOptimizerDistiller(teacher, student, {"ce": nn.CrossEntropyLoss(), "hint": hint},
                              feature_layers={"hint": ("conv1", "conv1")}, checkpoint_dir=str(tmp_path), **QUIET)
    assert all(p is not hint.regressors[0].weight for g in d.optimizer.param_groups for p in g["params"])
    w0 = hint.regressors[0].weight.detach().clone()
    d.fit(DataLoader(synthetic(16), batch_size=8), epochs=1)
    assert d.reg_steps == 2 and not torch.equal(w0, hint.regressors[0].weight)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["reg_optimizer"]["param_groups"][0]["lr"] == 0.5
    d2 = TwoOptimizerDistiller(teacher, models()[1], {"ce": nn.CrossEntropyLoss(), "hint": HintMSE([(4, 8)])},
                               feature_layers={"hint": ("conv1", "conv1")}, checkpoint_dir=str(tmp_path),
                               resume=True, **QUIET)
    d2.fit(DataLoader(synthetic(16), batch_size=8), epochs=1)  # already complete: only loads
    assert d2.epoch == 1 and d2.reg_steps == 0
    torch.testing.assert_close(d2.losses["hint"].regressors[0].weight, hint.regressors[0].weight)


def test_second_fit_call_continues(tmp_path):
    data = synthetic(16)
    runs = []
    for split in (False, True):
        teacher, student = models(dropout=0.2)
        d = Distiller(teacher, student, {"kd": SoftKL()}, checkpoint_dir=str(tmp_path / str(split)),
                      checkpoint_every=5, resume=True, **QUIET)
        loader = DataLoader(data, batch_size=8, shuffle=True)
        if split:
            d.fit(loader, epochs=1)
        d.fit(loader, epochs=2)
        runs.append((d.epoch, d.step, [p.detach().clone() for p in student.parameters()]))
    assert runs[0][:2] == runs[1][:2] == (2, 4)
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- with kdfast.losses
def test_kdfast_losses_plug_in_one_step():
    from kdfast.losses import ATLoss, FSPLoss, HintLoss, KDLoss, NSTLoss

    torch.manual_seed(0)
    teacher, student = TinyNet(4), TinyNet(4)
    ref = copy.deepcopy(student)
    hint = HintLoss(student_shape=(4, 8, 8), teacher_shape=(4, 8, 8))
    hint_ref = copy.deepcopy(hint)
    losses = {"kd": KDLoss(temperature=4.0, alpha=0.9), "nst": (NSTLoss(), 5.0), "at": (ATLoss(), 1.0),
              "fsp": (FSPLoss(), 0.5), "hint": (hint, 2.0)}
    layers = {"nst": ("conv2", "conv2"), "at": (["conv1", "conv2"], ["conv1", "conv2"]),
              "fsp": (["conv1", "conv2"], ["conv1", "conv2"]), "hint": ("conv1", "conv1")}
    d = Distiller(teacher, student, losses, feature_layers=layers, lr=0.1, momentum=0.0, weight_decay=0.0, **QUIET)
    data = synthetic(8)
    x, y = data.tensors
    d.fit(DataLoader(data, batch_size=8), epochs=1)

    feats = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: feats.__setitem__(n, o))
             for n, m in (("conv1", ref.conv1), ("conv2", ref.conv2))]
    logits = ref(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        t_logits = teacher(x)
        t1 = teacher.conv1(x)
        t2 = teacher.conv2(F.relu(t1))
    s1, s2 = feats["conv1"], feats["conv2"]
    loss = (KDLoss(4.0, 0.9)(logits, t_logits, y) + 5.0 * NSTLoss()([s2], [t2]) + ATLoss()([s1, s2], [t1, t2])
            + 0.5 * FSPLoss()([s1, s2], [t1, t2]) + 2.0 * hint_ref([s1], [t1]))
    params = list(ref.parameters()) + list(hint_ref.parameters())
    grads = torch.autograd.grad(loss, params)
    for p, g, q in zip(params, grads, list(student.parameters()) + list(hint.parameters())):
        torch.testing.assert_close(q, p - 0.1 * g, rtol=1e-4, atol=1e-6)
    assert d.history[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)


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
