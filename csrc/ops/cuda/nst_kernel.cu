// NST ops on CUDA: the shared driver (../nst_impl.h) on the inputs' device, over the ATen primitives
// by default, over the hand-written CUDA primitives only where kernel_paths.h enables them.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernel_paths.h"
#include "../nst_impl.h"

namespace {
using kdfast::AtenPrimitives;
using kdfast::CudaPrimitives;
namespace paths = kdfast::paths;

std::tuple<at::Tensor, at::Tensor> nst_loss_cuda(const at::Tensor& fs, const at::Tensor& ft, c10::string_view kernel,
                                                 c10::string_view reduction, double sigma) {
  const c10::cuda::CUDAGuard guard(fs.device());
  return paths::use_kernel(paths::kNstLoss, fs)
             ? kdfast::nst_loss_impl<CudaPrimitives>(fs, ft, kernel, reduction, sigma)
             : kdfast::nst_loss_impl<AtenPrimitives>(fs, ft, kernel, reduction, sigma);
}

std::tuple<at::Tensor, at::Tensor> nst_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& fs,
                                                          const at::Tensor& ft, const at::Tensor& aux,
                                                          c10::string_view kernel, c10::string_view reduction,
                                                          double sigma, std::array<bool, 2> mask) {
  const c10::cuda::CUDAGuard guard(fs.device());
  return paths::use_kernel(paths::kNstLoss, fs)
             ? kdfast::nst_loss_backward_impl<CudaPrimitives>(grad_loss, fs, ft, aux, kernel, reduction, sigma, mask)
             : kdfast::nst_loss_backward_impl<AtenPrimitives>(grad_loss, fs, ft, aux, kernel, reduction, sigma, mask);
}
}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("nst_loss", &nst_loss_cuda);
  m.impl("_nst_loss_backward", &nst_loss_backward_cuda);
}
