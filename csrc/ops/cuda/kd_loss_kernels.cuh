// Device code of the fused KD loss (kd_loss_kernel.cu launches it). No ATen here: tests/emulator runs
// these kernels on the CPU. Forward: one block per row; pass 1 block-max of s and t, pass 2 the
// exp-sums of kdfast/kd_loss_math.h (the second read of the row mostly hits L2), thread 0 writes the
// row's statistics. Backward: elementwise over B*K from the logits and the saved row statistics.
#pragma once

#include <cstdint>
#include <limits>

#include "device.cuh"
#include "kdfast/kd_loss_math.h"
#include "kernels.cuh"

namespace kdfast {
namespace cuda {

template <typename acc_t>
__device__ __forceinline__ acc_t block_max(acc_t value, acc_t* shared) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const acc_t other = __shfl_down_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < blockDim.x / kWarp ? shared[lane] : -std::numeric_limits<acc_t>::infinity();
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const acc_t other = __shfl_down_sync(0xffffffffu, value, offset);
      value = other > value ? other : value;
    }
    if (lane == 0) shared[0] = value;
  }
  __syncthreads();
  value = shared[0];
  __syncthreads();
  return value;
}

// Threads of the forward launch for rows of k logits: enough for ~8 elements each, a warp at least,
// kThreads at most.
inline int kd_forward_threads(int64_t k) {
  int threads = kWarp;
  while (threads < kThreads && threads * 8 < k) threads *= 2;
  return threads;
}

// grid (batch), block kd_forward_threads(k); stats (batch, kd::kNumStats).
template <typename in_t, typename acc_t>
__global__ void kd_forward_kernel(const in_t* __restrict__ s, int64_t s_stride, const in_t* __restrict__ t,
                                  int64_t t_stride, const int64_t* __restrict__ y, int64_t k, acc_t inv_t,
                                  bool need_ce, int64_t ignore_index, acc_t* __restrict__ stats) {
  __shared__ acc_t shared[kThreads / kWarp];
  const int64_t n = blockIdx.x;
  const in_t* sr = s + n * s_stride;
  const in_t* tr = t + n * t_stride;
  acc_t max_s = -std::numeric_limits<acc_t>::infinity(), max_t = max_s;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const acc_t vs = static_cast<acc_t>(sr[i]), vt = static_cast<acc_t>(tr[i]);
    max_s = vs > max_s ? vs : max_s;
    max_t = vt > max_t ? vt : max_t;
  }
  max_s = block_max(max_s, shared);
  max_t = block_max(max_t, shared);
  kd::ExpSums<acc_t> acc;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x)
    kd::accumulate<acc_t>(static_cast<acc_t>(sr[i]), static_cast<acc_t>(tr[i]), max_s, max_t, inv_t, need_ce, acc);
  acc.student_t = block_sum(acc.student_t, shared);
  acc.teacher_t = block_sum(acc.teacher_t, shared);
  acc.teacher_t_diff = block_sum(acc.teacher_t_diff, shared);
  if (need_ce) acc.student_1 = block_sum(acc.student_1, shared);
  if (threadIdx.x == 0) {
    acc_t* row_stats = stats + n * kd::kNumStats;
    kd::finish_row<acc_t>(max_s, max_t, acc, inv_t, need_ce, row_stats);
    acc_t ce = 0;
    if (need_ce && y[n] != ignore_index) {
      KDFAST_DEVICE_ASSERT(y[n] >= 0 && y[n] < k && "kd_loss: target out of range");
      ce = row_stats[kd::kLseStudent] - static_cast<acc_t>(sr[y[n]]);
    }
    row_stats[kd::kCe] = ce;
  }
}

// Grid-stride over batch * k; grad_s / grad_t may be null (not needed).
template <typename in_t, typename acc_t>
__global__ void kd_backward_kernel(const in_t* __restrict__ s, int64_t s_stride, const in_t* __restrict__ t,
                                   int64_t t_stride, const int64_t* __restrict__ y, int64_t batch, int64_t k,
                                   acc_t inv_t, const acc_t* __restrict__ stats, const acc_t* __restrict__ coefs,
                                   in_t* __restrict__ grad_s, in_t* __restrict__ grad_t) {
  const int64_t total = batch * k;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = idx / k, i = idx - n * k;
    const acc_t vs = static_cast<acc_t>(s[n * s_stride + i]), vt = static_cast<acc_t>(t[n * t_stride + i]);
    const acc_t* row_stats = stats + n * kd::kNumStats;
    const acc_t coef_kl = coefs[2 * n], coef_ce = coefs[2 * n + 1];
    if (grad_s != nullptr) {
      const bool need_ce = coef_ce != acc_t(0);
      const bool is_target = need_ce && y[n] == i;
      grad_s[idx] =
          static_cast<in_t>(kd::student_grad<acc_t>(vs, vt, inv_t, row_stats, coef_kl, coef_ce, need_ce, is_target));
    }
    if (grad_t != nullptr) grad_t[idx] = static_cast<in_t>(kd::teacher_grad<acc_t>(vs, vt, inv_t, row_stats, coef_kl));
  }
}

}  // namespace cuda
}  // namespace kdfast
