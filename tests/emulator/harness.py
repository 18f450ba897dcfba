"""Builds the CUDA emulator runner (tests/emulator/*.cpp + csrc/ops/cuda/*.cuh, with g++) and runs one
kernel command on tensors. Used by tests/ops/test_cuda_emulator.py and tools/emulator_mutants.py.

Builds are cached under build/emulator/<variant>-<hash of sources and flags>/; a variant is
  plain  -O1
  asan   AddressSanitizer + UndefinedBehaviorSanitizer (any report is fatal)
  tsan   ThreadSanitizer (the free schedule is where it sees races)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
EMU_DIR = ROOT / "tests" / "emulator"
KERNEL_DIR = ROOT / "csrc" / "ops" / "cuda"
INCLUDE_DIR = ROOT / "csrc" / "include"

SCHEDULES = ("free", "forward", "reverse", "random")

# Translation units and the kernel headers each one includes (directly or through another header).
UNITS = {
    "runner_main.cpp": (),
    "run_selftest.cpp": (),
    "run_reductions.cpp": ("kernels.cuh", "device.cuh"),
    "run_kd.cpp": ("kd_loss_kernels.cuh", "kernels.cuh", "device.cuh"),
    "run_recoding.cpp": ("sparse_recoding_kernels.cuh", "kernels.cuh", "device.cuh"),
    "run_codes.cpp": ("sparse_codes_kernels.cuh", "device.cuh"),
    "run_tucker.cpp": ("tucker_conv2d_kernels.cuh", "device.cuh"),
}

_COMMON = ["-std=c++17", "-g", "-pthread", "-Wall", "-Wno-unused-function", "-Wno-sign-compare", "-Werror=return-type"]
VARIANTS = {
    "plain": ["-O1"],
    "asan": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
    "tsan": ["-O1", "-fsanitize=thread"],
}

# Sanitizer reports end the run with a non-zero status (and stay on stderr for the test's message).
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=41",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=42",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=43:report_signal_unsafe=0",
}

_DTYPE_CODE = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
               torch.int64: "i64", torch.int32: "i32"}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _source_hash(kernel_dir: Path, flags: list[str]) -> str:
    h = hashlib.sha256(" ".join(flags).encode())
    for folder, pattern in ((EMU_DIR, "*.[ch]*"), (kernel_dir, "*.cuh"), (INCLUDE_DIR / "kdfast", "*.h")):
        for path in sorted(folder.glob(pattern)):
            if path.suffix in (".py", ".pyc"):
                continue
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build(variant: str = "plain", kernel_dir: Path | None = None, out_dir: Path | None = None,
          reuse_from: Path | None = None, jobs: int = 2) -> Path:
    """Compiles the runner; returns the executable. kernel_dir replaces csrc/ops/cuda (mutants);
    reuse_from: a previous build folder whose objects are reused for the units that include none of
    the headers that differ between kernel_dir and csrc/ops/cuda."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    kernel_dir = Path(kernel_dir or KERNEL_DIR)
    flags = _COMMON + VARIANTS[variant]
    if out_dir is None:
        out_dir = ROOT / "build" / "emulator" / f"{variant}-{_source_hash(kernel_dir, flags)}"
    exe = out_dir / "emu_runner"
    if exe.exists():
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    changed = None
    if reuse_from is not None:
        changed = {p.name for p in kernel_dir.glob("*.cuh")
                   if (KERNEL_DIR / p.name).read_bytes() != p.read_bytes()}
    includes = [f"-I{EMU_DIR}", f"-I{kernel_dir}", f"-I{INCLUDE_DIR}"]

    def compile_unit(unit: str) -> tuple[str, int, str]:
        obj = out_dir / (unit + ".o")
        if changed is not None and not changed.intersection(UNITS[unit]):
            shutil.copy(reuse_from / (unit + ".o"), obj)
            return unit, 0, ""
        proc = subprocess.run([cxx, *flags, *includes, "-c", str(EMU_DIR / unit), "-o", str(obj)],
                              capture_output=True, text=True)
        return unit, proc.returncode, proc.stderr

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(compile_unit, UNITS))
    errors = [f"{unit}:\n{err}" for unit, code, err in results if code != 0]
    if errors:
        raise CompileError("\n".join(errors))
    tmp = out_dir / "emu_runner.tmp"
    proc = subprocess.run([cxx, *flags, *(str(out_dir / (u + ".o")) for u in UNITS), "-o", str(tmp)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(proc.stderr)
    tmp.rename(exe)
    return exe


class CompileError(RuntimeError):
    pass


class EmulatorError(RuntimeError):
    """The emulator (or a sanitizer) reported a fault; the message is its report."""


def run(exe: Path, command: str, *, ints: dict | None = None, floats: dict | None = None,
        inputs: dict | None = None, outputs: dict | None = None, inouts: dict | None = None,
        schedules=SCHEDULES, seed: int = 0, timeout: float = 120.0) -> dict:
    """Runs `command` under each schedule. inputs / inouts: name -> tensor; outputs: name ->
    (dtype, numel). Returns {schedule: {name: 1-D tensor}} for outputs and inouts. Raises
    EmulatorError with the emulator's or sanitizer's report when the run fails."""
    with tempfile.TemporaryDirectory(prefix="kdfast-emu-") as d:
        lines = []
        for name, v in (ints or {}).items():
            lines.append(f"int {name} {int(v)}")
        for name, v in (floats or {}).items():
            lines.append(f"float {name} {float(v)!r}")
        for kind, arrays in (("in", inputs or {}), ("inout", inouts or {})):
            for name, t in arrays.items():
                t = t.detach().contiguous().cpu()
                lines.append(f"{kind} {name} {_DTYPE_CODE[t.dtype]} {t.numel()}")
                t.reshape(-1).view(torch.uint8).numpy().tofile(os.path.join(d, name + ".bin"))
        for name, (dtype, numel) in (outputs or {}).items():
            lines.append(f"out {name} {_DTYPE_CODE[dtype]} {int(numel)}")
        Path(d, "args.txt").write_text("\n".join(lines) + "\n")
        env = dict(os.environ, **SANITIZER_ENV)
        proc = subprocess.run([str(exe), command, d, ",".join(schedules), str(seed)], capture_output=True,
                              text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise EmulatorError(f"{command} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        result = {}
        names = {**{n: t.dtype for n, t in (inouts or {}).items()}, **{n: dt for n, (dt, _) in (outputs or {}).items()}}
        for schedule in schedules:
            result[schedule] = {}
            for name, dtype in names.items():
                raw = np.fromfile(os.path.join(d, f"{name}.{schedule}.bin"), dtype=np.uint8)
                result[schedule][name] = torch.from_numpy(raw.copy()).view(dtype)
        return result
