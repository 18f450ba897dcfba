// sparse_codes on CUDA. UNVERIFIED: this kernel has been compiled (tests/build/test_build.py) but never run
// on a GPU, so it is not the default: CUDA runs the ATen formulation of csrc/ops/sparse_codes_impl.h
// (chunked cuBLAS GEMM + stable sort) until the kernel table (csrc/ops/kernel_paths.cpp) marks it
// verified; KDFAST_CUDA_KERNELS=sparse_codes opts into this kernel for the forward. The backward always
// runs the ATen formulation on CUDA.
// The kernel is in sparse_codes_kernels.cuh (ATen-free, so tests/emulator runs it on the CPU).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../sparse_codes_impl.h"
#include "kdfast/sparse_codes.h"
#include "sparse_codes_kernels.cuh"

namespace kdfast {
namespace sparse_codes {
namespace {

std::tuple<at::Tensor, at::Tensor> forward_kernel(const at::Tensor& x, const at::Tensor& dictionary,
                                                  const at::Tensor& bias, int64_t k) {
  const int64_t n = x.size(0), d = x.size(1), h = x.size(2), w = x.size(3), pixels = n * h * w;
  const int64_t kk = dictionary.size(1);
  const auto acc = accumulate_type(x.scalar_type());
  const at::Tensor x_cols = x.permute({1, 0, 2, 3}).reshape({d, pixels}).to(acc).contiguous();
  const at::Tensor c_rows = dictionary.t().to(acc).contiguous();
  at::Tensor values = at::empty({n, h, w, k}, x.options());
  at::Tensor indices = at::empty({n, h, w, k}, x.options().dtype(at::kLong));
  const int64_t blocks = (pixels + kThreadsPerBlock - 1) / kThreadsPerBlock;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kdfast_sparse_codes_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const acc_t b = bias.reshape({}).to(acc).item<acc_t>();
    const size_t smem = topk_smem_bytes<acc_t>(static_cast<int>(k));
    const auto kernel = sparse_codes_kernel<scalar_t, acc_t>;
    // float64 at k > 30 needs more than the default 48 KiB (every sm_80+ device allows it).
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<blocks, kThreadsPerBlock, smem, stream>>>(
        x_cols.const_data_ptr<acc_t>(), c_rows.const_data_ptr<acc_t>(), b, pixels, d, kk, static_cast<int>(k),
        values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> sparse_codes_cuda(const at::Tensor& x, const at::Tensor& dictionary,
                                                     const at::Tensor& bias, int64_t k) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_args(x, dictionary, bias, k);
  // Default: the ATen formulation (the kernel above is unverified).
  // The kernel keeps codeword indices as int32 in shared memory.
  if (!paths::use_kernel(paths::kSparseCodes, x) || k > kMaxK || dictionary.size(1) > INT32_MAX)
    return forward_aten(x, dictionary, bias, k);
  return forward_kernel(x, dictionary, bias, k);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_codes_backward_cuda(const at::Tensor& grad_values,
                                                                          const at::Tensor& x,
                                                                          const at::Tensor& dictionary,
                                                                          const at::Tensor& bias,
                                                                          const at::Tensor& indices,
                                                                          std::array<bool, 3> mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return backward_aten(grad_values, x, dictionary, bias, indices, mask);
}

}  // namespace
}  // namespace sparse_codes
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("sparse_codes", &kdfast::sparse_codes::sparse_codes_cuda);
  m.impl("_sparse_codes_backward", &kdfast::sparse_codes::sparse_codes_backward_cuda);
}
