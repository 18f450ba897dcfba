// Index arithmetic of the fused Tucker-2 convolution (kdfast::tucker_conv2d), shared by the CPU
// kernel and the CUDA kernel so the CPU test-suite exercises the same tile/halo math the GPU uses.
//
// A fused kernel computes a tile of output rows/columns. The k x k core needs, for output
// positions [o0, o0 + n) along one axis, the input positions
//   [o0 * stride - pad, (o0 + n - 1) * stride - pad + dilation * (k - 1)]   (inclusive),
// i.e. the tile plus its halo. The first 1x1 projection is evaluated on exactly that span (clipped
// to the image; positions outside it are the core's zero padding).
// Keep these free of ATen types.
#pragma once

#include "kdfast/math.h"

namespace kdfast {
namespace tucker {

// Output size of a convolution along one axis (as torch.nn.functional.conv2d computes it).
template <typename index_t>
KDFAST_HOST_DEVICE index_t conv_output_size(index_t in, index_t kernel, index_t stride, index_t pad,
                                            index_t dilation) {
  return (in + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
}

// First input position (may be negative: inside the zero padding) read by output position `out`.
template <typename index_t>
KDFAST_HOST_DEVICE index_t halo_begin(index_t out, index_t stride, index_t pad) {
  return out * stride - pad;
}

// Number of input positions (tile + halo) read by `n_out` consecutive output positions.
template <typename index_t>
KDFAST_HOST_DEVICE index_t halo_extent(index_t n_out, index_t kernel, index_t stride, index_t dilation) {
  return (n_out - 1) * stride + dilation * (kernel - 1) + 1;
}

// Input position read by output position `out` through kernel tap `tap`.
template <typename index_t>
KDFAST_HOST_DEVICE index_t input_index(index_t out, index_t tap, index_t stride, index_t pad, index_t dilation) {
  return out * stride - pad + tap * dilation;
}

template <typename index_t>
KDFAST_HOST_DEVICE index_t clamp_index(index_t v, index_t lo, index_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename index_t>
KDFAST_HOST_DEVICE bool in_range(index_t v, index_t size) {
  return v >= 0 && v < size;
}

template <typename index_t>
KDFAST_HOST_DEVICE index_t ceil_div(index_t a, index_t b) {
  return (a + b - 1) / b;
}

}  // namespace tucker
}  // namespace kdfast
