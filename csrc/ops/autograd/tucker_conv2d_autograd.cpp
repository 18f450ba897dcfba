// Autograd of kdfast::tucker_conv2d and kdfast::_tucker_conv2d_with_intermediates, in C++
// (the pattern of torchvision's csrc/ops/autograd).
//
// Why C++ and not torch.library.register_autograd: a Tucker layer is called once per decomposed
// conv per step (18 times in a ResNet-20), and a Python autograd function costs about 35 us in the
// forward and more in the backward per call (measured on CPU, 1 thread: 58 us against 23 us for the
// same op without grad). These nodes dispatch straight to the backend kernels, like
// nn.Conv2d's own autograd. The fake kernels stay in Python (kdfast/_registrations.py);
// torch.compile traces through these nodes into them.
//
// Backward ops (_tucker_conv2d_backward, _tucker_conv2d_backward_saved) get an autograd node that
// records the call (so a first backward with create_graph=True works) and raises if differentiated.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace kdfast {
namespace {

using at::IntArrayRef;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Grads5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// ------------------------------------------------------------------------- typed op handles
Tensor call_forward(const Tensor& x, const Tensor& first, const Tensor& core, const Tensor& last,
                    const std::optional<Tensor>& bias, IntArrayRef stride, IntArrayRef padding,
                    IntArrayRef dilation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kdfast::tucker_conv2d", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const std::optional<Tensor>&, IntArrayRef, IntArrayRef, IntArrayRef)>();
  return op.call(x, first, core, last, bias, stride, padding, dilation);
}

std::tuple<Tensor, Tensor, Tensor> call_forward_with_intermediates(
    const Tensor& x, const Tensor& first, const Tensor& core, const Tensor& last,
    const std::optional<Tensor>& bias, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("kdfast::_tucker_conv2d_with_intermediates", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                    const std::optional<Tensor>&, IntArrayRef, IntArrayRef,
                                                    IntArrayRef)>();
  return op.call(x, first, core, last, bias, stride, padding, dilation);
}

Grads5 call_backward(const Tensor& grad_y, const Tensor& x, const Tensor& first, const Tensor& core,
                     const Tensor& last, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                     std::array<bool, 5> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kdfast::_tucker_conv2d_backward", "")
                       .typed<Grads5(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     IntArrayRef, IntArrayRef, IntArrayRef, std::array<bool, 5>)>();
  return op.call(grad_y, x, first, core, last, stride, padding, dilation, mask);
}

Grads5 call_backward_saved(const Tensor& grad_y, const Tensor& x, const Tensor& first, const Tensor& core,
                           const Tensor& last, const Tensor& z1, const Tensor& z2, IntArrayRef stride,
                           IntArrayRef padding, IntArrayRef dilation, std::array<bool, 5> mask) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("kdfast::_tucker_conv2d_backward_saved", "")
          .typed<Grads5(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, std::array<bool, 5>)>();
  return op.call(grad_y, x, first, core, last, z1, z2, stride, padding, dilation, mask);
}

// ------------------------------------------------------------------------------- helpers
bool has_tensor(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

void save_conv_args(AutogradContext* ctx, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                    bool has_bias) {
  ctx->saved_data["stride"] = stride;
  ctx->saved_data["padding"] = padding;
  ctx->saved_data["dilation"] = dilation;
  ctx->saved_data["has_bias"] = has_bias;
}

// Which of (x, first, core, last, bias) need a gradient. needs_input_grad counts only the tensor
// inputs actually given, so bias (the 5th) is asked about only when there is one.
std::array<bool, 5> grad_mask(AutogradContext* ctx) {
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2), ctx->needs_input_grad(3),
          has_bias && ctx->needs_input_grad(4)};
}

// The 8 gradients of (x, first, core, last, bias, stride, padding, dilation); undefined = None.
variable_list as_input_grads(const Grads5& grads, std::array<bool, 5> mask) {
  const Tensor none;
  return {mask[0] ? std::get<0>(grads) : none, mask[1] ? std::get<1>(grads) : none,
          mask[2] ? std::get<2>(grads) : none, mask[3] ? std::get<3>(grads) : none,
          mask[4] ? std::get<4>(grads) : none, none, none, none};
}

// ----------------------------------------------------------------------- forward nodes
// tucker_conv2d: memory-lean training (kdfast.ops.tucker_conv2d(save_intermediates=False)); keeps
// only the inputs, the backward op recomputes the intermediates.
class TuckerConv2dFunction : public torch::autograd::Function<TuckerConv2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& first, const Tensor& core,
                               const Tensor& last, const std::optional<Tensor>& bias, IntArrayRef stride,
                               IntArrayRef padding, IntArrayRef dilation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor y = call_forward(x, first, core, last, bias, stride, padding, dilation);
    ctx->save_for_backward({x, first, core, last});
    save_conv_args(ctx, stride, padding, dilation, has_tensor(bias));
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto mask = grad_mask(ctx);
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    return as_input_grads(
        call_backward(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], stride, padding, dilation, mask),
        mask);
  }
};

// _tucker_conv2d_with_intermediates: the default training mode; keeps z1 = first x and
// z2 = core * z1 (returned, not differentiable) so the backward recomputes nothing.
class TuckerConv2dWithIntermediatesFunction
    : public torch::autograd::Function<TuckerConv2dWithIntermediatesFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& first, const Tensor& core,
                               const Tensor& last, const std::optional<Tensor>& bias, IntArrayRef stride,
                               IntArrayRef padding, IntArrayRef dilation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, z1, z2] = call_forward_with_intermediates(x, first, core, last, bias, stride, padding, dilation);
    ctx->save_for_backward({x, first, core, last, z1, z2});
    ctx->mark_non_differentiable({z1, z2});
    // z1 and z2 never get gradients; without this autograd would fill two zero tensors of their
    // size every backward (measured: 0.5 ms a layer at N32 C16 32x32).
    ctx->set_materialize_grads(false);
    save_conv_args(ctx, stride, padding, dilation, has_tensor(bias));
    return {y, z1, z2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return variable_list(8);  // y unused by the loss: no gradients
    const auto saved = ctx->get_saved_variables();
    const auto mask = grad_mask(ctx);
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    return as_input_grads(call_backward_saved(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                              saved[5], stride, padding, dilation, mask),
                          mask);
  }
};

// ---------------------------------------------------------------------- backward-op nodes
variable_list as_list(const Grads5& g) {
  return {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g)};
}

Grads5 as_tuple(const variable_list& g) { return {g[0], g[1], g[2], g[3], g[4]}; }

[[noreturn]] void no_double_backward(const char* name) {
  TORCH_CHECK(false, "kdfast: double backward through ", name, " is not supported");
}

class TuckerConv2dBackwardFunction : public torch::autograd::Function<TuckerConv2dBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const Tensor& grad_y, const Tensor& x, const Tensor& first,
                               const Tensor& core, const Tensor& last, IntArrayRef stride, IntArrayRef padding,
                               IntArrayRef dilation, std::array<bool, 5> mask) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return as_list(call_backward(grad_y, x, first, core, last, stride, padding, dilation, mask));
  }
  static variable_list backward(AutogradContext*, variable_list) { no_double_backward("_tucker_conv2d_backward"); }
};

class TuckerConv2dBackwardSavedFunction : public torch::autograd::Function<TuckerConv2dBackwardSavedFunction> {
 public:
  static variable_list forward(AutogradContext*, const Tensor& grad_y, const Tensor& x, const Tensor& first,
                               const Tensor& core, const Tensor& last, const Tensor& z1, const Tensor& z2,
                               IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                               std::array<bool, 5> mask) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return as_list(call_backward_saved(grad_y, x, first, core, last, z1, z2, stride, padding, dilation, mask));
  }
  static variable_list backward(AutogradContext*, variable_list) {
    no_double_backward("_tucker_conv2d_backward_saved");
  }
};

// ------------------------------------------------------------------ Autograd-key kernels
Tensor tucker_conv2d_autograd(const Tensor& x, const Tensor& first, const Tensor& core, const Tensor& last,
                              const std::optional<Tensor>& bias, IntArrayRef stride, IntArrayRef padding,
                              IntArrayRef dilation) {
  return TuckerConv2dFunction::apply(x, first, core, last, bias, stride, padding, dilation)[0];
}

std::tuple<Tensor, Tensor, Tensor> tucker_conv2d_with_intermediates_autograd(
    const Tensor& x, const Tensor& first, const Tensor& core, const Tensor& last,
    const std::optional<Tensor>& bias, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
  auto out = TuckerConv2dWithIntermediatesFunction::apply(x, first, core, last, bias, stride, padding, dilation);
  return {out[0], out[1], out[2]};
}

Grads5 tucker_conv2d_backward_autograd(const Tensor& grad_y, const Tensor& x, const Tensor& first,
                                       const Tensor& core, const Tensor& last, IntArrayRef stride,
                                       IntArrayRef padding, IntArrayRef dilation, std::array<bool, 5> mask) {
  return as_tuple(
      TuckerConv2dBackwardFunction::apply(grad_y, x, first, core, last, stride, padding, dilation, mask));
}

Grads5 tucker_conv2d_backward_saved_autograd(const Tensor& grad_y, const Tensor& x, const Tensor& first,
                                             const Tensor& core, const Tensor& last, const Tensor& z1,
                                             const Tensor& z2, IntArrayRef stride, IntArrayRef padding,
                                             IntArrayRef dilation, std::array<bool, 5> mask) {
  return as_tuple(TuckerConv2dBackwardSavedFunction::apply(grad_y, x, first, core, last, z1, z2, stride, padding,
                                                           dilation, mask));
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, Autograd, m) {
  m.impl("tucker_conv2d", TORCH_FN(kdfast::tucker_conv2d_autograd));
  m.impl("_tucker_conv2d_with_intermediates", TORCH_FN(kdfast::tucker_conv2d_with_intermediates_autograd));
  m.impl("_tucker_conv2d_backward", TORCH_FN(kdfast::tucker_conv2d_backward_autograd));
  m.impl("_tucker_conv2d_backward_saved", TORCH_FN(kdfast::tucker_conv2d_backward_saved_autograd));
}
