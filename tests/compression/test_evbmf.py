"""EVBMF rank selection: planted ranks are recovered, the noise variance is estimated, edge cases
and bad arguments give sensible results or clear errors."""
import math

import numpy as np
import pytest
import torch

from kdfast.evbmf import adjust_rank, evbmf, evbmf_ranks, tucker2_ranks


def planted(L, M, rank, noise, strength=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = (torch.randn(L, rank, generator=g, dtype=torch.float64) * strength) @ torch.randn(
        rank, M, generator=g, dtype=torch.float64
    )
    return low + noise * torch.randn(L, M, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("L, M, rank", [(40, 120, 5), (64, 64, 12), (150, 30, 7), (9, 200, 3)])
def test_recovers_planted_rank_and_noise(L, M, rank):
    noise = 0.1
    res = evbmf(planted(L, M, rank, noise))
    assert res.rank == rank
    assert res.sigma2 == pytest.approx(noise**2, rel=0.15)
    assert res.singular_values.shape == (rank,)


def test_pure_noise_has_rank_zero():
    res = evbmf(torch.randn(50, 80, dtype=torch.float64))
    assert res.rank == 0
    assert res.sigma2 == pytest.approx(1.0, rel=0.15)


def test_transpose_and_scale_invariance():
    Y = planted(30, 90, 4, 0.2)
    base = evbmf(Y)
    t = evbmf(Y.T)
    assert t.rank == base.rank
    assert t.sigma2 == pytest.approx(base.sigma2, rel=1e-6)
    # small weights (conv-like magnitudes): same rank, sigma2 scales with the square
    small = evbmf(Y * 1e-3)
    assert small.rank == base.rank
    assert small.sigma2 == pytest.approx(base.sigma2 * 1e-6, rel=1e-4)
    np.testing.assert_allclose(small.singular_values, base.singular_values * 1e-3, rtol=1e-4)
    # numpy input and float32 tensors are accepted
    assert evbmf(Y.numpy()).rank == base.rank
    assert evbmf(Y.float()).rank == base.rank


def test_shrinkage_formula_with_known_sigma2():
    L, M, sigma2 = 20, 50, 0.04
    Y = planted(L, M, 3, math.sqrt(sigma2))
    res = evbmf(Y, sigma2=sigma2)
    s = torch.linalg.svdvals(Y).numpy()
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    threshold = math.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    assert res.rank == int((s > threshold).sum()) == 3
    assert res.sigma2 == sigma2
    g = s[:3]
    expected = g / 2 * (1 - (L + M) * sigma2 / g**2 + np.sqrt((1 - (L + M) * sigma2 / g**2) ** 2 - 4 * L * M * sigma2**2 / g**4))
    np.testing.assert_allclose(res.singular_values, expected, rtol=1e-10)
    assert (res.singular_values < g).all()
    # a huge known noise level kills every component
    assert evbmf(Y, sigma2=1e6).rank == 0


def test_H_limits_the_components():
    Y = planted(40, 60, 6, 0.1)
    res = evbmf(Y, H=10)
    assert res.rank == 6
    assert evbmf(Y, H=3).rank == 3


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5)])
def test_tiny_matrices(shape):
    res = evbmf(torch.randn(shape, dtype=torch.float64))
    assert 0 <= res.rank <= min(shape)
    assert res.sigma2 > 0 and math.isfinite(res.sigma2)


def test_zero_and_exactly_low_rank_matrices():
    assert evbmf(torch.zeros(4, 6)).rank == 0
    exact = planted(20, 30, 4, noise=0.0)
    assert evbmf(exact).rank == 4


def planted_kernel(O, C, k, r_out, r_in, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, k, k, generator=g, dtype=torch.float64)
    u_out = torch.linalg.qr(torch.randn(O, r_out, generator=g, dtype=torch.float64))[0]
    u_in = torch.linalg.qr(torch.randn(C, r_in, generator=g, dtype=torch.float64))[0]
    w = torch.einsum("abhw,oa,cb->ochw", core, u_out, u_in)
    return w + noise * torch.randn(O, C, k, k, generator=g, dtype=torch.float64)


def test_tucker2_ranks_of_planted_kernel():
    w = planted_kernel(32, 24, 3, 6, 10, noise=0.01)
    assert evbmf_ranks(w) == (6, 10)
    assert tucker2_ranks(w, align=1) == (6, 10)
    assert tucker2_ranks(w) == (8, 16)  # rounded up to multiples of 8
    assert tucker2_ranks(w, weaken=1.0) == (32, 24)
    # ceil(6 + 0.5 * 26) = 19 -> 24; ceil(10 + 0.5 * 14) = 17 -> 24 (= full)
    assert tucker2_ranks(w, weaken=0.5) == (24, 24)
    assert tucker2_ranks(w, weaken=0.5, align=1) == (19, 17)
    assert tucker2_ranks(w, min_rank=12, align=1) == (12, 12)
    assert tucker2_ranks(w.float()) == (8, 16)


def test_rank_zero_becomes_min_rank_and_never_exceeds_full():
    noise_only = torch.randn(20, 12, 3, 3)
    assert evbmf_ranks(noise_only) == (0, 0)
    assert tucker2_ranks(noise_only, align=1) == (1, 1)
    assert tucker2_ranks(noise_only, min_rank=5, align=1) == (5, 5)
    assert tucker2_ranks(noise_only) == (8, 8)
    assert tucker2_ranks(noise_only, min_rank=30, align=1) == (20, 12)  # capped at full rank
    assert tucker2_ranks(torch.randn(3, 2, 3, 3), align=8) == (3, 2)


def test_adjust_rank():
    assert adjust_rank(0, 64) == 8
    assert adjust_rank(9, 64) == 16
    assert adjust_rank(61, 62) == 62
    assert adjust_rank(5, 64, weaken=1.0, align=1) == 64
    assert adjust_rank(5, 5, align=16) == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weaken": -0.1}, "weaken must be a number in \\[0, 1\\]"),
        ({"weaken": 1.5}, "weaken"),
        ({"weaken": "no"}, "weaken"),
        ({"min_rank": 0}, "min_rank must be an int >= 1"),
        ({"min_rank": 2.0}, "min_rank"),
        ({"align": 0}, "align must be an int >= 1"),
    ],
)
def test_bad_rank_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tucker2_ranks(torch.randn(8, 8, 3, 3), **kwargs)


def test_bad_matrices():
    with pytest.raises(TypeError, match="Y must be a torch.Tensor or numpy.ndarray"):
        evbmf([[1.0, 2.0]])
    with pytest.raises(ValueError, match="Y must be a 2-D matrix"):
        evbmf(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="Y is empty"):
        evbmf(torch.randn(0, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        evbmf(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="sigma2 must be a positive"):
        evbmf(torch.randn(3, 4), sigma2=0.0)
    with pytest.raises(ValueError, match="H must be an int in \\[1, 3\\]"):
        evbmf(torch.randn(3, 4), H=4)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        tucker2_ranks(np.zeros((4, 4, 3, 3)))
    with pytest.raises(ValueError, match="weight must have at least 2 dims"):
        tucker2_ranks(torch.randn(4))
