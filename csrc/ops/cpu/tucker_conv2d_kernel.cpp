// kdfast::tucker_conv2d on CPU.
//
// Fused path: the output is cut into (sample, band of output rows) tiles processed in parallel.
// For one tile the kernel
//   1. projects the input rows the tile reads (tile + halo, see kdfast/tucker_geometry.h) to R_in
//      channels with one GEMM (first @ x[n, :, rows, :]),
//   2. unfolds that small R_in-channel band (im2col, zero padding applied here) and applies the
//      core with a second GEMM,
//   3. projects to O channels with a third GEMM written straight into y (bias added by the GEMM).
// The R_in and R_out intermediates of a tile stay in cache; only x is read and y written in memory.
// Composed path: three at::conv2d calls (oneDNN), used where measurements showed it is faster
// (see cpu_path) and for dtypes the fused path does not cover (float16, bfloat16).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "../kernel_paths.h"
#include "../tucker_conv2d_common.h"

namespace kdfast {
namespace tucker {
namespace {

struct Geometry {
  int64_t n, c, h, w, r_in, r_out, o, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw;
};

Geometry geometry(const at::Tensor& x, const at::Tensor& core, const at::Tensor& last, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  Geometry g;
  g.n = x.size(0), g.c = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.r_out = core.size(0), g.r_in = core.size(1), g.kh = core.size(2), g.kw = core.size(3), g.o = last.size(0);
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.oh = conv_output_size<int64_t>(g.h, g.kh, g.sh, g.ph, g.dh);
  g.ow = conv_output_size<int64_t>(g.w, g.kw, g.sw, g.pw, g.dw);
  return g;
}

// Output rows per tile: enough columns for efficient GEMMs, small enough that a tile's
// intermediates (im2col block + R_out block) fit in ~L2, and enough tiles to feed every thread.
int64_t rows_per_tile(const Geometry& g, size_t elem_size) {
  const int64_t budget_elems = (512 * 1024) / static_cast<int64_t>(elem_size);
  const int64_t per_column = g.r_in * g.kh * g.kw + g.r_out;
  const int64_t columns = std::max<int64_t>(g.ow, budget_elems / std::max<int64_t>(per_column, 1));
  int64_t rows = std::min<int64_t>(g.oh, std::max<int64_t>(1, columns / g.ow));
  const int64_t threads = at::get_num_threads();
  while (rows > 1 && g.n * ceil_div(g.oh, rows) < 2 * threads) rows = ceil_div<int64_t>(rows, 2);
  return rows;
}

// cols[(r, i, j), (oh - oh0) * OW + ow] = z1[r, ih, iw] with ih, iw from input_index, 0 outside the image.
// z1 holds input rows [row0, row0 + rows) of the R_in projection.
template <typename scalar_t>
void im2col_band(const scalar_t* z1, int64_t row0, int64_t rows, const Geometry& g, int64_t oh0, int64_t oh1,
                 scalar_t* cols) {
  const int64_t n_cols = (oh1 - oh0) * g.ow;
  for (int64_t r = 0; r < g.r_in; ++r) {
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        scalar_t* dst_row = cols + ((r * g.kh + i) * g.kw + j) * n_cols;
        // Output columns whose input column is inside the image: ow in [ow_lo, ow_hi).
        const int64_t shift = j * g.dw - g.pw;  // iw = ow * sw + shift
        const int64_t ow_lo = std::min<int64_t>(g.ow, shift >= 0 ? 0 : ceil_div<int64_t>(-shift, g.sw));
        const int64_t ow_hi = std::max<int64_t>(ow_lo, std::min<int64_t>(g.ow, g.w - shift > 0 ? ceil_div<int64_t>(g.w - shift, g.sw) : 0));
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          scalar_t* dst = dst_row + (oh - oh0) * g.ow;
          const int64_t ih = input_index<int64_t>(oh, i, g.sh, g.ph, g.dh);
          if (!in_range(ih, g.h)) {
            std::fill(dst, dst + g.ow, scalar_t(0));
            continue;
          }
          const scalar_t* src = z1 + (r * rows + (ih - row0)) * g.w;
          std::fill(dst, dst + ow_lo, scalar_t(0));
          if (g.sw == 1) {
            std::memcpy(dst + ow_lo, src + ow_lo + shift, sizeof(scalar_t) * (ow_hi - ow_lo));
          } else {
            for (int64_t ow = ow_lo; ow < ow_hi; ++ow) dst[ow] = src[ow * g.sw + shift];
          }
          std::fill(dst + ow_hi, dst + g.ow, scalar_t(0));
        }
      }
    }
  }
}

template <typename scalar_t>
void fused_forward(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core2d, const at::Tensor& last,
                   const at::Tensor& bias_column, const Geometry& g, at::Tensor& y) {
  const int64_t rows = rows_per_tile(g, sizeof(scalar_t));
  const int64_t tiles = ceil_div(g.oh, rows);
  // A 1x1, stride-1, unpadded core reads exactly its tile: the projection is the im2col block.
  const bool pointwise_core = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
  at::parallel_for(0, g.n * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles, oh0 = (item % tiles) * rows, oh1 = std::min(g.oh, oh0 + rows);
      // Input rows read by output rows [oh0, oh1), clipped to the image (the rest is zero padding).
      const int64_t lo = halo_begin<int64_t>(oh0, g.sh, g.ph);
      const int64_t hi = lo + halo_extent<int64_t>(oh1 - oh0, g.kh, g.sh, g.dh);
      const int64_t row0 = clamp_index<int64_t>(lo, 0, g.h), row1 = clamp_index<int64_t>(hi, 0, g.h);
      const int64_t n_cols = (oh1 - oh0) * g.ow;
      at::Tensor z2;
      if (row1 <= row0) {  // the band lies entirely in the padding: the core sees zeros
        z2 = at::zeros({g.r_out, n_cols}, x.options());
      } else {
        const at::Tensor x_band = x[n].narrow(1, row0, row1 - row0).view({g.c, (row1 - row0) * g.w});
        const at::Tensor z1 = at::mm(first, x_band);  // (R_in, band rows * W)
        if (pointwise_core) {
          z2 = at::mm(core2d, z1);
        } else {
          at::Tensor cols = at::empty({g.r_in * g.kh * g.kw, n_cols}, x.options());
          im2col_band<scalar_t>(z1.data_ptr<scalar_t>(), row0, row1 - row0, g, oh0, oh1, cols.data_ptr<scalar_t>());
          z2 = at::mm(core2d, cols);  // (R_out, tile columns)
        }
      }
      at::Tensor y_tile = y[n].view({g.o, g.oh * g.ow}).narrow(1, oh0 * g.ow, n_cols);
      if (bias_column.defined()) {
        at::addmm_out(y_tile, bias_column.expand({g.o, n_cols}), last, z2);
      } else {
        at::mm_out(y_tile, last, z2);
      }
    }
  });
}

// Which path runs for these arguments on CPU. Rule from measurements on a shared, heavily loaded
// 2-core AMD EPYC (load average 7-10 from other jobs), 3x3 cores, ranks 0.25/0.5 of C, best of 15-30
// calls (numbers in the report of branch tucker-op; benchmarks/bench_tucker.py times the forced
// fused path as "kdfast-fused" so the rule can be re-derived on an idle machine):
//  - float32: oneDNN's three convolutions beat this kernel on most ResNet/CIFAR shapes (fused time
//    1.2-1.7x the composition's), so float32 always takes the composition.
//  - float64 (no oneDNN; ATen's im2col convolution), one thread: the fused kernel is on par or faster
//    (0.99-3x) on >= 28x28 outputs with R_in * kh * kw <= 288 (R_in <= 32 for 3x3), slower on small
//    maps and larger ranks. With 2 threads it was slower on every measured shape (0.15-0.9x), so
//    multi-threaded runs take the composition.
const char* cpu_path(const at::Tensor& x, const at::Tensor& core, int64_t out_positions) {
  if (!paths::use_kernel(paths::kTuckerConv2d, x)) return kPathComposed;  // KDFAST_CPU_KERNELS
  const auto dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return kPathComposed;
  if (const char* forced = forced_path()) return forced;
  if (dtype == at::kFloat) return kPathComposed;
  // channels_last input: the fused path would first copy x to NCHW.
  if (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return kPathComposed;
  const int64_t unfolded_rank = core.size(1) * core.size(2) * core.size(3);
  const bool measured_faster = at::get_num_threads() == 1 && out_positions >= 28 * 28 && unfolded_rank <= 288;
  return measured_faster ? kPathFused : kPathComposed;
}

at::Tensor tucker_conv2d_cpu(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                             const at::Tensor& last, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_tucker_conv2d_args(x, first, core, last, bias, stride, padding, dilation);
  const Geometry g = geometry(x, core, last, stride, padding, dilation);
  const char* path = cpu_path(x, core, g.oh * g.ow);
  log_path("cpu", path, x, core);
  if (std::strcmp(path, kPathComposed) == 0) return composed_forward(x, first, core, last, bias, stride, padding, dilation);

  at::Tensor y = at::empty({g.n, g.o, g.oh, g.ow}, x.options());
  const at::Tensor x_c = x.contiguous(), first_c = first.contiguous(), last_c = last.contiguous();
  const at::Tensor core2d = core.contiguous().view({g.r_out, g.r_in * g.kh * g.kw});
  at::Tensor bias_column;
  if (bias.has_value() && bias->defined()) bias_column = bias->contiguous().view({g.o, 1});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tucker_conv2d_cpu", [&] {
    fused_forward<scalar_t>(x_c, first_c, core2d, last_c, bias_column, g, y);
  });
  return y;
}

std::string tucker_conv2d_path_cpu(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                                   const at::Tensor& last, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation) {
  check_tucker_conv2d_args(x, first, core, last, c10::nullopt, stride, padding, dilation);
  const Geometry g = geometry(x, core, last, stride, padding, dilation);
  return cpu_path(x, core, g.oh * g.ow);
}

}  // namespace
}  // namespace tucker
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("tucker_conv2d", &kdfast::tucker::tucker_conv2d_cpu);
  m.impl("_tucker_conv2d_backward", &kdfast::tucker::backward);
  m.impl("_tucker_conv2d_with_intermediates", &kdfast::tucker::composed_forward_with_intermediates);
  m.impl("_tucker_conv2d_backward_saved", &kdfast::tucker::backward_saved);
  m.impl("_tucker_conv2d_path", &kdfast::tucker::tucker_conv2d_path_cpu);
}
