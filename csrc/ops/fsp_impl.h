// FSP (Yim et al., CVPR 2017) drivers, written once against the backend primitives.
//   G[n, i, j] = sum_s a[n, i, s] b[n, j, s] / (H W)
//   fsp_loss per sample = ||G(s_a, s_b) - G(t_a, t_b)||_F^2
// The loss never holds the student and teacher Grams at once: the student Gram is written into
// `diff` and the teacher Gram is subtracted from it by an accumulating GEMM. `diff` is all the
// backward needs besides the inputs.
#pragma once

#include <array>
#include <tuple>

#include "loss_common.h"
#include "primitives.h"

namespace kdfast {

inline void check_fsp_pair(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  check_feature_map(a, a_name);
  check_feature_map(b, b_name);
  check_compatible(a, a_name, b, b_name);
  check_same_spatial(a, a_name, b, b_name);
}

inline double spatial_size(const at::Tensor& x) {
  return static_cast<double>(x.size(2) * x.size(3));
}

template <class P>
at::Tensor fsp_matrix_impl(const at::Tensor& a, const at::Tensor& b) {
  check_fsp_pair(a, "a", b, "b");
  const auto acc = accumulate_type(a.scalar_type());
  const auto gd = P::gemm_dtype(a.scalar_type());
  auto gram = at::empty({a.size(0), a.size(1), b.size(1)}, a.options().dtype(acc));
  P::bmm_out(gram, rows_of(a).to(gd), rows_of(b).to(gd).transpose(1, 2), 1.0 / spatial_size(a));
  return gram.to(a.scalar_type());
}

// dL/da = grad @ b / HW, dL/db = grad^T @ a / HW.
template <class P>
std::tuple<at::Tensor, at::Tensor> fsp_matrix_backward_impl(const at::Tensor& grad, const at::Tensor& a,
                                                            const at::Tensor& b, std::array<bool, 2> output_mask) {
  const auto acc = accumulate_type(a.scalar_type());
  const auto gd = P::gemm_dtype(a.scalar_type());
  const double inv_hw = 1.0 / spatial_size(a);
  const auto g = grad.to(gd);
  auto grad_a = unused_grad(a), grad_b = unused_grad(b);
  if (output_mask[0]) {
    auto out = at::empty({a.size(0), a.size(1), a.size(2) * a.size(3)}, a.options().dtype(acc));
    P::bmm_out(out, g, rows_of(b).to(gd), inv_hw);
    grad_a = out.view(a.sizes()).to(a.scalar_type());
  }
  if (output_mask[1]) {
    auto out = at::empty({b.size(0), b.size(1), b.size(2) * b.size(3)}, b.options().dtype(acc));
    P::bmm_out(out, g.transpose(1, 2), rows_of(a).to(gd), inv_hw);
    grad_b = out.view(b.sizes()).to(b.scalar_type());
  }
  return {grad_a, grad_b};
}

inline void check_fsp_loss_args(const at::Tensor& s_a, const at::Tensor& s_b, const at::Tensor& t_a,
                                const at::Tensor& t_b) {
  check_fsp_pair(s_a, "s_a", s_b, "s_b");
  check_fsp_pair(t_a, "t_a", t_b, "t_b");
  check_compatible(s_a, "s_a", t_a, "t_a");
  TORCH_CHECK_VALUE(s_a.size(1) == t_a.size(1) && s_b.size(1) == t_b.size(1),
                    "FSP Gram shape mismatch: the student's is (", s_a.size(1), ", ", s_b.size(1),
                    ") from s_a and s_b, the teacher's is (", t_a.size(1), ", ", t_b.size(1),
                    ") from t_a and t_b; they must be equal");
}

template <class P>
std::tuple<at::Tensor, at::Tensor> fsp_loss_impl(const at::Tensor& s_a, const at::Tensor& s_b, const at::Tensor& t_a,
                                                 const at::Tensor& t_b, c10::string_view reduction) {
  check_fsp_loss_args(s_a, s_b, t_a, t_b);
  const auto red = parse_reduction(reduction);
  const auto acc = accumulate_type(s_a.scalar_type());
  const auto gd = P::gemm_dtype(s_a.scalar_type());
  const int64_t batch = s_a.size(0);
  auto diff = at::empty({batch, s_a.size(1), s_b.size(1)}, s_a.options().dtype(acc));
  P::bmm_out(diff, rows_of(s_a).to(gd), rows_of(s_b).to(gd).transpose(1, 2), 1.0 / spatial_size(s_a));
  P::baddbmm_(diff, rows_of(t_a).to(gd), rows_of(t_b).to(gd).transpose(1, 2), -1.0 / spatial_size(t_a));
  auto per_sample = at::zeros({batch}, s_a.options().dtype(acc));
  P::add_sum_of_squares(diff.view({batch, -1}), 1.0, per_sample);
  return {reduce_per_sample(per_sample, red, s_a.scalar_type()), diff};
}

// With D = G_s - G_t and c[n] = d loss / d per_sample[n]:
//   dL/ds_a = 2 c D s_b / HW_s,  dL/ds_b = 2 c D^T s_a / HW_s,  teacher: the same with -1/HW_t.
template <class P>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fsp_loss_backward_impl(
    const at::Tensor& grad_loss, const at::Tensor& diff, const at::Tensor& s_a, const at::Tensor& s_b,
    const at::Tensor& t_a, const at::Tensor& t_b, c10::string_view reduction, std::array<bool, 4> output_mask) {
  const auto red = parse_reduction(reduction);
  const auto acc = accumulate_type(s_a.scalar_type());
  const auto gd = P::gemm_dtype(s_a.scalar_type());
  const int64_t batch = s_a.size(0);
  const auto coeff = per_sample_grad(grad_loss, red, batch, acc);
  const auto scaled_diff = (diff * coeff.view({batch, 1, 1})).to(gd);

  // grad of x = alpha * lhs @ rows(other), shaped like x.
  auto gram_grad = [&](bool needed, const at::Tensor& x, const at::Tensor& lhs, const at::Tensor& other,
                       double alpha) {
    if (!needed) return unused_grad(x);
    auto out = at::empty({x.size(0), x.size(1), x.size(2) * x.size(3)}, x.options().dtype(acc));
    P::bmm_out(out, lhs, rows_of(other).to(gd), alpha);
    return out.view(x.sizes()).to(x.scalar_type());
  };
  const double s_scale = 2.0 / spatial_size(s_a), t_scale = -2.0 / spatial_size(t_a);
  const auto diff_t = scaled_diff.transpose(1, 2);
  return {gram_grad(output_mask[0], s_a, scaled_diff, s_b, s_scale),
          gram_grad(output_mask[1], s_b, diff_t, s_a, s_scale),
          gram_grad(output_mask[2], t_a, scaled_diff, t_b, t_scale),
          gram_grad(output_mask[3], t_b, diff_t, t_a, t_scale)};
}

}  // namespace kdfast
