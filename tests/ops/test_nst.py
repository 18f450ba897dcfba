"""kdfast.ops.nst_loss / torch.ops.kdfast.nst_loss against the float64 reference."""
import pytest
import torch
from conftest import DEVICES
from helpers import LAYOUTS, feature_map, grads

from kdfast import ops
from kdfast.testing import baselines, reference

# (B, Cs, Ct, (Hs, Ws), (Ht, Wt)): batch 1, odd sizes, H != W, Cs != Ct, pooled spatial mismatch,
# 1x1 maps, more channels than positions (spatial poly form), > 64 rows (several gaussian tiles).
SHAPES = [
    (1, 3, 5, (7, 7), (7, 7)),
    (2, 5, 9, (7, 6), (7, 6)),
    (3, 4, 4, (9, 11), (5, 6)),
    (2, 6, 3, (4, 8), (8, 4)),
    (2, 7, 3, (1, 1), (1, 1)),
    (1, 40, 12, (3, 4), (3, 4)),
    (2, 70, 90, (5, 3), (5, 3)),
]
KERNELS = [("linear", None), ("poly", None), ("gaussian", None), ("gaussian", 0.6)]
REDUCTIONS = ["mean", "sum", "none"]


def _maps(shape, layout="contiguous", dtype=torch.float64, device="cpu", teacher_grad=False):
    b, cs, ct, s_hw, t_hw = shape
    fs = feature_map((b, cs, *s_hw), dtype, device, layout, requires_grad=True)
    ft = feature_map((b, ct, *t_hw), dtype, device, layout, requires_grad=teacher_grad)
    return fs, ft


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference_float64(device, shape, kernel, sigma, reduction):
    fs, ft = _maps(shape, device=device, teacher_grad=True)
    grad_out = torch.randn(shape[0] if reduction == "none" else (), dtype=fs.dtype, device=device)
    out, (g_fs, g_ft) = grads(lambda a, b: ops.nst_loss(a, b, kernel, reduction, sigma), (fs, ft), grad_out)
    ref, (r_fs, r_ft) = grads(lambda a, b: reference.nst_loss(a, b, kernel, reduction, sigma), (fs, ft), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_fs, r_fs, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(g_ft, r_ft, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel", ["linear", "poly", "gaussian"])
def test_layouts(layout, kernel):
    fs, ft = _maps((2, 5, 6, (6, 5), (6, 5)), layout=layout, teacher_grad=True)
    grad_out = torch.tensor(1.7, dtype=torch.float64)
    out, g = grads(lambda a, b: ops.nst_loss(a, b, kernel), (fs, ft), grad_out)
    ref, r = grads(lambda a, b: reference.nst_loss(a, b, kernel), (fs, ft), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("form", ["poly_channel", "poly_spatial"])
@pytest.mark.parametrize("shape", [(2, 5, 9, (7, 6), (7, 6)), (1, 40, 12, (3, 4), (3, 4))], ids=str)
def test_both_poly_forms_match_reference(form, shape):
    fs, ft = _maps(shape, teacher_grad=True)
    grad_out = torch.randn(shape[0], dtype=torch.float64)
    out, g = grads(lambda a, b: torch.ops.kdfast.nst_loss(a, b, form, "none", 1.0)[0], (fs, ft), grad_out)
    ref, r = grads(lambda a, b: reference.nst_loss(a, b, "poly", "none"), (fs, ft), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_poly_form_choice_follows_cost():
    assert ops.nst_poly_form(256, 512, 64) == "poly_spatial"  # C = 768 > HW = 64
    assert ops.nst_poly_form(64, 64, 1024) == "poly_channel"
    assert ops.nst_poly_form(2048, 2048, 49) == "poly_spatial"


def test_zero_rows_follow_normalize_semantics():
    # Dead channels (all-zero rows) hit the eps clamp of F.normalize; the gradient must match too.
    fs, ft = _maps((2, 6, 5, (4, 4), (4, 4)), teacher_grad=True)
    with torch.no_grad():
        fs[:, 1] = 0
        ft[0, 2] = 0
    for kernel in ("linear", "poly", "gaussian"):
        grad_out = torch.tensor(0.9, dtype=torch.float64)
        out, g = grads(lambda a, b: ops.nst_loss(a, b, kernel), (fs, ft), grad_out)
        ref, r = grads(lambda a, b: reference.nst_loss(a, b, kernel), (fs, ft), grad_out)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        for a, b in zip(g, r):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("kernel,sigma", KERNELS)
def test_gradcheck(kernel, sigma):
    fs, ft = _maps((2, 4, 3, (3, 5), (3, 5)), teacher_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.nst_loss(a, b, kernel, "none", sigma), (fs, ft))


@pytest.mark.parametrize("kernel", ["linear", "poly_channel", "poly_spatial", "gaussian"])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(kernel, requires_grad):
    fs = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=requires_grad)
    ft = torch.randn(2, 7, 3, 4, dtype=torch.float64, requires_grad=requires_grad)
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.kdfast.nst_loss.default, (fs, ft, kernel, reduction, 0.8))


def test_teacher_without_grad_gets_none():
    fs, ft = _maps((2, 4, 6, (5, 5), (5, 5)))
    loss = ops.nst_loss(fs, ft)
    loss.backward()
    assert fs.grad is not None and ft.grad is None


def test_identical_maps_give_zero():
    f = torch.randn(3, 8, 5, 7, dtype=torch.float64)
    for kernel in ("linear", "poly", "gaussian"):
        torch.testing.assert_close(ops.nst_loss(f, f.clone(), kernel, "none"), torch.zeros(3, dtype=f.dtype),
                                   rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_poly_equals_repdistiller(dtype, tol):
    fs = torch.randn(8, 16, 8, 8, dtype=dtype)
    ft = torch.randn(8, 32, 16, 16, dtype=dtype)
    torch.testing.assert_close(ops.nst_loss(fs, ft, "poly"), baselines.repdistiller_nst_loss(fs, ft), rtol=tol, atol=tol)
    torch.testing.assert_close(ops.nst_loss(fs, ft, "poly"), baselines.nst_poly_loss_bmm(fs, ft), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["linear", "poly", "gaussian"])
def test_low_precision_error_within_twice_pytorch(device, dtype, kernel):
    """flash-attention's rule: kdfast's error against the float64 oracle is at most 2x the error of
    the same reference computed by PyTorch in the low-precision dtype."""
    fs64 = torch.randn(4, 24, 6, 6, dtype=torch.float64, device=device)
    ft64 = torch.randn(4, 40, 6, 6, dtype=torch.float64, device=device)
    fs, ft = fs64.to(dtype).requires_grad_(), ft64.to(dtype)
    exact_in = (fs.detach().double().requires_grad_(), ft.double())
    one = torch.tensor(1.0, device=device)
    exact, (exact_grad,) = grads(lambda a, b: reference.nst_loss(a, b, kernel), exact_in, one.double())
    low, (low_grad,) = grads(lambda a, b: reference.nst_loss(a, b, kernel), (fs, ft), one.to(dtype))
    out, (out_grad,) = grads(lambda a, b: ops.nst_loss(a, b, kernel), (fs, ft), one.to(dtype))
    assert out.dtype == dtype and out_grad.dtype == dtype
    assert (out.double() - exact).abs() <= 2 * (low.double() - exact).abs() + 1e-3 * exact.abs()
    assert (out_grad.double() - exact_grad).abs().max() <= 2 * (low_grad.double() - exact_grad).abs().max()


def test_gaussian_batch_chunks_agree_with_per_sample_calls():
    # 17 samples x 128 rows x 4096 positions spans several sample chunks of the tiled kernel.
    fs = torch.randn(17, 64, 64, 64, requires_grad=True)
    ft = torch.randn(17, 64, 64, 64)
    batched, (g_batched,) = grads(lambda a, b: ops.nst_loss(a, b, "gaussian", "none"), (fs, ft), torch.ones(17))
    single = torch.cat([ops.nst_loss(fs[i:i + 1], ft[i:i + 1], "gaussian", "none") for i in range(17)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-7)
    (g_single,) = torch.autograd.grad(single.sum(), fs)
    torch.testing.assert_close(g_batched, g_single, rtol=1e-5, atol=1e-9)


def test_gaussian_saves_no_kernel_matrix():
    """The gaussian kernel never keeps B*C*C values for backward: only the inputs are saved."""
    fs = torch.randn(4, 50, 6, 6, requires_grad=True)
    ft = torch.randn(4, 70, 6, 6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ops.nst_loss(fs, ft, "gaussian")
    assert sum(saved) <= fs.numel() + ft.numel()
