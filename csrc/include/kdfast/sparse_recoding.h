// Knowledge Representing's sparse recoding (Liu et al., CVPR-W 2019, arXiv 1911.05329): the scalar
// rule shared by the CPU loop (csrc/ops/cpu/sparse_recoding_kernel.cpp) and the CUDA kernel
// (csrc/ops/cuda/sparse_recoding_kernel.cu), so the CPU tests exercise the CUDA kernel's arithmetic.
//
// The paper's equations are not available; this is kdfast's interpretation of its text ("an equal
// reward within the learnable threshold, to slow down the update of inactive neurons; for the
// gradients out of the threshold, it boosts the update to highlight the dominant neurons"):
//   |theta| >  tau (dominant):  g' = boost * g
//   |theta| <= tau (inactive):  g' = damp * g + shrink * sign(theta)
// and after the step  tau <- tau + tau_rate * (mean |theta| - tau).
#pragma once

#include "kdfast/math.h"

namespace kdfast {
namespace sparse_recoding {

template <typename acc_t>
KDFAST_HOST_DEVICE acc_t magnitude(acc_t theta) {
  const acc_t negated = -theta;
  return theta < acc_t(0) ? negated : theta;
}

// g' for one entry, as factor * g + offset: (boost, 0) for dominant entries, (damp, shrink * sign)
// for inactive ones. Selects between ready values, no float op under a condition, so the CPU loop
// vectorises into blends (csrc/ops/cpu/sparse_recoding_kernel.cpp also compiles it without
// -ftrapping-math, under which GCC treats float compares as control flow).
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t recode(acc_t g, acc_t theta, acc_t tau, acc_t boost, acc_t damp, acc_t shrink) {
  const acc_t sign = acc_t(theta > acc_t(0)) - acc_t(theta < acc_t(0));
  const bool dominant = magnitude(theta) > tau;
  const acc_t factor = dominant ? boost : damp;
  const acc_t offset = dominant ? acc_t(0) : shrink * sign;
  return factor * g + offset;
}

// The threshold's update from the sum of |theta| over `numel` entries (a tensor without entries
// keeps its threshold: it has no mean).
KDFAST_HOST_DEVICE float next_tau(float tau, double abs_sum, long long numel, double tau_rate) {
  if (numel <= 0) return tau;
  const double mean = abs_sum / static_cast<double>(numel);
  return static_cast<float>(static_cast<double>(tau) + tau_rate * (mean - static_cast<double>(tau)));
}

}  // namespace sparse_recoding
}  // namespace kdfast
