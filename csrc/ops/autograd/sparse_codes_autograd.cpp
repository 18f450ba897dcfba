// Autograd of kdfast::sparse_codes (C++, see autograd_common.h for why). Gradients flow through the
// values only; the indices are piecewise constant (non-differentiable). Only x, the dictionary, the
// bias and the int64 indices are saved: the backward recomputes the k winners' pre-activations.
#include <torch/library.h>

#include <array>
#include <tuple>

#include "autograd_common.h"

namespace kdfast {
namespace autograd {
namespace {

using at::Tensor;

using Pair = std::tuple<Tensor, Tensor>;
using Triple = std::tuple<Tensor, Tensor, Tensor>;
using ForwardSig = Pair(const Tensor&, const Tensor&, const Tensor&, int64_t);
using BackwardSig = Triple(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           std::array<bool, 3>);

struct SparseCodesFunction : public torch::autograd::Function<SparseCodesFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& dictionary, const Tensor& bias,
                               int64_t k) {
    static auto op = op_handle<ForwardSig>("sparse_codes");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [values, indices] = op.call(x, dictionary, bias, k);
    ctx->save_for_backward({x, dictionary, bias, indices});
    ctx->mark_non_differentiable({indices});
    ctx->set_materialize_grads(false);
    return {values, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = op_handle<BackwardSig>("_sparse_codes_backward");
    variable_list grads(4);
    if (!grad_outputs[0].defined()) return grads;
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    auto [gx, gc, gb] = op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], mask);
    if (mask[0]) grads[0] = gx;
    if (mask[1]) grads[1] = gc;
    if (mask[2]) grads[2] = gb;
    return grads;
  }
};

Pair sparse_codes_autograd(const Tensor& x, const Tensor& dictionary, const Tensor& bias, int64_t k) {
  return to_tuple<Pair>(SparseCodesFunction::apply(x, dictionary, bias, k));
}

constexpr char kBackward[] = "_sparse_codes_backward";
using BackwardNode = NoDoubleBackward<kBackward, Triple, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                      const Tensor&, std::array<bool, 3>>;

}  // namespace
}  // namespace autograd
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, Autograd, m) {
  using namespace kdfast::autograd;
  m.impl("sparse_codes", TORCH_FN(sparse_codes_autograd));
  m.impl("_sparse_codes_backward", TORCH_FN(BackwardNode::kernel));
}
