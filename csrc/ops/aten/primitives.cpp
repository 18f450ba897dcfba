// ATen implementation of the backend primitives (see ../primitives.h): ATen calls only, so it runs
// on any device (cuBLAS GEMMs and ATen reductions / element-wise kernels on CUDA). This is what
// CUDA runs by default (kernel_paths.h), and what the CPU tests run with KDFAST_CPU_KERNELS=none, so
// the code a GPU user gets by default is code the CPU suite has compared with the float64 reference.
// Simple rather than lean: some steps allocate a temporary the size of their input.
#include "../primitives.h"

#include <ATen/ATen.h>

#include "kdfast/checks.h"

namespace kdfast {

at::ScalarType AtenPrimitives::gemm_dtype(at::ScalarType input_dtype) {
  return input_dtype;  // float16/bfloat16 stay half: tensor-core GEMMs writing float32 on CUDA
}

// Half operands with a float32 result: cuBLAS does it in one GEMM (out_dtype); the CPU has no such
// kernel, so there the operands are upcast first (the same products, summed in float32).
void AtenPrimitives::bmm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::bmm_out(out, a, b);
  } else if (out.is_cuda()) {
    at::bmm_out(out, a, b, out.scalar_type());
  } else {
    at::bmm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
  }
}

void AtenPrimitives::baddbmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  if (a.scalar_type() == out.scalar_type()) {
    out.baddbmm_(a, b, beta, alpha);
  } else if (out.is_cuda()) {
    at::baddbmm_out(out, out, a, b, out.scalar_type(), beta, alpha);
  } else {
    out.baddbmm_(a.to(out.scalar_type()), b.to(out.scalar_type()), beta, alpha);
  }
}

void AtenPrimitives::add_sum_of_squares(const at::Tensor& x, double scale, at::Tensor& acc) {
  TORCH_INTERNAL_ASSERT(x.dim() == 2 && acc.dim() == 1);
  // One reduction pass without an x-sized temporary (x can be a B x HW x HW Gram): ||x[n]||^2.
  acc.add_(at::linalg_vector_norm(x, 2, {1}, false, acc.scalar_type()).square_(), scale);
}

void AtenPrimitives::gaussian_rows_(at::Tensor& dots, const at::Tensor& sqnorm_rows, const at::Tensor& sqnorm_cols,
                                    const at::Tensor& col_weights, double inv_two_sigma_sq, int64_t diag_col0,
                                    bool keep_diagonal, at::Tensor& row_sums) {
  // |x_p - x_q|^2 = |x_p|^2 + |x_q|^2 - 2 x_p.x_q, clamped at 0 (math::gaussian_kernel), in place.
  dots.mul_(-2.0).add_(sqnorm_rows.unsqueeze(2)).add_(sqnorm_cols.unsqueeze(1)).clamp_min_(0.0);
  dots.mul_(-inv_two_sigma_sq).exp_().mul_(col_weights);
  // Row r's diagonal is column diag_col0 + r: set exactly (math::gaussian_diagonal).
  auto diagonal = dots.diagonal(diag_col0, 1, 2);
  if (keep_diagonal) {
    diagonal.copy_(col_weights.narrow(0, diag_col0, diagonal.size(-1)).expand_as(diagonal));
  } else {
    diagonal.zero_();
  }
  at::sum_out(row_sums, dots, {2});
}

void AtenPrimitives::normalize_rows_backward(const at::Tensor& grad, const at::Tensor& row_scale,
                                             const at::Tensor& f, const at::Tensor& norms, const at::Tensor& scale,
                                             double eps, at::Tensor& grad_f) {
  // With g = row_scale * grad and r = 1 / max(|f|, eps) (math::normalize_backward):
  //   grad_f = scale[n] r (g - f r^2 (f.g)), the projection term only where |f| >= eps.
  const auto acc = grad.scalar_type();
  const auto f3 = f.flatten(2).to(acc);
  const auto g = row_scale.defined() ? grad * row_scale.unsqueeze(2) : grad;
  const auto rnorm = norms.clamp_min(eps).reciprocal();
  const auto dot = at::sum(f3 * g, {2});
  const auto proj = at::where(norms >= eps, rnorm * rnorm * dot, at::zeros({}, dot.options()));
  const auto out = (scale.view({-1, 1, 1}) * rnorm.unsqueeze(2)) * (g - f3 * proj.unsqueeze(2));
  grad_f.copy_(out.view(grad_f.sizes()));
}

}  // namespace kdfast
