"""ptxas's resource report for every CUDA kernel (tools/ptxas_resources.py), sm_80 and sm_90, against the
committed tests/build/ptxas_expected.json: no spills anywhere, and the stack frame and static shared
memory of each kernel as recorded (a new local-memory array, like sparse_codes' former 384-byte top-k,
shows up as a stack frame). Registers are recorded there but not compared: they move with the nvcc
version. Needs nvcc (skipped without it); about 40 s on 2 cores.
After an intended change: python tools/ptxas_resources.py --update, and commit the file."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


@pytest.fixture(scope="module")
def measured():
    spec = importlib.util.spec_from_file_location("ptxas_resources", ROOT / "tools" / "ptxas_resources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measure_all()


def test_no_spills(measured):
    spills = [f"{arch} {name}: {r['spill_stores']} B stores / {r['spill_loads']} B loads"
              for arch, kernels in measured.items() for name, r in kernels.items()
              if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_stack_frame_and_static_shared_memory_as_recorded(measured):
    expected = json.loads((ROOT / "tests" / "build" / "ptxas_expected.json").read_text())
    problems = []
    for arch in expected.keys() | measured.keys():
        exp, got = expected.get(arch, {}), measured.get(arch, {})
        for name in sorted(exp.keys() ^ got.keys()):
            problems.append(f"{arch} {name}: {'not recorded' if name in got else 'no longer compiled'}")
        for name in sorted(exp.keys() & got.keys()):
            for key in ("stack_frame", "static_smem"):
                if exp[name][key] != got[name][key]:
                    problems.append(f"{arch} {name}: {key} {got[name][key]} B, recorded {exp[name][key]} B")
    assert not problems, "\n".join(problems) + "\n(intended? python tools/ptxas_resources.py --update)"
