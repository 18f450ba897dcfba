// sparse_codes on CPU (see csrc/ops/sparse_codes_impl.h for the op and csrc/include/kdfast/sparse_codes.h
// for the selection rule).
//
// Forward, one pass per block of pixels (whole images, or a pixel range of one image; ~4 MiB of
// pre-activations): the block's z = x_block C by one BLAS GEMM (outside at::parallel_for: calling
// BLAS from inside the parallel region oversubscribes the cores, measured up to 30x slower on 2
// threads), then, in parallel over pixels, a running top-k over each row of z, the sigmoid of the k
// winners only, and the k values and indices written out. Nothing K-wide outlives the block.
//
// Backward (gradients through the values): per pixel, the k winners' pre-activations are recomputed
// (k dot products of length D, so nothing but the int64 indices is kept from the forward), then
// t = g s (1 - s) and grad_x = sum_i t_i C[:, j_i]: k x D work per pixel, no GEMM. grad_C is
// scattered by fixed chunks of pixels into per-chunk buffers added in chunk order, and grad_b summed
// per fixed tile in tile order: deterministic and independent of the thread count.
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

// Bytes of one block of pre-activations (pixels x K accumulate-type entries): bounded memory, large
// enough for an efficient multi-threaded GEMM.
constexpr int64_t kBlockBytes = 4 * 1024 * 1024;
constexpr int64_t kBackwardTile = 256;
// Partial grad_C buffers (K x D each) of the backward: enough to spread over the threads.
constexpr int64_t kGradChunks = 8;
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

// x's pixels as (images, H W, D) with one pixel axis over (H, W) (a view for contiguous, channels_last
// and column-sliced maps; a copy otherwise).
at::Tensor pixel_view(const at::Tensor& x) {
  const int64_t h = x.size(2), w = x.size(3);
  const bool mergeable = h == 1 || w == 1 || x.stride(2) == w * x.stride(3);
  const at::Tensor xm = mergeable ? x : x.contiguous();
  const int64_t pixel_stride = w == 1 ? xm.stride(2) : xm.stride(3);
  return xm.as_strided({xm.size(0), h * w, xm.size(1)}, {xm.stride(0), pixel_stride, xm.stride(1)});
}

std::tuple<at::Tensor, at::Tensor> forward_kernel(const at::Tensor& x, const at::Tensor& dictionary,
                                                  const at::Tensor& bias, int64_t k) {
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3), hw = h * w;
  const int64_t kk = dictionary.size(1);
  const auto acc = accumulate_type(x.scalar_type());
  const at::Tensor pixels = pixel_view(x);
  at::Tensor values = at::empty({n, h, w, k}, x.options());
  at::Tensor indices = at::empty({n, h, w, k}, x.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kdfast_sparse_codes_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const at::Tensor c = dictionary.to(acc).contiguous();
    const acc_t b = bias.reshape({}).to(acc).item<acc_t>();
    scalar_t* out_v = values.data_ptr<scalar_t>();
    int64_t* out_i = indices.data_ptr<int64_t>();
    // Blocks of whole images (one batched GEMM) or, when one image's block is too large, of pixel ranges
    // within an image. The GEMM runs outside at::parallel_for (BLAS has its own threads); the top-k
    // scan of the block's rows runs inside it.
    const int64_t row_bytes = kk * int64_t(sizeof(acc_t));
    const int64_t images_per_block = std::max<int64_t>(1, kBlockBytes / (row_bytes * hw));
    const int64_t pixels_per_block = std::min(hw, std::max<int64_t>(1, kBlockBytes / row_bytes));
    for (int64_t img = 0; img < n; img += images_per_block) {
      const int64_t imgs = std::min(images_per_block, n - img);
      for (int64_t hw0 = 0; hw0 < hw; hw0 += pixels_per_block) {
        const int64_t len = imgs > 1 ? hw : std::min(pixels_per_block, hw - hw0);
        const at::Tensor rows = pixels.narrow(0, img, imgs).narrow(1, hw0, len).to(acc);
        const at::Tensor z = at::matmul(rows, c).contiguous();  // (imgs, len, K)
        const acc_t* zp = z.const_data_ptr<acc_t>();
        at::parallel_for(0, imgs * len, 16, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> best_v(k);
          std::vector<int64_t> best_i(k), order;
          for (int64_t r = begin; r < end; ++r) {
            topk_row<acc_t>(zp + r * kk, kk, k, best_v.data(), best_i.data(), order);
            const int64_t pix = (img + r / len) * hw + hw0 + r % len;
            for (int64_t i = 0; i < k; ++i) {
              out_v[pix * k + i] = static_cast<scalar_t>(sigmoid<acc_t>(best_v[i] + b));
              out_i[pix * k + i] = best_i[i];
            }
          }
        });
        if (imgs > 1) break;  // whole images: one block covers every pixel
      }
    }
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
      // grad_C^T rows: each fixed chunk of pixels scatters t_e x_p into its own (K, D) buffer, reading
      // x rows in order (a per-codeword gather of random x rows measured 3x slower); the buffers are
      // then added in chunk order. The chunking depends only on the sizes: deterministic, and
      // independent of the thread count.
      const int64_t chunks = std::min<int64_t>(kGradChunks, tiles);
      const int64_t per_chunk = (pixels + chunks - 1) / chunks;
      at::Tensor partial = at::zeros({chunks, kk, d}, rows.options());
      acc_t* pc = partial.data_ptr<acc_t>();
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t ch = begin; ch < end; ++ch) {
          acc_t* buf = pc + ch * kk * d;
          for (int64_t p = ch * per_chunk; p < std::min(pixels, (ch + 1) * per_chunk); ++p) {
            const acc_t* xp = xr + p * d;
            for (int64_t i = 0; i < k; ++i) {
              const int64_t e = p * k + i;
              const acc_t te = tp[e];
              acc_t* row = buf + ip[e] * d;
              for (int64_t q = 0; q < d; ++q) row[q] += te * xp[q];
            }
          }
        }
      });
      at::Tensor grad_ct = partial.select(0, 0);
      for (int64_t ch = 1; ch < chunks; ++ch) grad_ct.add_(partial.select(0, ch));
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
  if (!paths::use_kernel(paths::kSparseCodes, x)) return forward_aten(x, dictionary, bias, k);  // KDFAST_CPU_KERNELS
  return forward_kernel(x, dictionary, bias, k);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_codes_backward_cpu(const at::Tensor& grad_values,
                                                                         const at::Tensor& x,
                                                                         const at::Tensor& dictionary,
                                                                         const at::Tensor& bias,
                                                                         const at::Tensor& indices,
                                                                         std::array<bool, 3> mask) {
  check_backward_args(grad_values, x, dictionary, bias, indices);
  if (!paths::use_kernel(paths::kSparseCodes, x)) return backward_aten(grad_values, x, dictionary, bias, indices, mask);
  return backward_kernel(grad_values, x, dictionary, bias, indices, mask);
}

}  // namespace
}  // namespace sparse_codes
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("sparse_codes", &kdfast::sparse_codes::sparse_codes_cpu);
  m.impl("_sparse_codes_backward", &kdfast::sparse_codes::sparse_codes_backward_cpu);
}
