"""Per-kernel resources from ptxas (registers, spill stores/loads, stack frame, static shared memory,
barriers) for every kernel of csrc/ops/cuda/*.cuh (instantiated as the .cu files launch them, in
tools/ptxas_kernels.cu), for sm_80 and sm_90, with the extension build's nvcc flags. No GPU and no CUDA torch
needed: only nvcc and torch's header-only c10 half types.

  python tools/ptxas_resources.py            print the table
  python tools/ptxas_resources.py --update   rewrite tests/build/ptxas_expected.json (commit it)

tests/build/test_ptxas_resources.py fails on any spill, on a stack frame or static shared size that
differs from the committed file, and on a kernel missing from either side."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tools" / "ptxas_kernels.cu"
EXPECTED = ROOT / "tests" / "build" / "ptxas_expected.json"
ARCHS = ("sm_80", "sm_90")


def nvcc_flags() -> list[str]:
    """The extension build's device flags: torch's C++ standard and COMMON_NVCC_FLAGS (no half operators /
    conversions), then setup.py's nvcc arguments (tools/check_cuda_compile.py uses the same)."""
    from torch.utils import cpp_extension

    spec = importlib.util.spec_from_file_location("check_cuda_compile", ROOT / "tools" / "check_cuda_compile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    setup_flags = [f for f in module.setup_compile_args()["nvcc"] if f not in ("-g", "-O0")]
    return [module.torch_std_flag(), *setup_flags, *cpp_extension.COMMON_NVCC_FLAGS]


def torch_include() -> str:
    import torch.utils.cpp_extension as ext

    return ext.include_paths()[0]


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def parse(report: str) -> dict[str, dict]:
    """ptxas -v output -> {mangled kernel: resources}."""
    kernels: dict[str, dict] = {}
    current = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = m.group(1)
            kernels[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)),
                                    spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            kernels[current]["barriers"] = int(b.group(1)) if b else 0
            s = re.search(r"(\d+) bytes smem", line)
            kernels[current]["static_smem"] = int(s.group(1)) if s else 0
    return kernels


def measure(arch: str) -> dict[str, dict]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *nvcc_flags(), f"-arch={arch}", "-cubin", "-Xptxas", "-v",
               f"-I{ROOT / 'csrc' / 'ops' / 'cuda'}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{torch_include()}",
               str(SOURCE), "-o", os.path.join(tmp, "kernels.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {arch}:\n{proc.stderr[-4000:]}")
    raw = parse(proc.stdout + proc.stderr)
    names = demangle(list(raw))
    return {names[k]: v for k, v in sorted(raw.items(), key=lambda kv: names[kv[0]])}


def measure_all() -> dict[str, dict[str, dict]]:
    with ThreadPoolExecutor(max_workers=len(ARCHS)) as pool:
        return dict(zip(ARCHS, pool.map(measure, ARCHS)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--update", action="store_true", help=f"rewrite {EXPECTED.relative_to(ROOT)}")
    args = parser.parse_args()
    result = measure_all()
    for arch, kernels in result.items():
        print(f"## {arch}")
        for name, r in kernels.items():
            print(f"{r['registers']:4d} regs {r['stack_frame']:4d} B stack {r['spill_stores']:3d}/{r['spill_loads']:3d} "
                  f"spill {r['static_smem']:6d} B smem  {name}")
    if args.update:
        EXPECTED.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        print(f"wrote {EXPECTED.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
