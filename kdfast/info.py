"""Build and runtime facts: ``python -m kdfast info``."""
from __future__ import annotations

import platform

import torch

from . import _ext

#: Public ops and the internal backward ops that serve them.
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
    "CPU: fused tiled kernel for float64 on one thread with >= 28x28 outputs and R_in*kh*kw <= 288, else 3 ATen convs; "
    "CUDA: fused kernel (float32/16/bf16, kernel 1/3/5/7, stride <= 2, shared memory permitting; "
    "never run on a GPU), else 3 cuDNN convs"
)

#: Which implementation kdfast.ops.sparse_codes runs (KDFAST_SPARSE_CODES_PATH=aten|kernel overrides).
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
    problem = _ext.problem()
    info["status"] = "ok" if problem is None else f"{problem} {_ext.REBUILD_HINT}"
    if torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name()
    info["CPU threads"] = torch.get_num_threads()
    info["tucker_conv2d paths"] = TUCKER_CONV2D_PATHS
    info["sparse_codes paths"] = SPARSE_CODES_PATHS
    return info


def render() -> str:
    info = collect()
    width = max(len(k) for k in info)
    lines = [f"{k:<{width}}  {v}" for k, v in info.items()]
    lines.append("")
    lines.append(f"{'op':<{width}}  backends")
    for op, keys in op_backends().items():
        lines.append(f"{op:<{width}}  {', '.join(keys) if keys else '(none: extension not loaded)'}")
    return "\n".join(lines)
