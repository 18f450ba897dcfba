// Fused KD loss on CUDA (run only where kernel_paths.h enables it; the ATen path otherwise). Forward: one block per row; pass 1 block-max of s and t, pass 2 the
// exp-sums of kdfast/kd_loss_math.h (the second read of the row mostly hits L2), thread 0 writes the
// row's statistics. Backward: elementwise over B*K from the logits and the saved row statistics
// (no reductions). float32/float16/bfloat16/float64 in; float32 (float64 for float64) accumulate.
// Targets out of range trip a device-side assert (as F.cross_entropy on CUDA).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <limits>

#include "../kd_loss_impl.h"
#include "../kernel_paths.h"
#include "kernels.cuh"

namespace kdfast {
namespace {

using cuda::kWarp;

template <typename acc_t>
__device__ __forceinline__ acc_t block_max(acc_t value, acc_t* shared) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const acc_t other = __shfl_down_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < blockDim.x / kWarp ? shared[lane] : -std::numeric_limits<acc_t>::infinity();
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const acc_t other = __shfl_down_sync(0xffffffffu, value, offset);
      value = other > value ? other : value;
    }
    if (lane == 0) shared[0] = value;
  }
  __syncthreads();
  value = shared[0];
  __syncthreads();
  return value;
}

template <typename in_t, typename acc_t>
__global__ void kd_forward_kernel(const in_t* __restrict__ s, int64_t s_stride, const in_t* __restrict__ t,
                                  int64_t t_stride, const int64_t* __restrict__ y, int64_t k, acc_t inv_t,
                                  bool need_ce, int64_t ignore_index, acc_t* __restrict__ stats) {
  __shared__ acc_t shared[cuda::kThreads / kWarp];
  const int64_t n = blockIdx.x;
  const in_t* sr = s + n * s_stride;
  const in_t* tr = t + n * t_stride;
  acc_t max_s = -std::numeric_limits<acc_t>::infinity(), max_t = max_s;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const acc_t vs = static_cast<acc_t>(sr[i]), vt = static_cast<acc_t>(tr[i]);
    max_s = vs > max_s ? vs : max_s;
    max_t = vt > max_t ? vt : max_t;
  }
  max_s = block_max(max_s, shared);
  max_t = block_max(max_t, shared);
  kd::ExpSums<acc_t> acc;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x)
    kd::accumulate<acc_t>(static_cast<acc_t>(sr[i]), static_cast<acc_t>(tr[i]), max_s, max_t, inv_t, need_ce, acc);
  acc.student_t = cuda::block_sum(acc.student_t, shared);
  acc.teacher_t = cuda::block_sum(acc.teacher_t, shared);
  acc.teacher_t_diff = cuda::block_sum(acc.teacher_t_diff, shared);
  if (need_ce) acc.student_1 = cuda::block_sum(acc.student_1, shared);
  if (threadIdx.x == 0) {
    acc_t* row_stats = stats + n * kd::kNumStats;
    kd::finish_row<acc_t>(max_s, max_t, acc, inv_t, need_ce, row_stats);
    acc_t ce = 0;
    if (need_ce && y[n] != ignore_index) {
      CUDA_KERNEL_ASSERT(y[n] >= 0 && y[n] < k && "kd_loss: target out of range");
      ce = row_stats[kd::kLseStudent] - static_cast<acc_t>(sr[y[n]]);
    }
    row_stats[kd::kCe] = ce;
  }
}

template <typename in_t, typename acc_t>
__global__ void kd_backward_kernel(const in_t* __restrict__ s, int64_t s_stride, const in_t* __restrict__ t,
                                   int64_t t_stride, const int64_t* __restrict__ y, int64_t batch, int64_t k,
                                   acc_t inv_t, const acc_t* __restrict__ stats, const acc_t* __restrict__ coefs,
                                   in_t* __restrict__ grad_s, in_t* __restrict__ grad_t) {
  const int64_t total = batch * k;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = idx / k, i = idx - n * k;
    const acc_t vs = static_cast<acc_t>(s[n * s_stride + i]), vt = static_cast<acc_t>(t[n * t_stride + i]);
    const acc_t* row_stats = stats + n * kd::kNumStats;
    const acc_t coef_kl = coefs[2 * n], coef_ce = coefs[2 * n + 1];
    if (grad_s != nullptr) {
      const bool need_ce = coef_ce != acc_t(0);
      const bool is_target = need_ce && y[n] == i;
      grad_s[idx] =
          static_cast<in_t>(kd::student_grad<acc_t>(vs, vt, inv_t, row_stats, coef_kl, coef_ce, need_ce, is_target));
    }
    if (grad_t != nullptr) grad_t[idx] = static_cast<in_t>(kd::teacher_grad<acc_t>(vs, vt, inv_t, row_stats, coef_kl));
  }
}

int forward_threads(int64_t k) {
  // Enough threads for ~8 elements each, a warp at least, cuda::kThreads at most.
  int threads = kWarp;
  while (threads < cuda::kThreads && threads * 8 < k) threads *= 2;
  return threads;
}

void kd_forward_rows_cuda(const at::Tensor& s, const at::Tensor& t, const at::Tensor& y, const KdOptions& opt,
                          at::Tensor& stats) {
  const int64_t batch = s.size(0), k = s.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kdfast_kd_loss_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    kd_forward_kernel<scalar_t, acc_t><<<batch, forward_threads(k), 0, stream>>>(
        s.const_data_ptr<scalar_t>(), s.stride(0), t.const_data_ptr<scalar_t>(), t.stride(0),
        opt.need_ce ? y.const_data_ptr<int64_t>() : nullptr, k, static_cast<acc_t>(1.0 / opt.temperature), opt.need_ce,
        opt.ignore_index, stats.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> kd_backward_rows_cuda(const at::Tensor& s, const at::Tensor& t, const at::Tensor& y,
                                                         const at::Tensor& stats, const at::Tensor& coefs,
                                                         const KdOptions& opt, bool need_s, bool need_t) {
  const int64_t batch = s.size(0), k = s.size(1);
  at::Tensor grad_s = need_s ? at::empty(s.sizes(), s.options()) : at::Tensor();
  at::Tensor grad_t = need_t ? at::empty(t.sizes(), t.options()) : at::Tensor();
  const int64_t blocks = std::min<int64_t>((batch * k + cuda::kThreads - 1) / cuda::kThreads, 65535 * 8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kdfast_kd_loss_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    kd_backward_kernel<scalar_t, acc_t><<<blocks, cuda::kThreads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), s.stride(0), t.const_data_ptr<scalar_t>(), t.stride(0),
        opt.need_ce ? y.const_data_ptr<int64_t>() : nullptr, batch, k, static_cast<acc_t>(1.0 / opt.temperature),
        stats.const_data_ptr<acc_t>(), coefs.const_data_ptr<acc_t>(),
        need_s ? grad_s.data_ptr<scalar_t>() : nullptr, need_t ? grad_t.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_s, grad_t};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_cuda(const at::Tensor& s, const at::Tensor& t,
                                                const c10::optional<at::Tensor>& targets, double temperature,
                                                double alpha, bool t2_scale, int64_t ignore_index,
                                                c10::string_view reduction) {
  const c10::cuda::CUDAGuard guard(s.device());
  const KdForwardRows rows = paths::use_kernel(paths::kKdLoss, s) ? &kd_forward_rows_cuda : &kd_forward_rows_aten;
  return kd_loss_impl(rows, s, t, targets, temperature, alpha, t2_scale, ignore_index, reduction);
}

std::tuple<at::Tensor, at::Tensor> kd_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& s,
                                                         const at::Tensor& t, const c10::optional<at::Tensor>& targets,
                                                         const at::Tensor& stats, double temperature, double alpha,
                                                         bool t2_scale, int64_t ignore_index,
                                                         c10::string_view reduction, std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(s.device());
  const KdBackwardRows rows = paths::use_kernel(paths::kKdLoss, s) ? &kd_backward_rows_cuda : &kd_backward_rows_aten;
  return kd_loss_backward_impl(rows, grad_loss, s, t, targets, stats, temperature, alpha, t2_scale, ignore_index,
                               reduction, output_mask);
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("kd_loss", &kdfast::kd_loss_cuda);
  m.impl("_kd_loss_backward", &kdfast::kd_loss_backward_cuda);
}
