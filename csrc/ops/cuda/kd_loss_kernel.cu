// Fused KD loss on CUDA (run only where kernel_paths.h enables it; the ATen path otherwise): the host
// side. The kernels are in kd_loss_kernels.cuh (ATen-free, so tests/emulator runs them on the CPU).
// float32/float16/bfloat16/float64 in; float32 (float64 for float64) accumulate. Targets out of range
// trip a device-side assert (as F.cross_entropy on CUDA; c10/macros/Macros.h comes first for it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "../kd_loss_impl.h"
#include "../kernel_paths.h"
#include "kd_loss_kernels.cuh"

namespace kdfast {
namespace {

void kd_forward_rows_cuda(const at::Tensor& s, const at::Tensor& t, const at::Tensor& y, const KdOptions& opt,
                          at::Tensor& stats) {
  const int64_t batch = s.size(0), k = s.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kdfast_kd_loss_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    cuda::kd_forward_kernel<scalar_t, acc_t><<<batch, cuda::kd_forward_threads(k), 0, stream>>>(
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
    cuda::kd_backward_kernel<scalar_t, acc_t><<<blocks, cuda::kThreads, 0, stream>>>(
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
