// Autocast does not reach inside kdfast ops: each op runs in the dtype of its inputs.
//
// Without this, a kdfast op called under torch.autocast falls through the Autocast keys with autocast
// still enabled, so the ATen calls inside its kernel (conv2d, bmm, ...) get re-cast to the low
// precision dtype and meet the kernel's own float32 buffers ("expected scalar type Float but found
// BFloat16"). Modules that want autocast behaviour (kdfast.nn.TuckerConv2d, like nn.Conv2d) cast their
// inputs to the autocast dtype themselves before calling the op.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace {

void call_without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

// Every op declared in csrc/ops/schemas.cpp except the CatchAll ones (_build_info, _kernel_paths,
// _tucker_autotune);
// tests/ops/test_autocast.py and tests/ops/test_kernel_paths.py check that this list and the schemas agree.
constexpr const char* kOps[] = {
    "fsp_matrix", "_fsp_matrix_backward", "fsp_loss", "_fsp_loss_backward",
    "nst_loss", "_nst_loss_backward", "tucker_conv2d", "_tucker_conv2d_backward", "_tucker_conv2d_path",
    "_tucker_conv2d_with_intermediates", "_tucker_conv2d_backward_saved",
    "kd_loss", "_kd_loss_backward", "sparse_recoding_", "sparse_codes", "_sparse_codes_backward",
};

void register_autocast_off(torch::Library& m) {
  for (const char* name : kOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&call_without_autocast>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, AutocastCPU, m) {
  register_autocast_off(m);
}

TORCH_LIBRARY_IMPL(kdfast, AutocastCUDA, m) {
  register_autocast_off(m);
}
