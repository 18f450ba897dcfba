"""`make gpu-check OUT=<dir>`: everything a lent GPU must tell us about kdfast's CUDA code, in one
command of at most 8 minutes (an H200 with 16 cores, a preinstalled CUDA torch, nvcc, no network).
`make gpu-check-dry OUT=<dir>` runs the same stages on the CPU with tiny shapes (GPU-only stages say
"skipped: no GPU") and writes the same files; tests/build/test_gpu_check.py runs it, so this script cannot rot.

Stages, in order, each with its own time limit (the limits add up to the overall deadline, under the
8-minute budget); once the overall deadline has passed, the remaining stages are skipped and say so:
  1. preflight    ~10 s: torch >= setup.MIN_TORCH_FOR_CUDA (primitives.cu's out_dtype GEMMs), ninja
                  present (without it setup.py compiles one file at a time and overruns the build
                  limit), nvcc's CUDA major version = torch's
  2. environment  nvidia-smi, nvcc, torch, device properties; in the background during the build, the
                  measured ceilings: device-to-device copy GB/s and 8192^3 bf16 (4096^3 fp32) matmul
                  TFLOP/s, timed with CUDA events
  3. build        in place, no pip, no CMake: KDFAST_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
                  python setup.py build_ext --inplace (the dry run checks the flags and the loaded build)
  4. sass         cuobjdump: per-kernel registers / shared / local memory / spills, and a SASS summary
                  (HGMMA, HMMA, FFMA counts, 128-bit loads, local loads/stores)
  5. cuda tests   pytest -m cuda_kernels (tests/ops/test_cuda_kernels.py), ONE PROCESS PER OP (a CUDA error is
                  sticky: an illegal access would fail every later test of its process), the first
                  failure of each op reported; CUBLAS_WORKSPACE_CONFIG set for the bit-exact stream tests
  6. benchmark    benchmarks/gpu_bench.py: every op vs its baselines, CIFAR and ImageNet shapes, float32
                  and float16, TF32 off (ATen baselines in true float32), CUDA events, each with its floor
                  and the fraction of it reached
  7. sanitizer    compute-sanitizer memcheck, racecheck, synccheck and initcheck over
                  tools/gpu_sanitize_cases.py, restricted to kdfast's kernels, with
                  PYTORCH_NO_CUDA_MEMORY_CACHING=1 (memcheck cannot see an out-of-bounds access that
                  stays inside a block of the caching allocator)
  8. default-path tests  pytest -m "needs_cuda and not cuda_kernels": the rest of the suite's CUDA cases
                  on the default (ATen) path, in the time that remains
Files in OUT (at most 8): summary.md (read it first; also printed last), results.json,
junit-kernels.xml, junit-default.xml, logs.tar.gz (every log and raw output). summary.md and
results.json are rewritten after every stage, so a run cut short still leaves what it found.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Overall deadlines: under 8 minutes on the GPU. The dry run needs about 25 s of CPU; its deadline is
# only a safety net for a heavily shared machine, and its stages have no limits of their own.
TOTAL_SECONDS = {"gpu": 465, "dry": 900}
STAGE_SECONDS = {  # each stage's own limit (GPU run), adding up to TOTAL_SECONDS["gpu"] (tests/build/test_gpu_check.py)
    "preflight": 10, "environment": 15, "build": 170, "sass": 10, "cuda tests": 100, "benchmark": 60,
    "sanitizer": 80, "default-path tests": 20,
}
# The kernel tests, one pytest process per op: (op, pytest -k expression).
TEST_OPS = (("fsp_loss / fsp_matrix", "test_fsp"), ("nst_loss", "test_nst"), ("kd_loss", "test_kd"),
            ("tucker_conv2d", "test_tucker"), ("sparse_recoding_", "test_sparse_recoding"),
            ("sparse_codes", "test_sparse_codes"))
OTHER_TESTS = "every op (determinism, streams, opcheck)"
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")


def now() -> float:
    return time.monotonic()


class Check:
    def __init__(self, out: str, dry: bool):
        self.out, self.dry = out, dry
        # Outside OUT (tarred into OUT/logs.tar.gz at the end), so a run cut short leaves no extra files there.
        self.logs = tempfile.mkdtemp(prefix="kdfast-gpu-check-logs-")
        self.start = now()
        self.deadline = self.start + TOTAL_SECONDS["dry" if dry else "gpu"]
        self.stages: list[dict] = []
        self.results: dict = {"mode": "dry run (CPU)" if dry else "GPU", "started": _utc(), "stages": self.stages}
        self.env = dict(os.environ)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env["PYTHONPATH"] = ROOT + os.pathsep + self.env.get("PYTHONPATH", "")
        for var in ("KDFAST_CUDA_KERNELS", "KDFAST_CPU_KERNELS", "KDFAST_TUCKER_CONV_PATH", "KDFAST_REQUIRE_CUDA"):
            self.env.pop(var, None)
        self.ceilings_thread = None

    # ----------------------------------------------------------------------------------- plumbing
    def log_path(self, name):
        return os.path.join(self.logs, name)

    def remaining(self) -> float:
        return self.deadline - now()

    def sh(self, cmd, log, timeout, env=None, cwd=ROOT):
        """Runs cmd (list), output appended to logs/<log>; returns (returncode or None on timeout, text)."""
        timeout = max(1.0, min(timeout, self.remaining()))
        with open(self.log_path(log), "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                proc = subprocess.run(cmd, cwd=cwd, env=env or self.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, timeout=timeout)
                f.write(proc.stdout)
                return proc.returncode, proc.stdout
            except subprocess.TimeoutExpired as exc:
                text = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                f.write(text + f"\n[gpu_check: timed out after {timeout:.0f} s]\n")
                return None, text
            except FileNotFoundError as exc:
                f.write(f"[gpu_check: {exc}]\n")
                return 127, str(exc)

    def stage(self, name, fn):
        record = {"stage": name, "status": "skipped", "seconds": 0.0, "detail": ""}
        self.stages.append(record)
        if self.remaining() <= 1:
            record["detail"] = "skipped: the overall deadline had passed"
        else:
            t0 = now()
            try:
                status, detail = fn(self.remaining() if self.dry else min(STAGE_SECONDS[name], self.remaining()))
            except Exception as exc:  # noqa: BLE001  a broken stage is a failed stage, the others still run
                status, detail = "fail", f"{type(exc).__name__}: {exc}"
            record.update(status=status, detail=detail, seconds=round(now() - t0, 1))
        print(f"[gpu_check {now() - self.start:6.1f}s] {name}: {record['status']} {record['detail']}", flush=True)
        self.write_reports()

    # ----------------------------------------------------------------------------------- stages
    def preflight(self, limit):
        """What would make the build or the tests fail for a reason outside kdfast, found in seconds."""
        import torch

        setup = _setup_module()
        problems, facts = [], {}
        facts["torch"] = torch.__version__
        if setup.torch_version() < setup.MIN_TORCH_FOR_CUDA:
            problems.append(f"torch {torch.__version__} < {'.'.join(map(str, setup.MIN_TORCH_FOR_CUDA))} "
                            "(primitives.cu's bmm/baddbmm with out_dtype)")
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_module  # noqa: F401  (pip's ninja puts its binary on PATH via this module)

                ninja = "python module"
            except ImportError:
                problems.append("ninja not found (setup.py would compile serially and overrun the build limit)")
        facts["ninja"] = ninja or "missing"
        nvcc_release = None
        if shutil.which("nvcc"):
            _, v = self.sh(["nvcc", "--version"], "preflight.txt", min(limit, 8))
            m = re.search(r"release (\d+)\.(\d+)", v)
            nvcc_release = f"{m.group(1)}.{m.group(2)}" if m else None
        facts["nvcc"], facts["torch CUDA"] = nvcc_release, torch.version.cuda
        if not self.dry:
            if nvcc_release is None:
                problems.append("nvcc not found")
            elif torch.version.cuda is None:
                problems.append("torch is a CPU build")
            elif nvcc_release.split(".")[0] != torch.version.cuda.split(".")[0]:
                problems.append(f"nvcc CUDA {nvcc_release} and torch CUDA {torch.version.cuda} differ in major version")
        self.results["preflight"] = facts
        detail = ", ".join(f"{k} {v}" for k, v in facts.items())
        if problems:
            return "fail", "; ".join(problems) + f" ({detail})"
        return "pass", detail + (" (dry run: CUDA versions not compared)" if self.dry else "")

    def environment(self, limit):
        import torch

        env = {
            "python": platform.python_version(), "torch": torch.__version__, "torch CUDA": torch.version.cuda,
            "CPU cores": os.cpu_count(), "CUDA available": torch.cuda.is_available(),
        }
        if shutil.which("nvidia-smi"):
            self.sh(["nvidia-smi"], "nvidia-smi.txt", 15)
            _, q = self.sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                            "--format=csv,noheader"], "nvidia-smi.txt", 15)
            env["nvidia-smi"] = q.strip().splitlines()[-1] if q.strip() else ""
        if shutil.which("nvcc"):
            _, v = self.sh(["nvcc", "--version"], "environment.txt", 15)
            env["nvcc"] = next((line.strip() for line in v.splitlines() if "release" in line), v.strip()[-80:])
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "SMs": p.multi_processor_count,
                             "memory GiB": round(p.total_memory / 2**30, 1),
                             "shared memory per block (opt-in) KiB": getattr(p, "shared_memory_per_block_optin", 0) // 1024,
                             "L2 MiB": round(getattr(p, "L2_cache_size", 0) / 2**20, 1)}
        self.results["environment"] = env
        # The ceilings are measured in a background thread while the build compiles (the GPU is idle then).
        out = self.log_path("ceilings.json")
        device = "cpu" if self.dry else "cuda"

        def ceilings():
            try:
                measure_ceilings(out, device)
            except Exception as exc:  # noqa: BLE001  reported in the summary; the floors are then left out
                with open(self.log_path("ceilings.log"), "w") as f:
                    f.write(f"{type(exc).__name__}: {exc}\n")

        self.ceilings_thread = threading.Thread(target=ceilings, daemon=True)
        self.ceilings_thread.start()
        if not self.dry and not torch.cuda.is_available():
            return "fail", "no CUDA device visible to torch"
        return "pass", env.get("device", {}).get("name", "no GPU") if isinstance(env.get("device"), dict) else "no GPU"

    def build(self, limit):
        flags = _setup_module().compile_args(with_cuda=True)
        problems = [f for f in flags["nvcc"] + flags["cxx"] if f.startswith("-std=") or "fast_math" in f or "fast-math" in f]
        if problems:
            return "fail", f"setup.py compile flags must not carry {problems}"
        if self.dry:
            problem = _load_extension(want_cuda=False)
            self.wait_ceilings()
            return ("fail" if problem else "pass"), ("dry run: not rebuilt; flags checked (no -std, no fast math); "
                                                      + (problem or "the built extension loads"))
        env = dict(self.env, KDFAST_WITH_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="16")
        code, text = self.sh([sys.executable, "setup.py", "build_ext", "--inplace"], "build.log", limit, env=env)
        self.wait_ceilings()
        if code != 0:
            errors = [line for line in text.splitlines() if "error" in line.lower()][:5]
            return "fail", f"build exit {code}: " + " | ".join(errors)[:400]
        problem = _load_extension(want_cuda=True)
        return ("fail" if problem else "pass"), problem or "built in place with its CUDA kernels (sm_90)"

    def wait_ceilings(self):
        if self.ceilings_thread is not None:
            self.ceilings_thread.join(timeout=max(1.0, min(120.0, self.remaining())))
        path = self.log_path("ceilings.json")
        if os.path.exists(path):
            with open(path) as f:
                self.results["ceilings"] = json.load(f)

    def sass(self, limit):
        so = sorted(glob.glob(os.path.join(ROOT, "kdfast", "_C*.so")))
        if self.dry or not so or not shutil.which("cuobjdump"):
            return "skipped", "skipped: no GPU" + ("" if self.dry else " build or no cuobjdump")
        code, res = self.sh(["cuobjdump", "-res-usage", so[0]], "cuobjdump-res-usage.txt", limit / 2)
        code2, sass = self.sh(["cuobjdump", "-sass", so[0]], "cuobjdump-sass.txt", limit / 2)
        kernels = _parse_resources(res)
        _add_sass_counts(kernels, sass)
        names = _demangle([k["kernel"] for k in kernels])
        for k, n in zip(kernels, names):
            k["name"] = n
        self.results["kernels"] = kernels
        spills = [k["name"] for k in kernels if k.get("local_bytes") or k.get("LDL/STL")]
        if code != 0 or code2 != 0 or not kernels:
            return "fail", f"cuobjdump exit {code}/{code2}, {len(kernels)} kernels parsed"
        return "pass", f"{len(kernels)} kernels; local memory or spills in: {', '.join(spills) or 'none'}"

    def pytest(self, marker, junit, log, limit, tests=None, keyword=None, env=None):
        """One pytest process; returns (status, detail, exit code, counts)."""
        cmd = [sys.executable, "-m", "pytest", tests or os.path.join(ROOT, "tests"), "-m", marker, "-q", "-rfEs",
               "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit2"]
        if keyword:
            cmd += ["-k", keyword]
        code, text = self.sh(cmd, log, limit, env=env)
        tail = next((line for line in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|skipped|error|deselected)", line)), "")
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}
        if code is None:
            return "fail", f"timed out: {tail.strip('= ')}", code, counts
        if self.dry:
            ok = code in (0, 5) and not counts.get("failed") and not counts.get("error") and not counts.get("errors")
            return ("skipped" if ok else "fail"), f"skipped: no GPU ({tail.strip('= ') or 'nothing collected'})", code, counts
        if code == 0 and counts.get("passed"):
            return "pass", tail.strip("= "), code, counts
        return "fail", tail.strip("= ") or f"pytest exit {code}", code, counts

    def kernel_tests(self, limit):
        """The kernel tests, one process per op (a sticky CUDA error stays within its op)."""
        tests = _kernel_test_file()
        env = dict(self.env, CUBLAS_WORKSPACE_CONFIG=":4096:8")  # cuBLAS bit-exact across streams and runs
        groups = list(TEST_OPS) + [(OTHER_TESTS, "not (" + " or ".join(k for _, k in TEST_OPS) + ")")]
        per_op, statuses, junits = {}, [], []
        end = now() + limit
        for i, (op, keyword) in enumerate(groups):
            junit = self.log_path(f"junit-kernels-{i}.xml")
            budget = max(1.0, (end - now()) / (len(groups) - i))
            status, detail, code, counts = self.pytest("cuda_kernels", junit, "pytest-kernels.log", budget,
                                                       tests=tests, keyword=keyword, env=env)
            row = _junit_counts(junit)
            row.update(status=status, exit=code)
            if code is None:
                row["first failure"] = f"timed out after {budget:.0f} s: {detail}"
            elif status == "fail" and not row.get("first failure"):
                row["first failure"] = detail
            per_op[op] = row
            statuses.append(status)
            junits.append(junit)
        _merge_junit(junits, os.path.join(self.out, "junit-kernels.xml"))
        self.results["kernel tests per op"] = per_op
        total = {k: sum(r[k] for r in per_op.values()) for k in ("passed", "failed", "skipped")}
        self.results.setdefault("tests", {})["cuda_kernels"] = {
            "exit": max((r["exit"] or 0) if r["exit"] is not None else 124 for r in per_op.values()),
            "summary": f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped "
                       f"in {len(groups)} processes", **total}
        failed = [op for op, r in per_op.items() if r["status"] == "fail"]
        if failed:
            return "fail", "; ".join(f"{op}: {per_op[op].get('first failure', '')}"[:160] for op in failed)
        if self.dry:
            return "skipped", f"skipped: no GPU ({self.results['tests']['cuda_kernels']['summary']})"
        return "pass", self.results["tests"]["cuda_kernels"]["summary"]

    def sanitizer(self, limit):
        cases = [sys.executable, os.path.join(ROOT, "tools", "gpu_sanitize_cases.py")]
        if self.dry or not shutil.which("compute-sanitizer"):
            code, text = self.sh(cases + ["--device", "cpu"], "sanitizer.log", limit)
            ran = "cases ran on the CPU" if code == 0 else f"cases FAILED on the CPU (exit {code})"
            if not self.dry:
                return "fail", f"compute-sanitizer not found; {ran}"
            return ("skipped" if code == 0 else "fail"), f"skipped: no GPU ({ran}, without compute-sanitizer)"
        out = {}
        # Without the caching allocator every tensor is its own cudaMalloc: memcheck sees accesses past it.
        env = dict(self.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        end = now() + limit
        for i, tool in enumerate(SANITIZER_TOOLS):
            budget = max(1.0, (end - now()) / (len(SANITIZER_TOOLS) - i))
            cmd = ["compute-sanitizer", "--tool", tool, "--kernel-name", "kns=kdfast", "--error-exitcode", "99",
                   *cases, "--device", "cuda"]
            code, text = self.sh(cmd, f"sanitizer-{tool}.log", budget, env=env)
            if code not in (0, 99, None) and "kernel-name" in text:  # an older sanitizer: the --filter spelling
                cmd[3:5] = ["--filter", "kns=kdfast"]
                code, text = self.sh(cmd, f"sanitizer-{tool}.log", budget, env=env)
            summary = re.findall(r"(?:ERROR|RACECHECK|SYNCCHECK|INITCHECK) SUMMARY: .*", text)
            out[tool] = {"exit": code, "summary": summary[-1] if summary else "",
                         "cases ran": "every kdfast kernel ran" in text}
        self.results["sanitizer"] = out
        ok = all(v["exit"] == 0 and v["cases ran"] for v in out.values())
        detail = "; ".join(f"{t}: {v['summary'] or 'exit ' + str(v['exit'])}" for t, v in out.items())
        return ("pass" if ok else "fail"), detail

    def benchmark(self, limit):
        out = self.log_path("bench.json")
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_bench.py"), "--out", out,
               "--ceilings", self.log_path("ceilings.json"), "--log", self.log_path("bench-rows.jsonl")]
        cmd += ["--device", "cpu", "--tiny"] if self.dry else ["--device", "cuda"]
        code, text = self.sh(cmd, "bench.log", limit)
        rows = []
        if os.path.exists(out):
            with open(out) as f:
                rows = json.load(f)["rows"]
        elif os.path.exists(self.log_path("bench-rows.jsonl")):  # cut short: the rows timed so far
            with open(self.log_path("bench-rows.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.startswith("{")]
        self.results["benchmark"] = rows
        errors = [r for r in rows if "error" in r and r["impl"].startswith("kdfast")]
        detail = f"{sum('seconds' in r for r in rows)} timings" + (" (cut short by its time limit)" if code is None else "")
        if errors:
            detail += f"; kdfast errors: {errors[0]['op']} {errors[0]['impl']}: {errors[0]['error']}"
        status = "fail" if errors or (code not in (0, None)) or not rows else "pass"
        if self.dry and status == "pass":
            detail = "dry run on the CPU, tiny shapes: " + detail
        return status, detail

    def default_tests(self, limit):
        if self.dry:
            return "skipped", "skipped: no GPU"
        marker = "needs_cuda and not cuda_kernels"
        status, detail, code, counts = self.pytest(marker, os.path.join(self.out, "junit-default.xml"),
                                                   "pytest-default.log", limit)
        self.results.setdefault("tests", {})[marker] = {"exit": code, "summary": detail, **counts}
        return status, detail

    # ----------------------------------------------------------------------------------- reports
    def write_reports(self):
        self.results["elapsed seconds"] = round(now() - self.start, 1)
        _write(os.path.join(self.out, "results.json"), json.dumps(self.results, indent=1, default=str))
        _write(os.path.join(self.out, "summary.md"), render_summary(self.results))

    def finish(self):
        self.write_reports()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for path in sorted(glob.glob(os.path.join(self.logs, "*"))):
                tar.add(path, arcname=os.path.join("logs", os.path.basename(path)))
        _write(os.path.join(self.out, "logs.tar.gz"), buf.getvalue(), binary=True)
        shutil.rmtree(self.logs, ignore_errors=True)
        for junit in ("junit-kernels.xml", "junit-default.xml"):  # the same files every run
            path = os.path.join(self.out, junit)
            if not os.path.exists(path):
                _write(path, '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="0" '
                             'skipped="0" failures="0" errors="0"/></testsuites>\n')
        with open(os.path.join(self.out, "summary.md")) as f:
            print(f.read())
        return 1 if any(s["status"] == "fail" for s in self.stages) else 0


# --------------------------------------------------------------------------------------- helpers
def _utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _write(path, data, binary=False):
    tmp = path + ".tmp"
    with open(tmp, "wb" if binary else "w") as f:
        f.write(data)
    os.replace(tmp, path)


def _load_extension(want_cuda: bool):
    """None if kdfast._C (this checkout's) loads, matches torch and has CUDA kernels when wanted; else why not."""
    try:
        sys.path.insert(0, ROOT)
        from kdfast import _ext

        if _ext.problem() is not None:
            return _ext.problem()
        if want_cuda and not _ext.has_cuda_kernels():
            return "the build has no CUDA kernels"
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def _kernel_test_file():
    found = sorted(glob.glob(os.path.join(ROOT, "tests", "**", "test_cuda_kernels.py"), recursive=True))
    return found[0] if found else os.path.join(ROOT, "tests")


def _junit_counts(junit_path):
    """{passed, failed, skipped, first failure} from one pytest process's junit XML."""
    import xml.etree.ElementTree as ET

    row = {"passed": 0, "failed": 0, "skipped": 0}
    if not os.path.exists(junit_path):
        return row
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            row["failed"] += 1
            if "first failure" not in row:
                row["first failure"] = f"{case.get('name', '')}: {(bad.get('message') or '').splitlines()[0][:200] if bad.get('message') else ''}"
        elif case.find("skipped") is not None:
            row["skipped"] += 1
        else:
            row["passed"] += 1
    return row


def _merge_junit(paths, out_path):
    """The per-op junit files as one (one <testsuite> per process)."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites")
    for path in paths:
        if os.path.exists(path):
            tree = ET.parse(path).getroot()
            root.extend(tree.iter("testsuite") if tree.tag == "testsuites" else [tree])
    _write(out_path, '<?xml version="1.0" encoding="utf-8"?>' + ET.tostring(root, encoding="unicode") + "\n")


def _setup_module():
    spec = importlib.util.spec_from_file_location("kdfast_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse_resources(text):
    """cuobjdump -res-usage lines: 'Function NAME:' then 'REG:n STACK:n SHARED:n LOCAL:n ...'."""
    kernels, current = [], None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = {"kernel": m.group(1)}
            kernels.append(current)
            continue
        if current is not None and "REG:" in line:
            for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL|TEXTURE|SURFACE|SAMPLER):(\d+)", line):
                current[{"REG": "registers", "STACK": "stack_bytes", "SHARED": "static_shared_bytes",
                         "LOCAL": "local_bytes"}.get(key, key.lower())] = int(value)
    return [k for k in kernels if "registers" in k]


def _add_sass_counts(kernels, sass):
    by_name = {k["kernel"]: k for k in kernels}
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = by_name.get(m.group(1))
            if current is not None:
                current.update({"HGMMA": 0, "HMMA": 0, "FFMA": 0, "LDG.128": 0, "LDS": 0, "LDL/STL": 0, "instructions": 0})
            continue
        if current is None or not re.search(r"/\*[0-9a-f]{4,}\*/", line):
            continue
        current["instructions"] += 1
        for key, pattern in (("HGMMA", r"\bHGMMA"), ("HMMA", r"\bHMMA"), ("FFMA", r"\bFFMA"), ("LDS", r"\bLDS"),
                             ("LDG.128", r"\bLDG\.E\.128|\bLDG\.E\.(?:\w+\.)*128"), ("LDL/STL", r"\b(?:LDL|STL)\b")):
            if re.search(pattern, line):
                current[key] += 1


def _demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return names
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return [n[:160] for n in out] if len(out) == len(names) else names


def render_summary(r):
    lines = [f"# kdfast gpu-check ({r['mode']})", "", f"Started {r['started']}, {r.get('elapsed seconds', 0)} s so far.", ""]
    env = r.get("environment", {})
    if env:
        lines += ["## Environment", "", "| item | value |", "|---|---|"]
        lines += [f"| {k} | {json.dumps(v) if isinstance(v, dict) else v} |" for k, v in env.items()]
        lines.append("")
    lines += ["## Stages", "", "| stage | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {str(s['detail']).replace('|', '/')[:300]} |"
              for s in r["stages"]]
    lines.append("")
    c = r.get("ceilings")
    if c:
        lines += ["## Measured ceilings", "", "| ceiling | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in c.items()]
        lines.append("")
    if r.get("tests"):
        lines += ["## Tests", "", "| selection | exit | summary |", "|---|---|---|"]
        lines += [f"| `-m {m}` | {t['exit']} | {t['summary']} |" for m, t in r["tests"].items()]
        lines.append("")
    if r.get("kernel tests per op"):
        lines += ["## CUDA kernel tests per op (kernels forced on, vs ATen path and float64 reference; one process "
                  "per op)", "", "| op | passed | failed | skipped | first failure |", "|---|---|---|---|---|"]
        lines += [f"| {op} | {v['passed']} | {v['failed']} | {v['skipped']} | "
                  f"{str(v.get('first failure', '')).replace('|', '/')[:200]} |"
                  for op, v in r["kernel tests per op"].items()]
        lines.append("")
    if r.get("kernels"):
        lines += ["## Kernels (cuobjdump)", "",
                  "| kernel | regs | stack B | static smem B | local B | HGMMA | HMMA | FFMA | LDG.128 | LDL/STL |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for k in r["kernels"]:
            lines.append(f"| `{k.get('name', k['kernel'])[:90]}` | {k.get('registers')} | {k.get('stack_bytes')} | "
                         f"{k.get('static_shared_bytes')} | {k.get('local_bytes')} | {k.get('HGMMA', '')} | "
                         f"{k.get('HMMA', '')} | {k.get('FFMA', '')} | {k.get('LDG.128', '')} | {k.get('LDL/STL', '')} |")
        lines.append("")
    if r.get("sanitizer"):
        lines += ["## compute-sanitizer", "", "| tool | exit | summary |", "|---|---|---|"]
        lines += [f"| {t} | {v['exit']} | {v['summary']} |" for t, v in r["sanitizer"].items()]
        lines.append("")
    rows = r.get("benchmark") or []
    if rows:
        lines += ["## Benchmark per op", "",
                  "Median seconds (CUDA events on the GPU); floor = max(GEMM FLOPs / matmul rate, bytes / copy rate); "
                  "fraction = floor / time. kdfast-aten is the CUDA default; kdfast-kernel the hand-written kernel.", "",
                  "| op | shape | dtype | impl | ms | floor ms | fraction of floor | vs kdfast-aten |",
                  "|---|---|---|---|---|---|---|---|"]
        aten = {(x["op"], x["shape"], x["dtype"]): x.get("seconds") for x in rows if x["impl"] == "kdfast-aten"}
        for x in rows:
            t = x.get("seconds")
            base = aten.get((x["op"], x["shape"], x["dtype"]))
            ms = f"{t * 1e3:.3f}" if t else x.get("error", "")[:60]
            fl = f"{x['floor_seconds'] * 1e3:.3f}" if "floor_seconds" in x else ""
            frac = f"{x['fraction_of_floor']:.2f}" if "fraction_of_floor" in x else ""
            speed = f"{base / t:.2f}x" if t and base else ""
            lines.append(f"| {x['op']} | {x['shape']} | {x['dtype']} | {x['impl']} | {ms} | {fl} | {frac} | {speed} |")
        lines.append("")
    failed = [s["stage"] for s in r["stages"] if s["status"] == "fail"]
    lines.append(f"**Result: {'FAIL (' + ', '.join(failed) + ')' if failed else 'no stage failed'}.** "
                 "A table entry of csrc/ops/kernel_paths.cpp may be marked verified only where this run's cuda tests "
                 "and sanitizer passed and the benchmark shows the kernel faster than kdfast-aten.")
    return "\n".join(lines) + "\n"


def measure_ceilings(path, device):
    """Device-to-device copy GB/s (bytes read + written) and matmul TFLOP/s (random data), CUDA events."""
    import torch

    def timed(fn, reps, warmup=3):
        for _ in range(warmup):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    gpu = device == "cuda"
    n = (2 << 30) if gpu else (8 << 20)  # bytes per buffer: 2 GiB on the GPU, 8 MiB for the dry run
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), 10)
    del src, dst
    out = {"device": device, "copy_gbps": 2 * n / copy_s / 1e9}
    for key, size, dtype in (("matmul_bf16_tflops", 8192 if gpu else 256, torch.bfloat16),
                             ("matmul_fp32_tflops", 4096 if gpu else 256, torch.float32)):
        a, b = torch.randn(size, size, device=device).to(dtype), torch.randn(size, size, device=device).to(dtype)
        seconds = timed(lambda: a @ b, 10 if gpu else 2)
        out[key] = 2 * size**3 / seconds / 1e12
        out[key.replace("tflops", "size")] = size
    if gpu:
        out["tf32 allowed (matmul, cudnn)"] = [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
        del a, b
        torch.cuda.empty_cache()  # the later stages run in other processes
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (created; at most 8 files are written into it)")
    parser.add_argument("--dry-run", action="store_true", help="the same stages on the CPU with tiny shapes")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out DIR is required (make gpu-check OUT=<dir>)")
    os.makedirs(args.out, exist_ok=True)
    check = Check(os.path.abspath(args.out), args.dry_run)
    check.write_reports()
    check.stage("preflight", check.preflight)
    check.stage("environment", check.environment)
    check.stage("build", check.build)
    check.stage("sass", check.sass)
    check.stage("cuda tests", check.kernel_tests)
    check.stage("benchmark", check.benchmark)
    check.stage("sanitizer", check.sanitizer)
    check.stage("default-path tests", check.default_tests)
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())
