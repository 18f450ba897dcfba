"""pytest hooks of the benchmark suite: machine info, the untimed-case records in the JSON, options.

* ``--kdfast-oom=PATH``: also write the cases that were not timed (OOM, unsupported) to PATH.
* ``--kdfast-keep-data``: keep pytest-benchmark's raw per-round timings in --benchmark-json
  (dropped by default so a result file stays small).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

import kdfast  # noqa: E402
import kdfast.info  # noqa: E402
from kdfast import _ext  # noqa: E402

_LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None
_CPU_TIMES_AT_START = harness.cpu_times()


def pytest_addoption(parser):
    group = parser.getgroup("kdfast benchmarks")
    group.addoption("--kdfast-oom", metavar="PATH", default=None, help="also write untimed cases (OOM, unsupported) to PATH as JSON")
    group.addoption("--kdfast-keep-data", action="store_true", default=False, help="keep raw per-round timings in --benchmark-json")


@pytest.fixture(scope="session", autouse=True)
def _kdfast_session(request):
    # The compiled ops must be usable: a stale or missing build is an error, not a skipped benchmark.
    _ext.require_ops()
    if not request.config.getoption("benchmark_disable", False):
        for device in harness.devices():
            harness.CEILINGS[device] = harness.matmul_ceiling(device)
    yield


def _cpu_model() -> str:
    try:
        import cpuinfo

        return cpuinfo.get_cpu_info().get("brand_raw") or platform.processor()
    except Exception:  # noqa: BLE001
        with contextlib.suppress(OSError):  # not Linux
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _binary_identity() -> dict | None:
    """Which build of kdfast._C was measured: path, mtime and a hash prefix of the loaded file."""
    import hashlib

    mod = sys.modules.get("kdfast._C")
    path = getattr(mod, "__file__", None)
    if not path or not os.path.exists(path):
        return None
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:16]
    mtime = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
    return {"file": os.path.basename(path), "mtime": mtime.isoformat(timespec="seconds"), "sha256_16": digest}


_BINARY_AT_START = _binary_identity()


def _kdfast_machine_info() -> dict:
    info = {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v)) for k, v in kdfast.info.collect().items()}
    out = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mem_available_gib": round((harness.mem_available_bytes() or 0) / harness.GiB, 1),
        "load_avg_start": _LOAD_AT_START,
        "load_avg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cpu_steal_pct_session": harness.steal_percent(_CPU_TIMES_AT_START, harness.cpu_times()),
        "cpu_others_pct_session": harness.others_percent(_CPU_TIMES_AT_START, harness.cpu_times()),
        "kdfast_binary": _BINARY_AT_START,
        "kdfast_binary_changed_during_run": _binary_identity() != _BINARY_AT_START,
        "quick_mode": harness.QUICK,
        "matmul_ceiling": harness.CEILINGS,
        "kdfast_info": info,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["kdfast"] = _kdfast_machine_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["kdfast"] = {"not_run": list(harness.NOT_RUN), "quick_mode": harness.QUICK}
    if not config.getoption("kdfast_keep_data"):
        for bench in output_json.get("benchmarks", []):
            bench.get("stats", {}).pop("data", None)


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("kdfast_oom", None)
    if path:
        with open(path, "w") as fh:
            json.dump({"not_run": harness.NOT_RUN, "machine_info": {"kdfast": _kdfast_machine_info()}}, fh, indent=1, default=str)


def pytest_terminal_summary(terminalreporter):
    if not harness.NOT_RUN:
        return
    terminalreporter.section("kdfast: cases not timed (results, not failures)")
    for rec in harness.NOT_RUN:
        terminalreporter.write_line(f"{rec['group']:<55} {rec['extra_info'].get('impl', ''):<13} {rec['status']}")
