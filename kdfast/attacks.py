"""L-inf adversarial attacks for the robustness evaluation: FGSM and PGD.

* FGSM (Goodfellow, Shlens, Szegedy, ICLR 2015): x' = x + eps * sign(grad_x CE(f(x), y)).
* PGD (Madry, Makelov, Schmidt, Tsipras, Vladu, ICLR 2018): optional uniform random start in the
  eps-ball, then ``steps`` iterations of x' <- P(x' + step_size * sign(grad)), where P projects
  onto the eps-ball around x and then onto the valid input range. Madry et al.'s step size
  rule of thumb 2.5 * eps / steps is the default.

Both work on a whole batch on whatever device ``x`` is on and return a detached tensor of x's
shape, dtype and device. During the attack the model is put in eval mode (BatchNorm uses its
running statistics, dropout is off: the model is attacked as it is deployed) and its parameters
stop requiring grad (no parameter gradient is computed); afterwards every submodule's train/eval
flag and every parameter's requires_grad flag are restored, and parameter ``.grad`` fields are
never touched (gradients are taken with ``torch.autograd.grad`` with respect to the input only).

``eps``, ``step_size`` and the ``clamp`` bounds are in the units of ``x``. For normalised data,
pass the normalised range, which differs per channel: ``clamp=dataset.clamp_range`` (two
(C,)-tensors) from kdfast.data, and a per-channel ``eps = pixel_eps / std``. A value may be a
Python number, a 1-D sequence/tensor of length C (one per channel of an (N, C, ...) input), or a
tensor broadcastable to x.
"""
from __future__ import annotations

import contextlib
import math
from numbers import Real

import torch
import torch.nn.functional as F

__all__ = ["fgsm", "pgd", "attack_mode"]


@contextlib.contextmanager
def attack_mode(model: torch.nn.Module, eval_mode: bool = True):
    """Eval mode and no parameter gradients inside; every submodule's mode and every parameter's
    requires_grad restored on exit (also when the body raises)."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_inputs(model, x, y):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype != torch.int64:
        raise TypeError(f"y must be int64 class indices, got {y.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x's batch, got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"device mismatch: x is on {x.device} but y is on {y.device}")


def _as_bound(value, x: torch.Tensor, name: str) -> torch.Tensor:
    """A number, a per-channel sequence/tensor of length C, or a tensor broadcastable to x -> a
    tensor on x's device and dtype that broadcasts against x."""
    if isinstance(value, Real) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be finite, got {value}")
        return torch.tensor(float(value), dtype=x.dtype, device=x.device)
    if isinstance(value, (list, tuple)):
        value = torch.tensor([float(v) for v in value])
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a number, a per-channel sequence or a tensor, got {type(value).__name__}")
    t = value.detach().to(device=x.device, dtype=x.dtype)
    if t.dim() == 1 and x.dim() >= 3 and t.numel() == x.shape[1]:
        t = t.view(1, -1, *([1] * (x.dim() - 2)))  # one value per channel of (N, C, ...)
    try:
        torch.broadcast_shapes(t.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} fits neither x's channels (C = {x.shape[1] if x.dim() > 1 else '-'}) "
            f"nor broadcasts to x's shape {tuple(x.shape)}"
        ) from None
    if torch.broadcast_shapes(t.shape, x.shape) != x.shape:
        raise ValueError(f"{name} of shape {tuple(t.shape)} would broadcast x's shape {tuple(x.shape)} to a larger one")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    return t


def _eps(eps, x):
    t = _as_bound(eps, x, "eps")
    if (t < 0).any():
        raise ValueError(f"eps must be >= 0, got {eps}")
    return t


def _clamp(clamp, x):
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise ValueError(f"clamp must be None or a pair (lo, hi), got {clamp!r}")
    lo, hi = _as_bound(clamp[0], x, "clamp[0] (lo)"), _as_bound(clamp[1], x, "clamp[1] (hi)")
    if (lo > hi).any():
        raise ValueError("clamp must have lo <= hi (per channel)")
    return lo, hi


def _project(x_adv, x, eps, bounds):
    x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    if bounds is not None:
        x_adv = torch.minimum(torch.maximum(x_adv, bounds[0]), bounds[1])
    return x_adv


def _input_grad(model, x_adv, y):
    x_adv = x_adv.detach().requires_grad_(True)
    # reduction="sum": each sample's gradient is its own loss's, whatever the batch size
    loss = F.cross_entropy(model(x_adv), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_adv)
    return grad


def _all_zero(eps: torch.Tensor) -> bool:
    return bool((eps == 0).all())


def fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps, clamp=None) -> torch.Tensor:
    """Fast gradient sign method: x + eps * sign(grad_x CE), projected onto ``clamp``.

    Returns a detached tensor with |x' - x| <= eps everywhere (when x itself lies in ``clamp``)
    and lo <= x' <= hi. eps = 0 returns a copy of x.
    """
    _check_inputs(model, x, y)
    eps_t = _eps(eps, x)
    bounds = _clamp(clamp, x)
    if _all_zero(eps_t):
        return x.detach().clone()
    with attack_mode(model), torch.enable_grad():
        grad = _input_grad(model, x, y)
    return _project(x.detach() + eps_t * grad.sign(), x.detach(), eps_t, bounds).detach()


def pgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps,
    step_size=None,
    steps: int = 10,
    random_start: bool = True,
    clamp=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent (L-inf, Madry et al.) maximising the cross-entropy.

    Args:
        eps: radius of the L-inf ball (number, per-channel sequence or broadcastable tensor).
        step_size: per-step change; default 2.5 * eps / steps.
        steps: number of gradient steps (>= 1).
        random_start: start from a uniform point in the eps-ball (projected into ``clamp``).
        clamp: None or (lo, hi), the valid input range (per-channel for normalised data).
        generator: torch.Generator for the random start (on x's device), for reproducibility.

    Returns a detached tensor within the eps-ball around x (when x lies in ``clamp``) and
    within ``clamp``. eps = 0 returns a copy of x.
    """
    _check_inputs(model, x, y)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    eps_t = _eps(eps, x)
    bounds = _clamp(clamp, x)
    step_t = eps_t * (2.5 / steps) if step_size is None else _as_bound(step_size, x, "step_size")
    if (step_t < 0).any():
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    if _all_zero(eps_t):
        return x.detach().clone()
    x0 = x.detach()
    if random_start:
        noise = torch.rand(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
        x_adv = _project(x0 + (2 * noise - 1) * eps_t, x0, eps_t, bounds)
    else:
        x_adv = x0.clone()
    with attack_mode(model), torch.enable_grad():
        for _ in range(steps):
            grad = _input_grad(model, x_adv, y)
            x_adv = _project(x_adv + step_t * grad.sign(), x0, eps_t, bounds)
    return x_adv.detach()
