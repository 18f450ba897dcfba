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
  P::bmm_out(gram, rows_of(a).to(gd), rows_of(b).to(gd).transpose(1, 2));
  return gram.mul_(1.0 / spatial_size(a)).to(a.scalar_type());
}

// Gradient of a feature map x that entered a Gram as rows(x): lhs @ rows(other), shaped like x;
// an empty tensor when not needed. Scale factors are already in lhs (Gram-sized, smaller than x).
template <class P>
at::Tensor gram_input_grad(bool needed, const at::Tensor& x, const at::Tensor& lhs, const at::Tensor& other) {
  if (!needed) return unused_grad(x);
  const auto acc = accumulate_type(x.scalar_type());
  auto out = at::empty({x.size(0), x.size(1), x.size(2) * x.size(3)}, x.options().dtype(acc));
  P::bmm_out(out, lhs, rows_of(other).to(lhs.scalar_type()));
  return out.view(x.sizes()).to(x.scalar_type());
}

// dL/da = grad @ b / HW, dL/db = grad^T @ a / HW.
// The scaled gradients (grad / HW here, 2 c D / HW in the loss) stay in the accumulate dtype and
// so do these GEMMs, on every backend: in float16 they go subnormal at ImageNet sizes (HW = 3136).
template <class P>
std::tuple<at::Tensor, at::Tensor> fsp_matrix_backward_impl(const at::Tensor& grad, const at::Tensor& a,
                                                            const at::Tensor& b, std::array<bool, 2> output_mask) {
  const auto g = grad.to(accumulate_type(a.scalar_type())).mul(1.0 / spatial_size(a));  // not mul_: grad may be the caller's
  return {gram_input_grad<P>(output_mask[0], a, g, b), gram_input_grad<P>(output_mask[1], b, g.transpose(1, 2), a)};
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
  P::bmm_out(diff, rows_of(s_a).to(gd), rows_of(s_b).to(gd).transpose(1, 2));
  P::baddbmm_(diff, rows_of(t_a).to(gd), rows_of(t_b).to(gd).transpose(1, 2), 1.0 / spatial_size(s_a),
              -1.0 / spatial_size(t_a));
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
  const int64_t batch = s_a.size(0);
  const auto coeff = per_sample_grad(grad_loss, red, batch, acc).view({batch, 1, 1});
  // dL/dG_s = 2 c D, scaled by the student's 1/HW_s; the teacher's likewise with -1/HW_t. Kept in the
  // accumulate dtype (see fsp_matrix_backward_impl).
  at::Tensor s_lhs, t_lhs;
  if (output_mask[0] || output_mask[1]) s_lhs = diff * (coeff * (2.0 / spatial_size(s_a)));
  if (output_mask[2] || output_mask[3]) t_lhs = diff * (coeff * (-2.0 / spatial_size(t_a)));
  auto transposed = [](const at::Tensor& x) { return x.defined() ? x.transpose(1, 2) : x; };
  return {gram_input_grad<P>(output_mask[0], s_a, s_lhs, s_b),
          gram_input_grad<P>(output_mask[1], s_b, transposed(s_lhs), s_a),
          gram_input_grad<P>(output_mask[2], t_a, t_lhs, t_b),
          gram_input_grad<P>(output_mask[3], t_b, transposed(t_lhs), t_a)};
}

}  // namespace kdfast
