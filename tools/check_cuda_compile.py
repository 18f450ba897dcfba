"""Compile-check csrc/ops/cuda/*.cu with nvcc against the installed torch's headers, on a machine
without a GPU or a CUDA build of torch. This proves the CUDA sources type-check and generate code
for the target arch; it does not run them (that needs a GPU: see docs/cuda.md).

A CPU wheel of torch lacks c10/cuda/impl/cuda_cmake_macros.h (generated for CUDA builds); a
one-line stand-in is written to a temporary include directory.
The flags are setup.py's (compile_args: no --use_fast_math) plus the C++ standard that
torch.utils.cpp_extension itself passes to nvcc for this torch (read from its source; setup.py passes
none, so a build gets torch's).
Usage: python tools/check_cuda_compile.py [--arch sm_90] [--keep DIR]   (--keep: leave the .o files there)
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_std_flag() -> str:
    """The -std=c++NN that torch.utils.cpp_extension adds when an extension passes none."""
    import inspect
    import re

    found = re.findall(r"c\+\+(\d\d)", inspect.getsource(cpp_extension.BuildExtension))
    return f"-std=c++{max(found, key=int)}" if found else "-std=c++17"


def setup_compile_args() -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("kdfast_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compile_args(with_cuda=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--keep", help="write the object files into this folder (for cuobjdump)")
    args = parser.parse_args()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found", file=sys.stderr)
        return 2
    major, minor, patch = torch.__version__.split("+")[0].split(".")[:3]
    with tempfile.TemporaryDirectory() as shim:
        os.makedirs(os.path.join(shim, "c10", "cuda", "impl"))
        with open(os.path.join(shim, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes = [shim, os.path.join(ROOT, "csrc", "include")] + cpp_extension.include_paths()
        nvcc_flags = [f for f in setup_compile_args()["nvcc"] if f not in ("-g", "-O0")]
        flags = [torch_std_flag(), *nvcc_flags, *cpp_extension.COMMON_NVCC_FLAGS, f"-arch={args.arch}", "-DWITH_CUDA",
                 f"-DKDFAST_TORCH_VERSION_MAJOR={major}", f"-DKDFAST_TORCH_VERSION_MINOR={minor}",
                 f"-DKDFAST_TORCH_VERSION_PATCH={patch}",
                 f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
        flags += [f"-I{p}" for p in includes]
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
        print("flags: " + " ".join(f for f in flags if not f.startswith("-I")))
        sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda", "*.cu")))

        def compile_one(src):
            out = os.path.join(args.keep or shim, os.path.basename(src) + ".o")
            proc = subprocess.run([nvcc, *flags, "-c", src, "-o", out], capture_output=True, text=True)
            return src, proc.returncode, proc.stderr

        failed = 0
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for src, code, err in pool.map(compile_one, sources):
                status = "ok" if code == 0 else "FAILED"
                print(f"{os.path.relpath(src, ROOT)}: {status}")
                if code != 0:
                    failed += 1
                    print("\n".join(line for line in err.splitlines() if "error" in line.lower()), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
