// Fused Hinton KD loss (Hinton, Vinyals, Dean 2015) driver, shared by both backends:
//   loss = (1 - alpha) * CE(y, s) + alpha * c * KL(softmax(t / T) || softmax(s / T)),  c = T^2 or 1
// reduction "mean": KL summed over rows / B, CE summed over non-ignored rows / their count (as
// F.cross_entropy; 0 when every row is ignored); "sum": both summed; "none": per-row (B,) losses.
// Rows whose target is ignore_index still get the KL term (e.g. unlabelled samples).
// The backend computes per-row statistics in one kernel (kdfast/kd_loss_math.h) and, in backward,
// the gradients from the logits and those statistics; the reductions here are tiny (B,) ops.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <tuple>

#include "kdfast/checks.h"
#include "kdfast/kd_loss_math.h"
#include "loss_common.h"

namespace kdfast {

struct KdOptions {
  double temperature;
  double alpha;
  bool t2_scale;
  int64_t ignore_index;
  Reduction reduction;
  bool need_ce;  // targets given and alpha < 1

  double kl_weight() const { return alpha * (t2_scale ? temperature * temperature : 1.0); }
};

// Backend hooks. `targets` is undefined when the CE term is not computed.
// forward_rows fills stats (B, kd::kNumStats) in the accumulate dtype.
using KdForwardRows = void (*)(const at::Tensor& s, const at::Tensor& t, const at::Tensor& targets,
                               const KdOptions& opt, at::Tensor& stats);
// backward_rows returns (grad_s, grad_t) in the logits' dtype, each undefined when not needed.
// coefs (B, 2) in the accumulate dtype: [dL/dKL_row / T, dL/dCE_row].
using KdBackwardRows = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& s, const at::Tensor& t,
                                                              const at::Tensor& targets, const at::Tensor& stats,
                                                              const at::Tensor& coefs, const KdOptions& opt,
                                                              bool need_s, bool need_t);

inline void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be 2-D logits (B, K), got ", x.dim(), "-D tensor of shape ",
                    x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), name,
                   " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(0) > 0, name, " has an empty batch (shape ", x.sizes(), "); expected B >= 1");
  TORCH_CHECK_VALUE(x.size(1) > 0, name, " has no classes (shape ", x.sizes(), "); expected K >= 1");
}

inline KdOptions check_kd_loss_args(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& targets,
                                    double temperature, double alpha, bool t2_scale, int64_t ignore_index,
                                    c10::string_view reduction) {
  check_logits(s, "student_logits");
  check_logits(t, "teacher_logits");
  TORCH_CHECK_VALUE(s.sizes() == t.sizes(), "shape mismatch: student_logits is ", s.sizes(), " but teacher_logits is ",
                    t.sizes(), "; expected the same (B, K)");
  check_compatible(s, "student_logits", t, "teacher_logits");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be a positive finite number, got ",
                    temperature);
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, "alpha must be in [0, 1], got ", alpha);
  const bool has_targets = targets.has_value() && targets->defined();
  TORCH_CHECK_VALUE(has_targets || alpha == 1.0, "targets are required when alpha < 1 (the CE term has weight 1 - alpha = ",
                    1.0 - alpha, "); pass targets or alpha=1");
  if (has_targets) {
    const auto& y = *targets;
    TORCH_CHECK_TYPE(y.scalar_type() == at::kLong, "targets must be int64 class indices, got ", y.scalar_type());
    TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == s.size(0), "targets must have shape (", s.size(0),
                      ",) (one class index per row of student_logits), got ", y.sizes());
    TORCH_CHECK_VALUE(y.device() == s.device(), "device mismatch: student_logits is on ", s.device(),
                      " but targets is on ", y.device());
  }
  return KdOptions{temperature, alpha, t2_scale, ignore_index, parse_reduction(reduction), has_targets && alpha < 1.0};
}

// The ATen path's hooks (csrc/ops/aten/kd_loss_rows.cpp): the same statistics and gradients from
// ATen calls only, on any device (the CUDA default, see kernel_paths.h).
void kd_forward_rows_aten(const at::Tensor& s, const at::Tensor& t, const at::Tensor& targets, const KdOptions& opt,
                          at::Tensor& stats);
std::tuple<at::Tensor, at::Tensor> kd_backward_rows_aten(const at::Tensor& s, const at::Tensor& t,
                                                         const at::Tensor& targets, const at::Tensor& stats,
                                                         const at::Tensor& coefs, const KdOptions& opt, bool need_s,
                                                         bool need_t);

// CPU targets: each must be a class index in [0, K) or ignore_index (CUDA kernels assert on device).
inline void check_target_range(const at::Tensor& y, int64_t k, int64_t ignore_index) {
  const int64_t* data = y.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < y.size(0); ++n) {
    TORCH_CHECK_VALUE(data[n] == ignore_index || (data[n] >= 0 && data[n] < k), "targets[", n, "] = ", data[n],
                      " is out of range: expected a class index in [0, ", k, ") or ignore_index = ", ignore_index);
  }
}

// A view whose rows are unit-stride (the kernels index row * stride(0) + k); copies otherwise.
inline at::Tensor unit_stride_rows(const at::Tensor& x) {
  return x.stride(1) == 1 || x.size(1) == 1 ? x : x.contiguous();
}

// 1 for rows whose target is not ignore_index, else 0, in `acc` (a device tensor: no host sync).
inline at::Tensor valid_rows(const at::Tensor& targets, int64_t ignore_index, at::ScalarType acc) {
  return targets.ne(ignore_index).to(acc);
}

inline std::tuple<at::Tensor, at::Tensor> kd_loss_impl(KdForwardRows forward_rows, const at::Tensor& student_logits,
                                                       const at::Tensor& teacher_logits,
                                                       const c10::optional<at::Tensor>& targets, double temperature,
                                                       double alpha, bool t2_scale, int64_t ignore_index,
                                                       c10::string_view reduction) {
  const KdOptions opt = check_kd_loss_args(student_logits, teacher_logits, targets, temperature, alpha, t2_scale,
                                           ignore_index, reduction);
  const auto s = unit_stride_rows(student_logits), t = unit_stride_rows(teacher_logits);
  const auto acc = accumulate_type(s.scalar_type());
  const int64_t batch = s.size(0);
  auto stats = at::empty({batch, kd::kNumStats}, s.options().dtype(acc));
  const at::Tensor y = opt.need_ce ? targets->contiguous() : at::Tensor();
  forward_rows(s, t, y, opt, stats);

  const auto kl = stats.select(1, kd::kKl), ce = stats.select(1, kd::kCe);
  at::Tensor loss;
  switch (opt.reduction) {
    case Reduction::None:
      loss = opt.need_ce ? kl.mul(opt.kl_weight()).add_(ce, 1.0 - opt.alpha) : kl.mul(opt.kl_weight());
      break;
    case Reduction::Sum:
      loss = kl.sum().mul_(opt.kl_weight());
      if (opt.need_ce) loss.add_(ce.sum(), 1.0 - opt.alpha);
      break;
    case Reduction::Mean:
      loss = kl.sum().mul_(opt.kl_weight() / static_cast<double>(batch));
      if (opt.need_ce) loss.add_(ce.sum().div_(valid_rows(y, ignore_index, acc).sum().clamp_min_(1)), 1.0 - opt.alpha);
      break;
  }
  return {loss.to(s.scalar_type()), stats};
}

inline std::tuple<at::Tensor, at::Tensor> kd_loss_backward_impl(
    KdBackwardRows backward_rows, const at::Tensor& grad_loss, const at::Tensor& student_logits,
    const at::Tensor& teacher_logits, const c10::optional<at::Tensor>& targets, const at::Tensor& stats,
    double temperature, double alpha, bool t2_scale, int64_t ignore_index, c10::string_view reduction,
    std::array<bool, 2> output_mask) {
  const KdOptions opt = check_kd_loss_args(student_logits, teacher_logits, targets, temperature, alpha, t2_scale,
                                           ignore_index, reduction);
  const auto s = unit_stride_rows(student_logits), t = unit_stride_rows(teacher_logits);
  const auto acc = accumulate_type(s.scalar_type());
  const int64_t batch = s.size(0);
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == batch && stats.size(1) == kd::kNumStats &&
                        stats.scalar_type() == acc,
                    "stats must be the (B, ", static_cast<int>(kd::kNumStats), ") ", acc,
                    " statistics returned by kd_loss, got ", stats.sizes(), " ", stats.scalar_type());
  if (!output_mask[0] && !output_mask[1]) return {unused_grad(student_logits), unused_grad(teacher_logits)};

  // dL/d(per-row loss), then the per-row coefficients of the KL and CE gradients.
  const at::Tensor g = per_sample_grad(grad_loss, opt.reduction == Reduction::Mean ? Reduction::Sum : opt.reduction,
                                       batch, acc);
  const double mean_div = opt.reduction == Reduction::Mean ? static_cast<double>(batch) : 1.0;
  auto coefs = at::zeros({batch, 2}, s.options().dtype(acc));
  coefs.select(1, 0).copy_(g * (opt.kl_weight() / (temperature * mean_div)));
  at::Tensor y;
  if (opt.need_ce) {
    y = targets->contiguous();
    auto ce_coef = g * valid_rows(y, ignore_index, acc) * (1.0 - alpha);
    if (opt.reduction == Reduction::Mean) ce_coef.div_(valid_rows(y, ignore_index, acc).sum().clamp_min_(1));
    coefs.select(1, 1).copy_(ce_coef);
  }
  auto grads = backward_rows(s, t, y, stats.contiguous(), coefs, opt, output_mask[0], output_mask[1]);
  auto grad_s = output_mask[0] ? std::get<0>(grads) : unused_grad(student_logits);
  auto grad_t = output_mask[1] ? std::get<1>(grads) : unused_grad(teacher_logits);
  return {grad_s, grad_t};
}

}  // namespace kdfast
