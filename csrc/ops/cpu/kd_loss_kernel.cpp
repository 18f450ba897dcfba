// Fused KD loss on CPU: at::parallel_for over rows; within a row, plain loops that the compiler
// vectorises, over the shared row math of kdfast/kd_loss_math.h with a vectorisable exp (FastExp).
//
// Why not at::vec: an extension is compiled for the baseline ISA, where at::vec's exp is a scalar
// std::exp loop (measured ~4x slower per element than torch's own AVX2 exp). Instead the row
// loops are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA) and the baseline (GCC
// target_clones, picked by CPU features at load time; other compilers/ISAs: one plain build) and
// call FastExp, a branch-free exp (max relative error ~1 ulp in float and in double, see below).
// Reductions keep kLanes partial sums (a fixed, thread-count independent order) so they vectorise
// without -ffast-math.
// Forward per row: pass 1 max(s), max(t); pass 2 the exp-sums; two passes over the cache-resident
// row (32k float32 logits are 128 KiB) keep both loops branch-free, which an online softmax's
// per-element rescaling would not. float16/bfloat16 logits are converted to float32 first.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../kd_loss_impl.h"
#include "../kernel_paths.h"

// Comparisons in the clamps and maxima may then be if-converted (vectorised); kdfast does not
// rely on floating-point exception flags. (Functions from headers, e.g. std::min, now have other
// optimisation options and are not inlined into the loops below: the loops avoid them.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__)
#define KDFAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KDFAST_CPU_CLONES
#endif
#if defined(__GNUC__)
#define KDFAST_FORCE_INLINE inline __attribute__((always_inline))
#else
#define KDFAST_FORCE_INLINE inline
#endif

namespace kdfast {
namespace {

// exp(x): round-to-nearest n = x / ln2 through the 1.5 * 2^(mantissa bits) constant, Cody-Waite
// reduction r = x - n ln2 (|r| <= ln2 / 2), polynomial for exp(r), 2^n from the exponent bits.
// Inputs are clamped to the normal range: exp(x < -87) gives exp(-87) ~ 1.6e-38 (float), exp(x < -708)
// ~ 3e-308 (double) instead of a subnormal or 0. Max relative error measured on [-80, 80]:
// 8e-8 (float, eps 1.2e-7), 2.2e-16 (double).
struct FastExp {
  KDFAST_FORCE_INLINE float operator()(float x) const {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // no std::min/max: see the pragma above
    const float magic = 12582912.0f;  // 1.5 * 2^23
    const float t = x * 1.44269504088896341f + magic;
    const float n = t - magic;
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 = 0.693359375 - 2.12194440e-4
    float p = 1.9875691500e-4f;  // Cephes expf minimax coefficients
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    int32_t bits;
    std::memcpy(&bits, &t, sizeof bits);
    const int32_t scale_bits = (bits - 0x4B400000 + 127) * (1 << 23);  // n sits in t's low mantissa bits
    float scale;
    std::memcpy(&scale, &scale_bits, sizeof scale);
    return y * scale;
  }
  KDFAST_FORCE_INLINE double operator()(double x) const {
    x = x < -708.0 ? -708.0 : (x > 709.0 ? 709.0 : x);
    const double magic = 6755399441055744.0;  // 1.5 * 2^52
    const double t = x * 1.4426950408889634 + magic;
    const double n = t - magic;
    const double r = (x - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6;
    double p = 1.0 / 6227020800.0;  // Taylor series to r^13 / 13!: truncation < 1e-17 on |r| <= ln2 / 2
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    const double y = p * r * r + r + 1.0;
    int64_t bits;
    std::memcpy(&bits, &t, sizeof bits);
    const int64_t scale_bits = (bits - 0x4338000000000000LL + 1023) * (int64_t(1) << 52);
    double scale;
    std::memcpy(&scale, &scale_bits, sizeof scale);
    return y * scale;
  }
};

constexpr int64_t kLanes = 16;

template <typename T>
KDFAST_FORCE_INLINE T lanes_max(const T* x, int64_t k) {
  T m[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) m[l] = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
  T out = -std::numeric_limits<T>::infinity();
  for (int64_t l = 0; l < kLanes; ++l) out = m[l] > out ? m[l] : out;
  for (; i < k; ++i) out = x[i] > out ? x[i] : out;
  return out;
}

// One row's statistics (kd::RowStat) into row_stats.
template <typename T, bool NeedCe>
KDFAST_FORCE_INLINE void forward_row(const T* s, const T* t, int64_t k, T inv_t, int64_t target, int64_t ignore_index,
                        T* row_stats) {
  const T max_s = lanes_max(s, k), max_t = lanes_max(t, k);
  T sum_s[kLanes] = {}, sum_t[kLanes] = {}, sum_diff[kLanes] = {}, sum_s1[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l)
      kd::accumulate_terms<T, FastExp>(s[i + l], t[i + l], max_s, max_t, inv_t, NeedCe, sum_s[l], sum_t[l],
                                       sum_diff[l], sum_s1[l]);
  kd::ExpSums<T> acc;
  for (int64_t l = 0; l < kLanes; ++l) {
    acc.student_t += sum_s[l];
    acc.teacher_t += sum_t[l];
    acc.teacher_t_diff += sum_diff[l];
    acc.student_1 += sum_s1[l];
  }
  for (; i < k; ++i)
    kd::accumulate_terms<T, FastExp>(s[i], t[i], max_s, max_t, inv_t, NeedCe, acc.student_t, acc.teacher_t,
                                     acc.teacher_t_diff, acc.student_1);
  kd::finish_row<T>(max_s, max_t, acc, inv_t, NeedCe, row_stats);
  row_stats[kd::kCe] = NeedCe && target != ignore_index ? row_stats[kd::kLseStudent] - s[target] : T(0);
}

template <typename T, bool NeedCe>
KDFAST_FORCE_INLINE void student_grad_row(const T* s, const T* t, int64_t k, T inv_t, const T* row_stats, T coef_kl, T coef_ce,
                             int64_t target, T* out) {
  for (int64_t i = 0; i < k; ++i)
    out[i] = kd::student_grad<T, FastExp>(s[i], t[i], inv_t, row_stats, coef_kl, coef_ce, NeedCe, false);
  if (NeedCe) out[target] -= coef_ce;  // the one-hot part
}

template <typename T>
KDFAST_FORCE_INLINE void teacher_grad_row(const T* s, const T* t, int64_t k, T inv_t, const T* row_stats, T coef_kl, T* out) {
  for (int64_t i = 0; i < k; ++i) out[i] = kd::teacher_grad<T, FastExp>(s[i], t[i], inv_t, row_stats, coef_kl);
}

// The ISA-cloned entry points: one non-template function per (dtype, variant).
#define KDFAST_KD_ROW_FUNCTIONS(T)                                                                                     \
  KDFAST_CPU_CLONES void forward_row_ce(const T* s, const T* t, int64_t k, T inv_t, int64_t target, int64_t ignore,   \
                                        T* row_stats) {                                                                \
    forward_row<T, true>(s, t, k, inv_t, target, ignore, row_stats);                                                   \
  }                                                                                                                    \
  KDFAST_CPU_CLONES void forward_row_kl(const T* s, const T* t, int64_t k, T inv_t, int64_t target, int64_t ignore,   \
                                        T* row_stats) {                                                                \
    forward_row<T, false>(s, t, k, inv_t, target, ignore, row_stats);                                                  \
  }                                                                                                                    \
  KDFAST_CPU_CLONES void student_grad_row_ce(const T* s, const T* t, int64_t k, T inv_t, const T* row_stats,          \
                                             T coef_kl, T coef_ce, int64_t target, T* out) {                           \
    student_grad_row<T, true>(s, t, k, inv_t, row_stats, coef_kl, coef_ce, target, out);                               \
  }                                                                                                                    \
  KDFAST_CPU_CLONES void student_grad_row_kl(const T* s, const T* t, int64_t k, T inv_t, const T* row_stats,          \
                                             T coef_kl, T coef_ce, int64_t target, T* out) {                           \
    student_grad_row<T, false>(s, t, k, inv_t, row_stats, coef_kl, coef_ce, target, out);                              \
  }                                                                                                                    \
  KDFAST_CPU_CLONES void teacher_grad_row_any(const T* s, const T* t, int64_t k, T inv_t, const T* row_stats,         \
                                              T coef_kl, T* out) {                                                     \
    teacher_grad_row<T>(s, t, k, inv_t, row_stats, coef_kl, out);                                                      \
  }

KDFAST_KD_ROW_FUNCTIONS(float)
KDFAST_KD_ROW_FUNCTIONS(double)
#undef KDFAST_KD_ROW_FUNCTIONS

at::Tensor as_cpu_compute(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble || x.scalar_type() == at::kFloat ? x : unit_stride_rows(x.to(at::kFloat));
}

// Rows per parallel_for task: about 32k elements each, at least one row.
int64_t row_grain(int64_t k) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(k, 1));
}

template <typename scalar_t>
void forward_rows_typed(const at::Tensor& s, const at::Tensor& t, const at::Tensor& y, const KdOptions& opt,
                        at::Tensor& stats) {
  const int64_t batch = s.size(0), k = s.size(1);
  const int64_t s_stride = s.stride(0), t_stride = t.stride(0);
  const scalar_t* s_data = s.const_data_ptr<scalar_t>();
  const scalar_t* t_data = t.const_data_ptr<scalar_t>();
  const int64_t* y_data = opt.need_ce ? y.const_data_ptr<int64_t>() : nullptr;
  scalar_t* out = stats.data_ptr<scalar_t>();
  const auto inv_t = static_cast<scalar_t>(1.0 / opt.temperature);
  at::parallel_for(0, batch, row_grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const auto row = [&](auto fn, int64_t target) {
        fn(s_data + n * s_stride, t_data + n * t_stride, k, inv_t, target, opt.ignore_index, out + n * kd::kNumStats);
      };
      if (opt.need_ce) {
        row(static_cast<void (*)(const scalar_t*, const scalar_t*, int64_t, scalar_t, int64_t, int64_t, scalar_t*)>(
                &forward_row_ce),
            y_data[n]);
      } else {
        row(static_cast<void (*)(const scalar_t*, const scalar_t*, int64_t, scalar_t, int64_t, int64_t, scalar_t*)>(
                &forward_row_kl),
            opt.ignore_index);
      }
    }
  });
}

void kd_forward_rows_cpu(const at::Tensor& s_in, const at::Tensor& t_in, const at::Tensor& y, const KdOptions& opt,
                         at::Tensor& stats) {
  if (opt.need_ce) check_target_range(y, s_in.size(1), opt.ignore_index);
  const auto s = as_cpu_compute(s_in), t = as_cpu_compute(t_in);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "kdfast_kd_loss_cpu", [&] { forward_rows_typed<scalar_t>(s, t, y, opt, stats); });
}

template <typename scalar_t>
void backward_rows_typed(const at::Tensor& s, const at::Tensor& t, const at::Tensor& y, const at::Tensor& stats,
                         const at::Tensor& coefs, const KdOptions& opt, at::Tensor* grad_s, at::Tensor* grad_t) {
  using StudentRow = void (*)(const scalar_t*, const scalar_t*, int64_t, scalar_t, const scalar_t*, scalar_t,
                              scalar_t, int64_t, scalar_t*);
  using TeacherRow = void (*)(const scalar_t*, const scalar_t*, int64_t, scalar_t, const scalar_t*, scalar_t, scalar_t*);
  const StudentRow student_ce = &student_grad_row_ce, student_kl = &student_grad_row_kl;
  const TeacherRow teacher = &teacher_grad_row_any;
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
      // coef_ce is 0 for ignored rows (and without the CE term): they take the KL-only loop.
      if (gs != nullptr) {
        if (coef_ce != scalar_t(0)) {
          student_ce(sr, tr, k, inv_t, row_stats, coef_kl, coef_ce, y_data[n], gs + n * k);
        } else {
          student_kl(sr, tr, k, inv_t, row_stats, coef_kl, coef_ce, 0, gs + n * k);
        }
      }
      if (gt != nullptr) teacher(sr, tr, k, inv_t, row_stats, coef_kl, gt + n * k);
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

// KDFAST_CPU_KERNELS can select the ATen path instead (kernel_paths.h).
std::tuple<at::Tensor, at::Tensor> kd_loss_cpu(const at::Tensor& s, const at::Tensor& t,
                                               const c10::optional<at::Tensor>& targets, double temperature,
                                               double alpha, bool t2_scale, int64_t ignore_index,
                                               c10::string_view reduction) {
  const KdForwardRows rows = paths::use_kernel(paths::kKdLoss, s) ? &kd_forward_rows_cpu : &kd_forward_rows_aten;
  return kd_loss_impl(rows, s, t, targets, temperature, alpha, t2_scale, ignore_index, reduction);
}

std::tuple<at::Tensor, at::Tensor> kd_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& s,
                                                        const at::Tensor& t, const c10::optional<at::Tensor>& targets,
                                                        const at::Tensor& stats, double temperature, double alpha,
                                                        bool t2_scale, int64_t ignore_index,
                                                        c10::string_view reduction, std::array<bool, 2> output_mask) {
  const KdBackwardRows rows = paths::use_kernel(paths::kKdLoss, s) ? &kd_backward_rows_cpu : &kd_backward_rows_aten;
  return kd_loss_backward_impl(rows, grad_loss, s, t, targets, stats, temperature, alpha, t2_scale, ignore_index,
                               reduction, output_mask);
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("kd_loss", &kdfast::kd_loss_cpu);
  m.impl("_kd_loss_backward", &kdfast::kd_loss_backward_cpu);
}
