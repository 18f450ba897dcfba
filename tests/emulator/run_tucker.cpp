// Emulator command for csrc/ops/cuda/tucker_conv2d_kernels.cuh: plans the tile with plan_tile against
// `smem_limit` (the device's opt-in maximum) and launches as tucker_conv2d_kernel.cu's launch_fused.
#include "runner.h"  // the emulator first: it defines the CUDA spellings
#include "tucker_conv2d_kernels.cuh"

namespace {
using namespace emu_runner;
namespace tk = kdfast::tucker;

const Register tucker("tucker", [](const Args& a, const emu::LaunchOptions& opt) {
  tk::FusedParams p{};
  p.n = a.i("n"), p.c = a.i("c"), p.h = a.i("h"), p.w = a.i("w");
  p.r_in = a.i("r_in"), p.r_out = a.i("r_out"), p.o = a.i("o"), p.kh = a.i("kh"), p.kw = a.i("kw");
  p.sh = a.i("sh"), p.sw = a.i("sw"), p.ph = a.i("ph"), p.pw = a.i("pw"), p.dh = a.i("dh"), p.dw = a.i("dw");
  p.oh = tk::conv_output_size(p.h, p.kh, p.sh, p.ph, p.dh);
  p.ow = tk::conv_output_size(p.w, p.kw, p.sw, p.pw, p.dw);
  const size_t smem = tk::plan_tile(p, static_cast<size_t>(a.i("smem_limit")));
  if (smem == 0) throw emu::Error("tucker: no tile fits smem_limit (the launch runs the composition)");
  int64_t* info = a.ptr<int64_t>("info");
  info[0] = p.tile_h, info[1] = p.tile_w, info[2] = static_cast<int64_t>(smem);
  dispatch_floating(a.dtype("x"), [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same<T, double>::value) {
      throw emu::Error("tucker: the fused kernel takes float32 / float16 / bfloat16");
    } else {
      const auto kernel = tk::tucker_conv2d_fused_kernel<T>;
      if (a.i("optin") != 0 && cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    static_cast<int>(smem)) != cudaSuccess)
        throw emu::Error("cudaFuncSetAttribute refused");
      const int64_t blocks = static_cast<int64_t>(p.n) * tk::ceil_div(p.oh, p.tile_h) * tk::ceil_div(p.ow, p.tile_w);
      emu::launch(opt, kernel, dim3(static_cast<unsigned>(blocks)), dim3(tk::kThreads),
                  smem - static_cast<size_t>(a.i("smem_shortfall")), a.ptr<const T>("x"), a.ptr<const T>("first"),
                  a.ptr<const T>("core"), a.ptr<const T>("last"), a.ptr_or_null<const T>("bias"), a.ptr<T>("y"), p);
    }
  });
});
}  // namespace
