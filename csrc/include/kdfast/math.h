// Scalar math shared by the CPU loops and the CUDA kernels, so the CUDA kernels' arithmetic is
// exercised by the CPU test-suite too. Keep these free of ATen types.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KDFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KDFAST_HOST_DEVICE inline
#endif

namespace kdfast {
namespace math {

template <typename acc_t>
KDFAST_HOST_DEVICE acc_t exp_(acc_t x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// Gaussian kernel exp(-||x - y||^2 / (2 sigma^2)) from x.y and the two squared norms.
// ||x - y||^2 is clamped at 0: rounding can push it slightly negative for x == y.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t gaussian_kernel(acc_t dot, acc_t sqnorm_x, acc_t sqnorm_y, acc_t inv_two_sigma_sq) {
  acc_t dist_sq = sqnorm_x + sqnorm_y - acc_t(2) * dot;
  dist_sq = dist_sq > acc_t(0) ? dist_sq : acc_t(0);
  return exp_(-dist_sq * inv_two_sigma_sq);
}

// The diagonal entry w * k(x_p, x_p) of a weighted gaussian row, set exactly instead of through the
// Gram identity: k(x, x) = 1, and the backward drops it (0), since its two gradient terms
// w_p k_pp x_p - (w_p k_pp) x_p cancel exactly but not in floating point (badly at small sigma).
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t gaussian_diagonal(acc_t weight, bool keep_diagonal) {
  return keep_diagonal ? weight : acc_t(0);
}

// Row normalisation x_hat = f / max(||f||, eps) (torch.nn.functional.normalize).
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t inverse_clamped_norm(acc_t norm, acc_t eps) {
  return acc_t(1) / (norm > eps ? norm : eps);
}

// Its backward for one row: with g = dL/dx_hat and r = 1 / max(||f||, eps),
//   dL/df = r * (g - f * r^2 (f.g))   when ||f|| >= eps (clamp_min passes the gradient at equality),
//   dL/df = r * g                      when ||f|| <  eps (the norm is a constant there).
// `projection_coefficient` gives the r^2 (f.g) factor (0 for clamped rows).
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t projection_coefficient(acc_t f_dot_g, acc_t norm, acc_t rnorm, acc_t eps) {
  return norm >= eps ? rnorm * rnorm * f_dot_g : acc_t(0);
}

template <typename acc_t>
KDFAST_HOST_DEVICE acc_t normalize_backward(acc_t g, acc_t f, acc_t rnorm, acc_t projection, acc_t scale) {
  return scale * rnorm * (g - f * projection);
}

}  // namespace math
}  // namespace kdfast
