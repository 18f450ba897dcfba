// NST ops on CPU: the shared driver (../nst_impl.h) over the CPU primitives, or over the ATen
// primitives when KDFAST_CPU_KERNELS leaves nst_loss out (kernel_paths.h).
#include <torch/library.h>

#include "../kernel_paths.h"
#include "../nst_impl.h"

namespace {
using kdfast::AtenPrimitives;
using kdfast::CpuPrimitives;
namespace paths = kdfast::paths;

std::tuple<at::Tensor, at::Tensor> nst_loss_cpu(const at::Tensor& fs, const at::Tensor& ft, c10::string_view kernel,
                                                c10::string_view reduction, double sigma) {
  return paths::use_kernel(paths::kNstLoss, fs)
             ? kdfast::nst_loss_impl<CpuPrimitives>(fs, ft, kernel, reduction, sigma)
             : kdfast::nst_loss_impl<AtenPrimitives>(fs, ft, kernel, reduction, sigma);
}

std::tuple<at::Tensor, at::Tensor> nst_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& fs,
                                                         const at::Tensor& ft, const at::Tensor& aux,
                                                         c10::string_view kernel, c10::string_view reduction,
                                                         double sigma, std::array<bool, 2> mask) {
  return paths::use_kernel(paths::kNstLoss, fs)
             ? kdfast::nst_loss_backward_impl<CpuPrimitives>(grad_loss, fs, ft, aux, kernel, reduction, sigma, mask)
             : kdfast::nst_loss_backward_impl<AtenPrimitives>(grad_loss, fs, ft, aux, kernel, reduction, sigma, mask);
}
}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("nst_loss", &nst_loss_cpu);
  m.impl("_nst_loss_backward", &nst_loss_backward_cpu);
}
