"""Which path each op runs (csrc/ops/kernel_paths.{h,cpp}): the CUDA kernel table, the
KDFAST_CUDA_KERNELS / KDFAST_CPU_KERNELS overrides, and `kdfast info [--json]`."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdfast import info, ops

ROOT = Path(__file__).resolve().parents[2]
CATCH_ALL = {"_build_info", "_kernel_paths", "_tucker_autotune"}  # ops with no backend kernel (registered as CatchAll)


def _schema_ops():
    text = (ROOT / "csrc" / "ops" / "schemas.cpp").read_text()
    return set(re.findall(r'"([a-z_0-9]+)\(', text))


def _autocast_ops():
    text = (ROOT / "csrc" / "ops" / "autocast.cpp").read_text()
    body = text[text.index("kOps[] = {"):]
    body = body[:body.index("};")]
    return set(re.findall(r'"([a-z_0-9]+)"', body))


def _table_ops():
    text = (ROOT / "csrc" / "ops" / "kernel_paths.cpp").read_text()
    body = text[text.index("kCudaKernels[] = {"):]
    body = body[:body.index("\n};")]
    names = dict(re.findall(r'constexpr const char\* (k\w+) = "([a-z_0-9]+)";',
                            (ROOT / "csrc" / "ops" / "kernel_paths.h").read_text()))
    return {names[k] for k in re.findall(r"\{(k\w+),", body)}


def test_op_lists_agree():
    """A new op joins by adding its entries in four places; this says which one is missing."""
    schemas = _schema_ops()
    assert {"kd_loss", "tucker_conv2d", "sparse_recoding_"} <= schemas  # the regex found them
    assert _autocast_ops() == schemas - CATCH_ALL, "csrc/ops/autocast.cpp kOps must list every schema op"
    served = {name for names in info.OPS.values() for name in names}
    assert served == schemas - CATCH_ALL, "kdfast/info.py OPS must list every schema op under its public op"
    assert _table_ops() == set(info.OPS), "csrc/ops/kernel_paths.cpp kCudaKernels must have one row per public op"
    assert set(info.kernel_paths()["ops"]) == set(info.OPS)  # and the compiled table says the same


def test_default_cuda_path_follows_verification(monkeypatch):
    monkeypatch.delenv("KDFAST_CUDA_KERNELS", raising=False)
    table = info.kernel_paths()["ops"]
    for op, row in table.items():
        # "kernel" by default only for a verified kernel, and a verified entry names its committed results.
        assert row["cuda_default_path"] == ("kernel" if row["cuda_kernel_verified"] else "aten"), op
        assert row["cuda_path_now"] == row["cuda_default_path"], op
        if row["cuda_kernel_verified"]:
            assert row["cuda_kernel"] is not None and row["cuda_verified_dtypes"], op
            assert (ROOT / row["cuda_verified_evidence"]).exists(), f"{op}: evidence {row['cuda_verified_evidence']!r}"
        else:
            assert row["cuda_verified_dtypes"] == [] and row["cuda_verified_evidence"] == "", op
    # The fused Tucker kernel in particular is not the default (it never ran on a GPU).
    assert table["tucker_conv2d"]["cuda_default_path"] == "aten"
    assert table["fsp_matrix"]["cuda_kernel"] is None  # ATen GEMMs only: nothing hand-written to verify


@pytest.mark.parametrize("value,expected", [
    ("all", lambda op, row: row["cuda_kernel"] is not None),
    ("none", lambda op, row: False),
    ("kd_loss, tucker_conv2d", lambda op, row: op in ("kd_loss", "tucker_conv2d")),
    ("fsp_matrix", lambda op, row: False),  # no hand-written kernel: ATen whatever the variable says
])
def test_cuda_override(monkeypatch, value, expected):
    monkeypatch.setenv("KDFAST_CUDA_KERNELS", value)
    table = info.kernel_paths()
    assert table["KDFAST_CUDA_KERNELS"] == value
    for op, row in table["ops"].items():
        assert row["cuda_path_now"] == ("kernel" if expected(op, row) else "aten"), op


@pytest.mark.parametrize("var", ["KDFAST_CUDA_KERNELS", "KDFAST_CPU_KERNELS"])
def test_unknown_op_in_override_is_a_clear_error(monkeypatch, var):
    monkeypatch.setenv(var, "kd_loss,not_an_op")
    with pytest.raises(ValueError, match=rf"{var}='kd_loss,not_an_op': unknown op 'not_an_op'.*kd_loss"):
        info.kernel_paths()
    if var == "KDFAST_CPU_KERNELS":  # an op call on CPU reads it too
        with pytest.raises(ValueError, match="unknown op 'not_an_op'"):
            ops.kd_loss(torch.randn(2, 3), torch.randn(2, 3), alpha=1.0)


def test_cpu_override_selects_aten_path(monkeypatch):
    x = torch.randn(1, 4, 30, 30, dtype=torch.float64)
    first, core, last = torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64), \
        torch.randn(5, 3, dtype=torch.float64)
    monkeypatch.setenv("KDFAST_TUCKER_CONV_PATH", "fused")
    monkeypatch.delenv("KDFAST_CPU_KERNELS", raising=False)
    assert ops.tucker_conv2d_path(x, first, core, last, padding=1) == "fused"
    monkeypatch.setenv("KDFAST_CPU_KERNELS", "none")
    assert ops.tucker_conv2d_path(x, first, core, last, padding=1) == "composed"
    monkeypatch.setenv("KDFAST_CPU_KERNELS", "kd_loss")
    assert ops.tucker_conv2d_path(x, first, core, last, padding=1) == "composed"
    table = info.kernel_paths()["ops"]
    assert {op for op, row in table.items() if row["cpu_path_now"] == "kernel"} == {"kd_loss"}


def _run_info(*args, **env):
    full_env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    for var in ("KDFAST_CUDA_KERNELS", "KDFAST_CPU_KERNELS"):
        if var not in env:
            full_env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "kdfast", "info", *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=120, check=True).stdout


def test_info_json():
    data = json.loads(_run_info("--json"))
    assert data["status"] == "ok"
    assert set(data["ops"]) == set(info.OPS)
    for op, row in data["ops"].items():
        assert row["cuda_default_path"] in ("aten", "kernel"), op
        assert isinstance(row["cuda_kernel_verified"], bool), op
        assert "CPU" in row["backends"], op
    data = json.loads(_run_info("--json", KDFAST_CUDA_KERNELS="all"))
    assert data["KDFAST_CUDA_KERNELS"] == "all"
    assert data["ops"]["tucker_conv2d"]["cuda_path_now"] == "kernel"
    assert data["ops"]["tucker_conv2d"]["cuda_default_path"] == "aten"


def test_info_text_shows_paths():
    out = _run_info()
    header = next(line for line in out.splitlines() if line.startswith("op "))
    assert "CUDA default path" in header and "CUDA kernel verified" in header
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in info.OPS}
    assert set(rows) == set(info.OPS)
    assert " aten " in rows["tucker_conv2d"]
    bad = subprocess.run([sys.executable, "-m", "kdfast", "info"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, KDFAST_CUDA_KERNELS="bogus",
                                  PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")),
                         timeout=120)
    assert bad.returncode == 0 and "unknown op 'bogus'" in bad.stdout
