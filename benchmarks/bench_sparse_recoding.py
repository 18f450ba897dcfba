"""Sparse recoding (Knowledge Representing's gradient hook) over the parameters of a ResNet-50.

kdfast.ops.sparse_recoding_ (one multi-tensor op call: each theta and g read once, g written once,
the thresholds updated from the same pass) against the same rule written as

* "per-tensor": plain PyTorch ops per tensor (abs, compare, where, mean), what a user would write;
* "foreach": torch._foreach_* ops over the whole list (the rule as multi-tensor passes).

The ResNet-50 parameter shapes (conv, batch-norm and fc; 25,557,032 entries in 161 tensors) are
listed here, no torchvision needed. Each round starts from the same gradients (restored in
pytest-benchmark's untimed setup), so values never drift into denormals or infinities.

    KDFAST_BENCH_QUICK=1 pytest benchmarks/bench_sparse_recoding.py --benchmark-json=sr.json
    python benchmarks/bench_sparse_recoding.py sr.json --out benchmarks/results/<device>/sparse-recoding

The second command writes a markdown table with the time ratios (and, on GPU, the achieved
bandwidth: bytes = read theta + read g + write g, against a measured device copy) next to the JSON.
Quick mode uses a ResNet-50 at 1/4 width (about 2.0M parameters) and 3 rounds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import pytest
import torch

import harness
from harness import QUICK, synchronize

BOOST, DAMP, SHRINK, TAU_RATE = 2.0, 0.5, 1e-4, 0.01


# ================================================================================== shapes
def resnet50_shapes(width_divisor: int = 1) -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet50 (conv weights without bias, BN weight and bias,
    fc weight and bias), in module order. width_divisor > 1 divides every width (quick mode)."""
    d = width_divisor
    shapes: list[tuple[int, ...]] = [(64 // d, 3, 7, 7), (64 // d,), (64 // d,)]
    inplanes = 64 // d
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        planes //= d
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, inplanes), (1000,)]
    return shapes


# ================================================================================== formulations
def kdfast_op(grads, params, taus):
    from kdfast import ops

    ops.sparse_recoding_(grads, params, taus, BOOST, DAMP, SHRINK, TAU_RATE)


def kdfast_raw(grads, params, taus):
    torch.ops.kdfast.sparse_recoding_(grads, params, taus, BOOST, DAMP, SHRINK, TAU_RATE)


def per_tensor(grads, params, taus):
    """The rule in plain per-tensor PyTorch ops (float32 parameters; taus a float32 tensor)."""
    for i, (g, theta) in enumerate(zip(grads, params)):
        tau = taus[i]
        magnitude = theta.abs()
        recoded = torch.where(magnitude > tau, g * BOOST, g * DAMP + SHRINK * theta.sign())
        g.copy_(recoded)
        taus[i] = tau + TAU_RATE * (magnitude.mean() - tau)


def foreach(grads, params, taus):
    """The rule as torch._foreach_* passes over the list: factor = damp + (boost - damp) * [|theta| > tau],
    g = g * factor + shrink * sign(theta) * [|theta| <= tau]; tau from the L1 norms."""
    tau_list = taus.tolist()
    magnitude = torch._foreach_abs(params)
    dominant = torch._foreach_sub(magnitude, tau_list)
    torch._foreach_sign_(dominant)
    torch._foreach_clamp_min_(dominant, 0.0)  # 1 where |theta| > tau else 0
    factor = torch._foreach_mul(dominant, BOOST - DAMP)
    torch._foreach_add_(factor, DAMP)
    torch._foreach_mul_(grads, factor)
    if SHRINK:
        inactive = torch._foreach_mul(dominant, -1.0)
        torch._foreach_add_(inactive, 1.0)
        signs = torch._foreach_sign(params)
        torch._foreach_addcmul_(grads, signs, inactive, value=SHRINK)
    l1 = torch.stack(torch._foreach_norm(params, 1))
    numel = torch.tensor([p.numel() for p in params], dtype=torch.float32, device=taus.device)
    taus.add_(TAU_RATE * (l1 / numel - taus))


IMPLS = {"kdfast": kdfast_op, "kdfast-raw-op": kdfast_raw, "per-tensor": per_tensor, "foreach": foreach}


def _devices():
    from kdfast import _ext

    out = ["cpu"]
    if torch.cuda.is_available() and _ext.has_kernel("sparse_recoding_", "CUDA"):
        out.append("cuda")
    return out


def _dtypes(device):
    return [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])


# ================================================================================== the benchmark
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=harness.dtype_name)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sparse_recoding(benchmark, impl, dtype, device):
    if device not in _devices():
        pytest.skip("no CUDA device or kdfast built without CUDA kernels")
    if dtype not in _dtypes(device):
        pytest.skip(f"{dtype} is benchmarked on CUDA only")
    shapes = resnet50_shapes(4 if QUICK else 1)
    numel = sum(math.prod(s) for s in shapes)
    gen = torch.Generator().manual_seed(0)
    params = [(torch.randn(s, generator=gen) * 0.05).to(device=device, dtype=dtype) for s in shapes]
    saved = [(torch.randn(s, generator=gen) * 1e-3).to(device=device, dtype=dtype) for s in shapes]
    grads = [g.clone() for g in saved]
    taus0 = torch.stack([p.float().abs().mean() for p in params])
    taus = taus0.clone()
    fn = IMPLS[impl]

    def setup():
        torch._foreach_copy_(grads, saved)
        taus.copy_(taus0)
        synchronize(device)
        return (grads, params, taus), {}

    def step(grads, params, taus):
        fn(grads, params, taus)
        synchronize(device)

    elem = torch.finfo(dtype).bits // 8
    benchmark.group = f"sparse-recoding resnet50{'/4' if QUICK else ''} {harness.dtype_name(dtype)} {device}"
    benchmark.extra_info.update({
        "impl": impl, "device": device, "dtype": harness.dtype_name(dtype), "tensors": len(shapes),
        "numel": numel, "bytes_moved": 3 * numel * elem, "threads": torch.get_num_threads(),
    })
    if device == "cuda":
        benchmark.extra_info["copy_bandwidth_gbs"] = _copy_bandwidth(numel * elem)
    # Correctness of this formulation against kdfast on the same inputs (untimed).
    args, _ = setup()
    step(*args)
    got = [g.clone() for g in grads], taus.clone()
    args, _ = setup()
    kdfast_raw(*args)
    synchronize(device)
    tol = dict(rtol=1e-2, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
    for a, b in zip(got[0], grads):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(got[1], taus, rtol=1e-4, atol=1e-7)
    rounds = harness.QUICK_ROUNDS if QUICK else 30
    t0 = harness.cpu_times()
    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    t1 = harness.cpu_times()
    benchmark.extra_info["cpu_others_pct"] = harness.others_percent(t0, t1)
    benchmark.extra_info["peak_bytes"] = _peak(step, setup, device)


def _peak(step, setup, device):
    args, _ = setup()
    return harness.peak_bytes(lambda: step(*args), device)


def _copy_bandwidth(nbytes: int) -> float:
    """Best-of-10 device-to-device copy bandwidth (GB/s, read + write) of an nbytes buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


# ================================================================================== report
def report(paths, out):
    rows = []
    machine = {}
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        machine = machine or data.get("machine_info", {})
        for b in data["benchmarks"]:
            rows.append((b["group"], b["extra_info"], b["stats"]))
    lines = ["# Sparse recoding over ResNet-50 parameters", "",
             f"CPU: {machine.get('kdfast', {}).get('cpu_model', machine.get('cpu', {}).get('brand_raw', '?'))}, "
             f"threads {machine.get('kdfast', {}).get('torch_threads', '?')}, torch {machine.get('kdfast', {}).get('torch', '?')}"
             + (f", GPU {machine['kdfast']['gpu']}" if machine.get("kdfast", {}).get("gpu") else ""), "",
             "| group | impl | median ms | min ms | vs kdfast (median) | GB/s (3 x numel x bytes / median) | copy GB/s |",
             "|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for group, info, stats in rows:
        groups.setdefault(group, []).append((info, stats))
    for group, items in groups.items():
        base = next((s["median"] for i, s in items if i["impl"] == "kdfast"), None)
        for info, stats in sorted(items, key=lambda x: list(IMPLS).index(x[0]["impl"])):
            ratio = f"{stats['median'] / base:.2f}x" if base else "-"
            gbs = info["bytes_moved"] / stats["median"] / 1e9
            copy = f"{info['copy_bandwidth_gbs']:.0f}" if "copy_bandwidth_gbs" in info else "-"
            lines.append(f"| {group} | {info['impl']} | {stats['median'] * 1e3:.3f} | {stats['min'] * 1e3:.3f} | "
                         f"{ratio} | {gbs:.1f} | {copy} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".md", "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.exit(report(args.json, args.out))
