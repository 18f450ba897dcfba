// Shared plumbing of the C++ autograd nodes (csrc/ops/autograd/<op>_autograd.cpp).
//
// Why the autograd is C++ and not torch.library.register_autograd: a Python autograd function costs
// tens of microseconds per call in the forward and more in the backward, which is most of the time of
// the small calls training makes (a Tucker layer per decomposed conv per step, a KD loss over 10 or 100
// classes). These nodes call the backend kernels through the dispatcher, below the Autograd key, as
// torchvision's csrc/ops/autograd do. Fake kernels stay in Python (kdfast/_registrations.py);
// torch.compile traces through these nodes into them.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <string>
#include <tuple>
#include <utility>

namespace kdfast {
namespace autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of the kdfast op `name` (e.g. "kd_loss"); call sites keep it in a static.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string("kdfast::") + name).c_str(), "").typed<Signature>();
}

template <typename... Ts>
variable_list to_list(const std::tuple<Ts...>& t) {
  return std::apply([](const auto&... x) { return variable_list{x...}; }, t);
}

template <typename Tuple, size_t... I>
Tuple to_tuple_impl(const variable_list& v, std::index_sequence<I...>) {
  return Tuple{v[I]...};
}

template <typename Tuple>
Tuple to_tuple(const variable_list& v) {
  return to_tuple_impl<Tuple>(v, std::make_index_sequence<std::tuple_size<Tuple>::value>{});
}

// The Autograd kernel of a backward op (kName: "_<op>_backward", returning a tuple of gradients):
// a node that records the call, so a first backward with create_graph=True works, and raises a clear
// error if that graph is differentiated again.
template <const char* kName, typename Ret, typename... Args>
struct NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward<kName, Ret, Args...>> {
  static variable_list forward(AutogradContext*, Args... args) {
    static auto op = op_handle<Ret(Args...)>(kName);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return to_list(op.call(args...));
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "kdfast: double backward through ", kName, " is not supported");
  }

  static Ret kernel(Args... args) { return to_tuple<Ret>(NoDoubleBackward::apply(args...)); }
};

}  // namespace autograd
}  // namespace kdfast
