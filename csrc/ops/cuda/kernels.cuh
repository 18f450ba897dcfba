// Raw CUDA kernels behind CudaPrimitives (primitives.cu). No ATen here, so the file compiles with
// plain nvcc too; the arithmetic comes from kdfast/math.h, which the CPU loops share.
#pragma once

#include <cstdint>

#include "device.cuh"
#include "kdfast/math.h"

namespace kdfast {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// Sum of `value` over the block; every thread gets the result. `shared` holds kThreads / kWarp values.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t value, acc_t* shared) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < blockDim.x / kWarp ? shared[lane] : acc_t(0);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
    if (lane == 0) shared[0] = value;
  }
  __syncthreads();
  value = shared[0];
  __syncthreads();  // `shared` may be reused right after
  return value;
}

// grid.y is at most this (the hardware limit); kernels with more rows loop over them.
constexpr int64_t kMaxGridY = 65535;

// partial[row * chunks + chunk] = sum of squares of x[row, chunk * chunk_len : (chunk + 1) * chunk_len].
// grid (chunks, min(rows, kMaxGridY)); a block handles rows blockIdx.y, blockIdx.y + gridDim.y, ...
template <typename scalar_t>
__global__ void sum_of_squares_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t n, int64_t chunk_len,
                                      scalar_t* __restrict__ partial) {
  __shared__ scalar_t shared[kThreads / kWarp];
  const int64_t start = blockIdx.x * chunk_len;
  const int64_t end = start + chunk_len < n ? start + chunk_len : n;
  // The row loop depends on blockIdx only: every thread of the block runs the same iterations, so
  // block_sum's barriers are reached by all of them.
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const scalar_t* data = x + row * n;
    scalar_t acc = 0;
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) acc += data[i] * data[i];
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) partial[row * gridDim.x + blockIdx.x] = acc;
  }
}

// One block per row of dots (nb * rows rows of `cols`): dots <- w_q * gaussian kernel, row_sums <- sum;
// row r's diagonal (column diag_col0 + r % rows) is set exactly (math::gaussian_diagonal).
template <typename acc_t>
__global__ void gaussian_rows_kernel(acc_t* __restrict__ dots, const acc_t* __restrict__ sqnorm_rows,
                                     const acc_t* __restrict__ sqnorm_cols, const acc_t* __restrict__ col_weights,
                                     int64_t rows, int64_t cols, acc_t inv_two_sigma_sq, int64_t diag_col0,
                                     bool keep_diagonal, acc_t* __restrict__ row_sums) {
  __shared__ acc_t shared[kThreads / kWarp];
  const int64_t r = blockIdx.x, n = r / rows, diag = diag_col0 + r % rows;
  acc_t* row = dots + r * cols;
  const acc_t* sqcol = sqnorm_cols + n * cols;
  const acc_t sqrow = sqnorm_rows[r];
  acc_t total = 0;
  for (int64_t q = threadIdx.x; q < cols; q += blockDim.x) {
    const acc_t v = q == diag ? math::gaussian_diagonal<acc_t>(col_weights[q], keep_diagonal)
                              : col_weights[q] * math::gaussian_kernel<acc_t>(row[q], sqrow, sqcol[q], inv_two_sigma_sq);
    row[q] = v;
    total += v;
  }
  total = block_sum(total, shared);
  if (threadIdx.x == 0) row_sums[r] = total;
}

// Strides of a (B, C, HW) view, in elements.
struct RowStrides {
  int64_t batch, channel, position;
};

// One block per (n, c) row: grad_f = scale[n] * d normalize(f) / df applied to row_scale[row] * g
// (row_scale may be null: all ones; see kdfast/math.h).
template <typename in_t, typename acc_t>
__global__ void normalize_rows_backward_kernel(const acc_t* __restrict__ g, RowStrides gs,
                                               const acc_t* __restrict__ row_scale, const in_t* __restrict__ f,
                                               RowStrides fs, const acc_t* __restrict__ norms,
                                               const acc_t* __restrict__ scale, int64_t channels, int64_t hw,
                                               acc_t eps, in_t* __restrict__ out) {
  __shared__ acc_t shared[kThreads / kWarp];
  const int64_t row = blockIdx.x, n = row / channels, c = row % channels;
  const acc_t* gr = g + n * gs.batch + c * gs.channel;
  const in_t* fr = f + n * fs.batch + c * fs.channel;
  acc_t dot = 0;
  for (int64_t s = threadIdx.x; s < hw; s += blockDim.x)
    dot += static_cast<acc_t>(fr[s * fs.position]) * gr[s * gs.position];
  const acc_t factor = row_scale != nullptr ? row_scale[row] : acc_t(1);
  dot = factor * block_sum(dot, shared);
  const acc_t norm = norms[row];
  const acc_t rnorm = math::inverse_clamped_norm<acc_t>(norm, eps);
  const acc_t proj = math::projection_coefficient<acc_t>(dot, norm, rnorm, eps);
  in_t* o = out + row * hw;
  for (int64_t s = threadIdx.x; s < hw; s += blockDim.x)
    o[s] = static_cast<in_t>(
        math::normalize_backward<acc_t>(factor * gr[s * gs.position], static_cast<acc_t>(fr[s * fs.position]), rnorm,
                                        proj, scale[n]));
}

}  // namespace cuda
}  // namespace kdfast
