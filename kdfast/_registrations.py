"""Fake (meta) kernels of the compiled ops, registered with torch.library: what torch.compile and
opcheck use to know output shapes, dtypes and strides without running a kernel.

Imported only when kdfast._C loaded (the ops must exist to be registered). Autograd is C++
(csrc/ops/autograd/<op>_autograd.cpp, see autograd_common.h there for why): the backward nodes call
the ``_*_backward`` ops, which have fake kernels here too, so torch.compile traces them as opaque ops.
"""
from __future__ import annotations

import torch

from . import _checks

_NST_INTERNAL_KERNELS = ("linear", "poly_channel", "poly_spatial", "gaussian")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_or_empty(needed: bool, like: torch.Tensor) -> torch.Tensor:
    # Mirrors the C++ kernels: a gradient that is not needed comes back as an empty (0,) tensor.
    return like.new_empty(like.shape) if needed else like.new_empty((0,))


def _loss_shape(batch, reduction):
    return (batch,) if reduction == "none" else ()


# ----------------------------------------------------------------------------------------- FSP
@torch.library.register_fake("kdfast::fsp_matrix")
def _fsp_matrix_fake(a, b):
    _checks.fsp_pair(a, b)
    _checks.same_spatial("a", a, "b", b)
    return a.new_empty((a.shape[0], a.shape[1], b.shape[1]))


@torch.library.register_fake("kdfast::_fsp_matrix_backward")
def _fsp_matrix_backward_fake(grad, a, b, output_mask):
    return _grad_or_empty(output_mask[0], a), _grad_or_empty(output_mask[1], b)


@torch.library.register_fake("kdfast::fsp_loss")
def _fsp_loss_fake(s_a, s_b, t_a, t_b, reduction):
    _checks.fsp_loss_args(s_a, s_b, t_a, t_b, reduction)
    _checks.same_spatial("s_a", s_a, "s_b", s_b)
    _checks.same_spatial("t_a", t_a, "t_b", t_b)
    batch = s_a.shape[0]
    loss = s_a.new_empty(_loss_shape(batch, reduction))
    diff = s_a.new_empty((batch, s_a.shape[1], s_b.shape[1]), dtype=_acc_dtype(s_a.dtype))
    return loss, diff


@torch.library.register_fake("kdfast::_fsp_loss_backward")
def _fsp_loss_backward_fake(grad_loss, diff, s_a, s_b, t_a, t_b, reduction, output_mask):
    return tuple(_grad_or_empty(m, x) for m, x in zip(output_mask, (s_a, s_b, t_a, t_b)))


# ----------------------------------------------------------------------------------------- NST
def _nst_aux_shape(kernel, batch, cs, ct, hw):
    if kernel == "linear":
        return (batch, hw)
    if kernel == "poly_channel":  # Grams K_ss, K_st, K_tt and the row norms (csrc/ops/nst_impl.h)
        return (batch * (cs * cs + cs * ct + ct * ct) + batch * (cs + ct),)
    if kernel == "poly_spatial":
        return (batch, hw, hw)
    return (0,)


@torch.library.register_fake("kdfast::nst_loss")
def _nst_loss_fake(fs, ft, kernel, reduction, sigma):
    _checks.nst_maps(fs, ft)
    _checks.same_spatial("fs", fs, "ft", ft)
    if kernel not in _NST_INTERNAL_KERNELS:
        raise ValueError(f"kernel must be one of {_NST_INTERNAL_KERNELS}, got {kernel!r}")
    _checks.reduction(reduction)
    _checks.sigma(sigma)
    batch, cs, h, w = fs.shape
    loss = fs.new_empty(_loss_shape(batch, reduction))
    aux = fs.new_empty(_nst_aux_shape(kernel, batch, cs, ft.shape[1], h * w), dtype=_acc_dtype(fs.dtype))
    return loss, aux


@torch.library.register_fake("kdfast::_nst_loss_backward")
def _nst_loss_backward_fake(grad_loss, fs, ft, aux, kernel, reduction, sigma, output_mask):
    return _grad_or_empty(output_mask[0], fs), _grad_or_empty(output_mask[1], ft)


# ------------------------------------------------------------------------------- tucker_conv2d
@torch.library.register_fake("kdfast::tucker_conv2d")
def _tucker_conv2d_fake(x, first, core, last, bias, stride, padding, dilation, scale=None, shift=None, residual=None,
                        relu=False):
    _checks.tucker_conv2d_args(x, first, core, last, bias, stride, padding, dilation)
    _checks.tucker_epilogue_args(x, core, last, scale, shift, residual, stride, padding, dilation)
    return x.new_empty((x.shape[0], last.shape[0], *_checks.tucker_output_hw(x, core, stride, padding, dilation)))


@torch.library.register_fake("kdfast::_tucker_conv2d_backward")
def _tucker_conv2d_backward_fake(grad_y, x, first, core, last, stride, padding, dilation, output_mask):
    grads = tuple(_grad_or_empty(m, t) for m, t in zip(output_mask[:4], (x, first, core, last)))
    bias_grad = last.new_empty((last.shape[0],) if output_mask[4] else (0,))
    return grads + (bias_grad,)


@torch.library.register_fake("kdfast::_tucker_conv2d_with_intermediates")
def _tucker_conv2d_with_intermediates_fake(x, first, core, last, bias, stride, padding, dilation):
    y = _tucker_conv2d_fake(x, first, core, last, bias, stride, padding, dilation)
    z1 = x.new_empty((x.shape[0], first.shape[0], x.shape[2], x.shape[3]))
    z2 = x.new_empty((x.shape[0], core.shape[0], y.shape[2], y.shape[3]))
    return y, z1, z2


@torch.library.register_fake("kdfast::_tucker_conv2d_backward_saved")
def _tucker_conv2d_backward_saved_fake(grad_y, x, first, core, last, z1, z2, stride, padding, dilation, output_mask):
    return _tucker_conv2d_backward_fake(grad_y, x, first, core, last, stride, padding, dilation, output_mask)


# ----------------------------------------------------------------------- KR: sparse recoding
# A mutating op without outputs and without autograd (it edits .grad tensors, which do not require
# grad); the fake kernel only checks the arguments.
@torch.library.register_fake("kdfast::sparse_recoding_")
def _sparse_recoding_fake(grads, params, taus, boost, damp, shrink, tau_rate):
    _checks.sparse_recoding_args(grads, params, taus, boost, damp, shrink, tau_rate)
    return None


# ----------------------------------------------------------------------------------------- KD loss
KD_NUM_STATS = 5  # columns of kd_loss's per-row statistics (csrc/include/kdfast/kd_loss_math.h)


@torch.library.register_fake("kdfast::kd_loss")
def _kd_loss_fake(student_logits, teacher_logits, targets, temperature, alpha, t2_scale, ignore_index, reduction):
    _checks.kd_loss_args(student_logits, teacher_logits, targets, temperature, alpha, ignore_index, reduction)
    batch = student_logits.shape[0]
    loss = student_logits.new_empty(_loss_shape(batch, reduction))
    stats = student_logits.new_empty((batch, KD_NUM_STATS), dtype=_acc_dtype(student_logits.dtype))
    return loss, stats


@torch.library.register_fake("kdfast::_kd_loss_backward")
def _kd_loss_backward_fake(grad_loss, student_logits, teacher_logits, targets, stats, temperature, alpha, t2_scale,
                           ignore_index, reduction, output_mask):
    # Gradients come back contiguous (B, K), whatever the logits' strides.
    return _grad_or_empty(output_mask[0], student_logits), _grad_or_empty(output_mask[1], teacher_logits)


# ------------------------------------------------------------------------------- SRM: sparse codes
@torch.library.register_fake("kdfast::sparse_codes")
def _sparse_codes_fake(x, dictionary, bias, k):
    _checks.sparse_codes_args(x, dictionary, bias, k)
    shape = (x.shape[0], x.shape[2], x.shape[3], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake("kdfast::_sparse_codes_backward")
def _sparse_codes_backward_fake(grad_values, x, dictionary, bias, indices, output_mask):
    # grad_x has x's memory layout (empty_like), the others come back contiguous.
    grad_x = torch.empty_like(x) if output_mask[0] else x.new_empty((0,))
    return grad_x, _grad_or_empty(output_mask[1], dictionary), _grad_or_empty(output_mask[2], bias)
