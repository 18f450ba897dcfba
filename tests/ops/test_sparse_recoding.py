"""kdfast.ops.sparse_recoding_ against the reference, and kdfast.methods.kr.SparseRecoding."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICES

from kdfast import ops
from kdfast.testing import reference
from kdfast.methods.kr import SparseRecoding

# Odd sizes, a 0-d-like (1,) tensor, a tensor longer than one CPU chunk (2^16) and one CUDA chunk
# (2^14) with a ragged tail, a conv weight.
SHAPES = [(1,), (7,), (3, 5), (33, 3, 3, 3), (70001,), (5, 1, 3)]
PARAMS = dict(boost=2.5, damp=0.3, shrink=0.01, tau_rate=0.2)


def _lists(dtype, device, shapes=SHAPES):
    params = [torch.randn(s, dtype=torch.float64, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, dtype=torch.float64, device=device).to(dtype) for s in shapes]
    # Exact zeros hit sign(0) = 0 in the inactive branch.
    params[1][0] = 0
    taus = torch.tensor([p.float().abs().mean().item() * f for p, f in zip(params, [0.5, 1, 1.2, 0.8, 1, 2])],
                        dtype=torch.float32, device=device)
    return grads, params, taus


def _run_both(dtype, device, **kw):
    grads, params, taus = _lists(dtype, device)
    ref_grads, ref_taus = [g.clone() for g in grads], taus.clone()
    params_before = [p.clone() for p in params]
    ops.sparse_recoding_(grads, params, taus, **{**PARAMS, **kw})
    reference.sparse_recoding_(ref_grads, params, ref_taus, **{**PARAMS, **kw})
    for p, q in zip(params, params_before):
        assert torch.equal(p, q)  # params are read only
    return grads, ref_grads, taus, ref_taus, params


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_float64(device):
    grads, ref_grads, taus, ref_taus, params = _run_both(torch.float64, device)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(taus, ref_taus, rtol=1e-6, atol=0)
    # every branch was hit: dominant, inactive with sign +-1 and 0
    flat = torch.cat([p.flatten() for p in params])
    assert (flat == 0).any() and (flat > 0).any() and (flat < 0).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_low_precision(device, dtype):
    grads, ref_grads, taus, ref_taus, _ = _run_both(dtype, device)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        # Same float32 arithmetic, one rounding: at most 1 ulp apart (contraction into FMA on GPU).
        torch.testing.assert_close(g.float(), r.float(), rtol=torch.finfo(dtype).eps, atol=1e-6)
    torch.testing.assert_close(taus, ref_taus, rtol=1e-5, atol=0)


def test_branches_exact():
    theta = torch.tensor([[-2.0, -0.5, 0.0, 0.5, 2.0, 1.0]], dtype=torch.float64)
    g = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, 3.0]], dtype=torch.float64)
    taus = torch.tensor([1.0])
    ops.sparse_recoding_([g], [theta], taus, boost=3.0, damp=0.25, shrink=0.5, tau_rate=0.5)
    # |theta| = 1.0 equals tau: inactive (the rule is |theta| > tau for dominant).
    expected = [3.0, 0.25 - 0.5, 0.25, -0.25 + 0.5, -3.0, 0.75 + 0.5]
    assert g.flatten().tolist() == expected
    mean = 6.0 / 6
    assert taus.item() == pytest.approx(1.0 + 0.5 * (mean - 1.0))


def test_tau_rate_zero_keeps_taus_and_update_formula():
    grads, params, taus = _lists(torch.float32, "cpu")
    before = taus.clone()
    ops.sparse_recoding_(grads, params, taus, boost=1.0, damp=0.0, shrink=0.0, tau_rate=0.0)
    assert torch.equal(taus, before)
    ops.sparse_recoding_(grads, params, taus, boost=1.0, damp=0.0, shrink=0.0, tau_rate=1.0)
    means = torch.stack([p.double().abs().mean() for p in params]).float()
    torch.testing.assert_close(taus, means, rtol=1e-6, atol=0)


def test_other_gradients_untouched():
    lin = torch.nn.Linear(5, 4)
    other = torch.nn.Linear(4, 3)
    other(lin(torch.randn(2, 5))).sum().backward()
    before = [p.grad.clone() for p in other.parameters()]
    SparseRecoding(lin.parameters(), boost=2.0, damp=0.5).step()
    for p, b in zip(other.parameters(), before):
        assert torch.equal(p.grad, b)


def test_channels_last_and_empty_tensor():
    p = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    g = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    empty_p, empty_g = torch.empty(0, 3), torch.empty(0, 3)
    taus = torch.tensor([0.7, 0.3])
    ref_g, ref_taus = g.clone(), taus.clone()
    ops.sparse_recoding_([g, empty_g], [p, empty_p], taus, **PARAMS)
    reference.sparse_recoding_([ref_g, empty_g.clone()], [p, empty_p], ref_taus, **PARAMS)
    torch.testing.assert_close(g, ref_g)
    assert g.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(taus, ref_taus)
    assert taus[1].item() == pytest.approx(0.3)  # no entries: tau kept


def test_thread_count_independent():
    shapes = [(300007,), (65536 * 2 + 5,), (17,)]
    grads, params, taus = _lists(torch.float32, "cpu", shapes)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            g, t = [x.clone() for x in grads], taus.clone()
            ops.sparse_recoding_(g, params, t, **PARAMS)
            results.append((g, t))
    finally:
        torch.set_num_threads(old)
    for g, t in results[1:]:
        assert torch.equal(t, results[0][1])
        for a, b in zip(g, results[0][0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    grads, params, taus = _lists(dtype, "cpu", [(3, 4), (5,)])
    torch.library.opcheck(torch.ops.kdfast.sparse_recoding_.default, (grads, params, taus, 2.0, 0.5, 0.01, 0.1))


def test_compile_fullgraph():
    grads, params, taus = _lists(torch.float32, "cpu", [(3, 4), (5,)])
    ref_g, ref_t = [g.clone() for g in grads], taus.clone()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(grads, params, taus):
        torch.ops.kdfast.sparse_recoding_(grads, params, taus, 2.0, 0.5, 0.01, 0.1)

    f(grads, params, taus)
    reference.sparse_recoding_(ref_g, params, ref_t, 2.0, 0.5, 0.01, 0.1)
    for a, b in zip(grads, ref_g):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(taus, ref_t)


# ------------------------------------------------------------------------------------ errors
def _args():
    g = [torch.randn(3), torch.randn(2, 2)]
    p = [torch.randn(3), torch.randn(2, 2)]
    return g, p, torch.ones(2)


@pytest.mark.parametrize("call", ["python", "raw"])
@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda g, p, t, h: (g.clear(), p.clear()), ValueError, "grads must contain at least one tensor"),
        (lambda g, p, t, h: p.pop(), ValueError, "params must have one tensor per grad: got 2 grads and 1 params"),
        (lambda g, p, t, h: p.__setitem__(1, torch.randn(4)), ValueError, r"shape mismatch: grads\[1\]"),
        (lambda g, p, t, h: p.__setitem__(1, torch.randn(2, 2, dtype=torch.float64)), TypeError, r"dtype mismatch: grads\[1\]"),
        (lambda g, p, t, h: (g.__setitem__(1, g[1].double()), p.__setitem__(1, p[1].double())), TypeError, "share one dtype"),
        (lambda g, p, t, h: (g.__setitem__(0, g[0].int()), p.__setitem__(0, p[0].int())), TypeError, r"grads\[0\] must be float32"),
        (lambda g, p, t, h: g.__setitem__(1, torch.randn(2, 4)[:, ::2]), ValueError, r"grads\[1\] must be dense"),
        (lambda g, p, t, h: (g.__setitem__(1, torch.randn(2, 2).t()),), ValueError, r"layout mismatch: grads\[1\]"),
        (lambda g, p, t, h: h.update(taus=torch.ones(2, dtype=torch.float64)), TypeError, "taus must be float32"),
        (lambda g, p, t, h: h.update(taus=torch.ones(3)), ValueError, r"taus must have shape \(2,\)"),
        (lambda g, p, t, h: h.update(boost=0.5), ValueError, "boost must be a finite number >= 1"),
        (lambda g, p, t, h: h.update(damp=1.0), ValueError, r"damp must be in \[0, 1\)"),
        (lambda g, p, t, h: h.update(shrink=-0.1), ValueError, "shrink must be a finite number >= 0"),
        (lambda g, p, t, h: h.update(tau_rate=1.5), ValueError, r"tau_rate must be in \[0, 1\]"),
        (lambda g, p, t, h: h.update(tau_rate=float("nan")), ValueError, r"tau_rate must be in \[0, 1\]"),
    ],
)
def test_errors(call, mutate, exc, match):
    g, p, t = _args()
    h = dict(boost=2.0, damp=0.5, shrink=0.0, tau_rate=0.1)
    mutate(g, p, t, h)
    t = h.pop("taus", t)
    with pytest.raises(exc, match=match):
        if call == "python":
            ops.sparse_recoding_(g, p, t, **h)
        else:
            torch.ops.kdfast.sparse_recoding_(g, p, t, h["boost"], h["damp"], h["shrink"], h["tau_rate"])


def test_error_device_mismatch_meta():
    g, p, t = _args()
    p[1] = p[1].to("meta")
    with pytest.raises(ValueError, match=r"device mismatch: grads\[1\] is on cpu but params\[1\] is on meta"):
        ops.sparse_recoding_(g, p, t, 2.0, 0.5, 0.0, 0.1)
    g, p, t = _args()
    with pytest.raises(ValueError, match="device mismatch: grads\\[0\\] is on cpu but taus is on meta"):
        ops.sparse_recoding_(g, p, t.to("meta"), 2.0, 0.5, 0.0, 0.1)


# ------------------------------------------------------------------------------------ the hook
def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 5)).to(dtype)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)


def test_step_matches_reference_and_skips_missing_grads():
    model = _model()
    x, y = _batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model[1].bias.grad = None  # a param without grad is skipped and keeps its tau
    hook = SparseRecoding(model.parameters(), boost=2.0, damp=0.25, shrink=0.001, tau_rate=0.3)
    taus0 = [t.clone() for t in hook.taus]
    params = [p for p in model.parameters() if p.grad is not None]
    idx = [i for i, p in enumerate(model.parameters()) if p.grad is not None]
    ref_grads = [p.grad.clone() for p in params]
    ref_taus = torch.stack([taus0[i] for i in idx])
    reference.sparse_recoding_(ref_grads, [p.detach() for p in params], ref_taus, 2.0, 0.25, 0.001, 0.3)
    hook.step()
    for p, r in zip(params, ref_grads):
        torch.testing.assert_close(p.grad, r)
    taus = hook.taus
    torch.testing.assert_close(torch.stack([taus[i] for i in idx]), ref_taus)
    skipped = [i for i, p in enumerate(model.parameters()) if p.grad is None]
    assert skipped and all(torch.equal(taus[i], taus0[i]) for i in skipped)
    # initial thresholds are mean |theta|
    torch.testing.assert_close(taus0[0], model[0].weight.detach().abs().mean())


def _train(model, steps=3, scaler=None, dtype=torch.float32):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hook = SparseRecoding(model.parameters(), boost=2.0, damp=0.5, shrink=0.01, tau_rate=0.1)
    for s in range(steps):
        x, y = _batch(10 + s)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x.to(dtype)), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            hook.step()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            hook.step()
            opt.step()
    return hook


def test_attach_equals_step():
    a, b = _model(), _model()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    ha = SparseRecoding(a.parameters(), boost=2.0, damp=0.5, shrink=0.01, tau_rate=0.1).attach()
    hb = SparseRecoding(b.parameters(), boost=2.0, damp=0.5, shrink=0.01, tau_rate=0.1)
    for s in range(3):
        x, y = _batch(s)
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            if m is b:
                hb.step()
            opt.step()
    ha.detach()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for t, u in zip(ha.taus, hb.taus):
        assert torch.equal(t, u)
    # detached: the next backward leaves grads alone
    x, y = _batch(9)
    opt_a.zero_grad()
    torch.nn.functional.cross_entropy(a(x), y).backward()
    g = [p.grad.clone() for p in a.parameters()]
    a2 = _model()
    a2.load_state_dict(a.state_dict())
    torch.nn.functional.cross_entropy(a2(x), y).backward()
    for u, p in zip(g, a2.parameters()):
        assert torch.equal(u, p.grad)


def test_grad_scaler_cpu():
    # GradScaler on CPU: step() after unscale_ sees the true gradients, so training with a scaler
    # (which never overflows here) matches training without one.
    a, b = _model(), _model()
    _train(a, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    _train(b)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bfloat16_model_step():
    model = _model(dtype=torch.bfloat16)
    _train(model, dtype=torch.bfloat16)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_round_trip(tmp_path):
    model = _model()
    hook = _train(model)
    path = tmp_path / "sr.pt"
    torch.save(hook.state_dict(), path)
    fresh = SparseRecoding(_model(5).parameters())
    assert not all(torch.equal(a, b) for a, b in zip(fresh.taus, hook.taus))
    fresh.load_state_dict(torch.load(path))
    for a, b in zip(fresh.taus, hook.taus):
        assert torch.equal(a, b)
    assert (fresh.boost, fresh.damp, fresh.shrink, fresh.tau_rate) == (hook.boost, hook.damp, hook.shrink, hook.tau_rate)
    with pytest.raises(ValueError, match="state_dict has 1 thresholds"):
        fresh.load_state_dict({**hook.state_dict(), "taus": [torch.tensor(1.0)]})


def test_hook_errors():
    with pytest.raises(ValueError, match="no tensor that requires grad"):
        SparseRecoding([torch.zeros(3)])
    with pytest.raises(ValueError, match="boost must be"):
        SparseRecoding(_model().parameters(), boost=0.9)
    hook = SparseRecoding(_model().parameters()).attach()
    with pytest.raises(RuntimeError, match="already attached"):
        hook.attach()
    hook.detach()


_DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from kdfast.methods.kr import SparseRecoding
    rank, world, port = int(sys.argv[1]), 2, sys.argv[2]
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + port, rank=rank, world_size=world)
    torch.set_num_threads(1)
    for mode in ("step", "attach"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        hook = SparseRecoding(model.parameters(), boost=2.0, damp=0.5, shrink=0.01, tau_rate=0.2)
        if mode == "attach":
            hook.attach()
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(4):
            x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            if mode == "step":
                hook.step()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()] + [torch.stack(hook.taus)])
        torch.save(flat, os.path.join({out!r}, mode + str(rank) + ".pt"))
    # Rank 0 hosts the TCP store: if it tears down first, rank 1's gloo threads abort ("terminate
    # called without an active exception", about 1 run in 5 on 2 cores). Meet before tearing down.
    del ddp
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _single_process():
    # The same training on one process: the mean of both ranks' batches is the DDP gradient.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    hook = SparseRecoding(model.parameters(), boost=2.0, damp=0.5, shrink=0.01, tau_rate=0.2)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    for _ in range(4):
        batches = [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for g in gens]
        opt.zero_grad()
        loss = sum(torch.nn.functional.cross_entropy(model(x), y) for x, y in batches) / 2
        loss.backward()
        hook.step()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()] + [torch.stack(hook.taus)])


def test_ddp_two_ranks_identical(tmp_path):
    # step() after backward, and attach() (recoding each rank's local gradient before DDP's
    # all-reduce), both give identical parameters on the two ranks, equal to one process that sees
    # both ranks' batches.
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(out=str(tmp_path)))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-3000:]
    expected = _single_process()
    for mode in ("step", "attach"):
        r0, r1 = torch.load(tmp_path / f"{mode}0.pt"), torch.load(tmp_path / f"{mode}1.pt")
        assert torch.equal(r0, r1), mode
        torch.testing.assert_close(r0, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_unaligned_views_and_determinism(dtype):
    # Views at odd storage offsets take the kernel's scalar path; several chunks per tensor; the
    # thresholds must come out bit-identical on every run (fixed-order reduction, no atomics).
    sizes = [40001, 3, 16384 * 2 + 7]
    base_p = [torch.randn(n + 1, device="cuda", dtype=torch.float64).to(dtype) for n in sizes]
    base_g = [torch.randn(n + 1, device="cuda", dtype=torch.float64).to(dtype) for n in sizes]
    params, grads = [b[1:] for b in base_p], [b[1:] for b in base_g]
    taus = torch.stack([p.float().abs().mean() for p in params])
    runs = []
    for _ in range(2):
        t = taus.clone()
        g = [torch.empty(x.numel() + 1, device="cuda", dtype=dtype)[1:].copy_(x) for x in grads]  # unaligned
        ops.sparse_recoding_(g, params, t, **PARAMS)
        runs.append((g, t))
    ref_g, ref_t = [x.clone() for x in grads], taus.clone()
    reference.sparse_recoding_(ref_g, params, ref_t, **PARAMS)
    assert torch.equal(runs[0][1], runs[1][1])
    for a, b, r in zip(runs[0][0], runs[1][0], ref_g):
        assert torch.equal(a, b)
        tol = dict(rtol=1e-14, atol=1e-15) if dtype == torch.float64 else dict(rtol=torch.finfo(dtype).eps, atol=1e-6)
        torch.testing.assert_close(a, r, **tol)
    torch.testing.assert_close(runs[0][1], ref_t, rtol=1e-5, atol=0)


@pytest.mark.needs_cuda
def test_cuda_hook_matches_cpu():
    model = _model()
    x, y = _batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    cuda_model = _model().cuda()
    cuda_model.load_state_dict(model.state_dict())
    for p, q in zip(model.parameters(), cuda_model.parameters()):
        q.grad = p.grad.cuda()
    a = SparseRecoding(model.parameters(), boost=2.0, damp=0.3, shrink=0.001, tau_rate=0.5)
    b = SparseRecoding(cuda_model.parameters(), boost=2.0, damp=0.3, shrink=0.001, tau_rate=0.5)
    a.step()
    b.step()
    for p, q in zip(model.parameters(), cuda_model.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-6, atol=1e-7)
    for s, t in zip(a.taus, b.taus):
        torch.testing.assert_close(t.cpu(), s, rtol=1e-6, atol=0)


def test_hook_grad_in_other_layout():
    # A .grad set by hand in another layout than its parameter is recoded through a copy.
    p = torch.nn.Parameter(torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last))
    g = torch.randn(4, 3, 3, 3)
    p.grad = g.clone()
    hook = SparseRecoding([p], boost=2.0, damp=0.5, shrink=0.01, tau_rate=0.1)
    ref_g, ref_t = [g.clone()], torch.stack(hook.taus).clone()
    hook.step()
    reference.sparse_recoding_(ref_g, [p.detach()], ref_t, 2.0, 0.5, 0.01, 0.1)
    torch.testing.assert_close(p.grad, ref_g[0])
    torch.testing.assert_close(hook.taus[0], ref_t[0])
