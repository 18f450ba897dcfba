"""Build and runtime facts: ``python -m kdfast info`` (``--json`` for the machine-readable form).

Per op it also says which path CUDA runs: ``"aten"`` (ATen calls only, the same driver code the CPU
suite checks against the float64 reference; the default) or ``"kernel"`` (the op's hand-written CUDA
kernel, the default only where the table in csrc/ops/kernel_paths.cpp marks it verified on a GPU).
``KDFAST_CUDA_KERNELS=all|none|<op,op>`` and ``KDFAST_CPU_KERNELS=...`` override it per process.
"""
from __future__ import annotations

import json
import os
import platform

import torch

from . import _ext

#: Public ops and the internal backward ops that serve them. A new op adds its row here, in
#: csrc/ops/kernel_paths.cpp (the CUDA kernel table), csrc/ops/schemas.cpp and csrc/ops/autocast.cpp;
#: tests/ops/test_kernel_paths.py checks that the four agree.
OPS = {
    "fsp_matrix": ["fsp_matrix", "_fsp_matrix_backward"],
    "fsp_loss": ["fsp_loss", "_fsp_loss_backward"],
    "nst_loss": ["nst_loss", "_nst_loss_backward"],
    "tucker_conv2d": [
        "tucker_conv2d", "_tucker_conv2d_backward", "_tucker_conv2d_path",
        "_tucker_conv2d_with_intermediates", "_tucker_conv2d_backward_saved",
    ],
    "kd_loss": ["kd_loss", "_kd_loss_backward"],
    # KR: a mutating gradient op, no backward.
    "sparse_recoding_": ["sparse_recoding_"],
    # SRM: sparse codes (top-k of sigmoid codeword similarities).
    "sparse_codes": ["sparse_codes", "_sparse_codes_backward"],
}
BACKENDS = ("CPU", "CUDA")

#: Which implementation kdfast.ops.tucker_conv2d runs (kdfast.ops.tucker_conv2d_path(...) answers it
#: for given arguments from the compiled rule; KDFAST_DEBUG=1 logs it per call).
TUCKER_CONV2D_PATHS = (
    "CPU: float32/float64 the fused tiled kernel (with BN/residual/ReLU epilogue) or 3 ATen convs, whichever "
    "measured faster on the first call of a shape (autotune, kdfast.backends.tucker; docs/tucker-path.md); "
    "untuned calls: the measured table (csrc/ops/cpu/tucker_cpu_rule.h) inside its envelope, else 3 ATen convs; "
    "float16/bfloat16 3 ATen convs; "
    "CUDA: 3 cuDNN convs; the fused kernel (float32/16/bf16, kernel 1/3/5/7, stride <= 2, shared memory "
    "permitting) only when enabled (KDFAST_CUDA_KERNELS, or once verified on a GPU)"
)

#: Which implementation kdfast.ops.sparse_codes runs (KDFAST_CPU_KERNELS / KDFAST_CUDA_KERNELS override it).
SPARSE_CODES_PATHS = (
    "CPU: fused tiled kernel (GEMM per tile + running top-k); "
    "CUDA: ATen formulation (chunked GEMM + stable sort); the CUDA kernel is compiled but unverified (opt-in)"
)


def op_backends() -> dict:
    """{public op: [backends whose forward and backward kernels are both compiled]}."""
    return {
        op: [key for key in BACKENDS if all(_ext.has_kernel(name, key) for name in names)]
        for op, names in OPS.items()
    }


def kernel_paths() -> dict | None:
    """The compiled CUDA kernel table and the current overrides (csrc/ops/kernel_paths.cpp), or None
    when the extension is not loaded. Raises ValueError if KDFAST_CUDA_KERNELS / KDFAST_CPU_KERNELS
    name an unknown op."""
    if not _ext.is_loaded():
        return None
    return json.loads(torch.ops.kdfast._kernel_paths())


def collect() -> dict:
    from . import __version__

    info = {
        "kdfast": __version__,
        "python": platform.python_version(),
        "torch (installed)": torch.__version__,
        "torch CUDA": torch.version.cuda,
        "CUDA available": torch.cuda.is_available(),
        "kdfast._C loaded": _ext.is_loaded(),
    }
    built = _ext.build_info()
    if built is not None:
        info["torch (built against)"] = built["torch"]
        info["CUDA kernels compiled"] = _ext.has_cuda_kernels()
        info["CUDA (built against)"] = built["cuda"]
        info["CPU kernels multi-threaded"] = built["parallel"]
    problem = _ext.problem()
    info["status"] = "ok" if problem is None else f"{problem} {_ext.REBUILD_HINT}"
    if torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name()
    info["CPU threads"] = torch.get_num_threads()
    info["tucker_conv2d paths"] = TUCKER_CONV2D_PATHS
    info["sparse_codes paths"] = SPARSE_CODES_PATHS
    if _ext.is_loaded():
        try:
            info["tucker_conv2d autotune"] = tucker_autotune_summary(tucker_autotune_state())
        except (ValueError, RuntimeError) as exc:  # a bad KDFAST_TUCKER_AUTOTUNE value
            info["tucker_conv2d autotune"] = f"error: {str(exc).splitlines()[0]}"
    return info


def tucker_autotune_state() -> dict | None:
    """The Tucker path switch and cache (kdfast.backends.tucker.state()), or None without the extension."""
    if not _ext.is_loaded():
        return None
    from .backends import tucker

    return tucker.state()


def tucker_autotune_summary(st: dict) -> str:
    """One line: the switch, who set it, and the cache's size and counters."""
    entries = st["entries"]
    loaded = sum(e["source"] == "file" for e in entries)
    fused = sum(e["path"] == "fused" for e in entries)
    return (f"{'on' if st['enabled'] else 'off'} (set by {st['set_by']}); {len(entries)} cached paths "
            f"({fused} fused, {len(entries) - fused} composed; {loaded} from a file), {st['tunings']} measured "
            f"in this process, {st['hits']} cache hits; KDFAST_TUCKER_CACHE={os.environ.get('KDFAST_TUCKER_CACHE')}")


def _paths_or_error():
    try:
        return kernel_paths(), None
    except (ValueError, RuntimeError) as exc:  # a bad KDFAST_*_KERNELS value
        return None, str(exc).splitlines()[0]


def collect_json() -> dict:
    """``kdfast info --json``: the facts of :func:`collect` plus, per op, its compiled backends and
    its CUDA path: ``{"ops": {"<op>": {"backends": [...], "cuda_default_path": "aten" | "kernel",
    "cuda_kernel_verified": bool, ...}}}``."""
    out = dict(collect())
    table, error = _paths_or_error()
    if table is not None:
        out["KDFAST_CUDA_KERNELS"] = table["KDFAST_CUDA_KERNELS"]
        out["KDFAST_CPU_KERNELS"] = table["KDFAST_CPU_KERNELS"]
    if error is not None:
        out["kernel paths error"] = error
    ops = {}
    for op, backends in op_backends().items():
        row = {"backends": backends}
        if table is not None and op in table["ops"]:
            row.update(table["ops"][op])
        ops[op] = row
    out["ops"] = ops
    try:
        out["tucker_autotune"] = tucker_autotune_state()
    except (ValueError, RuntimeError) as exc:
        out["tucker_autotune"] = {"error": str(exc).splitlines()[0]}
    return out


def render() -> str:
    info = collect()
    width = max(len(k) for k in info)
    lines = [f"{k:<{width}}  {v}" for k, v in info.items()]
    table, error = _paths_or_error()
    if error is not None:
        lines.append(f"{'kernel paths':<{width}}  error: {error}")
    lines.append("")
    header = ("op", "backends", "CUDA default path", "CUDA kernel verified", "CUDA path now", "CPU path now")
    rows = []
    for op, keys in op_backends().items():
        entry = (table or {}).get("ops", {}).get(op)
        if entry is None:
            rows.append((op, ", ".join(keys) if keys else "(none: extension not loaded)", "?", "?", "?", "?"))
            continue
        kernel = entry["cuda_kernel"]
        verified = "yes" if entry["cuda_kernel_verified"] else ("no" if kernel else "(no CUDA kernel)")
        rows.append((op, ", ".join(keys), entry["cuda_default_path"], verified, entry["cuda_path_now"],
                     entry["cpu_path_now"]))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths)).rstrip())
    lines.append("")
    lines.append("CUDA path: 'aten' = ATen calls only (cuBLAS, cuDNN, ATen reductions), the code the CPU suite checks; "
                 "'kernel' = the hand-written CUDA kernel, default only once verified on a GPU. "
                 "Override: KDFAST_CUDA_KERNELS=all|none|<op,op> (KDFAST_CPU_KERNELS likewise on CPU).")
    return "\n".join(lines)
