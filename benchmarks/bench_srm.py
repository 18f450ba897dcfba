"""SRM's sparse coding hot path: kdfast vs the official dense formulation (viebboy/SRM Layers.py).

* ``reconstruct``: stage A's step, MSE(C s_hat, x) forward + backward w.r.t. the dictionary and the
  intercept (the teacher feature x is frozen), and one headline row with x requiring grad too.
  kdfast: ``kdfast.methods.srm.reconstruct`` (the fused ``sparse_codes`` op, then a k-per-pixel
  sparse product). Official: the full (N, H, W, K) sigmoid similarity, ``torch.topk``, the mask
  ``s >= s_(k)``, a dense reconstruction (``kdfast.testing.baselines.srm_reconstruct_official``).
* ``labels``: stage B's targets (image labels (N, K), pixel labels (N, H, W)), forward only:
  ``kdfast.methods.srm.labels`` vs the official ``GlobalLocalLabel`` computation.

Each pair is timed in alternation (harness.time_paired: the per-round ratio cancels the drift of a
shared machine) and its peak memory measured (allocator events, inputs excluded).

    KDFAST_BENCH_SRM_ROUNDS=10 pytest benchmarks/bench_srm.py --benchmark-json=srm.json
    python benchmarks/bench_srm.py srm.json --out benchmarks/results/<device>/srm
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import harness

# Rounds of each paired timing (harness default: 100, quick mode 3).
if os.environ.get("KDFAST_BENCH_SRM_ROUNDS"):
    harness.PAIRED_ROUNDS = int(os.environ["KDFAST_BENCH_SRM_ROUNDS"])

# (name, N, D, H, W, K, k): CIFAR stages of the official setup (DenseNet-121 teacher: 128 ch at 16x16,
# 256 ch at 8x8; a 64-ch 32x32 stem stage), K = 2D, k = 1-3% of K; and an ImageNet-like stage
# (ResNet-34 layer3: 256 ch at 14x14, K = 4D as the official ImageNet setup, k = 2%).
SHAPES = [
    ("cifar-d64-32x32", 128, 64, 32, 32, 128, 2),
    ("cifar-d128-16x16", 128, 128, 16, 16, 256, 5),
    ("cifar-d256-8x8-k5", 128, 256, 8, 8, 512, 5),
    ("headline-d256-8x8-k10", 128, 256, 8, 8, 512, 10),
    ("cifar-d256-8x8-k15", 128, 256, 8, 8, 512, 15),
    ("imagenet-d256-14x14", 32, 256, 14, 14, 1024, 20),
]
HEADLINE = "headline-d256-8x8-k10"


def _inputs(n, d, h, w, kk, device, x_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(n, d, h, w, generator=g)).to(device).requires_grad_(x_grad)
    c = (torch.rand(d, kk, generator=g) * 2 - 1).mul_((6 / kk) ** 0.5).to(device).requires_grad_()  # Kaiming-uniform
    b = (torch.rand(1, generator=g) * 2 - 1).to(device).requires_grad_()
    return x, c, b


def _assert_mostly_close(a, e, rtol=2e-3, atol=1e-6, max_share=1e-3):
    far = ~torch.isclose(a, e, rtol=rtol, atol=atol)
    assert far.float().mean() <= max_share, f"{int(far.sum())} of {far.numel()} entries differ"


def _reconstruct_loss(fn, k):
    return lambda x, c, b: F.mse_loss(fn(x, c, b, k), x.detach())


@pytest.mark.parametrize("x_grad", [False, True], ids=["wrt-dictionary", "wrt-all"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_reconstruct(benchmark, shape, x_grad):
    from kdfast.methods import srm
    from kdfast.testing import baselines

    name, n, d, h, w, kk, k = shape
    if x_grad and name != HEADLINE:
        pytest.skip("x-gradient row only at the headline shape")
    x, c, b = _inputs(n, d, h, w, kk, "cpu", x_grad)
    ours = harness.grad_step(_reconstruct_loss(srm.reconstruct, k), (x, c, b))
    official = harness.grad_step(_reconstruct_loss(baselines.srm_reconstruct_official, k), (x, c, b))
    # Same gradients (untimed) up to float32 near-ties at the k-th code: the two GEMMs round
    # differently, so a handful of pixels may select another codeword (their entries differ).
    for a, e in zip(ours(), official()):
        _assert_mostly_close(a, e)
    info = {"op": "reconstruct", "shape": name, "N": n, "D": d, "H": h, "W": w, "K": kk, "k": k,
            "wrt": "x, dictionary, bias" if x_grad else "dictionary, bias"}
    info["peak_bytes"] = {"kdfast": harness.peak_bytes(ours, "cpu"), "official": harness.peak_bytes(official, "cpu")}
    harness.time_paired(benchmark, f"srm reconstruct fwd+bwd {name} wrt {'all' if x_grad else 'C,b'}", ours,
                        official, "cpu", info)


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_labels(benchmark, shape):
    from kdfast.methods import srm
    from kdfast.testing import baselines

    name, n, d, h, w, kk, k = shape
    x, c, b = _inputs(n, d, h, w, kk, "cpu")
    c, b = c.detach(), b.detach()

    def ours():
        return srm.labels(x, c, b, k)

    def official():
        with torch.no_grad():
            return baselines.srm_labels_official(x, c, b, k)

    (oi, op), (ei, ep) = ours(), official()
    _assert_mostly_close(oi, ei)
    assert (op == ep).float().mean() > 0.999  # float32 near-ties may pick another codeword
    info = {"op": "labels", "shape": name, "N": n, "D": d, "H": h, "W": w, "K": kk, "k": k,
            "peak_bytes": {"kdfast": harness.peak_bytes(ours, "cpu"), "official": harness.peak_bytes(official, "cpu")}}
    harness.time_paired(benchmark, f"srm labels fwd {name}", ours, official, "cpu", info)


# ================================================================================== report
def report(paths, out):
    rows, machine = [], {}
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        machine = machine or data.get("machine_info", {})
        for bench in data["benchmarks"]:
            e = bench["extra_info"]
            if e.get("status") != "ok":
                continue
            rows.append(e)
    cpu = machine.get("cpu", {}).get("brand_raw", "CPU")
    lines = [
        "# SRM sparse coding: kdfast vs the official dense formulation", "",
        f"CPU: {cpu}, threads {rows[0]['threads'] if rows else '?'}, torch {torch.__version__}. "
        "Paired timings (alternating rounds); ratio = official time / kdfast time in the same round "
        "(median, quartiles); peak = allocator peak of one call, inputs excluded.", "",
        "| op | shape (N, D, HxW, K, k) | grads | kdfast ms | official ms | speed-up (q1-q3) | peak MiB kdfast | "
        "peak MiB official | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        pk, po = e["peak_bytes"]["kdfast"], e["peak_bytes"]["official"]
        lines.append(
            f"| {e['op']} | {e['shape']} ({e['N']}, {e['D']}, {e['H']}x{e['W']}, {e['K']}, {e['k']}) | "
            f"{e.get('wrt', 'none')} | {1e3 * e['median_s']['kdfast']:.2f} | {1e3 * e['median_s']['baseline']:.2f} | "
            f"{e['ratio']:.2f}x ({e['ratio_q1']:.2f}-{e['ratio_q3']:.2f}) | {pk / harness.MiB:.1f} | "
            f"{po / harness.MiB:.1f} | {po / max(pk, 1):.1f}x |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".md", "w") as fh:
        fh.write(text)
    with open(out + ".json", "w") as fh:
        json.dump({"machine": cpu, "rows": rows}, fh, indent=1)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.exit(report(args.json, args.out))
