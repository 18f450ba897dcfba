"""kdfast.losses modules: the loss-call protocol, values on fixed inputs computed by hand or
independently, gradients reaching learnable parts, and clear errors."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdfast import losses, ops
from kdfast.testing import reference


def test_protocol_attributes():
    assert losses.KDLoss.kdfast_inputs == "logits"
    assert losses.LogitMSELoss.kdfast_inputs == "logits"
    for cls in (losses.ATLoss, losses.HintLoss, losses.NSTLoss, losses.FSPLoss):
        assert cls.kdfast_inputs == "features"
    assert not hasattr(nn.CrossEntropyLoss(), "kdfast_inputs")


# =============================================================================================== logits
def test_kd_loss_module_matches_formula():
    s = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 11, dtype=torch.float64)
    y = torch.randint(0, 11, (5,))
    out = losses.KDLoss(temperature=3.0, alpha=0.7)(s, t, y)
    kl = F.kl_div(F.log_softmax(s / 3, 1), F.log_softmax(t / 3, 1), reduction="batchmean", log_target=True)
    torch.testing.assert_close(out, 0.3 * F.cross_entropy(s, y) + 0.7 * 9 * kl)
    # RepDistiller's DistillKL: kl_div(log_softmax(s/T), softmax(t/T), sum) * T^2 / B
    distill_kl = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="sum") * 16 / 5
    torch.testing.assert_close(losses.KDLoss(4.0, alpha=1.0)(s, t), distill_kl)
    no_t2 = losses.KDLoss(4.0, alpha=1.0, t2_scale=False)(s, t)
    torch.testing.assert_close(no_t2 * 16, distill_kl)
    out.backward()
    assert s.grad is not None


def test_kd_loss_module_needs_targets_unless_alpha_one():
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=re.escape("KDLoss(alpha=0.9) needs targets")):
        losses.KDLoss()(s, t)
    assert torch.isfinite(losses.KDLoss(alpha=1.0)(s, t))


@pytest.mark.parametrize("kw,fragment", [
    (dict(temperature=0), "temperature must be a positive finite number"),
    (dict(temperature=-2.0), "temperature must be a positive finite number"),
    (dict(alpha=1.2), "alpha must be in [0, 1]"),
])
def test_kd_loss_module_bad_args(kw, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        losses.KDLoss(**kw)


def test_logit_mse():
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    # squared differences 1, 0, 4, 1 -> mean 1.5
    assert losses.LogitMSELoss()(s, t, None).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="shape mismatch"):
        losses.LogitMSELoss()(s, torch.randn(2, 3))


# =============================================================================================== AT
def _at_student_teacher():
    # student: 2 channels, 2x2; teacher: 1 channel of ones
    fs = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]]]], dtype=torch.float64)
    ft = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    return fs, ft


def test_at_loss_hand_computed():
    fs, ft = _at_student_teacher()
    # student channel mean of x^2: [(1+1)/2, 0, 0, (0+4)/2] = [1, 0, 0, 2] -> / sqrt(5)
    # teacher: [1, 1, 1, 1] -> / 2
    q_s = [1 / math.sqrt(5), 0.0, 0.0, 2 / math.sqrt(5)]
    q_t = [0.5] * 4
    expected = 1000 * sum((a - b) ** 2 for a, b in zip(q_s, q_t)) / 4
    out = losses.ATLoss()(fs, ft)
    assert out.item() == pytest.approx(expected, rel=1e-12)
    # a list of two identical pairs sums them; beta scales linearly
    assert losses.ATLoss(beta=1.0)([fs, fs], [ft, ft]).item() == pytest.approx(2 * expected / 1000, rel=1e-12)


def test_at_loss_matches_official_formulation_with_pooling():
    """Against the official code's at/at_loss (x.pow(2).mean(1), L2-normalised, squared mean), with the
    teacher map at twice the resolution average-pooled first (RepDistiller)."""
    fs = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(3, 8, 10, 10, dtype=torch.float64)

    def official_at(x):
        q = x.pow(2).mean(1).view(x.size(0), -1)
        return q / q.norm(dim=1, keepdim=True)

    expected = 1000 * (official_at(fs) - official_at(F.adaptive_avg_pool2d(ft, (5, 5)))).pow(2).mean()
    out = losses.ATLoss()(fs, ft)
    torch.testing.assert_close(out, expected)
    (g,) = torch.autograd.grad(out, fs)
    (r,) = torch.autograd.grad(expected, fs)
    torch.testing.assert_close(g, r)


def test_at_loss_general_p_uses_absolute_value():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(losses.attention_map(x, 3.0), losses.attention_map(x.abs(), 3.0))
    expected = F.normalize(x.pow(4).mean(1).flatten(1), dim=1)
    torch.testing.assert_close(losses.attention_map(x, 4.0), expected)


# =============================================================================================== FitNets
def test_hint_regressor_choice():
    same = losses.HintLoss((4, 8, 8), (6, 8, 8)).regressors[0]
    assert isinstance(same[0], nn.Conv2d) and same[0].kernel_size == (1, 1) and isinstance(same[1], nn.BatchNorm2d)
    down = losses.HintLoss((4, 16, 16), (6, 8, 8)).regressors[0][0]
    assert isinstance(down, nn.Conv2d) and down.kernel_size == (3, 3) and down.stride == (2, 2)
    down4 = losses.HintLoss((4, 16, 16), (6, 4, 4)).regressors[0][0]
    assert down4.stride == (4, 4)
    up = losses.HintLoss((4, 4, 4), (6, 8, 8)).regressors[0][0]
    assert isinstance(up, nn.ConvTranspose2d) and up.kernel_size == (4, 4) and up.stride == (2, 2)
    for s_shape, t_shape in [((4, 16, 16), (6, 8, 8)), ((4, 4, 4), (6, 8, 8)), ((4, 7, 9), (6, 7, 9))]:
        loss = losses.HintLoss(s_shape, t_shape)
        out = loss.regressors[0](torch.randn(2, *s_shape))
        assert tuple(out.shape[1:]) == t_shape


def test_hint_loss_value_independent():
    """1x1 regressor with a fixed weight, BatchNorm in training mode: computed by hand with torch ops."""
    loss = losses.HintLoss(student_shape=(2, 3, 3), teacher_shape=(1, 3, 3)).double()
    with torch.no_grad():
        loss.regressors[0][0].weight.copy_(torch.tensor([[[[2.0]], [[-1.0]]]]))
    fs = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    ft = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    z = 2 * fs[:, :1] - fs[:, 1:]
    mean, var = z.mean(), z.var(unbiased=False)
    expected = ((z - mean) / torch.sqrt(var + 1e-5) - ft).pow(2).mean()
    torch.testing.assert_close(loss(fs, ft), expected)


def test_hint_loss_trains_regressor_and_lists():
    loss = losses.HintLoss([(4, 8, 8), (8, 4, 4)], [(6, 4, 4), (8, 4, 4)])
    assert len(list(loss.parameters())) == 2 * 3  # conv weight, BN weight and bias per pair
    fs = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)]
    ft = [torch.randn(2, 6, 4, 4), torch.randn(2, 8, 4, 4)]
    out = loss(fs, ft)
    out.backward()
    assert all(p.grad is not None for p in loss.parameters())
    assert fs[0].grad is not None and fs[1].grad is not None
    expected = sum(F.mse_loss(r(a), b) for r, a, b in zip(loss.regressors, fs, ft))
    torch.testing.assert_close(out, expected)


# =============================================================================================== NST / FSP
def test_nst_loss_module_sums_pairs():
    fs = [torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 8, 3, 3, dtype=torch.float64)]
    ft = [torch.randn(2, 6, 6, 6, dtype=torch.float64), torch.randn(2, 5, 6, 6, dtype=torch.float64)]
    expected = sum(reference.nst_loss(a, b, "poly") for a, b in zip(fs, ft))
    torch.testing.assert_close(losses.NSTLoss()(fs, ft), expected)
    torch.testing.assert_close(losses.NSTLoss("gaussian", sigma=2.0)(fs[0], ft[0]),
                               reference.nst_loss(fs[0], ft[0], "gaussian", sigma=2.0))


def test_fsp_loss_module_consecutive_pairs():
    chans = (3, 5, 4)
    sizes = (8, 8, 4)
    fs = [torch.randn(2, c, h, h, dtype=torch.float64) for c, h in zip(chans, sizes)]
    ft = [torch.randn(2, c, h, h, dtype=torch.float64) for c, h in zip(chans, sizes)]
    expected = reference.fsp_loss(fs[0], fs[1], ft[0], ft[1]) + reference.fsp_loss(fs[1], fs[2], ft[1], ft[2])
    torch.testing.assert_close(losses.FSPLoss()(fs, ft), expected)


# =============================================================================================== errors
X = torch.randn(2, 3, 4, 4)

ERRORS = [
    (lambda: losses.ATLoss()([X, X], [X]), ValueError, "student_feats has 2 feature maps but teacher_feats has 1"),
    (lambda: losses.ATLoss()([], []), ValueError, "student_feats and teacher_feats are empty"),
    (lambda: losses.ATLoss()("x", X), TypeError, "student_feats must be a Tensor or a list/tuple of Tensors"),
    (lambda: losses.ATLoss()(X, torch.randn(3, 3, 4, 4)), ValueError, "batch size mismatch: student_feats[0]"),
    (lambda: losses.ATLoss()(torch.randn(2, 3, 4), X), ValueError, "student_feats[0] must be a 4-D feature map"),
    (lambda: losses.ATLoss(p=0), ValueError, "p must be a positive number"),
    (lambda: losses.HintLoss((3, 4, 4), (3, 3, 3)), ValueError, "HintLoss cannot map a student map of spatial size 4x4"),
    (lambda: losses.HintLoss((3, 4), (3, 4, 4)), ValueError, "student_shape must be a (C, H, W) tuple"),
    (lambda: losses.HintLoss([(3, 4, 4)] * 2, (3, 4, 4)), ValueError, "student_shape lists 2 maps but teacher_shape lists 1"),
    (lambda: losses.HintLoss((3, 4, 4), (5, 4, 4))(torch.randn(2, 4, 4, 4), torch.randn(2, 5, 4, 4)), ValueError,
     "student_feats[0] has shape [2, 4, 4, 4]; HintLoss was built for (B, 3, 4, 4)"),
    (lambda: losses.HintLoss((3, 4, 4), (5, 4, 4))([X, X], [X, X]), ValueError, "HintLoss was built for 1 feature pairs, got 2"),
    (lambda: losses.NSTLoss("rbf"), ValueError, "kernel must be one of"),
    (lambda: losses.FSPLoss()(X, X), ValueError, "FSPLoss needs lists of at least 2 maps"),
    (lambda: losses.FSPLoss()([X, X], [X]), ValueError, "student_feats has 2 feature maps but teacher_feats has 1"),
    (lambda: losses.KDLoss(alpha=1.0)(torch.randn(2, 3), torch.randn(2, 4)), ValueError, "shape mismatch"),
]


@pytest.mark.parametrize("call,exc,fragment", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_errors(call, exc, fragment):
    with pytest.raises(exc, match=re.escape(fragment)):
        call()
