"""kdfast: fast knowledge distillation for CNNs (fused C++/CUDA kernels under a thin PyTorch API)."""
import importlib
import os

import torch  # noqa: F401  (torch must be imported before kdfast._C)

from . import _ext

if _ext.is_loaded():
    from . import _registrations  # noqa: F401  (fake kernels for torch.compile)

from . import ops  # noqa: E402

if _ext.is_loaded() and os.environ.get("KDFAST_TUCKER_CACHE"):
    # a saved Tucker path cache (docs/tucker-path.md): the deployment measures nothing on first calls
    from .backends import tucker as _tucker_backend

    _tucker_backend.load_cache_from_environment()

__version__ = "0.1.0"

# Subpackages and top-level shortcuts are imported on first use, so `import kdfast` stays cheap
# (no tensorly, scikit-learn or matplotlib import) and one broken optional part cannot break the rest.
_SUBMODULES = {
    "attacks", "backends", "cli", "cost", "data", "decomposition", "distill", "evbmf", "experiments", "export",
    "fusion", "methods", "model_file",
    "losses", "models", "nn", "robustness",
}
_SHORTCUTS = {
    "decompose": ("kdfast.decomposition", "decompose"),
    "export_onnx": ("kdfast.export", "export_onnx"),
    "fuse_for_inference": ("kdfast.fusion", "fuse_for_inference"),
    "robustness_report": ("kdfast.robustness", "robustness_report"),
    "to_plain": ("kdfast.export", "to_plain"),
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _SHORTCUTS:
        module, attr = _SHORTCUTS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kdfast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES | set(_SHORTCUTS))


__all__ = ["ops", "__version__", *sorted(_SUBMODULES), *sorted(_SHORTCUTS)]
