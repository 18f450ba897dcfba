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

}  // namespace kdfast
