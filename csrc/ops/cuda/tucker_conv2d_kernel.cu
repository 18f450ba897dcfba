// kdfast::tucker_conv2d on CUDA. COMPILE-CHECKED ONLY: no GPU was available when this was written.
// By default CUDA runs the composition (three cuDNN convolutions); the fused kernel below runs only
// where csrc/ops/kernel_paths.h enables it (KDFAST_CUDA_KERNELS, or a verified table entry).
//
// Fused path: one kernel for the whole Tucker-2 block. Each thread block owns a TILE_H x TILE_W tile
// of output pixels of one sample and all O output channels:
//   1. stage 1: projects the input tile plus its halo (kdfast/tucker_geometry.h) to R_in channels
//      into shared memory, streaming x through shared memory in chunks of kChannelChunk channels;
//      positions outside the image are the core's zero padding;
//   2. stage 2: applies the R_out x R_in x kh x kw core from shared memory to get the R_out x tile
//      intermediate, also in shared memory;
//   3. stage 3: projects to O channels (+ bias) and writes y. Only x is read and y written in global
//      memory: neither intermediate ever leaves the SM.
// float32, float16 and bfloat16 inputs, float32 accumulation and float32 intermediates (so half
// types are rounded once, at the output). Plain FMA loops: no tensor cores (TDC, PPoPP'23, shows a
// scalar-FMA core kernel of this shape; CUTLASS b2b fusion would be the tensor-core route).
// Kernel sizes 1/3/5/7 (each side), stride 1 or 2, any padding / dilation, and only when the tile's
// shared memory fits the device; everything else runs the three-convolution composition (cuDNN).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>

#include "../kernel_paths.h"
#include "../tucker_conv2d_common.h"

namespace kdfast {
namespace tucker {
namespace {

constexpr int kThreads = 256;
constexpr int kChannelChunk = 16;  // input channels staged in shared memory per step of stage 1

struct FusedParams {
  int n, c, h, w, r_in, r_out, o, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
  int tile_h, tile_w, halo_h, halo_w;
};

// Shared memory of one block, in floats: z1 (R_in x halo), z2 (R_out x tile), x chunk, first chunk.
size_t smem_floats(const FusedParams& p) {
  const size_t halo = static_cast<size_t>(p.halo_h) * p.halo_w, tile = static_cast<size_t>(p.tile_h) * p.tile_w;
  return p.r_in * halo + p.r_out * tile + kChannelChunk * halo + static_cast<size_t>(p.r_in) * kChannelChunk;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) tucker_conv2d_fused_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ first, const scalar_t* __restrict__ core,
    const scalar_t* __restrict__ last, const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
    const FusedParams p) {
  extern __shared__ float smem[];
  const int halo = p.halo_h * p.halo_w, tile = p.tile_h * p.tile_w;
  float* z1s = smem;                     // [R_in][halo]
  float* z2s = z1s + p.r_in * halo;      // [R_out][tile]
  float* xs = z2s + p.r_out * tile;      // [kChannelChunk][halo]
  float* fs = xs + kChannelChunk * halo;  // [R_in][kChannelChunk]

  const int tiles_w = ceil_div(p.ow, p.tile_w), tiles_h = ceil_div(p.oh, p.tile_h);
  int block = blockIdx.x;
  const int tile_col = block % tiles_w;
  block /= tiles_w;
  const int tile_row = block % tiles_h;
  const int n = block / tiles_h;
  const int oh0 = tile_row * p.tile_h, ow0 = tile_col * p.tile_w;
  const int ih0 = halo_begin(oh0, p.sh, p.ph), iw0 = halo_begin(ow0, p.sw, p.pw);
  const int tid = threadIdx.x;

  // Stage 1: z1[r][q] = sum_c first[r][c] x[n][c][halo position q] (0 outside the image).
  for (int i = tid; i < p.r_in * halo; i += kThreads) z1s[i] = 0.f;
  for (int c0 = 0; c0 < p.c; c0 += kChannelChunk) {
    const int cc = min(kChannelChunk, p.c - c0);
    __syncthreads();  // the previous chunk has been consumed
    for (int i = tid; i < cc * halo; i += kThreads) {
      const int c = i / halo, q = i % halo;
      const int ih = ih0 + q / p.halo_w, iw = iw0 + q % p.halo_w;
      xs[i] = (in_range(ih, p.h) && in_range(iw, p.w))
                  ? static_cast<float>(x[((static_cast<int64_t>(n) * p.c + c0 + c) * p.h + ih) * p.w + iw])
                  : 0.f;
    }
    for (int i = tid; i < p.r_in * cc; i += kThreads) {
      const int r = i / cc, c = i % cc;
      fs[r * kChannelChunk + c] = static_cast<float>(first[static_cast<int64_t>(r) * p.c + c0 + c]);
    }
    __syncthreads();
    for (int i = tid; i < p.r_in * halo; i += kThreads) {
      const int r = i / halo, q = i % halo;
      float acc = z1s[i];
      for (int c = 0; c < cc; ++c) acc = fmaf(fs[r * kChannelChunk + c], xs[c * halo + q], acc);
      z1s[i] = acc;
    }
  }
  __syncthreads();

  // Stage 2: z2[ro][t] = sum_{r, i, j} core[ro][r][i][j] z1[r][row(t, i)][col(t, j)].
  const int taps = p.kh * p.kw;
  for (int idx = tid; idx < p.r_out * tile; idx += kThreads) {
    const int ro = idx / tile, t = idx % tile;
    const int th = t / p.tile_w, tw = t % p.tile_w;
    const scalar_t* w = core + static_cast<int64_t>(ro) * p.r_in * taps;
    float acc = 0.f;
    for (int r = 0; r < p.r_in; ++r) {
      for (int i = 0; i < p.kh; ++i) {
        // Halo-local row/column of output (th, tw) through taps (i, 0): the tile-relative input_index.
        const float* z_row = z1s + r * halo + input_index(th, i, p.sh, 0, p.dh) * p.halo_w + tw * p.sw;
        const scalar_t* w_row = w + (r * p.kh + i) * p.kw;
        for (int j = 0; j < p.kw; ++j) acc = fmaf(static_cast<float>(w_row[j]), z_row[j * p.dw], acc);
      }
    }
    z2s[idx] = acc;
  }
  __syncthreads();

  // Stage 3: y[n][o][oh][ow] = bias[o] + sum_ro last[o][ro] z2[ro][t], for the tile's in-image pixels.
  for (int idx = tid; idx < p.o * tile; idx += kThreads) {
    const int o = idx / tile, t = idx % tile;
    const int oh = oh0 + t / p.tile_w, ow = ow0 + t % p.tile_w;
    if (oh >= p.oh || ow >= p.ow) continue;
    float acc = bias != nullptr ? static_cast<float>(bias[o]) : 0.f;
    const scalar_t* l = last + static_cast<int64_t>(o) * p.r_out;
    for (int ro = 0; ro < p.r_out; ++ro) acc = fmaf(static_cast<float>(l[ro]), z2s[ro * tile + t], acc);
    y[((static_cast<int64_t>(n) * p.o + o) * p.oh + oh) * p.ow + ow] = static_cast<scalar_t>(acc);
  }
}

bool supported_kernel_size(int64_t k) { return k == 1 || k == 3 || k == 5 || k == 7; }

// Geometry of the fused launch with the largest tile whose shared memory fits the device; false
// when even the smallest tile does not fit (ranks too large).
bool plan_fused(const at::Tensor& x, const at::Tensor& core, const at::Tensor& last, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, FusedParams& p, size_t& smem_bytes) {
  p.n = x.size(0), p.c = x.size(1), p.h = x.size(2), p.w = x.size(3);
  p.r_out = core.size(0), p.r_in = core.size(1), p.kh = core.size(2), p.kw = core.size(3), p.o = last.size(0);
  p.sh = stride[0], p.sw = stride[1], p.ph = padding[0], p.pw = padding[1], p.dh = dilation[0], p.dw = dilation[1];
  p.oh = conv_output_size(p.h, p.kh, p.sh, p.ph, p.dh);
  p.ow = conv_output_size(p.w, p.kw, p.sw, p.pw, p.dw);
  int device_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&device_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.get_device()));
  const int tiles[][2] = {{8, 8}, {4, 8}, {4, 4}, {2, 4}};
  for (const auto& t : tiles) {
    p.tile_h = t[0], p.tile_w = t[1];
    p.halo_h = halo_extent(p.tile_h, p.kh, p.sh, p.dh);
    p.halo_w = halo_extent(p.tile_w, p.kw, p.sw, p.dw);
    smem_bytes = smem_floats(p) * sizeof(float);
    if (smem_bytes <= static_cast<size_t>(device_limit)) return true;
  }
  return false;
}

// The fused kernel runs only where kernel_paths.h enables it (not verified on a GPU: off by default),
// and then only for what it supports; KDFAST_TUCKER_CONV_PATH=composed can still force the composition.
const char* cuda_path(const at::Tensor& x, const at::Tensor& core, const at::Tensor& last, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, FusedParams& p, size_t& smem_bytes) {
  if (!paths::use_kernel(paths::kTuckerConv2d, x)) return kPathComposed;
  const auto dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) return kPathComposed;
  if (!supported_kernel_size(core.size(2)) || !supported_kernel_size(core.size(3))) return kPathComposed;
  if (stride[0] > 2 || stride[1] > 2) return kPathComposed;
  // 32-bit index math inside the kernel (global offsets are 64-bit).
  if (x.numel() > INT32_MAX / 2) return kPathComposed;
  if (!plan_fused(x, core, last, stride, padding, dilation, p, smem_bytes)) return kPathComposed;
  const char* forced = forced_path();
  return forced != nullptr ? forced : kPathFused;
}

template <typename scalar_t>
void launch_fused(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core, const at::Tensor& last,
                  const at::Tensor& bias, at::Tensor& y, const FusedParams& p, size_t smem_bytes) {
  const auto kernel = tucker_conv2d_fused_kernel<scalar_t>;
  // Above 48 KiB a kernel must opt in to the larger dynamic shared memory.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem_bytes)));
  const int64_t blocks = static_cast<int64_t>(p.n) * ceil_div(p.oh, p.tile_h) * ceil_div(p.ow, p.tile_w);
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem_bytes, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<scalar_t>(), first.data_ptr<scalar_t>(), core.data_ptr<scalar_t>(), last.data_ptr<scalar_t>(),
      bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor tucker_conv2d_cuda_conv(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                                   const at::Tensor& last, const c10::optional<at::Tensor>& bias,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_tucker_conv2d_args(x, first, core, last, bias, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  FusedParams p{};
  size_t smem_bytes = 0;
  const char* path = cuda_path(x, core, last, stride, padding, dilation, p, smem_bytes);
  log_path("cuda", path, x, core);
  if (std::strcmp(path, kPathComposed) == 0) return composed_forward(x, first, core, last, bias, stride, padding, dilation);

  at::Tensor y = at::empty({p.n, p.o, p.oh, p.ow}, x.options());
  const at::Tensor x_c = x.contiguous(), first_c = first.contiguous(), core_c = core.contiguous(),
                   last_c = last.contiguous();
  const at::Tensor bias_c = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_fused<float>(x_c, first_c, core_c, last_c, bias_c, y, p, smem_bytes);
      break;
    case at::kHalf:
      launch_fused<at::Half>(x_c, first_c, core_c, last_c, bias_c, y, p, smem_bytes);
      break;
    default:
      launch_fused<at::BFloat16>(x_c, first_c, core_c, last_c, bias_c, y, p, smem_bytes);
      break;
  }
  return y;
}

// The epilogue (scale, shift, residual, relu) runs as ATen ops after the convolution on CUDA; fusing it
// into the kernel waits for a GPU to verify it.
at::Tensor tucker_conv2d_cuda(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                              const at::Tensor& last, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, const c10::optional<at::Tensor>& scale,
                              const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual,
                              bool relu) {
  check_tucker_conv2d_args(x, first, core, last, bias, stride, padding, dilation);
  check_tucker_epilogue_args(x, core, last, scale, shift, residual, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  return apply_epilogue(tucker_conv2d_cuda_conv(x, first, core, last, bias, stride, padding, dilation), scale, shift,
                        residual, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tucker_conv2d_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
    const at::Tensor& last, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 5> mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return backward(grad_y, x, first, core, last, stride, padding, dilation, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tucker_conv2d_with_intermediates_cuda(
    const at::Tensor& x, const at::Tensor& first, const at::Tensor& core, const at::Tensor& last,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const c10::cuda::CUDAGuard guard(x.device());
  return composed_forward_with_intermediates(x, first, core, last, bias, stride, padding, dilation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tucker_conv2d_backward_saved_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
    const at::Tensor& last, const at::Tensor& z1, const at::Tensor& z2, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 5> mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return backward_saved(grad_y, x, first, core, last, z1, z2, stride, padding, dilation, mask);
}

std::string tucker_conv2d_path_cuda(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                                    const at::Tensor& last, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t /*epilogue: CUDA does not autotune*/) {
  check_tucker_conv2d_args(x, first, core, last, c10::nullopt, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  FusedParams p{};
  size_t smem_bytes = 0;
  return cuda_path(x, core, last, stride, padding, dilation, p, smem_bytes);
}

}  // namespace
}  // namespace tucker
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("tucker_conv2d", &kdfast::tucker::tucker_conv2d_cuda);
  m.impl("_tucker_conv2d_backward", &kdfast::tucker::tucker_conv2d_backward_cuda);
  m.impl("_tucker_conv2d_with_intermediates", &kdfast::tucker::tucker_conv2d_with_intermediates_cuda);
  m.impl("_tucker_conv2d_backward_saved", &kdfast::tucker::tucker_conv2d_backward_saved_cuda);
  m.impl("_tucker_conv2d_path", &kdfast::tucker::tucker_conv2d_path_cuda);
}
