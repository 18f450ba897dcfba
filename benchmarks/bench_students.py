"""Do Tucker students run faster than their teachers? Whole-model inference latency on CPU, and the
Tucker layer alone against the three-conv nn.Sequential it replaces, with paired (alternating) timings.

Part 1 (models): teacher vs Tucker student (kdfast.decompose with ranks "evbmf", 0.5 and 0.25,
input 3x32x32) for resnet20/56/110, resnet32x4 and vgg13 at batch 1 and 64, float32, eval, no grad,
in three modes, the same on both sides:
  eager     the models as built (student: TuckerConv2d layers),
  fused     after kdfast.fuse_for_inference (BN folded; ReLU / residual in the Tucker epilogue),
  compile   torch.compile (inductor) of the fused models.
Each cell times teacher and student in turns (order swapped every round) and reports the median of
the per-round ratio teacher / student (> 1: the student is faster) with its quartiles, next to the
ratio of conv MACs (teacher / student, whole model, from kdfast.cost-free hooks: MACs of every conv).

Part 2 (layers): kdfast.ops.tucker_conv2d (with bias, the path its rule picks) against
nn.Sequential(1x1 C->R_in, 3x3 R_in->R_out, 1x1 R_out->O + bias) (oneDNN) at thin shapes:
C = O in {16, 32, 64}, ranks 0.25 / 0.5 of C, H = W in {8, 16, 32}, N in {8, 64}, stride 1, plus
the same with the fused kernel forced and the composition forced, so the path rule can be re-derived.

    python benchmarks/bench_students.py --out benchmarks/results/cpu-amd-epyc-2core/students-2threads   # .md/.json/.png
    python benchmarks/bench_students.py --quick                                                # smoke run
Part 3 (imagenet): torchvision-structured ResNet-18 and ResNet-50 (kdfast.models.resnet18_imagenet /
resnet50_imagenet, full width, random weights with BN statistics of random data) against Tucker-2
students (ranks 0.5, 0.25 of each full rank and EVBMF), input 3x224x224, batch 1 and 8, both sides after
kdfast.fuse_for_inference, paired; beside the speed-up the MAC ratio and "need" = the speed-up at which
the time saved is half the MACs saved, 1 / (1 - 0.5 (1 - 1 / MAC ratio)). The Tucker path of every
layer is chosen by the op's run-time autotuning (docs/tucker-path.md; --tucker-autotune off for the
table/envelope default); first_call_s is the student's first forward, which pays for that measurement.

    python benchmarks/bench_students.py --only imagenet --out benchmarks/results/students-imagenet-X

The path rule's table (csrc/ops/cpu/tucker_cpu_rule.h) is regenerated from layer runs at each thread
count the rule should know, e.g.
    python benchmarks/bench_students.py --only layers --threads 1 --out benchmarks/results/X/tucker-layers-1thread
    python benchmarks/bench_students.py --only layers --threads 2 --out benchmarks/results/X/tucker-layers-2threads \
        --rule-from benchmarks/results/X/tucker-layers-1thread.json --emit-rule csrc/ops/cpu/tucker_cpu_rule.h
Threads: --threads (default 2) via torch.set_num_threads. Rounds: --rounds (default 9 for models,
15 for layers; --quick 3).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kdfast  # noqa: E402
from kdfast import models, ops  # noqa: E402
from kdfast.decomposition import paired_times  # noqa: E402
from kdfast.nn import TuckerConv2d  # noqa: E402

MODELS = ["resnet20", "resnet56", "resnet110", "resnet32x4", "vgg13"]
BATCHES = [1, 64]
RANKS = ["evbmf", 0.5, 0.25]
MODES = ["eager", "fused", "compile"]
LAYER_C = [16, 32, 64]
LAYER_RANKS = [0.25, 0.5]
LAYER_HW = [8, 16, 32]
LAYER_N = [8, 64]


# ------------------------------------------------------------------------------------------ timing
def ratio_stats(num: list, den: list) -> dict:
    """Median and quartiles of the per-round ratios num / den, and each side's median (ms)."""
    r = sorted(a / b for a, b in zip(num, den))
    return {"ratio": statistics.median(r), "q1": r[len(r) // 4], "q3": r[(3 * len(r)) // 4],
            "num_ms": 1e3 * statistics.median(num), "den_ms": 1e3 * statistics.median(den), "rounds": len(r)}


@contextlib.contextmanager
def forced_path(name):
    previous = os.environ.get("KDFAST_TUCKER_CONV_PATH")
    if name is None:
        os.environ.pop("KDFAST_TUCKER_CONV_PATH", None)
    else:
        os.environ["KDFAST_TUCKER_CONV_PATH"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("KDFAST_TUCKER_CONV_PATH", None)
        else:
            os.environ["KDFAST_TUCKER_CONV_PATH"] = previous


# ------------------------------------------------------------------------------------------ models
def conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every Conv2d / TuckerConv2d / Linear in one forward of x (per batch)."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        n_out = out.numel() // out.shape[1] if out.dim() == 4 else out.shape[0]
        if isinstance(m, TuckerConv2d):
            r_out, r_in = m.ranks
            hw_in = inputs[0].shape[2] * inputs[0].shape[3]
            n = out.shape[0]
            total += n * hw_in * r_in * m.in_channels
            total += n_out * (r_out * r_in * m.kernel_size[0] * m.kernel_size[1] + m.out_channels * r_out)
        elif isinstance(m, nn.Conv2d):
            total += n_out * m.out_channels * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += n_out * m.in_features * m.out_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, TuckerConv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total


def trained_like(model: nn.Module) -> nn.Module:
    """Randomly initialised weights, but BN statistics of a forward pass over random data, so that
    EVBMF sees conv weights as initialised (no trained checkpoints are shipped) and BN is not the identity."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 3, 32, 32))
    return model.eval()


def bench_models(names, batches, ranks, modes, rounds, log) -> list:
    rows = []
    for name in names:
        torch.manual_seed(0)
        teacher = trained_like(models.build(name, num_classes=100))
        students = {}
        for r in ranks:
            student, report = kdfast.decompose(teacher, ranks=r, input_shape=(3, 32, 32))
            students[r] = (student.eval(), report)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = {"teacher": kdfast.fuse_for_inference(teacher)}
            fused.update({r: kdfast.fuse_for_inference(s) for r, (s, _) in students.items()})
        for batch in batches:
            x = torch.randn(batch, 3, 32, 32)
            macs_t = conv_macs(teacher, x)
            compiled = {}
            for r in ranks:
                student, report = students[r]
                macs_s = conv_macs(student, x)
                for mode in modes:
                    if mode == "eager":
                        t_fn, s_fn = teacher, student
                    elif mode == "fused":
                        t_fn, s_fn = fused["teacher"], fused[r]
                    else:
                        if "teacher" not in compiled:
                            compiled["teacher"] = torch.compile(fused["teacher"])
                        t_fn, s_fn = compiled["teacher"], torch.compile(fused[r])
                    with torch.no_grad():
                        t0 = time.perf_counter()
                        ref = t_fn(x)  # first call (compiles under torch.compile)
                        out = s_fn(x)
                        setup_s = time.perf_counter() - t0
                        times = paired_times({"teacher": lambda: t_fn(x), "student": lambda: s_fn(x)}, rounds)
                    st = ratio_stats(times["teacher"], times["student"])
                    row = {"model": name, "batch": batch, "ranks": str(r), "mode": mode,
                           "decomposed_layers": len(report.layers), "mac_ratio": macs_t / macs_s,
                           "teacher_ms": st["num_ms"], "student_ms": st["den_ms"], "speedup": st["ratio"],
                           "q1": st["q1"], "q3": st["q3"], "rounds": st["rounds"], "first_call_s": setup_s,
                           "finite": bool(torch.isfinite(out).all() and torch.isfinite(ref).all())}
                    rows.append(row)
                    log(f"{name:10s} b{batch:<3d} {str(r):6s} {mode:8s} MACs {row['mac_ratio']:5.2f}x  "
                        f"teacher {row['teacher_ms']:8.2f} ms  student {row['student_ms']:8.2f} ms  "
                        f"speed-up {row['speedup']:.2f}x [{row['q1']:.2f}-{row['q3']:.2f}]")
            torch._dynamo.reset()
    return rows


# ------------------------------------------------------------------------------------------ imagenet
IMAGENET_MODELS = ["resnet18_imagenet", "resnet50_imagenet"]
IMAGENET_BATCHES = [1, 8]


def half_mac_need(mac_ratio: float) -> float:
    """The speed-up at which the time saved is half the MACs saved."""
    return 1.0 / (1.0 - 0.5 * (1.0 - 1.0 / mac_ratio))


def tucker_paths_taken(model: nn.Module, x: torch.Tensor) -> dict:
    """{"fused": k, "composed": m}: the path each Tucker layer of ``model`` runs on x (after its first call)."""
    counts = {}

    def hook(m, inputs, out):
        kw = {"bias": m.bias, "relu": bool(getattr(m, "relu", False))}
        if len(inputs) > 1:
            kw["residual"] = inputs[1]
        path = ops.tucker_conv2d_path(inputs[0], m.first, m.core, m.last, stride=m.stride, padding=m.padding,
                                      dilation=m.dilation, **kw)
        counts[path] = counts.get(path, 0) + 1

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, TuckerConv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return counts


def bench_imagenet(names, batches, ranks, rounds, log) -> list:
    rows = []
    for name in names:
        torch.manual_seed(0)
        teacher = models.build(name)
        teacher.train()
        with torch.no_grad():  # BN statistics of random data, so that BN is not the identity
            for _ in range(2):
                teacher(torch.randn(8, 3, 112, 112))
        teacher.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused_teacher = kdfast.fuse_for_inference(teacher)
        for r in ranks:
            student, report = kdfast.decompose(teacher, ranks=r, input_shape=(3, 224, 224))
            student.eval()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fused_student = kdfast.fuse_for_inference(student)
            for batch in batches:
                x = torch.randn(batch, 3, 224, 224)
                mac_ratio = conv_macs(teacher, x) / conv_macs(student, x)
                with torch.no_grad():
                    ref = fused_teacher(x)
                    t0 = time.perf_counter()
                    out = fused_student(x)  # first call: each Tucker layer's path is measured here
                    first_call_s = time.perf_counter() - t0
                    times = paired_times({"teacher": lambda: fused_teacher(x), "student": lambda: fused_student(x)},
                                         rounds)
                st = ratio_stats(times["teacher"], times["student"])
                row = {"model": name, "batch": batch, "ranks": str(r), "mode": "fused",
                       "decomposed_layers": len(report.layers), "mac_ratio": mac_ratio,
                       "need": half_mac_need(mac_ratio), "teacher_ms": st["num_ms"], "student_ms": st["den_ms"],
                       "speedup": st["ratio"], "q1": st["q1"], "q3": st["q3"], "rounds": st["rounds"],
                       "first_call_s": first_call_s, "paths": tucker_paths_taken(fused_student, x),
                       "finite": bool(torch.isfinite(out).all() and torch.isfinite(ref).all())}
                row["half_saving_met"] = row["speedup"] >= row["need"]
                rows.append(row)
                log(f"{name:18s} b{batch:<2d} {str(r):6s} MACs {mac_ratio:5.2f}x need {row['need']:.2f}x  "
                    f"teacher {row['teacher_ms']:8.2f} ms  student {row['student_ms']:8.2f} ms  "
                    f"speed-up {row['speedup']:.2f}x [{row['q1']:.2f}-{row['q3']:.2f}]  paths {row['paths']}  "
                    f"first call {first_call_s:.2f} s")
    return rows


# ------------------------------------------------------------------------------------------ layers
def layer_shapes(quick: bool, wide_only: bool = False):
    if quick:
        return [(8, 16, 32, 0.25), (64, 64, 8, 0.5)]
    if wide_only:
        return list(WIDE)
    thin = [(n, c, hw, f) for c in LAYER_C for f in LAYER_RANKS for hw in LAYER_HW for n in LAYER_N]
    return thin + WIDE


# Wider ImageNet-ResNet-like shapes, measured only to place the path rule's boundary (not "thin").
WIDE = [(8, 128, 28, 0.25), (8, 128, 28, 0.5), (8, 256, 14, 0.25), (8, 256, 14, 0.5),
        (1, 512, 7, 0.5), (8, 512, 7, 0.5), (1, 256, 14, 0.5), (1, 64, 56, 0.5), (8, 64, 56, 0.5)]


def machine_ceilings(log) -> dict:
    """This CPU's measured ceilings at the current thread count: float32 GEMM throughput (the best of
    a few 1024^3 torch.mm calls: MKL, as good as this CPU gets for dense FMAs) and memory copy
    bandwidth (a 64 MiB copy into touched memory: read + write)."""
    a, b, c = torch.randn(1024, 1024), torch.randn(1024, 1024), torch.empty(1024, 1024)
    src, dst = torch.ones(16 * 1024 * 1024), torch.zeros(16 * 1024 * 1024)  # pages touched before timing
    torch.mm(a, b, out=c), dst.copy_(src)
    gemm, copy = [], []
    for _ in range(7):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        gemm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(src)
        copy.append(time.perf_counter() - t0)
    out = {"gemm_gflops": 2 * 1024 ** 3 / min(gemm) / 1e9, "copy_gbs": 2 * src.numel() * 4 / min(copy) / 1e9}
    log(f"ceilings: float32 GEMM {out['gemm_gflops']:.1f} GFLOP/s, copy {out['copy_gbs']:.1f} GB/s")
    return out


def layer_floor(n, c, r, hw, ceilings) -> dict:
    """Roofline of one Tucker layer (3x3 core, stride 1, C = O, R_in = R_out): FLOPs of the three
    products, and the time floor max(FLOPs / GEMM ceiling, bytes of x read + y written / copy rate);
    `ceiling_speedup` = the Sequential's measured time over that floor, the most any kernel could gain."""
    flops = 2 * n * hw * hw * (c * r + 9 * r * r + r * c)
    floor_s = max(flops / (ceilings["gemm_gflops"] * 1e9), 2 * 4 * n * c * hw * hw / (ceilings["copy_gbs"] * 1e9))
    return {"flops": flops, "floor_ms": 1e3 * floor_s}


def bench_layers(rounds, quick, log, wide_only=False) -> list:
    ceilings = machine_ceilings(log)
    rows = []
    for n, c, hw, frac in layer_shapes(quick, wide_only):
        r = max(1, math.ceil(frac * c))
        g = torch.Generator().manual_seed(0)
        first, core, last = (torch.randn(r, c, generator=g) / math.sqrt(c), torch.randn(r, r, 3, 3, generator=g) / math.sqrt(9 * r),
                             torch.randn(c, r, generator=g) / math.sqrt(r))
        bias = torch.randn(c, generator=g)
        seq = nn.Sequential(nn.Conv2d(c, r, 1, bias=False), nn.Conv2d(r, r, 3, padding=1, bias=False), nn.Conv2d(r, c, 1))
        with torch.no_grad():
            seq[0].weight.copy_(first[:, :, None, None])
            seq[1].weight.copy_(core)
            seq[2].weight.copy_(last[:, :, None, None])
            seq[2].bias.copy_(bias)
        seq.eval()
        x = torch.randn(n, c, hw, hw)
        row = {"N": n, "C": c, "R": r, "rank_fraction": frac, "HW": hw, "thin": (n, c, hw, frac) not in WIDE}
        with torch.no_grad():
            err = (ops.tucker_conv2d(x, first, core, last, bias, padding=1) - seq(x)).abs().max().item()
            row["max_abs_diff"] = err
            for label, path in (("auto", None), ("fused", "fused"), ("composed", "composed")):
                with forced_path(path):
                    times = paired_times({"kdfast": lambda: ops.tucker_conv2d(x, first, core, last, bias, padding=1),
                                          "sequential": lambda: seq(x)}, rounds)
                st = ratio_stats(times["sequential"], times["kdfast"])
                row[label] = {"speedup": st["ratio"], "q1": st["q1"], "q3": st["q3"], "kdfast_ms": st["den_ms"],
                              "sequential_ms": st["num_ms"], "rounds": st["rounds"]}
            # The path taken against the forced composition, paired directly (>= 0.95: never slower beyond
            # noise; issue 24). The C++ op reads KDFAST_TUCKER_CONV_PATH at every call.
            def with_path(name):
                with forced_path(name):
                    return ops.tucker_conv2d(x, first, core, last, bias, padding=1)

            times = paired_times({"auto": lambda: with_path(None), "composed": lambda: with_path("composed")}, rounds)
            row["vs_composed"] = ratio_stats(times["composed"], times["auto"])["ratio"]
        # after the timed calls: with autotuning the first of them measured this key, the path is now cached
        row["path"] = ops.tucker_conv2d_path(x, first, core, last, padding=1, bias=bias)
        row.update(layer_floor(n, c, r, hw, ceilings))
        row["ceilings"] = ceilings
        row["ceiling_speedup"] = row["auto"]["sequential_ms"] / row["floor_ms"]
        rows.append(row)
        a = row["auto"]
        log(f"layer N{n:<2d} C{c:<2d} R{r:<2d} {hw:2d}x{hw:<2d} {row['path']:8s} kdfast {a['kdfast_ms']:7.3f} ms  "
            f"Sequential {a['sequential_ms']:7.3f} ms  {a['speedup']:.2f}x [{a['q1']:.2f}-{a['q3']:.2f}]  "
            f"(fused {row['fused']['speedup']:.2f}x, composed {row['composed']['speedup']:.2f}x, "
            f"path taken vs composed {row['vs_composed']:.2f}x; "
            f"roofline ceiling {row['ceiling_speedup']:.2f}x)")
    return rows


# ------------------------------------------------------------------------------------------ report
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def write_report(path: str, data: dict) -> None:
    m = data["machine"]
    threads = f"{m['threads']} thread" + ("s" if m["threads"] != 1 else "")
    lines = [f"# Tucker students vs teachers on CPU ({m['cpu']}, {threads}, torch {m['torch']})", "",
             "float32, eval, no grad, input 3x32x32, randomly initialised models (BN statistics from two forward "
             "passes of random data). Paired timings: teacher and student (or kdfast and the Sequential) run in "
             "turns, order swapped every round; *speed-up* = median of the per-round ratios teacher / student "
             "(> 1: the student is faster), Q1-Q3 in brackets. MAC ratio = conv + linear MACs teacher / student. "
             f"Load average while running (start, end): {data['load_start']} / {data['load_end']} (1, 5, 15 "
             "minutes; they include this benchmark's own threads and trail earlier work: a 1-minute figure well "
             "above the thread count means other jobs shared the machine, and single cells then move by 10-30%; "
             "the per-round ratios are steadier).", ""]
    if data["models"]:
        lines += ["## Whole models", "",
                  "| model | batch | student ranks | Tucker layers | MAC ratio | mode | teacher ms | student ms | speed-up | Q1-Q3 |",
                  "|---|---:|---|---:|---:|---|---:|---:|---:|---|"]
        for r in data["models"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['ranks']} | {r['decomposed_layers']} | {r['mac_ratio']:.2f}x | "
                         f"{r['mode']} | {r['teacher_ms']:.2f} | {r['student_ms']:.2f} | **{r['speedup']:.2f}x** | "
                         f"{r['q1']:.2f}-{r['q3']:.2f} |")
        lines.append("")
    if data.get("imagenet"):
        lines += ["## ImageNet-shape students (torchvision ResNet structure, 224x224, both fused)", "",
                  f"Tucker path: run-time autotuning {data.get('tucker_autotune', 'on')} (docs/tucker-path.md). "
                  "*need* = the speed-up at which the time saved is half the MACs saved, "
                  "1 / (1 - 0.5 (1 - 1 / MAC ratio)); *paths* = how many Tucker layers run the fused kernel / "
                  "the composition; *first call* = the student's first forward (it measures each new layer key).", "",
                  "| model | batch | ranks | Tucker layers | MAC ratio | need | teacher ms | student ms | speed-up | Q1-Q3 "
                  "| met | paths (fused/composed) | first call s |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|---:|"]
        for r in data["imagenet"]:
            p = r["paths"]
            lines.append(f"| {r['model']} | {r['batch']} | {r['ranks']} | {r['decomposed_layers']} | {r['mac_ratio']:.2f}x | "
                         f"{r['need']:.2f}x | {r['teacher_ms']:.1f} | {r['student_ms']:.1f} | **{r['speedup']:.2f}x** | "
                         f"{r['q1']:.2f}-{r['q3']:.2f} | {'yes' if r['half_saving_met'] else 'no'} | "
                         f"{p.get('fused', 0)}/{p.get('composed', 0)} | {r['first_call_s']:.2f} |")
        lines.append("")
    if data["layers"]:
        ups = sorted(r["auto"]["speedup"] for r in data["layers"] if r.get("thin", True))
        vs = sorted(r["vs_composed"] for r in data["layers"] if "vs_composed" in r)
        summary = (f"Over the {len(ups)} thin shapes (C <= 64; the wider rows are ImageNet-like shapes): median "
                   f"speed-up **{statistics.median(ups):.2f}x**, min {ups[0]:.2f}x, max {ups[-1]:.2f}x. " if ups else "")
        if vs:
            summary += (f"The path taken against the forced composition (kdfast against kdfast, paired directly), "
                        f"over all {len(vs)} shapes: min **{vs[0]:.2f}x**, median {statistics.median(vs):.2f}x.")
        lines += ["## Tucker layer alone vs the three-conv nn.Sequential", "",
                  f"kdfast.ops.tucker_conv2d (the path it picks: autotuning {data.get('tucker_autotune', 'off')}) / "
                  f"forced fused kernel / forced composition, each "
                  f"against nn.Sequential(1x1, 3x3 pad 1, 1x1 + bias), stride 1, R = ceil(fraction x C). " + summary, "",
                  f"Roofline: this CPU's rates measured at the start of the run (a tuned library's, not hard limits: "
                  f"a kernel can beat them by a few %), float32 GEMM "
                  f"{data['layers'][0]['ceilings']['gemm_gflops']:.1f} GFLOP/s (torch.mm 1024^3) and copy "
                  f"{data['layers'][0]['ceilings']['copy_gbs']:.1f} GB/s; *floor* = max(layer FLOPs / GEMM ceiling, "
                  "bytes of x + y / copy rate); *ceiling* = Sequential ms / floor, the largest speed-up any kernel "
                  "could reach on that shape; GFLOP/s = layer FLOPs / median time.", "",
                  "| N | C | R | HxW | path | kdfast ms | Sequential ms | speed-up | Q1-Q3 | forced fused | forced composed "
                  "| path taken vs composed | kdfast GFLOP/s | Sequential GFLOP/s | floor ms | ceiling |",
                  "|---:|---:|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in data["layers"]:
            a = r["auto"]
            lines.append(f"| {r['N']} | {r['C']} | {r['R']} | {r['HW']}x{r['HW']} | {r['path']} | {a['kdfast_ms']:.3f} | "
                         f"{a['sequential_ms']:.3f} | **{a['speedup']:.2f}x** | {a['q1']:.2f}-{a['q3']:.2f} | "
                         f"{r['fused']['speedup']:.2f}x | {r['composed']['speedup']:.2f}x | {r['vs_composed']:.2f}x | "
                         f"{r['flops'] / a['kdfast_ms'] / 1e6:.1f} | {r['flops'] / a['sequential_ms'] / 1e6:.1f} | "
                         f"{r['floor_ms']:.3f} | {r['ceiling_speedup']:.2f}x |")
        lines.append("")
    with open(path + ".md", "w") as fh:
        fh.write("\n".join(lines))
    with open(path + ".json", "w") as fh:
        json.dump(data, fh, indent=1, allow_nan=False)


def write_png(path: str, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("models", "layers") if data[k]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.5), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    cells = [r for r in data["models"]]
    labels = sorted({(r["model"], r["batch"], r["ranks"]) for r in cells}, key=lambda k: (MODELS.index(k[0]) if k[0] in MODELS else 0, k[1], k[2]))
    ax = axes.get("models")
    if ax is not None:
        width = 0.8 / len(MODES)
        for i, mode in enumerate(MODES):
            vals = [next((r["speedup"] for r in cells if (r["model"], r["batch"], r["ranks"]) == k and r["mode"] == mode),
                         0) for k in labels]
            ax.bar([j + i * width for j in range(len(labels))], vals, width, label=mode)
        macs = [next(r["mac_ratio"] for r in cells if (r["model"], r["batch"], r["ranks"]) == k) for k in labels]
        _models_axis(ax, labels, macs, width)
    ax = axes.get("layers")
    rows = data["layers"]
    if ax is not None:
        _layers_axis(ax, rows)
    fig.tight_layout()
    fig.savefig(path + ".png", dpi=110)


def _models_axis(ax, labels, macs, width):
    ax.scatter([j + width for j in range(len(labels))], macs, marker="_", s=200, color="k", label="MAC ratio", zorder=3)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks([j + width for j in range(len(labels))])
    ax.set_xticklabels([f"{m} b{b} {r}" for m, b, r in labels], rotation=90, fontsize=7)
    ax.set_ylabel("teacher / student latency (paired median)")
    ax.set_title("Whole model: student speed-up")
    ax.legend(fontsize=8)


def _layers_axis(ax, rows):
    if rows:
        xs = range(len(rows))
        ax.plot(xs, [r["fused"]["speedup"] for r in rows], "o", label="fused kernel")
        ax.plot(xs, [r["composed"]["speedup"] for r in rows], "x", label="composition (oneDNN)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(1.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"N{r['N']} C{r['C']} R{r['R']} {r['HW']}" for r in rows], rotation=90, fontsize=7)
        ax.set_ylabel("Sequential / kdfast latency (paired median)")
        ax.set_title("Tucker layer vs 3-conv nn.Sequential")
        ax.legend(fontsize=8)


def emit_rule(path: str, sources: list) -> None:
    """The C++ table the CPU path rule reads (csrc/ops/cpu/tucker_cpu_rule.h), from one or more layer
    reports (.json), each measured at its own thread count: per measured shape, the fused kernel's
    speed-up over the composition (both timed against the same nn.Sequential)."""
    entries = []
    for source in sources:
        with open(source) as fh:
            data = json.load(fh)
        threads = data["machine"]["threads"]
        for r in data["layers"]:
            entries.append((threads, r["N"], r["C"], r["R"], r["HW"], r["fused"]["speedup"] / r["composed"]["speedup"]))
    if not entries:
        raise SystemExit(f"--emit-rule: no layer rows in {', '.join(sources)}")
    names = ", ".join(os.path.relpath(s, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")) for s in sources)
    lines = ["// Generated by benchmarks/bench_students.py --emit-rule from " + names + "; do not edit.",
             "// Measured shapes (3x3 core, stride 1, float32): threads (torch.get_num_threads()), N, C (= O),",
             "// R (= R_in = R_out), H (= W), and the fused kernel's speed-up over the three-convolution",
             "// composition (> 1: fused faster), paired timings.",
             "#pragma once", "", "namespace kdfast {", "namespace tucker {", "", "struct MeasuredTuckerShape {",
             "  double threads, n, c, r, hw, fused_speedup;", "};", "",
             "constexpr MeasuredTuckerShape kTuckerCpuMeasurements[] = {"]
    for threads, n, c, r, hw, ratio in sorted(entries):
        lines.append(f"    {{{threads}, {n}, {c}, {r}, {hw}, {ratio:.3f}}},")
    lines += ["};", "", "}  // namespace tucker", "}  // namespace kdfast", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="path prefix of the .md/.json/.png report")
    parser.add_argument("--quick", action="store_true", help="resnet20 at batch 8, two layer shapes, 3 rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="model rounds (layers: 15 unless --quick)")
    parser.add_argument("--only", choices=["models", "layers", "imagenet"], default=None)
    parser.add_argument("--layer-rounds", type=int, default=None, help="layer rounds (default 15, --quick 3)")
    parser.add_argument("--wide-only", action="store_true", help="layers: only the wide (ImageNet-like) shapes")
    parser.add_argument("--imagenet-models", default=None,
                        help="comma-separated subset of " + ",".join(IMAGENET_MODELS) + " (part 3)")
    parser.add_argument("--tucker-autotune", choices=["on", "off"], default="on",
                        help="kdfast.backends.tucker.autotune for the run (off: the table / envelope default)")
    parser.add_argument("--emit-rule", default=None,
                        help="write the path rule's C++ table from this run's layer rows and --rule-from's")
    parser.add_argument("--rule-from", default="", help="comma-separated layer reports (.json, other thread "
                        "counts) to merge into --emit-rule's table")
    parser.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--modes", default=None, help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--ranks", default=None, help="comma-separated subset of evbmf,0.5,0.25")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,64)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    names = args.models.split(",") if args.models else (["resnet20"] if quick else MODELS)
    modes = args.modes.split(",") if args.modes else MODES
    model_rounds = args.rounds or (3 if quick else 9)
    layer_rounds = args.layer_rounds or (3 if quick else 15)
    log = lambda s: print(s, flush=True)  # noqa: E731
    import kdfast.backends.tucker as tucker_backend

    tucker_backend.autotune = args.tucker_autotune == "on"
    data = {"machine": machine(), "load_start": [round(v, 1) for v in os.getloadavg()], "models": [], "layers": [],
            "imagenet": [], "tucker_autotune": args.tucker_autotune, "command": " ".join(sys.argv)}
    ranks = ["evbmf"] if quick else RANKS
    if args.ranks:
        ranks = [r if r == "evbmf" else float(r) for r in args.ranks.split(",")]
    if args.only in (None, "layers"):
        data["layers"] = bench_layers(layer_rounds, quick, log, args.wide_only)
    if args.only in (None, "imagenet"):
        inames = args.imagenet_models.split(",") if args.imagenet_models else IMAGENET_MODELS
        ibatches = [int(b) for b in args.batches.split(",")] if args.batches else IMAGENET_BATCHES
        data["imagenet"] = bench_imagenet(inames, ibatches, ranks, args.rounds or (3 if quick else 7), log)
        data["tucker_cache"] = tucker_backend.state()["entries"]
    if args.only in (None, "models"):
        batches = [int(b) for b in args.batches.split(",")] if args.batches else ([8] if quick else BATCHES)
        data["models"] = bench_models(names, batches, ranks, modes, model_rounds, log)
    data["load_end"] = [round(v, 1) for v in os.getloadavg()]
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_report(args.out, data)
        write_png(args.out, data)
        log(f"wrote {args.out}.md/.json/.png")
    if args.emit_rule:
        sources = ([args.out + ".json"] if args.out and data["layers"] else []) + [s for s in args.rule_from.split(",") if s]
        emit_rule(args.emit_rule, sources)
        log(f"wrote {args.emit_rule}")


if __name__ == "__main__":
    main()
