// NST ops on CPU: the shared driver (../nst_impl.h) over the CPU primitives.
#include <torch/library.h>

#include "../nst_impl.h"

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("nst_loss", &kdfast::nst_loss_impl<kdfast::CpuPrimitives>);
  m.impl("_nst_loss_backward", &kdfast::nst_loss_backward_impl<kdfast::CpuPrimitives>);
}
