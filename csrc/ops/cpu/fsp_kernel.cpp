// FSP ops on CPU: the shared driver (../fsp_impl.h) over the CPU primitives.
#include <torch/library.h>

#include "../fsp_impl.h"

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("fsp_matrix", &kdfast::fsp_matrix_impl<kdfast::CpuPrimitives>);
  m.impl("_fsp_matrix_backward", &kdfast::fsp_matrix_backward_impl<kdfast::CpuPrimitives>);
  m.impl("fsp_loss", &kdfast::fsp_loss_impl<kdfast::CpuPrimitives>);
  m.impl("_fsp_loss_backward", &kdfast::fsp_loss_backward_impl<kdfast::CpuPrimitives>);
}
