// kdfast::tucker_conv2d on CPU.
//
// Fused path (float32, float64): the output is cut into (sample, band of output rows) tiles processed
// in parallel. For one tile the kernel
//   1. projects the input rows the tile reads (tile + halo) to R_in channels: a GEMM first (R_in, C) x
//      x-band (C, pixels), written into a zero-padded buffer laid out as stride x stride "phase planes"
//      (plane (a, b) holds the padded rows a, a + s, ... and columns b, b + s, ...),
//   2. applies the core as a GEMM over R_in * kh * kw shifted views of those planes: in a phase plane
//      every kernel tap (i, j) of every output pixel is the plane read at one constant offset, so the
//      k x k convolution (any stride, padding, dilation) is a GEMM with K = R_in * kh * kw and no im2col;
//      outputs are computed on the plane's width (Wq >= W_out) and the few extra columns dropped,
//   3. projects to O channels with a third GEMM whose store applies the epilogue
//      y = relu?((t + bias) * scale + shift + residual) and writes y once.
// The intermediates of a tile stay in L1/L2; x is read once (plus halo rows) and y written once.
// All three GEMMs share one register-blocked micro-kernel (4 rows x 3 vectors of accumulators, GCC
// vector extensions, compiled for AVX2+FMA and the baseline with target_clones like kd_loss).
// Composed path: three at::conv2d calls (oneDNN) + the epilogue in ATen ops, for dtypes the fused
// path does not cover (float16, bfloat16: this kernel has no bf16 arithmetic) and where the
// measured rule (cpu_path) prefers it.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../kernel_paths.h"
#include "../tucker_conv2d_common.h"
#include "tucker_cpu_rule.h"
#include "tucker_cpu_tiles.h"

namespace kdfast {
namespace tucker {
namespace {

using tiles::FusedArgs;
using tiles::Geometry;

Geometry geometry(const at::Tensor& x, const at::Tensor& core, const at::Tensor& last, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  Geometry g;
  g.n = x.size(0), g.c = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.r_out = core.size(0), g.r_in = core.size(1), g.kh = core.size(2), g.kw = core.size(3), g.o = last.size(0);
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.oh = conv_output_size<int64_t>(g.h, g.kh, g.sh, g.ph, g.dh);
  g.ow = conv_output_size<int64_t>(g.w, g.kw, g.sw, g.pw, g.dw);
  g.wq = ceil_div<int64_t>(g.w + 2 * g.pw, g.sw);
  return g;
}

template <typename T>
at::Tensor fused_forward(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core, const at::Tensor& last,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual, bool relu,
                         const Geometry& g) {
  at::Tensor y = at::empty({g.n, g.o, g.oh, g.ow}, x.options());
  const at::Tensor first_c = first.contiguous(), core_c = core.contiguous(), last_c = last.contiguous();
  // Per-channel affine of the epilogue: (t + bias) * scale + shift = t * mul + add.
  at::Tensor mul, add;
  if (has_tensor(scale)) mul = scale->contiguous();
  if (has_tensor(bias)) add = has_tensor(scale) ? *bias * *scale : bias->contiguous();
  if (has_tensor(shift)) add = add.defined() ? add + *shift : shift->contiguous();
  const at::Tensor res = has_tensor(residual) ? residual->contiguous() : at::Tensor();
  // x is read through its strides where a band of one channel's rows is contiguous (NCHW, or any
  // layout with dense H and W); otherwise (channels_last) each tile gathers its band.
  const bool x_nchw = (x.stride(3) == 1 || g.w == 1) && (x.stride(2) == g.w || g.h == 1);
  FusedArgs<T> p{x.data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2), x.stride(3), x_nchw,
                 first_c.data_ptr<T>(), core_c.data_ptr<T>(), last_c.data_ptr<T>(),
                 mul.defined() ? mul.data_ptr<T>() : nullptr, add.defined() ? add.data_ptr<T>() : nullptr,
                 res.defined() ? res.data_ptr<T>() : nullptr, relu, y.data_ptr<T>()};
  const int64_t rows = tiles::rows_per_tile(g, sizeof(T), at::get_num_threads());
  const int64_t n_tiles = ceil_div(g.oh, rows);
  at::parallel_for(0, g.n * n_tiles, 1, [&](int64_t begin, int64_t end) {
    tiles::fused_range<T>(p, g, rows, n_tiles, begin, end);
  });
  return y;
}

// Which path runs for these arguments on CPU.
//  - float16 / bfloat16: the composition (the fused kernel has no reduced-precision arithmetic; this
//    CPU has no AVX512-BF16 to make one pay).
//  - float32 / float64: the measured rule. tucker_cpu_rule.h holds, for each shape measured by
//    benchmarks/bench_students.py (layer part, 3x3 cores; thin CIFAR shapes and a few wide ImageNet
//    ones) at each measured thread count, the fused kernel's speed-up over oneDNN's three
//    convolutions; a call takes the fused kernel when, among the measurements at the thread count
//    nearest to at::get_num_threads() (the balance shifts with it: oneDNN scales better to 2 threads
//    on wide layers), the nearest measured shape (in log2 of N, C, R, H*W) measured it faster.
//    Other kernel sizes and strides use the same table (the fused kernel's per-pixel cost scales like
//    the composition's).
bool rule_prefers_fused(const Geometry& g, int64_t threads) {
  const double t = std::log2(double(std::max<int64_t>(threads, 1)));
  double nearest_threads = 1e300;
  for (const MeasuredTuckerShape& m : kTuckerCpuMeasurements)
    nearest_threads = std::min(nearest_threads, std::abs(t - std::log2(m.threads)));
  const double n = std::log2(double(g.n)), c = std::log2(double(std::max(g.c, g.o))),
               r = std::log2(double(std::max(g.r_in, g.r_out))), hw = std::log2(double(g.oh * g.ow));
  double best = 1e300, speedup = 1.0;
  for (const MeasuredTuckerShape& m : kTuckerCpuMeasurements) {
    if (std::abs(t - std::log2(m.threads)) > nearest_threads) continue;
    const double dn = n - std::log2(m.n), dc = c - std::log2(m.c), dr = r - std::log2(m.r),
                 dhw = hw - std::log2(m.hw * m.hw);
    // batch matters least (the kernel parallelises over samples and tiles alike)
    const double d = 0.25 * dn * dn + dc * dc + dr * dr + dhw * dhw;
    if (d < best) best = d, speedup = m.fused_speedup;
  }
  return speedup > 1.0;
}

const char* cpu_path(const at::Tensor& x, const Geometry& g) {
  if (!paths::use_kernel(paths::kTuckerConv2d, x)) return kPathComposed;  // KDFAST_CPU_KERNELS
  const auto dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return kPathComposed;
  if (const char* forced = forced_path()) return forced;
  return rule_prefers_fused(g, at::get_num_threads()) ? kPathFused : kPathComposed;
}

at::Tensor tucker_conv2d_cpu(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                             const at::Tensor& last, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual,
                             bool relu) {
  check_tucker_conv2d_args(x, first, core, last, bias, stride, padding, dilation);
  check_tucker_epilogue_args(x, core, last, scale, shift, residual, stride, padding, dilation);
  const Geometry g = geometry(x, core, last, stride, padding, dilation);
  const char* path = cpu_path(x, g);
  log_path("cpu", path, x, core);
  if (std::strcmp(path, kPathComposed) == 0)
    return apply_epilogue(composed_forward(x, first, core, last, bias, stride, padding, dilation), scale, shift,
                          residual, relu);
  if (g.n == 0) return at::empty({0, g.o, g.oh, g.ow}, x.options());
  if (x.scalar_type() == at::kFloat)
    return fused_forward<float>(x, first, core, last, bias, scale, shift, residual, relu, g);
  return fused_forward<double>(x, first, core, last, bias, scale, shift, residual, relu, g);
}

std::string tucker_conv2d_path_cpu(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                                   const at::Tensor& last, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation) {
  check_tucker_conv2d_args(x, first, core, last, c10::nullopt, stride, padding, dilation);
  return cpu_path(x, geometry(x, core, last, stride, padding, dilation));
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
