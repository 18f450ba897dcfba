// sparse_recoding_ on CPU: one pass over every (theta, g) pair of the list, in fixed-size chunks
// spread over threads with at::parallel_for. Each chunk applies the rule of
// kdfast/sparse_recoding.h and sums |theta| into its own slot; the slots of a tensor are then added
// in chunk order, so the new thresholds do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../kernel_paths.h"
#include "../sparse_recoding_impl.h"

// GCC's default -ftrapping-math turns the float compares of the rule into branches and blocks
// vectorisation (~40 ns per element with mispredictions instead of < 1 ns). Nothing here relies on
// floating-point exception flags, so this file's loops are compiled without it. Must come before
// kdfast/sparse_recoding.h so the rule's template carries the option too.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "kdfast/sparse_recoding.h"

namespace kdfast {
namespace {

using sparse_recoding::recode;

// Elements per chunk: large enough to amortise the scheduling, small enough to spread one big
// tensor over the threads.
constexpr int64_t kChunk = 1 << 16;
// Independent partial sums per chunk so the |theta| sum vectorises without reassociating floats.
constexpr int kLanes = 16;
// Half types are converted through float buffers of this many elements (stay in L1).
constexpr int64_t kBlock = 1024;

// Applies the rule to n entries of float/double data in place; returns sum |theta| (lane-wise,
// then lanes in order: a fixed order for a given n).
template <typename acc_t>
acc_t recode_span(acc_t* g, const acc_t* theta, int64_t n, acc_t tau, acc_t boost, acc_t damp, acc_t shrink) {
  acc_t lane_sum[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t th = theta[i + l];
      g[i + l] = recode(g[i + l], th, tau, boost, damp, shrink);
      lane_sum[l] += sparse_recoding::magnitude(th);
    }
  }
  for (; i < n; ++i) {
    g[i] = recode(g[i], theta[i], tau, boost, damp, shrink);
    lane_sum[0] += sparse_recoding::magnitude(theta[i]);
  }
  acc_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += lane_sum[l];
  return total;
}

// One chunk of a float16/bfloat16 tensor: converted to float in blocks, recoded, converted back.
template <typename scalar_t>
float recode_span_reduced(scalar_t* g, const scalar_t* theta, int64_t n, float tau, float boost, float damp,
                          float shrink) {
  float g_buf[kBlock], theta_buf[kBlock];
  float total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    at::vec::convert(theta + start, theta_buf, len);
    at::vec::convert(g + start, g_buf, len);
    total += recode_span<float>(g_buf, theta_buf, len, tau, boost, damp, shrink);
    at::vec::convert(g_buf, g + start, len);
  }
  return total;
}

// One chunk of any dtype: float/double in place, float16/bfloat16 through float buffers.
template <typename scalar_t>
double recode_chunk(scalar_t* g, const scalar_t* theta, int64_t n, float tau, double boost, double damp,
                    double shrink) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return recode_span<acc_t>(g, theta, n, acc_t(tau), acc_t(boost), acc_t(damp), acc_t(shrink));
  } else {
    return recode_span_reduced<scalar_t>(g, theta, n, tau, float(boost), float(damp), float(shrink));
  }
}

void sparse_recoding_cpu(at::TensorList grads, at::TensorList params, const at::Tensor& taus, double boost,
                         double damp, double shrink, double tau_rate) {
  sparse_recoding::check_args(grads, params, taus, boost, damp, shrink, tau_rate);
  if (!paths::use_kernel(paths::kSparseRecoding, grads[0])) {  // KDFAST_CPU_KERNELS (kernel_paths.h)
    sparse_recoding::sparse_recoding_aten(grads, params, taus, boost, damp, shrink, tau_rate);
    return;
  }
  const auto plan = sparse_recoding::make_chunk_plan(params, kChunk);
  const int64_t num_chunks = plan.num_chunks();
  std::vector<double> partial(num_chunks, 0.0);
  float* tau_data = taus.data_ptr<float>();
  const std::vector<float> tau_now(tau_data, tau_data + taus.numel());  // the thresholds of this step

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "kdfast_sparse_recoding", [&] {
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t t = plan.chunk_tensor[c], start = plan.chunk_start[c];
        const int64_t len = std::min(kChunk, params[t].numel() - start);
        scalar_t* g = grads[t].data_ptr<scalar_t>() + start;
        const scalar_t* theta = params[t].data_ptr<scalar_t>() + start;
        partial[c] = recode_chunk<scalar_t>(g, theta, len, tau_now[t], boost, damp, shrink);
      }
    });
  });

  for (size_t t = 0; t < grads.size(); ++t) {
    double sum = 0;
    for (int64_t c = plan.tensor_first_chunk[t]; c < plan.tensor_first_chunk[t + 1]; ++c) sum += partial[c];
    tau_data[t] = sparse_recoding::next_tau(tau_now[t], sum, params[t].numel(), tau_rate);
  }
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("sparse_recoding_", &kdfast::sparse_recoding_cpu);
}
