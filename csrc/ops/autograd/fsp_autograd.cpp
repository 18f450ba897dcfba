// Autograd of kdfast::fsp_matrix and kdfast::fsp_loss (C++, see autograd_common.h for why).
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
using Quad = std::tuple<Tensor, Tensor, Tensor, Tensor>;

struct FspMatrixFunction : public torch::autograd::Function<FspMatrixFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& a, const Tensor& b) {
    static auto op = op_handle<Tensor(const Tensor&, const Tensor&)>("fsp_matrix");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({a, b});
    return {op.call(a, b)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = op_handle<Pair(const Tensor&, const Tensor&, const Tensor&, std::array<bool, 2>)>(
        "_fsp_matrix_backward");
    const auto s = ctx->get_saved_variables();
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    auto [grad_a, grad_b] = op.call(grad_outputs[0], s[0], s[1], mask);
    return {mask[0] ? grad_a : Tensor(), mask[1] ? grad_b : Tensor()};
  }
};

// fsp_loss returns (loss, diff = G_s - G_t); diff is what the backward needs and is not differentiable.
struct FspLossFunction : public torch::autograd::Function<FspLossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& s_a, const Tensor& s_b, const Tensor& t_a,
                               const Tensor& t_b, c10::string_view reduction) {
    static auto op = op_handle<Pair(const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view)>(
        "fsp_loss");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, diff] = op.call(s_a, s_b, t_a, t_b, reduction);
    ctx->save_for_backward({diff, s_a, s_b, t_a, t_b});
    ctx->mark_non_differentiable({diff});
    ctx->set_materialize_grads(false);  // diff never gets a gradient: no zero tensor for it
    ctx->saved_data["reduction"] = std::string(reduction);
    return {loss, diff};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = op_handle<Quad(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    const Tensor&, c10::string_view, std::array<bool, 4>)>("_fsp_loss_backward");
    variable_list grads(5);
    if (!grad_outputs[0].defined()) return grads;
    const auto s = ctx->get_saved_variables();
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                   ctx->needs_input_grad(3)};
    const auto g = to_list(
        op.call(grad_outputs[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["reduction"].toStringRef(), mask));
    for (size_t i = 0; i < 4; ++i) {
      if (mask[i]) grads[i] = g[i];
    }
    return grads;
  }
};

Tensor fsp_matrix_autograd(const Tensor& a, const Tensor& b) { return FspMatrixFunction::apply(a, b)[0]; }

Pair fsp_loss_autograd(const Tensor& s_a, const Tensor& s_b, const Tensor& t_a, const Tensor& t_b,
                       c10::string_view reduction) {
  return to_tuple<Pair>(FspLossFunction::apply(s_a, s_b, t_a, t_b, reduction));
}

constexpr char kMatrixBackward[] = "_fsp_matrix_backward";
constexpr char kLossBackward[] = "_fsp_loss_backward";
using MatrixBackwardNode =
    NoDoubleBackward<kMatrixBackward, Pair, const Tensor&, const Tensor&, const Tensor&, std::array<bool, 2>>;
using LossBackwardNode = NoDoubleBackward<kLossBackward, Quad, const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, const Tensor&, const Tensor&, c10::string_view,
                                          std::array<bool, 4>>;

}  // namespace
}  // namespace autograd
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, Autograd, m) {
  using namespace kdfast::autograd;
  m.impl("fsp_matrix", TORCH_FN(fsp_matrix_autograd));
  m.impl("_fsp_matrix_backward", TORCH_FN(MatrixBackwardNode::kernel));
  m.impl("fsp_loss", TORCH_FN(fsp_loss_autograd));
  m.impl("_fsp_loss_backward", TORCH_FN(LossBackwardNode::kernel));
}
