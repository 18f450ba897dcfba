"""Data-free KD (DAFL, RDSKD, DFAD): the generator losses against the float64 oracle and the official
codes' formulations, their normalisations, the generator, the teacher-feature tap, collapse detection and
the diversity measures; on the engine: one training step of each equals the official code's iteration,
collapse stops the run naming the epoch, exact resume after SIGKILL (generator, its optimizer, the noise
stream, RDSKD's reference losses and stage), DDP (each rank its own noise, reproducible), the registry."""
import copy
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import feature_map, load_ranks_assert_identical
from torch import nn

from kdfast import methods, models
from kdfast.methods import dafl, datafree_base, dfad, rdskd
from kdfast.testing import baselines, reference


SHAPES = [(1, 2), (3, 10), (17, 7), (64, 10)]


def _features(b, layout, dtype=torch.float64):
    if layout == "flat":
        return torch.randn(b, 13, dtype=dtype)
    return feature_map((b, 5, 3, 4), dtype=dtype, layout=layout)


def _close64(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-10, atol=1e-12, msg=k)


# ------------------------------------------------------------------------------------------ DAFL
@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize("layout", ["flat", "contiguous", "channels_last", "strided"])
def test_dafl_losses_match_reference(b, k, layout):
    z = 3 * torch.randn(b, k, dtype=torch.float64)
    f = _features(b, layout)
    _close64(dafl.generator_losses(z, f), reference.dafl_generator_losses(z, f))
    # float32 within float32 tolerance of the oracle
    got = dafl.generator_losses(z.float(), f.float())
    for key, want in reference.dafl_generator_losses(z, f).items():
        torch.testing.assert_close(got[key].double(), want, rtol=1e-5, atol=1e-5)


def test_dafl_normalisations_log10_and_mean_over_batch_and_features():
    torch.manual_seed(0)
    z, f = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 120, dtype=torch.float64)
    losses = dafl.generator_losses(z, f)
    p = z.softmax(1).mean(0)
    natural = (p * p.log()).sum()
    # log10, not ln: a factor ln(10) apart (and no 1/K)
    torch.testing.assert_close(losses["info_entropy"], natural / math.log(10))
    assert not torch.allclose(losses["info_entropy"], natural)
    # activation: mean over batch AND feature dims = (1/d) x the paper's per-sample L1 norm, batch-averaged
    paper = -f.abs().sum(1).mean()
    torch.testing.assert_close(losses["activation"], paper / f.shape[1])
    # uniform predictions: sum p log10 p = -log10 K (the minimum)
    uniform = dafl.generator_losses(torch.zeros(4, 10, dtype=torch.float64), f[:4])
    torch.testing.assert_close(uniform["info_entropy"], torch.tensor(-1.0, dtype=torch.float64))
    # weights of the official MNIST setting: 1 / 5 / 0.1
    obj = dafl.generator_objective(losses)
    torch.testing.assert_close(obj, losses["one_hot"] + 5 * losses["info_entropy"] + 0.1 * losses["activation"])


def test_dafl_matches_official_formulation():
    torch.manual_seed(1)
    z, f = torch.randn(32, 10), torch.randn(32, 120)
    oh, act, ie = baselines.dafl_official_generator_losses(z, f)
    got = dafl.generator_losses(z, f)
    torch.testing.assert_close(got["one_hot"], oh)
    torch.testing.assert_close(got["activation"], act)
    torch.testing.assert_close(got["info_entropy"], ie)


def test_dafl_entropy_finite_where_a_class_probability_underflows():
    # float32 softmax underflows to exactly 0 for a class 200 logits below the rest: the official
    # 0 * log10(0) is NaN; ours is 0 for that class (its limit) and finite gradients.
    z = torch.zeros(4, 3)
    z[:, 2] = -200.0
    z.requires_grad_(True)
    oh, act, ie = baselines.dafl_official_generator_losses(z.detach(), torch.ones(4, 2))
    assert torch.isnan(ie)
    loss = dafl.generator_losses(z, torch.ones(4, 2))["info_entropy"]
    torch.testing.assert_close(loss, torch.tensor(-math.log10(2.0)))
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_dafl_gradcheck():
    torch.manual_seed(2)
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    f = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    for key in ("one_hot", "activation", "info_entropy"):
        assert torch.autograd.gradcheck(lambda a, b: dafl.generator_losses(a, b)[key], (z, f))


@pytest.mark.parametrize("args,exc,fragment", [
    ((torch.randn(4), torch.randn(4, 3)), ValueError, "t_logits must be 2-D"),
    ((torch.randn(4, 3), torch.randn(5, 3)), ValueError, "B = 4"),
    ((torch.randn(4, 3), torch.randn(4)), ValueError, "t_features must be"),
    ((torch.randn(4, 3), torch.ones(4, 3, dtype=torch.int64)), TypeError, "t_features must be a floating"),
    ((torch.randn(4, 3), "f"), TypeError, "t_features must be a torch.Tensor"),
    ((torch.randn(0, 3), torch.randn(0, 3)), ValueError, "empty batch"),
])
def test_dafl_errors(args, exc, fragment):
    with pytest.raises(exc, match=fragment):
        dafl.generator_losses(*args)


# ------------------------------------------------------------------------------------------ RDSKD
def _halves(b, k, shape=(1, 6, 5), dtype=torch.float64, layout="contiguous"):
    z1, z2 = 2 * torch.randn(b, k, dtype=dtype), 2 * torch.randn(b, k, dtype=dtype)
    if layout == "contiguous":
        x1, x2 = torch.randn(b, *shape, dtype=dtype), torch.randn(b, *shape, dtype=dtype)
    else:
        x1 = feature_map((b, *shape), dtype=dtype, layout=layout)
        x2 = feature_map((b, *shape), dtype=dtype, layout=layout)
    return z1, z2, x1, x2


@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_rdskd_losses_match_reference(b, k, layout):
    args = _halves(b, k, (3, 4, 5), layout=layout)
    _close64(rdskd.generator_losses(*args), reference.rdskd_generator_losses(*args))
    got = rdskd.generator_losses(*[a.float() for a in args])
    for key, want in reference.rdskd_generator_losses(*args).items():
        torch.testing.assert_close(got[key].double(), want, rtol=1e-5, atol=1e-6)


def test_rdskd_normalisations_natural_log_and_whole_batch_frobenius():
    torch.manual_seed(3)
    z1, z2, x1, x2 = _halves(8, 10, dtype=torch.float64)
    losses = rdskd.generator_losses(z1, z2, x1, x2)
    # natural log (DAFL uses log10): uniform predictions give -ln K
    uniform = rdskd.generator_losses(torch.zeros(3, 10, dtype=torch.float64), torch.zeros(3, 10, dtype=torch.float64),
                                     x1[:3], x2[:3])
    torch.testing.assert_close(uniform["class_diversity"], torch.tensor(-math.log(10.0), dtype=torch.float64))
    p = torch.cat([z1, z2]).softmax(1).mean(0)
    torch.testing.assert_close(losses["class_diversity"], (p * p.log()).sum())
    # one Frobenius norm over the whole half-batch tensors, not a mean of per-pair ratios
    whole = (x2 - x1).norm() / (z2.softmax(1) - z1.softmax(1)).norm()
    per_pair = ((x2 - x1).flatten(1).norm(dim=1) / (z2.softmax(1) - z1.softmax(1)).norm(dim=1)).mean()
    torch.testing.assert_close(losses["sample_diversity"], 1 / (whole + 1e-20))
    assert not torch.allclose(losses["sample_diversity"], 1 / per_pair)
    # one-hot over both halves = the mean of the two halves' CEs (equal halves)
    both = (F.cross_entropy(z1, z1.argmax(1)) + F.cross_entropy(z2, z2.argmax(1))) / 2
    torch.testing.assert_close(losses["one_hot"], both)


def test_rdskd_objective_exponential_increments_and_previous_detached():
    torch.manual_seed(4)
    z1, z2, x1, x2 = _halves(6, 5, dtype=torch.float64)
    z1.requires_grad_(True)
    losses = rdskd.generator_losses(z1, z2, x1, x2)
    start = rdskd.generator_objective(losses, None)
    torch.testing.assert_close(start, reference.rdskd_generator_objective(losses))
    torch.testing.assert_close(start, losses["one_hot"].exp() + losses["class_diversity"].exp()
                               + losses["sample_diversity"])
    prev = {"one_hot": losses["one_hot"] * 1.0, "class_diversity": losses["class_diversity"] * 1.0}
    at_ref = rdskd.generator_objective(losses, prev)
    # at the reference point both exponentials are exp(0) = 1
    torch.testing.assert_close(at_ref, 2 + losses["sample_diversity"])
    torch.testing.assert_close(at_ref, reference.rdskd_generator_objective(
        losses, {k: v.item() for k, v in prev.items()}))
    # the previous values are constants: the gradient is exp(.)' = 1 x d loss, not 0
    g_obj, = torch.autograd.grad(at_ref, z1, retain_graph=True)
    g_sum, = torch.autograd.grad(losses["one_hot"] + losses["class_diversity"] + losses["sample_diversity"], z1)
    torch.testing.assert_close(g_obj, g_sum)


def test_rdskd_matches_official_two_pass_formulation_with_one_teacher_pass():
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    teacher.eval()  # frozen teacher: BN uses running stats, so one pass over both halves = two passes
    with torch.no_grad():
        teacher[1].running_mean.uniform_(-0.5, 0.5)
        teacher[1].running_var.uniform_(0.5, 2)
    x = torch.randn(16, 1, 16, 16)
    x1, x2 = x.split(8)
    oh, ie, ds = baselines.rdskd_official_generator_losses(teacher, x1, x2)
    z1, z2 = teacher(x).split(8)
    got = rdskd.generator_losses(z1, z2, x1, x2)
    torch.testing.assert_close(got["one_hot"], oh)
    torch.testing.assert_close(got["class_diversity"], ie)
    torch.testing.assert_close(got["sample_diversity"], ds)


def test_rdskd_gradcheck():
    torch.manual_seed(6)
    z1, z2, x1, x2 = [t.requires_grad_(True) for t in _halves(3, 4, (1, 2, 3), dtype=torch.float64)]
    for key in ("one_hot", "class_diversity", "sample_diversity"):
        assert torch.autograd.gradcheck(lambda a, b, c, d: rdskd.generator_losses(a, b, c, d)[key], (z1, z2, x1, x2))


@pytest.mark.parametrize("args,exc,fragment", [
    ((torch.randn(4, 3), torch.randn(5, 3), torch.randn(4, 2), torch.randn(4, 2)), ValueError, "same shape"),
    ((torch.randn(4, 3), torch.randn(4, 3), torch.randn(3, 2), torch.randn(3, 2)), ValueError, "x_1 must be"),
    ((torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 5)), ValueError, "x_1 is"),
    ((torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2), torch.ones(4, 2, dtype=torch.long)), TypeError, "x_2"),
    ((torch.randn(4, 3, 1), torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 2)), ValueError, "t_logits_1"),
])
def test_rdskd_errors(args, exc, fragment):
    with pytest.raises(exc, match=fragment):
        rdskd.generator_losses(*args)


# ------------------------------------------------------------------------------------------ DFAD
@pytest.mark.parametrize("b,k", SHAPES)
def test_dfad_discrepancy_matches_reference_and_official(b, k):
    s, t = torch.randn(b, k, dtype=torch.float64), torch.randn(b, k, dtype=torch.float64)
    torch.testing.assert_close(dfad.discrepancy(s, t), reference.dfad_discrepancy(s, t), rtol=1e-12, atol=1e-12)
    # mean over B*K entries, not a per-sample sum
    torch.testing.assert_close(dfad.discrepancy(s, t), (s - t).abs().sum(1).mean() / k)
    torch.testing.assert_close(dfad.discrepancy(s.float(), t.float()), F.l1_loss(s.float(), t.float()))
    s_nc = torch.randn(k, b, dtype=torch.float64).t()  # non-contiguous
    torch.testing.assert_close(dfad.discrepancy(s_nc, t), reference.dfad_discrepancy(s_nc, t))


def test_dfad_gradcheck_and_errors():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dfad.discrepancy, (s, t))
    with pytest.raises(ValueError, match="shape mismatch"):
        dfad.discrepancy(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="s_logits must be 2-D"):
        dfad.discrepancy(torch.randn(3), torch.randn(3))
    with pytest.raises(TypeError, match="t_logits must be float"):
        dfad.discrepancy(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------ generator
@pytest.mark.parametrize("size,channels,ngf", [(16, 1, 16), (32, 1, 64), (32, 3, 8), (8, 2, 4)])
def test_generator_shapes_and_layers(size, channels, ngf):
    g = datafree_base.Generator(latent_dim=20, image_size=size, channels=channels, ngf=ngf)
    for b in (1, 5):
        x = g(torch.randn(b, 20))
        assert x.shape == (b, channels, size, size)
    assert g(torch.randn(3, 20, 1, 1)).shape == (3, channels, size, size)  # DFAD's (B, nz, 1, 1) noise
    assert g.image_shape == (channels, size, size)
    convs = [m for m in g.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [2 * ngf, ngf, channels]
    assert g.project.out_features == 2 * ngf * (size // 4) ** 2
    # tanh, then a BatchNorm without affine parameters: train-mode output standardised per channel
    last = g.to_image[-1]
    assert isinstance(last, nn.BatchNorm2d) and not last.affine and isinstance(g.to_image[1], nn.Tanh)
    x = g(torch.randn(32, 20))
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(channels), atol=1e-5, rtol=0)
    x.sum().backward()
    assert all(p.grad is not None for p in g.parameters())


def test_generator_bn_eps_quirk():
    quirk = datafree_base.Generator(10, 16, 1, 8, bn_eps_quirk=True)
    plain = datafree_base.Generator(10, 16, 1, 8)
    eps_q = [m.eps for m in quirk.modules() if isinstance(m, nn.BatchNorm2d)]
    eps_p = [m.eps for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    # BN after the linear and the last (non-affine) BN keep the default; the two conv-block BNs get 0.8
    assert eps_q == [1e-5, 0.8, 0.8, 1e-5] and eps_p == [1e-5] * 4
    assert "bn_eps_quirk=True" in repr(quirk)


def test_generator_errors():
    with pytest.raises(ValueError, match="multiple of 4"):
        datafree_base.Generator(10, 18)
    with pytest.raises(ValueError, match="latent_dim must be a positive int"):
        datafree_base.Generator(0, 16)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        datafree_base.Generator(10, 16, channels=1.5)
    g = datafree_base.Generator(10, 16, ngf=4)
    with pytest.raises(ValueError, match=r"z must have shape \(B, 10\)"):
        g(torch.randn(3, 11))
    with pytest.raises(ValueError, match="B >= 1"):
        g(torch.randn(0, 10))
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        g([0.0] * 10)


# ------------------------------------------------------------------------------------------ feature tap
def test_penultimate_tap_reads_the_classifier_input():
    from kdfast import models

    net = models.build("vgg8", num_classes=10, in_channels=1, width_mult=0.25).eval()
    tap = datafree_base.PenultimateTap(net)
    assert tap.layer == "classifier"
    x = torch.randn(3, 1, 16, 16)
    logits = net(x)
    feat = tap.pop()
    assert feat.shape == (3, net.classifier.in_features)
    torch.testing.assert_close(F.linear(feat, net.classifier.weight, net.classifier.bias), logits)
    with pytest.raises(RuntimeError, match="run the model first"):
        tap.pop()
    tap.remove()
    net(x)
    assert tap.feature is None
    lenet = models.build("lenet5", num_classes=10, in_channels=1)
    tap = datafree_base.PenultimateTap(lenet)  # the official DAFL feature: the 120-d conv3 output (fc2's input)
    lenet(torch.randn(2, 1, 32, 32))
    assert tap.layer == "fc2" and tap.pop().shape == (2, 120)
    tap.remove()
    assert datafree_base.PenultimateTap(lenet, "fc1").layer == "fc1"
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        datafree_base.PenultimateTap(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(ValueError, match="unknown layer name 'fc9'"):
        datafree_base.PenultimateTap(lenet, "fc9")


# ------------------------------------------------------------------------------------------ collapse
def test_collapse_reason():
    assert datafree_base.collapse_reason(torch.tensor([0, 5, 0]), False) == (
        "all 5 generated samples were predicted as class 1 by the teacher")
    assert datafree_base.collapse_reason(torch.tensor([1, 5, 0]), False) is None
    assert datafree_base.collapse_reason(torch.tensor([0, 0, 0]), False) is None
    assert "NaN" in datafree_base.collapse_reason(torch.tensor([3, 3]), True)
    with pytest.raises(ValueError, match="class_counts must be 1-D"):
        datafree_base.collapse_reason(torch.zeros(2, 2), False)


def test_collapse_monitor_whole_epoch_one_class_and_nan():
    mon = datafree_base.CollapseMonitor(4)
    one_class = torch.tensor([[0.0, 5.0, 0.0, 0.0]]).repeat(8, 1)
    mon.update(one_class)
    mon.update(one_class + 1)
    with pytest.raises(datafree_base.GeneratorCollapse, match=r"collapsed in epoch 7 \(0-based\): all 16 generated "
                                                          r"samples were predicted as class 1"):
        mon.check(7)
    # one batch of one class is fine if the epoch as a whole has two classes
    mon.update(one_class)
    mon.update(torch.tensor([[9.0, 0.0, 0.0, 0.0]]))
    assert mon.check(8)["class_counts"] == [1, 8, 0, 0]
    # counts are per epoch: check() reset them
    assert mon.check(9) == {"class_counts": None}
    images = torch.randn(2, 1, 4, 4)
    images[1, 0, 2, 2] = float("nan")
    mon.update(torch.randn(2, 4), images)
    mon.update(torch.randn(2, 4))
    with pytest.raises(datafree_base.GeneratorCollapse, match="epoch 3.*NaN/inf"):
        mon.check(3, "generator")
    mon.update(torch.tensor([[float("inf"), 0, 0, 1.0], [0, 1.0, 0, 0]]))
    with pytest.raises(datafree_base.GeneratorCollapse, match="NaN/inf"):
        mon.check(0)


# ------------------------------------------------------------------------------------------ diversity
def test_diversity_measures():
    logits = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [3.0, 0, 0], [0, 0, 1.0]])
    torch.testing.assert_close(datafree_base.class_histogram(logits), torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    assert datafree_base.class_histogram(logits, 5).shape == (5,)
    assert datafree_base.entropy_bits([0.5, 0.25, 0.25]) == pytest.approx(1.5)
    assert datafree_base.entropy_bits([1.0, 0.0]) == 0.0
    x = torch.randn(5, 1, 3, 3)
    manual = [(x[i] - x[j]).norm().item() for i in range(5) for j in range(i + 1, 5)]
    assert datafree_base.mean_pairwise_distance(x) == pytest.approx(sum(manual) / len(manual), rel=1e-6)
    with pytest.raises(ValueError, match="B >= 2"):
        datafree_base.mean_pairwise_distance(x[:1])
    with pytest.raises(ValueError, match="non-empty"):
        datafree_base.class_histogram(torch.randn(3))


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


# ------------------------------------------------------------------------------------------ RDSKD's weights, layout
def test_rdskd_weights_default_to_the_official_objective_and_scale_each_term():
    t1, t2, x1, x2 = _halves(6, 5, dtype=torch.float32)
    losses = rdskd.generator_losses(t1, t2, x1, x2)
    prev = {"one_hot": torch.tensor(0.3), "class_diversity": torch.tensor(-1.0)}
    official = rdskd.generator_objective(losses, prev)
    torch.testing.assert_close(rdskd.generator_objective(losses, prev, oh=1.0, cd=1.0, sd=1.0), official)
    terms = {"oh": torch.exp(losses["one_hot"] - 0.3), "cd": torch.exp(losses["class_diversity"] + 1.0),
             "sd": losses["sample_diversity"]}
    for knob, term in terms.items():
        torch.testing.assert_close(rdskd.generator_objective(losses, prev, **{knob: 10.0}), official + 9.0 * term)


def test_rdskd_build_passes_the_weights_to_the_generator_stage():
    teacher, student, _ = _models(4)
    run = rdskd.build(teacher, student, image_size=8, ngf=4, latent_dim=8, batch_size=4, steps_per_epoch=1,
                      generator_epochs=1, epochs=1, oh=0.1, cd=10.0, sd=3.0, **QUIET)
    stage = run.stages[0].build()
    assert stage.weights == {"oh": 0.1, "cd": 10.0, "sd": 3.0}
    stage.close()
    with pytest.raises(ValueError, match="option cd must be"):
        methods.check_options("rdskd", {"cd": -1.0})


@pytest.mark.parametrize("quirk", [False, True])
def test_channels_last_generator_equals_the_plain_one(quirk):
    torch.manual_seed(0)
    plain = datafree_base.Generator(16, 16, 1, 8, quirk)
    fast = datafree_base.Generator(16, 16, 1, 8, quirk, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    assert fast.block1[1].weight.is_contiguous(memory_format=torch.channels_last)
    z = torch.randn(6, 16)
    a, b = plain(z), fast(z)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(a)  # (the squared sum of the output's last, affine-free BatchNorm is a constant)
    (a * w).sum().backward()
    (b * w).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-3, msg=name)  # gradients up to ~200
    assert "channels_last=True" in repr(fast)
