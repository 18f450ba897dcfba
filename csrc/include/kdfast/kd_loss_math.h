// Row math of the fused Hinton KD loss (kd_loss), shared by the CPU loops and the CUDA kernels so
// the CUDA arithmetic is exercised by the CPU test-suite too. Free of ATen types.
//
// For one row (student logits s, teacher logits t, K classes, temperature T, target y):
//   lse_sT = logsumexp(s / T), lse_tT = logsumexp(t / T), lse_s1 = logsumexp(s)
//   KL(p_t || p_s) = sum_k p_t,k (t_k - s_k) / T - lse_tT + lse_sT        (p = softmax(. / T))
//   CE = lse_s1 - s_y
// Forward, per row: pass 1 takes max(s) and max(t); pass 2 accumulates the exp-sums below. Only the
// per-row statistics (RowStat) are kept for backward, which recomputes the softmaxes from them.
#pragma once

#include <cmath>

#include "kdfast/math.h"

// Host builds force-inline these, so a caller compiled for a wider ISA (the CPU kernel's
// target_clones) gets them compiled for that ISA too.
#if !defined(__CUDACC__) && !defined(__HIPCC__) && defined(__GNUC__)
#define KDFAST_KD_INLINE inline __attribute__((always_inline))
#else
#define KDFAST_KD_INLINE KDFAST_HOST_DEVICE
#endif

namespace kdfast {
namespace kd {

// Columns of the (B, kNumStats) statistics tensor returned by kd_loss and read by its backward.
enum RowStat : int {
  kLseStudentT = 0,  // logsumexp(s / T)
  kLseTeacherT = 1,  // logsumexp(t / T)
  kKl = 2,           // KL(p_t || p_s) of the row (no alpha, no T^2)
  kLseStudent = 3,   // logsumexp(s) (T = 1), 0 when the CE term is not computed
  kCe = 4,           // lse_s1 - s_y, 0 for ignored rows or when the CE term is not computed
  kNumStats = 5,
};

template <typename acc_t>
KDFAST_KD_INLINE acc_t log_(acc_t x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

// exp as a functor, so a backend can pass its own (the CPU loops pass a vectorisable one).
struct StdExp {
  template <typename acc_t>
  KDFAST_KD_INLINE acc_t operator()(acc_t x) const {
    return math::exp_<acc_t>(x);
  }
};

// Exp-sums of one row (or of a part of it, combined by adding), relative to the row maxima.
template <typename acc_t>
struct ExpSums {
  acc_t student_t = 0;       // sum exp((s - max_s) / T)
  acc_t teacher_t = 0;       // sum exp((t - max_t) / T)
  acc_t teacher_t_diff = 0;  // sum exp((t - max_t) / T) * (t - s)
  acc_t student_1 = 0;       // sum exp(s - max_s), only when the CE term is needed
};

// Adds one element's terms to the four sums (separate references so callers can keep them in
// lane arrays).
template <typename acc_t, class Exp = StdExp>
KDFAST_KD_INLINE void accumulate_terms(acc_t s, acc_t t, acc_t max_s, acc_t max_t, acc_t inv_t, bool need_ce,
                                         acc_t& student_t, acc_t& teacher_t, acc_t& teacher_t_diff, acc_t& student_1,
                                         Exp exp = Exp()) {
  const acc_t et = exp((t - max_t) * inv_t);
  student_t += exp((s - max_s) * inv_t);
  teacher_t += et;
  teacher_t_diff += et * (t - s);
  if (need_ce) student_1 += exp(s - max_s);
}

template <typename acc_t>
KDFAST_KD_INLINE void accumulate(acc_t s, acc_t t, acc_t max_s, acc_t max_t, acc_t inv_t, bool need_ce,
                                   ExpSums<acc_t>& acc) {
  accumulate_terms<acc_t>(s, t, max_s, max_t, inv_t, need_ce, acc.student_t, acc.teacher_t, acc.teacher_t_diff,
                          acc.student_1);
}

// Writes the row's statistics (all but kCe) from its maxima and exp-sums.
template <typename acc_t>
KDFAST_KD_INLINE void finish_row(acc_t max_s, acc_t max_t, const ExpSums<acc_t>& acc, acc_t inv_t, bool need_ce,
                                   acc_t* stats) {
  const acc_t log_sum_s = log_<acc_t>(acc.student_t), log_sum_t = log_<acc_t>(acc.teacher_t);
  stats[kLseStudentT] = max_s * inv_t + log_sum_s;
  stats[kLseTeacherT] = max_t * inv_t + log_sum_t;
  // lse_sT - lse_tT taken from the maxima and the log-sums (smaller than the lse values themselves).
  stats[kKl] = acc.teacher_t_diff / acc.teacher_t * inv_t + (max_s - max_t) * inv_t + (log_sum_s - log_sum_t);
  stats[kLseStudent] = need_ce ? max_s + log_<acc_t>(acc.student_1) : acc_t(0);
}

// d loss / d s_k. coef_kl = dL/dKL_row / T (so alpha * T^2 * KL gives alpha * T * (p_s - p_t));
// coef_ce = dL/dCE_row (0 for ignored rows or without the CE term).
// `need_ce` false skips the CE part (coef_ce must then be 0 or unused).
template <typename acc_t, class Exp = StdExp>
KDFAST_KD_INLINE acc_t student_grad(acc_t s, acc_t t, acc_t inv_t, const acc_t* stats, acc_t coef_kl, acc_t coef_ce,
                                      bool need_ce, bool is_target, Exp exp = Exp()) {
  const acc_t p_s = exp(s * inv_t - stats[kLseStudentT]);
  const acc_t p_t = exp(t * inv_t - stats[kLseTeacherT]);
  acc_t g = coef_kl * (p_s - p_t);
  if (need_ce) g += coef_ce * (exp(s - stats[kLseStudent]) - (is_target ? acc_t(1) : acc_t(0)));
  return g;
}

// d loss / d t_k = coef_kl * p_t,k * ((log p_t,k - log p_s,k) - KL_row)   (the CE term has no t).
template <typename acc_t, class Exp = StdExp>
KDFAST_KD_INLINE acc_t teacher_grad(acc_t s, acc_t t, acc_t inv_t, const acc_t* stats, acc_t coef_kl,
                                      Exp exp = Exp()) {
  const acc_t log_p_t = t * inv_t - stats[kLseTeacherT];
  const acc_t log_p_s = s * inv_t - stats[kLseStudentT];
  return coef_kl * exp(log_p_t) * ((log_p_t - log_p_s) - stats[kKl]);
}

}  // namespace kd
}  // namespace kdfast
