"""Bad input raises a clear error naming the argument, from the Python API and from the raw ops."""
import subprocess
import sys

import pytest
import torch

from kdfast import _ext, ops

X = torch.randn(2, 3, 4, 4)
Y = torch.randn(2, 5, 4, 4)


def nst(fs=X, ft=Y, **kw):
    return ops.nst_loss(fs, ft, **kw)


def fsp(s_a=X, s_b=Y, t_a=X, t_b=Y, **kw):
    return ops.fsp_loss(s_a, s_b, t_a, t_b, **kw)


CASES = [
    # (call, exception, message fragment)
    (lambda: nst(fs=torch.randn(2, 3, 4)), ValueError, "fs must be a 4-D feature map"),
    (lambda: nst(ft=torch.randn(2, 3, 4, 4, 1)), ValueError, "ft must be a 4-D feature map"),
    (lambda: nst(ft=torch.randn(3, 5, 4, 4)), ValueError, "batch size mismatch: fs has B = 2 but ft has B = 3"),
    (lambda: nst(ft=Y.double()), TypeError, "dtype mismatch: fs is torch.float32 but ft is torch.float64"),
    (lambda: nst(ft=torch.randn(2, 5, 4, 4, device="meta")), ValueError, "device mismatch: fs is on cpu but ft is on meta"),
    (lambda: nst(fs=torch.randn(0, 3, 4, 4), ft=torch.randn(0, 5, 4, 4)), ValueError, "fs has an empty batch"),
    (lambda: nst(ft=torch.randn(2, 0, 4, 4)), ValueError, "ft has no channels"),
    (lambda: nst(fs=torch.randn(2, 3, 0, 4)), ValueError, "fs has an empty spatial size"),
    (lambda: nst(fs=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "fs must be float32"),
    (lambda: nst(kernel="rbf"), ValueError, "kernel must be one of"),
    (lambda: nst(reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: nst(kernel="gaussian", sigma=0.0), ValueError, "sigma must be None or a positive"),
    (lambda: nst(kernel="gaussian", sigma=float("nan")), ValueError, "sigma must be None or a positive"),
    (lambda: nst(fs=[1.0]), TypeError, "fs must be a torch.Tensor"),
    (lambda: fsp(t_a=torch.randn(2, 4, 4, 4)), ValueError, "FSP Gram shape mismatch"),
    (lambda: fsp(t_b=torch.randn(2, 5, 4)), ValueError, "t_b must be a 4-D feature map"),
    (lambda: fsp(s_b=torch.randn(3, 5, 4, 4)), ValueError, "batch size mismatch: s_a has B = 2 but s_b has B = 3"),
    (lambda: fsp(t_a=X.half(), t_b=Y.half()), TypeError, "dtype mismatch: s_a is torch.float32 but t_a"),
    (lambda: fsp(reduction="mean "), ValueError, "reduction must be one of"),
    (lambda: fsp(s_a=torch.randn(2, 0, 4, 4), t_a=torch.randn(2, 0, 4, 4)), ValueError, "s_a has no channels"),
    (lambda: ops.fsp_matrix(X, torch.randn(2, 5, 4, 4, dtype=torch.bfloat16)), TypeError, "dtype mismatch: a is"),
    (lambda: ops.fsp_matrix(X, torch.randn(4, 5)), ValueError, "b must be a 4-D feature map"),
]


@pytest.mark.parametrize("call,exc,fragment", CASES, ids=[c[2][:40] for c in CASES])
def test_python_api_errors(call, exc, fragment):
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        call()


RAW_CASES = [
    (lambda: torch.ops.kdfast.nst_loss(torch.randn(2, 3, 4), Y, "poly_channel", "mean", 1.0), ValueError, "fs must be a 4-D"),
    (lambda: torch.ops.kdfast.nst_loss(X, torch.randn(2, 5, 3, 4), "poly_channel", "mean", 1.0), ValueError, "spatial size mismatch: fs is 4x4 but ft is 3x4"),
    (lambda: torch.ops.kdfast.nst_loss(X, Y, "poly", "mean", 1.0), ValueError, "kernel must be one of 'linear', 'poly_channel'"),
    (lambda: torch.ops.kdfast.nst_loss(X, Y, "gaussian", "all", 1.0), ValueError, "reduction must be one of"),
    (lambda: torch.ops.kdfast.nst_loss(X, Y, "gaussian", "mean", -1.0), ValueError, "sigma must be a positive"),
    (lambda: torch.ops.kdfast.nst_loss(X, Y.double(), "linear", "mean", 1.0), TypeError, "dtype mismatch: fs"),
    (lambda: torch.ops.kdfast.fsp_loss(X, Y, torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4), "mean"), ValueError, "FSP Gram shape mismatch"),
    (lambda: torch.ops.kdfast.fsp_loss(X, torch.randn(2, 5, 2, 2), X, Y, "mean"), ValueError, "spatial size mismatch: s_a is 4x4 but s_b is 2x2"),
    (lambda: torch.ops.kdfast.fsp_matrix(torch.randn(0, 3, 4, 4), torch.randn(0, 5, 4, 4)), ValueError, "a has an empty batch"),
]


@pytest.mark.parametrize("call,exc,fragment", RAW_CASES, ids=[c[2][:40] for c in RAW_CASES])
def test_raw_op_errors(call, exc, fragment):
    """Direct torch.ops callers get the same kind of message from the C++ checks."""
    with pytest.raises(exc, match=fragment):
        call()


def test_missing_extension_raises_rebuild_hint():
    """`import kdfast` survives a missing _C; calling an op raises one error with the rebuild command."""
    code = (
        "import sys; sys.modules['kdfast._C'] = None\n"  # makes `from . import _C` raise ImportError
        "import torch, kdfast\n"
        "from kdfast import info\n"
        "print(info.render())\n"
        "try:\n"
        "    kdfast.ops.nst_loss(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3))\n"
        "except RuntimeError as e:\n"
        "    print('ERROR:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert any(line.startswith("kdfast._C loaded") and line.endswith("False") for line in out.splitlines())
    assert "ERROR: kdfast's compiled extension kdfast._C could not be loaded" in out
    assert "pip install --no-build-isolation -e ." in out


def test_stale_build_raises_rebuild_hint(monkeypatch):
    stale = _ext._find_problem(None, {"torch": "1.0.0", "cuda": None})
    assert stale.startswith("kdfast._C was built against torch 1.0.0, but torch ")
    monkeypatch.setattr(_ext, "PROBLEM", stale)
    with pytest.raises(RuntimeError, match=r"built against torch 1\.0\.0, but torch .* is installed.*Rebuild"):
        ops.fsp_matrix(X, Y)


def test_double_backward_is_refused():
    fs = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    loss = ops.nst_loss(fs, Y.double())
    (g,) = torch.autograd.grad(loss, fs, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through _nst_loss_backward is not supported"):
        g.sum().backward()
