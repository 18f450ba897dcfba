// CPU implementation of the backend primitives (see ../primitives.h): at::parallel_for loops,
// vectorised where the loop is a reduction, float32/float64 accumulation.
#include "../primitives.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>
#include <vector>

#include "kdfast/checks.h"
#include "kdfast/math.h"

namespace kdfast {

at::ScalarType CpuPrimitives::gemm_dtype(at::ScalarType input_dtype) {
  return accumulate_type(input_dtype);
}

void CpuPrimitives::bmm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  // Not baddbmm(beta=0): that zero-fills `out` first, a wasted pass over the result.
  at::bmm_out(out, a, b);
}

void CpuPrimitives::baddbmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  out.baddbmm_(a, b, beta, alpha);
}

void CpuPrimitives::add_sum_of_squares(const at::Tensor& x, double scale, at::Tensor& acc) {
  TORCH_INTERNAL_ASSERT(x.is_contiguous() && x.dim() == 2 && acc.dim() == 1);
  const int64_t batch = x.size(0), n = x.size(1);
  // Split long rows into chunks so batch 1 still uses every core; partial sums are combined in a
  // fixed order, so the result does not depend on the thread count.
  constexpr int64_t kChunk = 1 << 15;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(batch * chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kdfast_add_sum_of_squares", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / chunks, start = (task % chunks) * kChunk;
        const int64_t len = std::min(kChunk, n - start);
        partial[task] = static_cast<double>(at::vec::map_reduce_all<scalar_t>(
            [](Vec v) { return v * v; }, [](Vec a, Vec b) { return a + b; }, data + row * n + start, len));
      }
    });
    scalar_t* out = acc.data_ptr<scalar_t>();
    for (int64_t row = 0; row < batch; ++row) {
      double total = 0.0;
      for (int64_t c = 0; c < chunks; ++c) total += partial[row * chunks + c];
      out[row] += static_cast<scalar_t>(scale * total);
    }
  });
}

void CpuPrimitives::gaussian_rows_(at::Tensor& dots, const at::Tensor& sqnorm_rows, const at::Tensor& sqnorm_cols,
                                   const at::Tensor& col_weights, double inv_two_sigma_sq, int64_t diag_col0,
                                   bool keep_diagonal, at::Tensor& row_sums) {
  TORCH_INTERNAL_ASSERT(dots.is_contiguous() && sqnorm_rows.is_contiguous() && sqnorm_cols.is_contiguous() &&
                        col_weights.is_contiguous() && row_sums.is_contiguous());
  const int64_t nb = dots.size(0), rows = dots.size(1), cols = dots.size(2);
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "kdfast_gaussian_rows", [&] {
    scalar_t* k = dots.data_ptr<scalar_t>();
    const scalar_t* sr = sqnorm_rows.const_data_ptr<scalar_t>();
    const scalar_t* sc = sqnorm_cols.const_data_ptr<scalar_t>();
    const scalar_t* w = col_weights.const_data_ptr<scalar_t>();
    scalar_t* sums = row_sums.data_ptr<scalar_t>();
    const auto gamma = static_cast<scalar_t>(inv_two_sigma_sq);
    at::parallel_for(0, nb * rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / rows, diag = diag_col0 + r % rows;
        scalar_t* row = k + r * cols;
        const scalar_t* sqcol = sc + n * cols;
        scalar_t total = 0;
        for (int64_t q = 0; q < cols; ++q) {
          const scalar_t v = q == diag ? math::gaussian_diagonal<scalar_t>(w[q], keep_diagonal)
                                       : w[q] * math::gaussian_kernel<scalar_t>(row[q], sr[r], sqcol[q], gamma);
          row[q] = v;
          total += v;
        }
        sums[r] = total;
      }
    });
  });
}

void CpuPrimitives::normalize_rows_backward(const at::Tensor& grad, const at::Tensor& row_scale,
                                            const at::Tensor& f, const at::Tensor& norms, const at::Tensor& scale,
                                            double eps, at::Tensor& grad_f) {
  // Any strides for grad (the linear kernel passes a broadcast view) and f (channels_last, slices);
  // row_scale, norms, scale and grad_f are contiguous.
  const auto& g3 = grad;
  const auto f3 = f.flatten(2);
  TORCH_INTERNAL_ASSERT(norms.is_contiguous() && scale.is_contiguous() && grad_f.is_contiguous());
  TORCH_INTERNAL_ASSERT(!row_scale.defined() || row_scale.is_contiguous());
  const int64_t batch = f3.size(0), channels = f3.size(1), hw = f3.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "kdfast_normalize_rows_backward", [&] {
    using in_t = scalar_t;
    // grad, row_scale, norms and scale are in the accumulate dtype: double for double inputs, else float.
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    TORCH_INTERNAL_ASSERT(g3.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
    const in_t* fp = f3.const_data_ptr<in_t>();
    const acc_t* gp = g3.const_data_ptr<acc_t>();
    const acc_t* rsp = row_scale.defined() ? row_scale.const_data_ptr<acc_t>() : nullptr;
    const acc_t* np = norms.const_data_ptr<acc_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    in_t* out = grad_f.data_ptr<in_t>();
    const int64_t fsb = f3.stride(0), fsc = f3.stride(1), fsh = f3.stride(2);
    const int64_t gsb = g3.stride(0), gsc = g3.stride(1), gsh = g3.stride(2);
    // Rows contiguous in both and no dtype conversion: SIMD loops.
    const bool vectorised = std::is_same_v<in_t, acc_t> && fsh == 1 && gsh == 1;
    const auto e = static_cast<acc_t>(eps);
    at::parallel_for(0, batch * channels, 8, [&](int64_t begin, int64_t end) {
      using Vec = at::vec::Vectorized<acc_t>;
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / channels, c = row % channels;
        const in_t* fr = fp + n * fsb + c * fsc;
        const acc_t* gr = gp + n * gsb + c * gsc;
        const acc_t factor = rsp ? rsp[row] : acc_t(1);
        in_t* o = out + row * hw;
        const acc_t norm = np[row];
        const acc_t rnorm = math::inverse_clamped_norm<acc_t>(norm, e);
        if constexpr (std::is_same_v<in_t, acc_t>) {
          if (vectorised) {
            // in_t == acc_t here; the casts only let this branch compile for the half types too.
            const acc_t* fa = reinterpret_cast<const acc_t*>(fr);
            acc_t* oa = reinterpret_cast<acc_t*>(o);
            const acc_t dot = factor * at::vec::map2_reduce_all<acc_t>(
                                           [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; },
                                           fa, gr, hw);
            const acc_t proj = math::projection_coefficient<acc_t>(dot, norm, rnorm, e);
            // normalize_backward(factor * g, f) = (scale r factor) g - (scale r proj) f
            const Vec cg(sp[n] * rnorm * factor), cf(sp[n] * rnorm * proj);
            at::vec::map2<acc_t>([&](Vec g, Vec fv) { return cg * g - cf * fv; }, oa, gr, fa, hw);
            continue;
          }
        }
        acc_t dot = 0;
        for (int64_t s = 0; s < hw; ++s) dot += static_cast<acc_t>(fr[s * fsh]) * gr[s * gsh];
        dot *= factor;
        const acc_t proj = math::projection_coefficient<acc_t>(dot, norm, rnorm, e);
        for (int64_t s = 0; s < hw; ++s)
          o[s] = static_cast<in_t>(math::normalize_backward<acc_t>(factor * gr[s * gsh],
                                                                   static_cast<acc_t>(fr[s * fsh]), rnorm, proj, sp[n]));
      }
    });
  });
}

}  // namespace kdfast
