"""kdfast.ops.tucker_conv2d against the three-conv reference (float64), on both the fused and the
composed path, plus gradients, gradcheck, opcheck, torch.compile and bad-input errors."""
import functools
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from helpers import LAYOUTS, TUCKER_SHAPES as SHAPES, feature_map

from kdfast import ops
from kdfast.testing import reference

_tucker_conv2d = ops.tucker_conv2d

PATHS = ["fused", "composed"]


def _args(shape, dtype=torch.float64, device="cpu", layout="contiguous", bias=True, requires_grad=False):
    n, c, h, w, r_in, r_out, o, (kh, kw), stride, padding, dilation = shape
    x = feature_map((n, c, h, w), dtype, device, layout, requires_grad=requires_grad)
    params = [
        torch.randn(r_in, c, dtype=dtype, device=device),
        torch.randn(r_out, r_in, kh, kw, dtype=dtype, device=device),
        torch.randn(o, r_out, dtype=dtype, device=device),
        torch.randn(o, dtype=dtype, device=device) if bias else None,
    ]
    params = [p.requires_grad_(requires_grad) if p is not None else None for p in params]
    return (x, *params), dict(stride=stride, padding=padding, dilation=dilation)


# Each path in both training modes: the memory-lean one (the path's own kernel; the backward
# recomputes the intermediates) and the default one when gradients are needed (the composition,
# keeping its intermediates: "saved").
@pytest.fixture(params=[("fused", False), ("composed", False), ("composed", True)],
                ids=["fused", "composed", "composed-saved"])
def path(request, monkeypatch):
    name, save = request.param
    monkeypatch.setenv("KDFAST_TUCKER_CONV_PATH", name)
    monkeypatch.setattr(ops, "tucker_conv2d", functools.partial(_tucker_conv2d, save_intermediates=save))
    return name


def _grads(fn, inputs, kwargs, grad_out):
    out = fn(*inputs, **kwargs)
    needed = [t for t in inputs if t is not None and t.requires_grad]
    return out, torch.autograd.grad(out, needed, grad_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_float64(device, shape, bias, path):
    inputs, kwargs = _args(shape, device=device, bias=bias, requires_grad=True)
    if device == "cpu":  # CUDA runs float64 through the composition (its fused kernel is float32/16/bf16)
        assert ops.tucker_conv2d_path(*inputs[:4], **kwargs) == path
    ref = reference.tucker_conv2d(*inputs, **kwargs)
    grad_out = torch.randn_like(ref)
    out, g = _grads(ops.tucker_conv2d, inputs, kwargs, grad_out)
    ref, r = _grads(reference.tucker_conv2d, inputs, kwargs, grad_out)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, path):
    inputs, kwargs = _args((2, 5, 9, 8, 3, 4, 6, (3, 3), 1, 1, 1), layout=layout, requires_grad=True)
    grad_out = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    out, g = _grads(ops.tucker_conv2d, inputs, kwargs, grad_out)
    ref, r = _grads(reference.tucker_conv2d, inputs, kwargs, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # Every path returns NCHW-contiguous y and gradients, as the fake kernels promise torch.compile.
    assert out.is_contiguous() and all(t.is_contiguous() for t in g[1:])
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_non_contiguous_factors(path):
    inputs, kwargs = _args((2, 5, 7, 6, 3, 4, 6, (3, 3), 2, 1, 1))
    x, first, core, last, bias = inputs
    first_t = first.t().contiguous().t()
    core_p = core.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    last_t = last.t().contiguous().t()
    bias_s = torch.stack([bias, bias], 1)[:, 0]
    assert not (first_t.is_contiguous() or core_p.is_contiguous() or last_t.is_contiguous() or bias_s.is_contiguous())
    out = ops.tucker_conv2d(x, first_t, core_p, last_t, bias_s, **kwargs)
    torch.testing.assert_close(out, reference.tucker_conv2d(*inputs, **kwargs), rtol=1e-10, atol=1e-10)


def test_float32_matches_reference(path):
    inputs, kwargs = _args((2, 16, 14, 14, 8, 8, 16, (3, 3), 1, 1, 1), dtype=torch.float32)
    torch.testing.assert_close(ops.tucker_conv2d(*inputs, **kwargs), reference.tucker_conv2d(*inputs, **kwargs),
                               rtol=1e-4, atol=1e-4)


def test_large_fused_tiles_match_reference(monkeypatch):
    """Enough rows and samples for several tiles per sample and several threads' work."""
    monkeypatch.setenv("KDFAST_TUCKER_CONV_PATH", "fused")
    inputs, kwargs = _args((3, 8, 40, 33, 6, 5, 7, (3, 3), 1, 1, 1))
    torch.testing.assert_close(ops.tucker_conv2d(*inputs, **kwargs), reference.tucker_conv2d(*inputs, **kwargs),
                               rtol=1e-10, atol=1e-10)



@pytest.mark.parametrize("shape", [(2, 96, 57, 55, 40, 36, 80, (3, 3), 2, 1, 1),   # stride 2, odd sizes
                                   (1, 256, 14, 13, 128, 120, 200, (3, 3), 1, 1, 1)])  # wide, batch 1
def test_wide_fused_tiles_match_reference(shape, monkeypatch):
    """Layers whose tile buffers exceed the per-thread budget (up to 1 MiB, half the L2) at any row
    count: many bands per sample, each recomputing its halo rows."""
    monkeypatch.setenv("KDFAST_TUCKER_CONV_PATH", "fused")
    inputs, kwargs = _args(shape)
    torch.testing.assert_close(ops.tucker_conv2d(*inputs, **kwargs), reference.tucker_conv2d(*inputs, **kwargs),
                               rtol=1e-10, atol=1e-10)

def test_gradcheck(path):
    inputs, kwargs = _args((2, 2, 4, 3, 2, 2, 2, (3, 3), 2, 1, 1), requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.tucker_conv2d(*t, **kwargs), inputs)


def test_gradcheck_partial_requires_grad():
    inputs, kwargs = _args((1, 2, 4, 4, 2, 2, 2, (3, 3), 1, 1, 1))
    inputs[2].requires_grad_(True)  # core only
    assert torch.autograd.gradcheck(lambda *t: ops.tucker_conv2d(*t, **kwargs), inputs)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("op", ["tucker_conv2d", "_tucker_conv2d_with_intermediates"])
def test_opcheck(bias, requires_grad, op):
    inputs, kwargs = _args((2, 4, 6, 5, 3, 2, 3, (3, 3), 2, 1, 1), bias=bias, requires_grad=requires_grad)
    args = (*inputs, [2, 2], [1, 1], [1, 1])
    torch.library.opcheck(getattr(torch.ops.kdfast, op).default, args)


def test_training_default_keeps_intermediates_and_matches_memory_lean_mode():
    inputs, kwargs = _args((2, 5, 9, 8, 3, 4, 6, (3, 3), 2, 1, 1), requires_grad=True)
    grad_out = torch.randn_like(reference.tucker_conv2d(*inputs, **kwargs))
    saved_out, saved = _grads(functools.partial(_tucker_conv2d, save_intermediates=True), inputs, kwargs, grad_out)
    lean_out, lean = _grads(functools.partial(_tucker_conv2d, save_intermediates=False), inputs, kwargs, grad_out)
    torch.testing.assert_close(saved_out, lean_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(saved, lean):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # The default picks the saving op when a gradient is needed, the plain op otherwise.
    y = _tucker_conv2d(*inputs, **kwargs)
    assert y.grad_fn is not None and "TuckerConv2dWithIntermediatesFunction" in y.grad_fn.name()
    with torch.no_grad():
        z1, z2 = torch.ops.kdfast._tucker_conv2d_with_intermediates(*inputs, [2, 2], [1, 1], [1, 1])[1:]
    torch.testing.assert_close(z1, F.conv2d(inputs[0], inputs[1][:, :, None, None]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z2, F.conv2d(z1, inputs[2], stride=2, padding=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("save_intermediates", [None, False])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(backend, save_intermediates):
    torch._dynamo.reset()
    inputs, kwargs = _args((2, 4, 8, 7, 3, 2, 5, (3, 3), 1, 1, 1), dtype=torch.float32, requires_grad=True)

    def block(x, first, core, last, bias):
        y = ops.tucker_conv2d(x, first, core, last, bias, stride=1, padding=1, save_intermediates=save_intermediates)
        return torch.relu(y).square().sum()

    eager = block(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    out = compiled(*inputs)
    out_grads = torch.autograd.grad(out, inputs)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(out_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("save_intermediates", [True, False])
def test_double_backward_raises(save_intermediates):
    inputs, kwargs = _args((1, 3, 5, 5, 2, 2, 3, (3, 3), 1, 1, 1), requires_grad=True)
    out = ops.tucker_conv2d(*inputs, **kwargs, save_intermediates=save_intermediates)
    (gx,) = torch.autograd.grad(out.sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def _cuda_fused_supported(shape):
    kh, kw = shape[7]
    stride = shape[8] if isinstance(shape[8], tuple) else (shape[8], shape[8])
    return all(k in (1, 3, 5, 7) for k in (kh, kw)) and max(stride) <= 2


@pytest.mark.needs_cuda
@pytest.mark.cuda_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_low_precision_matches_reference(shape, dtype, path, monkeypatch):
    """The CUDA fused kernel (float32 accumulate; enabled by KDFAST_CUDA_KERNELS, it is not the CUDA
    default until verified on a GPU) and the composition against the float64 reference."""
    if path == "fused":
        monkeypatch.setenv("KDFAST_CUDA_KERNELS", "tucker_conv2d")
    inputs, kwargs = _args(shape, device="cuda")
    expected_path = "fused" if path == "fused" and _cuda_fused_supported(shape) else "composed"
    low = [t.to(dtype) for t in inputs]
    assert ops.tucker_conv2d_path(*low[:4], **kwargs) == expected_path
    exact = reference.tucker_conv2d(*[t.to(dtype).double() for t in inputs], **kwargs)
    out = ops.tucker_conv2d(*low, **kwargs).double()
    scale = exact.abs().max().item()
    tol = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]  # cuDNN may use TF32
    torch.testing.assert_close(out, exact, rtol=tol, atol=tol * scale)


def _rule_table():
    """(threads, N, C, R, HW, fused speed-up) rows of csrc/ops/cpu/tucker_cpu_rule.h."""
    header = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "ops" / "cpu" / "tucker_cpu_rule.h"
    body = header.read_text().split("kTuckerCpuMeasurements[] = {", 1)[1].split("};", 1)[0]
    rows = [tuple(float(v) for v in m.group(1).split(",")) for m in re.finditer(r"\{([^{}]*)\}", body)]
    assert rows and all(len(r) == 6 for r in rows), "unexpected rule table layout"
    return rows


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cpu_automatic_rule_follows_measurements(monkeypatch, restore_threads, no_tucker_autotune):
    """Without autotuning, float32/float64 follow the measured table (csrc/ops/cpu/tucker_cpu_rule.h): at each measured
    thread count, every measured shape takes the path that measured faster there. Half types: always
    the composition."""
    monkeypatch.delenv("KDFAST_TUCKER_CONV_PATH", raising=False)
    rows = _rule_table()
    assert {r[0] for r in rows} >= {1.0, 2.0}, "the rule should hold 1- and 2-thread measurements"
    for threads, n, c, r, hw, speedup in rows:
        if abs(speedup - 1.0) < 1e-9:
            continue
        torch.set_num_threads(int(threads))
        n, c, r, hw = int(n), int(c), int(r), int(hw)
        args = (torch.empty(n, c, hw, hw), torch.empty(r, c), torch.empty(r, r, 3, 3), torch.empty(c, r))
        expected = "fused" if speedup > 1.0 else "composed"
        for dtype in (torch.float32, torch.float64):
            got = ops.tucker_conv2d_path(*[t.to(dtype) for t in args], padding=1)
            assert got == expected, f"threads {threads:.0f} N{n} C{c} R{r} {hw}x{hw} {dtype}: {got}"
        half = [t.bfloat16() for t in args]
        assert ops.tucker_conv2d_path(*half, padding=1) == "composed"


def test_path_rule_and_debug_log(monkeypatch, capfd):
    inputs, kwargs = _args((1, 3, 5, 5, 2, 2, 3, (3, 3), 1, 1, 1))
    monkeypatch.delenv("KDFAST_TUCKER_CONV_PATH", raising=False)
    assert ops.tucker_conv2d_path(*inputs[:4], **kwargs) in PATHS
    # float16 on CPU always takes the composition, whatever is forced.
    monkeypatch.setenv("KDFAST_TUCKER_CONV_PATH", "fused")
    half = [t.half() for t in inputs[:4]]
    assert ops.tucker_conv2d_path(*half, **kwargs) == "composed"
    monkeypatch.setenv("KDFAST_DEBUG", "1")
    ops.tucker_conv2d(*inputs, **kwargs)
    assert "kdfast.tucker_conv2d[cpu]: fused path" in capfd.readouterr().err


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_error_within_twice_pytorch(dtype):
    """Half types: error vs the float64 reference at most 2x that of PyTorch's own same-dtype 3-conv."""
    inputs, kwargs = _args((2, 32, 15, 14, 16, 16, 32, (3, 3), 1, 1, 1), device="cuda")
    low = [t.to(dtype) for t in inputs]
    exact = reference.tucker_conv2d(*[t.double() for t in low], **kwargs)
    ours = (ops.tucker_conv2d(*low, **kwargs).double() - exact).abs().max()
    torch_err = (reference.tucker_conv2d(*low, **kwargs).double() - exact).abs().max()
    assert ours <= 2 * torch_err


def test_cpu_bfloat16_goes_through_the_composition():
    """CPU has no fused bfloat16 kernel: the op must run exactly the reference's three convolutions."""
    inputs, kwargs = _args((2, 8, 9, 7, 4, 4, 6, (3, 3), 2, 1, 1), dtype=torch.bfloat16)
    assert ops.tucker_conv2d_path(*inputs[:4], **kwargs) == "composed"
    torch.testing.assert_close(ops.tucker_conv2d(*inputs, **kwargs), reference.tucker_conv2d(*inputs, **kwargs),
                               rtol=0, atol=0)


def test_reference_equals_dense_conv_with_reconstructed_weight():
    """The oracle itself: the composition equals one conv with W = last x core x first (mode products)."""
    inputs, kwargs = _args((2, 5, 9, 8, 3, 4, 6, (3, 5), 2, (1, 2), (2, 1)))
    x, first, core, last, bias = inputs
    weight = torch.einsum("or,rskl,sc->ockl", last, core, first)
    torch.testing.assert_close(reference.tucker_conv2d(*inputs, **kwargs), F.conv2d(x, weight, bias, **kwargs),
                               rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------- errors
X = torch.randn(2, 4, 6, 6)
FIRST, CORE, LAST, BIAS = torch.randn(3, 4), torch.randn(2, 3, 3, 3), torch.randn(5, 2), torch.randn(5)


def tc(x=X, first=FIRST, core=CORE, last=LAST, bias=BIAS, **kw):
    return ops.tucker_conv2d(x, first, core, last, bias, **kw)


ERROR_CASES = [
    (lambda: tc(x=torch.randn(4, 6, 6)), ValueError, "x must be a 4-D feature map"),
    (lambda: tc(x=torch.randn(0, 4, 6, 6)), ValueError, "x has an empty batch"),
    (lambda: tc(x=torch.randn(2, 4, 0, 6)), ValueError, "x has an empty spatial size"),
    (lambda: tc(x=torch.ones(2, 4, 6, 6, dtype=torch.int64)), TypeError, "x must be float32"),
    (lambda: tc(first=torch.randn(3, 4, 1, 1)), ValueError, r"first must be a 2-D tensor \(R_in, C\)"),
    (lambda: tc(core=torch.randn(2, 3, 3)), ValueError, r"core must be a 4-D tensor \(R_out, R_in, kh, kw\)"),
    (lambda: tc(last=torch.randn(5)), ValueError, r"last must be a 2-D tensor \(O, R_out\)"),
    (lambda: tc(first=torch.randn(3, 5)), ValueError, "channel mismatch: x has C = 4 but first has C = 5"),
    (lambda: tc(core=torch.randn(2, 2, 3, 3)), ValueError, "rank mismatch: first has R_in = 3 but core has R_in = 2"),
    (lambda: tc(last=torch.randn(5, 3)), ValueError, "rank mismatch: core has R_out = 2 but last has R_out = 3"),
    (lambda: tc(bias=torch.randn(4)), ValueError, r"bias must be None or a 1-D tensor of shape \(O,\) = \(5,\)"),
    (lambda: tc(first=FIRST.double()), TypeError, "dtype mismatch: x is torch.float32 but first is torch.float64"),
    (lambda: tc(bias=BIAS.double()), TypeError, "dtype mismatch: x is torch.float32 but bias is torch.float64"),
    (lambda: tc(core=CORE.to("meta")), ValueError, "device mismatch: x is on cpu but core is on meta"),
    (lambda: tc(first=torch.randn(0, 4), core=torch.randn(2, 0, 3, 3)), ValueError, "first is empty"),
    (lambda: tc(stride=0), ValueError, "stride must be >= 1"),
    (lambda: tc(padding=(1, -1)), ValueError, "padding must be >= 0"),
    (lambda: tc(dilation=0), ValueError, "dilation must be >= 1"),
    (lambda: tc(stride=1.5), TypeError, "stride must be an int or a pair of ints"),
    (lambda: tc(padding=(1, 1, 1)), TypeError, "padding must be an int or a pair of ints"),
    (lambda: tc(core=torch.randn(2, 3, 7, 7)), ValueError, "kernel too large: core's dilated kernel is 7x7 but x padded is only 6x6"),
    (lambda: tc(dilation=4), ValueError, "kernel too large"),
    (lambda: tc(first=[[1.0]]), TypeError, "first must be a torch.Tensor"),
]


@pytest.mark.parametrize("case", range(len(ERROR_CASES)))
def test_bad_input_errors(case):
    call, exc, match = ERROR_CASES[case]
    with pytest.raises(exc, match=match):
        call()


RAW_CASES = [
    ((X, torch.randn(3, 5), CORE, LAST, BIAS), "channel mismatch: x has C = 4 but first has C = 5"),
    ((X, FIRST, torch.randn(2, 2, 3, 3), LAST, BIAS), "rank mismatch: first has R_in = 3 but core has R_in = 2"),
    ((X, FIRST, CORE, torch.randn(5, 3), BIAS), "rank mismatch: core has R_out = 2 but last has R_out = 3"),
    ((X, FIRST, CORE, LAST, torch.randn(4)), "bias must be None or a 1-D tensor"),
    ((X, FIRST, torch.randn(2, 3, 9, 9), LAST, None), "kernel too large"),
]


@pytest.mark.parametrize("case", range(len(RAW_CASES)))
def test_raw_op_errors(case):
    """The C++ op checks its arguments itself (callers of torch.ops.kdfast.* skip the wrapper)."""
    args, match = RAW_CASES[case]
    with pytest.raises(ValueError, match=match):
        torch.ops.kdfast.tucker_conv2d(*args, [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="stride must be >= 1"):
        torch.ops.kdfast.tucker_conv2d(X, FIRST, CORE, LAST, BIAS, [0, 1], [0, 0], [1, 1])


def test_compile_channels_last_input_matches_eager(path):
    """Strides the fake kernel promises (NCHW-contiguous y) hold for a channels_last x on both paths."""
    torch._dynamo.reset()
    inputs, kwargs = _args((2, 4, 7, 6, 3, 2, 5, (3, 3), 1, 1, 1), layout="channels_last", requires_grad=True)

    def block(x, first, core, last, bias):
        y = ops.tucker_conv2d(x, first, core, last, bias, padding=1)
        return (y * torch.arange(y.numel(), dtype=y.dtype).view(y.shape)).sum()

    eager = block(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    out_grads = torch.autograd.grad(out, inputs)
    torch.testing.assert_close(out, eager, rtol=1e-10, atol=1e-10)
    for a, b in zip(out_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
