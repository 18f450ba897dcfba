// Autograd of kdfast::nst_loss (C++, see autograd_common.h for why).
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>

#include "autograd_common.h"

namespace kdfast {
namespace autograd {
namespace {

using at::Tensor;

using Pair = std::tuple<Tensor, Tensor>;

// nst_loss returns (loss, aux): aux holds what the kernel's backward needs (see csrc/ops/nst_impl.h)
// and is not differentiable.
struct NstLossFunction : public torch::autograd::Function<NstLossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& fs, const Tensor& ft, c10::string_view kernel,
                               c10::string_view reduction, double sigma) {
    static auto op =
        op_handle<Pair(const Tensor&, const Tensor&, c10::string_view, c10::string_view, double)>("nst_loss");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, aux] = op.call(fs, ft, kernel, reduction, sigma);
    ctx->save_for_backward({fs, ft, aux});
    ctx->mark_non_differentiable({aux});
    ctx->set_materialize_grads(false);  // aux never gets a gradient: no zero tensor for it
    ctx->saved_data["kernel"] = std::string(kernel);
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["sigma"] = sigma;
    return {loss, aux};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = op_handle<Pair(const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view,
                                    c10::string_view, double, std::array<bool, 2>)>("_nst_loss_backward");
    variable_list grads(5);
    if (!grad_outputs[0].defined()) return grads;
    const auto s = ctx->get_saved_variables();
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    auto [grad_fs, grad_ft] =
        op.call(grad_outputs[0], s[0], s[1], s[2], ctx->saved_data["kernel"].toStringRef(),
                ctx->saved_data["reduction"].toStringRef(), ctx->saved_data["sigma"].toDouble(), mask);
    if (mask[0]) grads[0] = grad_fs;
    if (mask[1]) grads[1] = grad_ft;
    return grads;
  }
};

Pair nst_loss_autograd(const Tensor& fs, const Tensor& ft, c10::string_view kernel, c10::string_view reduction,
                       double sigma) {
  return to_tuple<Pair>(NstLossFunction::apply(fs, ft, kernel, reduction, sigma));
}

constexpr char kBackward[] = "_nst_loss_backward";
using BackwardNode = NoDoubleBackward<kBackward, Pair, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                      c10::string_view, c10::string_view, double, std::array<bool, 2>>;

}  // namespace
}  // namespace autograd
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, Autograd, m) {
  using namespace kdfast::autograd;
  m.impl("nst_loss", TORCH_FN(nst_loss_autograd));
  m.impl("_nst_loss_backward", TORCH_FN(BackwardNode::kernel));
}
