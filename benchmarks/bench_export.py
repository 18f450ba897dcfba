"""Where a user deploys, is the Tucker student still faster than its teacher? Teacher vs EVBMF student in
ONNX Runtime (CPU), beside the same models in PyTorch eager and after kdfast.fuse_for_inference.

Models: resnet20, resnet56, vgg13 (100 classes, input 3x32x32, random weights with BN statistics of
two forward passes of random data: bench_students.trained_like), student = kdfast.decompose(teacher,
ranks="evbmf"). Backends, the same on both sides:
  eager     PyTorch, the models as built (student: kdfast TuckerConv2d layers),
  fused     PyTorch after kdfast.fuse_for_inference (BN folded, ReLU / residual in the Tucker epilogue),
  onnxrt    ONNX Runtime CPUExecutionProvider, graph optimisations ORT_ENABLE_ALL, on the file
            kdfast.export_onnx wrote from the fused model (opset 20, dynamic batch; the student's
            Tucker layers are three Conv nodes there: kdfast.to_plain).
At batch 1 and 64, teacher and student run in turns within each backend, order swapped every round
(kdfast.decomposition.paired_times), one backend after the other (so that one runtime's idle-spinning
threads never slow the other's step); a cell's speed-up is the median of the per-round ratios
teacher / student (> 1: the student is faster), with quartiles. PyTorch and ONNX Runtime both use
--threads intra-op threads (default 2).

    python benchmarks/bench_export.py --rounds 45 --out benchmarks/results/cpu-intel-xeon-2core/export-onnxruntime
    python benchmarks/bench_export.py --quick        # smoke run (resnet20 only, 3 rounds)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import kdfast  # noqa: E402
from kdfast import models  # noqa: E402
from kdfast.backends.tucker import cpu_name  # noqa: E402
from kdfast.decomposition import paired_times  # noqa: E402
from kdfast.export import export_onnx  # noqa: E402
from bench_students import conv_macs, ratio_stats, trained_like  # noqa: E402

MODELS = ["resnet20", "resnet56", "vgg13"]
BATCHES = [1, 64]
BACKENDS = ["eager", "fused", "onnxrt"]


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def bench(names, batches, rounds_for, threads, log) -> list:
    rows = []
    workdir = tempfile.mkdtemp(prefix="kdfast-bench-export-")
    for name in names:
        torch.manual_seed(0)
        teacher = trained_like(models.build(name, num_classes=100))
        student, report = kdfast.decompose(teacher, ranks="evbmf", input_shape=(3, 32, 32))
        student.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = {"teacher": kdfast.fuse_for_inference(teacher), "student": kdfast.fuse_for_inference(student)}
        eager = {"teacher": teacher, "student": student}
        sessions = {}
        for side in ("teacher", "student"):
            path = os.path.join(workdir, f"{name}-{side}.onnx")
            t0 = time.perf_counter()
            export_onnx(fused[side], torch.randn(1, 3, 32, 32), path)  # checks ORT == PyTorch on the way
            log(f"{name} {side}: exported in {time.perf_counter() - t0:.1f} s, {os.path.getsize(path) / 1e6:.2f} MB")
            sessions[side] = ort_session(path, threads)
        for batch in batches:
            x = torch.randn(batch, 3, 32, 32)
            x_np = x.numpy()
            steps = {}
            for side in ("teacher", "student"):
                steps[("eager", side)] = lambda m=eager[side]: m(x)
                steps[("fused", side)] = lambda m=fused[side]: m(x)
                sess = sessions[side]
                feed = {sess.get_inputs()[0].name: x_np}
                steps[("onnxrt", side)] = lambda s=sess, f=feed: s.run(None, f)
            with torch.no_grad():
                ref = {side: fused[side](x) for side in ("teacher", "student")}
                parity = {side: float((torch.from_numpy(steps[("onnxrt", side)]()[0]) - ref[side]).abs().max()
                                      / ref[side].abs().max().clamp_min(1e-12)) for side in ref}
                # Teacher and student alternate within a backend; backends run one after the other, so that
                # one runtime's idle-spinning threads (OpenMP's, ONNX Runtime's) never slow the other's step.
                times = {}
                for backend in BACKENDS:
                    pair = {side: steps[(backend, side)] for side in ("teacher", "student")}
                    times.update({(backend, side): t for side, t in paired_times(pair, rounds_for(batch)).items()})
            macs = conv_macs(teacher, x) / conv_macs(student, x)
            fused_student_ms = 1e3 * statistics.median(times[("fused", "student")])
            for backend in BACKENDS:
                st = ratio_stats(times[(backend, "teacher")], times[(backend, "student")])
                row = {"model": name, "batch": batch, "backend": backend, "tucker_layers": len(report.layers),
                       "mac_ratio": macs, "teacher_ms": st["num_ms"], "student_ms": st["den_ms"],
                       "speedup": st["ratio"], "q1": st["q1"], "q3": st["q3"], "rounds": st["rounds"],
                       "onnx_rel_err": parity if backend == "onnxrt" else None,
                       # medians of different time windows (not paired): the student here vs PyTorch fused
                       "student_vs_fused_pytorch": fused_student_ms / st["den_ms"]}
                rows.append(row)
                log(f"{name:9s} b{batch:<3d} {backend:7s} teacher {row['teacher_ms']:8.2f} ms  student "
                    f"{row['student_ms']:8.2f} ms  speed-up {row['speedup']:.2f}x [{row['q1']:.2f}-{row['q3']:.2f}]  "
                    f"student fused-PyTorch/this {row['student_vs_fused_pytorch']:.2f}x")
    return rows


def write_report(rows, meta, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    lines = [
        f"# Teacher vs EVBMF Tucker student where it is deployed: ONNX Runtime and PyTorch on CPU ({meta['cpu']}, "
        f"{meta['threads']} threads)",
        "",
        f"torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, onnx {meta['onnx']}, ONNX opset {meta['opset']}. "
        "float32, eval, no grad, input 3x32x32, 100 classes, randomly initialised models (BN statistics from two "
        "forward passes of random data), student = `kdfast.decompose(teacher, ranks=\"evbmf\")`. "
        "*eager*: PyTorch as built; *fused*: PyTorch after `kdfast.fuse_for_inference`; *onnxrt*: ONNX Runtime "
        "(CPUExecutionProvider, ORT_ENABLE_ALL) on the file `kdfast.export_onnx` wrote from the fused model. "
        "Within a backend, teacher and student run in turns, order swapped every round; the backends run one "
        "after the other (one runtime's idle-spinning threads never slow the other's steps). *speed-up* = median "
        "of the per-round ratios teacher / student (> 1: the student is faster), Q1-Q3 in brackets; *student vs "
        "fused PyTorch* = the fused PyTorch student's median time over this backend's (> 1: this backend runs "
        "the student faster; medians of different time windows, not paired). *ONNX rel. err* = max |ORT - PyTorch| / max |PyTorch| "
        "on the timed batch (teacher / student).",
        "",
        f"**Measured under load**: the 2-core machine was shared with other jobs (load average at start "
        f"{meta['load_start']}, at end {meta['load_end']}); rounds: {meta['rounds']['batch 1']} at batch 1, "
        f"{meta['rounds']['batch 64']} at batch 64 (fewer than a quiet-machine "
        "run would use, to keep the run to a few minutes), so single cells move by 10-30%; the per-round "
        "ratios are steadier than the absolute times. EVBMF on randomly initialised weights picks lower ranks "
        "than on a trained teacher (see the MAC ratio, vgg13's especially), so the student is smaller than a "
        "trained one would be.",
        "",
        "| model | batch | MAC ratio | backend | teacher ms | student ms | speed-up | Q1-Q3 | student vs fused PyTorch | ONNX rel. err (t / s) |",
        "|---|---:|---:|---|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        err = "" if r["onnx_rel_err"] is None else f"{r['onnx_rel_err']['teacher']:.1e} / {r['onnx_rel_err']['student']:.1e}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['mac_ratio']:.2f}x | {r['backend']} | {r['teacher_ms']:.2f} | "
                     f"{r['student_ms']:.2f} | **{r['speedup']:.2f}x** | {r['q1']:.2f}-{r['q3']:.2f} | "
                     f"{r['student_vs_fused_pytorch']:.2f}x | {err} |")
    lines += ["", f"Command: `{meta['command']}` ({meta['wall_s']:.0f} s).", ""]
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines))
    with open(out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    parser.add_argument("--quick", action="store_true", help="resnet20 only, 3 rounds")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of PyTorch and ONNX Runtime (default 2)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    parser.add_argument("--rounds", type=int, default=None, help="rounds at batch 1 (default 15; batch 64: a third, at least 3)")
    args = parser.parse_args(argv)
    import onnx
    import onnxruntime

    torch.set_num_threads(args.threads)
    base = 3 if args.quick else (args.rounds or 15)
    rounds_for = lambda batch: base if batch == 1 else max(3, base // 3)  # noqa: E731
    t0 = time.time()
    load_start = [round(v, 1) for v in os.getloadavg()]
    names = ["resnet20"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    rows = bench(names, BATCHES, rounds_for, args.threads, print)
    meta = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "opset": kdfast.export.DEFAULT_OPSET, "load_start": load_start,
            "load_end": [round(v, 1) for v in os.getloadavg()], "rounds": {"batch 1": rounds_for(1), "batch 64": rounds_for(64)},
            "wall_s": time.time() - t0, "command": "python benchmarks/bench_export.py " + " ".join(argv or sys.argv[1:])}
    if args.out:
        write_report(rows, meta, args.out)
        print(f"wrote {args.out}.md and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
