// sparse_recoding_: argument checks and the chunk plan shared by the CPU and CUDA kernels.
// The scalar rule itself is in csrc/include/kdfast/sparse_recoding.h.
//
// Work is cut into fixed-size chunks of one tensor each (tensor index, start offset). Each chunk
// yields one partial sum of |theta|; a tensor's sum is its chunks' partials added in chunk order.
// The plan depends only on the tensor sizes, so the thresholds do not depend on the thread count
// (CPU) or on scheduling (CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace kdfast {
namespace sparse_recoding {

struct ChunkPlan {
  std::vector<int64_t> chunk_tensor;  // tensor index of each chunk
  std::vector<int64_t> chunk_start;   // first element of each chunk within its tensor
  std::vector<int64_t> tensor_first_chunk;  // size n + 1: chunks of tensor t are [first[t], first[t + 1])
  int64_t num_chunks() const { return static_cast<int64_t>(chunk_tensor.size()); }
};

inline ChunkPlan make_chunk_plan(at::TensorList params, int64_t chunk_len) {
  ChunkPlan plan;
  plan.tensor_first_chunk.reserve(params.size() + 1);
  for (size_t t = 0; t < params.size(); ++t) {
    plan.tensor_first_chunk.push_back(plan.num_chunks());
    const int64_t n = params[t].numel();
    for (int64_t start = 0; start < n; start += chunk_len) {
      plan.chunk_tensor.push_back(static_cast<int64_t>(t));
      plan.chunk_start.push_back(start);
    }
  }
  plan.tensor_first_chunk.push_back(plan.num_chunks());
  return plan;
}

inline void check_hyperparameters(double boost, double damp, double shrink, double tau_rate) {
  TORCH_CHECK_VALUE(std::isfinite(boost) && boost >= 1.0, "boost must be a finite number >= 1, got ", boost);
  TORCH_CHECK_VALUE(damp >= 0.0 && damp < 1.0, "damp must be in [0, 1), got ", damp);
  TORCH_CHECK_VALUE(std::isfinite(shrink) && shrink >= 0.0, "shrink must be a finite number >= 0, got ", shrink);
  TORCH_CHECK_VALUE(tau_rate >= 0.0 && tau_rate <= 1.0, "tau_rate must be in [0, 1], got ", tau_rate);
}

// Mirrored by kdfast/_checks.py:sparse_recoding_args (same messages).
inline void check_args(at::TensorList grads, at::TensorList params, const at::Tensor& taus, double boost,
                       double damp, double shrink, double tau_rate) {
  const int64_t n = static_cast<int64_t>(grads.size());
  TORCH_CHECK_VALUE(n > 0, "grads must contain at least one tensor, got an empty list");
  TORCH_CHECK_VALUE(static_cast<int64_t>(params.size()) == n, "params must have one tensor per grad: got ", n,
                    " grads and ", params.size(), " params");
  const at::Tensor& first = grads[0];
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(g.defined(), "grads[", i, "] must be a tensor, got None");
    TORCH_CHECK_VALUE(p.defined(), "params[", i, "] must be a tensor, got None");
    TORCH_CHECK_TYPE(at::isFloatingType(g.scalar_type()), "grads[", i,
                     "] must be float32, float64, float16 or bfloat16, got ", g.scalar_type());
    TORCH_CHECK_TYPE(p.scalar_type() == g.scalar_type(), "dtype mismatch: grads[", i, "] is ", g.scalar_type(),
                     " but params[", i, "] is ", p.scalar_type());
    TORCH_CHECK_TYPE(g.scalar_type() == first.scalar_type(), "all tensors must share one dtype: grads[0] is ",
                     first.scalar_type(), " but grads[", i, "] is ", g.scalar_type(),
                     " (kdfast.hooks.SparseRecoding groups tensors by device and dtype)");
    TORCH_CHECK_VALUE(g.device() == first.device(), "device mismatch: grads[0] is on ", first.device(),
                      " but grads[", i, "] is on ", g.device());
    TORCH_CHECK_VALUE(p.device() == g.device(), "device mismatch: grads[", i, "] is on ", g.device(),
                      " but params[", i, "] is on ", p.device());
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), "shape mismatch: grads[", i, "] has shape ", g.sizes(),
                      " but params[", i, "] has shape ", p.sizes());
    // Dense tensors with equal strides are walked as flat arrays (contiguous and channels_last both are).
    TORCH_CHECK_VALUE(g.is_non_overlapping_and_dense(), "grads[", i,
                      "] must be dense (contiguous, or a permutation of it such as channels_last), got strides ",
                      g.strides());
    TORCH_CHECK_VALUE(g.strides() == p.strides(), "layout mismatch: grads[", i, "] has strides ", g.strides(),
                      " but params[", i, "] has strides ", p.strides(), "; they must be equal");
  }
  TORCH_CHECK_VALUE(taus.defined(), "taus must be a tensor, got None");
  TORCH_CHECK_TYPE(taus.scalar_type() == at::kFloat, "taus must be float32, got ", taus.scalar_type());
  TORCH_CHECK_VALUE(taus.dim() == 1 && taus.size(0) == n, "taus must have shape (", n,
                    ",), one threshold per tensor, got shape ", taus.sizes());
  TORCH_CHECK_VALUE(taus.is_contiguous(), "taus must be contiguous");
  TORCH_CHECK_VALUE(taus.device() == first.device(), "device mismatch: grads[0] is on ", first.device(),
                    " but taus is on ", taus.device());
  check_hyperparameters(boost, damp, shrink, tau_rate);
}

// The ATen path (csrc/ops/aten/sparse_recoding.cpp): any device, capture-safe; the CUDA default.
void sparse_recoding_aten(at::TensorList grads, at::TensorList params, const at::Tensor& taus, double boost,
                          double damp, double shrink, double tau_rate);

}  // namespace sparse_recoding
}  // namespace kdfast
