"""Public functional API over the compiled ops (``torch.ops.kdfast.*``).

Each wrapper validates its arguments (errors name the argument), pools mismatched spatial sizes
(the larger map is adaptive-average-pooled to the smaller, as RepDistiller does), then calls the op.
Autograd is C++ (csrc/ops/autograd); fake (meta) kernels for torch.compile are in kdfast/_registrations.py.

On CUDA every op runs, by default, its ATen path (the same C++ driver over cuBLAS / cuDNN / ATen
calls that the CPU suite checks); an op's hand-written CUDA kernel runs only where it is verified on a
GPU (csrc/ops/kernel_paths.cpp) or KDFAST_CUDA_KERNELS=all|<op,op> asks for it. `python -m kdfast
info` shows which path each op takes.
"""
from __future__ import annotations

import torch

from . import _checks, _ext
from ._spatial import pool_to_common

__all__ = ["fsp_matrix", "fsp_loss", "nst_loss", "nst_poly_form", "kd_loss", "sparse_recoding_"]

NST_KERNELS = ("linear", "poly", "gaussian")


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """FSP matrix of Yim et al. (CVPR 2017): ``G[n, i, j] = sum_s a[n, i, s] * b[n, j, s] / (H * W)``.

    a: (B, Ca, H, W), b: (B, Cb, H', W') -> (B, Ca, Cb). Differentiable in both inputs.
    """
    _ext.require_ops()
    _checks.fsp_pair(a, b)
    a, b = pool_to_common(a, b)
    return torch.ops.kdfast.fsp_matrix(a, b)


def fsp_loss(s_a, s_b, t_a, t_b, reduction: str = "mean") -> torch.Tensor:
    """FSP loss: per sample ``||G(s_a, s_b) - G(t_a, t_b)||_F^2`` (the paper's squared Frobenius
    distance with lambda = 1), reduced by ``reduction`` in {"mean" (over the batch), "sum", "none" -> (B,)}.

    Student Grams (from s_a, s_b) and teacher Grams (from t_a, t_b) must have equal shape; the two
    maps of a pair may differ in spatial size (pooled), student and teacher may differ too (each Gram
    is normalised by its own H*W). One fused op: it keeps only G_s - G_t, never both Grams.
    Note RepDistiller/AberHu average over B*Ca*Cb instead (a factor Ca*Cb smaller); divide by that to match.
    """
    _ext.require_ops()
    _checks.fsp_loss_args(s_a, s_b, t_a, t_b, reduction)
    s_a, s_b = pool_to_common(s_a, s_b)
    t_a, t_b = pool_to_common(t_a, t_b)
    return torch.ops.kdfast.fsp_loss(s_a, s_b, t_a, t_b, reduction)[0]


def nst_poly_form(cs: int, ct: int, hw: int) -> str:
    """Which Gram the poly kernel goes through: "poly_channel" (C x C Grams, ~(Cs^2+CsCt+Ct^2)*HW
    forward and (Cs+Ct)^2*HW backward) or "poly_spatial" (HW x HW Gram, ~(Cs+Ct)*HW^2 each way)."""
    channel_cost = (cs * cs + cs * ct + ct * ct + (cs + ct) ** 2) * hw
    spatial_cost = 2 * (cs + ct) * hw * hw
    return "poly_channel" if channel_cost <= spatial_cost else "poly_spatial"


def nst_loss(fs, ft, kernel: str = "poly", reduction: str = "mean", sigma: float | None = None) -> torch.Tensor:
    """Neuron Selectivity Transfer loss (Huang & Wang 2017): MMD^2 between the student's and the
    teacher's L2-normalised channel activation patterns, per sample, then reduced.

    ``MMD^2 = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') - 2 mean_{i,j} k(s_i, t_j)`` with
    kernel "linear" (x.y), "poly" ((x.y)^2, d = 2, c = 0, the paper's and RepDistiller's choice;
    computed through whichever Gram is cheaper, see :func:`nst_poly_form`) or "gaussian"
    (exp(-|x-y|^2 / (2 sigma^2)); ``sigma=None`` means sigma^2 = 1). The teacher-teacher term is
    included, so identical maps give exactly 0. Channel counts may differ; spatial sizes are pooled
    to the smaller. Note the paper weights the loss by lambda/2 and the official code by lambda = 50.
    """
    _ext.require_ops()
    _checks.nst_maps(fs, ft)
    if kernel not in NST_KERNELS:
        raise ValueError(f"kernel must be one of {NST_KERNELS}, got {kernel!r}")
    _checks.reduction(reduction)
    if sigma is not None:
        _checks.sigma(sigma)
    fs, ft = pool_to_common(fs, ft)
    if kernel == "poly":
        kernel = nst_poly_form(fs.shape[1], ft.shape[1], fs.shape[2] * fs.shape[3])
    return torch.ops.kdfast.nst_loss(fs, ft, kernel, reduction, 1.0 if sigma is None else float(sigma))[0]


# ------------------------------------------------------------------------------- tucker_conv2d
__all__ += ["tucker_conv2d", "tucker_conv2d_path"]


def tucker_conv2d(x, first, core, last, bias=None, stride=1, padding=0, dilation=1,
                  save_intermediates: bool | None = None, *, scale=None, shift=None, residual=None,
                  relu: bool = False) -> torch.Tensor:
    """Tucker-2 convolution (Kim et al., ICLR 2016) as one op:
    ``y = conv1x1(last) o conv_kxk(core; stride, padding, dilation) o conv1x1(first) (x) + bias``.

    x (N, C, H, W); first (R_in, C); core (R_out, R_in, kh, kw); last (O, R_out); bias (O,) or None.
    stride / padding (zeros) / dilation: int or pair, applied by the core. Returns (N, O, H_out, W_out)
    exactly as ``F.conv2d`` sizes it. Equals :func:`kdfast.testing.reference.tucker_conv2d`.

    Optional epilogue (keyword-only), for inference: ``y = relu?((conv + bias) * scale + shift + residual)``
    with scale, shift (O,) (a folded BatchNorm), residual of y's shape (a ResNet shortcut) and relu a
    bool. On CPU the fused kernel applies it in the same pass as the convolution (y written once);
    elsewhere it runs as ATen ops after it. Everything is differentiable (training differentiates the
    epilogue through ATen ops and the convolution exactly as without it).

    CPU float32/float64 runs a fused tiled kernel (the R_in/R_out intermediates of a tile stay in
    cache) or the composition, whichever measured faster on this machine: the first inference call of a
    shape times both on its input and caches the choice (kdfast.backends.tucker, docs/tucker-path.md);
    with autotuning off, the measured table inside its envelope, else the composition; CUDA
    runs the composition (three cuDNN convolutions) unless its fused kernel is enabled (see the module
    docstring). :func:`tucker_conv2d_path` says which. Differentiable in x, first, core, last and bias.

    ``save_intermediates`` (training): ``True`` runs the composition and keeps its two intermediates
    (first x and core * first x) for the backward, as autograd through three ``nn.Conv2d`` does, so
    the backward recomputes nothing; ``False`` is the memory-lean mode: the path rule's kernel runs,
    nothing but the inputs is kept, and the backward recomputes the intermediates (about one more
    forward). ``None`` (default): ``True`` when a gradient will be needed, else the plain op.
    """
    _ext.require_ops()
    stride = _checks.conv_pair("stride", stride, 1)
    padding = _checks.conv_pair("padding", padding, 0)
    dilation = _checks.conv_pair("dilation", dilation, 1)
    _checks.tucker_conv2d_args(x, first, core, last, bias, stride, padding, dilation)
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    _checks.tucker_epilogue_args(x, core, last, scale, shift, residual, stride, padding, dilation)
    return _tucker_conv2d_call(x, first, core, last, bias, stride, padding, dilation, save_intermediates,
                               scale, shift, residual, relu)


def _tucker_conv2d_call(x, first, core, last, bias, stride, padding, dilation, save_intermediates,
                        scale=None, shift=None, residual=None, relu=False):
    """tucker_conv2d after its Python checks: stride, padding and dilation are pairs. TuckerConv2d
    calls this directly (its factors and geometry were checked when it was built; the C++ op checks x
    with the same messages), which saves it about 15 µs a call."""
    if save_intermediates is None:
        save_intermediates = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, first, core, last, bias, scale, shift, residual)
        )
    if save_intermediates:
        y = torch.ops.kdfast._tucker_conv2d_with_intermediates(
            x, first, core, last, bias, stride, padding, dilation
        )[0]
        # Training: the epilogue through ATen ops (autograd), the convolution's backward unchanged.
        if scale is not None:
            y = y * scale.view(1, -1, 1, 1)
        if shift is not None:
            y = y + shift.view(1, -1, 1, 1)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y
    return torch.ops.kdfast.tucker_conv2d(x, first, core, last, bias, stride, padding, dilation,
                                          scale, shift, residual, relu)


def tucker_conv2d_path(x, first, core, last, stride=1, padding=0, dilation=1, *, bias=None, scale=None,
                       shift=None, residual=None, relu: bool = False) -> str:
    """Which implementation :func:`tucker_conv2d` runs for these arguments on their device: "fused",
    "composed" (three ATen convolutions), or on CPU "autotune": autotuning is on and this key has not
    been measured yet, so the next call times both paths and caches the faster (docs/tucker-path.md;
    the cache key includes the epilogue, hence bias ... relu here, used for their presence only).
    Asks the compiled op. Set KDFAST_DEBUG=1 to have every call print its path on stderr."""
    _ext.require_ops()
    stride = _checks.conv_pair("stride", stride, 1)
    padding = _checks.conv_pair("padding", padding, 0)
    dilation = _checks.conv_pair("dilation", dilation, 1)
    _checks.tucker_conv2d_args(x, first, core, last, bias, stride, padding, dilation)
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    _checks.tucker_epilogue_args(x, core, last, scale, shift, residual, stride, padding, dilation)
    epilogue = sum(bit for bit, t in ((1, bias), (2, scale), (4, shift), (8, residual)) if t is not None)
    epilogue += 16 if relu else 0
    return torch.ops.kdfast._tucker_conv2d_path(x, first, core, last, stride, padding, dilation, epilogue)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    t2_scale: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Hinton KD loss (Hinton, Vinyals, Dean 2015) in one fused kernel per pass:

    ``(1 - alpha) * CE(targets, z_s) + alpha * c * KL(softmax(z_t / T) || softmax(z_s / T))``,
    ``c = T**2`` if ``t2_scale`` else 1.

    student_logits, teacher_logits: (B, K), same dtype and device; targets: int64 (B,) class
    indices, may be None only when alpha = 1. reduction "mean": KL averaged over all B rows
    ("batchmean"), CE averaged over the rows whose target != ignore_index (as F.cross_entropy; the
    CE term is 0 if every row is ignored, where F.cross_entropy gives nan); "sum": both summed;
    "none": per-row losses (B,) (CE 0 on ignored rows). ignore_index affects only the CE term:
    ignored (e.g. unlabelled) rows still get the teacher's soft targets.

    Conventions: RepDistiller's DistillKL / Hinton is ``alpha=1, t2_scale=True``; BSS and DAFL
    (no T^2) and Liger-Kernel's distillation losses are ``t2_scale=False``.
    Forward keeps only per-row statistics (B, 5), never the softmaxes; the gradient w.r.t. the
    teacher's logits is exact and computed only when they require grad.
    """
    _ext.require_ops()
    _checks.kd_loss_args(student_logits, teacher_logits, targets, temperature, alpha, ignore_index, reduction)
    return torch.ops.kdfast.kd_loss(
        student_logits, teacher_logits, targets, float(temperature), float(alpha), bool(t2_scale), int(ignore_index),
        reduction,
    )[0]


# ------------------------------------------------------------------ KR: sparse recoding
def sparse_recoding_(grads, params, taus: torch.Tensor, boost: float, damp: float, shrink: float,
                     tau_rate: float) -> None:
    """Sparse recoding of Knowledge Representing (Liu et al., CVPR-W 2019, arXiv 1911.05329), in
    place over a list of gradients, one multi-tensor op call.

    The paper's equations are not available; this is **kdfast's interpretation** of its text
    ("an equal reward within the learnable threshold, to slow down the update of inactive neurons;
    ... boosts the update to highlight the dominant neurons"). For each pair (g, theta) with
    threshold tau = taus[i]:

    * dominant entries, ``|theta| > tau``: ``g <- boost * g``  (boost >= 1)
    * inactive entries, ``|theta| <= tau``: ``g <- damp * g + shrink * sign(theta)``
      (damp in [0, 1), shrink >= 0: a pull of small weights towards 0, an L1 term on them only)

    then ``taus[i] <- tau + tau_rate * (mean |theta| - tau)`` (tau_rate in [0, 1]; 0 keeps it).

    grads, params: equal-length lists of dense tensors (contiguous or channels_last), one dtype
    (float32, float64, float16, bfloat16) and one device for the whole list; params[i] must have
    grads[i]'s shape, dtype and strides. float16/bfloat16 are computed in float32.
    taus: float32 (len(grads),) on the same device: the thresholds of this step on entry, the next
    ones on exit. Each theta and g is read once and g written once; |theta| is summed in the same pass.
    """
    _ext.require_ops()
    grads, params = list(grads), list(params)
    # Only what the op's schema cannot express is checked here: the C++ op runs the same per-tensor
    # checks as _checks.sparse_recoding_args (same messages and exception types), without a Python
    # loop over the list (hundreds of tensors for a ResNet-50).
    for name, items in (("grads", grads), ("params", params)):
        for i, t in enumerate(items):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(taus, torch.Tensor):
        raise TypeError(f"taus must be a torch.Tensor, got {type(taus).__name__}")
    _checks.sparse_recoding_hyperparameters(boost, damp, shrink, tau_rate)
    torch.ops.kdfast.sparse_recoding_(grads, params, taus, float(boost), float(damp), float(shrink), float(tau_rate))


# ------------------------------------------------------------------ SRM: sparse codes
__all__ += ["sparse_codes"]


def sparse_codes(x: torch.Tensor, dictionary: torch.Tensor, bias: torch.Tensor, k: int):
    """Sparse codes of SRM (Tran, Gabbouj, Iosifidis, "Knowledge Distillation By Sparse Representation
    Matching", arXiv 2103.17012; official code viebboy/SRM ``cifar100/code/Layers.py``).

    Per pixel of x (N, D, H, W): ``s = sigmoid(dictionary^T x + bias)`` over the K codewords of the
    dictionary (D, K) (``bias``: a 1-element tensor, the scalar intercept), and its k largest entries.
    Returns ``(values, indices)``, both (N, H, W, k): values in x's dtype, descending; indices int64
    codewords. Differentiable w.r.t. x, dictionary and bias through ``values`` (the selection is
    piecewise constant; ``indices`` is not differentiable). k must be in 1..K.

    Selection ranks the pre-activation ``dictionary^T x`` (same order as s in exact arithmetic; entries
    whose sigmoid saturates to the same float are still ranked), ties go to the lower codeword index,
    and exactly k entries are kept. (The official code masks ``s >= s_(k)``, which keeps every entry
    tied with the k-th: more than k when codes saturate to 1.0 in float32.)

    One fused pass per tile of pixels: the tile's projection (a BLAS GEMM into a cache-sized buffer),
    a running top-k and the sigmoid of the k winners. The dense (N, H, W, K) similarity never exists,
    in forward or backward (which recomputes the k winners' pre-activations from the saved indices).
    float16/bfloat16 accumulate in float32. CUDA runs an ATen formulation (chunked GEMM + stable sort)
    by default; its hand-written kernel is unverified (KDFAST_CUDA_KERNELS=sparse_codes opts in; see ``kdfast info``).
    """
    _ext.require_ops()
    _checks.sparse_codes_args(x, dictionary, bias, k)
    return torch.ops.kdfast.sparse_codes(x, dictionary, bias, int(k))
