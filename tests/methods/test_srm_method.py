"""kdfast.methods.srm on the engine: layer matching, stage B's loss against the official formulation,
a tiny three-stage run, resume of an interrupted staged run, and tiny runs of the experiment and the
demo section."""
import os

import pytest
import torch
import torch.nn.functional as F

from kdfast import models
from kdfast.distill import Distiller, seed_everything
from kdfast.methods import srm
from kdfast.testing import baselines

KW = {"num_classes": 10, "in_channels": 1}


def _pair(seed=0):
    torch.manual_seed(seed)
    teacher = models.build("vgg8", width_mult=0.25, **KW).eval().requires_grad_(False)
    student = models.build("resnet8", width_mult=0.5, **KW)
    return teacher, student


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def test_layers_matched_by_spatial_size():
    teacher, student = _pair()
    pairs = srm.match_layers(teacher, student, (1, 16, 16))
    assert [(p["teacher"], p["student"], p["size"]) for p in pairs] == [
        ("block0", "layer1", (16, 16)), ("block1", "layer2", (8, 8)), ("block2", "layer3", (4, 4))]
    assert [p["teacher_channels"] for p in pairs] == [16, 32, 64]
    assert [p["student_channels"] for p in pairs] == [8, 16, 32]


def test_explicit_layers_of_different_size_are_refused():
    teacher, student = _pair()
    with pytest.raises(ValueError, match="spatial size mismatch: teacher layer 'block1' is 8x8 but student layer "
                                         "'layer1' is 16x16"):
        srm.match_layers(teacher, student, (1, 16, 16), ["block1"], ["layer1"])
    with pytest.raises(ValueError, match="paired by position"):
        srm.match_layers(teacher, student, (1, 16, 16), ["block1", "block2"], ["layer2"])
    with pytest.raises(ValueError, match="no teacher and student layers of equal spatial size"):
        srm.match_layers(teacher, student, (1, 16, 16), ["block3"], None)


def test_target_loss_matches_the_official_formulation():
    """BCE(mean codes, image labels) + CE(codes as logits, pixel labels), labels from the official
    GlobalLocalLabel formulation (dense), predictions from GlobalLocalPred (dense)."""
    torch.manual_seed(0)
    dicts = [srm.SparseDictionary(6, 12, 2), srm.SparseDictionary(10, 20, 1)]
    loss = srm.SRMTargetLoss(dicts, [4, 5], "global-local")
    s = [torch.randn(3, 4, 5, 5), torch.randn(3, 5, 2, 3)]
    t = [torch.randn(3, 6, 5, 5), torch.randn(3, 10, 2, 3)]
    expected = {"global": 0.0, "local": 0.0}
    for sf, tf, d, head in zip(s, t, dicts, loss.heads):
        image, pixel = baselines.srm_labels_official(tf, d.dictionary, d.bias, d.k)
        p = torch.sigmoid(torch.einsum("ndhw,dk->nkhw", sf, head.dictionary) + head.bias)
        expected["global"] += F.binary_cross_entropy(p.mean(dim=(2, 3)), image)
        expected["local"] += F.cross_entropy(p, pixel)
    torch.testing.assert_close(loss(s, t), expected["global"] + expected["local"])
    loss.target = "global"
    torch.testing.assert_close(loss(s, t), expected["global"])
    loss.target = "local"
    torch.testing.assert_close(loss(s, t), expected["local"])
    assert all(not p.requires_grad for p in loss.dictionaries.parameters())
    assert all(p.requires_grad for p in loss.heads.parameters())
    with pytest.raises(ValueError, match="target must be one of"):
        srm.SRMTargetLoss(dicts, [4, 5], "both")


def _run(teacher, student, **kw):
    return srm.build(teacher, student, input_shape=(1, 16, 16), dictionary_epochs=1, init_epochs=1, kd_epochs=2,
                     device="cpu", seed=0, progress=False, **kw)


def test_three_stages_train_what_they_should():
    teacher, student = _pair()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    run = _run(teacher, student)
    dict0 = [d.dictionary.detach().clone() for d in run.dictionaries.layers]
    seen = {}
    original = srm.DictionaryLearner.training_step

    def spy(self, batch):  # the student must not change during stage A
        seen.setdefault("student", {k: v.clone() for k, v in student.state_dict().items()})
        return original(self, batch)

    srm.DictionaryLearner.training_step = spy
    try:
        loader = torch.utils.data.DataLoader(_data(), batch_size=16, shuffle=True)
        history = run.fit(loader, eval_loader=torch.utils.data.DataLoader(_data(32, 1), batch_size=32))
    finally:
        srm.DictionaryLearner.training_step = original
    assert list(history) == ["dictionaries", "matching", "kd"]
    assert [len(history[s]) for s in history] == [1, 1, 2]
    assert {"loss/mse0", "loss/mse1", "loss/mse2"} <= set(history["dictionaries"][0])
    assert "loss/srm" in history["matching"][0] and "loss/kd" in history["kd"][0]
    assert "eval_accuracy" in history["kd"][-1] and "eval_accuracy" not in history["dictionaries"][0]
    assert all(not torch.equal(a, d.dictionary) for a, d in zip(dict0, run.dictionaries.layers))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    assert set(student.state_dict()) == set(seen["student"])  # heads are not part of the student
    assert [d.k for d in run.dictionaries.layers] == [1, 1, 2]  # int(16*2*0.02) = 0 -> 1, int(1.28), int(2.56)
    assert [d.dictionary.shape[1] for d in run.dictionaries.layers] == [32, 64, 128]


def test_build_rejects_optimiser_keywords_and_needs_input_shape():
    teacher, student = _pair()
    with pytest.raises(ValueError, match="SRM sets each stage's optimiser itself"):
        srm.build(teacher, student, input_shape=(1, 16, 16), optimizer="sgd")
    with pytest.raises(ValueError, match="needs input_shape"):
        srm.build(teacher, student)
    with pytest.raises(ValueError, match="target must be one of"):
        srm.build(teacher, student, input_shape=(1, 16, 16), target="pixel")


class _Interrupt(Exception):
    """Raised by the test to stop a run mid-stage (a crash stand-in)."""


def test_interrupted_staged_run_resumes_exactly(tmp_path, monkeypatch):
    """Stopped at the start of the KD stage's second epoch, then resumed with a fresh build (new Python
    objects, same seed): stages A and B are restored, not retrained, and the result is bit-identical."""
    loader = torch.utils.data.DataLoader(_data(), batch_size=16, shuffle=True)

    def fresh():
        teacher, student = _pair()
        seed_everything(0)
        return student, _run(teacher, student, checkpoint_dir=str(tmp_path / "run"), resume=True)

    student_ref, run_ref = fresh()
    run_ref.checkpoint_dir = str(tmp_path / "ref")
    history_ref = run_ref.fit(loader)

    original = Distiller.on_epoch_start

    def stop(self, epoch):
        if getattr(self, "stage", None) == "kd" and epoch == 1:
            raise _Interrupt
        return original(self, epoch)

    monkeypatch.setattr(Distiller, "on_epoch_start", stop)
    student1, run1 = fresh()
    with pytest.raises(_Interrupt):
        run1.fit(loader)
    monkeypatch.setattr(Distiller, "on_epoch_start", original)
    assert os.path.exists(tmp_path / "run" / "matching" / "last.pt")

    calls = {"A": 0}
    spy_original = srm.DictionaryLearner.training_step

    def spy(self, batch):
        calls["A"] += 1
        return spy_original(self, batch)

    monkeypatch.setattr(srm.DictionaryLearner, "training_step", spy)
    student2, run2 = fresh()
    history = run2.fit(loader)
    assert calls["A"] == 0  # stage A restored from its checkpoint, not retrained
    for k, v in student_ref.state_dict().items():
        assert torch.equal(v, student2.state_dict()[k]), k
    for a, b in zip(run_ref.dictionaries.parameters(), run2.dictionaries.parameters()):
        assert torch.equal(a, b)
    assert history["kd"][-1]["loss"] == history_ref["kd"][-1]["loss"]


def test_official_phases_are_the_official_epoch_boundaries():
    """viebboy/SRM exp_configurations.py: dictionaries (1e-3, 10) (1e-4, 60) (1e-5, 30); matching (1e-3, 30)
    (1e-4, 100) (1e-5, 30); KD (1e-3, 30) (1e-4, 100) (1e-5, 70)."""
    assert srm.lr_milestones(100, srm.OFFICIAL_PHASES["dictionaries"]) == [10, 70]
    assert srm.lr_milestones(160, srm.OFFICIAL_PHASES["matching"]) == [30, 130]
    assert srm.lr_milestones(200, srm.OFFICIAL_PHASES["kd"]) == [30, 130]
    assert srm.OPTIONS["lr_steps"] is None


@pytest.mark.parametrize("lr_steps", [None, (0.6, 0.85)])
def test_each_official_phase_starts_a_fresh_adam(lr_steps):
    """Official phases: at each phase's first epoch the Adam state is empty (the official code creates a new
    optimiser) and the LR is 10x lower; explicit lr_steps keep the optimiser state across the drop."""
    teacher, student = _pair()
    seen = []
    original = srm.PhasedDistiller.on_epoch_start

    def record(self, epoch):
        original(self, epoch)
        if getattr(self, "stage", None) == "kd":
            seen.append((epoch, len(self.optimizer.state), self.optimizer.param_groups[0]["lr"]))

    srm.PhasedDistiller.on_epoch_start = record
    try:
        run = srm.build(teacher, student, input_shape=(1, 16, 16), dictionary_epochs=1, init_epochs=1, kd_epochs=8,
                        lr_steps=lr_steps, device="cpu", progress=False)
        run.fit(torch.utils.data.DataLoader(_data(), batch_size=16))
    finally:
        srm.PhasedDistiller.on_epoch_start = original
    drops = srm.lr_milestones(8, srm.OFFICIAL_PHASES["kd"] if lr_steps is None else lr_steps)
    assert drops == ([1, 5] if lr_steps is None else [5, 7])
    for epoch, state_size, lr in seen:
        phase = sum(epoch >= d for d in drops)
        assert lr == pytest.approx(1e-3 * 0.1 ** phase)
        if epoch == 0 or (lr_steps is None and epoch in drops):
            assert state_size == 0, epoch
        else:
            assert state_size > 0, epoch
    with pytest.raises(ValueError, match="lr_steps must be None"):
        srm.build(teacher, student, input_shape=(1, 16, 16), lr_steps=(1.5,))
