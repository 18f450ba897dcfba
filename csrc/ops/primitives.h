// The few element-wise / reduction kernels each backend implements itself. The op drivers
// (fsp_impl.h, nst_impl.h) are written once against this interface with ATen GEMMs for the
// matrix-shaped work. Three implementations:
//   CpuPrimitives  (csrc/ops/cpu/primitives.cpp): hand-written CPU loops;
//   CudaPrimitives (csrc/ops/cuda/primitives.cu): hand-written CUDA kernels;
//   AtenPrimitives (csrc/ops/aten/primitives.cpp): ATen calls only, any device. This is the default
//     on CUDA (see kernel_paths.h), and the CPU tests run it too (KDFAST_CPU_KERNELS=none).
#pragma once

#include <ATen/core/Tensor.h>

namespace kdfast {

#define KDFAST_DECLARE_PRIMITIVES(Backend)                                                              \
  struct Backend {                                                                                      \
    /* dtype of the Gram GEMMs' operands: CPU upcasts half types to float32; CUDA and ATen keep */    \
    /* them so the GEMM runs on tensor cores (it still accumulates and writes float32, see bmm_out). */ \
    static at::ScalarType gemm_dtype(at::ScalarType input_dtype);                                      \
    /* out = a @ b (batched); out is preallocated in the accumulate dtype, a and b in gemm_dtype. */   \
    /* No alpha on purpose: scale factors are folded into the smaller operands by the callers. */       \
    static void bmm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);                     \
    /* out = beta * out + alpha * a @ b (batched), in place. */                                         \
    static void baddbmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta,        \
                         double alpha);                                                                 \
    /* acc[n] += scale * sum(x[n] ** 2); x is (B, N) contiguous, acc (B,). */                           \
    static void add_sum_of_squares(const at::Tensor& x, double scale, at::Tensor& acc);                 \
    /* In place on dots (nb, R, C) = x_hat_rows . x_hat_cols: dots <- col_weight * gaussian kernel,  */ \
    /* and row_sums (nb, R) <- sum over columns of the new values. Row r is row diag_col0 + r of all */ \
    /* C rows: its diagonal entry (column diag_col0 + r) is set exactly, to col_weight * 1 (k(x, x) */ \
    /* = 1) when keep_diagonal, else to 0, not computed from the Gram identity (see nst_impl.h). */       \
    static void gaussian_rows_(at::Tensor& dots, const at::Tensor& sqnorm_rows,                         \
                               const at::Tensor& sqnorm_cols, const at::Tensor& col_weights,            \
                               double inv_two_sigma_sq, int64_t diag_col0, bool keep_diagonal,          \
                               at::Tensor& row_sums);                                                   \
    /* grad_f (B, C, H, W) = scale[n] * d normalize(f) / df applied to row_scale[n, c] * grad (B, C, HW); */ \
    /* row_scale may be undefined (all ones). */                                                        \
    static void normalize_rows_backward(const at::Tensor& grad, const at::Tensor& row_scale,            \
                                        const at::Tensor& f, const at::Tensor& norms,                   \
                                        const at::Tensor& scale, double eps, at::Tensor& grad_f);       \
  };

KDFAST_DECLARE_PRIMITIVES(CpuPrimitives)
KDFAST_DECLARE_PRIMITIVES(CudaPrimitives)
KDFAST_DECLARE_PRIMITIVES(AtenPrimitives)

#undef KDFAST_DECLARE_PRIMITIVES

// Row normalisation epsilon of the NST loss (F.normalize's default is 1e-12 too).
constexpr double kNormalizeEps = 1e-12;

}  // namespace kdfast
