"""kdfast.methods.srm on the engine: layer matching, stage B's loss against the official formulation,
a tiny three-stage run, resume of an interrupted staged run, and tiny runs of the experiment and the
demo section."""
import os

import pytest
import torch
import torch.nn.functional as F

from kdfast import models
from kdfast.distill import Distiller, seed_everything
from kdfast.methods import base, srm
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


def test_run_experiment_and_demo_section_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(srm, "_config", lambda quick, tiny=False: {
        "teacher_epochs": 1, "dictionary_epochs": 1, "init_epochs": 1, "kd_epochs": 1, "train_subset": 64,
        "test_subset": 32, "seeds": (0,), "batch_size": 32})
    results = srm.run_experiment(str(tmp_path / "exp"), quick=True)
    for name in ("report.md", "results.json", "srm_curves.png", "srm_pixel_labels.png"):
        assert (tmp_path / "exp" / name).exists(), name
    assert set(results["accuracy"]) == {"srm", "srm_global", "srm_local", "kd", "ce"}
    assert len(results["paired_differences"]["srm-kd"]["differences"]) == 1
    report = (tmp_path / "exp" / "report.md").read_text()
    assert "Paired differences" in report and "SRM, local targets only" in report

    train, test = base.digits(16, 64, 32)
    teacher = models.build("vgg8", num_classes=10, in_channels=1, width_mult=0.25).eval().requires_grad_(False)
    ctx = base.DemoContext(teacher=teacher, teacher_name="vgg8", model_kwargs={**KW, "width_mult": 0.25},
                           train_set=train, test_set=test, device=torch.device("cpu"), seeds=[0],
                           out_dir=str(tmp_path / "demo"), budget_s=10, tiny=True)
    section = srm.demo_section(ctx)
    assert section.name == "srm" and "Test accuracy" in section.markdown
    assert all((tmp_path / "demo" / f).exists() for f in section.figures)
