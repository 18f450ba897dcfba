// Autograd of kdfast::kd_loss, in C++ (see tucker_conv2d_autograd.cpp for why).
//
// The KD loss runs once per training step; at the small class counts of CIFAR-style work (K = 10..100)
// its kernels take tens of microseconds, so a Python autograd function's overhead was most of its
// cost (fused op 0.75-0.82x of eager PyTorch at K <= 1000 before this, see
// benchmarks/results/kd-loss-*.md). The fake kernels stay in kdfast/_registrations.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace kdfast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<Tensor, Tensor> call_kd_loss(const Tensor& s, const Tensor& t, const std::optional<Tensor>& targets,
                                        double temperature, double alpha, bool t2_scale, int64_t ignore_index,
                                        c10::string_view reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kdfast::kd_loss", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                         double, double, bool, int64_t, c10::string_view)>();
  return op.call(s, t, targets, temperature, alpha, t2_scale, ignore_index, reduction);
}

std::tuple<Tensor, Tensor> call_kd_loss_backward(const Tensor& grad_loss, const Tensor& s, const Tensor& t,
                                                 const std::optional<Tensor>& targets, const Tensor& stats,
                                                 double temperature, double alpha, bool t2_scale,
                                                 int64_t ignore_index, c10::string_view reduction,
                                                 std::array<bool, 2> mask) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("kdfast::_kd_loss_backward", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                            const Tensor&, double, double, bool, int64_t, c10::string_view,
                                            std::array<bool, 2>)>();
  return op.call(grad_loss, s, t, targets, stats, temperature, alpha, t2_scale, ignore_index, reduction, mask);
}

// Forward inputs: (student_logits, teacher_logits, targets, temperature, alpha, t2_scale, ignore_index,
// reduction). The two logits are always tensors, so they are needs_input_grad 0 and 1.
class KdLossFunction : public torch::autograd::Function<KdLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& s, const Tensor& t,
                               const std::optional<Tensor>& targets, double temperature, double alpha, bool t2_scale,
                               int64_t ignore_index, c10::string_view reduction) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, stats] = call_kd_loss(s, t, targets, temperature, alpha, t2_scale, ignore_index, reduction);
    const bool has_targets = targets.has_value() && targets->defined();
    ctx->save_for_backward({s, t, has_targets ? *targets : Tensor(), stats});
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);  // stats never gets a gradient: do not fill zeros for it
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["t2_scale"] = t2_scale;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = std::string(reduction);
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(8);
    if (!grad_outputs[0].defined()) return grads;
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    const std::optional<Tensor> targets = saved[2].defined() ? std::optional<Tensor>(saved[2]) : std::nullopt;
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    auto [grad_s, grad_t] = call_kd_loss_backward(
        grad_outputs[0], saved[0], saved[1], targets, saved[3], ctx->saved_data["temperature"].toDouble(),
        ctx->saved_data["alpha"].toDouble(), ctx->saved_data["t2_scale"].toBool(),
        ctx->saved_data["ignore_index"].toInt(), reduction, mask);
    if (mask[0]) grads[0] = grad_s;
    if (mask[1]) grads[1] = grad_t;
    return grads;
  }
};

// The backward op records a node (so create_graph=True works) that refuses to be differentiated.
class KdLossBackwardFunction : public torch::autograd::Function<KdLossBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const Tensor& grad_loss, const Tensor& s, const Tensor& t,
                               const std::optional<Tensor>& targets, const Tensor& stats, double temperature,
                               double alpha, bool t2_scale, int64_t ignore_index, c10::string_view reduction,
                               std::array<bool, 2> mask) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_s, grad_t] = call_kd_loss_backward(grad_loss, s, t, targets, stats, temperature, alpha, t2_scale,
                                                  ignore_index, reduction, mask);
    return {grad_s, grad_t};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "kdfast: double backward through _kd_loss_backward is not supported");
  }
};

std::tuple<Tensor, Tensor> kd_loss_autograd(const Tensor& s, const Tensor& t, const std::optional<Tensor>& targets,
                                            double temperature, double alpha, bool t2_scale, int64_t ignore_index,
                                            c10::string_view reduction) {
  auto out = KdLossFunction::apply(s, t, targets, temperature, alpha, t2_scale, ignore_index, reduction);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> kd_loss_backward_autograd(const Tensor& grad_loss, const Tensor& s, const Tensor& t,
                                                     const std::optional<Tensor>& targets, const Tensor& stats,
                                                     double temperature, double alpha, bool t2_scale,
                                                     int64_t ignore_index, c10::string_view reduction,
                                                     std::array<bool, 2> mask) {
  auto out = KdLossBackwardFunction::apply(grad_loss, s, t, targets, stats, temperature, alpha, t2_scale,
                                           ignore_index, reduction, mask);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, Autograd, m) {
  m.impl("kd_loss", TORCH_FN(kdfast::kd_loss_autograd));
  m.impl("_kd_loss_backward", TORCH_FN(kdfast::kd_loss_backward_autograd));
}
