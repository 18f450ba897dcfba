"""The extension is built, registered and reported correctly."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

import kdfast
from kdfast import _ext, info

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_extension_loaded_and_matches_torch():
    assert _ext.is_loaded() and _ext.problem() is None
    assert _ext.build_info()["torch"] == torch.__version__.split("+")[0]


# Ops that return host facts rather than tensors (the path a Tucker call would take): nothing to trace.
NO_META = {"_tucker_conv2d_path"}


def test_every_op_has_cpu_and_meta_kernels():
    for op, names in info.OPS.items():
        for name in names:
            assert _ext.has_kernel(name, "CPU"), name
            assert _ext.has_kernel(name, "Meta") or name in NO_META, f"{name} has no fake (Meta) kernel"
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


def test_cmake_library_registers_the_same_ops():
    """The CMake build (libkdfast.so) loads into a fresh process without the Python package and
    computes the same values; `make test` builds it and sets KDFAST_CMAKE_LIB."""
    lib = os.environ.get("KDFAST_CMAKE_LIB")
    if not lib:
        pytest.skip("KDFAST_CMAKE_LIB not set (run through `make test`, which builds the CMake library)")
    assert os.path.exists(lib), f"KDFAST_CMAKE_LIB={lib} does not exist"
    code = (
        "import sys, torch\n"
        f"torch.ops.load_library({lib!r})\n"
        "assert 'kdfast' not in sys.modules\n"
        "a, b = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)\n"
        "g = torch.ops.kdfast.fsp_matrix(a, b)\n"
        "torch.testing.assert_close(g, torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / 25)\n"
        "loss, _ = torch.ops.kdfast.nst_loss(a, a.clone(), 'poly_channel', 'sum', 1.0)\n"
        "assert abs(loss.item()) < 1e-12\n"
        # tucker_conv2d's and kd_loss's autograd is C++ (csrc/ops/autograd): C++ users get gradients too.
        "x = a.clone().requires_grad_()\n"
        "f, c, l = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)\n"
        "y = torch.ops.kdfast._tucker_conv2d_with_intermediates(x, f, c, l, None, [1, 1], [1, 1], [1, 1])[0]\n"
        "(gx,) = torch.autograd.grad(y.square().sum(), x)\n"
        "x2 = a.clone().requires_grad_()\n"
        "ref = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.nn.functional.conv2d(x2, f[:, :, None, None]), c, padding=1), l[:, :, None, None])\n"
        "torch.testing.assert_close(gx, torch.autograd.grad(ref.square().sum(), x2)[0])\n"
        "z = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)\n"
        "zt = torch.randn(4, 7, dtype=torch.float64)\n"
        "(gz,) = torch.autograd.grad(torch.ops.kdfast.kd_loss(z, zt, None, 2.0, 1.0, True, -100, 'mean')[0], z)\n"
        "kl = torch.nn.functional.kl_div(torch.log_softmax(z / 2, 1), torch.softmax(zt / 2, 1), reduction='batchmean') * 4\n"
        "torch.testing.assert_close(gz, torch.autograd.grad(kl, z)[0])\n"
        "print(list(torch.ops.kdfast._build_info()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    major, minor, patch = (int(p) for p in torch.__version__.split("+")[0].split(".")[:3])
    assert out.strip().startswith(f"[{major}, {minor}, {patch},")
    if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
        assert out.strip().endswith(", 1]"), "the CMake build's at::parallel_for is serial (not compiled with OpenMP)"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch compiles the .cu files for real")
def test_cuda_sources_compile_with_nvcc():
    """CPU-only machines still type-check the CUDA kernels (compile only; running them needs a GPU)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_cuda_compile.py")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok") == len(glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda", "*.cu"))) >= 3


@pytest.mark.skipif("ATen parallel backend: OpenMP" not in torch.__config__.parallel_info()
                    or not sys.platform.startswith("linux"), reason="torch's intra-op backend is not OpenMP")
def test_cpu_kernels_are_built_multi_threaded():
    """at::parallel_for is a header template: an extension compiled without OpenMP runs every CPU
    kernel on one thread whatever torch.set_num_threads says (kdfast did until this was checked)."""
    assert _ext.build_info()["parallel"] is True
    assert "-fopenmp" in _setup_module().compile_args(False)["cxx"]


def _setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kdfast_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    return module


def test_compile_flags_leave_the_standard_to_torch_and_avoid_fast_math():
    for with_cuda in (False, True):
        args = _setup_module().compile_args(with_cuda)
        flags = [f for group in args.values() for f in group]
        assert not [f for f in flags if f.startswith("-std")], flags  # torch.utils.cpp_extension adds its own
        assert not [f for f in flags if "fast_math" in f or "fast-math" in f], flags
        assert ("nvcc" in args) == with_cuda
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    assert "CMAKE_CXX_STANDARD 17" not in cmake and "get_target_property(KDFAST_TORCH_CXX_STANDARD torch CXX_STANDARD)" in cmake


def test_make_deps_does_not_need_pip_when_modules_are_present():
    """`make -n deps` lists no pip install when every required module imports (tensorly is optional)."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    proc = subprocess.run(["make", "-s", "deps"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr
    assert "pip" not in proc.stdout + proc.stderr
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    required = makefile.split('-c "import ninja')[1].split('"')[0]
    assert "tensorly" not in required
