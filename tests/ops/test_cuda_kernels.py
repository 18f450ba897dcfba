"""Every hand-written CUDA kernel, forced on (KDFAST_CUDA_KERNELS=all), against the ATen path
(KDFAST_CUDA_KERNELS=none, the CUDA default) and the float64 reference, on the inputs real models
reach first: Tucker tiles over 48 KB of shared memory and the smaller-tile fallbacks, channels_last and
strided maps, NST gaussian over several sample chunks and at small sigma, strided KD rows, a batch
over 65,535 (the grid-y limit), sparse codes (ragged pixel blocks, k up to 32), bitwise determinism
(CUBLAS_WORKSPACE_CONFIG fixed), a side stream, CUDA-graph capture.

Marked `cuda_kernels` (and `needs_cuda`): `make gpu-check` runs these with `-m cuda_kernels`; on a
machine without a GPU they skip. A table entry in csrc/ops/kernel_paths.cpp may be marked verified
only with a committed gpu-check whose run of these tests passed."""
import contextlib
import os

import pytest
import torch

from kdfast import ops
from kdfast.testing import reference

pytestmark = [pytest.mark.needs_cuda, pytest.mark.cuda_kernels]

# The bit-exact tests (determinism, side stream) include cuBLAS GEMMs: cuBLAS is reproducible across runs
# and streams only with a fixed workspace configuration, read when its handle is created (after this
# module is imported; make gpu-check also sets it for the process).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

DEV = "cuda"
LOW = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _no_tf32():
    # cuDNN convolutions default to TF32 for float32; the ATen path is compared in true float32 here.
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def kernels(value):
    old = os.environ.get("KDFAST_CUDA_KERNELS")
    os.environ["KDFAST_CUDA_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KDFAST_CUDA_KERNELS", None)
        else:
            os.environ["KDFAST_CUDA_KERNELS"] = old


def _run(fn, inputs, grad_out=None):
    """fn(*inputs) and the gradients w.r.t. the inputs that require grad. The inputs are leaves used as
    they are (strided and channels_last views keep their strides); autograd.grad leaves .grad alone."""
    out = fn(*inputs)
    need = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not need:
        return out.detach(), []
    g = torch.autograd.grad(out, need, grad_out if grad_out is not None else torch.ones_like(out))
    return out.detach(), [t.detach() for t in g]


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _tolerance(dtype):
    # ||out - ref|| / ||ref||: float32 far under 1e-3, bf16/fp16 operands 1e-3..1e-2 (see docs/cuda.md, make gpu-check).
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]


def check_three_ways(fn, ref_fn, inputs, grad_out=None):
    """Kernel path vs ATen path vs float64 reference (on the CPU, from the same input values)."""
    with kernels("all"):
        k_out, k_grads = _run(fn, inputs, grad_out)
    with kernels("none"):
        a_out, a_grads = _run(fn, inputs, grad_out)
    cpu_inputs = [x.detach().double().cpu().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor)
                  and x.is_floating_point() else (x.cpu() if isinstance(x, torch.Tensor) else x) for x in inputs]
    r_out, r_grads = _run(ref_fn, cpu_inputs, None if grad_out is None else grad_out.double().cpu())
    dtype = next(x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point())
    tol = _tolerance(dtype)
    assert k_out.dtype == a_out.dtype
    for got, name in ((k_out, "kernel"), (a_out, "aten")):
        assert torch.isfinite(got).all(), name
        assert _rel(got.cpu(), r_out) < tol, (name, _rel(got.cpu(), r_out))
    for kg, ag, rg in zip(k_grads, a_grads, r_grads):
        assert kg.dtype == ag.dtype and kg.shape == rg.shape
        assert _rel(kg.cpu(), rg) < 4 * tol, ("kernel grad", _rel(kg.cpu(), rg))
        assert _rel(ag.cpu(), rg) < 4 * tol, ("aten grad", _rel(ag.cpu(), rg))
    return k_out, a_out


def _map(shape, dtype, layout="contiguous", requires_grad=True):
    b, c, h, w = shape
    if layout == "channels_last":
        x = torch.randn(shape, device=DEV).to(dtype).to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(b, c, h, 2 * w, device=DEV).to(dtype)[..., ::2]
    else:
        x = torch.randn(shape, device=DEV).to(dtype)
    return x.requires_grad_(requires_grad)


# ------------------------------------------------------------------------------------------ FSP
@pytest.mark.parametrize("dtype", LOW + [torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_fsp(dtype, layout):
    maps = [_map((5, c, 9, 7), dtype, layout) for c in (16, 24, 16, 24)]
    check_three_ways(lambda *m: ops.fsp_loss(*m, reduction="none"), lambda *m: reference.fsp_loss(*m, reduction="none"),
                     maps, torch.randn(5, device=DEV).to(dtype))
    check_three_ways(ops.fsp_matrix, reference.fsp_matrix, maps[:2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fsp_imagenet_size_half_backward(dtype):
    """1/HW = 1/3136 and 2 c D / HW stay float32 (they went subnormal in float16 before)."""
    maps = [_map((2, c, 56, 56), dtype) for c in (64, 64, 64, 64)]
    check_three_ways(ops.fsp_loss, reference.fsp_loss, maps)


def test_fsp_batch_over_grid_y_limit():
    maps = [_map((70000, c, 2, 2), torch.float32) for c in (2, 3, 2, 3)]
    check_three_ways(lambda *m: ops.fsp_loss(*m, reduction="none"), lambda *m: reference.fsp_loss(*m, reduction="none"),
                     maps, torch.randn(70000, device=DEV))


# ------------------------------------------------------------------------------------------ NST
@pytest.mark.parametrize("dtype", LOW + [torch.float64])
@pytest.mark.parametrize("kernel", ["linear", "poly_channel", "poly_spatial", "gaussian"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_nst(dtype, kernel, layout):
    fs, ft = _map((4, 20, 7, 9), dtype, layout), _map((4, 12, 7, 9), dtype, layout)
    ref_kernel = "poly" if kernel.startswith("poly") else kernel
    check_three_ways(lambda a, b: torch.ops.kdfast.nst_loss(a, b, kernel, "none", 0.9)[0],
                     lambda a, b: reference.nst_loss(a, b, ref_kernel, "none", 0.9), [fs, ft],
                     torch.randn(4, device=DEV).to(dtype))


def test_nst_gaussian_several_sample_chunks_and_row_tiles():
    # 64 + 70 rows (two row tiles of 64 for the teacher), HW 1024: chunks of 4M / (64 * 1024) = 64 samples.
    fs, ft = _map((130, 64, 32, 32), torch.float32), _map((130, 70, 32, 32), torch.float32)
    check_three_ways(lambda a, b: ops.nst_loss(a, b, "gaussian", "sum", 1.0),
                     lambda a, b: reference.nst_loss(a, b, "gaussian", "sum", 1.0), [fs, ft])


@pytest.mark.parametrize("sigma,hw", [(0.1, (3, 3)), (0.15, (4, 4)), (0.25, (6, 8))])
def test_nst_gaussian_small_sigma_float32(sigma, hw):
    fs, ft = _map((3, 12, *hw), torch.float32), _map((3, 10, *hw), torch.float32)
    check_three_ways(lambda a, b: ops.nst_loss(a, b, "gaussian", "sum", sigma),
                     lambda a, b: reference.nst_loss(a, b, "gaussian", "sum", sigma), [fs, ft])


# ------------------------------------------------------------------------------------------ KD
@pytest.mark.parametrize("dtype", LOW + [torch.float64])
@pytest.mark.parametrize("b,k", [(1, 1), (33, 10), (64, 1000), (3, 32003)])
@pytest.mark.parametrize("strided_rows", [False, True])
def test_kd(dtype, b, k, strided_rows):
    def logits():
        x = torch.randn(b, 2 * k if strided_rows else k, device=DEV).to(dtype)
        return (x[:, :k] if strided_rows else x).requires_grad_()

    s, t = logits(), logits()
    y = torch.randint(0, k, (b,), device=DEV)
    y[0] = -100
    for alpha in (0.3, 1.0):
        check_three_ways(lambda a, c: ops.kd_loss(a, c, y, 4.0, alpha, reduction="none"),
                         lambda a, c: reference.kd_loss(a, c, y.cpu(), 4.0, alpha, reduction="none"), [s, t],
                         torch.randn(b, device=DEV).to(dtype))


def test_kd_batch_over_grid_y_limit():
    s, t = (torch.randn(70000, 10, device=DEV).requires_grad_() for _ in range(2))
    y = torch.randint(0, 10, (70000,), device=DEV)
    check_three_ways(lambda a, c: ops.kd_loss(a, c, y), lambda a, c: reference.kd_loss(a, c, y.cpu()), [s, t])


# ------------------------------------------------------------------------------------------ Tucker
def _smem_bytes(r_in, r_out, tile, k, stride, dilation, chunk=16):
    """Mirror of smem_floats in csrc/ops/cuda/tucker_conv2d_kernel.cu (float32 buffers)."""
    th, tw = tile
    halo_h, halo_w = (th - 1) * stride + dilation * (k - 1) + 1, (tw - 1) * stride + dilation * (k - 1) + 1
    halo = halo_h * halo_w
    return 4 * (r_in * halo + r_out * th * tw + chunk * halo + r_in * chunk)


TILES = [(8, 8), (4, 8), (4, 4), (2, 4)]


def _rank_for_tile(tile, limit, k=3):
    """The smallest rank R (R_in = R_out) whose launch takes `tile`: the larger tiles do not fit."""
    i = TILES.index(tile)
    r = 1
    while i > 0 and _smem_bytes(r, r, TILES[i - 1], k, 1, 1) <= limit:
        r += 1
    assert _smem_bytes(r, r, tile, k, 1, 1) <= limit
    return r


def _tucker_inputs(n, c, h, w, r_in, r_out, o, k, dtype, layout="contiguous"):
    x = _map((n, c, h, w), dtype, layout)
    scale = lambda fan: fan ** -0.5  # noqa: E731  keeps values O(1) through the three stages
    first = (torch.randn(r_in, c, device=DEV) * scale(c)).to(dtype).requires_grad_()
    core = (torch.randn(r_out, r_in, k, k, device=DEV) * scale(r_in * k * k)).to(dtype).requires_grad_()
    last = (torch.randn(o, r_out, device=DEV) * scale(r_out)).to(dtype).requires_grad_()
    bias = torch.randn(o, device=DEV).to(dtype).requires_grad_()
    return [x, first, core, last, bias]


def _tucker(**kw):
    return (lambda *a: ops.tucker_conv2d(*a, save_intermediates=False, **kw),
            lambda *a: reference.tucker_conv2d(*a, **kw))


def test_tucker_default_is_composed_and_forced_is_fused():
    x, first, core, last, _ = _tucker_inputs(2, 16, 14, 14, 8, 8, 16, 3, torch.float32)
    assert ops.tucker_conv2d_path(x, first, core, last, padding=1) == "composed"
    with kernels("all"):
        assert ops.tucker_conv2d_path(x, first, core, last, padding=1) == "fused"


@pytest.mark.parametrize("tile", TILES)
def test_tucker_tiles(tile):
    limit = torch.cuda.get_device_properties(DEV).shared_memory_per_block_optin
    r = _rank_for_tile(tile, limit)
    if tile == (8, 8):
        r = max(r, 64)  # ResNet rank 64: 8x8 tile needs ~52 KB, over the 48 KB default
        assert _smem_bytes(r, r, tile, 3, 1, 1) > 48 * 1024
    inputs = _tucker_inputs(2, 32, 19, 17, r, r, 24, 3, torch.float32)
    with kernels("all"):
        assert ops.tucker_conv2d_path(*inputs[:4], padding=1) == "fused"
    check_three_ways(*_tucker(padding=1), inputs)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("k,stride,padding,dilation", [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1),
                                                       (7, 2, 3, 1), (3, 1, 2, 2)])
def test_tucker_shapes(dtype, layout, k, stride, padding, dilation):
    inputs = _tucker_inputs(3, 24, 15, 13, 12, 10, 20, k, dtype, layout)
    check_three_ways(*_tucker(stride=stride, padding=padding, dilation=dilation), inputs)


# ------------------------------------------------------------------------------------------ sparse recoding
def _recoding_lists(dtype, sizes=(1, 7, 16385, 40001, 0)):
    params = [torch.randn(n, device=DEV).to(dtype) for n in sizes]
    grads = [torch.randn(n, device=DEV).to(dtype) for n in sizes]
    taus = torch.tensor([0.5, 0.9, 0.8, 1.1, 0.2][:len(sizes)], device=DEV)
    return grads, params, taus


@pytest.mark.parametrize("dtype", LOW + [torch.float64])
def test_sparse_recoding(dtype):
    kw = dict(boost=2.0, damp=0.3, shrink=0.01, tau_rate=0.5)
    grads, params, taus = _recoding_lists(dtype)
    results = {}
    for value in ("all", "none"):
        g, t = [x.clone() for x in grads], taus.clone()
        with kernels(value):
            ops.sparse_recoding_(g, params, t, **kw)
        results[value] = (g, t)
    ref_g, ref_t = [x.cpu() for x in grads], taus.cpu()
    reference.sparse_recoding_(ref_g, [p.cpu() for p in params], ref_t, **kw)
    for value, (g, t) in results.items():
        for a, b in zip(g, ref_g):
            torch.testing.assert_close(a.cpu().float(), b.float(), rtol=torch.finfo(dtype).eps, atol=1e-6)
        torch.testing.assert_close(t.cpu(), ref_t, rtol=1e-6, atol=0)


def test_sparse_recoding_under_graph_capture():
    kw = dict(boost=2.0, damp=0.3, shrink=0.01, tau_rate=0.5)
    grads, params, taus = _recoding_lists(torch.float32, sizes=(5, 300))
    g0, t0 = [x.clone() for x in grads], taus.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with kernels("none"):  # the ATen path warms up, then is captured and replayed
            ops.sparse_recoding_([x.clone() for x in grads], params, taus.clone(), **kw)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ops.sparse_recoding_(grads, params, taus, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    for g, src in zip(grads, g0):
        g.copy_(src)
    taus.copy_(t0)
    graph.replay()
    torch.cuda.synchronize()
    ref_g, ref_t = [x.clone() for x in g0], t0.clone()
    with kernels("none"):
        ops.sparse_recoding_(ref_g, params, ref_t, **kw)
    for a, b in zip(grads, ref_g):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(taus, ref_t, rtol=0, atol=0)
    # The kernel path refuses to be captured, with a message saying what to do.
    with kernels("all"), pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        graph2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph2):
            ops.sparse_recoding_(grads, params, taus, **kw)


# ------------------------------------------------------------------------------------------ sparse codes
@pytest.mark.parametrize("dtype", LOW + [torch.float64])
@pytest.mark.parametrize("k", [1, 8, 32])
def test_sparse_codes(dtype, k):
    # 189 pixels: a full block of 128 and a ragged one; k = 32 in float64 takes the opt-in shared memory.
    g = torch.Generator(device=DEV).manual_seed(k)
    x = torch.randn(3, 24, 7, 9, device=DEV, generator=g).to(dtype)
    dictionary = torch.randn(24, 100, device=DEV, generator=g).to(dtype)
    bias = torch.full((1,), 0.2, device=DEV, dtype=dtype)
    with kernels("all"):
        k_values, k_indices = ops.sparse_codes(x, dictionary, bias, k)
    with kernels("none"):
        a_values, a_indices = ops.sparse_codes(x, dictionary, bias, k)
    r_values, r_indices = reference.sparse_codes(x.double().cpu(), dictionary.double().cpu(), bias.double().cpu(), k)
    assert k_values.dtype == a_values.dtype == dtype and k_indices.dtype == torch.int64
    for values, indices, name in ((k_values, k_indices, "kernel"), (a_values, a_indices, "aten")):
        assert values.shape == indices.shape == (3, 7, 9, k), name
        # Near-ties may order differently in a lower precision: nearly every selection must agree.
        agree = (indices.cpu() == r_indices).double().mean().item()
        assert agree >= (1.0 if dtype == torch.float64 else 0.98), f"{name}: {agree:.3f} of the indices agree"
        assert _rel(values.cpu(), r_values) <= _tolerance(dtype), name


# ------------------------------------------------------------------------------------------ every kernel
def _all_ops():
    """One call of every op with a hand-written kernel, forward and backward; returns every result."""
    torch.manual_seed(3)  # _recoding_lists draws from the default generator
    g = torch.Generator(device=DEV).manual_seed(3)
    rnd = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    maps = [rnd(6, c, 14, 14).requires_grad_() for c in (16, 32, 16, 32)]
    fs, ft = rnd(6, 40, 8, 8).requires_grad_(), rnd(6, 24, 8, 8).requires_grad_()
    s, t = rnd(64, 1000).requires_grad_(), rnd(64, 1000)
    y = torch.randint(0, 1000, (64,), device=DEV, generator=g)
    tucker = [rnd(4, 32, 16, 16).requires_grad_(), rnd(16, 32) * 0.2, rnd(16, 16, 3, 3) * 0.1, rnd(32, 16) * 0.2]
    out = []
    for loss in (ops.fsp_loss(*maps), ops.nst_loss(fs, ft, "poly"), ops.nst_loss(fs, ft, "gaussian", sigma=0.5),
                 ops.nst_loss(fs, ft, "linear"), ops.kd_loss(s, t, y)):
        out.append(loss.detach())
        out.extend(torch.autograd.grad(loss, [x for x in (*maps, fs, ft, s) if x.requires_grad], allow_unused=True))
    out.append(ops.tucker_conv2d(*tucker, padding=1, save_intermediates=False).detach())
    grads, params, taus = _recoding_lists(torch.float32)
    ops.sparse_recoding_(grads, params, taus, boost=2.0, damp=0.3, shrink=0.01, tau_rate=0.5)
    out.extend(grads + [taus])
    out.extend(ops.sparse_codes(rnd(2, 16, 9, 9), rnd(16, 64), rnd(1), 8))
    return [x for x in out if x is not None]


def test_bitwise_deterministic():
    with kernels("all"):
        first, second = _all_ops(), _all_ops()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_side_stream_matches_default_stream():
    with kernels("all"):
        expected = _all_ops()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            got = _all_ops()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_opcheck_with_kernels_on():
    with kernels("all"):
        maps = [torch.randn(2, c, 5, 5, device=DEV, requires_grad=True) for c in (3, 4, 3, 4)]
        torch.library.opcheck(torch.ops.kdfast.fsp_loss.default, (*maps, "mean"))
        fs, ft = torch.randn(2, 6, 4, 4, device=DEV, requires_grad=True), torch.randn(2, 5, 4, 4, device=DEV)
        for kernel in ("linear", "poly_channel", "poly_spatial", "gaussian"):
            torch.library.opcheck(torch.ops.kdfast.nst_loss.default, (fs, ft, kernel, "mean", 0.7))
        s, t = torch.randn(4, 9, device=DEV, requires_grad=True), torch.randn(4, 9, device=DEV)
        torch.library.opcheck(torch.ops.kdfast.kd_loss.default, (s, t, torch.tensor([1, 2, 3, 0], device=DEV),
                                                                 4.0, 0.9, True, -100, "mean"))
        x = torch.randn(2, 8, 9, 9, device=DEV)
        torch.library.opcheck(torch.ops.kdfast.tucker_conv2d.default,
                              (x, torch.randn(4, 8, device=DEV), torch.randn(4, 4, 3, 3, device=DEV),
                               torch.randn(6, 4, device=DEV), None, [1, 1], [1, 1], [1, 1]))
