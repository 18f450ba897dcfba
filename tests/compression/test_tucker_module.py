"""kdfast.nn.TuckerConv2d: equals its dense conv, from_conv reproduces a conv at full rank, HOSVD
initialisation, rank specifications, state_dict, torch.compile, autocast, DDP and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdfast.testing import reference
from kdfast.nn import TuckerConv2d, resolve_ranks
from helpers import feature_map

CONFIGS = [
    # in, out, kernel, ranks, stride, padding, dilation, bias
    (5, 7, 3, (3, 2), 1, 1, 1, True),
    (6, 4, (3, 5), (4, 6), (2, 1), (1, 2), 1, False),
    (3, 9, 3, (5, 1), 2, 0, (2, 1), True),
    (8, 8, 1, (2, 3), 1, 0, 1, True),
]


def composed_float64(layer, x):
    """The op's reference (three convs) applied to the layer's own parameters."""
    return reference.tucker_conv2d(
        x, layer.first, layer.core, layer.last, layer.bias, layer.stride, layer.padding, layer.dilation
    )


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_module_equals_dense_conv(config, layout):
    c, o, k, ranks, stride, padding, dilation, bias = config
    layer = TuckerConv2d(c, o, k, ranks, stride, padding, dilation, bias, dtype=torch.float64)
    x = feature_map((2, c, 11, 10), layout=layout)
    out = layer(x)
    torch.testing.assert_close(out, layer.to_conv()(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, composed_float64(layer, x), rtol=1e-10, atol=1e-10)
    assert layer(x[:1]).shape[0] == 1


def test_gradients_match_dense_composition():
    layer = TuckerConv2d(5, 6, 3, (4, 3), stride=2, padding=1, dtype=torch.float64)
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn_like(layer(x))
    params = [x, layer.first, layer.core, layer.last, layer.bias]
    got = torch.autograd.grad(layer(x), params, grad_out)
    dense = F.conv2d(x, layer.dense_weight(), layer.bias, stride=2, padding=1)
    want = torch.autograd.grad(dense, params, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(12, 20, 3, padding=1),
        nn.Conv2d(12, 20, 3, stride=2, padding=1, bias=False),
        nn.Conv2d(12, 20, (3, 5), stride=(1, 2), padding=(2, 1), dilation=2),
        nn.Conv2d(12, 20, 3, padding="same"),
        nn.Conv2d(12, 20, 3, padding="valid", bias=False),
        nn.Conv2d(12, 20, 1),
        nn.Conv2d(40, 6, 3, padding=1),
    ],
    ids=["basic", "stride-nobias", "rect-dilated", "same", "valid", "1x1", "O<C"],
)
def test_from_conv_full_rank_reproduces_conv(conv):
    layer = TuckerConv2d.from_conv(conv, ranks=1.0)
    assert layer.ranks == (conv.out_channels, conv.in_channels)
    assert (layer.bias is None) == (conv.bias is None)
    x = torch.randn(2, conv.in_channels, 13, 12)
    with torch.no_grad():
        want = conv(x)
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.to_conv()(x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.dense_weight(), conv.weight, rtol=1e-5, atol=1e-6)


def test_hosvd_initialisation():
    conv = nn.Conv2d(10, 14, 3, dtype=torch.float64)
    w = conv.weight.detach()
    layer = TuckerConv2d.from_conv(conv, ranks=(5, 4))
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(layer.last.T @ layer.last, eye(5))
    torch.testing.assert_close(layer.first @ layer.first.T, eye(4))
    # n_iter_max=0 is plain truncated HOSVD: the factors span the leading left singular vectors of
    # the mode-0 (O x C k k) and mode-1 (C x O k k) unfoldings, and core is W projected on them.
    u0 = torch.linalg.svd(w.reshape(14, -1))[0][:, :5]
    u1 = torch.linalg.svd(w.transpose(0, 1).reshape(10, -1))[0][:, :4]
    torch.testing.assert_close(layer.last @ layer.last.T, u0 @ u0.T)
    torch.testing.assert_close(layer.first.T @ layer.first, u1 @ u1.T)
    torch.testing.assert_close(layer.core, torch.einsum("oa,ochw,bc->abhw", layer.last, w, layer.first))
    # HOOI iterations can only lower the reconstruction error
    hooi = TuckerConv2d.from_conv(conv, ranks=(5, 4), n_iter_max=10)
    err_hosvd = (layer.dense_weight() - w).norm()
    err_hooi = (hooi.dense_weight() - w).norm()
    assert err_hooi <= err_hosvd + 1e-12


def test_from_conv_keeps_dtype_device_mode():
    conv = nn.Conv2d(6, 8, 3, dtype=torch.float64).eval()
    layer = TuckerConv2d.from_conv(conv, ranks=(2, 2))
    assert layer.core.dtype == torch.float64 and not layer.training
    assert layer.to_conv().weight.dtype == torch.float64 and not layer.to_conv().training


def planted_conv(o, c, r_out, r_in, noise=0.01):
    core = torch.randn(r_out, r_in, 3, 3)
    u_out = torch.linalg.qr(torch.randn(o, r_out))[0]
    u_in = torch.linalg.qr(torch.randn(c, r_in))[0]
    conv = nn.Conv2d(c, o, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("abhw,oa,cb->ochw", core, u_out, u_in) + noise * torch.randn(o, c, 3, 3))
    return conv


def test_rank_specifications():
    conv = planted_conv(32, 24, 6, 10)
    assert TuckerConv2d.from_conv(conv, ranks="evbmf", align=1).ranks == (6, 10)
    assert TuckerConv2d.from_conv(conv).ranks == (8, 16)  # default: evbmf, aligned up to 8
    assert TuckerConv2d.from_conv(conv, "evbmf", weaken=1.0).ranks == (32, 24)
    assert TuckerConv2d.from_conv(conv, ranks=0.5).ranks == (16, 12)
    assert TuckerConv2d.from_conv(conv, ranks=0.01).ranks == (1, 1)
    assert TuckerConv2d.from_conv(conv, ranks=[3, 7]).ranks == (3, 7)
    assert resolve_ranks(conv.weight, 0.3) == (math.ceil(0.3 * 32), math.ceil(0.3 * 24))


@pytest.mark.parametrize(
    "ranks, kwargs, exc, match",
    [
        ((0, 4), {}, ValueError, r"ranks\[0\] \(r_out\) must be in \[1, out_channels=20\]"),
        ((4, 13), {}, ValueError, r"ranks\[1\] \(r_in\) must be in \[1, in_channels=12\]"),
        (0.0, {}, ValueError, r"ranks as a float .* must be in \(0, 1\]"),
        (1.5, {}, ValueError, r"must be in \(0, 1\]"),
        (4, {}, TypeError, "ranks must be a pair of ints"),
        ((4.0, 2.0), {}, TypeError, "ranks must be a pair of ints"),
        ((1, 2, 3), {}, TypeError, "ranks must be a pair of ints"),
        (True, {}, TypeError, "ranks must be"),
        ("vbmf", {}, ValueError, "ranks must be a pair of ints, a float in \\(0, 1\\] or 'evbmf'"),
        ((4, 4), {"align": 8}, ValueError, "only apply to ranks='evbmf'"),
        ("evbmf", {"align": 0}, ValueError, "align must be an int >= 1"),
        ("evbmf", {"weakening": 0.5}, TypeError, "unknown rank options"),
    ],
)
def test_bad_ranks(ranks, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TuckerConv2d.from_conv(nn.Conv2d(12, 20, 3), ranks, **kwargs)


def test_bad_convs():
    with pytest.raises(ValueError, match="groups=2"):
        TuckerConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=2), (4, 4))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        TuckerConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), (4, 4))
    with pytest.raises(TypeError, match="conv must be a torch.nn.Conv2d, got Linear"):
        TuckerConv2d.from_conv(nn.Linear(8, 8), (4, 4))
    with pytest.raises(ValueError, match="asymmetric padding"):
        TuckerConv2d.from_conv(nn.Conv2d(8, 8, 4, padding="same"), (4, 4))
    with pytest.raises(ValueError, match="n_iter_max must be an int >= 0"):
        TuckerConv2d.from_conv(nn.Conv2d(8, 8, 3), (4, 4), n_iter_max=-1)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"ranks\[0\]"):
        TuckerConv2d(4, 4, 3, (5, 2))
    with pytest.raises(TypeError, match="in_channels must be an int"):
        TuckerConv2d(4.0, 4, 3, (2, 2))
    with pytest.raises(ValueError, match="out_channels must be >= 1"):
        TuckerConv2d(4, 0, 3, (1, 1))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        TuckerConv2d(4, 4, 3, (2, 2), stride=0)
    with pytest.raises(TypeError, match="padding must be an int or a pair of ints"):
        TuckerConv2d(4, 4, 3, (2, 2), padding="same")


def test_bad_forward_input_is_a_clear_error():
    layer = TuckerConv2d(4, 6, 3, (2, 2))
    with pytest.raises((ValueError, RuntimeError), match="channel|channels|C"):
        layer(torch.randn(1, 5, 8, 8))


def test_state_dict_round_trip():
    src = TuckerConv2d.from_conv(nn.Conv2d(6, 10, 3, padding=1), ranks=(4, 3))
    assert set(src.state_dict()) == {"first", "core", "last", "bias"}
    dst = TuckerConv2d(6, 10, 3, (4, 3), padding=1)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        TuckerConv2d(6, 10, 3, (5, 3), padding=1).load_state_dict(src.state_dict())


def test_extra_repr():
    layer = TuckerConv2d(6, 10, 3, (4, 3), stride=2, padding=1, dilation=2, bias=False)
    assert repr(layer) == (
        "TuckerConv2d(6, 10, kernel_size=(3, 3), ranks=(4, 3), stride=(2, 2), padding=(1, 1), "
        "dilation=(2, 2), bias=False)"
    )


# aot_eager: dynamo traces the module (autocast check included) with no graph break; inductor over
# the op itself is covered by the op's tests.
@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    layer = TuckerConv2d(6, 10, 3, (4, 3), stride=2, padding=1)
    x = torch.randn(2, 6, 9, 8, requires_grad=True)
    eager = layer(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, *layer.parameters()])
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compiled(x).dtype == torch.bfloat16


def test_cpu_autocast_runs_in_bfloat16():
    layer = TuckerConv2d(6, 10, 3, (4, 3), padding=1)
    x = torch.randn(2, 6, 8, 8)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)  # float32 input
        out_bf16_in = layer(x.bfloat16())  # e.g. the output of an autocast conv before it
    assert out.dtype == torch.bfloat16 and out_bf16_in.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=5e-2, atol=5e-2)
    out.float().sum().backward()
    assert layer.core.grad is not None and layer.core.grad.dtype == torch.float32
