"""kdfast.ops.kd_loss against the float64 reference, torch's own KL composition, gradcheck, opcheck,
torch.compile and bad input."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from helpers import grads

from kdfast import ops
from kdfast.testing import reference

# (B, K): batch 1, odd K, K = 1, K smaller and larger than a vector, a 32k-wide row.
SHAPES = [(1, 10), (3, 1), (4, 7), (5, 33), (2, 1001), (2, 32768)]
ALPHAS = [0.0, 0.5, 1.0]
TEMPERATURES = [1.0, 4.0]
REDUCTIONS = ["mean", "sum", "none"]


def _logits(b, k, dtype=torch.float64, device="cpu", layout="contiguous", scale=3.0, requires_grad=True):
    if layout == "strided":  # every other column of a wider matrix
        x = (scale * torch.randn(b, 2 * k, dtype=dtype, device=device))[:, ::2]
    elif layout == "transposed":  # column-major: rows are not unit-stride
        x = (scale * torch.randn(k, b, dtype=dtype, device=device)).t()
    else:
        x = scale * torch.randn(b, k, dtype=dtype, device=device)
    return x.requires_grad_(requires_grad)


def _targets(b, k, device="cpu", ignore_first=False):
    y = torch.randint(0, k, (b,), device=device)
    if ignore_first:
        y[0] = -100
    return y


def _compare(s, t, y, grad_out, rtol=1e-10, atol=1e-12, **kw):
    inputs = [x for x in (s, t)]
    out, g = grads(lambda a, b: ops.kd_loss(a, b, y, **kw), inputs, grad_out)
    ref, r = grads(lambda a, b: reference.kd_loss(a, b, y, **kw), inputs, grad_out)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_matches_reference_float64(device, shape, alpha, temperature):
    b, k = shape
    s, t = _logits(b, k, device=device), _logits(b, k, device=device)
    y = _targets(b, k, device, ignore_first=b > 1)
    _compare(s, t, y, torch.tensor(0.7, dtype=torch.float64, device=device), temperature=temperature, alpha=alpha)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("t2_scale", [True, False])
def test_reductions_and_t2_scale(device, reduction, t2_scale):
    s, t = _logits(6, 13, device=device), _logits(6, 13, device=device)
    y = _targets(6, 13, device, ignore_first=True)
    grad_out = torch.randn(6 if reduction == "none" else (), dtype=torch.float64, device=device)
    _compare(s, t, y, grad_out, alpha=0.3, temperature=2.5, t2_scale=t2_scale, reduction=reduction)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_non_contiguous_logits(layout):
    s, t = _logits(5, 37, layout=layout), _logits(5, 37, layout=layout)
    assert not s.is_contiguous()
    _compare(s, t, _targets(5, 37), torch.tensor(1.3, dtype=torch.float64), alpha=0.5)


def test_against_torch_kl_div_composition():
    """alpha = 1 equals torch's own F.kl_div(log_softmax, log_softmax, log_target=True) * T^2 (batchmean);
    alpha = 0 equals F.cross_entropy (mean over non-ignored rows); independent of kdfast.testing.reference."""
    s, t = _logits(7, 19), _logits(7, 19)
    y = _targets(7, 19, ignore_first=True)
    T = 4.0
    kl = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
    torch.testing.assert_close(ops.kd_loss(s, t, None, T, 1.0), kl * T * T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ops.kd_loss(s, t, y, T, 0.0), F.cross_entropy(s, y), rtol=1e-12, atol=1e-14)
    mixed = 0.25 * F.cross_entropy(s, y) + 0.75 * T * T * kl
    torch.testing.assert_close(ops.kd_loss(s, t, y, T, 0.75), mixed, rtol=1e-12, atol=1e-14)
    (gs,) = torch.autograd.grad(ops.kd_loss(s, t, y, T, 0.75), s)
    (rs,) = torch.autograd.grad(mixed, s)
    torch.testing.assert_close(gs, rs, rtol=1e-10, atol=1e-13)


def test_gradient_formula():
    """d/dz_s of alpha T^2 KL (batch mean) is alpha T (softmax(z_s/T) - softmax(z_t/T)) / B, and of the
    CE term (softmax(z_s) - onehot) / B."""
    b, k, T, alpha = 4, 9, 3.0, 0.6
    s, t = _logits(b, k), _logits(b, k, requires_grad=False)
    y = _targets(b, k)
    (g,) = torch.autograd.grad(ops.kd_loss(s, t, y, T, alpha), s)
    expected = alpha * T * (torch.softmax(s / T, 1) - torch.softmax(t / T, 1)) / b
    expected += (1 - alpha) * (torch.softmax(s, 1) - F.one_hot(y, k)) / b
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-13)


def test_identical_logits_give_zero_kl():
    s = _logits(3, 50, requires_grad=False)
    torch.testing.assert_close(ops.kd_loss(s, s.clone(), None, 4.0, 1.0, reduction="none"),
                               torch.zeros(3, dtype=s.dtype), rtol=0, atol=1e-13)


def test_large_logits_are_stable():
    s, t = _logits(3, 100, scale=1e4), _logits(3, 100, scale=1e4)
    y = _targets(3, 100)
    out = ops.kd_loss(s, t, y, 1.0, 0.5)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, reference.kd_loss(s, t, y, 1.0, 0.5), rtol=1e-9, atol=1e-6)


def test_all_rows_ignored_gives_kl_only():
    s, t = _logits(3, 5), _logits(3, 5)
    y = torch.full((3,), -100)
    torch.testing.assert_close(ops.kd_loss(s, t, y, 2.0, 0.4), 0.4 * ops.kd_loss(s, t, None, 2.0, 1.0))


def test_custom_ignore_index():
    s, t = _logits(4, 6), _logits(4, 6)
    y = torch.tensor([1, 5, 0, 2])
    out = ops.kd_loss(s, t, y, 2.0, 0.0, ignore_index=5)
    torch.testing.assert_close(out, F.cross_entropy(s, y, ignore_index=5))


def test_teacher_gradient_and_none_when_not_required():
    s, t = _logits(3, 8), _logits(3, 8)
    _compare(s, t, _targets(3, 8), torch.tensor(1.0, dtype=torch.float64), alpha=0.5, temperature=2.0)
    s2, t2 = _logits(3, 8), _logits(3, 8, requires_grad=False)
    ops.kd_loss(s2, t2, _targets(3, 8)).backward()
    assert s2.grad is not None and t2.grad is None


def test_gradcheck():
    s, t = _logits(3, 6, scale=1.0), _logits(3, 6, scale=1.0)
    y = torch.tensor([2, -100, 5])
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda a, b: ops.kd_loss(a, b, y, 2.0, 0.4, reduction=reduction), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: ops.kd_loss(a, b, None, 3.0, 1.0, t2_scale=False), (s, t))


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(requires_grad):
    s = torch.randn(4, 7, dtype=torch.float64, requires_grad=requires_grad)
    t = torch.randn(4, 7, dtype=torch.float64, requires_grad=requires_grad)
    y = torch.tensor([0, 6, -100, 3])
    op = torch.ops.kdfast.kd_loss.default
    for reduction in REDUCTIONS:
        torch.library.opcheck(op, (s, t, y, 4.0, 0.9, True, -100, reduction))
    torch.library.opcheck(op, (s, t, None, 2.0, 1.0, False, -100, "mean"))


def test_saves_only_row_statistics():
    """Beyond the inputs, forward keeps B x 5 statistics: never a (B, K) softmax."""
    s, t = _logits(4, 300), _logits(4, 300, requires_grad=False)
    y = _targets(4, 300)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        ops.kd_loss(s, t, y)
    extra = [x for x in saved if not any(x is m for m in (s, t, y))]
    assert sum(x.numel() for x in extra) == 4 * 5


def test_double_backward_is_refused():
    s, t = _logits(2, 5), _logits(2, 5, requires_grad=False)
    (g,) = torch.autograd.grad(ops.kd_loss(s, t, None, 2.0, 1.0), s, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through _kd_loss_backward is not supported"):
        g.sum().backward()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(backend):
    torch._dynamo.reset()

    def loss_fn(s, t, y):
        return ops.kd_loss(s, t, y, 4.0, 0.9) + ops.kd_loss(s, t, None, 2.0, 1.0, t2_scale=False, reduction="sum")

    s, t, y = torch.randn(6, 11, requires_grad=True), torch.randn(6, 11), torch.randint(0, 11, (6,))
    eager = loss_fn(s, t, y)
    (eager_grad,) = torch.autograd.grad(eager, s)
    out = torch.compile(loss_fn, fullgraph=True, backend=backend)(s, t, y)
    (out_grad,) = torch.autograd.grad(out, s)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_grad, eager_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_error_within_twice_pytorch(device, dtype):
    """Error vs the float64 result is at most 2x that of the same formula in PyTorch at the same dtype."""
    s64, t64 = _logits(16, 1000, device=device, requires_grad=False), _logits(16, 1000, device=device, requires_grad=False)
    y = _targets(16, 1000, device)
    s, t = s64.to(dtype).requires_grad_(), t64.to(dtype)
    exact_in = s.detach().double().requires_grad_()
    kw = dict(temperature=4.0, alpha=0.9)
    one = torch.tensor(1.0, device=device)
    exact, (exact_grad,) = grads(lambda a: reference.kd_loss(a, t.double(), y, **kw), [exact_in], one.double())
    low, (low_grad,) = grads(lambda a: reference.kd_loss(a, t, y, **kw), [s], one.to(dtype))
    out, (out_grad,) = grads(lambda a: ops.kd_loss(a, t, y, **kw), [s], one.to(dtype))
    assert out.dtype == dtype and out_grad.dtype == dtype
    # float32 accumulation also has to round its result to dtype: allow half an ulp of it.
    ulp = torch.finfo(dtype).eps * exact.abs()
    assert (out.double() - exact).abs() <= 2 * (low.double() - exact).abs() + ulp
    grad_ulp = torch.finfo(dtype).eps * exact_grad.abs().max()
    assert (out_grad.double() - exact_grad).abs().max() <= 2 * (low_grad.double() - exact_grad).abs().max() + grad_ulp


X = torch.randn(3, 5)
Y = torch.tensor([0, 4, 2])

CASES = [
    (lambda: ops.kd_loss(torch.randn(3, 5, 1), X, Y), ValueError, "student_logits must be 2-D logits (B, K)"),
    (lambda: ops.kd_loss(X, torch.randn(3, 6), Y), ValueError, "shape mismatch: student_logits is [3, 5] but teacher_logits is [3, 6]"),
    (lambda: ops.kd_loss(X, X.double(), Y), TypeError, "dtype mismatch: student_logits is torch.float32"),
    (lambda: ops.kd_loss(X, torch.randn(3, 5, device="meta"), Y), ValueError, "device mismatch: student_logits is on cpu"),
    (lambda: ops.kd_loss(X.long(), X.long(), Y), TypeError, "student_logits must be float32"),
    (lambda: ops.kd_loss(torch.randn(0, 5), torch.randn(0, 5), Y[:0]), ValueError, "student_logits has an empty batch"),
    (lambda: ops.kd_loss(torch.randn(3, 0), torch.randn(3, 0), Y), ValueError, "student_logits has no classes"),
    (lambda: ops.kd_loss(X, X, None, alpha=0.9), ValueError, "targets are required when alpha < 1"),
    (lambda: ops.kd_loss(X, X, Y.int()), TypeError, "targets must be int64 class indices"),
    (lambda: ops.kd_loss(X, X, Y.float()), TypeError, "targets must be int64 class indices"),
    (lambda: ops.kd_loss(X, X, Y[:2]), ValueError, "targets must have shape (3,)"),
    (lambda: ops.kd_loss(X, X, Y[None]), ValueError, "targets must have shape (3,)"),
    (lambda: ops.kd_loss(X, X, [0, 1, 2]), TypeError, "targets must be a torch.Tensor"),
    (lambda: ops.kd_loss(X, X, torch.tensor([0, 5, 1])), ValueError, "targets[1] = 5 is out of range"),
    (lambda: ops.kd_loss(X, X, torch.tensor([0, -1, 1])), ValueError, "targets[1] = -1 is out of range"),
    (lambda: ops.kd_loss(X, X, Y, temperature=0.0), ValueError, "temperature must be a positive finite number"),
    (lambda: ops.kd_loss(X, X, Y, temperature=float("inf")), ValueError, "temperature must be a positive finite number"),
    (lambda: ops.kd_loss(X, X, Y, alpha=1.5), ValueError, "alpha must be in [0, 1]"),
    (lambda: ops.kd_loss(X, X, Y, alpha=-0.1), ValueError, "alpha must be in [0, 1]"),
    (lambda: ops.kd_loss(X, X, Y, reduction="batchmean"), ValueError, "reduction must be one of"),
    (lambda: ops.kd_loss(X, X, Y, ignore_index=1.5), TypeError, "ignore_index must be an int"),
]


@pytest.mark.parametrize("call,exc,fragment", CASES, ids=[c[2][:40] for c in CASES])
def test_python_api_errors(call, exc, fragment):
    import re

    with pytest.raises(exc, match=re.escape(fragment)):
        call()


RAW = torch.ops.kdfast.kd_loss
RAW_CASES = [
    (lambda: RAW(X, torch.randn(3, 6), Y, 4.0, 0.9, True, -100, "mean"), ValueError, "shape mismatch: student_logits"),
    (lambda: RAW(X, X, None, 4.0, 0.5, True, -100, "mean"), ValueError, "targets are required when alpha < 1"),
    (lambda: RAW(X, X, Y, -1.0, 0.5, True, -100, "mean"), ValueError, "temperature must be a positive"),
    (lambda: RAW(X, X, Y, 1.0, 2.0, True, -100, "mean"), ValueError, "alpha must be in [0, 1]"),
    (lambda: RAW(X, X, Y.int(), 1.0, 0.5, True, -100, "mean"), TypeError, "targets must be int64"),
    (lambda: RAW(X, X, torch.tensor([0, 9, 1]), 1.0, 0.5, True, -100, "mean"), ValueError, "targets[1] = 9 is out of range"),
    (lambda: RAW(X, X.half(), Y, 1.0, 0.5, True, -100, "mean"), TypeError, "dtype mismatch: student_logits"),
    (lambda: torch.ops.kdfast._kd_loss_backward(torch.tensor(1.0), X, X, Y, torch.zeros(3, 4), 1.0, 0.5, True, -100,
                                                "mean", [True, False]), ValueError, "stats must be the (B, 5)"),
]


@pytest.mark.parametrize("call,exc,fragment", RAW_CASES, ids=[c[2][:40] for c in RAW_CASES])
def test_raw_op_errors(call, exc, fragment):
    import re

    with pytest.raises(exc, match=re.escape(fragment)):
        call()


def test_compile_reports_bad_input_clearly():
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: ops.kd_loss(a, b, None, 4.0, 1.0), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="shape mismatch"):
        compiled(torch.randn(2, 3), torch.randn(2, 4))
