"""Machinery of the kdfast benchmarks (imported by conftest.py and bench_losses.py).

* memory budgets and the "estimated out of memory" decision,
* peak memory of one forward + backward (CPU: allocator events of torch.profiler; CUDA: the
  caching allocator's peak counter),
* the timing of one case through pytest-benchmark's ``pedantic`` mode,
* the records of cases that were not timed (out of memory, unsupported), which conftest.py puts
  into the benchmark JSON (key ``"kdfast"``) so that report.py can show them as cells.
"""
from __future__ import annotations

import gc
import contextlib
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

GiB = 1024**3
MiB = 1024**2

#: KDFAST_BENCH_QUICK=1: CIFAR shapes and the headline NST shape only, 3 rounds each.
QUICK = os.environ.get("KDFAST_BENCH_QUICK", "0") not in ("", "0")
#: Default CPU memory budget (GiB); KDFAST_BENCH_MEM_GB overrides it (CPU and CUDA).
DEFAULT_CPU_BUDGET_GB = 8.0
#: Full mode: rounds are chosen so a case takes about this many seconds of timed calls ...
TARGET_SECONDS = float(os.environ.get("KDFAST_BENCH_TARGET_S", "3"))
#: ... within these bounds.
MIN_ROUNDS, MAX_ROUNDS, QUICK_ROUNDS = 3, 200, 3
#: Cells timed while the hypervisor stole at least this share of CPU time are flagged noisy.
STEAL_WARN_PCT = 2.0
#: ... or while other processes in the machine used at least this share of all CPUs' time.
OTHERS_WARN_PCT = 10.0
#: A case whose first (untimed) call took longer than this gets no extra warm-up round.
WARMUP_SKIP_SECONDS = 1.0


# --------------------------------------------------------------------------------------- devices
def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------- memory
def fmt_gib(nbytes: float) -> str:
    gib = nbytes / GiB
    return f"{gib:.1f}" if gib >= 1 else f"{gib:.2g}"


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    with contextlib.suppress(OSError):  # not Linux
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def memory_budget(device: str) -> tuple[int, str]:
    """(bytes, how it was chosen). CPU: KDFAST_BENCH_MEM_GB or 8 GiB, capped at 80% of MemAvailable
    (an allocation past physical memory would get the process killed, not raise). CUDA:
    KDFAST_BENCH_MEM_GB or the free device memory, whichever is smaller."""
    env = os.environ.get("KDFAST_BENCH_MEM_GB")
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        if env:
            return min(int(float(env) * GiB), free), f"KDFAST_BENCH_MEM_GB={env}, free {free / GiB:.1f} GiB"
        return free, "free CUDA memory"
    wanted = int(float(env) * GiB) if env else int(DEFAULT_CPU_BUDGET_GB * GiB)
    source = f"KDFAST_BENCH_MEM_GB={env}" if env else f"default {DEFAULT_CPU_BUDGET_GB:g} GiB"
    avail = mem_available_bytes()
    if avail is not None and 0.8 * avail < wanted:
        return int(0.8 * avail), f"{source}, capped at 80% of MemAvailable"
    return wanted, source


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(
            s in text
            for s in ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory", "bad_alloc")
        )
    return False


def cpu_peak_bytes(step) -> int:
    """Peak of (bytes allocated - bytes freed) through the CPU allocator during one call of
    ``step``, counted from the call's start (tensors alive before it, such as the inputs, are not
    counted). Method: torch.profiler with profile_memory=True records one "[memory]" event per
    allocation (+bytes) and free (-bytes); the running sum of those, in time order, peaks here."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
        del out
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def cuda_peak_bytes(step) -> int:
    """max_memory_allocated during one call minus memory_allocated before it (same meaning as on CPU)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def peak_bytes(step, device: str) -> int:
    return cuda_peak_bytes(step) if device == "cuda" else cpu_peak_bytes(step)


def cpu_times() -> tuple[int, int, int, float] | None:
    """(steal, busy, total) jiffies of all CPUs from /proc/stat (Linux) and this process's CPU
    seconds, else None. Steal is time the hypervisor ran something else while this VM wanted the
    CPU; busy minus this process's own CPU time is what other processes in the VM used. Both
    inflate wall-clock timings."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        v = [int(x) for x in fields[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
        busy = v[0] + v[1] + v[2] + v[5] + v[6]
        steal = v[7] if len(v) > 7 else 0
        own = os.times()
        return steal, busy, sum(v[:8]), own.user + own.system
    except (OSError, ValueError, IndexError):
        return None


def steal_percent(before, after) -> float | None:
    """Share of all CPUs' time stolen by the hypervisor between two cpu_times() snapshots."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[2] - before[2])


def others_percent(before, after) -> float | None:
    """Share of all CPUs' time used by other processes (and the kernel) between two snapshots."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy_s = (after[1] - before[1]) / tick
    own_s = after[3] - before[3]
    return max(0.0, 100.0 * (busy_s - own_s) / ((after[2] - before[2]) / tick))


def release_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------- matmul ceiling
def matmul_ceiling(device: str) -> dict:
    """Measured throughput of one large square torch.matmul per dtype (GFLOP/s), best of a few:
    the ceiling the achieved GFLOP/s of the Gram GEMMs are compared against."""
    out = {}
    n = 8192 if device == "cuda" else 2048
    reps = 10 if device == "cuda" else 5
    for dtype in dtypes(device):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)
        synchronize(device)
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            torch.matmul(a, b)
            synchronize(device)
            best = min(best, time.perf_counter() - t)
        out[dtype_name(dtype)] = {"n": n, "gflops": 2 * n**3 / best / 1e9}
        del a, b
    release_memory(device)
    return out


# --------------------------------------------------------------------------------------- records
#: Cases that were not timed (dicts with the benchmark's name, group and extra_info, status and kind).
NOT_RUN: list[dict] = []
#: Filled once per session by conftest.py: {device: matmul_ceiling(device)}.
CEILINGS: dict = {}


@dataclass
class Case:
    """One benchmark cell: a loss formulation on inputs of one shape, dtype and device."""

    loss: str  # group prefix: "nst-poly", "nst-linear", "nst-gaussian", "fsp"
    impl: str  # "kdfast", "bmm", "repdistiller", "torchdistill"
    shape_label: str
    shape: dict
    tier: str  # "cifar", "imagenet", "headline"
    dtype: torch.dtype
    device: str
    make_inputs: object  # () -> tuple of tensors; those with requires_grad are differentiated
    loss_fn: object  # (*inputs) -> scalar loss
    input_bytes: int
    est_extra_bytes: int  # estimated peak bytes of one fwd + bwd above the inputs
    gemm_flops: float  # Gram GEMM FLOPs of this formulation, forward + backward
    unsupported: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def group(self) -> str:
        return f"{self.loss} {self.shape_label} {dtype_name(self.dtype)} {self.device}"


def _record_not_run(benchmark, case: Case, status: str, kind: str) -> None:
    benchmark.extra_info["status"] = status
    NOT_RUN.append(
        {
            "name": benchmark.name,
            "fullname": benchmark.fullname,
            "group": case.group,
            "kind": kind,
            "status": status,
            "extra_info": dict(benchmark.extra_info),
        }
    )
    # The case is a result, kept in NOT_RUN and written into the JSON by conftest.py. Mark the
    # fixture as used on purpose so pytest-benchmark does not warn "fixture was not used at all"
    # (it resets `skipped` from the test outcome, so the mode is what sticks).
    benchmark.skipped = True
    benchmark._mode = "not run (recorded by benchmarks/harness.py)"


def run_case(benchmark, case: Case) -> None:
    """Times forward + backward of ``case`` (or records why not) and fills benchmark.extra_info."""
    benchmark.group = case.group
    budget, budget_source = memory_budget(case.device)
    est_total = case.input_bytes + case.est_extra_bytes
    benchmark.extra_info.update(
        {
            "loss": case.loss,
            "impl": case.impl,
            "shape": case.shape_label,
            **case.shape,
            "tier": case.tier,
            "dtype": dtype_name(case.dtype),
            "device": case.device,
            "threads": torch.get_num_threads(),
            "gemm_flops": case.gemm_flops,
            "input_bytes": case.input_bytes,
            "est_peak_bytes": case.est_extra_bytes,
            "budget_bytes": budget,
            "budget_source": budget_source,
            **case.info,
        }
    )
    if case.unsupported:
        _record_not_run(benchmark, case, f"unsupported ({case.unsupported})", "unsupported")
        return
    if est_total > budget:
        _record_not_run(
            benchmark,
            case,
            f"out of memory (estimated {fmt_gib(est_total)} GiB > budget {fmt_gib(budget)} GiB)",
            "oom",
        )
        return

    inputs = grads = None
    try:
        torch.manual_seed(0)
        inputs = case.make_inputs()
        wrt = tuple(x for x in inputs if x.requires_grad)

        def step():
            loss = case.loss_fn(*inputs)
            # torch.autograd.grad: nothing accumulates into .grad between rounds.
            out = torch.autograd.grad(loss, wrt)
            synchronize(case.device)
            return out

        if benchmark.disabled:  # --benchmark-disable: one call, a smoke test
            grads = benchmark.pedantic(step, rounds=1, iterations=1)
            _check_finite(grads, case)
            benchmark.extra_info["status"] = "ok (not timed: --benchmark-disable)"
            return

        start = time.perf_counter()
        grads = step()
        first = time.perf_counter() - start
        _check_finite(grads, case)
        grads = None
        time_rounds(benchmark, step, case.device, first)
    except Exception as exc:  # noqa: BLE001 - only OOM is swallowed
        if not is_oom(exc):
            raise
        inputs = grads = None
        release_memory(case.device)
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        _record_not_run(benchmark, case, f"out of memory ({type(exc).__name__}: {first_line})", "oom")
    finally:
        inputs = grads = None
        release_memory(case.device)



def time_rounds(benchmark, step, device: str, first_call_s: float) -> None:
    """Time ``step`` (already called once, in ``first_call_s`` seconds) with pytest-benchmark's
    pedantic mode and record in ``benchmark.extra_info`` what every report reads: the rounds (about
    TARGET_SECONDS of timed calls; QUICK_ROUNDS in quick mode), the warm-up, the CPU noise while
    timing (host steal, other processes), the peak memory of one call and the status (marked noisy
    past STEAL_WARN_PCT / OTHERS_WARN_PCT)."""
    if QUICK:
        rounds = QUICK_ROUNDS
    else:
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_SECONDS / max(first_call_s, 1e-6)))))
    warmup = 0 if first_call_s > WARMUP_SKIP_SECONDS else 1
    info = benchmark.extra_info
    info.update({"rounds": rounds, "warmup_rounds": warmup + 1, "first_call_s": first_call_s})
    t_before = cpu_times()
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    t_after = cpu_times()
    steal, others = steal_percent(t_before, t_after), others_percent(t_before, t_after)
    info["cpu_steal_pct"] = None if steal is None else round(steal, 2)
    info["cpu_others_pct"] = None if others is None else round(others, 2)
    info["peak_bytes"] = peak_bytes(step, device)
    info["peak_method"] = "torch.cuda.max_memory_allocated" if device == "cuda" else "torch.profiler memory events"
    noise = []
    if steal is not None and steal >= STEAL_WARN_PCT:
        noise.append(f"host CPU steal {steal:.0f}%")
    if others is not None and others >= OTHERS_WARN_PCT:
        noise.append(f"other processes {others:.0f}% of the CPUs")
    info["status"] = f"ok (noisy: {', '.join(noise)} while timing)" if noise else "ok"

PAIRED_ROUNDS = 100


def time_interleaved(benchmark, steps: dict, device: str, rounds: int) -> dict:
    """Time zero-argument ``steps`` {name: step} in turns, ``rounds`` rounds, the order rotated by one
    every round, so slow drift of a shared machine hits every step alike. Returns {name: [seconds
    per round]}; the caller has warmed the steps up."""
    times = {name: [] for name in steps}
    order = list(steps)

    def one_round():
        order.append(order.pop(0))
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    return times


def time_paired(benchmark, group: str, kdfast_step, baseline_step, device: str, info: dict) -> None:
    """Two zero-argument steps (kdfast's and one baseline's, e.g. forward + backward of the same
    computation on the same inputs) timed in alternation (time_interleaved); records the median over
    rounds of (baseline time / kdfast time) in the same round (> 1: kdfast faster) and its quartiles.
    Single cells timed one after another move by up to about 30% between runs on a shared machine;
    slow drift cancels in the per-round ratio. The suite key "paired" keeps these rows out of
    report.py's per-formulation tables (report.paired_table shows them)."""
    for step in (kdfast_step, baseline_step):  # warm-up, not recorded
        step()
    benchmark.group = group
    times = time_interleaved(benchmark, {"kdfast": kdfast_step, "baseline": baseline_step}, device,
                             QUICK_ROUNDS if QUICK else PAIRED_ROUNDS)
    ratios = sorted(b / k for b, k in zip(times["baseline"], times["kdfast"]))
    benchmark.extra_info.update({
        **info, "suite": "paired", "device": device, "rounds": len(ratios), "threads": torch.get_num_threads(),
        "median_s": {name: statistics.median(ts) for name, ts in times.items()},
        "ratio": statistics.median(ratios), "ratio_q1": ratios[len(ratios) // 4],
        "ratio_q3": ratios[(3 * len(ratios)) // 4], "status": "ok",
    })


def grad_step(loss_fn, inputs):
    """A step for time_paired: loss_fn(*inputs) and torch.autograd.grad w.r.t. the inputs that
    require grad (nothing accumulates into .grad between rounds)."""
    wrt = tuple(x for x in inputs if x.requires_grad)
    return lambda: torch.autograd.grad(loss_fn(*inputs), wrt)


def _check_finite(grads, case: Case) -> None:
    for g in grads:
        if not torch.isfinite(g).all():
            raise AssertionError(f"{case.group} {case.impl}: non-finite gradient")
