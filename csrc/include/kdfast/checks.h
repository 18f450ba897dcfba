// Argument checks shared by every op and backend. Every message names the argument and says what
// was expected, so a user calling torch.ops.kdfast.* directly gets the same errors as the Python API.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

namespace kdfast {

// Per-sample losses are reduced like torch's losses.
enum class Reduction { None, Mean, Sum };

inline Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, "reduction must be one of 'mean', 'sum', 'none', got '",
                    std::string(reduction), "'");
}

inline void check_feature_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be a 4-D feature map (B, C, H, W), got ", t.dim(),
                    "-D tensor of shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.size(0) > 0, name, " has an empty batch (shape ", t.sizes(), "); expected B >= 1");
  TORCH_CHECK_VALUE(t.size(1) > 0, name, " has no channels (shape ", t.sizes(), "); expected C >= 1");
  TORCH_CHECK_VALUE(t.size(2) > 0 && t.size(3) > 0, name, " has an empty spatial size (shape ", t.sizes(),
                    "); expected H >= 1 and W >= 1");
}

// `a` is the reference argument; `b` must agree with it in batch size, dtype and device.
inline void check_compatible(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name) {
  TORCH_CHECK_VALUE(a.size(0) == b.size(0), "batch size mismatch: ", a_name, " has B = ", a.size(0),
                    " but ", b_name, " has B = ", b.size(0));
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "dtype mismatch: ", a_name, " is ", a.scalar_type(),
                   " but ", b_name, " is ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), "device mismatch: ", a_name, " is on ", a.device(), " but ",
                    b_name, " is on ", b.device());
}

inline void check_same_spatial(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                               const char* b_name) {
  TORCH_CHECK_VALUE(a.size(2) == b.size(2) && a.size(3) == b.size(3), "spatial size mismatch: ", a_name,
                    " is ", a.size(2), "x", a.size(3), " but ", b_name, " is ", b.size(2), "x", b.size(3),
                    " (the Python API pools the larger map to the smaller; the raw op does not)");
}

// float64 inputs accumulate in float64; float32/float16/bfloat16 inputs accumulate in float32.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}


// ------------------------------------------------------------------------------- tucker_conv2d
// Arguments of kdfast::tucker_conv2d: x (N, C, H, W), first (R_in, C), core (R_out, R_in, kh, kw),
// last (O, R_out), bias (O,) or None. Mirrored by kdfast/_checks.py:tucker_conv2d_args.
inline void check_same_dtype_device(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(x.scalar_type() == t.scalar_type(), "dtype mismatch: x is ", x.scalar_type(), " but ", name,
                   " is ", t.scalar_type());
  TORCH_CHECK_VALUE(x.device() == t.device(), "device mismatch: x is on ", x.device(), " but ", name, " is on ",
                    t.device());
}

inline void check_factor(const at::Tensor& x, const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be a ", dim, "-D tensor ", layout, ", got ", t.dim(),
                    "-D tensor of shape ", t.sizes());
  check_same_dtype_device(x, t, name);
  TORCH_CHECK_VALUE(t.numel() > 0, name, " is empty (shape ", t.sizes(), "); expected every dimension >= 1");
}

inline void check_tucker_conv2d_args(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                                     const at::Tensor& last, const c10::optional<at::Tensor>& bias,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_feature_map(x, "x");
  check_factor(x, first, "first", 2, "(R_in, C)");
  check_factor(x, core, "core", 4, "(R_out, R_in, kh, kw)");
  check_factor(x, last, "last", 2, "(O, R_out)");
  TORCH_CHECK_VALUE(first.size(1) == x.size(1), "channel mismatch: x has C = ", x.size(1), " but first has C = ",
                    first.size(1), " (first is (R_in, C))");
  TORCH_CHECK_VALUE(core.size(1) == first.size(0), "rank mismatch: first has R_in = ", first.size(0),
                    " but core has R_in = ", core.size(1), " (core is (R_out, R_in, kh, kw))");
  TORCH_CHECK_VALUE(last.size(1) == core.size(0), "rank mismatch: core has R_out = ", core.size(0),
                    " but last has R_out = ", last.size(1), " (last is (O, R_out))");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == last.size(0), "bias must be None or a 1-D tensor of shape (O,) = (",
                      last.size(0), ",), got shape ", bias->sizes());
    check_same_dtype_device(x, *bias, "bias");
  }
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "stride, padding and dilation must each have 2 elements");
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "padding must be >= 0, got ", padding);
  TORCH_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1, "dilation must be >= 1, got ", dilation);
  const int64_t kh = dilation[0] * (core.size(2) - 1) + 1, kw = dilation[1] * (core.size(3) - 1) + 1;
  const int64_t ph = x.size(2) + 2 * padding[0], pw = x.size(3) + 2 * padding[1];
  TORCH_CHECK_VALUE(kh <= ph && kw <= pw, "kernel too large: core's dilated kernel is ", kh, "x", kw,
                    " but x padded is only ", ph, "x", pw);
}

}  // namespace kdfast
