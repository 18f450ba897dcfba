// Autograd of kdfast::kd_loss (C++, see autograd_common.h for why). The KD loss runs once per step;
// at K = 10..1000 classes its kernels take tens of microseconds, and with the earlier Python autograd
// function a fixed overhead of about 80 us left the op at 0.75-0.82x of eager PyTorch there.
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "autograd_common.h"

namespace kdfast {
namespace autograd {
namespace {

using at::Tensor;

using Pair = std::tuple<Tensor, Tensor>;
using ForwardSig = Pair(const Tensor&, const Tensor&, const std::optional<Tensor>&, double, double, bool, int64_t,
                        c10::string_view);
using BackwardSig = Pair(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                         double, double, bool, int64_t, c10::string_view, std::array<bool, 2>);

// Inputs (student_logits, teacher_logits, targets, temperature, alpha, t2_scale, ignore_index,
// reduction): the two logits are always tensors, so they are needs_input_grad 0 and 1.
struct KdLossFunction : public torch::autograd::Function<KdLossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& s, const Tensor& t,
                               const std::optional<Tensor>& targets, double temperature, double alpha, bool t2_scale,
                               int64_t ignore_index, c10::string_view reduction) {
    static auto op = op_handle<ForwardSig>("kd_loss");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, stats] = op.call(s, t, targets, temperature, alpha, t2_scale, ignore_index, reduction);
    ctx->save_for_backward({s, t, targets.has_value() ? *targets : Tensor(), stats});
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);  // stats never gets a gradient: no zero tensor for it
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["t2_scale"] = t2_scale;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = std::string(reduction);
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = op_handle<BackwardSig>("_kd_loss_backward");
    variable_list grads(8);
    if (!grad_outputs[0].defined()) return grads;
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    const std::optional<Tensor> targets = saved[2].defined() ? std::optional<Tensor>(saved[2]) : std::nullopt;
    auto [grad_s, grad_t] =
        op.call(grad_outputs[0], saved[0], saved[1], targets, saved[3], ctx->saved_data["temperature"].toDouble(),
                ctx->saved_data["alpha"].toDouble(), ctx->saved_data["t2_scale"].toBool(),
                ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["reduction"].toStringRef(), mask);
    if (mask[0]) grads[0] = grad_s;
    if (mask[1]) grads[1] = grad_t;
    return grads;
  }
};

Pair kd_loss_autograd(const Tensor& s, const Tensor& t, const std::optional<Tensor>& targets, double temperature,
                      double alpha, bool t2_scale, int64_t ignore_index, c10::string_view reduction) {
  return to_tuple<Pair>(KdLossFunction::apply(s, t, targets, temperature, alpha, t2_scale, ignore_index, reduction));
}

constexpr char kBackward[] = "_kd_loss_backward";
using BackwardNode = NoDoubleBackward<kBackward, Pair, const Tensor&, const Tensor&, const Tensor&,
                                      const std::optional<Tensor>&, const Tensor&, double, double, bool, int64_t,
                                      c10::string_view, std::array<bool, 2>>;

}  // namespace
}  // namespace autograd
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, Autograd, m) {
  using namespace kdfast::autograd;
  m.impl("kd_loss", TORCH_FN(kd_loss_autograd));
  m.impl("_kd_loss_backward", TORCH_FN(BackwardNode::kernel));
}
