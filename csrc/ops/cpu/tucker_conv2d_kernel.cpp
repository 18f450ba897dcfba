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
// All three GEMMs share one register-blocked micro-kernel: AVX-512 (8 rows x 3 zmm) where the CPU has
// it, else AVX2+FMA (4 rows x 3 ymm), else GCC vector extensions (target_clones like kd_loss).
// Composed path: three at::conv2d calls (oneDNN) + the epilogue in ATen ops, for dtypes the fused
// path does not cover (float16, bfloat16: this kernel has no bf16 arithmetic) and where cpu_choice
// picks it: by measurement on the key's first call (tucker_cpu_autotune.h), or without autotuning by
// the measured table inside its envelope (docs/tucker-path.md).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../kernel_paths.h"
#include "../tucker_conv2d_common.h"
#include "tucker_cpu_autotune.h"
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

// The path without autotuning (also what a call takes that is not measured, see cpu_choice).
//  - float16 / bfloat16: the composition (the fused kernel has no reduced-precision arithmetic; this
//    CPU has no AVX512-BF16 to make one pay).
//  - float32 / float64 inside the measured envelope (in_envelope): the measured rule.
//    tucker_cpu_rule.h holds, for each shape measured by benchmarks/bench_students.py (layer part,
//    3x3 cores, stride 1; thin CIFAR shapes and a few wide ImageNet ones) at each measured thread
//    count, the fused kernel's speed-up over oneDNN's three convolutions; a call takes the fused
//    kernel when, among the measurements at the thread count nearest to at::get_num_threads(), the
//    nearest measured shape (in log2 of N, C, R, H*W) measured it faster.
//  - outside the envelope: the composition. The table says nothing there (it was measured on one
//    2-vCPU VM), and the composition is oneDNN's own choice for this CPU: extrapolating the table
//    picked the fused kernel where it ran 0.7x (issue 24).
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

// within a factor of 2 of a measured value
bool near(int64_t value, double measured) { return value >= measured / 2 && value <= measured * 2; }

// The measured envelope: a 3x3 core at stride 1 and dilation 1 (the only geometry measured), a
// thread count between the smallest and largest measured, and one measured row (at the nearest
// measured thread count) within a factor of 2 of the call in each of N, C, O, R_in, R_out, H and W.
bool in_envelope(const Geometry& g, int64_t threads) {
  if (g.kh != 3 || g.kw != 3 || g.sh != 1 || g.sw != 1 || g.dh != 1 || g.dw != 1 || g.n == 0) return false;
  double lo = 1e300, hi = 0;
  for (const MeasuredTuckerShape& m : kTuckerCpuMeasurements) lo = std::min(lo, m.threads), hi = std::max(hi, m.threads);
  if (threads < lo || threads > hi) return false;
  double nearest = 1e300;
  for (const MeasuredTuckerShape& m : kTuckerCpuMeasurements) nearest = std::min(nearest, std::abs(threads - m.threads));
  for (const MeasuredTuckerShape& m : kTuckerCpuMeasurements) {
    if (std::abs(threads - m.threads) > nearest) continue;
    if (near(g.n, m.n) && near(g.c, m.c) && near(g.o, m.c) && near(g.r_in, m.r) && near(g.r_out, m.r) &&
        near(g.h, m.hw) && near(g.w, m.hw))
      return true;
  }
  return false;
}

// Epilogue bits of the autotune key and of _tucker_conv2d_path's `epilogue` argument (kdfast/ops.py).
enum EpilogueBit : int64_t { kBias = 1, kScale = 2, kShift = 4, kResidual = 8, kRelu = 16 };

int64_t epilogue_bits(const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                      const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual, bool relu) {
  return (has_tensor(bias) ? kBias : 0) | (has_tensor(scale) ? kScale : 0) | (has_tensor(shift) ? kShift : 0) |
         (has_tensor(residual) ? kResidual : 0) | (relu ? kRelu : 0);
}

std::string epilogue_name(int64_t bits) {
  const std::pair<int64_t, const char*> names[] = {
      {kBias, "bias"}, {kScale, "scale"}, {kShift, "shift"}, {kResidual, "residual"}, {kRelu, "relu"}};
  std::string out;
  for (const auto& [bit, name] : names)
    if (bits & bit) out += (out.empty() ? "" : "+") + std::string(name);
  return out.empty() ? "none" : out;
}

const char* memory_format_name(const at::Tensor& x) {
  if (x.is_contiguous()) return "nchw";
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return "channels_last";
  return "strided";
}

// The autotune cache key; its text is also the key in saved cache files (docs/tucker-path.md).
std::string autotune_key(const at::Tensor& x, const Geometry& g, int64_t epilogue, int64_t threads) {
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "device=cpu dtype=%s format=%s threads=%lld N=%lld C=%lld O=%lld R_in=%lld R_out=%lld H=%lld W=%lld "
                "kernel=%lldx%lld stride=%lldx%lld padding=%lldx%lld dilation=%lldx%lld epilogue=%s",
                x.scalar_type() == at::kDouble ? "float64" : "float32", memory_format_name(x), (long long)threads,
                (long long)g.n, (long long)g.c, (long long)g.o, (long long)g.r_in, (long long)g.r_out, (long long)g.h,
                (long long)g.w, (long long)g.kh, (long long)g.kw, (long long)g.sh, (long long)g.sw, (long long)g.ph,
                (long long)g.pw, (long long)g.dh, (long long)g.dw, epilogue_name(epilogue).c_str());
  return buf;
}

// FLOPs of the three products (the size that decides whether a call is worth measuring).
double layer_flops(const Geometry& g) {
  return 2.0 * double(g.n) *
         (double(g.h * g.w) * g.r_in * g.c + double(g.oh * g.ow) * (g.r_out * g.r_in * g.kh * g.kw + g.o * g.r_out));
}

constexpr const char* kPathAutotune = "autotune";  // this call measures both paths

struct Choice {
  const char* path;  // kPathFused, kPathComposed or kPathAutotune
  std::string key;   // set when path == kPathAutotune
};

// Which path a call runs on CPU:
//  1. KDFAST_CPU_KERNELS without tucker_conv2d, float16/bfloat16: the composition;
//  2. KDFAST_TUCKER_CONV_PATH=fused|composed: that path;
//  3. autotuning on (kdfast.backends.tucker.autotune / KDFAST_TUCKER_AUTOTUNE, default on): a call
//     below autotune::kMinFlops takes the fused kernel; a bigger one the cached measurement for its
//     key, or, on the key's first call, a measurement (kPathAutotune);
//  4. otherwise default_path: the rule inside the measured envelope, the composition outside.
Choice cpu_choice(const at::Tensor& x, const Geometry& g, int64_t epilogue) {
  if (!paths::use_kernel(paths::kTuckerConv2d, x)) return {kPathComposed, {}};  // KDFAST_CPU_KERNELS
  const auto dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return {kPathComposed, {}};
  if (const char* forced = forced_path()) return {forced, {}};
  const int64_t threads = at::get_num_threads();
  if (g.n > 0 && autotune::enabled()) {
    // Too small to be worth a lookup: fixed per-call costs dominate there, and the fused kernel makes
    // one pass where the composition makes three library calls (every measured row under kMinFlops
    // ran the fused kernel 2-5x faster).
    if (layer_flops(g) < autotune::kMinFlops) return {kPathFused, {}};
    std::string key = autotune_key(x, g, epilogue, threads);
    if (const char* cached = autotune::lookup(key)) return {cached, {}};
    if (autotune::has_room()) return {kPathAutotune, std::move(key)};
  }
  return {in_envelope(g, threads) && rule_prefers_fused(g, threads) ? kPathFused : kPathComposed, {}};
}

at::Tensor tucker_conv2d_cpu(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                             const at::Tensor& last, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual,
                             bool relu) {
  check_tucker_conv2d_args(x, first, core, last, bias, stride, padding, dilation);
  check_tucker_epilogue_args(x, core, last, scale, shift, residual, stride, padding, dilation);
  const Geometry g = geometry(x, core, last, stride, padding, dilation);
  const Choice choice = cpu_choice(x, g, epilogue_bits(bias, scale, shift, residual, relu));
  log_path("cpu", choice.path, x, core);
  const auto composed = [&] {
    return composed_forward_epilogue(x, first, core, last, bias, stride, padding, dilation, scale, shift, residual,
                                     relu);
  };
  const auto fused = [&] {
    if (g.n == 0) return at::empty({0, g.o, g.oh, g.ow}, x.options());
    if (x.scalar_type() == at::kFloat)
      return fused_forward<float>(x, first, core, last, bias, scale, shift, residual, relu, g);
    return fused_forward<double>(x, first, core, last, bias, scale, shift, residual, relu, g);
  };
  // strcmp: the path names of two translation units need not share one address
  if (std::strcmp(choice.path, kPathAutotune) == 0) return autotune::measure(choice.key, fused, composed);
  return std::strcmp(choice.path, kPathComposed) == 0 ? composed() : fused();
}

// "fused", "composed", or "autotune" (the next call with these arguments measures both paths).
std::string tucker_conv2d_path_cpu(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                                   const at::Tensor& last, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t epilogue) {
  check_tucker_conv2d_args(x, first, core, last, c10::nullopt, stride, padding, dilation);
  TORCH_CHECK_VALUE(epilogue >= 0 && epilogue < 32, "epilogue must be a bit mask in [0, 32), got ", epilogue);
  return cpu_choice(x, geometry(x, core, last, stride, padding, dilation), epilogue).path;
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
