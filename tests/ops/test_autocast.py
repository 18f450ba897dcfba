"""Autocast does not reach inside kdfast ops (csrc/ops/autocast.cpp): under torch.autocast an op runs
in its inputs' dtype and gives the same result as outside autocast."""
import re
from pathlib import Path

import pytest
import torch

import kdfast
from kdfast import ops

ROOT = Path(__file__).resolve().parents[2]


def _declared_ops():
    schemas = (ROOT / "csrc" / "ops" / "schemas.cpp").read_text()
    return sorted(set(re.findall(r'"([a-z_0-9]+)\(', schemas)) - {"_build_info", "_kernel_paths", "_tucker_autotune"})  # CatchAll ops


def test_every_op_has_an_autocast_kernel():
    names = _declared_ops()
    assert "tucker_conv2d" in names and "kd_loss" in names  # the regex found the schemas
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"kdfast::{n}", "AutocastCPU")]
    assert missing == [], f"add these ops to csrc/ops/autocast.cpp: {missing}"


def test_tucker_conv2d_under_cpu_autocast_runs_in_input_dtype():
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    first, core, last = torch.randn(4, 8), torch.randn(5, 4, 3, 3), torch.randn(6, 5)
    bias = torch.randn(6)
    expected = ops.tucker_conv2d(x, first, core, last, bias, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.tucker_conv2d(x, first, core, last, bias, padding=1)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (grad,) = torch.autograd.grad(ops.tucker_conv2d(x, first, core, last, bias, padding=1).sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["nst", "fsp", "kd"])
def test_losses_under_cpu_autocast_match_float32(loss):
    if loss == "kd":
        s, t = torch.randn(4, 10), torch.randn(4, 10)
        y = torch.randint(0, 10, (4,))
        fn = lambda: ops.kd_loss(s, t, y)  # noqa: E731
    elif loss == "nst":
        s, t = torch.randn(3, 6, 5, 5), torch.randn(3, 7, 5, 5)
        fn = lambda: ops.nst_loss(s, t)  # noqa: E731
    else:
        a, b = torch.randn(3, 6, 5, 5), torch.randn(3, 4, 5, 5)
        fn = lambda: ops.fsp_loss(a, b, a.flip(0), b.flip(0))  # noqa: E731
    expected = fn()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_tucker_module_follows_autocast_like_conv2d():
    layer = kdfast.nn.TuckerConv2d(8, 6, 3, ranks=(5, 4), padding=1)
    x = torch.randn(2, 8, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        dense = torch.nn.functional.conv2d(x, torch.randn(6, 8, 3, 3), padding=1)
    assert y.dtype == dense.dtype == torch.bfloat16
