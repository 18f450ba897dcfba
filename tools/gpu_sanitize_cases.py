"""One tiny call of every hand-written kdfast kernel, forward and backward, with the kernels forced on
(KDFAST_CUDA_KERNELS=all): what `make gpu-check` runs under compute-sanitizer (memcheck, racecheck),
restricted to kdfast's kernels. Small shapes but every code path: ragged tails, a halo in the
padding, two Tucker tiles (a large and a fallback one), several gaussian row tiles, unaligned views
(the scalar path of sparse recoding), ignored KD rows.

  python tools/gpu_sanitize_cases.py [--device cuda|cpu]     (cpu: the dry run checks it still runs)
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kdfast import ops  # noqa: E402


def run(device: str) -> int:
    os.environ["KDFAST_CUDA_KERNELS"] = "all"
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s, dtype=torch.float32: torch.randn(*s, device=device, generator=g).to(dtype)  # noqa: E731
    calls = 0
    for dtype in (torch.float32, torch.bfloat16):
        maps = [rnd(3, c, 5, 7, dtype=dtype).requires_grad_() for c in (4, 6, 4, 6)]
        torch.autograd.grad(ops.fsp_loss(*maps), maps)
        fs, ft = rnd(2, 70, 3, 5, dtype=dtype).requires_grad_(), rnd(2, 9, 3, 5, dtype=dtype).requires_grad_()
        for kernel in ("linear", "poly", "gaussian"):
            torch.autograd.grad(ops.nst_loss(fs, ft, kernel, sigma=0.5), (fs, ft))
        s, t = rnd(5, 37, dtype=dtype).requires_grad_(), rnd(5, 37, dtype=dtype).requires_grad_()
        y = torch.tensor([1, -100, 36, 0, 5], device=device)
        torch.autograd.grad(ops.kd_loss(s, t, y), (s, t))
        # Tucker: a 3x3 core over a ragged 11x9 map, then ranks whose 8x8 tile needs more than 48 KB.
        for r, pad, stride in ((3, 1, 1), (72, 2, 2)):
            x = rnd(2, 8, 11, 9, dtype=dtype)
            ops.tucker_conv2d(x, rnd(r, 8, dtype=dtype), rnd(r, r, 3, 3, dtype=dtype), rnd(5, r, dtype=dtype),
                              rnd(5, dtype=dtype), stride=stride, padding=pad, save_intermediates=False)
        base = [rnd(n + 1, dtype=dtype) for n in (16385, 5)]
        params, grads = [b[1:] for b in base], [rnd(n, dtype=dtype) for n in (16385, 5)]
        ops.sparse_recoding_(grads, params, torch.full((2,), 0.5, device=device), 2.0, 0.3, 0.01, 0.5)
        # SRM sparse codes: a ragged pixel count, k at the kernel's register limit and one above it.
        x = rnd(2, 9, 5, 3, dtype=dtype).requires_grad_()
        for kk, k in ((40, 32), (70, 33)):
            values, _ = ops.sparse_codes(x, rnd(9, kk, dtype=dtype), rnd(1, dtype=dtype), k)
            torch.autograd.grad(values.float().sum(), x)
        calls += 1
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"gpu_sanitize_cases: every kdfast kernel ran ({calls} dtypes) on {device}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    sys.exit(run(parser.parse_args().device))
