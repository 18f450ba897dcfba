"""What a model costs: parameters, FLOPs (multiply-accumulates) and measured inference latency.

    kdfast.cost.parameters(model)                      # trainable + frozen parameter count
    kdfast.cost.macs(model, (3, 32, 32))               # multiply-accumulates of one forward, per sample
    kdfast.cost.latency(model, (64, 3, 32, 32))        # {"median_ms": ..., "iqr_ms": ..., ...}

``input_shape`` follows the API's one convention (as kdfast.decompose): ``(C, H, W)`` of one image or
``(N, C, H, W)`` of a batch (a batch of N = 1 for an image); ``macs`` also takes other ``(N, ...)`` shapes
of non-image inputs, e.g. ``(N, features)``.

MACs are counted with forward hooks on the layers that do the arithmetic: nn.Conv2d, nn.Linear and
kdfast.nn.TuckerConv2d (its three stages: 1x1 C -> R_in at the input resolution, k x k
R_in -> R_out and 1x1 R_out -> O at the output resolution). Normalisation, activations, pooling
and additions are not counted (the usual convention of the compression literature; they are
O(activations), not O(activations x channels)). FLOPs = 2 x MACs.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from . import _checks


def parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _conv_macs(module: nn.Conv2d, out: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    per_out = (module.in_channels // module.groups) * kh * kw
    return out.numel() // out.shape[0] * per_out


def _tucker_macs(module, inp: torch.Tensor, out: torch.Tensor) -> int:
    r_out, r_in = module.ranks
    kh, kw = module.kernel_size
    h, w = inp.shape[-2:]
    ho, wo = out.shape[-2:]
    return module.in_channels * r_in * h * w + r_in * r_out * kh * kw * ho * wo + r_out * module.out_channels * ho * wo


def _is_tucker(module) -> bool:
    return type(module).__name__ == "TuckerConv2d" and hasattr(module, "ranks") and hasattr(module, "core")


def macs(model: nn.Module, input_shape, device=None, dtype=torch.float32) -> int:
    """Multiply-accumulates of one forward, per sample (one zero batch of ``input_shape`` is run):
    ``input_shape`` is (C, H, W) of one image, (N, C, H, W) of a batch, or (N, ...) of other inputs."""
    if not isinstance(input_shape, (tuple, list, torch.Size)) or len(input_shape) < 2:
        raise ValueError(f"input_shape must be (C, H, W) of one image or (N, C, H, W) of a batch, got {input_shape!r}")
    if len(input_shape) in (3, 4):
        input_shape = _checks.image_input_shape("input_shape", input_shape)
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    total = [0]

    def hook(module, inputs, output):
        if _is_tucker(module):
            total[0] += _tucker_macs(module, inputs[0], output)
        elif isinstance(module, nn.Conv2d):
            total[0] += _conv_macs(module, output)
        elif isinstance(module, nn.Linear):
            total[0] += module.in_features * module.out_features * (output.numel() // output.shape[0] // module.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if _is_tucker(m) or isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(*input_shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total[0]


def latency(model: nn.Module, input_shape, repeats: int = 30, warmup: int = 5, device=None, dtype=torch.float32) -> dict:
    """Wall-clock time of one inference forward (eval mode, torch.inference_mode) of a batch of
    ``input_shape``: ``warmup`` untimed calls, then ``repeats`` timed ones (each synchronised on
    CUDA); returns the median, the interquartile range and the sample count, in milliseconds."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if isinstance(input_shape, (tuple, list, torch.Size)) and len(input_shape) == 3:
        input_shape = _checks.image_input_shape("input_shape", input_shape)  # one image: a batch of 1
    device = torch.device(device) if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.randn(*input_shape, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            sync()
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        model.train(was_training)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "median_ms": statistics.median(times),
        "iqr_ms": q[2] - q[0],
        "min_ms": min(times),
        "repeats": repeats,
        "batch": int(input_shape[0]),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
