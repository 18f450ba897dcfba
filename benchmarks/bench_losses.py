"""Forward + backward benchmarks of kdfast's distillation losses against plain-PyTorch formulations.

How to run (from the repository root; benchmarks/pytest.ini is picked up automatically because the
paths given are inside benchmarks/, so pyproject's testpaths=["tests"] does not get in the way):

    # full run (CPU: ~20 min on 2 cores), JSON for report.py
    pytest benchmarks/bench_losses.py --benchmark-json=bench.json
    python benchmarks/report.py bench.json --out benchmarks/results/<device>/losses

    # quick run (CIFAR shapes + the headline NST shape, 3 rounds each; what `make demo` runs)
    KDFAST_BENCH_QUICK=1 pytest benchmarks --benchmark-json=bench-quick.json

    # smoke test: every case called once, nothing timed
    KDFAST_BENCH_QUICK=1 pytest benchmarks/bench_losses.py --benchmark-disable -q

    `pytest benchmarks` collects bench_*.py the same way; `pytest -c benchmarks/pytest.ini ...`
    forces that configuration from anywhere.

Environment: KDFAST_BENCH_QUICK=1 (quick mode), KDFAST_BENCH_MEM_GB (memory budget, default 8 GiB
on CPU, free memory on CUDA), KDFAST_BENCH_TARGET_S (seconds of timed calls per case, default 3).
Options (conftest.py): --kdfast-oom=PATH also writes the untimed cases (OOM, unsupported) to a
JSON file; --kdfast-keep-data keeps pytest-benchmark's raw per-round timings in the JSON.

What is timed: one call of the loss plus torch.autograd.grad with respect to the student's
inputs (requires_grad); teacher inputs are plain tensors (detached, as in distillation).
Each formulation is one parametrised test; one pytest-benchmark group per (loss, shape, dtype,
device), so the table shows the formulations of one shape side by side.

Out of memory is a result: before a case runs, its peak memory is estimated (formulas below,
checked against measured peaks); above the budget it is recorded as "out of memory (estimated X
GiB > budget Y GiB)" and not run. A real OOM error (torch.OutOfMemoryError, or RuntimeError /
MemoryError naming an allocation failure) is recorded the same way. These records go into the
benchmark JSON under "kdfast" -> "not_run"; report.py shows them as OOM cells.
"""
from __future__ import annotations

import pytest
import torch

import harness
from harness import QUICK, Case, run_case
from kdfast import _ext, ops
from kdfast.testing import baselines

F32 = 4  # bytes


# =============================================================================================== shapes
# NST: (B, Cs, Hs, Ct, Ht), square maps; the larger map is pooled to the smaller when Hs != Ht.
NST_SHAPES = {
    # CIFAR ResNet stages (B = 64): C 16..64 at 32x32 / 16x16 / 8x8
    "cifar-s1": ("cifar", (64, 16, 32, 16, 32)),
    "cifar-s2": ("cifar", (64, 32, 16, 32, 16)),
    "cifar-s3": ("cifar", (64, 64, 8, 64, 8)),
    # student narrower than teacher (e.g. resnet20 vs resnet32x4-like widths), same stage
    "cifar-s1-wide": ("cifar", (64, 16, 32, 64, 32)),
    "cifar-s2-wide": ("cifar", (64, 32, 16, 128, 16)),
    "cifar-s3-wide": ("cifar", (64, 64, 8, 256, 8)),
    # student stage 2 against teacher stage 3 (pooling 16x16 -> 8x8)
    "cifar-s2-t3": ("cifar", (64, 32, 16, 64, 8)),
    # the headline target shape
    "headline": ("headline", (64, 256, 8, 512, 8)),
    # ImageNet ResNet-50 stages
    "imagenet-s1": ("imagenet", (64, 256, 56, 256, 56)),
    "imagenet-s2": ("imagenet", (64, 512, 28, 512, 28)),
    "imagenet-s3": ("imagenet", (64, 1024, 14, 1024, 14)),
    "imagenet-s4": ("imagenet", (64, 2048, 7, 2048, 7)),
    # ResNet-18 student against ResNet-50 teacher, last stage; and a larger batch
    "imagenet-r18-r50-s4": ("imagenet", (64, 512, 7, 2048, 7)),
    "imagenet-s3-B256": ("imagenet", (256, 512, 14, 512, 14)),
}

# FSP: (B, Ca, Ha, Cb, Hb) for both student and teacher (their Gram shapes must match); the pair
# is the input and the output of one network stage, so either the same size or (C, H) -> (2C, H/2)
# where the larger map is pooled.
FSP_SHAPES = {
    "cifar-s1": ("cifar", (64, 16, 32, 16, 32)),
    "cifar-s1-s2": ("cifar", (64, 16, 32, 32, 16)),
    "cifar-s2": ("cifar", (64, 32, 16, 32, 16)),
    "cifar-s2-s3": ("cifar", (64, 32, 16, 64, 8)),
    "cifar-s3": ("cifar", (64, 64, 8, 64, 8)),
    "imagenet-s1-s2": ("imagenet", (64, 256, 56, 512, 28)),
    "imagenet-s2": ("imagenet", (64, 512, 28, 512, 28)),
    "imagenet-s2-s3": ("imagenet", (64, 512, 28, 1024, 14)),
    "imagenet-s3-s4": ("imagenet", (64, 1024, 14, 2048, 7)),
    "imagenet-s4": ("imagenet", (64, 2048, 7, 2048, 7)),
    "imagenet-s2-s3-B128": ("imagenet", (128, 512, 28, 1024, 14)),
}


def _selected(shapes: dict) -> list[str]:
    return [k for k, (tier, _) in shapes.items() if not QUICK or tier in ("cifar", "headline")]


def _nst_label(b, cs, hs, ct, ht) -> str:
    if hs == ht:
        return f"B{b} Cs{cs} Ct{ct} {hs}x{hs}"
    return f"B{b} Cs{cs}@{hs}x{hs} Ct{ct}@{ht}x{ht}"


def _fsp_label(b, ca, ha, cb, hb) -> str:
    return f"B{b} a{ca}@{ha}x{ha} b{cb}@{hb}x{hb}"


DEVICE_DTYPES = [
    pytest.param(dev, harness.dtype_name(dt), id=f"{harness.dtype_name(dt)}-{dev}")
    for dev in harness.devices()
    for dt in harness.dtypes(dev)
]


def _randn(shape, dtype, device, requires_grad=False):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def _kdfast_unsupported(op: str, device: str) -> str | None:
    key = "CUDA" if device == "cuda" else "CPU"
    if not _ext.has_kernel(op, key):
        return f"kdfast built without {key} kernels for {op}"
    return None


# =============================================================================================== NST
def _nst_flops(impl: str, kernel: str, b, cs, ct, hw) -> float:
    """GEMM FLOPs (2 per multiply-add) of the Gram products the formulation executes, fwd + bwd
    with the student's gradient only. RepDistiller's broadcast products do the same multiply-adds
    as bmm's channel Grams, without a GEMM."""
    if kernel == "linear":
        return 0.0
    if kernel == "gaussian":  # kdfast: all (Cs+Ct)^2 kernel values forward; student rows twice backward
        return 2.0 * b * hw * (cs + ct) ** 2 + 4.0 * b * hw * cs * (cs + ct)
    fwd_channel = 2.0 * b * hw * (cs * cs + cs * ct + ct * ct)
    if impl == "kdfast":
        if ops.nst_poly_form(cs, ct, hw) == "poly_spatial":
            return 2.0 * b * hw * hw * (cs + ct) + 2.0 * b * hw * hw * cs
        return fwd_channel + 2.0 * b * hw * (cs * cs + cs * ct)
    # autograd through s s^T differentiates both operands (two GEMMs), through s t^T one
    return fwd_channel + 2.0 * b * hw * (2 * cs * cs + cs * ct)


def _nst_est_bytes(impl: str, kernel: str, b, cs, hs, ct, ht, esize) -> int:
    """Estimated peak bytes of one fwd + bwd above the inputs (checked against measured peaks)."""
    hw = min(hs, ht) ** 2
    f_s, f_t = b * cs * hw, b * ct * hw
    pooled = (b * cs * hw if hs > ht else 0) + (b * ct * hw if ht > hs else 0)
    grads = b * cs * hs * hs
    if impl == "repdistiller":
        # one (B, C, C', HW) broadcast product at a time: forward; the student-student product's
        # backward materialises the product-sized gradient for both operands; plus the kernel matrices
        p_ss, p_st, p_tt = b * cs * cs * hw, b * cs * ct * hw, b * ct * ct * hw
        grams = b * (cs * cs + cs * ct + ct * ct)
        elems = max(p_tt, 2 * p_ss, 2 * p_st) + grams + 3 * (f_s + f_t) + 2 * pooled + grads
    elif impl == "bmm":
        grams = b * (cs * cs + cs * ct + ct * ct)
        elems = 2 * grams + 3 * (f_s + f_t) + 2 * pooled + grads
    else:  # kdfast
        if kernel == "poly":
            form = ops.nst_poly_form(cs, ct, hw)
            aux = b * (cs * cs + cs * ct + ct * ct) if form == "poly_channel" else b * hw * hw
        elif kernel == "gaussian":
            aux = 2 * (1 << 22)  # bounded tile workspace (kernel values and their GEMM-dtype copy)
        else:
            aux = b * hw
        elems = aux + 2 * (f_s + f_t) + 2 * f_s + 2 * pooled + grads
    return int(elems * max(esize, F32))  # kdfast accumulates in float32 even for bfloat16


NST_POLY_IMPLS = {
    "kdfast": lambda fs, ft: ops.nst_loss(fs, ft, "poly"),
    "bmm": baselines.nst_poly_loss_bmm,
    "repdistiller": baselines.repdistiller_nst_loss,
}


def _nst_case(shape_key, loss, kernel, impl, fn, device, dtype_name) -> Case:
    tier, (b, cs, hs, ct, ht) = NST_SHAPES[shape_key]
    dtype = getattr(torch, dtype_name)
    esize = torch.tensor([], dtype=dtype).element_size()
    hw = min(hs, ht) ** 2
    return Case(
        loss=loss,
        impl=impl,
        shape_label=_nst_label(b, cs, hs, ct, ht),
        shape={"B": b, "Cs": cs, "Hs": hs, "Ct": ct, "Ht": ht},
        tier=tier,
        dtype=dtype,
        device=device,
        make_inputs=lambda: (
            _randn((b, cs, hs, hs), dtype, device, requires_grad=True),  # student
            _randn((b, ct, ht, ht), dtype, device),  # teacher: no grad
        ),
        loss_fn=fn,
        input_bytes=(b * cs * hs * hs + b * ct * ht * ht) * esize,
        est_extra_bytes=_nst_est_bytes(impl, kernel, b, cs, hs, ct, ht, esize),
        gemm_flops=_nst_flops(impl, kernel, b, cs, ct, hw),
        unsupported=_kdfast_unsupported("nst_loss", device) if impl == "kdfast" else None,
        info={
            "kernel": kernel,
            "shape_key": shape_key,
            "shape_index": list(NST_SHAPES).index(shape_key),
            **({"nst_form": ops.nst_poly_form(cs, ct, hw)} if impl == "kdfast" and kernel == "poly" else {}),
        },
    )


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("impl", list(NST_POLY_IMPLS))
@pytest.mark.parametrize("shape_key", _selected(NST_SHAPES))  # innermost decorator varies slowest: the formulations of a shape run back to back
def test_nst_poly(benchmark, impl, shape_key, device, dtype):
    run_case(benchmark, _nst_case(shape_key, "nst-poly", "poly", impl, NST_POLY_IMPLS[impl], device, dtype))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("kernel", ["linear", "gaussian"])
@pytest.mark.parametrize("shape_key", _selected(NST_SHAPES))  # innermost decorator varies slowest: the formulations of a shape run back to back
def test_nst_kernel(benchmark, kernel, shape_key, device, dtype):
    """kdfast's other NST kernels (no plain-PyTorch baseline here): extra kdfast-only rows."""
    fn = lambda fs, ft: ops.nst_loss(fs, ft, kernel)  # noqa: E731
    run_case(benchmark, _nst_case(shape_key, f"nst-{kernel}", kernel, "kdfast", fn, device, dtype))


# =============================================================================================== FSP
def _fsp_est_bytes(impl: str, b, ca, ha, cb, hb, esize) -> int:
    hw = min(ha, hb) ** 2
    gram = b * ca * cb
    originals = b * ca * ha * ha + b * cb * hb * hb  # the student's gradients
    pooled = b * (ca if ha > hb else cb) * hw if ha != hb else 0  # per side (student, teacher)
    if impl == "repdistiller":
        # (B, Cb, Ca, HW) broadcast product; backward: mean's expanded gradient and one
        # product-sized gradient per operand
        elems = 3 * gram * hw + 3 * originals + 3 * pooled
    elif impl == "kdfast":  # the saved Gram difference, its scaled copy and a transposed copy in backward
        elems = 3 * gram + 2 * originals + 3 * pooled
    elif impl == "torchdistill":  # adaptive max pooling also keeps int64 indices
        elems = 4 * gram + 2 * originals + 5 * pooled
    else:  # bmm
        elems = 4 * gram + 2 * originals + 3 * pooled
    return int(elems * max(esize, F32))


FSP_IMPLS = {
    "kdfast": ops.fsp_loss,
    "bmm": baselines.fsp_loss_bmm,
    "repdistiller": baselines.repdistiller_fsp_loss,
    "torchdistill": baselines.torchdistill_fsp_loss,
}


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("impl", list(FSP_IMPLS))
@pytest.mark.parametrize("shape_key", _selected(FSP_SHAPES))  # innermost decorator varies slowest: the formulations of a shape run back to back
def test_fsp(benchmark, impl, shape_key, device, dtype):
    tier, (b, ca, ha, cb, hb) = FSP_SHAPES[shape_key]
    dt = getattr(torch, dtype)
    esize = torch.tensor([], dtype=dt).element_size()
    hw = min(ha, hb) ** 2

    def make_inputs():
        return (
            _randn((b, ca, ha, ha), dt, device, requires_grad=True),  # s_a
            _randn((b, cb, hb, hb), dt, device, requires_grad=True),  # s_b
            _randn((b, ca, ha, ha), dt, device),  # t_a
            _randn((b, cb, hb, hb), dt, device),  # t_b
        )

    case = Case(
        loss="fsp",
        impl=impl,
        shape_label=_fsp_label(b, ca, ha, cb, hb),
        shape={"B": b, "Ca": ca, "Ha": ha, "Cb": cb, "Hb": hb},
        tier=tier,
        dtype=dt,
        device=device,
        make_inputs=make_inputs,
        loss_fn=FSP_IMPLS[impl],
        input_bytes=2 * (b * ca * ha * ha + b * cb * hb * hb) * esize,
        est_extra_bytes=_fsp_est_bytes(impl, b, ca, ha, cb, hb, esize),
        # two Grams forward; the student's two operand gradients backward
        gemm_flops=8.0 * b * ca * cb * hw,
        unsupported=_kdfast_unsupported("fsp_loss", device) if impl == "kdfast" else None,
        info={"shape_key": shape_key, "shape_index": list(FSP_SHAPES).index(shape_key)},
    )
    run_case(benchmark, case)


# ============================================================================== paired: kdfast vs bmm
# The cells above time each formulation on its own, one after another; harness.time_paired runs
# kdfast and the bmm formulation in alternation on the same inputs and takes the ratio per round.
def _paired_params():
    out = []
    for p in DEVICE_DTYPES:
        for loss, shapes in (("nst-poly", NST_SHAPES), ("fsp", FSP_SHAPES)):
            for key, (tier, _) in shapes.items():
                if tier == "cifar" or (tier == "headline" and loss == "nst-poly"):
                    out.append(pytest.param(loss, key, *p.values, id=f"{loss}-{key}-{p.id}"))
    return out


@pytest.mark.parametrize("loss, shape_key, device, dtype", _paired_params())
def test_paired_vs_bmm(benchmark, loss, shape_key, device, dtype):
    dt = getattr(torch, dtype)
    if loss == "fsp":
        _, (b, ca, ha, cb, hb) = FSP_SHAPES[shape_key]
        label = _fsp_label(b, ca, ha, cb, hb)
        inputs = (_randn((b, ca, ha, ha), dt, device, True), _randn((b, cb, hb, hb), dt, device, True),
                  _randn((b, ca, ha, ha), dt, device), _randn((b, cb, hb, hb), dt, device))
        kdfast_fn, bmm_fn = ops.fsp_loss, baselines.fsp_loss_bmm
    else:
        _, (b, cs, hs, ct, ht) = NST_SHAPES[shape_key]
        label = _nst_label(b, cs, hs, ct, ht)
        inputs = (_randn((b, cs, hs, hs), dt, device, True), _randn((b, ct, ht, ht), dt, device))
        kdfast_fn, bmm_fn = NST_POLY_IMPLS["kdfast"], NST_POLY_IMPLS["bmm"]
    unsupported = _kdfast_unsupported("fsp_loss" if loss == "fsp" else "nst_loss", device)
    if unsupported:
        pytest.skip(unsupported)
    harness.time_paired(benchmark, f"paired {loss} {label} {dtype} {device}", harness.grad_step(kdfast_fn, inputs),
                        harness.grad_step(bmm_fn, inputs), device,
                        {"loss": loss, "shape": label, "shape_key": shape_key, "dtype": dtype,
                         "baseline": "bmm (plain PyTorch)"})
