// FSP ops on CPU: the shared driver (../fsp_impl.h) over the CPU primitives, or over the ATen
// primitives when KDFAST_CPU_KERNELS leaves fsp_matrix / fsp_loss out (kernel_paths.h).
#include <torch/library.h>

#include "../fsp_impl.h"
#include "../kernel_paths.h"

namespace {
using kdfast::AtenPrimitives;
using kdfast::CpuPrimitives;
namespace paths = kdfast::paths;

at::Tensor fsp_matrix_cpu(const at::Tensor& a, const at::Tensor& b) {
  return paths::use_kernel(paths::kFspMatrix, a) ? kdfast::fsp_matrix_impl<CpuPrimitives>(a, b)
                                                 : kdfast::fsp_matrix_impl<AtenPrimitives>(a, b);
}

std::tuple<at::Tensor, at::Tensor> fsp_matrix_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                           const at::Tensor& b, std::array<bool, 2> mask) {
  return paths::use_kernel(paths::kFspMatrix, a) ? kdfast::fsp_matrix_backward_impl<CpuPrimitives>(grad, a, b, mask)
                                                 : kdfast::fsp_matrix_backward_impl<AtenPrimitives>(grad, a, b, mask);
}

std::tuple<at::Tensor, at::Tensor> fsp_loss_cpu(const at::Tensor& s_a, const at::Tensor& s_b, const at::Tensor& t_a,
                                                const at::Tensor& t_b, c10::string_view reduction) {
  return paths::use_kernel(paths::kFspLoss, s_a) ? kdfast::fsp_loss_impl<CpuPrimitives>(s_a, s_b, t_a, t_b, reduction)
                                                 : kdfast::fsp_loss_impl<AtenPrimitives>(s_a, s_b, t_a, t_b, reduction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fsp_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& diff, const at::Tensor& s_a, const at::Tensor& s_b,
    const at::Tensor& t_a, const at::Tensor& t_b, c10::string_view reduction, std::array<bool, 4> mask) {
  return paths::use_kernel(paths::kFspLoss, s_a)
             ? kdfast::fsp_loss_backward_impl<CpuPrimitives>(grad_loss, diff, s_a, s_b, t_a, t_b, reduction, mask)
             : kdfast::fsp_loss_backward_impl<AtenPrimitives>(grad_loss, diff, s_a, s_b, t_a, t_b, reduction, mask);
}
}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("fsp_matrix", &fsp_matrix_cpu);
  m.impl("_fsp_matrix_backward", &fsp_matrix_backward_cpu);
  m.impl("fsp_loss", &fsp_loss_cpu);
  m.impl("_fsp_loss_backward", &fsp_loss_backward_cpu);
}
