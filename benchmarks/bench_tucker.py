"""Benchmarks of the Tucker-2 convolution kdfast.ops.tucker_conv2d against the layer it replaces
and the other ways to run a Tucker-2 layer, forward and forward + backward in one run.

Formulations (one pytest-benchmark group per mode, shape, rank fraction, dtype and device):
  dense       F.conv2d with the reconstructed O x C x kh x kw weight (the layer being replaced);
  sequential  the 3-conv nn.Sequential(1x1 C->R_in, kxk R_in->R_out, 1x1 R_out->O + bias);
  tltorch     tensorly-torch's FactorizedConv (tucker, fixed_rank_modes='spatial',
              implementation='factorized'), when `import tltorch` works;
  kdfast      kdfast.ops.tucker_conv2d (extra_info["path"] says fused or composed);
  kdfast-fused  the same with KDFAST_TUCKER_CONV_PATH=fused (the fused kernel wherever it is supported),
              the evidence for the automatic fused / composed rule.
Modes: "fwd" (forward under torch.no_grad) and "fwd+bwd" (forward + gradients of x and every
weight). Shapes: every 3x3 conv of ResNet-18 and ResNet-50 (ImageNet, N = 1, 32, 128) and of the
CIFAR ResNets (resnet20/56: 16/32/64 channels at 32/16/8, N = 1, 128); ranks R = fraction x
channels for fractions 0.25 and 0.5 (EVBMF ranks are not included). cudnn.benchmark = True on GPU.

    pytest benchmarks/bench_tucker.py --benchmark-json=tucker.json          # full run
    KDFAST_BENCH_QUICK=1 pytest benchmarks/bench_tucker.py                  # a few small shapes
    python benchmarks/bench_tucker.py tucker.json [--out report.md]         # ratio tables

On GPU every kdfast cell also records the achieved bandwidth of the minimum traffic (read x once,
write y once) and the measured device-to-device copy bandwidth, as a fraction of it.
Uses benchmarks/harness.py (memory budget, peak memory, noise flags, untimed records) and
benchmarks/report.py (JSON loading, number formatting).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import QUICK  # noqa: E402

try:  # tensorly-torch: optional peer
    import tltorch

    TLTORCH_ERROR = None
except Exception as exc:  # noqa: BLE001
    tltorch, TLTORCH_ERROR = None, exc

IMPLS = ["dense", "sequential", "tltorch", "kdfast-fused", "kdfast"]
MODES = ["fwd", "fwd+bwd"]
RANK_FRACTIONS = [0.25, 0.5]

# (C, O, H, stride) of each distinct 3x3 conv. torchvision ResNet-50 (v1.5) strides on the 3x3.
RESNET18 = [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2), (256, 256, 14, 1),
            (256, 512, 14, 2), (512, 512, 7, 1)]
RESNET50 = [(64, 64, 56, 1), (128, 128, 56, 2), (128, 128, 28, 1), (256, 256, 28, 2), (256, 256, 14, 1),
            (512, 512, 14, 2), (512, 512, 7, 1)]
CIFAR_RESNET = [(16, 16, 32, 1), (16, 32, 32, 2), (32, 32, 16, 1), (32, 64, 16, 2), (64, 64, 8, 1)]


def _shapes():
    """[(label, tier, N, C, O, H, stride)]."""
    if QUICK:
        return [("cifar-16@32", "cifar", 8, 16, 16, 32, 1), ("cifar-32>64@16/s2", "cifar", 8, 32, 64, 16, 2),
                ("r18-256@14", "imagenet", 1, 256, 256, 14, 1)]
    out, seen = [], set()
    for net, convs in (("r18", RESNET18), ("r50", RESNET50)):
        for c, o, h, s in convs:
            for n in (1, 32, 128):
                if (n, c, o, h, s) in seen:  # shared by ResNet-18 and ResNet-50
                    continue
                seen.add((n, c, o, h, s))
                label = f"{net}-{c}{'' if c == o else f'>{o}'}@{h}{'/s2' if s == 2 else ''}-N{n}"
                out.append((label, "imagenet", n, c, o, h, s))
    for c, o, h, s in CIFAR_RESNET:
        for n in (1, 128):
            out.append((f"cifar-{c}{'' if c == o else f'>{o}'}@{h}{'/s2' if s == 2 else ''}-N{n}", "cifar", n, c, o, h, s))
    return out


def _dtypes(device):
    return [torch.float32] + ([torch.bfloat16, torch.float16] if device == "cuda" else [])


# =============================================================================================== layers
@contextlib.contextmanager
def forced_fused_path():
    """KDFAST_TUCKER_CONV_PATH=fused for the duration (the C++ rule reads it at each call)."""
    previous = os.environ.get("KDFAST_TUCKER_CONV_PATH")
    os.environ["KDFAST_TUCKER_CONV_PATH"] = "fused"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["KDFAST_TUCKER_CONV_PATH"]
        else:
            os.environ["KDFAST_TUCKER_CONV_PATH"] = previous


class Factors:
    """Random Tucker-2 factors of one layer, and every formulation built from the same numbers."""

    def __init__(self, c, o, r_in, r_out, stride, device, dtype):
        g = torch.Generator().manual_seed(0)
        mk = lambda *s: (torch.randn(*s, generator=g) / math.sqrt(s[-1])).to(device, dtype)  # noqa: E731
        self.first, self.core, self.last, self.bias = mk(r_in, c), mk(r_out, r_in, 3, 3), mk(o, r_out), mk(o)
        self.stride, self.c, self.o = stride, c, o
        for t in (self.first, self.core, self.last, self.bias):
            t.requires_grad_(True)

    def params(self):
        return [self.first, self.core, self.last, self.bias]

    def kdfast(self, force_fused=False):
        from kdfast import ops

        def call(x):
            return ops.tucker_conv2d(x, self.first, self.core, self.last, self.bias, stride=self.stride, padding=1)

        if not force_fused:
            return call

        def fused_call(x):
            with forced_fused_path():
                return call(x)

        return fused_call

    def sequential(self):
        seq = nn.Sequential(
            nn.Conv2d(self.c, self.first.shape[0], 1, bias=False),
            nn.Conv2d(self.first.shape[0], self.core.shape[0], 3, stride=self.stride, padding=1, bias=False),
            nn.Conv2d(self.core.shape[0], self.o, 1, bias=True),
        ).to(self.first.device, self.first.dtype)
        with torch.no_grad():
            seq[0].weight.copy_(self.first[:, :, None, None])
            seq[1].weight.copy_(self.core)
            seq[2].weight.copy_(self.last[:, :, None, None])
            seq[2].bias.copy_(self.bias)
        return seq, list(seq.parameters())

    def dense(self):
        conv = nn.Conv2d(self.c, self.o, 3, stride=self.stride, padding=1).to(self.first.device, self.first.dtype)
        with torch.no_grad():
            conv.weight.copy_(torch.einsum("or,rskl,sc->ockl", self.last, self.core, self.first))
            conv.bias.copy_(self.bias)
        return conv, list(conv.parameters())

    def tltorch(self):
        conv = nn.Conv2d(self.c, self.o, 3, stride=self.stride, padding=1)
        layer = tltorch.FactorizedConv.from_conv(
            conv, rank=(self.core.shape[0], self.core.shape[1], 3, 3), factorization="tucker",
            implementation="factorized", fixed_rank_modes="spatial", decompose_weights=False,
        ).to(self.first.device, self.first.dtype)
        return layer, list(layer.parameters())


# =============================================================================================== cases
COPY_GBPS: dict = {}


def copy_bandwidth_gbps(device) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time) of a 1 GiB tensor."""
    if device not in COPY_GBPS:
        src = torch.empty(256 * 1024**2, device=device)  # 1 GiB float32
        dst = torch.empty_like(src)
        dst.copy_(src)
        harness.synchronize(device)
        best = math.inf
        for _ in range(10):
            t = time.perf_counter()
            dst.copy_(src)
            harness.synchronize(device)
            best = min(best, time.perf_counter() - t)
        COPY_GBPS[device] = 2 * src.numel() * 4 / best / 1e9
        del src, dst
    return COPY_GBPS[device]


class _Group:  # what harness._record_not_run needs of a case
    def __init__(self, group):
        self.group = group


def _est_bytes(n, c, o, h, oh, r_in, r_out, elem, impl, mode):
    """Rough peak of one call above the inputs: output, intermediates, and in fwd+bwd the saved
    activations and every gradient (x-sized, weight-sized)."""
    x_b, y_b = n * c * h * h * elem, n * o * oh * oh * elem
    mid = n * (r_in * h * h + r_out * oh * oh) * elem
    if mode == "fwd":
        return y_b + (0 if impl == "dense" else mid)
    return 2 * y_b + x_b + (y_b if impl == "dense" else 2 * mid)


def run_tucker_case(benchmark, impl, mode, shape, frac, device, dtype):
    label, tier, n, c, o, h, stride = shape
    r_in, r_out = max(1, round(frac * c)), max(1, round(frac * o))
    oh = (h + 2 - 3) // stride + 1
    group = f"tucker {mode} {label} r{frac:g} {harness.dtype_name(dtype)} {device}"
    benchmark.group = group
    elem = torch.finfo(dtype).bits // 8
    min_bytes = (n * c * h * h + n * o * oh * oh) * elem
    benchmark.extra_info.update({
        "loss": "tucker", "impl": impl, "mode": mode, "shape": label, "tier": tier, "N": n, "C": c, "O": o,
        "H": h, "stride": stride, "rank_fraction": frac, "R_in": r_in, "R_out": r_out,
        "dtype": harness.dtype_name(dtype), "device": device, "threads": torch.get_num_threads(),
        "min_bytes": min_bytes,
    })
    if impl == "tltorch" and tltorch is None:
        harness._record_not_run(benchmark, _Group(group), f"unsupported (tensorly-torch not importable: {TLTORCH_ERROR!r})", "unsupported")
        return
    budget, _ = harness.memory_budget(device)
    est = n * c * h * h * elem + _est_bytes(n, c, o, h, oh, r_in, r_out, elem, impl, mode)
    benchmark.extra_info["est_peak_bytes"] = est
    if est > budget:
        harness._record_not_run(benchmark, _Group(group), f"out of memory (estimated {harness.fmt_gib(est)} GiB > budget {harness.fmt_gib(budget)} GiB)", "oom")
        return
    try:
        torch.manual_seed(0)
        factors = Factors(c, o, r_in, r_out, stride, device, dtype)
        if impl in ("kdfast", "kdfast-fused"):
            fn, params = factors.kdfast(force_fused=impl == "kdfast-fused"), factors.params()
            probe = torch.empty(n, c, h, h, device=device, dtype=dtype)
            path_args = (probe, factors.first, factors.core, factors.last, [stride] * 2, [1, 1], [1, 1])
            with forced_fused_path() if impl == "kdfast-fused" else contextlib.nullcontext():
                benchmark.extra_info["path"] = torch.ops.kdfast._tucker_conv2d_path(*path_args)
        else:
            fn, params = getattr(factors, impl)()
        x = torch.randn(n, c, h, h, device=device, dtype=dtype, requires_grad=(mode == "fwd+bwd"))
        grad_y = torch.randn(n, o, oh, oh, device=device, dtype=dtype)

        def step():
            if mode == "fwd":
                with torch.no_grad():
                    out = fn(x)
            else:
                out = torch.autograd.grad(fn(x), [x] + params, grad_y)
            harness.synchronize(device)
            return out

        if benchmark.disabled:
            benchmark.pedantic(step, rounds=1, iterations=1)
            benchmark.extra_info["status"] = "ok (not timed: --benchmark-disable)"
            return
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        harness.time_rounds(benchmark, step, device, first)
        if device == "cuda":
            benchmark.extra_info["copy_gbps"] = copy_bandwidth_gbps(device)
    except Exception as exc:  # noqa: BLE001 - only OOM is swallowed
        if not harness.is_oom(exc):
            raise
        harness._record_not_run(benchmark, _Group(group), f"out of memory ({type(exc).__name__})", "oom")
    finally:
        harness.release_memory(device)


@pytest.fixture(scope="module", autouse=True)
def _cudnn_benchmark():
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = previous


CASES = [
    pytest.param(impl, mode, shape, frac, device, dtype,
                 id=f"{mode}-{shape[0]}-r{frac:g}-{harness.dtype_name(dtype)}-{device}-{impl}")
    for device in harness.devices()
    for dtype in _dtypes(device)
    for shape in _shapes()
    for frac in RANK_FRACTIONS
    for mode in MODES
    for impl in IMPLS
]


@pytest.mark.parametrize("impl, mode, shape, frac, device, dtype", CASES)
def test_tucker_conv2d(benchmark, impl, mode, shape, frac, device, dtype):
    run_tucker_case(benchmark, impl, mode, shape, frac, device, dtype)


@pytest.mark.parametrize("mode, shape, frac, device, dtype", [
    pytest.param(mode, shape, frac, device, dtype, id=f"{mode}-{shape[0]}-r{frac:g}-{harness.dtype_name(dtype)}-{device}")
    for device in harness.devices() for dtype in _dtypes(device) for shape in _shapes()
    for frac in RANK_FRACTIONS for mode in MODES
])
def test_paired_vs_sequential(benchmark, mode, shape, frac, device, dtype):
    """kdfast's op and the 3-conv nn.Sequential (same weights) in alternation (harness.time_paired):
    the per-cell table above is too noisy on a shared CPU to tell a few percent apart."""
    label, _tier, n, c, o, h, stride = shape
    r_in, r_out = max(1, round(frac * c)), max(1, round(frac * o))
    oh = (h + 2 - 3) // stride + 1
    elem = torch.finfo(dtype).bits // 8
    budget, _ = harness.memory_budget(device)
    if 2 * (n * c * h * h * elem + _est_bytes(n, c, o, h, oh, r_in, r_out, elem, "sequential", mode)) > budget:
        pytest.skip("estimated peak memory above the budget")
    torch.manual_seed(0)
    factors = Factors(c, o, r_in, r_out, stride, device, dtype)
    kdfast_fn, kdfast_params = factors.kdfast(), factors.params()
    seq, seq_params = factors.sequential()
    x = torch.randn(n, c, h, h, device=device, dtype=dtype, requires_grad=(mode == "fwd+bwd"))
    grad_y = torch.randn(n, o, oh, oh, device=device, dtype=dtype)

    def step(fn, params):
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    fn(x)
        else:
            def run():
                torch.autograd.grad(fn(x), [x] + params, grad_y)
        return run

    try:
        harness.time_paired(benchmark, f"paired tucker {mode} {label} r{frac:g} {harness.dtype_name(dtype)} {device}",
                            step(kdfast_fn, kdfast_params), step(seq, seq_params), device,
                            {"loss": f"tucker {mode}", "shape": f"{label} r{frac:g}", "dtype": harness.dtype_name(dtype),
                             "baseline": "3-conv nn.Sequential"})
    finally:
        harness.release_memory(device)


# =============================================================================================== report
def report(paths, out=None) -> str:
    """Markdown tables: per group the median of each formulation and its time / kdfast's time."""
    import report as report_mod

    rows, _not_run, _machine, _meta = report_mod.load(paths, [])
    rows = [r for r in rows if r["info"].get("loss") == "tucker"]
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["group"], {})[r["impl"]] = r
    lines = ["| group | kdfast path | kdfast ms | " + " | ".join(f"{i} / kdfast" for i in IMPLS[:-1])
             + " | kdfast GB/s (min bytes) | % of copy |", "|---|---|---:|" + "---:|" * (len(IMPLS) - 1) + "---:|---:|"]
    for group, impls in groups.items():
        k = impls.get("kdfast")
        if k is None or k["median"] is None:
            lines.append(f"| {group} | | {k['status'] if k else 'missing'} |" + " |" * (len(IMPLS) + 1))
            continue
        cells = []
        for impl in IMPLS[:-1]:
            b = impls.get(impl)
            cells.append(report_mod.fmt_ratio(b["median"] / k["median"]) if b and b["median"] else (b["status"] if b else "—"))
        gbps = k["info"].get("min_bytes", 0) / k["median"] / 1e9
        copy = k["info"].get("copy_gbps")
        lines.append(f"| {group} | {k['info'].get('path', '')} | {report_mod.fmt_ms(k['median'])} | " + " | ".join(cells)
                     + f" | {gbps:,.1f} | {f'{100 * gbps / copy:.0f}%' if copy else '—'} |")
    text = "\n".join(lines) + "\n\nRatios > 1: kdfast faster. GB/s: (x bytes + y bytes) / kdfast time.\n"
    if not groups:  # a run of test_paired_vs_sequential only
        text = ""
    paired = report_mod.paired_table(paths)
    if paired:
        text += "\n" + "\n".join(paired)
    if out:
        with open(out, "w") as fh:
            fh.write(text)
    return text


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="ratio tables of a bench_tucker.py JSON")
    ap.add_argument("bench", nargs="+")
    ap.add_argument("--out")
    args = ap.parse_args()
    print(report(args.bench, args.out))
