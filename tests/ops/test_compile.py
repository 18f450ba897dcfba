"""torch.compile(fullgraph=True) over functions that call each op: no graph breaks, same values
and gradients as eager."""
import pytest
import torch

from kdfast import ops


def distill_losses(fs, ft, s_a, s_b, t_a, t_b):
    return (
        ops.nst_loss(fs, ft, "poly")
        + ops.nst_loss(fs, ft, "linear", "sum")
        + ops.nst_loss(fs, ft, "gaussian", sigma=0.7)
        + ops.fsp_loss(s_a, s_b, t_a, t_b)
        + ops.fsp_matrix(s_a, s_b).square().mean()
    )


def _inputs():
    fs = torch.randn(3, 5, 6, 6, requires_grad=True)
    ft = torch.randn(3, 7, 12, 12)
    s_a = torch.randn(3, 4, 8, 8, requires_grad=True)
    s_b = torch.randn(3, 6, 4, 4, requires_grad=True)
    t_a = torch.randn(3, 4, 8, 8)
    t_b = torch.randn(3, 6, 8, 8)
    return fs, ft, s_a, s_b, t_a, t_b


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(backend):
    torch._dynamo.reset()
    inputs = _inputs()
    eager = distill_losses(*inputs)
    eager_grads = torch.autograd.grad(eager, [inputs[0], inputs[2], inputs[3]])
    compiled = torch.compile(distill_losses, fullgraph=True, backend=backend)
    out = compiled(*inputs)
    out_grads = torch.autograd.grad(out, [inputs[0], inputs[2], inputs[3]])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(out_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_reports_bad_input_clearly():
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: ops.nst_loss(a, b), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="batch size mismatch"):
        compiled(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))


@pytest.mark.needs_cuda
def test_reduce_overhead_cuda_graphs_match_eager():
    """Kernels launch on the current stream: CUDA-graph capture (mode="reduce-overhead") must agree
    with eager (extension-cpp PR #118 regression)."""
    torch._dynamo.reset()
    fs = torch.randn(8, 32, 16, 16, device="cuda")
    ft = torch.randn(8, 64, 16, 16, device="cuda")

    def losses(a, b):
        return ops.nst_loss(a, b, "poly") + ops.fsp_loss(a, a, b[:, :32], b[:, :32])

    compiled = torch.compile(losses, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            out = compiled(fs, ft)
        torch.testing.assert_close(out, losses(fs, ft), rtol=1e-4, atol=1e-6)
