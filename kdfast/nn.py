"""Layers: :class:`TuckerConv2d`, a Tucker-2 decomposed 2-D convolution.

Tucker-2 (Kim et al., "Compression of Deep Convolutional Neural Networks for Fast and Low Power
Mobile Applications", ICLR 2016) factors a conv kernel W (O, C, kh, kw) along its output and input
modes: W = core x_0 last x_1 first^T, i.e. W[o, c] = sum_{a, b} last[o, a] core[a, b] first[b, c], with
first (R_in, C), core (R_out, R_in, kh, kw), last (O, R_out). Applying it is a 1x1 conv C -> R_in, the
k x k core conv R_in -> R_out (stride, padding, dilation), and a 1x1 conv R_out -> O plus bias; kdfast
runs the three as one op, :func:`kdfast.ops.tucker_conv2d`.

    layer = TuckerConv2d.from_conv(conv, ranks="evbmf")   # or (r_out, r_in), or 0.5
    dense = layer.to_conv()                                 # the nn.Conv2d it equals
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from . import _checks, _ext, ops

_RANK_OPTIONS = ("weaken", "min_rank", "align")


def _positive_int(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_explicit_ranks(ranks, out_channels: int, in_channels: int) -> tuple[int, int]:
    if (
        not isinstance(ranks, (tuple, list))
        or len(ranks) != 2
        or not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in ranks)
    ):
        raise TypeError(f"ranks must be a pair of ints (r_out, r_in), got {ranks!r}")
    r_out, r_in = int(ranks[0]), int(ranks[1])
    if not 1 <= r_out <= out_channels:
        raise ValueError(f"ranks[0] (r_out) must be in [1, out_channels={out_channels}], got {r_out}")
    if not 1 <= r_in <= in_channels:
        raise ValueError(f"ranks[1] (r_in) must be in [1, in_channels={in_channels}], got {r_in}")
    return r_out, r_in


def resolve_ranks(weight: torch.Tensor, ranks, **rank_options) -> tuple[int, int]:
    """Turn a ranks specification into (r_out, r_in) for a conv weight (O, C, kh, kw).

    ranks: a pair of ints (r_out, r_in), each in [1, full]; a float f in (0, 1]: ceil(f * full) of
    each mode (f = 1.0 keeps full rank); or "evbmf": :func:`kdfast.evbmf.tucker2_ranks` with the
    rank_options weaken (default 0), min_rank (default 1) and align (default "auto"). rank_options are
    only accepted with "evbmf".
    """
    out_channels, in_channels = int(weight.shape[0]), int(weight.shape[1])
    unknown = set(rank_options) - set(_RANK_OPTIONS)
    if unknown:
        raise TypeError(f"unknown rank options {sorted(unknown)}; accepted: {list(_RANK_OPTIONS)} (with ranks='evbmf')")
    if isinstance(ranks, str):
        if ranks != "evbmf":
            raise ValueError(f"ranks must be a pair of ints, a float in (0, 1] or 'evbmf', got {ranks!r}")
        from .evbmf import tucker2_ranks  # scipy is imported only when EVBMF is used

        return tucker2_ranks(weight, **rank_options)
    if rank_options:
        raise ValueError(f"{sorted(rank_options)} only apply to ranks='evbmf', got ranks={ranks!r}")
    if isinstance(ranks, float):
        if not 0.0 < ranks <= 1.0:
            raise ValueError(f"ranks as a float is the kept fraction of each full rank and must be in (0, 1], got {ranks!r}")
        # 1e-9: 0.5 * 6 must give 3, not 4 from rounding noise
        return (max(1, math.ceil(ranks * out_channels - 1e-9)), max(1, math.ceil(ranks * in_channels - 1e-9)))
    if isinstance(ranks, (tuple, list)):
        return _check_explicit_ranks(ranks, out_channels, in_channels)
    raise TypeError(
        f"ranks must be a pair of ints (r_out, r_in), a float in (0, 1] or 'evbmf', got {type(ranks).__name__} {ranks!r}"
    )


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """conv.padding as a symmetric pair; 'valid' is 0 and 'same' is half the dilated kernel extent."""
    if not isinstance(conv.padding, str):
        return _checks.conv_pair("padding", conv.padding, 0)
    if conv.padding == "valid":
        return 0, 0
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(
                f"conv has padding='same' with an even dilated kernel extent (kernel_size={conv.kernel_size}, "
                f"dilation={conv.dilation}), which needs asymmetric padding; TuckerConv2d supports symmetric padding only"
            )
        pads.append(total // 2)
    return pads[0], pads[1]


class TuckerConv2d(nn.Module):
    """Tucker-2 decomposed Conv2d: 1x1 C -> R_in, k x k R_in -> R_out, 1x1 R_out -> O (+ bias).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as nn.Conv2d
            (zero padding, groups = 1; padding is an int or pair).
        ranks: (r_out, r_in), with 1 <= r_out <= out_channels and 1 <= r_in <= in_channels.

    Parameters: ``first`` (R_in, C), ``core`` (R_out, R_in, kh, kw), ``last`` (O, R_out), ``bias``
    (O,) or None. Constructed directly, first and last are random semi-orthogonal and core and bias
    are initialised like nn.Conv2d's weight and bias; :meth:`from_conv` is the usual way to build one.

    Autocast: like nn.Conv2d, the layer runs in the autocast dtype (e.g. bfloat16 under CPU autocast,
    float16 under CUDA autocast): input and parameters are cast to it and the output has it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        ranks,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.kernel_size = _checks.conv_pair("kernel_size", kernel_size, 1)
        self.stride = _checks.conv_pair("stride", stride, 1)
        self.padding = _checks.conv_pair("padding", padding, 0)
        self.dilation = _checks.conv_pair("dilation", dilation, 1)
        self.ranks = _check_explicit_ranks(ranks, self.out_channels, self.in_channels)
        r_out, r_in = self.ranks
        factory = {"device": device, "dtype": dtype}
        self.first = nn.Parameter(torch.empty(r_in, self.in_channels, **factory))
        self.core = nn.Parameter(torch.empty(r_out, r_in, *self.kernel_size, **factory))
        self.last = nn.Parameter(torch.empty(self.out_channels, r_out, **factory))
        self.bias = nn.Parameter(torch.empty(self.out_channels, **factory)) if bias else None
        # Training keeps the two intermediates for the backward (None = when a gradient is needed),
        # as three nn.Conv2d would; set False for the memory-lean mode (see kdfast.ops.tucker_conv2d).
        self.save_intermediates = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.first)
        nn.init.orthogonal_(self.last)
        nn.init.kaiming_uniform_(self.core, a=math.sqrt(5))  # nn.Conv2d's default weight init
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, core, last, bias = self.first, self.core, self.last, self.bias
        # The custom op has no autocast rule (it falls through autocast with mixed dtypes), so cast
        # here the way autocast casts nn.Conv2d: everything to the autocast dtype.
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, first, core, last = x.to(dtype), first.to(dtype), core.to(dtype), last.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        _ext.require_ops()
        return ops._tucker_conv2d_call(x, first, core, last, bias, self.stride, self.padding, self.dilation,
                                       self.save_intermediates)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense kernel (O, C, kh, kw) = core x_0 last x_1 first^T."""
        return torch.einsum("oa,abhw,bc->ochw", self.last, self.core, self.first)

    def to_conv(self) -> nn.Conv2d:
        """The dense nn.Conv2d computing the same function (same device and dtype)."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, bias=self.bias is not None, device=self.core.device, dtype=self.core.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks="evbmf", n_iter_max: int = 0, **rank_options) -> "TuckerConv2d":
        """Decompose a trained nn.Conv2d.

        ranks: (r_out, r_in); a float f in (0, 1] (ceil(f * full) per mode); or "evbmf" (Kim et al.
        2016) with rank_options weaken / min_rank / align (see :func:`kdfast.evbmf.tucker2_ranks`).
        n_iter_max: 0 = truncated HOSVD (factors = leading left singular vectors of the output- and
        input-mode unfoldings, core = projection of W on them); > 0 refines by that many HOOI
        iterations. Computed with tensorly's ``partial_tucker`` in float64 on the CPU, then cast to
        the conv's dtype and device. At full rank the layer equals the conv up to rounding.
        Bias, stride, padding (int, pair, 'valid' or odd-extent 'same') and dilation are kept.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"conv has groups={conv.groups}; Tucker-2 decomposition supports groups=1 only")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv has padding_mode={conv.padding_mode!r}; TuckerConv2d supports 'zeros' only")
        if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, numbers.Integral) or n_iter_max < 0:
            raise ValueError(f"n_iter_max must be an int >= 0 (0 = plain HOSVD), got {n_iter_max!r}")
        weight = conv.weight.detach()
        r_out, r_in = resolve_ranks(weight, ranks, **rank_options)
        core, last, first = _partial_tucker2(weight, r_out, r_in, int(n_iter_max))
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, (r_out, r_in), stride=conv.stride,
            padding=_conv_padding(conv), dilation=conv.dilation, bias=conv.bias is not None,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.first.copy_(first.T)
            layer.core.copy_(core)
            layer.last.copy_(last)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
        layer.train(conv.training)
        return layer

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, ranks={self.ranks}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        return s


class FusedTuckerConv2d(TuckerConv2d):
    """A :class:`TuckerConv2d` followed, in the same kernel, by an optional residual add and ReLU:
    ``y = relu?(tucker(x) + residual)``, what :func:`kdfast.fuse_for_inference` puts in place of a
    ResNet block's "Tucker conv -> BN (folded into ``last`` and ``bias``) -> (+ shortcut) -> ReLU".

    ``forward(x, residual=None)``: ``residual`` is required when ``add_residual`` is True. A residual
    that only broadcasts to y's shape is added after the kernel (same result, not fused).
    """

    def __init__(self, *args, relu: bool = False, add_residual: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.relu = bool(relu)
        self.add_residual = bool(add_residual)

    @classmethod
    def from_tucker(cls, layer: TuckerConv2d, relu: bool = False, add_residual: bool = False) -> "FusedTuckerConv2d":
        """The fused layer sharing ``layer``'s parameters (no copy)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for key in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "ranks",
                    "save_intermediates"):
            setattr(fused, key, getattr(layer, key))
        fused.first, fused.core, fused.last, fused.bias = layer.first, layer.core, layer.last, layer.bias
        fused.relu, fused.add_residual = bool(relu), bool(add_residual)
        fused.train(layer.training)
        return fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.add_residual and residual is None:
            raise ValueError("this FusedTuckerConv2d adds a residual: call it as layer(x, residual)")
        if not self.add_residual and residual is not None:
            raise ValueError("this FusedTuckerConv2d has add_residual=False but was given a residual")
        first, core, last, bias = self.first, self.core, self.last, self.bias
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, first, core, last = x.to(dtype), first.to(dtype), core.to(dtype), last.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            residual = None if residual is None else residual.to(dtype)
        _ext.require_ops()
        fused_residual = residual
        if residual is not None:
            expected = (x.shape[0], self.out_channels,
                        *_checks.tucker_output_hw(x, core, self.stride, self.padding, self.dilation))
            if tuple(residual.shape) != expected or residual.dtype != x.dtype or residual.device != x.device:
                fused_residual = None
        y = ops._tucker_conv2d_call(x, first, core, last, bias, self.stride, self.padding, self.dilation,
                                    self.save_intermediates, residual=fused_residual,
                                    relu=self.relu and (residual is None or fused_residual is not None))
        if residual is not None and fused_residual is None:  # broadcasting residual: outside the kernel
            y = y + residual
            if self.relu:
                y = torch.relu(y)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", add_residual={self.add_residual}, relu={self.relu}"


def _partial_tucker2(weight: torch.Tensor, r_out: int, r_in: int, n_iter_max: int):
    """(core, U_out, U_in) of W along modes 0 and 1 via tensorly >= 0.8 ``partial_tucker``."""
    import warnings

    import tensorly as tl  # imported on first use: `import kdfast.nn` stays cheap
    from tensorly.decomposition import partial_tucker

    w64 = weight.detach().to(device="cpu", dtype=torch.float64).numpy()
    # numpy backend in a context: independent of whatever global backend another library (tltorch) set
    from .evbmf import single_threaded_blas

    with tl.backend_context("numpy"), warnings.catch_warnings(), single_threaded_blas():
        # a rank above the unfolding's short side (e.g. 1x1 conv, O > C) is expected: tensorly pads the
        # factor with orthonormal columns, and the reconstruction stays exact
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        (core, (u_out, u_in)), _ = partial_tucker(w64, rank=[r_out, r_in], modes=[0, 1], n_iter_max=n_iter_max, init="svd")
    to = {"device": weight.device, "dtype": weight.dtype}
    return torch.as_tensor(core).to(**to), torch.as_tensor(u_out).to(**to), torch.as_tensor(u_in).to(**to)


__all__ = ["FusedTuckerConv2d", "TuckerConv2d", "resolve_ranks"]
