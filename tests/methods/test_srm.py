"""SRM (Tran, Gabbouj, Iosifidis, 2021): reconstruct and labels against the official dense formulation
(kdfast.testing.baselines, viebboy/SRM Layers.py) and the float64 oracle; the method on the engine: layer
matching, stage B's loss against the official formulation, the three stages, the official LR phases, and
exact resume of an interrupted staged run."""
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYOUTS, feature_map

from kdfast import models
from kdfast.distill import Distiller, seed_everything
from kdfast.methods import srm
from kdfast.testing import baselines, reference


# (N, D, H, W, K, k)
SHAPES = [(1, 3, 1, 1, 6, 1), (2, 5, 3, 7, 10, 2), (3, 8, 8, 8, 16, 3), (2, 6, 5, 9, 40, 35)]


def _params(d, kk, requires_grad=True):
    c = (torch.randn(d, kk, dtype=torch.float64) / d**0.5).requires_grad_(requires_grad)
    b = torch.randn(1, dtype=torch.float64).requires_grad_(requires_grad)
    return c, b


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reconstruct_matches_official_dense_formulation(shape, layout):
    n, d, h, w, kk, k = shape
    x = feature_map((n, d, h, w), layout=layout, requires_grad=True)
    c, b = _params(d, kk)
    out = srm.reconstruct(x, c, b, k)
    official = baselines.srm_reconstruct_official(x, c, b, k)
    oracle = reference.srm_reconstruct(x, c, b, k)
    assert out.shape == (n, d, h, w)
    torch.testing.assert_close(out, official, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, oracle, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(oracle)
    got = torch.autograd.grad(out, (x, c, b), g)
    expected = torch.autograd.grad(official, (x, c, b), g)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


def test_reconstruct_gradcheck():
    x = feature_map((2, 3, 2, 3), requires_grad=True)
    c, b = _params(3, 8)
    assert torch.autograd.gradcheck(lambda *a: srm.reconstruct(*a, 2), (x, c, b))


def test_reconstruct_mse_matches_official_in_float32():
    """Stage A's loss, MSE(x, C s_hat), as the official code computes it, at float32."""
    x = torch.relu(torch.randn(4, 16, 8, 8))
    c, b = torch.randn(16, 32) / 4, torch.randn(1)
    ours = torch.nn.functional.mse_loss(srm.reconstruct(x, c, b, 2), x)
    official = torch.nn.functional.mse_loss(baselines.srm_reconstruct_official(x, c, b, 2), x)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_labels_match_official_label_code(shape, layout):
    n, d, h, w, kk, k = shape
    x = feature_map((n, d, h, w), layout=layout)
    c, b = _params(d, kk, requires_grad=False)
    image, pixel = srm.labels(x, c, b, k)
    official_image, official_pixel = baselines.srm_labels_official(x, c, b, k)
    assert image.shape == (n, kk) and pixel.shape == (n, h, w) and pixel.dtype == torch.int64
    torch.testing.assert_close(image, official_image, rtol=1e-10, atol=1e-12)
    assert torch.equal(pixel, official_pixel)
    ref_image, ref_pixel = reference.srm_labels(x, c, b, k)
    torch.testing.assert_close(image, ref_image, rtol=1e-10, atol=1e-12)
    assert torch.equal(pixel, ref_pixel)


def test_labels_in_bfloat16_sum_in_float32():
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    c, b = torch.randn(8, 16, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16)
    image, pixel = srm.labels(x, c, b, 3)
    ref_image, _ = reference.srm_labels(x.double(), c.double(), b.double(), 3)
    assert image.dtype == torch.bfloat16
    torch.testing.assert_close(image.double(), ref_image, rtol=2e-2, atol=1e-2)


def test_official_mask_keeps_ties_kdfast_keeps_k():
    """Documented difference: with codes tied at the k-th value the official mask keeps them all."""
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    c = torch.tensor([[1.0, 2.0, 2.0, 0.5]], dtype=torch.float64)
    b = torch.zeros(1, dtype=torch.float64)
    image, _ = srm.labels(x, c, b, 1)
    official, _ = baselines.srm_labels_official(x, c, b, 1)
    assert (image > 0).sum() == 1 and (official > 0).sum() == 2


def test_sizes_follow_the_official_rules():
    assert srm.num_codewords(128, 2.0) == 256 and srm.sparsity(128, 2.0, 0.02) == 5
    assert srm.sparsity(16, 2.0, 0.02) == 1  # int(0.64) = 0 becomes 1
    assert srm.num_codewords(96, 1.5) == 144 and srm.sparsity(256, 2.0, 0.03) == 15


def test_sparse_dictionary_module():
    torch.manual_seed(0)
    module = srm.SparseDictionary(6, 12, 2)
    assert -1 <= module.bias.item() <= 1
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(module(x), baselines.srm_reconstruct_official(x, module.dictionary, module.bias, 2))
    with pytest.raises(ValueError, match="k must be in 1..codewords"):
        srm.SparseDictionary(6, 12, 13)


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
