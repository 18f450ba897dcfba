// kdfast::tucker_conv2d on CUDA. COMPILE-CHECKED ONLY: no GPU was available when this was written.
// By default CUDA runs the composition (three cuDNN convolutions); the fused kernel below runs only
// where csrc/ops/kernel_paths.h enables it (KDFAST_CUDA_KERNELS, or a verified table entry).
//
// Fused path: one kernel for the whole Tucker-2 block (tucker_conv2d_kernels.cuh, ATen-free, so
// tests/emulator runs it on the CPU); this file plans and launches it.
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
#include "tucker_conv2d_kernels.cuh"

namespace kdfast {
namespace tucker {
namespace {

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
  smem_bytes = plan_tile(p, static_cast<size_t>(device_limit));
  return smem_bytes != 0;
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
