"""The fused CPU Tucker kernel in float32 at the shapes it is chosen for (k 1/3/5/7, stride 1/2, thin
CIFAR channel counts, batch 1 and more, NCHW / channels_last / strided inputs), and the inference
epilogue of kdfast.ops.tucker_conv2d (scale, shift, residual, relu) against the float64 oracle,
with gradients, gradcheck, opcheck, torch.compile and bad-input errors."""
import pytest
import torch
from conftest import DEVICES
from helpers import LAYOUTS, TUCKER_SHAPES as SHAPES, feature_map

from kdfast import ops
from kdfast.testing import reference

# (N, C, H, W, R_in, R_out, O, (kh, kw), stride, padding, dilation), as helpers.TUCKER_SHAPES.
# Thin ResNet / CIFAR shapes in float32 (the case the fused kernel is for), with every kernel size.
THIN = [
    (8, 16, 32, 32, 8, 8, 16, (3, 3), 1, 1, 1),
    (3, 16, 32, 32, 4, 8, 32, (3, 3), 2, 1, 1),
    (1, 32, 16, 16, 16, 16, 32, (3, 3), 1, 1, 1),
    (2, 64, 8, 8, 32, 16, 64, (3, 3), 1, 1, 1),
    (2, 32, 16, 16, 8, 16, 64, (3, 3), 2, 1, 1),
    (2, 24, 15, 17, 12, 9, 20, (5, 5), 1, 2, 1),
    (1, 16, 20, 20, 8, 8, 16, (7, 7), 2, 3, 1),
    (2, 16, 13, 13, 8, 8, 24, (1, 1), 1, 0, 1),
    (1, 16, 33, 31, 5, 7, 13, (3, 3), 1, 1, 1),
]
EPILOGUES = {
    "none": {},
    "bn": {"scale": True, "shift": True},
    "bn-relu": {"scale": True, "shift": True, "relu": True},
    "residual-relu": {"residual": True, "relu": True},
    "all": {"scale": True, "shift": True, "residual": True, "relu": True},
    "shift": {"shift": True},
}


def _args(shape, dtype=torch.float64, layout="contiguous", bias=True, epilogue="all", requires_grad=False,
          device="cpu"):
    n, c, h, w, r_in, r_out, o, (kh, kw), stride, padding, dilation = shape
    kwargs = dict(stride=stride, padding=padding, dilation=dilation)
    x = feature_map((n, c, h, w), dtype, device, layout)
    g = dict(dtype=dtype, device=device)
    params = [torch.randn(r_in, c, **g), torch.randn(r_out, r_in, kh, kw, **g), torch.randn(o, r_out, **g),
              torch.randn(o, **g) if bias else None]
    spec = EPILOGUES[epilogue]
    ref = reference.tucker_conv2d(x, *params, **kwargs)
    epi = {}
    if spec.get("scale"):
        epi["scale"] = torch.rand(o, **g) + 0.5
    if spec.get("shift"):
        epi["shift"] = torch.randn(o, **g)
    if spec.get("residual"):
        epi["residual"] = feature_map(tuple(ref.shape), dtype, device, layout)
    if spec.get("relu"):
        epi["relu"] = True
    if requires_grad:
        for t in (x, *params, epi.get("scale"), epi.get("shift"), epi.get("residual")):
            if t is not None:
                t.requires_grad_(True)
    return (x, *params), kwargs, epi


@pytest.fixture(params=["fused", "composed"])
def path(request, monkeypatch):
    monkeypatch.setenv("KDFAST_TUCKER_CONV_PATH", request.param)
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_epilogue_matches_reference_float64(shape, epilogue, path):
    inputs, kwargs, epi = _args(shape, epilogue=epilogue)
    assert ops.tucker_conv2d_path(*inputs[:4], **kwargs) == path
    with torch.no_grad():
        out = ops.tucker_conv2d(*inputs, **kwargs, **epi)
    ref = reference.tucker_conv2d(*inputs, **kwargs, **epi)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", THIN, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("epilogue", ["none", "all"])
def test_fused_float32_thin_shapes(shape, layout, epilogue, monkeypatch):
    # the fused kernel's float32 accuracy, forced: which path the default picks is tests/ops/test_tucker_autotune.py's
    monkeypatch.setenv("KDFAST_TUCKER_CONV_PATH", "fused")
    inputs, kwargs, epi = _args(shape, dtype=torch.float32, layout=layout, epilogue=epilogue)
    assert ops.tucker_conv2d_path(*inputs[:4], **kwargs) == "fused"
    with torch.no_grad():
        out = ops.tucker_conv2d(*inputs, **kwargs, **epi)
    exact = reference.tucker_conv2d(*[t.double() for t in inputs], **kwargs,
                                    **{k: (v.double() if torch.is_tensor(v) else v) for k, v in epi.items()})
    scale = exact.abs().max().item()
    torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_any_thread_count_and_batch_one(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1, 5):
            inputs, kwargs, epi = _args((n, 8, 23, 19, 4, 6, 8, (3, 3), 1, 1, 1))
            torch.testing.assert_close(ops.tucker_conv2d(*inputs, **kwargs, **epi),
                                       reference.tucker_conv2d(*inputs, **kwargs, **epi), rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(previous)


def test_relu_keeps_nan_like_torch(path):
    inputs, kwargs, epi = _args((1, 3, 5, 5, 2, 2, 3, (3, 3), 1, 1, 1), epilogue="bn-relu")
    inputs[0][0, :, 2, 2] = float("nan")
    out = ops.tucker_conv2d(*inputs, **kwargs, **epi)
    ref = reference.tucker_conv2d(*inputs, **kwargs, **epi)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, equal_nan=True)
    assert out.isnan().any()


@pytest.mark.parametrize("save_intermediates", [None, False])
def test_epilogue_gradients_match_reference(save_intermediates, path):
    inputs, kwargs, epi = _args((2, 5, 9, 8, 3, 4, 6, (3, 3), 2, 1, 1), requires_grad=True)
    out = ops.tucker_conv2d(*inputs, **kwargs, **epi, save_intermediates=save_intermediates)
    ref = reference.tucker_conv2d(*inputs, **kwargs, **epi)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    wrt = [t for t in (*inputs, epi["scale"], epi["shift"], epi["residual"]) if t is not None]
    grad_out = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, wrt, grad_out), torch.autograd.grad(ref, wrt, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_epilogue_gradcheck(path):
    inputs, kwargs, epi = _args((2, 2, 4, 3, 2, 2, 2, (3, 3), 2, 1, 1), requires_grad=True)
    epi.pop("relu")  # relu's kink makes finite differences unreliable; covered by the test above

    def fn(x, first, core, last, bias, scale, shift, residual):
        return ops.tucker_conv2d(x, first, core, last, bias, **kwargs, scale=scale, shift=shift, residual=residual)

    assert torch.autograd.gradcheck(fn, (*inputs, epi["scale"], epi["shift"], epi["residual"]))


def test_raw_op_gradcheck_with_epilogue():
    """The op itself (C++ autograd kernel) differentiates its epilogue."""
    inputs, kwargs, epi = _args((1, 2, 4, 4, 2, 2, 2, (3, 3), 1, 1, 1), requires_grad=True)

    def fn(x, first, core, last, bias, scale, shift, residual):
        return torch.ops.kdfast.tucker_conv2d(x, first, core, last, bias, [1, 1], [1, 1], [1, 1], scale, shift,
                                              residual, False)

    assert torch.autograd.gradcheck(fn, (*inputs, epi["scale"], epi["shift"], epi["residual"]))


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("epilogue", ["all", "residual-relu", "shift"])
def test_opcheck_with_epilogue(requires_grad, epilogue):
    inputs, kwargs, epi = _args((2, 4, 6, 5, 3, 2, 3, (3, 3), 2, 1, 1), epilogue=epilogue,
                                requires_grad=requires_grad)
    args = (*inputs, [2, 2], [1, 1], [1, 1], epi.get("scale"), epi.get("shift"), epi.get("residual"),
            epi.get("relu", False))
    torch.library.opcheck(torch.ops.kdfast.tucker_conv2d.default, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_with_epilogue_matches_eager(backend):
    torch._dynamo.reset()
    inputs, kwargs, epi = _args((2, 4, 8, 7, 3, 2, 5, (3, 3), 1, 1, 1), dtype=torch.float32)

    def block(x, first, core, last, bias, scale, shift, residual):
        return ops.tucker_conv2d(x, first, core, last, bias, padding=1, scale=scale, shift=shift, residual=residual,
                                 relu=True)

    args = (*inputs, epi["scale"], epi["shift"], epi["residual"])
    with torch.no_grad():
        eager = block(*args)
        out = torch.compile(block, fullgraph=True, backend=backend)(*args)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_epilogue_on_every_device(device):
    inputs, kwargs, epi = _args((2, 5, 9, 8, 3, 4, 6, (3, 3), 1, 1, 1), device=device)
    torch.testing.assert_close(ops.tucker_conv2d(*inputs, **kwargs, **epi),
                               reference.tucker_conv2d(*inputs, **kwargs, **epi), rtol=1e-10, atol=1e-10)


def test_cpu_bfloat16_epilogue_goes_through_the_composition():
    inputs, kwargs, epi = _args((2, 8, 9, 7, 4, 4, 6, (3, 3), 2, 1, 1), dtype=torch.bfloat16)
    assert ops.tucker_conv2d_path(*inputs[:4], **kwargs) == "composed"
    out = ops.tucker_conv2d(*inputs, **kwargs, **epi)
    torch.testing.assert_close(out, reference.tucker_conv2d(*inputs, **kwargs, **epi), rtol=0, atol=0)


# ------------------------------------------------------------------------------- errors
X = torch.randn(2, 4, 6, 6)
FIRST, CORE, LAST, BIAS = torch.randn(3, 4), torch.randn(2, 3, 3, 3), torch.randn(5, 2), torch.randn(5)


def tc(**kw):
    return ops.tucker_conv2d(X, FIRST, CORE, LAST, BIAS, padding=1, **kw)


ERROR_CASES = [
    (lambda: tc(scale=torch.randn(4)), ValueError, r"scale must be None or a 1-D tensor of shape \(O,\) = \(5,\)"),
    (lambda: tc(shift=torch.randn(5, 1)), ValueError, r"shift must be None or a 1-D tensor of shape \(O,\)"),
    (lambda: tc(scale=torch.randn(5).double()), TypeError, "dtype mismatch: x is torch.float32 but scale is"),
    (lambda: tc(residual=torch.randn(2, 5, 6)), ValueError,
     r"residual must be None or a tensor of the output's shape \(N, O, H_out, W_out\) = \(2, 5, 6, 6\)"),
    (lambda: tc(residual=torch.randn(5, 1, 1)), ValueError, "residual must be None or a tensor of the output's shape"),
    (lambda: tc(residual=torch.randn(2, 5, 6, 6).double()), TypeError, "dtype mismatch: x is torch.float32 but residual"),
    (lambda: tc(shift=[1.0] * 5), TypeError, "shift must be None or a torch.Tensor"),
    (lambda: tc(relu=1), TypeError, "relu must be a bool"),
]


@pytest.mark.parametrize("case", range(len(ERROR_CASES)))
def test_bad_epilogue_errors(case):
    call, exc, match = ERROR_CASES[case]
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("requires_grad", [False, True])
def test_raw_op_checks_epilogue(requires_grad):
    """The C++ op (and its autograd kernel, which would otherwise broadcast) checks the epilogue itself."""
    x = X.clone().requires_grad_(requires_grad)
    with pytest.raises(ValueError, match="residual must be None or a tensor of the output's shape"):
        torch.ops.kdfast.tucker_conv2d(x, FIRST, CORE, LAST, BIAS, [1, 1], [1, 1], [1, 1], None, None,
                                       torch.randn(5, 1, 1), False)
    with pytest.raises(ValueError, match="scale must be None or a 1-D tensor"):
        torch.ops.kdfast.tucker_conv2d(x, FIRST, CORE, LAST, BIAS, [1, 1], [1, 1], [1, 1], torch.randn(3), None,
                                       None, False)
