"""Forward + backward benchmarks of kdfast's fused Hinton KD loss against plain-PyTorch formulations.

    loss = (1 - alpha) CE(y, z_s) + alpha T^2 KL(softmax(z_t/T) || softmax(z_s/T)),  alpha = 0.9, T = 4

Formulations (one pytest-benchmark group per (K, dtype, device), side by side):
* ``kdfast``: kdfast.ops.kd_loss (one fused kernel forward, one backward; saves (B, 5) row statistics);
* ``torch``: F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, batchmean) + F.cross_entropy
  (kdfast.testing.baselines.kd_loss_torch);
* ``repdistiller``: RepDistiller's DistillKL, kl_div(log_softmax(s/T), softmax(t/T), sum) * T^2 / B,
  + cross_entropy (kdfast.testing.baselines.repdistiller_kd_loss) — also the form most KD code bases use;
* ``torch_compile``: the ``torch`` formulation under torch.compile (inductor, dynamic=False), the
  pure-PyTorch route Liger-Kernel's chunked distillation losses take (its Triton kernels are
  CUDA-only; Liger applies no T^2, which does not change the cost).

Shapes: B = 128 rows, K = 10, 100 (CIFAR), 1000 (ImageNet), 10k and 32k classes (vocabulary-sized);
quick mode (KDFAST_BENCH_QUICK=1): K = 10, 100, 1000.

How to run (from the repository root):

    pytest benchmarks/bench_kd_loss.py --benchmark-json=bench-kd.json
    python benchmarks/report.py bench-kd.json --out benchmarks/results/<device>/kd-loss
    KDFAST_BENCH_QUICK=1 pytest benchmarks/bench_kd_loss.py --benchmark-disable -q   # smoke test

What is timed: the loss and torch.autograd.grad w.r.t. the student's logits (the teacher's are
plain tensors). Peak memory (harness.peak_bytes) counts what one call allocates above the inputs.
"""
from __future__ import annotations

import pytest
import torch

import harness
from harness import QUICK, Case, run_case
from kdfast import _ext, ops
from kdfast.testing import baselines

F32 = 4  # bytes
TEMPERATURE, ALPHA = 4.0, 0.9
BATCH = 128

# K -> tier; quick mode keeps "cifar" and "imagenet".
KD_CLASSES = {10: "cifar", 100: "cifar", 1000: "imagenet", 10_000: "large", 32_000: "large"}


def _selected() -> list[int]:
    return [k for k, tier in KD_CLASSES.items() if not QUICK or tier in ("cifar", "imagenet")]


def _compiled_torch():
    return torch.compile(baselines.kd_loss_torch, backend="inductor", dynamic=False)


_COMPILED = {}


def _torch_compile_loss(s, t, y):
    # One compiled function per session; dynamo specialises it per shape/dtype (dynamic=False).
    fn = _COMPILED.setdefault("fn", _compiled_torch())
    return fn(s, t, y, TEMPERATURE, ALPHA)


KD_IMPLS = {
    "kdfast": lambda s, t, y: ops.kd_loss(s, t, y, TEMPERATURE, ALPHA),
    "torch": lambda s, t, y: baselines.kd_loss_torch(s, t, y, TEMPERATURE, ALPHA),
    "repdistiller": lambda s, t, y: baselines.repdistiller_kd_loss(s, t, y, TEMPERATURE, ALPHA),
    "torch_compile": _torch_compile_loss,
}


def _est_extra_elems(impl: str, b: int, k: int) -> int:
    """Estimated peak (B, K)-sized buffers of one fwd + bwd above the inputs, in elements.
    kdfast: the student's gradient (+ a float32 copy for low precision). Eager torch: the scaled
    logits, both log-softmaxes, the KL's elementwise terms, the CE's log-softmax, and the gradient
    chain (about 3 live at once)."""
    if impl == "kdfast":
        return 2 * b * k
    if impl == "torch_compile":
        return 4 * b * k
    return 9 * b * k


DEVICE_DTYPES = [
    pytest.param(dev, harness.dtype_name(dt), id=f"{harness.dtype_name(dt)}-{dev}")
    for dev in harness.devices()
    for dt in harness.dtypes(dev)
]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("impl", list(KD_IMPLS))
@pytest.mark.parametrize("k", _selected())  # innermost decorator varies slowest: the formulations of a K run back to back
def test_kd_loss(benchmark, impl, k, device, dtype):
    dt = getattr(torch, dtype)
    esize = torch.tensor([], dtype=dt).element_size()
    b = BATCH

    def make_inputs():
        return (
            (3 * torch.randn(b, k, dtype=dt, device=device)).requires_grad_(),  # student logits
            3 * torch.randn(b, k, dtype=dt, device=device),  # teacher logits: no grad
            torch.randint(0, k, (b,), device=device),
        )

    unsupported = None
    if impl == "kdfast":
        key = "CUDA" if device == "cuda" else "CPU"
        if not _ext.has_kernel("kd_loss", key):
            unsupported = f"kdfast built without {key} kernels for kd_loss"
    case = Case(
        loss="kd",
        impl=impl,
        shape_label=f"B{b} K{k}",
        shape={"B": b, "K": k},
        tier=KD_CLASSES[k],
        dtype=dt,
        device=device,
        make_inputs=make_inputs,
        loss_fn=KD_IMPLS[impl],
        input_bytes=2 * b * k * esize + b * 8,
        est_extra_bytes=_est_extra_elems(impl, b, k) * max(esize, F32),
        gemm_flops=0.0,
        unsupported=unsupported,
        info={"shape_key": f"K{k}", "shape_index": list(KD_CLASSES).index(k), "temperature": TEMPERATURE, "alpha": ALPHA},
    )
    run_case(benchmark, case)


# Paired: kdfast and PyTorch's eager formulation in alternation on the same inputs (see
# harness.time_paired); the ratio docs/performance.md quotes for small K, where single cells are noisy.
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("k", _selected())
def test_paired_vs_torch(benchmark, k, device, dtype):
    dt = getattr(torch, dtype)
    key = "CUDA" if device == "cuda" else "CPU"
    if not _ext.has_kernel("kd_loss", key):
        pytest.skip(f"kdfast built without {key} kernels for kd_loss")
    torch.manual_seed(0)
    inputs = ((3 * torch.randn(BATCH, k, dtype=dt, device=device)).requires_grad_(),
              3 * torch.randn(BATCH, k, dtype=dt, device=device), torch.randint(0, k, (BATCH,), device=device))
    harness.time_paired(benchmark, f"paired kd B{BATCH} K{k} {dtype} {device}", harness.grad_step(KD_IMPLS["kdfast"], inputs),
                        harness.grad_step(KD_IMPLS["torch"], inputs), device, {"loss": "kd", "shape": f"B{BATCH} K{k}", "dtype": dtype,
                                         "baseline": "PyTorch (log_softmax + kl_div + cross_entropy)"})
