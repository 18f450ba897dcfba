"""kdfast: fast knowledge distillation for CNNs (fused C++/CUDA kernels under a thin PyTorch API)."""
import torch  # noqa: F401  (torch must be imported before kdfast._C)

from . import _ext

if _ext.is_loaded():
    from . import _registrations

    _registrations.register_all()

from . import ops, reference  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "reference", "__version__"]
