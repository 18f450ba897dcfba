"""Loading of the compiled extension ``kdfast._C`` and facts about how it was built.

``import kdfast`` never fails because of ``_C``; calling an op without a usable ``_C`` raises one
``RuntimeError`` that says why and how to rebuild. There is no silent pure-Python fallback.
"""
from __future__ import annotations

import torch

REBUILD_HINT = (
    "Rebuild kdfast against the installed torch: in the kdfast checkout run "
    "`pip install --no-build-isolation -e .` (or `make build`)."
)

try:
    from . import _C  # noqa: F401  (its static initialisers register torch.ops.kdfast.*)

    _LOAD_ERROR: Exception | None = None
except (ImportError, OSError) as exc:  # missing, or built against another torch (undefined symbols)
    _LOAD_ERROR = exc


def is_loaded() -> bool:
    """True when kdfast._C was imported and its ops are registered."""
    return _LOAD_ERROR is None


def _read_build_info() -> dict | None:
    if not is_loaded():
        return None
    major, minor, patch, cuda, parallel = torch.ops.kdfast._build_info()
    return {
        "torch": f"{major}.{minor}.{patch}",
        "cuda": None if cuda < 0 else f"{cuda // 1000}.{(cuda % 1000) // 10}",
        # at::parallel_for in the CPU kernels uses torch's intra-op threads (compiled with OpenMP)
        "parallel": bool(parallel),
    }


def _find_problem(load_error, built) -> str | None:
    if load_error is not None:
        import glob
        import os

        here = os.path.dirname(os.path.abspath(__file__))
        if not glob.glob(os.path.join(here, "_C*.so")) and not glob.glob(os.path.join(here, "_C*.pyd")):
            # Python words a missing submodule of a half-imported package as "a circular import".
            return f"kdfast's compiled extension kdfast._C is not built (no _C*.so in {here})."
        return f"kdfast's compiled extension kdfast._C could not be loaded ({load_error!r})."
    installed = torch.__version__.split("+")[0]
    if built["torch"] != installed:
        return f"kdfast._C was built against torch {built['torch']}, but torch {installed} is installed."
    return None


# Computed once at import; plain module constants, so torch.compile can trace require_ops().
BUILD_INFO: dict | None = _read_build_info()
PROBLEM: str | None = _find_problem(_LOAD_ERROR, BUILD_INFO)


def build_info() -> dict | None:
    """Versions baked into the binary at build time, or None if ``_C`` did not load."""
    return BUILD_INFO


def problem() -> str | None:
    """Why the ops cannot be used, or None when they can."""
    return PROBLEM


def require_ops() -> None:
    """Raise a RuntimeError naming the problem and the rebuild command if the ops are unusable."""
    if PROBLEM is not None:
        raise RuntimeError(f"{PROBLEM} {REBUILD_HINT}")


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``kdfast::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA", "Meta", ...)."""
    if not is_loaded():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"kdfast::{op}", dispatch_key)
    except RuntimeError:
        return False


def has_cuda_kernels() -> bool:
    """True when kdfast._C was compiled with its CUDA kernels."""
    return is_loaded() and build_info()["cuda"] is not None and has_kernel("fsp_loss", "CUDA")
