// sparse_codes on CPU (see csrc/ops/sparse_codes_impl.h for the op and csrc/include/kdfast/sparse_codes.h
// for the selection rule).
//
// Forward, one pass per tile of pixels of one image (at::parallel_for over tiles): the tile's
// pre-activations z = x_tile C (P x K, ~128 KiB, in a per-thread buffer that stays in cache) by one
// BLAS GEMM, then per pixel a running top-k over its row of z, the sigmoid of the k winners only, and
// the k values and indices written out. Nothing K-wide outlives the tile.
//
// Backward (gradients through the values): per pixel, the k winners' pre-activations are recomputed
// (k dot products of length D, so nothing but the int64 indices is kept from the forward), then
// t = g s (1 - s) and grad_x = sum_i t_i C[:, j_i]: k x D work per pixel, no GEMM. grad_C is
// gathered per codeword column from a stable counting sort of the (pixel, winner) pairs, so every
// column is a sum in pixel order: deterministic and independent of the thread count, like grad_b
// (partial sums per fixed tile, added in tile order).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../sparse_codes_impl.h"
#include "kdfast/sparse_codes.h"

namespace kdfast {
namespace sparse_codes {
namespace {

// Bytes of the per-thread tile of pre-activations (P x K accumulate-type entries).
constexpr int64_t kTileBytes = 128 * 1024;
constexpr int64_t kMinTile = 16, kMaxTile = 512;
// Pixels per backward tile (fixed: grad_b's partial sums must not depend on the thread count).
constexpr int64_t kBackwardTile = 256;
constexpr int kLanes = 8;

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  acc_t out = 0;
  for (int l = 0; l < kLanes; ++l) out += lanes[l];
  for (; i < n; ++i) out += a[i] * b[i];
  return out;
}

// The k best of one row of z (K entries) into best_v / best_i (size k), by the rule of
// kdfast/sparse_codes.h. Small k: insertion into a sorted buffer while streaming the row; large k: a
// partial sort of the indices by (value descending, index ascending), which gives the same result.
template <typename acc_t>
void topk_row(const acc_t* z, int64_t num_codewords, int64_t k, acc_t* best_v, int64_t* best_i,
              std::vector<int64_t>& order) {
  if (k <= 32) {
    int filled = 0;
    for (int64_t j = 0; j < num_codewords; ++j) topk_push<acc_t, int64_t>(z[j], j, static_cast<int>(k), filled, best_v, best_i);
    return;
  }
  order.resize(num_codewords);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [z](int64_t a, int64_t b) {
    return z[a] > z[b] || (!(z[b] > z[a]) && a < b);
  });
  for (int64_t i = 0; i < k; ++i) {
    best_i[i] = order[i];
    best_v[i] = z[order[i]];
  }
}

// The (P, D) rows of pixels [hw0, hw0 + len) of image n as a strided view of x (H and W merge into
// one pixel axis: checked by the caller).
at::Tensor tile_view(const at::Tensor& x, int64_t n, int64_t hw0, int64_t len, int64_t pixel_stride) {
  return x.as_strided({len, x.size(1)}, {pixel_stride, x.stride(1)},
                      x.storage_offset() + n * x.stride(0) + hw0 * pixel_stride);
}

std::tuple<at::Tensor, at::Tensor> forward_kernel(const at::Tensor& x_in, const at::Tensor& dictionary,
                                                  const at::Tensor& bias, int64_t k) {
  const int64_t n = x_in.size(0), d = x_in.size(1), h = x_in.size(2), w = x_in.size(3), hw = h * w;
  const int64_t kk = dictionary.size(1);
  // One pixel axis over (H, W): true for contiguous, channels_last and column-sliced maps.
  const bool mergeable = h == 1 || w == 1 || x_in.stride(2) == w * x_in.stride(3);
  const at::Tensor x = mergeable ? x_in : x_in.contiguous();
  const int64_t pixel_stride = w == 1 ? x.stride(2) : x.stride(3);
  const auto acc = accumulate_type(x.scalar_type());
  at::Tensor values = at::empty({n, h, w, k}, x.options());
  at::Tensor indices = at::empty({n, h, w, k}, x.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kdfast_sparse_codes_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const at::Tensor c = dictionary.to(acc).contiguous();
    const acc_t b = bias.reshape({}).to(acc).item<acc_t>();
    const int64_t tile = std::clamp<int64_t>(kTileBytes / (kk * int64_t(sizeof(acc_t))), kMinTile, kMaxTile);
    const int64_t tiles_per_image = (hw + tile - 1) / tile;
    scalar_t* out_v = values.data_ptr<scalar_t>();
    int64_t* out_i = indices.data_ptr<int64_t>();
    at::parallel_for(0, n * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
      at::Tensor z = at::empty({tile, kk}, x.options().dtype(acc));
      at::Tensor x_acc;  // half types: the tile converted to float32 for the GEMM
      std::vector<acc_t> best_v(k);
      std::vector<int64_t> best_i(k), order;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t img = t / tiles_per_image, hw0 = (t % tiles_per_image) * tile;
        const int64_t len = std::min(tile, hw - hw0);
        at::Tensor rows = tile_view(x, img, hw0, len, pixel_stride);
        if (!std::is_same<scalar_t, acc_t>::value) {
          if (!x_acc.defined()) x_acc = at::empty({tile, d}, x.options().dtype(acc));
          rows = x_acc.narrow(0, 0, len).copy_(rows);
        }
        at::Tensor z_tile = z.narrow(0, 0, len);
        at::mm_out(z_tile, rows, c);
        const acc_t* zp = z.const_data_ptr<acc_t>();
        for (int64_t p = 0; p < len; ++p) {
          topk_row<acc_t>(zp + p * kk, kk, k, best_v.data(), best_i.data(), order);
          const int64_t pix = img * hw + hw0 + p;
          for (int64_t i = 0; i < k; ++i) {
            out_v[pix * k + i] = static_cast<scalar_t>(sigmoid<acc_t>(best_v[i] + b));
            out_i[pix * k + i] = best_i[i];
          }
        }
      }
    });
  });
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_kernel(const at::Tensor& grad_values, const at::Tensor& x,
                                                               const at::Tensor& dictionary, const at::Tensor& bias,
                                                               const at::Tensor& indices_in, std::array<bool, 3> mask) {
  const int64_t n = x.size(0), d = x.size(1), h = x.size(2), w = x.size(3), pixels = n * h * w;
  const int64_t kk = dictionary.size(1), k = indices_in.size(3), entries = pixels * k;
  const auto acc = accumulate_type(x.scalar_type());
  const at::Tensor indices = indices_in.contiguous();
  if (entries > 0) {
    // The indices index C below: out-of-range ones (not from this forward) must not read out of bounds.
    const auto [lo, hi] = at::aminmax(indices);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < kk, "indices must be codeword indices in [0, ",
                      kk, "), got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
  at::Tensor grad_x = empty_grad(x), grad_c = empty_grad(dictionary), grad_b = empty_grad(bias);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kdfast_sparse_codes_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    // Pixel rows (P, D) and codeword rows C^T (K, D), both contiguous in the accumulate type
    // (free for float32/float64 channels_last x; one copy of x otherwise, never K-wide).
    const at::Tensor rows = pixel_rows(x).to(acc).contiguous();
    const at::Tensor ct = dictionary.t().to(acc).contiguous();
    const at::Tensor g = grad_values.reshape({pixels, k}).to(acc).contiguous();
    const acc_t b = bias.reshape({}).to(acc).item<acc_t>();
    const acc_t* xr = rows.const_data_ptr<acc_t>();
    const acc_t* cr = ct.const_data_ptr<acc_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const int64_t* ip = indices.const_data_ptr<int64_t>();
    at::Tensor coef = at::empty({entries}, rows.options());  // t = g s (1 - s) per (pixel, winner)
    acc_t* tp = coef.data_ptr<acc_t>();
    at::Tensor grad_rows = mask[0] ? at::empty({pixels, d}, rows.options()) : at::Tensor();
    acc_t* gx = mask[0] ? grad_rows.data_ptr<acc_t>() : nullptr;
    const int64_t tiles = (pixels + kBackwardTile - 1) / kBackwardTile;
    std::vector<acc_t> partial_b(tiles, acc_t(0));
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        acc_t sum_t = 0;
        for (int64_t p = t * kBackwardTile; p < std::min(pixels, (t + 1) * kBackwardTile); ++p) {
          const acc_t* xp = xr + p * d;
          acc_t* gxp = mask[0] ? gx + p * d : nullptr;
          if (gxp != nullptr) std::fill(gxp, gxp + d, acc_t(0));
          for (int64_t i = 0; i < k; ++i) {
            const int64_t e = p * k + i;
            const acc_t* cj = cr + ip[e] * d;
            const acc_t s = sigmoid<acc_t>(dot(cj, xp, d) + b);
            const acc_t te = gp[e] * sigmoid_grad(s);
            tp[e] = te;
            sum_t += te;
            if (gxp != nullptr)
              for (int64_t q = 0; q < d; ++q) gxp[q] += te * cj[q];
          }
        }
        partial_b[t] = sum_t;
      }
    });
    if (mask[0]) {
      grad_x = at::empty_like(x);
      grad_x.copy_(grad_rows.view({n, h, w, d}).permute({0, 3, 1, 2}));
    }
    if (mask[1]) {
      // Stable counting sort of the entries by codeword: bucket j lists its entries in pixel order.
      std::vector<int64_t> start(kk + 1, 0), order(entries);
      for (int64_t e = 0; e < entries; ++e) ++start[ip[e] + 1];
      std::partial_sum(start.begin(), start.end(), start.begin());
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t e = 0; e < entries; ++e) order[fill[ip[e]]++] = e;
      at::Tensor grad_ct = at::empty({kk, d}, rows.options());
      acc_t* gc = grad_ct.data_ptr<acc_t>();
      at::parallel_for(0, kk, 1, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          acc_t* row = gc + j * d;
          std::fill(row, row + d, acc_t(0));
          for (int64_t o = start[j]; o < start[j + 1]; ++o) {
            const int64_t e = order[o];
            const acc_t te = tp[e];
            const acc_t* xp = xr + (e / k) * d;
            for (int64_t q = 0; q < d; ++q) row[q] += te * xp[q];
          }
        }
      });
      grad_c = grad_ct.t().to(dictionary.scalar_type()).contiguous();
    }
    if (mask[2]) {
      acc_t sum_b = 0;
      for (const acc_t v : partial_b) sum_b += v;
      grad_b = at::full(bias.sizes(), sum_b, bias.options());
    }
  });
  return {grad_x, grad_c, grad_b};
}

std::tuple<at::Tensor, at::Tensor> sparse_codes_cpu(const at::Tensor& x, const at::Tensor& dictionary,
                                                    const at::Tensor& bias, int64_t k) {
  check_args(x, dictionary, bias, k);
  if (!use_kernel(true)) return forward_aten(x, dictionary, bias, k);
  return forward_kernel(x, dictionary, bias, k);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_codes_backward_cpu(const at::Tensor& grad_values,
                                                                         const at::Tensor& x,
                                                                         const at::Tensor& dictionary,
                                                                         const at::Tensor& bias,
                                                                         const at::Tensor& indices,
                                                                         std::array<bool, 3> mask) {
  check_backward_args(grad_values, x, dictionary, bias, indices);
  if (!use_kernel(true)) return backward_aten(grad_values, x, dictionary, bias, indices, mask);
  return backward_kernel(grad_values, x, dictionary, bias, indices, mask);
}

}  // namespace
}  // namespace sparse_codes
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("sparse_codes", &kdfast::sparse_codes::sparse_codes_cpu);
  m.impl("_sparse_codes_backward", &kdfast::sparse_codes::sparse_codes_backward_cpu);
}
