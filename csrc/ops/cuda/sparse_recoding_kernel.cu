// sparse_recoding_ on CUDA, the host side: two launches for the whole list, whatever its length (the
// kernels are in sparse_recoding_kernels.cuh, ATen-free, so tests/emulator runs them on the CPU).
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
#include "sparse_recoding_kernels.cuh"

namespace kdfast {
namespace {

using cuda::recoding::kChunk;
using cuda::recoding::TableLayout;

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
      cuda::recoding::recode_chunks_kernel<scalar_t, acc_t><<<layout.chunks, cuda::kThreads, 0, stream>>>(
          table.data_ptr<int64_t>(), layout, taus.data_ptr<float>(), static_cast<acc_t>(boost),
          static_cast<acc_t>(damp), static_cast<acc_t>(shrink), partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    cuda::recoding::update_taus_kernel<acc_t><<<n, cuda::kThreads, 0, stream>>>(table.data_ptr<int64_t>(), layout,
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
