// Helpers shared by the loss ops' drivers (both backends): feature-map rows and reductions.
#pragma once

#include <ATen/ATen.h>

#include "kdfast/checks.h"

namespace kdfast {

// (B, C, H, W) -> (B, C, H*W); a view for contiguous and channels_last maps.
inline at::Tensor rows_of(const at::Tensor& x) {
  return x.flatten(2);
}

inline at::Tensor reduce_per_sample(const at::Tensor& per_sample, Reduction reduction, at::ScalarType out_dtype) {
  switch (reduction) {
    case Reduction::Mean: return per_sample.mean().to(out_dtype);
    case Reduction::Sum: return per_sample.sum().to(out_dtype);
    case Reduction::None: return per_sample.to(out_dtype);
  }
  TORCH_INTERNAL_ASSERT(false, "unknown reduction");
}

// d loss / d per_sample[n] as a contiguous (B,) tensor in `acc_dtype`.
inline at::Tensor per_sample_grad(const at::Tensor& grad_loss, Reduction reduction, int64_t batch,
                                  at::ScalarType acc_dtype) {
  auto g = grad_loss.to(acc_dtype);
  switch (reduction) {
    case Reduction::Mean: return g.div(static_cast<double>(batch)).expand({batch}).contiguous();
    case Reduction::Sum: return g.expand({batch}).contiguous();
    case Reduction::None:
      TORCH_CHECK_VALUE(g.dim() == 1 && g.size(0) == batch, "grad_loss must have shape (", batch,
                        ",) for reduction='none', got ", g.sizes());
      return g.contiguous();
  }
  TORCH_INTERNAL_ASSERT(false, "unknown reduction");
}

// Placeholder for a gradient that output_mask says is not needed (the schema has no optional outputs).
inline at::Tensor unused_grad(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

}  // namespace kdfast
