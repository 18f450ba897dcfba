// CUDA implementation of the backend primitives (see ../primitives.h): cuBLAS GEMMs through ATen
// (tensor cores for float16/bfloat16 operands with float32 output), the kernels of kernels.cuh on
// the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <type_traits>

#include "../primitives.h"
#include "kdfast/checks.h"
#include "kernels.cuh"

namespace kdfast {

at::ScalarType CudaPrimitives::gemm_dtype(at::ScalarType input_dtype) {
  return input_dtype;  // float16/bfloat16 stay half: tensor-core GEMMs that write float32
}

void CudaPrimitives::bmm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::bmm_out(out, a, b);
  } else {
    at::bmm_out(out, a, b, out.scalar_type());  // half operands, float32 result (cuBLAS GemmEx)
  }
}

void CudaPrimitives::baddbmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  if (a.scalar_type() == out.scalar_type()) {
    out.baddbmm_(a, b, beta, alpha);
  } else {
    at::baddbmm_out(out, out, a, b, out.scalar_type(), beta, alpha);
  }
}

void CudaPrimitives::add_sum_of_squares(const at::Tensor& x, double scale, at::Tensor& acc) {
  TORCH_INTERNAL_ASSERT(x.is_contiguous() && x.dim() == 2 && acc.dim() == 1);
  const int64_t rows = x.size(0), n = x.size(1);
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  auto partial = at::empty({rows, chunks}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kdfast_add_sum_of_squares_cuda", [&] {
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min(rows, cuda::kMaxGridY)));
    cuda::sum_of_squares_kernel<scalar_t><<<grid, cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), rows, n, kChunk, partial.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  acc.add_(partial.sum(1), scale);  // fixed-order reduction of the partials: deterministic
}

void CudaPrimitives::gaussian_rows_(at::Tensor& dots, const at::Tensor& sqnorm_rows, const at::Tensor& sqnorm_cols,
                                    const at::Tensor& col_weights, double inv_two_sigma_sq, int64_t diag_col0,
                                    bool keep_diagonal, at::Tensor& row_sums) {
  TORCH_INTERNAL_ASSERT(dots.is_contiguous() && sqnorm_rows.is_contiguous() && sqnorm_cols.is_contiguous() &&
                        col_weights.is_contiguous() && row_sums.is_contiguous());
  const int64_t nb = dots.size(0), rows = dots.size(1), cols = dots.size(2);
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "kdfast_gaussian_rows_cuda", [&] {
    cuda::gaussian_rows_kernel<scalar_t><<<nb * rows, cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dots.data_ptr<scalar_t>(), sqnorm_rows.const_data_ptr<scalar_t>(), sqnorm_cols.const_data_ptr<scalar_t>(),
        col_weights.const_data_ptr<scalar_t>(), rows, cols, static_cast<scalar_t>(inv_two_sigma_sq), diag_col0,
        keep_diagonal, row_sums.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void CudaPrimitives::normalize_rows_backward(const at::Tensor& grad, const at::Tensor& row_scale,
                                             const at::Tensor& f, const at::Tensor& norms, const at::Tensor& scale,
                                             double eps, at::Tensor& grad_f) {
  const auto f3 = f.flatten(2);
  const auto& g3 = grad;
  TORCH_INTERNAL_ASSERT(!row_scale.defined() || row_scale.is_contiguous());
  TORCH_INTERNAL_ASSERT(norms.is_contiguous() && scale.is_contiguous() && grad_f.is_contiguous());
  const int64_t batch = f3.size(0), channels = f3.size(1), hw = f3.size(2);
  const cuda::RowStrides gs{g3.stride(0), g3.stride(1), g3.stride(2)}, fs{f3.stride(0), f3.stride(1), f3.stride(2)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "kdfast_normalize_rows_backward_cuda", [&] {
    using in_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    TORCH_INTERNAL_ASSERT(g3.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
    cuda::normalize_rows_backward_kernel<in_t, acc_t>
        <<<batch * channels, cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            g3.const_data_ptr<acc_t>(), gs, row_scale.defined() ? row_scale.const_data_ptr<acc_t>() : nullptr,
            f3.const_data_ptr<in_t>(), fs, norms.const_data_ptr<acc_t>(),
            scale.const_data_ptr<acc_t>(), channels, hw, static_cast<acc_t>(eps), grad_f.data_ptr<in_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace kdfast
