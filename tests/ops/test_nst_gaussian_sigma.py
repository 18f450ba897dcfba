"""NST's gaussian kernel at small sigma: the diagonal terms k(x_p, x_p) = 1 and the cancelling q = p
gradient terms are set exactly (csrc/include/kdfast/math.h gaussian_diagonal), so float32 keeps its
accuracy where the Gram identity's rounding, magnified by 1 / sigma^2, used to dominate (a 3.7e-3
relative gradient error at sigma 0.25). Both CPU paths: the CPU kernels and the ATen path."""
import pytest
import torch

from kdfast import ops
from kdfast.testing import reference


def _relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


# Random maps, sizes where the kernel values between distinct rows, exp(-|x_p - x_q|^2 / (2 sigma^2)),
# are small but do not underflow float32: the gradient is then much smaller than the diagonal terms
# that cancel in it. Before the exact diagonal, float32 gave relative gradient errors of 3e-2 (sigma
# 0.1, 3x3), 2e-2 (0.15, 4x4) and 2e-3 (0.25, 6x8) on these inputs.
CASES = [(0.1, (3, 3)), (0.15, (4, 4)), (0.25, (6, 8))]
TOLERANCE = 2e-5  # measured after the fix: 2e-7 to 1.5e-6


@pytest.mark.parametrize("path", ["kernel", "aten"])
@pytest.mark.parametrize("sigma,hw", CASES, ids=str)
def test_float32_gradient_error_at_small_sigma(monkeypatch, path, sigma, hw):
    monkeypatch.setenv("KDFAST_CPU_KERNELS", "all" if path == "kernel" else "none")
    gen = torch.Generator().manual_seed(7)
    b, cs, ct = 3, 12, 10
    # float32-representable inputs, so both sides see the same values
    fs64 = torch.randn(b, cs, *hw, dtype=torch.float64, generator=gen).float().double().requires_grad_()
    ft64 = torch.randn(b, ct, *hw, dtype=torch.float64, generator=gen).float().double().requires_grad_()
    ref = reference.nst_loss(fs64, ft64, "gaussian", "sum", sigma)
    ref_gs, ref_gt = torch.autograd.grad(ref, (fs64, ft64))

    fs32, ft32 = fs64.detach().float().requires_grad_(), ft64.detach().float().requires_grad_()
    out = ops.nst_loss(fs32, ft32, "gaussian", "sum", sigma)
    gs, gt = torch.autograd.grad(out, (fs32, ft32))
    assert _relative_error(out.detach(), ref.detach()) < 1e-5
    assert _relative_error(gs, ref_gs) < TOLERANCE
    assert _relative_error(gt, ref_gt) < TOLERANCE


@pytest.mark.parametrize("path", ["kernel", "aten"])
def test_identical_maps_give_exactly_zero(monkeypatch, path):
    monkeypatch.setenv("KDFAST_CPU_KERNELS", "all" if path == "kernel" else "none")
    f = torch.randn(2, 5, 4, 4)
    loss = ops.nst_loss(f, f.clone(), "gaussian", "none", 0.1)
    torch.testing.assert_close(loss, torch.zeros(2), rtol=0, atol=1e-6)
