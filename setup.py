"""Build kdfast._C with torch.utils.cpp_extension (ninja).

CPU sources are always compiled. CUDA sources (csrc/ops/cuda/*.cu) are added when torch was built
with CUDA and a CUDA toolkit is found. Environment:
  KDFAST_WITH_CUDA=auto|0|1   auto (default) decides as above; 0 forces CPU only; 1 requires CUDA.
  FORCE_CUDA=1                same as KDFAST_WITH_CUDA=1 (torchvision's name).
  MAX_JOBS=N                  parallel compile jobs (ninja); TORCH_CUDA_ARCH_LIST="9.0" etc.
  KDFAST_DEBUG=1              -O0 -g.
Install with `pip install --no-build-isolation -e .` once torch is installed.
"""
import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


# CUDA builds need torch >= 2.8: csrc/ops/cuda/primitives.cu calls at::bmm_out / at::baddbmm_out with an
# out_dtype (float16 / bfloat16 operands, float32 result), which ATen gained in 2.8. Older torch would
# need a cast of the operands to float32 there (slower, and a different kernel); we require the newer
# torch instead. CPU-only builds keep working from torch 2.4 (pyproject.toml).
MIN_TORCH_FOR_CUDA = (2, 8)


def torch_version() -> tuple:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def _want_cuda() -> bool:
    choice = os.environ.get("KDFAST_WITH_CUDA", "auto").lower()
    if os.environ.get("FORCE_CUDA") == "1":
        choice = "1"
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if choice in ("0", "false", "no"):
        return False
    if choice in ("1", "true", "yes"):
        if not possible:
            raise RuntimeError(
                "KDFAST_WITH_CUDA=1 but a CUDA build is impossible: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}. "
                "Install a CUDA build of torch and the CUDA toolkit (nvcc), or use KDFAST_WITH_CUDA=0."
            )
        return True
    return possible


def _version_macros(with_cuda: bool):
    major, minor, patch = (int(p) for p in torch.__version__.split("+")[0].split(".")[:3])
    macros = [
        ("KDFAST_TORCH_VERSION_MAJOR", str(major)),
        ("KDFAST_TORCH_VERSION_MINOR", str(minor)),
        ("KDFAST_TORCH_VERSION_PATCH", str(patch)),
    ]
    if with_cuda:
        cmaj, cmin = (int(p) for p in torch.version.cuda.split(".")[:2])
        macros += [("KDFAST_CUDA_VERSION", str(cmaj * 1000 + cmin * 10)), ("WITH_CUDA", None)]
    return macros


def openmp_flags() -> list:
    """-fopenmp (compile only) when torch runs at::parallel_for on OpenMP. at::parallel_for is a header
    template: compiled without _OPENMP it runs the whole range on the calling thread, so every CPU
    kernel would be single-threaded whatever torch.set_num_threads says. Not linked: the GOMP symbols
    then resolve to the OpenMP runtime torch already loaded, so the process keeps one thread pool."""
    if os.name == "nt" or sys.platform == "darwin":
        return []  # MSVC / Apple clang spell it differently; torch's macOS wheels are not OpenMP-built
    return ["-fopenmp"] if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info() else []


def compile_args(with_cuda: bool, debug: bool = False) -> dict:
    """extra_compile_args of the extension. No -std flag: torch.utils.cpp_extension adds the C++
    standard its own headers need (C++17 up to torch 2.x, C++20 from the releases that require it),
    for g++ and nvcc alike. No --use_fast_math: its approximate exp/log/division would make the CUDA
    float32 results differ from the CPU math the test-suite checks (tests/build/test_build.py checks both)."""
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fdiagnostics-color=always", "-Wall", "-Wno-unknown-pragmas"]
    cxx += openmp_flags()
    args = {"cxx": cxx}
    if with_cuda:
        args["nvcc"] = (["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-lineinfo"]) + ["--expt-relaxed-constexpr"]
    return args


def get_extensions():
    with_cuda = _want_cuda()
    if with_cuda and torch_version() < MIN_TORCH_FOR_CUDA:
        raise RuntimeError(
            f"kdfast's CUDA kernels need torch >= {'.'.join(map(str, MIN_TORCH_FOR_CUDA))} (at::bmm_out with "
            f"out_dtype, csrc/ops/cuda/primitives.cu); this is torch {torch.__version__}. Upgrade torch, or build "
            "without CUDA: KDFAST_WITH_CUDA=0."
        )
    debug = os.environ.get("KDFAST_DEBUG") == "1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "ops", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "cpu", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "aten", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "autograd", "*.cpp")))
    extra = compile_args(with_cuda, debug)
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cu")))
        ext_cls = cpp_extension.CUDAExtension
    print(f"kdfast build: CUDA kernels {'ON' if with_cuda else 'OFF'} (torch {torch.__version__}, "
          f"torch CUDA {torch.version.cuda}, CUDA_HOME {cpp_extension.CUDA_HOME}), {len(sources)} sources")
    return [
        ext_cls(
            "kdfast._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc", "include")],
            define_macros=_version_macros(with_cuda),
            extra_compile_args=extra,
        )
    ]


# setuptools runs this file as __main__ (pip and `python setup.py` alike); tools/gpu_check.py and
# tests/build/test_build.py import it under another name to read compile_args without building.
if __name__ == "__main__":
    setup(
        packages=find_packages(include=["kdfast", "kdfast.*"]),
        ext_modules=get_extensions(),
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )
