// Device code of the sparse_codes forward (sparse_codes_kernel.cu launches it). No ATen here:
// tests/emulator runs the kernel on the CPU.
//
// One thread per pixel; the thread streams over the K codewords, computing z_j = x_p . c_j (x read as
// (D, P) so that a warp's loads are coalesced, C^T rows as broadcast loads), and keeps a running top-k
// (k <= kMaxK; larger k falls back to the ATen formulation); the sigmoid is evaluated for the k
// winners only (selection rule in kdfast/sparse_codes.h).
//
// The running top-k lives in dynamic shared memory, not in a per-thread array: topk_push indexes it
// with a data-dependent position, which the compiler cannot keep in registers, so a `float[32] +
// int64[32]` array was a 384-byte local-memory stack frame per thread (ptxas -v). Each thread owns a
// row of topk_row_stride(k) entries (odd, so the rows of a warp's 32 threads fall in distinct banks);
// codeword indices are int32 there (the launch checks K fits) and widen to int64 on output.
#pragma once

#include <cstddef>
#include <cstdint>

#include "device.cuh"
#include "kdfast/sparse_codes.h"

namespace kdfast {
namespace sparse_codes {

constexpr int kMaxK = 32;
constexpr int kThreadsPerBlock = 128;

// Entries per thread in the shared top-k (k rounded up to odd: conflict-free rows).
__host__ __device__ inline int topk_row_stride(int k) { return k | 1; }

// Dynamic shared memory of one block: kThreadsPerBlock rows of values (acc_t) then of indices (int32).
template <typename acc_t>
inline size_t topk_smem_bytes(int k) {
  return static_cast<size_t>(kThreadsPerBlock) * topk_row_stride(k) * (sizeof(acc_t) + sizeof(int32_t));
}

// grid ceil(pixels / kThreadsPerBlock), block kThreadsPerBlock, dynamic shared topk_smem_bytes<acc_t>(k).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock) sparse_codes_kernel(
    const acc_t* __restrict__ x_cols,  // (D, P): pixel p's features at x_cols[d * P + p]
    const acc_t* __restrict__ c_rows,  // (K, D): codeword j at c_rows[j * D]
    acc_t b, int64_t pixels, int64_t d, int64_t num_codewords, int k, scalar_t* __restrict__ values,
    int64_t* __restrict__ indices) {
  KDFAST_DYNAMIC_SHARED(unsigned char, topk_smem);
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pixels) return;
  const int stride = topk_row_stride(k);
  acc_t* best_v = reinterpret_cast<acc_t*>(topk_smem) + threadIdx.x * stride;
  int32_t* best_i = reinterpret_cast<int32_t*>(reinterpret_cast<acc_t*>(topk_smem) + blockDim.x * stride) +
                    threadIdx.x * stride;
  int filled = 0;
  for (int64_t j = 0; j < num_codewords; ++j) {
    const acc_t* cj = c_rows + j * d;
    acc_t z = 0;
    for (int64_t q = 0; q < d; ++q) z += x_cols[q * pixels + p] * __ldg(cj + q);
    topk_push<acc_t, int32_t>(z, static_cast<int32_t>(j), k, filled, best_v, best_i);
  }
  for (int i = 0; i < k; ++i) {
    values[p * k + i] = static_cast<scalar_t>(sigmoid<acc_t>(best_v[i] + b));
    indices[p * k + i] = best_i[i];
  }
}

}  // namespace sparse_codes
}  // namespace kdfast
