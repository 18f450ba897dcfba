// Emulator commands for csrc/ops/cuda/kd_loss_kernels.cuh, launched as kd_loss_kernel.cu launches them.
#include "runner.h"  // the emulator first: it defines the CUDA spellings
#include "kd_loss_kernels.cuh"

namespace {
using namespace emu_runner;

const Register kd_forward("kd_forward", [](const Args& a, const emu::LaunchOptions& opt) {
  const int64_t batch = a.i("batch"), k = a.i("k");
  const bool need_ce = a.i("need_ce") != 0;
  dispatch_floating(a.dtype("s"), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_type<T>;
    emu::launch(opt, kdfast::cuda::kd_forward_kernel<T, A>, dim3(static_cast<unsigned>(batch)),
                dim3(kdfast::cuda::kd_forward_threads(k)), 0, a.ptr<const T>("s"), a.i("s_stride"),
                a.ptr<const T>("t"), a.i("t_stride"), need_ce ? a.ptr<const int64_t>("y") : nullptr, k,
                static_cast<A>(1.0 / a.f("temperature")), need_ce, a.i("ignore_index"), a.ptr<A>("stats"));
  });
});

// grid: min(ceil(batch * k / kThreads), max_blocks) (kd_loss_kernel.cu uses 65535 * 8; tests pass a
// small cap to exercise the grid-stride loop).
const Register kd_backward("kd_backward", [](const Args& a, const emu::LaunchOptions& opt) {
  const int64_t batch = a.i("batch"), k = a.i("k");
  const int64_t threads = kdfast::cuda::kThreads;
  const int64_t blocks = std::min<int64_t>((batch * k + threads - 1) / threads, a.i("max_blocks"));
  dispatch_floating(a.dtype("s"), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_type<T>;
    emu::launch(opt, kdfast::cuda::kd_backward_kernel<T, A>, dim3(static_cast<unsigned>(blocks)),
                dim3(static_cast<unsigned>(threads)), 0, a.ptr<const T>("s"), a.i("s_stride"), a.ptr<const T>("t"),
                a.i("t_stride"), a.ptr_or_null<const int64_t>("y"), batch, k, static_cast<A>(1.0 / a.f("temperature")),
                a.ptr<const A>("stats"), a.ptr<const A>("coefs"), a.ptr_or_null<T>("grad_s"), a.ptr_or_null<T>("grad_t"));
  });
});
// block_max's contract, every thread gets the block's maximum, on `rounds` back-to-back calls.
template <typename T>
__global__ void block_max_test_kernel(const T* in, int rounds, T* out) {
  __shared__ T shared[kdfast::cuda::kThreads / kdfast::cuda::kWarp];
  for (int r = 0; r < rounds; ++r) {
    const int64_t i = (static_cast<int64_t>(blockIdx.x) * rounds + r) * blockDim.x + threadIdx.x;
    out[i] = kdfast::cuda::block_max(in[i], shared);
  }
}

const Register block_max("block_max", [](const Args& a, const emu::LaunchOptions& opt) {
  dispatch_floating(a.dtype("in"), [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
      emu::launch(opt, block_max_test_kernel<T>, dim3(static_cast<unsigned>(a.i("blocks"))),
                  dim3(static_cast<unsigned>(a.i("threads"))), 0, a.ptr<const T>("in"), static_cast<int>(a.i("rounds")),
                  a.ptr<T>("out"));
    } else {
      throw emu::Error("block_max: float32 / float64 only");
    }
  });
});
}  // namespace
