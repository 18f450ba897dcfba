"""Every kdfast op against its baselines, timed with CUDA events: `make gpu-check`'s benchmark stage.

For each op, at a CIFAR and an ImageNet shape, in float32 and float16, it times
  kdfast-aten    kdfast's default CUDA path (KDFAST_CUDA_KERNELS=none: ATen calls only)
  kdfast-kernel  the op's hand-written CUDA kernel forced on (KDFAST_CUDA_KERNELS=all)
  eager          the plain PyTorch formula (kdfast.testing.reference at the input dtype)
  peers          the formulations of kdfast.testing.baselines (RepDistiller, torchdistill, bmm Grams)
and reports the median time, its floor max(FLOPs / matmul rate, bytes / copy rate) from the measured
ceilings, and the fraction of that floor reached (floor / time). TF32 is off for the whole run (matmul
and cuDNN), so float32 rows of the ATen baselines are true float32, as kdfast's kernels are. Loss ops are timed forward plus
backward (student inputs require grad, as in distillation); tucker_conv2d forward without grad (the
fused kernel's case); sparse_recoding_ one in-place step over a ResNet's parameter list.

FLOP counts are GEMM FLOPs only (exp, norms and element-wise work are left out) and bytes count each
input read once and each output written once: the floor is a lower bound, not a target.

  python benchmarks/gpu_bench.py --ceilings ceilings.json --out bench.json            (CUDA)
  python benchmarks/gpu_bench.py --device cpu --tiny --out bench.json                 (dry run)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kdfast import ops  # noqa: E402
from kdfast.testing import baselines, reference  # noqa: E402

# Shapes: (CIFAR, ImageNet). Tiny: the dry run's.
SHAPES = {
    "fsp_loss": {"cifar": (128, 16, 32, 32, 32), "imagenet": (64, 256, 512, 28, 28),
                 "tiny": (2, 3, 4, 4, 4)},  # (B, Ca, Cb, H, W)
    "nst_loss": {"cifar": (128, 64, 64, 8, 8), "imagenet": (64, 512, 512, 14, 14), "tiny": (2, 3, 4, 4, 4)},
    "kd_loss": {"cifar": (128, 100), "imagenet": (256, 1000), "tiny": (2, 5)},
    "tucker_conv2d": {"cifar": (128, 64, 32, 32, 32, 32, 64), "imagenet": (64, 64, 56, 56, 32, 32, 64),
                      "tiny": (2, 4, 6, 6, 2, 3, 4)},  # (N, C, H, W, R_in, R_out, O), 3x3, pad 1
    "sparse_recoding_": {"cifar": "resnet20", "imagenet": "resnet50", "tiny": "tiny"},
    "sparse_codes": {"cifar": (128, 256, 8, 8, 512, 10), "imagenet": (32, 256, 14, 14, 1024, 20),
                     "tiny": (2, 4, 3, 3, 8, 2)},  # (N, D, H, W, K, k)
}
# Parameter-tensor sizes of the sparse recoding step: ResNet-20 (CIFAR, 0.27M) and ResNet-50 (25.6M).
PARAM_LISTS = {
    "resnet20": [16 * 3 * 9] + [16 * 16 * 9] * 6 + [32 * 16 * 9, 32 * 32 * 9 * 5, 32 * 16]
    + [64 * 32 * 9, 64 * 64 * 9 * 5, 64 * 32] + [640, 10] + [16, 32, 64] * 14,
    "resnet50": [64 * 3 * 49] + [64 * 64, 64 * 64 * 9, 256 * 64] * 3 + [128 * 256, 128 * 128 * 9, 512 * 128] * 4
    + [256 * 512, 256 * 256 * 9, 1024 * 256] * 6 + [512 * 1024, 512 * 512 * 9, 2048 * 512] * 3
    + [2048 * 1000, 1000] + [64, 128, 256, 512, 1024, 2048] * 17,
    "tiny": [7, 30, 5],
}
MAX_PEER_BYTES = 16 * 2**30  # skip a peer whose (B, C, C, HW) broadcast would exceed this


class Timer:
    def __init__(self, device, reps, warmup):
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, fn):
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device == "cuda":
            torch.cuda.synchronize()
            for _ in range(self.reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
        else:
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def _env_kernels(value):
    if value is None:
        os.environ.pop("KDFAST_CUDA_KERNELS", None)
    else:
        os.environ["KDFAST_CUDA_KERNELS"] = value


def _loss_step(loss_fn, inputs, need):
    def step():
        loss = loss_fn(*inputs)
        torch.autograd.grad(loss, need)
    return step


def cases(device, dtype, size):
    """Yields (op, shape label, impl, callable, flops, bytes) for one dtype and size."""
    elt = torch.tensor([], dtype=dtype).element_size()
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731

    # FSP: student maps require grad, teacher maps do not.
    b, ca, cb, h, w = SHAPES["fsp_loss"][size]
    maps = [rnd(b, c, h, w) for c in (ca, cb, ca, cb)]
    maps[0].requires_grad_(), maps[1].requires_grad_()
    hw = h * w
    flops = 2 * b * ca * cb * hw * 2 + 2 * b * ca * cb * hw * 2  # two Grams, two student-gradient GEMMs
    nbytes = 3 * b * (ca + cb) * hw * elt  # four maps read, two student gradients written
    impls = {"kdfast": lambda *m: ops.fsp_loss(*m), "eager": reference.fsp_loss, "bmm": baselines.fsp_loss_bmm,
             "torchdistill": baselines.torchdistill_fsp_loss}
    if b * ca * cb * hw * elt <= MAX_PEER_BYTES:
        impls["repdistiller"] = baselines.repdistiller_fsp_loss
    for name, fn in impls.items():
        yield "fsp_loss", name, _loss_step(fn, maps, maps[:2]), flops, nbytes

    # NST poly and gaussian.
    b, cs, ct, h, w = SHAPES["nst_loss"][size]
    hw = h * w
    fs, ft = rnd(b, cs, h, w).requires_grad_(), rnd(b, ct, h, w)
    nbytes = (2 * b * cs * hw + b * ct * hw) * elt
    form = ops.nst_poly_form(cs, ct, hw)
    if form == "poly_channel":
        poly_flops = 2 * b * hw * (cs * cs + cs * ct + ct * ct) + 2 * 2 * b * hw * cs * (cs + ct)
    else:
        poly_flops = 2 * 2 * b * hw * hw * (cs + ct) + 2 * b * hw * hw * cs
    impls = {"kdfast": lambda a, c: ops.nst_loss(a, c, "poly"), "eager": lambda a, c: reference.nst_loss(a, c, "poly"),
             "bmm": baselines.nst_poly_loss_bmm}
    if b * max(cs, ct) ** 2 * hw * elt <= MAX_PEER_BYTES:
        impls["repdistiller"] = baselines.repdistiller_nst_loss
    for name, fn in impls.items():
        yield "nst_loss[poly]", name, _loss_step(fn, (fs, ft), [fs]), poly_flops, nbytes
    gauss_flops = 2 * b * hw * (cs + ct) ** 2 + 2 * 2 * b * hw * cs * (cs + ct)  # forward Gram, backward Gram + GEMM
    for name, fn in {"kdfast": lambda a, c: ops.nst_loss(a, c, "gaussian", sigma=1.0),
                     "eager": lambda a, c: reference.nst_loss(a, c, "gaussian", sigma=1.0)}.items():
        yield "nst_loss[gaussian]", name, _loss_step(fn, (fs, ft), [fs]), gauss_flops, nbytes

    # KD: student logits require grad.
    b, k = SHAPES["kd_loss"][size]
    s, t = rnd(b, k).requires_grad_(), rnd(b, k)
    y = torch.randint(0, k, (b,), device=device)
    for name, fn in {"kdfast": lambda a, c: ops.kd_loss(a, c, y), "eager": lambda a, c: baselines.kd_loss_torch(a, c, y),
                     "repdistiller": lambda a, c: baselines.repdistiller_kd_loss(a, c, y)}.items():
        yield "kd_loss", name, _loss_step(fn, (s, t), [s]), 0, 3 * b * k * elt

    # Tucker-2 block, forward without grad.
    n, c, h, w, r_in, r_out, o = SHAPES["tucker_conv2d"][size]
    x = rnd(n, c, h, w)
    first, core, last = rnd(r_in, c) * c ** -0.5, rnd(r_out, r_in, 3, 3) * (9 * r_in) ** -0.5, rnd(o, r_out) * r_out ** -0.5
    flops = 2 * n * h * w * (c * r_in + r_in * r_out * 9 + r_out * o)
    nbytes = (n * c * h * w + n * o * h * w) * elt

    def tucker(fn):
        def call():
            with torch.no_grad():
                fn(x, first, core, last, None, padding=1)
        return call

    yield "tucker_conv2d", "kdfast", tucker(ops.tucker_conv2d), flops, nbytes
    yield "tucker_conv2d", "eager", tucker(reference.tucker_conv2d), flops, nbytes

    # Sparse recoding: one step over a parameter list.
    sizes = PARAM_LISTS[SHAPES["sparse_recoding_"][size]]
    params = [rnd(m) for m in sizes]
    grads = [rnd(m) for m in sizes]
    taus = torch.full((len(sizes),), 0.5, device=device)
    kw = dict(boost=2.0, damp=0.5, shrink=1e-4, tau_rate=0.1)
    nbytes = 3 * sum(sizes) * elt
    yield "sparse_recoding_", "kdfast", lambda: ops.sparse_recoding_(grads, params, taus, **kw), 0, nbytes
    yield "sparse_recoding_", "eager", lambda: reference.sparse_recoding_(grads, params, taus, **kw), 0, nbytes

    # SRM sparse codes: forward + backward through the values (x and the dictionary require grad).
    n, d, h, w, kk, k = SHAPES["sparse_codes"][size]
    x, dictionary, bias = rnd(n, d, h, w).requires_grad_(), (rnd(d, kk) * d ** -0.5).requires_grad_(), rnd(1)
    flops = 2 * n * h * w * d * kk  # the projection; the backward touches k codewords per pixel only
    nbytes = (n * d * h * w + d * kk + n * h * w * k * 2) * elt
    for name, fn in {"kdfast": lambda a, c: ops.sparse_codes(a, c, bias, k)[0].sum(),
                     "eager": lambda a, c: reference.sparse_codes(a, c, bias, k)[0].sum(),
                     "srm-official": lambda a, c: baselines.srm_masked_similarity(a, c, bias, k).sum()}.items():
        yield "sparse_codes", name, _loss_step(fn, (x, dictionary), [x, dictionary]), flops, nbytes


def run(device, sizes, dtypes, ceilings, reps, warmup, log):
    timer = Timer(device, reps, warmup)
    rows = []
    for size in sizes:
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            for op, impl, fn, flops, nbytes in cases(device, dtype, size):
                variants = [("kdfast-aten", "none"), ("kdfast-kernel", "all")] if impl == "kdfast" else [(impl, "none")]
                for label, env in variants:
                    row = {"op": op, "shape": size, "dtype": dname, "impl": label, "flops": flops, "bytes": nbytes}
                    _env_kernels(env)
                    try:
                        row["seconds"] = timer(fn)
                    except Exception as exc:  # noqa: BLE001  an OOM or a failing peer is a result, not a crash
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                        log.write(traceback.format_exc())
                        if device == "cuda":
                            torch.cuda.empty_cache()
                    finally:
                        _env_kernels(None)
                    row.update(floor(row, ceilings, dname))
                    rows.append(row)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
    return rows


def floor(row, ceilings, dname):
    """Floor seconds max(flops / matmul rate, bytes / copy rate) and the fraction of it reached."""
    rate = ceilings.get("matmul_bf16_tflops" if dname in ("bfloat16", "float16") else "matmul_fp32_tflops")
    copy = ceilings.get("copy_gbps")
    if not rate or not copy:
        return {}
    t_floor = max(row["flops"] / (rate * 1e12), row["bytes"] / (copy * 1e9))
    out = {"floor_seconds": t_floor}
    if row.get("seconds"):
        out["fraction_of_floor"] = t_floor / row["seconds"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="the dry run's tiny shapes, two repetitions")
    parser.add_argument("--ceilings", help="JSON with copy_gbps, matmul_bf16_tflops, matmul_fp32_tflops")
    parser.add_argument("--out", required=True, help="where to write the rows (JSON)")
    parser.add_argument("--log", default=os.devnull)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available", file=sys.stderr)
        return 2
    ceilings = {}
    if args.ceilings and os.path.exists(args.ceilings):
        with open(args.ceilings) as f:
            ceilings = json.load(f)
    sizes = ["tiny"] if args.tiny else ["cifar", "imagenet"]
    reps, warmup = (2, 1) if args.tiny else (10, 3)
    torch.manual_seed(0)
    # float32 baselines in true float32: cuDNN defaults to TF32 for convolutions (the Tucker baselines).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with open(args.log, "a") as log:
        rows = run(args.device, sizes, [torch.float32, torch.float16], ceilings, reps, warmup, log)
    with open(args.out, "w") as f:
        json.dump({"device": args.device, "ceilings": ceilings, "tf32": False, "rows": rows}, f, indent=1)
    failed = [r for r in rows if "error" in r and r["impl"].startswith("kdfast")]
    print(f"gpu_bench: {len(rows)} timings, {len(failed)} kdfast errors")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
