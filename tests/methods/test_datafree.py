"""Data-free KD (DAFL, RDSKD, DFAD): the generator losses against the float64 oracle and the official
codes' formulations, their normalisations, the generator, the teacher-feature tap, collapse detection
and the diversity measures. The losses are compositions of PyTorch ops (no custom op: no opcheck)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import feature_map
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
