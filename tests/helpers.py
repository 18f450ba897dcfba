"""Input builders shared by the op tests."""
import torch

LAYOUTS = ("contiguous", "channels_last", "strided")


def feature_map(shape, dtype=torch.float64, device="cpu", layout="contiguous", requires_grad=False):
    """A random (B, C, H, W) map in the given memory layout: contiguous, channels_last, or a
    non-contiguous view (every other column of a wider map)."""
    b, c, h, w = shape
    if layout == "contiguous":
        x = torch.randn(shape, dtype=dtype, device=device)
    elif layout == "channels_last":
        x = torch.randn(shape, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn((b, c, h, 2 * w), dtype=dtype, device=device)[..., ::2]
        assert not x.is_contiguous()
    else:
        raise ValueError(layout)
    return x.requires_grad_(requires_grad)


def grads(loss_fn, inputs, grad_out):
    """Gradients of loss_fn(*inputs) w.r.t. every input that requires grad."""
    out = loss_fn(*inputs)
    needed = [x for x in inputs if x.requires_grad]
    return out, torch.autograd.grad(out, needed, grad_out)
