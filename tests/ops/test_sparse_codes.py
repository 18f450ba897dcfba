"""kdfast.ops.sparse_codes (SRM's top-k sigmoid codes) against the float64 oracle, on both paths (the
CPU kernel and the ATen formulation that CUDA runs by default), ties, saturation, gradcheck, opcheck,
torch.compile and bad input."""
import re

import pytest
import torch
from conftest import DEVICES
from helpers import LAYOUTS, feature_map

from kdfast import ops
from kdfast.testing import reference

# (N, D, H, W, K, k): batch 1, 1x1 maps, odd sizes, k = 1, k = K, k > 32 (the partial-sort branch),
# a K wide enough that a forward tile holds few pixels, and maps larger than one tile.
SHAPES = [
    (1, 3, 1, 1, 5, 1),
    (2, 5, 3, 7, 11, 3),
    (3, 16, 8, 8, 32, 5),
    (1, 7, 13, 5, 14, 14),
    (2, 4, 9, 9, 600, 40),
    (2, 6, 23, 31, 12, 2),
]
PATHS = ["kernel", "aten"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    # kernel: the backend's hand-written kernel (CUDA: forced on, it is unverified); aten: the ATen path
    # (csrc/ops/kernel_paths.h), the CUDA default.
    if request.param == "kernel":
        monkeypatch.delenv("KDFAST_CPU_KERNELS", raising=False)
        monkeypatch.setenv("KDFAST_CUDA_KERNELS", "sparse_codes")
    else:
        monkeypatch.setenv("KDFAST_CPU_KERNELS", "none")
        monkeypatch.setenv("KDFAST_CUDA_KERNELS", "none")
    return request.param


def _params(d, kk, dtype=torch.float64, device="cpu", requires_grad=True, scale=None):
    scale = 1.0 / d**0.5 if scale is None else scale
    c = (scale * torch.randn(d, kk, dtype=dtype, device=device)).requires_grad_(requires_grad)
    b = torch.randn(1, dtype=dtype, device=device).requires_grad_(requires_grad)
    return c, b


def _compare(x, c, b, k, rtol=1e-10, atol=1e-12):
    values, indices = ops.sparse_codes(x, c, b, k)
    ref_values, ref_indices = reference.sparse_codes(x, c, b, k)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    assert values.shape == (x.shape[0], x.shape[2], x.shape[3], k) == indices.shape
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values, rtol=rtol, atol=atol)
    grad_out = torch.randn_like(values)
    inputs = [t for t in (x, c, b) if t.requires_grad]
    got = torch.autograd.grad(values, inputs, grad_out)
    expected = torch.autograd.grad(ref_values, inputs, grad_out)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_float64(path, device, shape, layout):
    n, d, h, w, kk, k = shape
    x = feature_map((n, d, h, w), device=device, layout=layout, requires_grad=True)
    c, b = _params(d, kk, device=device)
    _compare(x, c, b, k)


def test_gradient_of_x_keeps_its_layout():
    x = feature_map((2, 6, 5, 5), layout="channels_last", requires_grad=True)
    c, b = _params(6, 12)
    values, _ = ops.sparse_codes(x, c, b, 3)
    (gx,) = torch.autograd.grad(values.sum(), x)
    assert gx.is_contiguous(memory_format=torch.channels_last)


def test_non_contiguous_dictionary_and_scalar_shaped_bias(path):
    x = feature_map((2, 5, 4, 3), requires_grad=True)
    c = torch.randn(13, 5, dtype=torch.float64).t().requires_grad_()  # (5, 13), transposed storage
    b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)    # 0-D: one element is enough
    _compare(x, c, b, 4)
    (gb,) = torch.autograd.grad(ops.sparse_codes(x, c, b, 4)[0].sum(), b)
    assert gb.shape == b.shape


def test_gradients_only_where_needed(path):
    x = feature_map((2, 4, 3, 3), requires_grad=True)
    c, b = _params(4, 9, requires_grad=False)
    _compare(x, c, b, 2)
    x2 = feature_map((2, 4, 3, 3))
    c2, b2 = _params(4, 9)
    _compare(x2, c2, b2, 2)


def test_ties_go_to_the_lower_codeword(path):
    """Identical codewords give exactly equal codes (integer data: every sum is exact): the lower
    index wins, at the k-th place too, and exactly k entries are kept."""
    torch.manual_seed(0)
    x = torch.randint(-3, 4, (2, 4, 3, 5), dtype=torch.float64)
    base = torch.randint(-2, 3, (4, 6), dtype=torch.float64)
    c = torch.cat([base, base, base[:, :3]], dim=1)  # codeword j, j + 6 (and j + 12 for j < 3) are equal
    b = torch.zeros(1, dtype=torch.float64)
    for k in (1, 2, 5, 7, 15):
        values, indices = ops.sparse_codes(x, c, b, k)
        ref_values, ref_indices = reference.sparse_codes(x, c, b, k)
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
        z = torch.einsum("ndhw,dk->nhwk", x, c)
        # among equal pre-activations the selected indices are ascending
        zv = z.gather(-1, indices)
        same = zv[..., 1:] == zv[..., :-1]
        assert torch.all(indices[..., 1:][same] > indices[..., :-1][same])


def test_saturated_codes_are_ranked_by_pre_activation(path):
    """sigmoid(z) rounds to 1.0 in float32 for z > ~17: the values tie, the ranking does not."""
    x = torch.ones(1, 1, 1, 1)
    c = torch.tensor([[20.0, 40.0, 30.0, -5.0]])
    b = torch.zeros(1)
    values, indices = ops.sparse_codes(x, c, b, 3)
    assert indices.flatten().tolist() == [1, 2, 0]
    assert values.flatten().tolist() == [1.0, 1.0, 1.0]


def test_float32_matches_reference(path):
    x = feature_map((3, 32, 7, 9), dtype=torch.float32, layout="channels_last", requires_grad=True)
    c, b = _params(32, 64, dtype=torch.float32)
    values, indices = ops.sparse_codes(x, c, b, 3)
    ref_values, ref_indices = reference.sparse_codes(x.double(), c.double(), b.double(), 3)
    assert (indices == ref_indices).float().mean() > 0.999  # float32 rounding may swap near-ties
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_float32(path, dtype):
    """The k largest codes of the dtype-rounded inputs, within the dtype's rounding of the float64
    values (the sorted top-k values are continuous in the inputs even where near-ties swap indices);
    gradients within twice the error of the same formula computed by PyTorch at that dtype."""
    x = feature_map((2, 64, 6, 6), dtype=dtype, requires_grad=True)
    c, b = _params(64, 128, dtype=dtype)
    values, _ = ops.sparse_codes(x, c, b, 4)
    assert values.dtype == dtype
    exact_in = [t.detach().double().requires_grad_() for t in (x, c, b)]
    exact, _ = reference.sparse_codes(*exact_in, 4)
    eps = torch.finfo(dtype).eps
    assert (values.double() - exact).abs().max() <= eps
    g = torch.randn_like(exact)
    got = torch.autograd.grad(values, (x, c, b), g.to(dtype))
    exact_grads = torch.autograd.grad(exact, exact_in, g)
    # PyTorch at the same dtype, on the float64 selection (so only rounding differs)
    _, idx = reference.sparse_codes(*exact_in, 4)
    low_in = [t.detach().requires_grad_() for t in (x, c, b)]
    s_low = torch.sigmoid(torch.einsum("ndhw,dk->nhwk", low_in[0], low_in[1]) + low_in[2]).gather(-1, idx)
    low = torch.autograd.grad(s_low, low_in, g.to(dtype))
    for a, e, lo in zip(got, exact_grads, low):
        err = (a.double() - e).abs().max()
        assert err <= 2 * (lo.double() - e).abs().max() + eps * e.abs().max()


def test_gradcheck(path):
    x = feature_map((2, 3, 3, 4), requires_grad=True)
    c, b = _params(3, 7)
    assert torch.autograd.gradcheck(lambda *a: ops.sparse_codes(*a, 3)[0], (x, c, b))
    xs = feature_map((1, 5, 2, 3), layout="strided", requires_grad=True)
    c2, b2 = _params(5, 40)
    assert torch.autograd.gradcheck(lambda *a: ops.sparse_codes(*a, 35)[0], (xs, c2, b2))


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(requires_grad):
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=requires_grad)
    c = torch.randn(5, 9, dtype=torch.float64, requires_grad=requires_grad)
    b = torch.randn(1, dtype=torch.float64, requires_grad=requires_grad)
    op = torch.ops.kdfast.sparse_codes.default
    torch.library.opcheck(op, (x, c, b, 3))
    torch.library.opcheck(op, (x.to(memory_format=torch.channels_last), c, b, 9))


def test_saves_only_the_indices():
    """Beyond the inputs, forward keeps the (N, H, W, k) int64 indices: never anything K-wide."""
    x = feature_map((2, 8, 5, 5), requires_grad=True)
    c, b = _params(8, 300)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        values, indices = ops.sparse_codes(x, c, b, 4)
    extra = [t for t in saved if not any(t is m for m in (x, c, b))]
    assert sum(t.numel() for t in extra) == 2 * 5 * 5 * 4
    assert all(t.dtype == torch.int64 for t in extra)


def test_gradients_do_not_depend_on_the_thread_count():
    x = feature_map((4, 16, 9, 9), dtype=torch.float32, requires_grad=True)
    c, b = _params(16, 32, dtype=torch.float32)
    g = torch.randn(4, 9, 9, 3)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            values, _ = ops.sparse_codes(x, c, b, 3)
            results.append((values,) + torch.autograd.grad(values, (x, c, b), g))
    finally:
        torch.set_num_threads(threads)
    for a, e in zip(*results):
        assert torch.equal(a, e)


def test_double_backward_is_refused():
    x = feature_map((1, 3, 2, 2), requires_grad=True)
    c, b = _params(3, 5)
    (gx,) = torch.autograd.grad(ops.sparse_codes(x, c, b, 2)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through _sparse_codes_backward is not supported"):
        gx.sum().backward()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(backend):
    torch._dynamo.reset()

    def fn(x, c, b):
        values, indices = ops.sparse_codes(x, c, b, 3)
        return values.square().sum() + indices.sum() * 0.0

    x = torch.randn(2, 6, 5, 4, requires_grad=True)
    c, b = _params(6, 14, dtype=torch.float32)
    eager = fn(x, c, b)
    eager_grads = torch.autograd.grad(eager, (x, c, b))
    out = torch.compile(fn, fullgraph=True, backend=backend)(x, c, b)
    out_grads = torch.autograd.grad(out, (x, c, b))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for a, e in zip(out_grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


X = torch.randn(2, 4, 3, 3)
C = torch.randn(4, 10)
B = torch.zeros(1)

CASES = [
    (lambda: ops.sparse_codes(torch.randn(2, 4, 3), C, B, 2), ValueError, "x must be a 4-D feature map"),
    (lambda: ops.sparse_codes(X, torch.randn(4, 10, 1), B, 2), ValueError, "dictionary must be a 2-D tensor (D, K)"),
    (lambda: ops.sparse_codes(X, torch.randn(5, 10), B, 2), ValueError, "channel mismatch: x has D = 4 channels"),
    (lambda: ops.sparse_codes(X, torch.randn(4, 0), B, 1), ValueError, "dictionary has no codewords"),
    (lambda: ops.sparse_codes(X, C, torch.zeros(2), 2), ValueError, "bias must be a 1-element tensor"),
    (lambda: ops.sparse_codes(X, C, B, 0), ValueError, "k must be in 1..K = 1..10, got 0"),
    (lambda: ops.sparse_codes(X, C, B, 11), ValueError, "k must be in 1..K = 1..10, got 11"),
    (lambda: ops.sparse_codes(X, C, B, 2.0), TypeError, "k must be an int"),
    (lambda: ops.sparse_codes(X, C.double(), B, 2), TypeError, "dtype mismatch: x is torch.float32 but dictionary"),
    (lambda: ops.sparse_codes(X, C, B.double(), 2), TypeError, "dtype mismatch: x is torch.float32 but bias"),
    (lambda: ops.sparse_codes(X, C.to("meta"), B, 2), ValueError, "device mismatch: x is on cpu but dictionary"),
    (lambda: ops.sparse_codes(X, C, B.to("meta"), 2), ValueError, "device mismatch: x is on cpu but bias"),
    (lambda: ops.sparse_codes(X.long(), C.long(), B.long(), 2), TypeError, "x must be float32"),
    (lambda: ops.sparse_codes(torch.randn(0, 4, 3, 3), C, B, 2), ValueError, "x has an empty batch"),
    (lambda: ops.sparse_codes(X, [[1.0]], B, 2), TypeError, "dictionary must be a torch.Tensor"),
]


@pytest.mark.parametrize("call,exc,fragment", CASES, ids=[c[2][:40] for c in CASES])
def test_python_api_errors(call, exc, fragment):
    with pytest.raises(exc, match=re.escape(fragment)):
        call()


RAW = torch.ops.kdfast.sparse_codes
IDX = torch.zeros(2, 3, 3, 2, dtype=torch.int64)
RAW_CASES = [
    (lambda: RAW(X, C, B, 0), ValueError, "k must be in 1..K = 1..10, got 0"),
    (lambda: RAW(X, torch.randn(5, 10), B, 2), ValueError, "channel mismatch"),
    (lambda: RAW(X, C, torch.zeros(1, 2), 2), ValueError, "bias must be a 1-element tensor"),
    (lambda: RAW(X, C.half(), B, 2), TypeError, "dtype mismatch: x is Float but dictionary is Half"),
    (lambda: torch.ops.kdfast._sparse_codes_backward(torch.zeros(2, 3, 3, 2), X, C, B, IDX.int(), [True] * 3),
     TypeError, "indices must be int64"),
    (lambda: torch.ops.kdfast._sparse_codes_backward(torch.zeros(2, 3, 3, 2), X, C, B, IDX[:1], [True] * 3),
     ValueError, "indices must be the (N, H, W, k) codeword indices"),
    (lambda: torch.ops.kdfast._sparse_codes_backward(torch.zeros(2, 3, 3, 2), X, C, B, IDX + 10, [True] * 3),
     ValueError, "indices must be codeword indices in [0, 10)"),
]


@pytest.mark.parametrize("call,exc,fragment", RAW_CASES, ids=[c[2][:40] for c in RAW_CASES])
def test_raw_op_errors(call, exc, fragment):
    with pytest.raises(exc, match=re.escape(fragment)):
        call()


def test_compile_reports_bad_input_clearly():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, c, b: ops.sparse_codes(x, c, b, 20)[0], fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=re.escape("k must be in 1..K = 1..10")):
        compiled(X, C, B)
