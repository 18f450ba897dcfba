// The KD loss's ATen path (see ../kd_loss_impl.h for the hooks and kdfast/kd_loss_math.h for the
// row math): the same per-row statistics and gradients as the fused CPU/CUDA kernels, from ATen
// calls only, in the accumulate dtype. Simple rather than lean: it holds a few (B, K) temporaries.
#include <ATen/ATen.h>

#include "../kd_loss_impl.h"

namespace kdfast {
namespace {

// Targets with ignored rows pointed at class 0, so gather and the one-hot mask can index every row;
// those rows' CE terms are zeroed (forward) or have coefficient 0 (backward).
at::Tensor safe_targets(const at::Tensor& y, int64_t ignore_index) {
  return y.masked_fill(y.eq(ignore_index), 0);
}

}  // namespace

void kd_forward_rows_aten(const at::Tensor& s_in, const at::Tensor& t_in, const at::Tensor& y, const KdOptions& opt,
                          at::Tensor& stats) {
  const auto acc = stats.scalar_type();
  if (opt.need_ce && y.is_cpu()) check_target_range(y, s_in.size(1), opt.ignore_index);
  const auto s = s_in.to(acc), t = t_in.to(acc);
  const double inv_t = 1.0 / opt.temperature;
  // The row math of kd::finish_row, term for term: exp-sums relative to the row maxima, and
  // KL = sum_k e_t,k (t_k - s_k) / sum_k e_t,k / T + (max_s - max_t) / T + (log sum e_s - log sum e_t).
  const auto max_s = s.amax({1}, true), max_t = t.amax({1}, true);
  const auto e_t = at::exp((t - max_t) * inv_t);
  const auto sum_t = e_t.sum({1}), sum_s = at::exp((s - max_s) * inv_t).sum({1});
  const auto log_sum_s = sum_s.log(), log_sum_t = sum_t.log();
  const auto ms = max_s.squeeze(1), mt = max_t.squeeze(1);
  const auto kl = at::sum(e_t * (t - s), {1}).div_(sum_t).mul_(inv_t).add_((ms - mt) * inv_t).add_(log_sum_s - log_sum_t);
  stats.select(1, kd::kLseStudentT).copy_(ms * inv_t + log_sum_s);
  stats.select(1, kd::kLseTeacherT).copy_(mt * inv_t + log_sum_t);
  stats.select(1, kd::kKl).copy_(kl);
  if (opt.need_ce) {
    const auto lse_s1 = at::logsumexp(s, {1});
    const auto picked = s.gather(1, safe_targets(y, opt.ignore_index).unsqueeze(1)).squeeze(1);
    stats.select(1, kd::kLseStudent).copy_(lse_s1);
    stats.select(1, kd::kCe).copy_(at::where(y.ne(opt.ignore_index), lse_s1 - picked, at::zeros({}, s.options())));
  } else {
    stats.select(1, kd::kLseStudent).zero_();
    stats.select(1, kd::kCe).zero_();
  }
}

std::tuple<at::Tensor, at::Tensor> kd_backward_rows_aten(const at::Tensor& s_in, const at::Tensor& t_in,
                                                         const at::Tensor& y, const at::Tensor& stats,
                                                         const at::Tensor& coefs, const KdOptions& opt, bool need_s,
                                                         bool need_t) {
  const auto acc = stats.scalar_type();
  if (opt.need_ce && y.is_cpu()) check_target_range(y, s_in.size(1), opt.ignore_index);
  const auto s = s_in.to(acc), t = t_in.to(acc);
  const double inv_t = 1.0 / opt.temperature;
  const auto column = [&](int k) { return stats.select(1, k).unsqueeze(1); };
  const auto coef_kl = coefs.select(1, 0).unsqueeze(1), coef_ce = coefs.select(1, 1).unsqueeze(1);
  const auto log_p_s = s * inv_t - column(kd::kLseStudentT);
  const auto log_p_t = t * inv_t - column(kd::kLseTeacherT);
  const auto p_t = at::exp(log_p_t);
  at::Tensor grad_s, grad_t;
  if (need_s) {
    // coef_kl (p_s - p_t) + coef_ce (softmax(s) - onehot(y)); coef_ce is 0 on ignored rows.
    grad_s = coef_kl * (at::exp(log_p_s) - p_t);
    if (opt.need_ce) {
      const auto classes = at::arange(s.size(1), y.options());
      const auto onehot = classes.unsqueeze(0).eq(safe_targets(y, opt.ignore_index).unsqueeze(1));
      grad_s.add_(coef_ce * (at::exp(s - column(kd::kLseStudent)) - onehot.to(acc)));
    }
    grad_s = grad_s.to(s_in.scalar_type());
  }
  if (need_t) {
    // coef_kl p_t ((log p_t - log p_s) - KL_row)
    grad_t = (coef_kl * p_t * ((log_p_t - log_p_s) - column(kd::kKl))).to(t_in.scalar_type());
  }
  return {grad_s, grad_t};
}

}  // namespace kdfast
