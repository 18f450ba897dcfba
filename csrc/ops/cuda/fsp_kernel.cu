// FSP ops on CUDA: the shared driver (../fsp_impl.h) on the inputs' device, over the ATen primitives
// by default, over the hand-written CUDA primitives only where kernel_paths.h enables them.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../fsp_impl.h"
#include "../kernel_paths.h"

namespace {
using kdfast::AtenPrimitives;
using kdfast::CudaPrimitives;
namespace paths = kdfast::paths;

at::Tensor fsp_matrix_cuda(const at::Tensor& a, const at::Tensor& b) {
  const c10::cuda::CUDAGuard guard(a.device());
  return paths::use_kernel(paths::kFspMatrix, a) ? kdfast::fsp_matrix_impl<CudaPrimitives>(a, b)
                                                 : kdfast::fsp_matrix_impl<AtenPrimitives>(a, b);
}

std::tuple<at::Tensor, at::Tensor> fsp_matrix_backward_cuda(const at::Tensor& grad, const at::Tensor& a,
                                                            const at::Tensor& b, std::array<bool, 2> mask) {
  const c10::cuda::CUDAGuard guard(a.device());
  return paths::use_kernel(paths::kFspMatrix, a) ? kdfast::fsp_matrix_backward_impl<CudaPrimitives>(grad, a, b, mask)
                                                 : kdfast::fsp_matrix_backward_impl<AtenPrimitives>(grad, a, b, mask);
}

std::tuple<at::Tensor, at::Tensor> fsp_loss_cuda(const at::Tensor& s_a, const at::Tensor& s_b, const at::Tensor& t_a,
                                                 const at::Tensor& t_b, c10::string_view reduction) {
  const c10::cuda::CUDAGuard guard(s_a.device());
  return paths::use_kernel(paths::kFspLoss, s_a)
             ? kdfast::fsp_loss_impl<CudaPrimitives>(s_a, s_b, t_a, t_b, reduction)
             : kdfast::fsp_loss_impl<AtenPrimitives>(s_a, s_b, t_a, t_b, reduction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fsp_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& diff, const at::Tensor& s_a, const at::Tensor& s_b,
    const at::Tensor& t_a, const at::Tensor& t_b, c10::string_view reduction, std::array<bool, 4> mask) {
  const c10::cuda::CUDAGuard guard(s_a.device());
  return paths::use_kernel(paths::kFspLoss, s_a)
             ? kdfast::fsp_loss_backward_impl<CudaPrimitives>(grad_loss, diff, s_a, s_b, t_a, t_b, reduction, mask)
             : kdfast::fsp_loss_backward_impl<AtenPrimitives>(grad_loss, diff, s_a, s_b, t_a, t_b, reduction, mask);
}
}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("fsp_matrix", &fsp_matrix_cuda);
  m.impl("_fsp_matrix_backward", &fsp_matrix_backward_cuda);
  m.impl("fsp_loss", &fsp_loss_cuda);
  m.impl("_fsp_loss_backward", &fsp_loss_backward_cuda);
}
