// Device code of sparse_recoding_ (sparse_recoding_kernel.cu launches it): two launches for the whole
// list, whatever its length.
//  1. recode_chunks_kernel: one block per fixed-size chunk of one tensor (chunk table in device
//     memory). It applies the rule of kdfast/sparse_recoding.h to its chunk (16-byte vector loads
//     when both pointers allow) and writes the block's sum of |theta| to partial[chunk].
//  2. update_taus_kernel: one block per tensor adds that tensor's partials (fixed-order tree, no
//     atomics, so the thresholds are deterministic) and moves its threshold.
// No ATen here: tests/emulator runs these kernels on the CPU.
#pragma once

#include <cstdint>

#include "device.cuh"
#include "kdfast/sparse_recoding.h"
#include "kernels.cuh"

namespace kdfast {
namespace cuda {
namespace recoding {

// Elements per block of recode_chunks_kernel.
constexpr int64_t kChunk = 1 << 14;

// Offsets of the sections of the int64 table [theta ptrs | grad ptrs | numels | chunk tensor |
// chunk start | first chunk per tensor (n + 1)].
struct TableLayout {
  int64_t n, chunks;
  __host__ __device__ int64_t theta(int64_t t) const { return t; }
  __host__ __device__ int64_t grad(int64_t t) const { return n + t; }
  __host__ __device__ int64_t numel(int64_t t) const { return 2 * n + t; }
  __host__ __device__ int64_t chunk_tensor(int64_t c) const { return 3 * n + c; }
  __host__ __device__ int64_t chunk_start(int64_t c) const { return 3 * n + chunks + c; }
  __host__ __device__ int64_t first_chunk(int64_t t) const { return 3 * n + 2 * chunks + t; }
  int64_t size() const { return 4 * n + 2 * chunks + 1; }
};

template <typename T, int N>
struct alignas(16) Pack {
  T val[N];
};

template <typename scalar_t, typename acc_t>
__global__ void recode_chunks_kernel(const int64_t* __restrict__ table, TableLayout layout,
                                     const float* __restrict__ taus, acc_t boost, acc_t damp, acc_t shrink,
                                     acc_t* __restrict__ partial) {
  __shared__ acc_t shared[kThreads / kWarp];
  const int64_t c = blockIdx.x;
  const int64_t t = table[layout.chunk_tensor(c)];
  const int64_t start = table[layout.chunk_start(c)];
  const int64_t remaining = table[layout.numel(t)] - start;
  const int64_t len = remaining < kChunk ? remaining : kChunk;
  const scalar_t* theta = reinterpret_cast<const scalar_t*>(table[layout.theta(t)]) + start;
  scalar_t* g = reinterpret_cast<scalar_t*>(table[layout.grad(t)]) + start;
  const acc_t tau = static_cast<acc_t>(taus[t]);

  acc_t sum = 0;
  int64_t scalar_from = 0;
  constexpr int kVec = 16 / sizeof(scalar_t);
  using VecT = Pack<scalar_t, kVec>;
  if (reinterpret_cast<uintptr_t>(theta) % 16 == 0 && reinterpret_cast<uintptr_t>(g) % 16 == 0) {
    const int64_t vectors = len / kVec;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      const VecT th = reinterpret_cast<const VecT*>(theta)[v];
      VecT gv = reinterpret_cast<VecT*>(g)[v];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t x = static_cast<acc_t>(th.val[k]);
        gv.val[k] = static_cast<scalar_t>(
            sparse_recoding::recode<acc_t>(static_cast<acc_t>(gv.val[k]), x, tau, boost, damp, shrink));
        sum += sparse_recoding::magnitude(x);
      }
      reinterpret_cast<VecT*>(g)[v] = gv;
    }
    scalar_from = vectors * kVec;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < len; i += blockDim.x) {
    const acc_t x = static_cast<acc_t>(theta[i]);
    g[i] = static_cast<scalar_t>(sparse_recoding::recode<acc_t>(static_cast<acc_t>(g[i]), x, tau, boost, damp, shrink));
    sum += sparse_recoding::magnitude(x);
  }
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) partial[c] = sum;
}

template <typename acc_t>
__global__ void update_taus_kernel(const int64_t* __restrict__ table, TableLayout layout,
                                   const acc_t* __restrict__ partial, double tau_rate, float* __restrict__ taus) {
  __shared__ double shared[kThreads / kWarp];
  const int64_t t = blockIdx.x;
  const int64_t first = table[layout.first_chunk(t)], last = table[layout.first_chunk(t + 1)];
  double sum = 0;
  for (int64_t c = first + threadIdx.x; c < last; c += blockDim.x) sum += static_cast<double>(partial[c]);
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) {
    taus[t] = sparse_recoding::next_tau(taus[t], sum, static_cast<long long>(table[layout.numel(t)]), tau_rate);
  }
}

}  // namespace recoding
}  // namespace cuda
}  // namespace kdfast
