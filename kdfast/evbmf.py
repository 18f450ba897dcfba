"""Empirical variational Bayesian matrix factorisation (EVBMF) for choosing Tucker-2 ranks.

EVBMF (Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of fully-observed variational
Bayesian matrix factorization", JMLR 14, 2013) gives the global VB solution of Y = B A^T + noise in
closed form: it keeps the singular components above a threshold that depends on the noise variance
sigma^2, and estimates sigma^2 itself by minimising the free energy over a bounded interval. Kim et
al. (ICLR 2016, arXiv 1511.06530) run it on the output-mode and input-mode unfoldings of a conv
kernel to pick the Tucker-2 ranks; MUSCO (musco-ai/musco-pytorch) adds "weakening" towards full rank.
The procedure below follows Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of fully-observed
variational Bayesian matrix factorization" (JMLR 2013), as the Python ports of Nakajima's MATLAB code used by
jacobgil/pytorch-tensor-decompositions and musco-ai/musco-pytorch compute it; the code is written from the formulas.

    evbmf(Y) -> EVBMFResult(rank, singular_values, sigma2)
    tucker2_ranks(conv.weight, weaken=0.0, min_rank=1, align="auto") -> (r_out, r_in)
    choose_ranks(conv.weight, ...) -> RankChoice(evbmf=(r_out, r_in) as EVBMF chose them, ranks=(r_out, r_in))

Alignment: rounding ranks up to a multiple of 8 suits tensor cores, but on small layers it replaces
EVBMF's choice by a coarser one (every layer of a small ResNet got (8, 8)). ``align="auto"`` (the
default) rounds up to a multiple of 8 only where that adds at most a quarter to the rank (ranks from
about 28 up); smaller ranks stay as EVBMF chose them. ``align=8`` rounds always, ``align=1`` never.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import minimize_scalar

# Approximate zero crossing of the EVB free-energy difference, times sqrt(alpha) (Nakajima's code).
TAU_BAR_COEF = 2.5129


def single_threaded_blas():
    """Context limiting numpy's BLAS/LAPACK to one thread (threadpoolctl, a scikit-learn dependency).

    The SVDs here are small (at most ~512 x 4608); multithreaded OpenBLAS on a busy machine made a
    64 x 576 SVD take 0.2-0.5 s instead of 5 ms (measured, 2 shared cores), so one thread is faster.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class EVBMFResult(NamedTuple):
    """rank: number of kept components; singular_values: their VB-shrunk values (length rank,
    descending); sigma2: noise variance (estimated, or the one given)."""

    rank: int
    singular_values: np.ndarray
    sigma2: float


def _as_matrix(Y, name: str) -> np.ndarray:
    if isinstance(Y, torch.Tensor):
        Y = Y.detach().to(device="cpu", dtype=torch.float64).numpy()
    elif isinstance(Y, np.ndarray):
        Y = Y.astype(np.float64, copy=False)
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(Y).__name__}")
    if Y.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got {Y.ndim}-D of shape {tuple(Y.shape)}")
    if Y.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(Y.shape)}); expected at least 1x1")
    if not np.isfinite(Y).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return Y


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """Positive root tau of x = (1 + tau)(1 + alpha / tau) (defined for x > x_bar)."""
    d = x - (1.0 + alpha)
    return 0.5 * (d + np.sqrt(np.maximum(d * d - 4.0 * alpha, 0.0)))


def _free_energy(sigma2: float, L: int, M: int, s2: np.ndarray, residual: float, x_bar: float) -> float:
    """EVB free energy as a function of sigma^2 (up to constants), Omega(sigma^2) of Nakajima et al. (JMLR 2013)."""
    H = s2.shape[0]
    alpha = L / M
    x = s2 / (M * sigma2)
    small, large = x[x <= x_bar], x[x > x_bar]
    tau = _tau(large, alpha)
    return float(
        np.sum(small - np.log(small))
        + np.sum(large - tau + np.log((tau + 1.0) / large) + alpha * np.log(tau / alpha + 1.0))
        + residual / (M * sigma2)
        + (L - H) * math.log(sigma2)
    )


def evbmf(Y, sigma2: float | None = None, H: int | None = None) -> EVBMFResult:
    """EVBMF of a matrix Y (L x M; transposed internally when L > M, which changes nothing).

    Args:
        Y: 2-D torch.Tensor or numpy array (computed in float64 on the CPU).
        sigma2: noise variance; None estimates it (bounded 1-D minimisation of the free energy).
        H: number of singular components considered (default min(L, M)).
    Returns:
        EVBMFResult(rank, singular_values, sigma2): kept components, their shrunk singular values
        (Nakajima et al. NIPS 2012, eq. 15), and sigma^2 in Y's own scale.
    """
    Y = _as_matrix(Y, "Y")
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T  # the formulas assume L <= M
    L, M = Y.shape
    if H is None:
        H = L
    if not isinstance(H, (int, np.integer)) or isinstance(H, bool) or not 1 <= H <= L:
        raise ValueError(f"H must be an int in [1, {L}] (the smaller side of Y), got {H!r}")
    if sigma2 is not None:
        if isinstance(sigma2, bool) or not isinstance(sigma2, (int, float)) or not (sigma2 > 0 and math.isfinite(sigma2)):
            raise ValueError(f"sigma2 must be a positive finite number or None, got {sigma2!r}")

    total_energy = float(np.sum(Y * Y))
    if total_energy == 0.0:
        return EVBMFResult(0, np.zeros(0), float(sigma2) if sigma2 is not None else 0.0)

    # Work on Y / scale with mean squared entry 1: EVBMF is scale-equivariant (rank unchanged, sigma2
    # scales with scale^2), and the bounded search's absolute tolerance would otherwise be too coarse
    # for small conv weights (entries ~1e-2 give sigma2 ~1e-5).
    scale2 = total_energy / (L * M)
    # Squared singular values as eigenvalues of the L x L Gram matrix: several times cheaper than an
    # SVD of the wide L x M unfolding, and float64 keeps them accurate far below the EVBMF threshold.
    with single_threaded_blas():
        s2 = np.clip(np.linalg.eigvalsh(Y @ Y.T)[::-1][:H], 0.0, None) / scale2
    residual = max(L * M - float(np.sum(s2)), 0.0) if H < L else 0.0
    alpha = L / M
    tau_bar = TAU_BAR_COEF * math.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    if sigma2 is None:
        # Exact zeros (rank-deficient Y) would make -log(x) infinite; they always stay in the
        # "small" set, where flooring them only adds a constant to the free energy.
        s2_floor = np.maximum(s2, 1e-300)
        upper = (float(np.sum(s2)) + residual) / (L * M)
        h_hat = min(math.ceil(L / (1.0 + alpha)) - 1, H) - 1
        k = min(h_hat + 1, H - 1)
        lower = max(s2[k] / (M * x_bar), float(np.mean(s2[k:])) / M)
        lower = max(lower, upper * 1e-12)  # an exactly low-rank Y would give lower = 0
        if lower >= upper:
            sigma2_n = upper
        else:
            opt = minimize_scalar(
                _free_energy, args=(L, M, s2_floor, residual, x_bar), bounds=(lower, upper), method="bounded",
                options={"xatol": 1e-10 * upper},
            )
            sigma2_n = float(opt.x)
    else:
        sigma2_n = float(sigma2) / scale2

    threshold2 = M * sigma2_n * (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    kept = s2[s2 > threshold2]
    rank = int(kept.shape[0])
    a = 1.0 - (L + M) * sigma2_n / kept
    shrunk2_sqrt = np.sqrt(np.maximum(a * a - 4.0 * L * M * sigma2_n**2 / kept**2, 0.0))
    shrunk = 0.5 * np.sqrt(kept) * (a + shrunk2_sqrt) * math.sqrt(scale2)
    return EVBMFResult(rank, shrunk, sigma2_n * scale2)


def _check_weight(weight) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims (out, in, ...), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)})")
    return weight.detach().to(device="cpu", dtype=torch.float64)


def evbmf_ranks(weight) -> tuple[int, int]:
    """Raw EVBMF ranks (r_out, r_in) of a conv weight (O, C, kh, kw): EVBMF on the mode-0 unfolding
    (O x C kh kw) and the mode-1 unfolding (C x O kh kw), as in Kim et al. 2016. May be 0."""
    w = _check_weight(weight)
    mode0 = w.reshape(w.shape[0], -1)
    mode1 = w.transpose(0, 1).reshape(w.shape[1], -1)
    return evbmf(mode0).rank, evbmf(mode1).rank


AUTO_ALIGN = 8              # align="auto": the multiple (tensor-core friendly) ...
AUTO_MAX_INCREASE = 0.25    # ... used only where it adds at most this fraction to the rank


def adjust_rank(rank: int, full: int, weaken: float = 0.0, min_rank: int = 1, align="auto") -> int:
    """Weaken a selected rank towards full rank, clamp, and round up to a multiple of ``align``.

    r = ceil(rank + weaken * (full - rank)); then max(r, min_rank); then rounded UP to a multiple of
    align; finally capped at full. weaken=0 keeps the selected rank, weaken=1 gives full rank (MUSCO's
    ``vbmf_weakenen_factor`` f is weaken = 1 - f). ``align="auto"``: round up to a multiple of
    :data:`AUTO_ALIGN` only where that adds at most :data:`AUTO_MAX_INCREASE` of r (see the module docstring).
    """
    _check_rank_options(weaken, min_rank, align)
    r = math.ceil(rank + weaken * (full - rank) - 1e-9)
    r = max(r, min_rank)
    if align == "auto":
        rounded = -(-r // AUTO_ALIGN) * AUTO_ALIGN
        r = rounded if rounded - r <= AUTO_MAX_INCREASE * r else r
    else:
        r = -(-r // align) * align
    return max(1, min(r, full))


def _check_rank_options(weaken, min_rank, align) -> None:
    if isinstance(weaken, bool) or not isinstance(weaken, (int, float)) or not 0.0 <= weaken <= 1.0:
        raise ValueError(f"weaken must be a number in [0, 1] (0 = EVBMF rank, 1 = full rank), got {weaken!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an int >= 1, got {min_rank!r}")
    if align != "auto" and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
        raise ValueError(f"align must be 'auto' or an int >= 1 (1 = no rounding), got {align!r}")


class RankChoice(NamedTuple):
    """evbmf: the raw EVBMF ranks (r_out, r_in) (may be 0); ranks: after weakening, min_rank and alignment."""

    evbmf: tuple
    ranks: tuple


def choose_ranks(weight, weaken: float = 0.0, min_rank: int = 1, align="auto") -> RankChoice:
    """EVBMF's ranks of a conv weight and the ranks used (see :func:`tucker2_ranks`), so that a report
    can show what EVBMF chose before weakening, min_rank and alignment changed it."""
    _check_rank_options(weaken, min_rank, align)
    raw = evbmf_ranks(weight)
    return RankChoice(raw, (adjust_rank(raw[0], weight.shape[0], weaken, min_rank, align),
                            adjust_rank(raw[1], weight.shape[1], weaken, min_rank, align)))


def tucker2_ranks(weight, weaken: float = 0.0, min_rank: int = 1, align="auto") -> tuple[int, int]:
    """Tucker-2 ranks (r_out, r_in) of a conv weight (O, C, kh, kw) chosen by EVBMF.

    Each raw EVBMF rank (see :func:`evbmf_ranks`) goes through :func:`adjust_rank`: weakened towards
    full rank by ``weaken`` in [0, 1], raised to ``min_rank`` (so an EVBMF rank of 0 becomes
    min_rank), rounded up to a multiple of ``align`` ("auto", the default: a multiple of 8 only where
    that adds at most a quarter to the rank; an int: always that multiple) and capped at the full rank
    (O for r_out, C for r_in). The result is always in [1, full].
    """
    return choose_ranks(weight, weaken, min_rank, align).ranks
