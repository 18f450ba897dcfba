// sparse_recoding_'s ATen path: the rule of kdfast/sparse_recoding.h written as ATen element-wise
// ops and reductions, one tensor at a time, on any device (the CUDA default, see ../kernel_paths.h).
// Nothing goes through host memory and nothing synchronises, so it can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "../sparse_recoding_impl.h"

namespace kdfast {
namespace sparse_recoding {

void sparse_recoding_aten(at::TensorList grads, at::TensorList params, const at::Tensor& taus, double boost,
                          double damp, double shrink, double tau_rate) {
  check_args(grads, params, taus, boost, damp, shrink, tau_rate);
  const at::Tensor tau_now = taus.to(at::kDouble);  // this step's thresholds (a copy: taus is updated below)
  const auto acc = at::toOpMathType(grads[0].scalar_type());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor theta = params[i].to(acc);
    const at::Tensor tau = tau_now.select(0, static_cast<int64_t>(i)).to(acc);
    const at::Tensor magnitude = theta.abs();
    const at::Tensor g_acc = g.to(acc);
    // |theta| > tau: boost g; else damp g + shrink sign(theta)   (sparse_recoding::recode)
    g.copy_(at::where(magnitude > tau, g_acc * boost, g_acc * damp + theta.sign() * shrink));
    if (theta.numel() == 0) continue;  // no mean: the threshold stays (sparse_recoding::next_tau)
    const at::Tensor mean = magnitude.sum(at::kDouble).div_(static_cast<double>(theta.numel()));
    const at::Tensor old = tau_now.select(0, static_cast<int64_t>(i));
    taus.select(0, static_cast<int64_t>(i)).copy_(old + (mean - old) * tau_rate);
  }
}

}  // namespace sparse_recoding
}  // namespace kdfast
