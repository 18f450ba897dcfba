"""The emulator suite bites: tools/emulator_mutants.py applies seeded faults to copies of the CUDA kernel
headers (every __syncthreads removed in turn, shifted indices, shrunk shared allocations, early returns
before warp shuffles) and every mutant must fail tests/ops/test_cuda_emulator.py. About 4-6 minutes
on 2 cores."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the CUDA emulator")
def test_every_mutant_fails_the_emulator_suite():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "emulator_mutants.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "mutants killed" in proc.stdout
