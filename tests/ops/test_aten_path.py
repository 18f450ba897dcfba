"""The ATen path (AtenPrimitives and csrc/ops/aten/), which CUDA runs by default, against the float64
reference on CPU: KDFAST_CPU_KERNELS=none makes every CPU op run it. Same inputs and checks as the
per-op tests (odd sizes, batch 1, non-contiguous and channels_last maps, gradcheck, opcheck, low
precision), so the code a GPU user gets by default is code this suite has proved."""
import pytest
import torch
from helpers import LAYOUTS, feature_map, grads

from kdfast import info, ops
from kdfast.testing import reference


@pytest.fixture(autouse=True)
def aten_path(monkeypatch):
    monkeypatch.setenv("KDFAST_CPU_KERNELS", "none")
    monkeypatch.delenv("KDFAST_TUCKER_CONV_PATH", raising=False)


def test_every_op_runs_aten_path():
    assert {row["cpu_path_now"] for row in info.kernel_paths()["ops"].values()} == {"aten"}


def _close64(got, want):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------ FSP
FSP_SHAPES = [(1, 3, 5, (7, 7)), (3, 4, 6, (5, 9)), (2, 1, 2, (1, 1))]


@pytest.mark.parametrize("shape", FSP_SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fsp_matches_reference(shape, layout, reduction):
    b, ca, cb, hw = shape
    maps = [feature_map((b, c, *hw), layout=layout, requires_grad=True) for c in (ca, cb, ca, cb)]
    grad_out = torch.randn(b if reduction == "none" else (), dtype=torch.float64)
    out, g = grads(lambda *m: ops.fsp_loss(*m, reduction=reduction), maps, grad_out)
    ref, r = grads(lambda *m: reference.fsp_loss(*m, reduction=reduction), maps, grad_out)
    _close64(out, ref)
    for x, y in zip(g, r):
        _close64(x, y)
    gm = torch.randn(b, ca, cb, dtype=torch.float64)
    out, g = grads(ops.fsp_matrix, maps[:2], gm)
    ref, r = grads(reference.fsp_matrix, maps[:2], gm)
    _close64(out, ref)
    for x, y in zip(g, r):
        _close64(x, y)


def test_fsp_gradcheck_and_opcheck():
    maps = [torch.randn(2, c, 3, 4, dtype=torch.float64, requires_grad=True) for c in (2, 3, 2, 3)]
    assert torch.autograd.gradcheck(lambda *m: ops.fsp_loss(*m, reduction="none"), maps)
    assert torch.autograd.gradcheck(ops.fsp_matrix, maps[:2])
    torch.library.opcheck(torch.ops.kdfast.fsp_loss.default, (*maps, "mean"))


# ------------------------------------------------------------------------------------------ NST
NST_SHAPES = [(1, 3, 5, (7, 7)), (2, 5, 9, (7, 6)), (2, 70, 6, (5, 3)), (2, 7, 3, (1, 1))]
NST_KERNELS = ["linear", "poly_channel", "poly_spatial", "gaussian"]


def _nst(fs, ft, kernel, reduction="mean", sigma=1.0):
    return torch.ops.kdfast.nst_loss(fs, ft, kernel, reduction, sigma)[0]


def _nst_ref(fs, ft, kernel, reduction="mean", sigma=1.0):
    return reference.nst_loss(fs, ft, "poly" if kernel.startswith("poly") else kernel, reduction, sigma)


@pytest.mark.parametrize("shape", NST_SHAPES, ids=str)
@pytest.mark.parametrize("kernel", NST_KERNELS)
def test_nst_matches_reference(shape, kernel):
    b, cs, ct, hw = shape
    fs = feature_map((b, cs, *hw), requires_grad=True)
    ft = feature_map((b, ct, *hw), requires_grad=True)
    grad_out = torch.randn(b, dtype=torch.float64)
    out, g = grads(lambda x, y: _nst(x, y, kernel, "none", 0.7), (fs, ft), grad_out)
    ref, r = grads(lambda x, y: _nst_ref(x, y, kernel, "none", 0.7), (fs, ft), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for x, y in zip(g, r):
        _close64(x, y)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel", NST_KERNELS)
def test_nst_layouts(layout, kernel):
    fs = feature_map((2, 5, 6, 5), layout=layout, requires_grad=True)
    ft = feature_map((2, 4, 6, 5), layout=layout, requires_grad=True)
    one = torch.tensor(1.3, dtype=torch.float64)
    out, g = grads(lambda x, y: _nst(x, y, kernel), (fs, ft), one)
    ref, r = grads(lambda x, y: _nst_ref(x, y, kernel), (fs, ft), one)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for x, y in zip(g, r):
        _close64(x, y)


def test_nst_zero_rows_and_gradcheck():
    fs = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    for kernel in NST_KERNELS:
        assert torch.autograd.gradcheck(lambda x, y: _nst(x, y, kernel, "none", 0.8), (fs, ft))
    torch.library.opcheck(torch.ops.kdfast.nst_loss.default, (fs, ft, "gaussian", "mean", 0.5))
    # A zero row is clamped by the normalisation (not differentiable there: no gradcheck); it must still
    # match the reference's F.normalize.
    zero = fs.detach().clone()
    zero[0, 1] = 0
    zero.requires_grad_()
    one = torch.tensor(1.0, dtype=torch.float64)
    for kernel in NST_KERNELS:
        out, g = grads(lambda x, y: _nst(x, y, kernel, "mean", 0.8), (zero, ft), one)
        ref, r = grads(lambda x, y: _nst_ref(x, y, kernel, "mean", 0.8), (zero, ft), one)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        for a, b in zip(g, r):
            _close64(a, b)


# ------------------------------------------------------------------------------------------ KD
def _logits(b, k, stride_rows=False):
    if stride_rows:  # rows of a wider matrix: row stride 2K, unit column stride (no copy in the op)
        return torch.randn(b, 2 * k, dtype=torch.float64)[:, :k].requires_grad_()
    return torch.randn(b, k, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("b,k", [(1, 1), (3, 10), (5, 257)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("stride_rows", [False, True])
def test_kd_matches_reference(b, k, reduction, stride_rows):
    s, t = _logits(b, k, stride_rows), _logits(b, k, stride_rows)
    y = torch.randint(0, k, (b,))
    y[0] = -100  # an ignored row keeps its KL term
    grad_out = torch.randn(b if reduction == "none" else (), dtype=torch.float64)
    for alpha in (0.4, 1.0):
        kw = dict(temperature=3.0, alpha=alpha, reduction=reduction)
        out, g = grads(lambda a, c: ops.kd_loss(a, c, y, **kw), (s, t), grad_out)
        ref, r = grads(lambda a, c: reference.kd_loss(a, c, y, **kw), (s, t), grad_out)
        _close64(out, ref)
        for x, z in zip(g, r):
            _close64(x, z)


def test_kd_gradcheck_opcheck_and_target_errors():
    s, t = _logits(3, 6), _logits(3, 6)
    y = torch.tensor([1, -100, 5])
    assert torch.autograd.gradcheck(lambda a, b: ops.kd_loss(a, b, y, 2.0, 0.4, reduction="none"), (s, t))
    torch.library.opcheck(torch.ops.kdfast.kd_loss.default, (s, t, y, 4.0, 0.9, True, -100, "mean"))
    with pytest.raises(ValueError, match=r"targets\[1\] = 6 is out of range"):
        ops.kd_loss(s, t, torch.tensor([0, 6, 1]))


# ------------------------------------------------------------------------------------------ low precision
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["fsp", "nst_poly", "nst_gaussian", "kd"])
def test_low_precision_error_within_twice_pytorch(dtype, op):
    """Error vs the float64 result at most 2x that of the reference formula run at the same dtype."""
    if op == "kd":
        inputs64 = [torch.randn(16, 1000, dtype=torch.float64) * 3 for _ in range(2)]  # as tests/ops/test_kd_loss.py
        y = torch.randint(0, 1000, (16,))
        ours = lambda a, b: ops.kd_loss(a, b, y)  # noqa: E731
        ref = lambda a, b: reference.kd_loss(a, b, y)  # noqa: E731
    elif op == "fsp":
        inputs64 = [torch.randn(3, c, 6, 6, dtype=torch.float64) for c in (8, 12, 8, 12)]
        ours, ref = ops.fsp_loss, reference.fsp_loss
    else:
        kernel, sigma = ("poly", None) if op == "nst_poly" else ("gaussian", 0.8)
        inputs64 = [torch.randn(3, c, 6, 5, dtype=torch.float64) for c in (8, 6)]
        ours = lambda a, b: ops.nst_loss(a, b, kernel, sigma=sigma)  # noqa: E731
        ref = lambda a, b: reference.nst_loss(a, b, kernel, sigma=sigma)  # noqa: E731
    low_in = [x.to(dtype) for x in inputs64]
    low_in[0].requires_grad_()
    exact_in = [x.double() for x in low_in]
    exact_in[0] = exact_in[0].detach().requires_grad_()
    one = torch.tensor(1.0)
    exact, (exact_grad,) = grads(ref, exact_in, one.double())
    low, (low_grad,) = grads(ref, low_in, one.to(dtype))
    out, (out_grad,) = grads(ours, low_in, one.to(dtype))
    assert out.dtype == dtype and out_grad.dtype == dtype
    ulp = torch.finfo(dtype).eps
    assert (out.double() - exact).abs() <= 2 * (low.double() - exact).abs() + ulp * exact.abs() + 1e-12
    grad_err = (out_grad.double() - exact_grad).abs().max()
    assert grad_err <= 2 * (low_grad.double() - exact_grad).abs().max() + ulp * exact_grad.abs().max()


# ------------------------------------------------------------------------------------------ Tucker
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tucker_runs_composition(monkeypatch, dtype):
    monkeypatch.setenv("KDFAST_TUCKER_CONV_PATH", "fused")  # would pick the CPU kernel; KDFAST_CPU_KERNELS wins
    x = feature_map((1, 5, 30, 29), dtype=dtype, layout="channels_last", requires_grad=True)
    first = torch.randn(3, 5, dtype=dtype, requires_grad=True)
    core = torch.randn(4, 3, 3, 3, dtype=dtype, requires_grad=True)
    last = torch.randn(6, 4, dtype=dtype, requires_grad=True)
    assert ops.tucker_conv2d_path(x, first, core, last, padding=1) == "composed"
    g = torch.randn(1, 6, 15, 15, dtype=dtype)
    out, gr = grads(lambda *a: ops.tucker_conv2d(*a, stride=2, padding=1), (x, first, core, last), g)
    ref, rr = grads(lambda *a: reference.tucker_conv2d(*a, stride=2, padding=1), (x, first, core, last), g)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(gr, rr):
        torch.testing.assert_close(a, b, **tol)


# ------------------------------------------------------------------------------------------ sparse recoding
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sparse_recoding_matches_reference(dtype, layout):
    shapes = [(1,), (7,), (33, 3, 3, 3), (70001,), (0,)]
    params = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    params[1][0] = 0  # sign(0) = 0 on the inactive branch
    if layout == "channels_last":
        params[2] = params[2].to(memory_format=torch.channels_last)
    grads_ = [torch.randn_like(p) for p in params]
    taus = torch.tensor([0.5, 0.8, 1.0, 0.7, 0.3], dtype=torch.float32)
    ref_grads, ref_taus = [g.clone() for g in grads_], taus.clone()
    kw = dict(boost=2.5, damp=0.3, shrink=0.01, tau_rate=0.2)
    ops.sparse_recoding_(grads_, params, taus, **kw)
    reference.sparse_recoding_(ref_grads, params, ref_taus, **kw)
    for g, r in zip(grads_, ref_grads):
        assert g.dtype == dtype and g.stride() == r.stride()
        torch.testing.assert_close(g, r, rtol=torch.finfo(dtype).eps, atol=1e-6 if dtype != torch.float64 else 1e-15)
    torch.testing.assert_close(taus, ref_taus, rtol=1e-6, atol=0)
    assert taus[4] == 0.3  # an empty tensor keeps its threshold


# ------------------------------------------------------------------------------------------ both paths agree
def test_aten_and_cpu_kernels_agree(monkeypatch):
    fs, ft = torch.randn(3, 70, 4, 5, dtype=torch.float64), torch.randn(3, 9, 4, 5, dtype=torch.float64)
    s, t, y = torch.randn(4, 33, dtype=torch.float64), torch.randn(4, 33, dtype=torch.float64), torch.randint(0, 33, (4,))
    maps = [torch.randn(2, c, 5, 5, dtype=torch.float64) for c in (4, 6, 4, 6)]

    def run():
        out = [ops.kd_loss(s, t, y, reduction="none"), ops.fsp_loss(*maps, reduction="none")]
        out += [torch.ops.kdfast.nst_loss(fs, ft, k, "none", 0.3)[0] for k in NST_KERNELS]
        return out

    aten = run()
    monkeypatch.setenv("KDFAST_CPU_KERNELS", "all")
    native = run()
    for a, b in zip(aten, native):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
