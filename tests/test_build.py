"""The extension is built, registered and reported correctly."""
import os
import subprocess
import sys

import torch

import kdfast
from kdfast import _ext, info


def test_extension_loaded_and_matches_torch():
    assert _ext.is_loaded() and _ext.problem() is None
    assert _ext.build_info()["torch"] == torch.__version__.split("+")[0]


def test_every_op_has_cpu_and_meta_kernels():
    for op, names in info.OPS.items():
        for name in names:
            assert _ext.has_kernel(name, "CPU"), name
    assert "CPU" in info.op_backends()["nst_loss"]


def test_cuda_kernels_reported_consistently():
    backends = info.op_backends()
    assert all(("CUDA" in keys) == _ext.has_cuda_kernels() for keys in backends.values())
    if os.environ.get("KDFAST_REQUIRE_CUDA") == "1":
        assert _ext.has_cuda_kernels() and torch.cuda.is_available()


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "kdfast", "info"], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert any(line.startswith("kdfast ") and line.endswith(kdfast.__version__) for line in lines)
    assert any(line.startswith("status") and line.endswith(" ok") for line in lines)
    assert "torch (built against)" in out
    for op in info.OPS:
        assert op in out
    assert "CPU" in out
