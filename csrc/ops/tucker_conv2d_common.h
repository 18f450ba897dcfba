// Backend-independent parts of kdfast::tucker_conv2d (Tucker-2 convolution):
//   y = conv1x1(last) o conv_kxk(core; stride, padding, dilation) o conv1x1(first) (x) + bias
// with x (N, C, H, W), first (R_in, C), core (R_out, R_in, kh, kw), last (O, R_out), bias (O,).
// Here: the exact three-conv composition (the fallback path of both backends), the backward pass
// (ATen convolutions over recomputed intermediates) and the path-selection plumbing.
#pragma once

#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "kdfast/checks.h"
#include "kdfast/tucker_geometry.h"

namespace kdfast {
namespace tucker {

// Names reported by kdfast.ops.tucker_conv2d_path and `kdfast info`.
constexpr const char* kPathFused = "fused";
constexpr const char* kPathComposed = "composed";

// KDFAST_TUCKER_CONV_PATH=fused|composed overrides the automatic rule (tests use it to exercise
// both paths on every shape; the fused path is still only taken where it is supported).
inline const char* forced_path() {
  const char* v = std::getenv("KDFAST_TUCKER_CONV_PATH");
  if (v == nullptr) return nullptr;
  if (std::strcmp(v, kPathFused) == 0) return kPathFused;
  if (std::strcmp(v, kPathComposed) == 0) return kPathComposed;
  return nullptr;
}

// KDFAST_DEBUG=1: one line per call on stderr saying which path ran (no TORCH_WARN: it is not a warning).
inline void log_path(const char* backend, const char* path, const at::Tensor& x, const at::Tensor& core) {
  const char* v = std::getenv("KDFAST_DEBUG");
  if (v == nullptr || std::strcmp(v, "1") != 0) return;
  std::fprintf(stderr, "kdfast.tucker_conv2d[%s]: %s path (x %lldx%lldx%lldx%lld, core %lldx%lldx%lldx%lld, %s)\n",
               backend, path, (long long)x.size(0), (long long)x.size(1), (long long)x.size(2), (long long)x.size(3),
               (long long)core.size(0), (long long)core.size(1), (long long)core.size(2), (long long)core.size(3),
               c10::toString(x.scalar_type()));
}

// The optional inference epilogue of tucker_conv2d, applied to t = conv(x) + bias per output channel o:
//   y = relu?(t * scale[o] + shift[o] + residual)
// scale/shift (O,) are a folded eval BatchNorm (kdfast.fuse_for_inference), residual (N, O, H_out, W_out)
// a ResNet shortcut. Mirrored by kdfast/_checks.py:tucker_epilogue_args.
inline void check_tucker_epilogue_args(const at::Tensor& x, const at::Tensor& core, const at::Tensor& last,
                                       const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                                       const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t o = last.size(0);
  const std::pair<const c10::optional<at::Tensor>*, const char*> vectors[] = {{&scale, "scale"}, {&shift, "shift"}};
  for (const auto& [t, name] : vectors) {
    if (!t->has_value() || !(*t)->defined()) continue;
    TORCH_CHECK_VALUE((*t)->dim() == 1 && (*t)->size(0) == o, name, " must be None or a 1-D tensor of shape (O,) = (",
                      o, ",), got shape ", (*t)->sizes());
    check_same_dtype_device(x, **t, name);
  }
  if (residual.has_value() && residual->defined()) {
    const int64_t oh = conv_output_size<int64_t>(x.size(2), core.size(2), stride[0], padding[0], dilation[0]);
    const int64_t ow = conv_output_size<int64_t>(x.size(3), core.size(3), stride[1], padding[1], dilation[1]);
    TORCH_CHECK_VALUE(residual->dim() == 4 && residual->size(0) == x.size(0) && residual->size(1) == o &&
                          residual->size(2) == oh && residual->size(3) == ow,
                      "residual must be None or a tensor of the output's shape (N, O, H_out, W_out) = (", x.size(0),
                      ", ", o, ", ", oh, ", ", ow, "), got shape ", residual->sizes());
    check_same_dtype_device(x, *residual, "residual");
  }
}

inline bool has_tensor(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline bool has_epilogue(const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                         const c10::optional<at::Tensor>& residual, bool relu) {
  return has_tensor(scale) || has_tensor(shift) || has_tensor(residual) || relu;
}

// The epilogue with ATen ops, after a path that does not fuse it (composition, CUDA). In place on y,
// which the paths allocate themselves (contiguous NCHW).
inline at::Tensor apply_epilogue(at::Tensor y, const c10::optional<at::Tensor>& scale,
                                 const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual,
                                 bool relu) {
  const int64_t o = y.size(1);
  if (has_tensor(scale)) y.mul_(scale->view({1, o, 1, 1}));
  if (has_tensor(shift)) y.add_(shift->view({1, o, 1, 1}));
  if (has_tensor(residual)) y.add_(*residual);
  if (relu) y.relu_();
  return y;
}

inline at::Tensor as_1x1(const at::Tensor& m) { return m.view({m.size(0), m.size(1), 1, 1}); }

// The exact composition: three ATen convolutions (cuDNN / oneDNN pick their own algorithms).
// Like the fused paths (and the fake kernel), it returns a contiguous NCHW y whatever x's layout:
// torch.compile plans strides from the fake kernel, so every path must agree with it.
inline at::Tensor composed_forward(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                                   const at::Tensor& last, const c10::optional<at::Tensor>& bias,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  // One variable for z1 then z2, so z1 is freed before the last conv allocates y: holding it longer
  // measured 5% slower at N32 C64 56x56 (the allocator cannot reuse its pages for y) and raises the peak.
  at::Tensor z = at::conv2d(x, as_1x1(first.contiguous()));
  z = at::conv2d(z, core, {}, stride, padding, dilation);
  return at::conv2d(z, as_1x1(last.contiguous()), bias).contiguous();
}

// The composition with the epilogue, for inference on CPU. A folded BatchNorm's scale and shift act per
// output channel after the last (linear) 1x1 conv, so they fold into it:
//   (last z + bias) * scale + shift = (scale . last) z + (bias * scale + shift),
// an (O, R_out) and an (O,) product instead of two passes over y; residual and ReLU then take one fused
// pass (_add_relu_) instead of two. In float32 and float64; other dtypes take apply_epilogue.
inline at::Tensor composed_forward_epilogue(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                                            const at::Tensor& last, const c10::optional<at::Tensor>& bias,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef dilation, const c10::optional<at::Tensor>& scale,
                                            const c10::optional<at::Tensor>& shift,
                                            const c10::optional<at::Tensor>& residual, bool relu) {
  // float16/bfloat16 keep the unfolded order: folding rounds differently at their precision, and
  // _add_relu_ has no kernel for them.
  const auto dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble)
    return apply_epilogue(composed_forward(x, first, core, last, bias, stride, padding, dilation), scale, shift,
                          residual, relu);
  at::Tensor last_folded = last;
  c10::optional<at::Tensor> bias_folded = bias;
  if (has_tensor(scale)) {
    last_folded = last * scale->unsqueeze(1);
    if (has_tensor(bias)) bias_folded = *bias * *scale;
  }
  if (has_tensor(shift)) bias_folded = has_tensor(bias_folded) ? *bias_folded + *shift : *shift;
  at::Tensor y = composed_forward(x, first, core, last_folded, bias_folded, stride, padding, dilation);
  if (has_tensor(residual)) return relu ? at::_add_relu_(y, *residual) : y.add_(*residual);
  return relu ? y.relu_() : y;
}

// The composition keeping its intermediates z1 = first x (N, R_in, H, W) and z2 = core * z1
// (N, R_out, H_out, W_out) for the backward, as autograd through three nn.Conv2d would: training
// then pays no recomputation. All three come back contiguous NCHW, as the fake kernel says.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> composed_forward_with_intermediates(
    const at::Tensor& x, const at::Tensor& first, const at::Tensor& core, const at::Tensor& last,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  check_tucker_conv2d_args(x, first, core, last, bias, stride, padding, dilation);
  const at::Tensor z1 = at::conv2d(x, as_1x1(first.contiguous())).contiguous();
  const at::Tensor z2 = at::conv2d(z1, core, {}, stride, padding, dilation).contiguous();
  return {at::conv2d(z2, as_1x1(last.contiguous()), bias).contiguous(), z1, z2};
}

inline at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

// Gradients of the composition from the intermediates z1 = first x and z2 = core * z1. Undefined
// ones are recomputed (only those a requested gradient needs): that is the memory-lean mode, which
// holds no extra activation per layer through the forward pass but costs about one more forward.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_from(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
    const at::Tensor& last, at::Tensor z1, at::Tensor z2, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, std::array<bool, 5> mask) {
  check_tucker_conv2d_args(x, first, core, last, c10::nullopt, stride, padding, dilation);
  const bool need_x = mask[0], need_first = mask[1], need_core = mask[2], need_last = mask[3], need_bias = mask[4];
  const int64_t o = last.size(0), r_out = core.size(0), r_in = core.size(1);
  at::Tensor gx = empty_grad(x), gfirst = empty_grad(first), gcore = empty_grad(core), glast = empty_grad(last),
             gbias = empty_grad(last);
  if (need_bias) gbias = grad_y.sum({0, 2, 3});
  const bool need_g2 = need_x || need_first || need_core;
  if (!need_g2 && !need_last) return {gx, gfirst, gcore, glast, gbias};

  // Each of the three convolutions is differentiated by the same at::convolution_backward call that
  // autograd through nn.Conv2d makes (oneDNN / cuDNN backward kernels), so with saved intermediates
  // the backward costs what the three-conv Sequential's does.
  const std::vector<int64_t> one{1, 1}, zero{0, 0};
  const auto conv_backward = [&](const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                                 at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d, bool need_input,
                                 bool need_weight) {
    return at::convolution_backward(grad, input, weight, c10::nullopt, s, p, d, /*transposed=*/false,
                                    /*output_padding=*/zero, /*groups=*/1, {need_input, need_weight, false});
  };
  if (!z1.defined()) z1 = at::conv2d(x, as_1x1(first.contiguous()));
  if (!z2.defined()) z2 = at::conv2d(z1, core, {}, stride, padding, dilation);
  // Gradients come back contiguous NCHW (what the fake kernels promise), whatever x's layout.
  // The gradient w.r.t. each intermediate is dropped as soon as the next conv has used it, as autograd
  // through three convs does, so the next allocation can reuse its memory.
  at::Tensor grad_z;  // dL/dz2, then dL/dz1
  {
    auto last_grads = conv_backward(grad_y, z2, as_1x1(last.contiguous()), one, zero, one, need_g2, need_last);
    if (need_last) glast = std::get<1>(last_grads).reshape({o, r_out}).contiguous();
    grad_z = std::move(std::get<0>(last_grads));
  }
  if (!need_g2) return {gx, gfirst, gcore, glast, gbias};
  const bool need_g1 = need_x || need_first;
  {
    auto core_grads = conv_backward(grad_z, z1, core, stride, padding, dilation, need_g1, need_core);
    if (need_core) gcore = std::get<1>(core_grads).contiguous();
    grad_z = std::move(std::get<0>(core_grads));  // frees dL/dz2
  }
  if (!need_g1) return {gx, gfirst, gcore, glast, gbias};
  z2.reset();  // our reference only; a saved z2 stays alive in the autograd node until it finishes
  auto first_grads = conv_backward(grad_z, x, as_1x1(first.contiguous()), one, zero, one, need_x, need_first);
  if (need_first) gfirst = std::get<1>(first_grads).reshape({r_in, x.size(1)}).contiguous();
  if (need_x) gx = std::get<0>(first_grads).contiguous();
  return {gx, gfirst, gcore, glast, gbias};
}

// _tucker_conv2d_backward: the memory-lean mode (nothing saved but the inputs).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
    const at::Tensor& last, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 5> mask) {
  return backward_from(grad_y, x, first, core, last, at::Tensor(), at::Tensor(), stride, padding, dilation, mask);
}

// _tucker_conv2d_backward_saved: from the intermediates _tucker_conv2d_with_intermediates kept.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_saved(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
    const at::Tensor& last, const at::Tensor& z1, const at::Tensor& z2, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 5> mask) {
  return backward_from(grad_y, x, first, core, last, z1, z2, stride, padding, dilation, mask);
}

}  // namespace tucker
}  // namespace kdfast
