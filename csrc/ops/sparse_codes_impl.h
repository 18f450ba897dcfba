// kdfast::sparse_codes: argument checks and the ATen formulation shared by both backends.
//
//   sparse_codes(x (N, D, H, W), dictionary C (D, K), bias b (1 element), k) -> (values, indices)
//   per pixel s = sigmoid(C^T x + b) in (0, 1)^K; values (N, H, W, k) = its k largest entries in
//   descending order (ties: lower codeword index first), indices (N, H, W, k) int64 their codewords.
//
// The ATen formulation works on chunks of pixels (one GEMM, a stable sort and a gather per chunk), so
// its memory is bounded by the chunk, never (N, H, W, K). It is the CUDA default (the CUDA kernel never
// ran on a GPU) and the reference the CPU tests hold the CPU kernel to (KDFAST_CPU_KERNELS=none; csrc/ops/kernel_paths.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "kdfast/checks.h"
#include "kernel_paths.h"

namespace kdfast {
namespace sparse_codes {

// Mirrored by kdfast/_checks.py:sparse_codes_args (same messages).
inline void check_args(const at::Tensor& x, const at::Tensor& dictionary, const at::Tensor& bias, int64_t k) {
  check_feature_map(x, "x");
  TORCH_CHECK_VALUE(dictionary.defined(), "dictionary must be a tensor, got None");
  TORCH_CHECK_VALUE(dictionary.dim() == 2, "dictionary must be a 2-D tensor (D, K), got ", dictionary.dim(),
                    "-D tensor of shape ", dictionary.sizes());
  check_same_dtype_device(x, dictionary, "dictionary");
  TORCH_CHECK_VALUE(dictionary.size(0) == x.size(1), "channel mismatch: x has D = ", x.size(1),
                    " channels but dictionary has D = ", dictionary.size(0), " rows (dictionary is (D, K))");
  TORCH_CHECK_VALUE(dictionary.size(1) >= 1, "dictionary has no codewords (shape ", dictionary.sizes(),
                    "); expected K >= 1");
  TORCH_CHECK_VALUE(bias.defined(), "bias must be a tensor, got None");
  TORCH_CHECK_VALUE(bias.numel() == 1, "bias must be a 1-element tensor (the scalar intercept), got shape ",
                    bias.sizes());
  check_same_dtype_device(x, bias, "bias");
  TORCH_CHECK_VALUE(k >= 1 && k <= dictionary.size(1), "k must be in 1..K = 1..", dictionary.size(1), ", got ", k);
}

inline void check_backward_args(const at::Tensor& grad_values, const at::Tensor& x, const at::Tensor& dictionary,
                                const at::Tensor& bias, const at::Tensor& indices) {
  const int64_t k = indices.dim() == 4 ? indices.size(3) : 0;
  check_args(x, dictionary, bias, k >= 1 ? k : 1);
  const std::vector<int64_t> shape{x.size(0), x.size(2), x.size(3), k};
  TORCH_CHECK_VALUE(indices.dim() == 4 && indices.sizes() == at::IntArrayRef(shape) && k >= 1,
                    "indices must be the (N, H, W, k) codeword indices of the forward, got shape ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(grad_values.sizes() == indices.sizes(), "grad_values must have the shape of values ",
                    indices.sizes(), ", got ", grad_values.sizes());
  TORCH_CHECK_TYPE(grad_values.scalar_type() == x.scalar_type(), "dtype mismatch: x is ", x.scalar_type(),
                   " but grad_values is ", grad_values.scalar_type());
  TORCH_CHECK_VALUE(indices.device() == x.device() && grad_values.device() == x.device(),
                    "device mismatch: x is on ", x.device(), " but indices is on ", indices.device(),
                    " and grad_values on ", grad_values.device());
}

// x as (N*H*W, D) pixel rows (a view when the layout allows, else a copy).
inline at::Tensor pixel_rows(const at::Tensor& x) {
  return x.permute({0, 2, 3, 1}).reshape({-1, x.size(1)});
}

// Pixels per chunk of the ATen formulation: about 4M elements of the (chunk, K) pre-activations.
inline int64_t aten_chunk(int64_t num_codewords) {
  return std::max<int64_t>(1, (int64_t(1) << 22) / num_codewords);
}

inline std::tuple<at::Tensor, at::Tensor> forward_aten(const at::Tensor& x, const at::Tensor& dictionary,
                                                       const at::Tensor& bias, int64_t k) {
  check_args(x, dictionary, bias, k);
  const auto acc = accumulate_type(x.scalar_type());
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3), pixels = n * h * w;
  const at::Tensor rows = pixel_rows(x);
  const at::Tensor c = dictionary.to(acc);
  const at::Tensor b = bias.reshape({}).to(acc);
  at::Tensor values = at::empty({pixels, k}, x.options());
  at::Tensor indices = at::empty({pixels, k}, x.options().dtype(at::kLong));
  const int64_t chunk = aten_chunk(dictionary.size(1));
  for (int64_t p0 = 0; p0 < pixels; p0 += chunk) {
    const int64_t len = std::min(chunk, pixels - p0);
    const at::Tensor z = at::mm(rows.narrow(0, p0, len).to(acc), c);
    // A stable sort gives the kernels' tie rule (lower index first); torch.topk does not promise one.
    auto [sorted, order] = at::sort(z, /*stable=*/true, /*dim=*/1, /*descending=*/true);
    values.narrow(0, p0, len).copy_(at::sigmoid(sorted.narrow(1, 0, k) + b));
    indices.narrow(0, p0, len).copy_(order.narrow(1, 0, k));
  }
  return {values.view({n, h, w, k}), indices.view({n, h, w, k})};
}

inline at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

// Gradients through the values only (the selection is piecewise constant). Per chunk: u = z gathered
// at the winners + b, t = g s (1 - s), T = t scattered into a (chunk, K) matrix, then
// grad_x = T C^T, grad_C += x^T T, grad_b += sum t.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_aten(const at::Tensor& grad_values, const at::Tensor& x,
                                                                    const at::Tensor& dictionary, const at::Tensor& bias,
                                                                    const at::Tensor& indices, std::array<bool, 3> mask) {
  check_backward_args(grad_values, x, dictionary, bias, indices);
  const auto acc = accumulate_type(x.scalar_type());
  const int64_t d = x.size(1), kk = dictionary.size(1), k = indices.size(3);
  const int64_t pixels = x.size(0) * x.size(2) * x.size(3);
  const at::Tensor rows = pixel_rows(x);
  const at::Tensor c = dictionary.to(acc);
  const at::Tensor b = bias.reshape({}).to(acc);
  const at::Tensor g = grad_values.reshape({pixels, k}).to(acc);
  const at::Tensor idx = indices.reshape({pixels, k});
  at::Tensor grad_rows = mask[0] ? at::empty({pixels, d}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor grad_c = at::zeros({d, kk}, x.options().dtype(acc));
  at::Tensor grad_b = at::zeros({}, x.options().dtype(acc));
  const int64_t chunk = aten_chunk(kk);
  for (int64_t p0 = 0; p0 < pixels; p0 += chunk) {
    const int64_t len = std::min(chunk, pixels - p0);
    const at::Tensor xr = rows.narrow(0, p0, len).to(acc);
    const at::Tensor ic = idx.narrow(0, p0, len);
    const at::Tensor s = at::sigmoid(at::mm(xr, c).gather(1, ic) + b);
    const at::Tensor t = g.narrow(0, p0, len) * s * (1 - s);
    const at::Tensor dense = at::zeros({len, kk}, t.options()).scatter_add_(1, ic, t);
    if (mask[0]) grad_rows.narrow(0, p0, len).copy_(at::mm(dense, c.t()));
    if (mask[1]) grad_c.addmm_(xr.t(), dense);
    if (mask[2]) grad_b += t.sum();
  }
  at::Tensor grad_x = empty_grad(x);
  if (mask[0]) {
    grad_x = at::empty_like(x);
    grad_x.copy_(grad_rows.view({x.size(0), x.size(2), x.size(3), d}).permute({0, 3, 1, 2}));
  }
  return {grad_x, mask[1] ? grad_c.to(dictionary.scalar_type()) : empty_grad(dictionary),
          mask[2] ? grad_b.reshape(bias.sizes()).to(bias.scalar_type()) : empty_grad(bias)};
}

}  // namespace sparse_codes
}  // namespace kdfast
