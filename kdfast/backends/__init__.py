"""Process-wide backend switches of kdfast's ops (like ``torch.backends``).

``kdfast.backends.tucker``: how :func:`kdfast.ops.tucker_conv2d` chooses between its fused CPU kernel
and the three-convolution composition (run-time autotuning and its cache; docs/tucker-path.md).
"""
from . import tucker

__all__ = ["tucker"]
