// Fused KD loss on CPU: at::parallel_for over rows, at::vec loops within a row.
// Forward per row, two passes over the (cache-resident) row: vectorised max of s and t, then the
// vectorised exp-sums of kdfast/kd_loss_math.h (the vector body mirrors kd::accumulate; the tail
// and the final statistics use the shared scalar functions). Two passes rather than an online
// softmax keep the inner loop branch-free and vectorisable; a row of 32k float32 logits is 128 KiB.
// float16/bfloat16 logits are converted to float32 first.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../kd_loss_impl.h"

namespace kdfast {
namespace {

at::Tensor as_cpu_compute(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble || x.scalar_type() == at::kFloat ? x : unit_stride_rows(x.to(at::kFloat));
}

// Rows per parallel_for task: about 32k elements each, at least one row.
int64_t row_grain(int64_t k) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(k, 1));
}

void check_target_range(const at::Tensor& y, int64_t k, int64_t ignore_index) {
  const int64_t* data = y.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < y.size(0); ++n) {
    TORCH_CHECK_VALUE(data[n] == ignore_index || (data[n] >= 0 && data[n] < k), "targets[", n, "] = ", data[n],
                      " is out of range: expected a class index in [0, ", k, ") or ignore_index = ", ignore_index);
  }
}

template <typename scalar_t>
void forward_rows_typed(const at::Tensor& s, const at::Tensor& t, const at::Tensor& y, const KdOptions& opt,
                        at::Tensor& stats) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t batch = s.size(0), k = s.size(1);
  const int64_t s_stride = s.stride(0), t_stride = t.stride(0);
  const scalar_t* s_data = s.const_data_ptr<scalar_t>();
  const scalar_t* t_data = t.const_data_ptr<scalar_t>();
  const int64_t* y_data = opt.need_ce ? y.const_data_ptr<int64_t>() : nullptr;
  scalar_t* out = stats.data_ptr<scalar_t>();
  const auto inv_t = static_cast<scalar_t>(1.0 / opt.temperature);
  const bool need_ce = opt.need_ce;
  at::parallel_for(0, batch, row_grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* sr = s_data + n * s_stride;
      const scalar_t* tr = t_data + n * t_stride;
      const auto vmax = [](Vec a, Vec b) { return at::vec::maximum(a, b); };
      const scalar_t max_s = at::vec::reduce_all<scalar_t>(vmax, sr, k);
      const scalar_t max_t = at::vec::reduce_all<scalar_t>(vmax, tr, k);
      // Vector body: the same sums as kd::accumulate, lane-wise.
      const Vec vms(max_s), vmt(max_t), vinv(inv_t);
      Vec sum_s(0), sum_t(0), sum_diff(0), sum_s1(0);
      int64_t i = 0;
      for (; i + Vec::size() <= k; i += Vec::size()) {
        const Vec vs = Vec::loadu(sr + i), vt = Vec::loadu(tr + i);
        const Vec et = ((vt - vmt) * vinv).exp();
        sum_s = sum_s + ((vs - vms) * vinv).exp();
        sum_t = sum_t + et;
        sum_diff = sum_diff + et * (vt - vs);
        if (need_ce) sum_s1 = sum_s1 + (vs - vms).exp();
      }
      const auto vsum = [](Vec a, Vec b) { return a + b; };
      kd::ExpSums<scalar_t> acc;
      acc.student_t = at::vec::vec_reduce_all<scalar_t>(vsum, sum_s);
      acc.teacher_t = at::vec::vec_reduce_all<scalar_t>(vsum, sum_t);
      acc.teacher_t_diff = at::vec::vec_reduce_all<scalar_t>(vsum, sum_diff);
      acc.student_1 = need_ce ? at::vec::vec_reduce_all<scalar_t>(vsum, sum_s1) : scalar_t(0);
      for (; i < k; ++i) kd::accumulate<scalar_t>(sr[i], tr[i], max_s, max_t, inv_t, need_ce, acc);
      scalar_t* row_stats = out + n * kd::kNumStats;
      kd::finish_row<scalar_t>(max_s, max_t, acc, inv_t, need_ce, row_stats);
      scalar_t ce = 0;
      if (need_ce && y_data[n] != opt.ignore_index) ce = row_stats[kd::kLseStudent] - sr[y_data[n]];
      row_stats[kd::kCe] = ce;
    }
  });
}

void kd_forward_rows_cpu(const at::Tensor& s_in, const at::Tensor& t_in, const at::Tensor& y, const KdOptions& opt,
                         at::Tensor& stats) {
  if (opt.need_ce) check_target_range(y, s_in.size(1), opt.ignore_index);
  const auto s = as_cpu_compute(s_in), t = as_cpu_compute(t_in);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "kdfast_kd_loss_cpu", [&] { forward_rows_typed<scalar_t>(s, t, y, opt, stats); });
}

// grad_s[n, k] = coef_kl (p_s - p_t) + coef_ce (softmax(s)_k - [k == y]); grad_t per kd::teacher_grad.
template <typename scalar_t>
void backward_rows_typed(const at::Tensor& s, const at::Tensor& t, const at::Tensor& y, const at::Tensor& stats,
                         const at::Tensor& coefs, const KdOptions& opt, at::Tensor* grad_s, at::Tensor* grad_t) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t batch = s.size(0), k = s.size(1);
  const int64_t s_stride = s.stride(0), t_stride = t.stride(0);
  const scalar_t* s_data = s.const_data_ptr<scalar_t>();
  const scalar_t* t_data = t.const_data_ptr<scalar_t>();
  const scalar_t* st = stats.const_data_ptr<scalar_t>();
  const scalar_t* cf = coefs.const_data_ptr<scalar_t>();
  const int64_t* y_data = opt.need_ce ? y.const_data_ptr<int64_t>() : nullptr;
  scalar_t* gs = grad_s ? grad_s->data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = grad_t ? grad_t->data_ptr<scalar_t>() : nullptr;
  const auto inv_t = static_cast<scalar_t>(1.0 / opt.temperature);
  at::parallel_for(0, batch, row_grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* sr = s_data + n * s_stride;
      const scalar_t* tr = t_data + n * t_stride;
      const scalar_t* row_stats = st + n * kd::kNumStats;
      const scalar_t coef_kl = cf[2 * n], coef_ce = cf[2 * n + 1];
      const Vec vinv(inv_t), vlse_s(row_stats[kd::kLseStudentT]), vlse_t(row_stats[kd::kLseTeacherT]);
      const Vec vlse_s1(row_stats[kd::kLseStudent]), vkl(row_stats[kd::kKl]), vckl(coef_kl), vcce(coef_ce);
      const int64_t vec_end = k - k % Vec::size();
      if (gs != nullptr) {
        scalar_t* out = gs + n * k;
        for (int64_t i = 0; i < vec_end; i += Vec::size()) {
          const Vec vs = Vec::loadu(sr + i), vt = Vec::loadu(tr + i);
          Vec g = vckl * ((vs * vinv - vlse_s).exp() - (vt * vinv - vlse_t).exp());
          if (coef_ce != scalar_t(0)) g = g + vcce * (vs - vlse_s1).exp();
          g.store(out + i);
        }
        for (int64_t i = vec_end; i < k; ++i)
          out[i] = kd::student_grad<scalar_t>(sr[i], tr[i], inv_t, row_stats, coef_kl, coef_ce, false);
        if (coef_ce != scalar_t(0)) out[y_data[n]] -= coef_ce;  // the one-hot part
      }
      if (gt != nullptr) {
        scalar_t* out = gt + n * k;
        for (int64_t i = 0; i < vec_end; i += Vec::size()) {
          const Vec vs = Vec::loadu(sr + i), vt = Vec::loadu(tr + i);
          const Vec log_p_t = vt * vinv - vlse_t, log_p_s = vs * vinv - vlse_s;
          (vckl * log_p_t.exp() * ((log_p_t - log_p_s) - vkl)).store(out + i);
        }
        for (int64_t i = vec_end; i < k; ++i) out[i] = kd::teacher_grad<scalar_t>(sr[i], tr[i], inv_t, row_stats, coef_kl);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kd_backward_rows_cpu(const at::Tensor& s_in, const at::Tensor& t_in,
                                                        const at::Tensor& y, const at::Tensor& stats,
                                                        const at::Tensor& coefs, const KdOptions& opt, bool need_s,
                                                        bool need_t) {
  if (opt.need_ce) check_target_range(y, s_in.size(1), opt.ignore_index);  // the one-hot write indexes by it
  const auto s = as_cpu_compute(s_in), t = as_cpu_compute(t_in);
  at::Tensor grad_s = need_s ? at::empty(s.sizes(), s.options()) : at::Tensor();
  at::Tensor grad_t = need_t ? at::empty(t.sizes(), t.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "kdfast_kd_loss_backward_cpu", [&] {
    backward_rows_typed<scalar_t>(s, t, y, stats, coefs, opt, need_s ? &grad_s : nullptr, need_t ? &grad_t : nullptr);
  });
  const auto dtype = s_in.scalar_type();
  return {need_s ? grad_s.to(dtype) : grad_s, need_t ? grad_t.to(dtype) : grad_t};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_cpu(const at::Tensor& s, const at::Tensor& t,
                                               const c10::optional<at::Tensor>& targets, double temperature,
                                               double alpha, bool t2_scale, int64_t ignore_index,
                                               c10::string_view reduction) {
  return kd_loss_impl(&kd_forward_rows_cpu, s, t, targets, temperature, alpha, t2_scale, ignore_index, reduction);
}

std::tuple<at::Tensor, at::Tensor> kd_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& s,
                                                        const at::Tensor& t, const c10::optional<at::Tensor>& targets,
                                                        const at::Tensor& stats, double temperature, double alpha,
                                                        bool t2_scale, int64_t ignore_index,
                                                        c10::string_view reduction, std::array<bool, 2> output_mask) {
  return kd_loss_backward_impl(&kd_backward_rows_cpu, grad_loss, s, t, targets, stats, temperature, alpha, t2_scale,
                               ignore_index, reduction, output_mask);
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("kd_loss", &kdfast::kd_loss_cpu);
  m.impl("_kd_loss_backward", &kdfast::kd_loss_backward_cpu);
}
