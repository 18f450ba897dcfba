"""Every CUDA kernel of csrc/ops/cuda/*.cuh executed on the CPU by the exact-barrier emulator
(tests/emulator/cuda_emu.h; what it proves and what it cannot: docs/cuda.md), against float64
oracles (kdfast.testing.reference where an op-level oracle exists, the defining formula for a
primitive's partial result), under the four schedules (free, forward, reverse, random) and in two
builds: plain and AddressSanitizer + UndefinedBehaviorSanitizer. KDFAST_EMULATOR_TSAN=1 adds a
ThreadSanitizer build (see docs/cuda.md for its cost).

The inputs are launched the way the .cu host code launches them (tests/emulator/run_*.cpp)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdfast.testing import reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "emulator"))
import harness  # noqa: E402

pytestmark = pytest.mark.skipif(harness.compiler() is None, reason="needs g++ to build the CUDA emulator")

VARIANTS = ["plain", "asan"] + (["tsan"] if os.environ.get("KDFAST_EMULATOR_TSAN") == "1" else [])
# tools/emulator_mutants.py runs this suite on a mutant: one variant, its prebuilt runner.
if os.environ.get("KDFAST_EMULATOR_EXE"):
    VARIANTS = [os.environ["KDFAST_EMULATOR_VARIANT"]]
FLOATING = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# ||out - ref|| / ||ref||: accumulate dtype float64 / float32; half types are rounded once at the output.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module", params=VARIANTS)
def emu(request):
    return Path(os.environ["KDFAST_EMULATOR_EXE"]) if os.environ.get("KDFAST_EMULATOR_EXE") else harness.build(request.param)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rel(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def check(results, name, want, tol, shape=None):
    """Every schedule's `name` matches `want` (float64) within tol, with no NaN (an unwritten output
    keeps the NaN it was filled with)."""
    for schedule, outputs in results.items():
        got = outputs[name] if shape is None else outputs[name].view(shape)
        assert not torch.isnan(got).any(), f"{schedule}: {name} has NaN (unwritten or read uninitialised shared memory)"
        err = rel(got, want.reshape(got.shape))
        assert err <= tol, f"{schedule} schedule: {name} off by {err:.3g} (tolerance {tol:g})"


# ------------------------------------------------------------------------------------ the emulator's own checks
@pytest.mark.parametrize("case,message", [
    (0, r"__syncthreads at run_selftest.cpp:10 .*\(a barrier in divergent code\)"),   # half the block at a barrier
    (1, r"divergent __syncthreads"),                                                   # two barrier sites
    (2, r"exited while named in the mask of __shfl_down_sync|names lane 3, which exited"),  # exit before a shuffle
    (3, r"waits at __syncthreads|while its warp waits for it"),                       # shuffle partner at a barrier
    (4, r"a barrier in divergent code|barrier counts differ"),                        # uneven barrier loop
    (7, r"without cudaFuncSetAttribute"),                                             # 49 KiB, no opt-in
])
def test_emulator_reports_bugs(emu, case, message):
    for schedule in harness.SCHEDULES:
        with pytest.raises(harness.EmulatorError, match=message):
            harness.run(emu, "selftest", ints={"case": case, "threads": 64}, outputs={"out": (torch.float32, 64)},
                        schedules=[schedule])


def test_emulator_missing_barrier_and_uninitialised_shared_memory_read_nan(emu):
    # A read of a neighbour's static shared slot with no barrier: both serial orders read a slot before
    # its writer ran (NaN-filled in the plain build, stale in the sanitizer builds: wrong either way).
    # One process per schedule: a sanitizer build's statics would keep the previous run's values.
    want = torch.arange(1, 65, dtype=torch.float32) % 64 + 1
    for schedule in ("forward", "reverse"):
        out = harness.run(emu, "selftest", ints={"case": 5, "threads": 64}, outputs={"out": (torch.float32, 64)},
                          schedules=[schedule])
        assert not torch.equal(out[schedule]["out"], want), schedule
    if emu.parent.name.startswith("tsan"):  # the free schedule runs the threads at once: a data race
        with pytest.raises(harness.EmulatorError, match="ThreadSanitizer: data race"):
            harness.run(emu, "selftest", ints={"case": 5, "threads": 64}, outputs={"out": (torch.float32, 64)},
                        schedules=["free"])
    out = harness.run(emu, "selftest", ints={"case": 6, "threads": 64}, outputs={"out": (torch.float32, 64)})
    assert all(torch.isnan(o["out"]).all() for o in out.values())


def test_emulator_builtins(emu):
    n = 64
    res = harness.run(emu, "selftest", ints={"case": 8, "threads": n},
                      outputs={"out": (torch.float32, 7 * n), "total": (torch.float32, 1), "count": (torch.int32, 1),
                               "half_round": (torch.float32, 2 * n)})
    tid = torch.arange(n, dtype=torch.float32)
    lane = tid % 32
    warp_sum = (tid - lane).view(-1, 32).sum(1).repeat_interleave(32) + 496
    seg = lane % 8
    for schedule, r in res.items():
        out = r["out"].view(7, n)
        assert torch.equal(out[0], warp_sum), schedule
        assert torch.equal(out[1], torch.where(lane >= 1, tid - 1, tid)), schedule
        assert torch.equal(out[2], tid - lane + 5), schedule
        assert torch.equal(out[3], torch.where(seg + 2 < 8, tid + 2, tid)), schedule
        assert torch.equal(out[4], torch.ones(n)), schedule
        assert torch.equal(out[5], torch.full((n,), 3.0)), schedule
        assert torch.equal(out[6], torch.full((n,), 0.5 * n)), schedule
        assert r["count"].item() == n and r["total"].item() == 0.5 * n
        rounding = r["half_round"].view(n, 2)
        assert torch.equal(rounding[:, 0], (1 + tid / 4096).half().float()), schedule
        assert torch.equal(rounding[:, 1], (1 + tid / 512).bfloat16().float()), schedule


# ------------------------------------------------------------------------------------ block reductions
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("op", ["block_sum", "block_max"])
@pytest.mark.parametrize("threads", [32, 64, 256])
def test_block_reductions(emu, dtype, op, threads):
    # The contract of kernels.cuh's block_sum and kd_loss_kernels.cuh's block_max: every thread gets
    # the result, also on back-to-back calls reusing the same shared array.
    blocks, rounds = 2, 3
    x = torch.randn(blocks, rounds, threads, generator=gen(threads), dtype=torch.float64).to(dtype)
    res = harness.run(emu, op, ints=dict(blocks=blocks, rounds=rounds, threads=threads), inputs={"in": x},
                      outputs={"out": (dtype, x.numel())})
    x64 = x.double()
    want = (x64.sum(2, keepdim=True) if op == "block_sum" else x64.amax(2, keepdim=True)).expand_as(x64)
    check(res, "out", want, TOL[dtype] * 4)


# ------------------------------------------------------------------------------------ FSP / NST primitives
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sum_of_squares(emu, dtype):
    # Ragged last chunk, and more rows than grid.y (the row loop of the kernel).
    rows, n, chunk, grid_y = 5, 700, 256, 2
    x = torch.randn(rows, n, generator=gen(1), dtype=torch.float64)
    res = harness.run(emu, "sum_of_squares", ints=dict(rows=rows, n=n, chunk_len=chunk, grid_y=grid_y),
                      inputs=dict(x=x.to(dtype)), outputs=dict(partial=(dtype, rows * 3)))
    xq = x.to(dtype).double()
    want = torch.stack([xq[:, c * chunk:(c + 1) * chunk].pow(2).sum(1) for c in range(3)], 1)
    check(res, "partial", want, TOL[dtype] * 10, (rows, 3))
    # The op the primitive serves: FSP's squared Frobenius norms, sum over chunks = ||row||^2.
    a = xq.view(rows, 1, 25, 28)
    g = reference.fsp_matrix(a, a)  # (rows, 1, 1) = ||row||^2 / hw
    for r in res.values():
        assert rel(r["partial"].view(rows, 3).double().sum(1) / (25 * 28), g.view(-1)) <= TOL[dtype] * 10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("keep_diagonal", [True, False])
def test_gaussian_rows(emu, dtype, keep_diagonal):
    # NST's gaussian kernel rows: rows of s against the columns [s; t] (cols > the 256 threads: loop).
    nb, rows, extra, d, sigma = 2, 3, 297, 16, 0.7
    cols = rows + extra
    g = gen(2)
    s = F.normalize(torch.randn(nb, rows, d, generator=g, dtype=torch.float64), dim=2)
    t = F.normalize(torch.randn(nb, extra, d, generator=g, dtype=torch.float64), dim=2)
    y = torch.cat([s, t], 1)
    w = torch.rand(cols, generator=g, dtype=torch.float64) + 0.5
    dots = (s @ y.transpose(1, 2)).to(dtype)
    res = harness.run(emu, "gaussian_rows",
                      ints=dict(nb=nb, rows=rows, cols=cols, diag_col0=0, keep_diagonal=int(keep_diagonal)),
                      floats=dict(inv_two_sigma_sq=1 / (2 * sigma**2)),
                      inouts=dict(dots=dots), inputs=dict(sqnorm_rows=s.pow(2).sum(2).reshape(-1).to(dtype),
                                                          sqnorm_cols=y.pow(2).sum(2).reshape(-1).to(dtype),
                                                          col_weights=w.to(dtype)),
                      outputs=dict(row_sums=(dtype, nb * rows)))
    want = w * torch.exp(-(s.unsqueeze(2) - y.unsqueeze(1)).pow(2).sum(-1) / (2 * sigma**2))
    idx = torch.arange(rows)
    want[:, idx, idx] = w[idx] if keep_diagonal else 0.0
    check(res, "dots", want, 1e-10 if dtype == torch.float64 else 2e-6)
    check(res, "row_sums", want.sum(2), 1e-10 if dtype == torch.float64 else 2e-6)


@pytest.mark.parametrize("dtype", FLOATING)
@pytest.mark.parametrize("row_scale", [False, True])
def test_normalize_rows_backward(emu, dtype, row_scale):
    # NST's normalisation backward, on channels_last features (strided rows) with a strided gradient.
    b, c, h, w = 2, 3, 19, 17  # hw = 323 > 256 threads
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = gen(3)
    f_cl = torch.randn(b, h * w, c, generator=g, dtype=torch.float64).to(dtype)  # (B, HW, C) storage
    f = f_cl.double().transpose(1, 2)  # (B, C, HW) view
    grad = torch.randn(b, c, h * w, generator=g, dtype=torch.float64)
    rs = torch.rand(b * c, generator=g, dtype=torch.float64) + 0.5
    scale = torch.rand(b, generator=g, dtype=torch.float64) + 0.5
    eps = 1e-12
    fr = f.clone().requires_grad_(True)
    factor = rs.view(b, c, 1) if row_scale else 1.0
    (F.normalize(fr, dim=2, eps=eps) * grad * factor * scale.view(b, 1, 1)).sum().backward()
    inputs = dict(g=grad.to(acc), f=f_cl, norms=f.norm(dim=2).reshape(-1).to(acc), scale=scale.to(acc))
    if row_scale:
        inputs["row_scale"] = rs.to(acc)
    res = harness.run(emu, "normalize_rows_backward",
                      ints=dict(batch=b, channels=c, hw=h * w, g_batch=c * h * w, g_channel=h * w, g_position=1,
                                f_batch=h * w * c, f_channel=1, f_position=c),
                      floats=dict(eps=eps), inputs=inputs, outputs=dict(out=(dtype, b * c * h * w)))
    check(res, "out", fr.grad, TOL[dtype])


# ------------------------------------------------------------------------------------ KD loss
def _kd_inputs(b, k, stride, dtype, seed):
    g = gen(seed)
    s = (3 * torch.randn(b, stride, generator=g, dtype=torch.float64)).to(dtype)
    t = (3 * torch.randn(b, stride, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, k, (b,), generator=g)
    y[-1] = -100  # an ignored row
    # Row 1: logits of a trained model's size where another thread than the first warp's holds the
    # row maximum (index 40 is thread 40 at 64 or 256 threads): exp(s - max) overflows unless every
    # warp's maximum reaches the block maximum.
    if k > 40:
        s[1, 40] = 1000.0
        t[1, k - 1] = 900.0
    return s, t, y


@pytest.mark.parametrize("dtype", FLOATING)
@pytest.mark.parametrize("k,need_ce", [(10, True), (300, True), (2100, False)])
def test_kd_forward(emu, dtype, k, need_ce):
    # k = 10 / 300 / 2100: 32 / 64 / 256 threads per row (kd_forward_threads); rows strided (k + 3).
    b, temperature, alpha = 3, 4.0, 0.7
    s, t, y = _kd_inputs(b, k, k + 3, dtype, seed=k)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    res = harness.run(emu, "kd_forward", ints=dict(batch=b, k=k, s_stride=k + 3, t_stride=k + 3,
                                                   need_ce=int(need_ce), ignore_index=-100),
                      floats=dict(temperature=temperature), inputs=dict(s=s, t=t, y=y),
                      outputs=dict(stats=(acc, b * 5)))
    s64, t64 = s[:, :k].double(), t[:, :k].double()
    lse_st = torch.logsumexp(s64 / temperature, 1)
    lse_tt = torch.logsumexp(t64 / temperature, 1)
    want = torch.stack([lse_st, lse_tt, torch.zeros(b), torch.zeros(b), torch.zeros(b)], 1)
    kl = reference.kd_loss(s64, t64, None, temperature, alpha=1.0, t2_scale=False, reduction="none")
    want[:, 2] = kl
    if need_ce:
        want[:, 3] = torch.logsumexp(s64, 1)
        ce = F.cross_entropy(s64, y, ignore_index=-100, reduction="none")
        want[:, 4] = torch.where(y != -100, ce, torch.zeros_like(ce))
    tol = TOL[acc] * 4
    for schedule, r in res.items():
        stats = r["stats"].view(b, 5).double()
        assert not torch.isnan(stats).any(), schedule
        assert rel(stats[:, :2], want[:, :2]) <= tol, schedule
        assert (stats[:, 2] - want[:, 2]).abs().max() <= tol * max(1.0, want[:, 2].abs().max().item()), schedule
        assert rel(stats[:, 3:], want[:, 3:]) <= tol if need_ce else stats[:, 3:].abs().max() == 0, schedule
        # The per-row loss kd_loss_impl assembles from the statistics, against the reference.
        per_row = alpha * temperature**2 * stats[:, 2] + (1 - alpha) * stats[:, 4]
        ref = reference.kd_loss(s64, t64, y if need_ce else None, temperature, alpha, reduction="none")
        if not need_ce:
            per_row = alpha * temperature**2 * stats[:, 2]
        assert (per_row - ref).abs().max() <= 50 * tol * max(1.0, ref.abs().max().item()), schedule


@pytest.mark.parametrize("dtype", FLOATING)
@pytest.mark.parametrize("need", ["both", "s", "t"])
def test_kd_backward(emu, dtype, need):
    b, k, stride, temperature, alpha = 3, 300, 301, 2.0, 0.6
    s, t, y = _kd_inputs(b, k, stride, dtype, seed=7)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s64 = s[:, :k].double().requires_grad_(True)
    t64 = t[:, :k].double().requires_grad_(True)
    loss = reference.kd_loss(s64, t64, y, temperature, alpha, reduction="sum")
    gs, gt = torch.autograd.grad(loss, [s64, t64])
    with torch.no_grad():
        lse_st, lse_tt = torch.logsumexp(s64 / temperature, 1), torch.logsumexp(t64 / temperature, 1)
        kl = reference.kd_loss(s64, t64, None, temperature, alpha=1.0, t2_scale=False, reduction="none")
        stats = torch.stack([lse_st, lse_tt, kl, torch.logsumexp(s64, 1), torch.zeros(b, dtype=torch.float64)], 1)
    valid = (y != -100).double()
    coefs = torch.stack([torch.full((b,), alpha * temperature, dtype=torch.float64), (1 - alpha) * valid], 1)
    outputs = {}
    if need in ("both", "s"):
        outputs["grad_s"] = (dtype, b * k)
    if need in ("both", "t"):
        outputs["grad_t"] = (dtype, b * k)
    res = harness.run(emu, "kd_backward", ints=dict(batch=b, k=k, s_stride=stride, t_stride=stride, max_blocks=2),
                      floats=dict(temperature=temperature),
                      inputs=dict(s=s, t=t, y=y, stats=stats.to(acc), coefs=coefs.to(acc)), outputs=outputs)
    tol = TOL[dtype] * (20 if acc == torch.float32 else 1e3)
    if "grad_s" in outputs:
        check(res, "grad_s", gs, tol)
    if "grad_t" in outputs:
        check(res, "grad_t", gt, tol)


# ------------------------------------------------------------------------------------ KR sparse recoding
@pytest.mark.parametrize("dtype", FLOATING)
@pytest.mark.parametrize("aligned", [True, False])
def test_sparse_recoding(emu, dtype, aligned):
    # Four tensors: tiny, two chunks (16384 + 37), empty, mid-size; odd offsets take the scalar path.
    numels = [5, (1 << 14) + 37, 0, 1000]
    pad = 0 if aligned else 1
    offsets, pos = [], pad
    for n in numels:
        offsets.append(pos)
        pos += n + 8 + pad  # keeps aligned offsets multiples of 8 elements (16 bytes for every dtype)
        pos += (-pos) % 8 if aligned else 0
    g = gen(11)
    theta = torch.randn(pos, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(pos, generator=g, dtype=torch.float64).to(dtype)
    taus = torch.tensor([0.3, 0.8, 0.5, 1.2])
    kw = dict(boost=1.5, damp=0.4, shrink=0.01, tau_rate=0.3)
    res = harness.run(emu, "sparse_recoding", floats=kw,
                      inputs=dict(theta=theta, numels=torch.tensor(numels), offsets=torch.tensor(offsets)),
                      inouts=dict(grad=grad, taus=taus))
    params = [theta[o:o + n] for o, n in zip(offsets, numels)]
    ref_grads = [grad[o:o + n].clone() for o, n in zip(offsets, numels)]
    ref_taus = taus.clone()
    reference.sparse_recoding_(ref_grads, params, ref_taus, **kw)
    for schedule, r in res.items():
        for o, n, want in zip(offsets, numels, ref_grads):
            got = r["grad"][o:o + n]
            assert torch.equal(got, want), f"{schedule}: recoded gradient differs"
        untouched = torch.ones(pos, dtype=torch.bool)
        for o, n in zip(offsets, numels):
            untouched[o:o + n] = False
        assert torch.equal(r["grad"][untouched], grad[untouched]), f"{schedule}: wrote outside the tensors"
        assert rel(r["taus"], ref_taus) <= 1e-6, schedule


# ------------------------------------------------------------------------------------ SRM sparse codes
@pytest.mark.parametrize("dtype", FLOATING)
@pytest.mark.parametrize("k", [1, 5, 32])
def test_sparse_codes(emu, dtype, k):
    # 154 pixels: a full block of 128 and a ragged one; k = 32 (kMaxK) in float64 needs the opt-in
    # shared memory (128 * 33 * 12 bytes > 48 KiB).
    n, d, h, w, kk = 2, 6, 7, 11, 40
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = gen(13 + k)
    x = torch.randn(n, d, h, w, generator=g, dtype=torch.float64).to(dtype)
    dictionary = torch.randn(d, kk, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.tensor(0.3, dtype=torch.float64)
    pixels = n * h * w
    x_cols = x.permute(1, 0, 2, 3).reshape(d, pixels).to(acc)
    res = harness.run(emu, "sparse_codes", ints=dict(pixels=pixels, d=d, num_codewords=kk, k=k, smem_shortfall=0),
                      floats=dict(b=bias.item()), inputs=dict(x_cols=x_cols, c_rows=dictionary.t().to(acc)),
                      outputs=dict(values=(dtype, pixels * k), indices=(torch.int64, pixels * k)))
    want_v, want_i = reference.sparse_codes(x.double(), dictionary.double(), bias, k)
    for schedule, r in res.items():
        assert torch.equal(r["indices"].view(n, h, w, k), want_i), f"{schedule}: selected codewords differ"
    check(res, "values", want_v, TOL[dtype])


# ------------------------------------------------------------------------------------ fused Tucker convolution
TUCKER_CASES = [
    # (n, c, h, w, r_in, r_out, o, kh, kw, stride, padding, dilation, bias)
    (2, 20, 9, 11, 6, 5, 7, 3, 3, (1, 1), (1, 1), (1, 1), True),    # ragged tiles, two channel chunks
    (1, 5, 13, 10, 4, 3, 6, 5, 3, (2, 2), (2, 1), (1, 1), True),    # stride 2, 5x3 core
    (1, 4, 12, 12, 3, 4, 5, 3, 3, (1, 2), (2, 2), (2, 2), False),   # dilation 2, mixed stride
    (2, 3, 7, 9, 4, 4, 3, 1, 1, (2, 2), (0, 0), (1, 1), True),      # 1x1 core, stride 2
    (1, 3, 9, 9, 2, 3, 4, 7, 7, (1, 1), (3, 3), (1, 1), False),     # 7x7 core
]


def _tucker_run(emu, case, dtype, smem_limit=232448, optin=1, shortfall=0):
    n, c, h, w, r_in, r_out, o, kh, kw, stride, padding, dilation, has_bias = case
    g = gen(17)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    first = (torch.randn(r_in, c, generator=g, dtype=torch.float64) / c**0.5).to(dtype)
    core = (torch.randn(r_out, r_in, kh, kw, generator=g, dtype=torch.float64) / (r_in * kh * kw) ** 0.5).to(dtype)
    last = (torch.randn(o, r_out, generator=g, dtype=torch.float64) / r_out**0.5).to(dtype)
    bias = torch.randn(o, generator=g, dtype=torch.float64).to(dtype) if has_bias else None
    want = reference.tucker_conv2d(x.double(), first.double(), core.double(), last.double(),
                                   None if bias is None else bias.double(), stride, padding, dilation)
    inputs = dict(x=x, first=first, core=core, last=last)
    if bias is not None:
        inputs["bias"] = bias
    res = harness.run(emu, "tucker", ints=dict(n=n, c=c, h=h, w=w, r_in=r_in, r_out=r_out, o=o, kh=kh, kw=kw,
                                               sh=stride[0], sw=stride[1], ph=padding[0], pw=padding[1],
                                               dh=dilation[0], dw=dilation[1], smem_limit=smem_limit, optin=optin,
                                               smem_shortfall=shortfall),
                      inputs=inputs, outputs=dict(y=(dtype, want.numel()), info=(torch.int64, 3)))
    return res, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(TUCKER_CASES)))
def test_tucker_fused(emu, dtype, case):
    res, want = _tucker_run(emu, TUCKER_CASES[case], dtype)
    assert res["free"]["info"][:2].tolist() == [8, 8]
    check(res, "y", want, {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype])


# The same shape, planned against smaller shared-memory limits: each tile of kTiles.
@pytest.mark.parametrize("tile", [(4, 8), (4, 4), (2, 4)])
def test_tucker_smaller_tiles(emu, tile):
    case = TUCKER_CASES[0]
    n, c, h, w, r_in, r_out, o, kh, kw, stride, padding, dilation, _ = case
    halo = lambda t, k, s, d: (t - 1) * s + d * (k - 1) + 1  # noqa: E731  (kdfast/tucker_geometry.h)
    hh, hw_ = halo(tile[0], kh, stride[0], dilation[0]), halo(tile[1], kw, stride[1], dilation[1])
    limit = 4 * (r_in * hh * hw_ + r_out * tile[0] * tile[1] + 16 * hh * hw_ + r_in * 16)
    res, want = _tucker_run(emu, case, torch.float32, smem_limit=limit)
    assert res["free"]["info"].tolist() == [tile[0], tile[1], limit]
    check(res, "y", want, 2e-6)


# Ranks whose 8x8 tile needs more than 48 KiB: the launch's cudaFuncSetAttribute opt-in is required.
BIG_RANKS = (1, 8, 8, 8, 64, 64, 8, 3, 3, (1, 1), (1, 1), (1, 1), True)


def test_tucker_opt_in_shared_memory(emu):
    res, want = _tucker_run(emu, BIG_RANKS, torch.float32)
    assert res["free"]["info"][2].item() > 48 * 1024
    check(res, "y", want, 2e-6)
    with pytest.raises(harness.EmulatorError, match="without cudaFuncSetAttribute"):
        _tucker_run(emu, BIG_RANKS, torch.float32, optin=0)
