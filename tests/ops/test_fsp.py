"""kdfast.ops.fsp_matrix / fsp_loss against the float64 reference."""
import pytest
import torch
from conftest import DEVICES
from helpers import LAYOUTS, feature_map, grads

from kdfast import ops
from kdfast.testing import baselines, reference

# (B, Ca, Cb, (Ha, Wa), (Hb, Wb), teacher (Ht, Wt) scale): batch 1, odd sizes, H != W, pooled pairs,
# teacher at another resolution than the student.
SHAPES = [
    (1, 3, 5, (7, 7), (7, 7), 1),
    (2, 5, 4, (7, 6), (7, 6), 1),
    (3, 4, 6, (9, 11), (5, 6), 1),
    (2, 6, 3, (8, 8), (4, 4), 2),
    (2, 2, 7, (1, 1), (1, 1), 1),
]
REDUCTIONS = ["mean", "sum", "none"]


def _four_maps(shape, layout="contiguous", dtype=torch.float64, device="cpu", teacher_grad=True):
    b, ca, cb, a_hw, b_hw, t_scale = shape
    t_a_hw = (a_hw[0] * t_scale, a_hw[1] * t_scale)
    t_b_hw = (b_hw[0] * t_scale, b_hw[1] * t_scale)
    return (
        feature_map((b, ca, *a_hw), dtype, device, layout, requires_grad=True),
        feature_map((b, cb, *b_hw), dtype, device, layout, requires_grad=True),
        feature_map((b, ca, *t_a_hw), dtype, device, layout, requires_grad=teacher_grad),
        feature_map((b, cb, *t_b_hw), dtype, device, layout, requires_grad=teacher_grad),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_matches_reference_float64(device, shape, reduction):
    maps = _four_maps(shape, device=device)
    grad_out = torch.randn(shape[0] if reduction == "none" else (), dtype=torch.float64, device=device)
    out, g = grads(lambda *m: ops.fsp_loss(*m, reduction=reduction), maps, grad_out)
    ref, r = grads(lambda *m: reference.fsp_loss(*m, reduction=reduction), maps, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matrix_matches_reference_float64(device, shape):
    a, b, _, _ = _four_maps(shape, device=device)
    grad_out = torch.randn(shape[0], shape[1], shape[2], dtype=torch.float64, device=device)
    out, g = grads(ops.fsp_matrix, (a, b), grad_out)
    ref, r = grads(reference.fsp_matrix, (a, b), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for x, y in zip(g, r):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout):
    maps = _four_maps((2, 5, 3, (6, 5), (6, 5), 1), layout=layout)
    grad_out = torch.tensor(0.7, dtype=torch.float64)
    out, g = grads(ops.fsp_loss, maps, grad_out)
    ref, r = grads(reference.fsp_loss, maps, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_gradcheck():
    maps = _four_maps((2, 3, 4, (3, 5), (3, 5), 1))
    assert torch.autograd.gradcheck(lambda *m: ops.fsp_loss(*m, reduction="none"), maps)
    assert torch.autograd.gradcheck(ops.fsp_matrix, maps[:2])


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(requires_grad):
    maps = [torch.randn(2, c, 3, 4, dtype=torch.float64, requires_grad=requires_grad) for c in (3, 5, 3, 5)]
    for reduction in ("mean", "sum", "none"):
        torch.library.opcheck(torch.ops.kdfast.fsp_loss.default, (*maps, reduction))
    torch.library.opcheck(torch.ops.kdfast.fsp_matrix.default, tuple(maps[:2]))


def test_teacher_without_grad_gets_none():
    maps = _four_maps((2, 3, 4, (5, 5), (5, 5), 1), teacher_grad=False)
    ops.fsp_loss(*maps).backward()
    assert maps[0].grad is not None and maps[1].grad is not None
    assert maps[2].grad is None and maps[3].grad is None


def test_identical_give_zero():
    a, b = torch.randn(3, 4, 6, 6, dtype=torch.float64), torch.randn(3, 5, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(ops.fsp_loss(a, b, a.clone(), b.clone(), "none"), torch.zeros(3, dtype=a.dtype),
                               rtol=0, atol=1e-15)


def test_relation_to_peer_formulations():
    maps = [torch.randn(4, c, 8, 8, dtype=torch.float64) for c in (3, 5, 3, 5)]
    ours = ops.fsp_loss(*maps)
    torch.testing.assert_close(ours, baselines.fsp_loss_bmm(*maps))
    # RepDistiller averages over B*Ca*Cb where the paper sums over the Gram: a factor Ca*Cb.
    torch.testing.assert_close(ours / (3 * 5), baselines.repdistiller_fsp_loss(*maps))


def test_forward_keeps_one_gram():
    """Only diff = G_s - G_t (B*Ca*Cb values) is saved beyond the inputs: never both Grams."""
    maps = _four_maps((4, 16, 24, (6, 6), (6, 6), 1))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.fsp_loss(*maps)
    extra = [t for t in saved if not any(t is m for m in maps)]
    assert sum(t.numel() for t in extra) == 4 * 16 * 24


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_within_twice_pytorch(device, dtype):
    maps64 = [torch.randn(4, c, 6, 6, dtype=torch.float64, device=device) for c in (12, 20, 12, 20)]
    maps = [m.to(dtype) for m in maps64]
    maps[0].requires_grad_()
    exact_in = [m.double() for m in maps]
    exact_in[0].requires_grad_()
    one = torch.tensor(1.0, device=device)
    exact, (exact_grad,) = grads(reference.fsp_loss, exact_in, one.double())
    low, (low_grad,) = grads(reference.fsp_loss, maps, one.to(dtype))
    out, (out_grad,) = grads(ops.fsp_loss, maps, one.to(dtype))
    assert out.dtype == dtype and out_grad.dtype == dtype
    assert (out.double() - exact).abs() <= 2 * (low.double() - exact).abs() + 1e-3 * exact.abs()
    assert (out_grad.double() - exact_grad).abs().max() <= 2 * (low_grad.double() - exact_grad).abs().max()
