"""`make gpu-check-dry`: the GPU check's stages on the CPU with tiny shapes, so the script that a lent
GPU runs (tools/gpu_check.py) cannot rot between GPU sessions."""
import json
import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ["preflight", "environment", "build", "sass", "cuda tests", "benchmark", "sanitizer", "default-path tests"]


def test_stage_limits_fit_the_deadline():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tools", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert list(module.STAGE_SECONDS) == STAGES
    assert sum(module.STAGE_SECONDS.values()) <= module.TOTAL_SECONDS["gpu"] <= 8 * 60


def test_dry_run_writes_the_same_files(tmp_path):
    out = tmp_path / "gpu-check"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["junit-default.xml", "junit-kernels.xml", "logs.tar.gz", "results.json", "summary.md"]
    assert len(files) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())

    results = json.loads((out / "results.json").read_text())
    status = {s["stage"]: s for s in results["stages"]}
    assert list(status) == STAGES
    for stage in ("preflight", "environment", "build", "benchmark"):
        assert status[stage]["status"] == "pass", status[stage]
    for stage in ("sass", "cuda tests", "sanitizer", "default-path tests"):  # GPU-only
        assert status[stage]["status"] == "skipped" and "no GPU" in status[stage]["detail"], status[stage]
    assert "cases ran on the CPU" in status["sanitizer"]["detail"]
    # The CUDA tests were collected (and skipped): the marker selects them and the file imports.
    assert results["tests"]["cuda_kernels"]["skipped"] >= 20
    per_op = results["kernel tests per op"]
    assert {"fsp_loss / fsp_matrix", "nst_loss", "kd_loss", "tucker_conv2d", "sparse_recoding_", "sparse_codes",
            "every op (determinism, streams, opcheck)"} == set(per_op)  # one pytest process each
    assert all(v["failed"] == 0 and v["skipped"] > 0 for v in per_op.values()), per_op
    assert results["ceilings"]["copy_gbps"] > 0 and results["ceilings"]["matmul_fp32_tflops"] > 0
    rows = results["benchmark"]
    ops = {r["op"] for r in rows}
    assert {"fsp_loss", "nst_loss[poly]", "nst_loss[gaussian]", "kd_loss", "tucker_conv2d", "sparse_recoding_"} <= ops
    assert {r["impl"] for r in rows} >= {"kdfast-aten", "kdfast-kernel", "eager"}
    assert all("seconds" in r and "fraction_of_floor" in r for r in rows if r["impl"].startswith("kdfast")), rows

    summary = (out / "summary.md").read_text()
    assert summary.startswith("# kdfast gpu-check (dry run (CPU))")
    assert "| benchmark | pass |" in summary and "## Benchmark per op" in summary
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # printed last
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/bench.log" in names and "logs/pytest-kernels.log" in names
    assert sum(f"junit-kernels-{i}.xml" in n for n in names for i in range(7)) == 7
