"""Argument checks of the Python API and the fake kernels.

They mirror csrc/include/kdfast/checks.h so that errors read the same whether they come from the
Python wrapper, a fake (meta) kernel under torch.compile, or the C++ op: ValueError for shapes and
values, TypeError for dtypes, each naming the argument.
"""
from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _float_tensor(name: str, x, ndim: int, what: str) -> None:
    """x is a floating-point torch.Tensor with ``ndim`` dims; ``what`` names the expected layout."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {what}, got {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")


def feature_map(name: str, x) -> None:
    _float_tensor(name, x, 4, "a 4-D feature map (B, C, H, W)")
    b, c, h, w = x.shape
    if b == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)}); expected B >= 1")
    if c == 0:
        raise ValueError(f"{name} has no channels (shape {tuple(x.shape)}); expected C >= 1")
    if h == 0 or w == 0:
        raise ValueError(f"{name} has an empty spatial size (shape {tuple(x.shape)}); expected H >= 1 and W >= 1")


def compatible(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    """``b`` must agree with ``a`` in batch size, dtype and device."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch size mismatch: {a_name} has B = {a.shape[0]} but {b_name} has B = {b.shape[0]}")
    if a.dtype != b.dtype:
        raise TypeError(f"dtype mismatch: {a_name} is {a.dtype} but {b_name} is {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"device mismatch: {a_name} is on {a.device} but {b_name} is on {b.device}")


def same_spatial(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[2:] != b.shape[2:]:
        raise ValueError(
            f"spatial size mismatch: {a_name} is {a.shape[2]}x{a.shape[3]} but {b_name} is {b.shape[2]}x{b.shape[3]}"
        )


def reduction(value) -> None:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")


def fsp_gram_shapes(s_a, s_b, t_a, t_b) -> None:
    if s_a.shape[1] != t_a.shape[1] or s_b.shape[1] != t_b.shape[1]:
        raise ValueError(
            f"FSP Gram shape mismatch: the student's is ({s_a.shape[1]}, {s_b.shape[1]}) from s_a and s_b, "
            f"the teacher's is ({t_a.shape[1]}, {t_b.shape[1]}) from t_a and t_b; they must be equal"
        )


def sigma(value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < float(value) < float("inf")):
        raise ValueError(f"sigma must be None or a positive finite number, got {value!r}")


def fsp_pair(a, b, a_name: str = "a", b_name: str = "b") -> None:
    """fsp_matrix's arguments (spatial sizes may differ: the Python API pools them)."""
    feature_map(a_name, a)
    feature_map(b_name, b)
    compatible(a_name, a, b_name, b)


def fsp_loss_args(s_a, s_b, t_a, t_b, reduction_value) -> None:
    """fsp_loss's arguments (spatial sizes within a pair may differ: the Python API pools them)."""
    for name, x in (("s_a", s_a), ("s_b", s_b), ("t_a", t_a), ("t_b", t_b)):
        feature_map(name, x)
    compatible("s_a", s_a, "s_b", s_b)
    compatible("s_a", s_a, "t_a", t_a)
    compatible("t_a", t_a, "t_b", t_b)
    fsp_gram_shapes(s_a, s_b, t_a, t_b)
    reduction(reduction_value)


def nst_maps(fs, ft) -> None:
    """nst_loss's feature maps (spatial sizes may differ: the Python API pools them)."""
    feature_map("fs", fs)
    feature_map("ft", ft)
    compatible("fs", fs, "ft", ft)


# ------------------------------------------------------------------------------- tucker_conv2d
def conv_pair(name: str, value, minimum: int) -> tuple:
    """stride / padding / dilation: an int or a pair of ints, each >= minimum -> (int, int)."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return (int(pair[0]), int(pair[1]))


def _tucker_factor(x, t, name: str, dim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D tensor {layout}, got {t.dim()}-D tensor of shape {tuple(t.shape)}")
    _same_dtype_device(x, t, name)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); expected every dimension >= 1")


def _same_dtype_device(x, t, name: str) -> None:
    if x.dtype != t.dtype:
        raise TypeError(f"dtype mismatch: x is {x.dtype} but {name} is {t.dtype}")
    if x.device != t.device:
        raise ValueError(f"device mismatch: x is on {x.device} but {name} is on {t.device}")


def tucker_conv2d_args(x, first, core, last, bias, stride, padding, dilation) -> None:
    """Mirrors kdfast::check_tucker_conv2d_args (csrc/include/kdfast/checks.h); stride, padding and
    dilation already normalised to pairs by conv_pair."""
    feature_map("x", x)
    _tucker_factor(x, first, "first", 2, "(R_in, C)")
    _tucker_factor(x, core, "core", 4, "(R_out, R_in, kh, kw)")
    _tucker_factor(x, last, "last", 2, "(O, R_out)")
    if first.shape[1] != x.shape[1]:
        raise ValueError(f"channel mismatch: x has C = {x.shape[1]} but first has C = {first.shape[1]} (first is (R_in, C))")
    if core.shape[1] != first.shape[0]:
        raise ValueError(
            f"rank mismatch: first has R_in = {first.shape[0]} but core has R_in = {core.shape[1]} "
            "(core is (R_out, R_in, kh, kw))"
        )
    if last.shape[1] != core.shape[0]:
        raise ValueError(
            f"rank mismatch: core has R_out = {core.shape[0]} but last has R_out = {last.shape[1]} (last is (O, R_out))"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be None or a torch.Tensor, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != last.shape[0]:
            raise ValueError(f"bias must be None or a 1-D tensor of shape (O,) = ({last.shape[0]},), got shape {tuple(bias.shape)}")
        _same_dtype_device(x, bias, "bias")
    for name, pair, minimum in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(pair) != 2:
            raise ValueError("stride, padding and dilation must each have 2 elements")
        if min(pair) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {list(pair)}")
    kh = dilation[0] * (core.shape[2] - 1) + 1
    kw = dilation[1] * (core.shape[3] - 1) + 1
    ph, pw = x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1]
    if kh > ph or kw > pw:
        raise ValueError(f"kernel too large: core's dilated kernel is {kh}x{kw} but x padded is only {ph}x{pw}")


def tucker_output_hw(x, core, stride, padding, dilation) -> list:
    """(H_out, W_out) of tucker_conv2d, as F.conv2d sizes it."""
    return [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(x.shape[2:], core.shape[2:], stride, padding, dilation)
    ]


def tucker_epilogue_args(x, core, last, scale, shift, residual, stride, padding, dilation) -> None:
    """Mirrors kdfast::tucker::check_tucker_epilogue_args (csrc/ops/tucker_conv2d_common.h)."""
    o = last.shape[0]
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be None or a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != o:
            raise ValueError(f"{name} must be None or a 1-D tensor of shape (O,) = ({o},), got shape {tuple(t.shape)}")
        _same_dtype_device(x, t, name)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be None or a torch.Tensor, got {type(residual).__name__}")
        expected = (x.shape[0], o, *tucker_output_hw(x, core, stride, padding, dilation))
        if tuple(residual.shape) != expected:
            raise ValueError(
                f"residual must be None or a tensor of the output's shape (N, O, H_out, W_out) = {expected}, "
                f"got shape {tuple(residual.shape)}"
            )
        _same_dtype_device(x, residual, "residual")


# ----------------------------------------------------------------------------------------- KD loss
def logits(name: str, x) -> None:
    _float_tensor(name, x, 2, "2-D logits (B, K)")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)}); expected B >= 1")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no classes (shape {tuple(x.shape)}); expected K >= 1")


def kd_loss_args(student_logits, teacher_logits, targets, temperature, alpha, ignore_index, reduction_value) -> None:
    """kd_loss's arguments. The targets' value range is checked by the C++ op (it needs the data)."""
    logits("student_logits", student_logits)
    logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"shape mismatch: student_logits is {list(student_logits.shape)} but teacher_logits is "
            f"{list(teacher_logits.shape)}; expected the same (B, K)"
        )
    compatible("student_logits", student_logits, "teacher_logits", teacher_logits)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    reduction(reduction_value)
    if targets is None:
        if float(alpha) != 1.0:
            raise ValueError(
                f"targets are required when alpha < 1 (the CE term has weight 1 - alpha = {1.0 - float(alpha):g}); "
                "pass targets or alpha=1"
            )
        return
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of int64 class indices or None, got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64 class indices, got {targets.dtype}")
    batch = student_logits.shape[0]
    if targets.dim() != 1 or targets.shape[0] != batch:
        raise ValueError(
            f"targets must have shape ({batch},) (one class index per row of student_logits), got {list(targets.shape)}"
        )
    if targets.device != student_logits.device:
        raise ValueError(f"device mismatch: student_logits is on {student_logits.device} but targets is on {targets.device}")


# ------------------------------------------------------------------ KR: sparse recoding
def sparse_recoding_hyperparameters(boost, damp, shrink, tau_rate) -> None:
    def number(name, v):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"{name} must be a number, got {type(v).__name__}")
        return float(v)

    boost, damp, shrink, tau_rate = (number(n, v) for n, v in
                                     (("boost", boost), ("damp", damp), ("shrink", shrink), ("tau_rate", tau_rate)))
    if not (boost >= 1.0 and boost < float("inf")):
        raise ValueError(f"boost must be a finite number >= 1, got {boost!r}")
    if not (0.0 <= damp < 1.0):
        raise ValueError(f"damp must be in [0, 1), got {damp!r}")
    if not (shrink >= 0.0 and shrink < float("inf")):
        raise ValueError(f"shrink must be a finite number >= 0, got {shrink!r}")
    if not (0.0 <= tau_rate <= 1.0):
        raise ValueError(f"tau_rate must be in [0, 1], got {tau_rate!r}")


def sparse_recoding_args(grads, params, taus, boost, damp, shrink, tau_rate) -> None:
    """Mirrors csrc/ops/sparse_recoding_impl.h: check_args (same messages)."""
    n = len(grads)
    if n == 0:
        raise ValueError("grads must contain at least one tensor, got an empty list")
    if len(params) != n:
        raise ValueError(f"params must have one tensor per grad: got {n} grads and {len(params)} params")
    first = grads[0]
    for i, (g, p) in enumerate(zip(grads, params)):
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"grads[{i}] must be a torch.Tensor, got {type(g).__name__}")
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if g.dtype not in FLOAT_DTYPES:
            raise TypeError(f"grads[{i}] must be float32, float64, float16 or bfloat16, got {g.dtype}")
        if p.dtype != g.dtype:
            raise TypeError(f"dtype mismatch: grads[{i}] is {g.dtype} but params[{i}] is {p.dtype}")
        if g.dtype != first.dtype:
            raise TypeError(
                f"all tensors must share one dtype: grads[0] is {first.dtype} but grads[{i}] is {g.dtype} "
                "(kdfast.methods.kr.SparseRecoding groups tensors by device and dtype)"
            )
        if g.device != first.device:
            raise ValueError(f"device mismatch: grads[0] is on {first.device} but grads[{i}] is on {g.device}")
        if p.device != g.device:
            raise ValueError(f"device mismatch: grads[{i}] is on {g.device} but params[{i}] is on {p.device}")
        if g.shape != p.shape:
            raise ValueError(f"shape mismatch: grads[{i}] has shape {tuple(g.shape)} but params[{i}] has shape {tuple(p.shape)}")
        if not _is_dense(g):
            raise ValueError(
                f"grads[{i}] must be dense (contiguous, or a permutation of it such as channels_last), got strides {g.stride()}"
            )
        if g.stride() != p.stride():
            raise ValueError(
                f"layout mismatch: grads[{i}] has strides {g.stride()} but params[{i}] has strides {p.stride()}; they must be equal"
            )
    if not isinstance(taus, torch.Tensor):
        raise TypeError(f"taus must be a torch.Tensor, got {type(taus).__name__}")
    if taus.dtype != torch.float32:
        raise TypeError(f"taus must be float32, got {taus.dtype}")
    if taus.dim() != 1 or taus.shape[0] != n:
        raise ValueError(f"taus must have shape ({n},), one threshold per tensor, got shape {tuple(taus.shape)}")
    if not taus.is_contiguous():
        raise ValueError("taus must be contiguous")
    if taus.device != first.device:
        raise ValueError(f"device mismatch: grads[0] is on {first.device} but taus is on {taus.device}")
    sparse_recoding_hyperparameters(boost, damp, shrink, tau_rate)


def _is_dense(t: torch.Tensor) -> bool:
    """torch's is_non_overlapping_and_dense: the strides are a permutation of a contiguous layout's."""
    dims = sorted((s, d) for d, s in zip(t.shape, t.stride()) if d != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


# ------------------------------------------------------------------ SRM: sparse codes
def sparse_codes_args(x, dictionary, bias, k) -> None:
    """Mirrors csrc/ops/sparse_codes_impl.h:check_args (same messages)."""
    feature_map("x", x)
    if not isinstance(dictionary, torch.Tensor):
        raise TypeError(f"dictionary must be a torch.Tensor, got {type(dictionary).__name__}")
    if dictionary.dim() != 2:
        raise ValueError(f"dictionary must be a 2-D tensor (D, K), got {dictionary.dim()}-D tensor of shape "
                         f"{tuple(dictionary.shape)}")
    _same_dtype_device(x, dictionary, "dictionary")
    if dictionary.shape[0] != x.shape[1]:
        raise ValueError(f"channel mismatch: x has D = {x.shape[1]} channels but dictionary has D = "
                         f"{dictionary.shape[0]} rows (dictionary is (D, K))")
    if dictionary.shape[1] < 1:
        raise ValueError(f"dictionary has no codewords (shape {tuple(dictionary.shape)}); expected K >= 1")
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor, got {type(bias).__name__}")
    if bias.numel() != 1:
        raise ValueError(f"bias must be a 1-element tensor (the scalar intercept), got shape {tuple(bias.shape)}")
    _same_dtype_device(x, bias, "bias")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= dictionary.shape[1]:
        raise ValueError(f"k must be in 1..K = 1..{dictionary.shape[1]}, got {k}")


def image_input_shape(name: str, value) -> tuple:
    """The one ``input_shape`` convention of the API (kdfast.cost, kdfast.decompose): ``(C, H, W)`` of one
    image or ``(N, C, H, W)`` of a batch, positive ints; returns the batch shape ``(N, C, H, W)`` (N = 1
    for an image)."""
    if (not isinstance(value, (tuple, list, torch.Size)) or len(value) not in (3, 4)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"{name} must be (C, H, W) of one image or (N, C, H, W) of a batch, with positive ints, "
                         f"got {value!r}")
    return tuple(value) if len(value) == 4 else (1, *value)
