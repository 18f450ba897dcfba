// sparse_recoding_ on CUDA: two launches for the whole list, whatever its length.
//  1. recode_chunks_kernel: one block per fixed-size chunk of one tensor (chunk table in device
//     memory). It applies the rule of kdfast/sparse_recoding.h to its chunk (16-byte vector loads
//     when both pointers allow) and writes the block's sum of |theta| to partial[chunk].
//  2. update_taus_kernel: one block per tensor adds that tensor's partials (fixed-order tree, no
//     atomics, so the thresholds are deterministic) and moves its threshold.
// Compile-checked only (tools/check_cuda_compile.py); never run on a GPU in development, so it runs
// only where kernel_paths.h enables it (the ATen path otherwise). It uploads its table from host
// memory, which a CUDA graph would replay from a freed buffer: it refuses to run under capture.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../kernel_paths.h"
#include "../sparse_recoding_impl.h"
#include "kdfast/sparse_recoding.h"
#include "kernels.cuh"

namespace kdfast {
namespace {

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
  __shared__ acc_t shared[cuda::kThreads / cuda::kWarp];
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
  sum = cuda::block_sum(sum, shared);
  if (threadIdx.x == 0) partial[c] = sum;
}

template <typename acc_t>
__global__ void update_taus_kernel(const int64_t* __restrict__ table, TableLayout layout,
                                   const acc_t* __restrict__ partial, double tau_rate, float* __restrict__ taus) {
  __shared__ double shared[cuda::kThreads / cuda::kWarp];
  const int64_t t = blockIdx.x;
  const int64_t first = table[layout.first_chunk(t)], last = table[layout.first_chunk(t + 1)];
  double sum = 0;
  for (int64_t c = first + threadIdx.x; c < last; c += blockDim.x) sum += static_cast<double>(partial[c]);
  sum = cuda::block_sum(sum, shared);
  if (threadIdx.x == 0) {
    taus[t] = sparse_recoding::next_tau(taus[t], sum, static_cast<long long>(table[layout.numel(t)]), tau_rate);
  }
}

void sparse_recoding_cuda(at::TensorList grads, at::TensorList params, const at::Tensor& taus, double boost,
                          double damp, double shrink, double tau_rate) {
  sparse_recoding::check_args(grads, params, taus, boost, damp, shrink, tau_rate);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  if (!paths::use_kernel(paths::kSparseRecoding, grads[0])) {
    sparse_recoding::sparse_recoding_aten(grads, params, taus, boost, damp, shrink, tau_rate);
    return;
  }
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "kdfast.ops.sparse_recoding_: the hand-written CUDA kernel (enabled by KDFAST_CUDA_KERNELS) cannot be "
              "captured in a CUDA graph: it uploads its pointer table from host memory. Leave sparse_recoding_ out "
              "of KDFAST_CUDA_KERNELS to use the ATen path, which is capture-safe.");
  const auto plan = sparse_recoding::make_chunk_plan(params, kChunk);
  const int64_t n = static_cast<int64_t>(grads.size());
  const TableLayout layout{n, plan.num_chunks()};

  // The table goes to the device through pinned memory: an asynchronous copy on the current stream
  // (the caching host allocator keeps the buffer alive until the copy is done).
  at::Tensor host = at::empty({layout.size()}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) {
    h[layout.theta(t)] = reinterpret_cast<int64_t>(params[t].data_ptr());
    h[layout.grad(t)] = reinterpret_cast<int64_t>(grads[t].data_ptr());
    h[layout.numel(t)] = params[t].numel();
    h[layout.first_chunk(t)] = plan.tensor_first_chunk[t];
  }
  h[layout.first_chunk(n)] = plan.tensor_first_chunk[n];
  for (int64_t c = 0; c < layout.chunks; ++c) {
    h[layout.chunk_tensor(c)] = plan.chunk_tensor[c];
    h[layout.chunk_start(c)] = plan.chunk_start[c];
  }
  const at::Tensor table = host.to(grads[0].device(), /*non_blocking=*/true);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "kdfast_sparse_recoding_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({std::max<int64_t>(layout.chunks, 1)},
                                   taus.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (layout.chunks > 0) {
      recode_chunks_kernel<scalar_t, acc_t><<<layout.chunks, cuda::kThreads, 0, stream>>>(
          table.data_ptr<int64_t>(), layout, taus.data_ptr<float>(), static_cast<acc_t>(boost),
          static_cast<acc_t>(damp), static_cast<acc_t>(shrink), partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    update_taus_kernel<acc_t><<<n, cuda::kThreads, 0, stream>>>(table.data_ptr<int64_t>(), layout,
                                                                partial.data_ptr<acc_t>(), tau_rate,
                                                                taus.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("sparse_recoding_", &kdfast::sparse_recoding_cuda);
}
