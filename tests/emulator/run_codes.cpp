// Emulator command for csrc/ops/cuda/sparse_codes_kernels.cuh, launched as sparse_codes_kernel.cu does.
#include "runner.h"  // the emulator first: it defines the CUDA spellings
#include "sparse_codes_kernels.cuh"

namespace {
using namespace emu_runner;
namespace sc = kdfast::sparse_codes;

// x_cols (D, P) and c_rows (K, D) in the accumulate dtype; values (P, k) in the input dtype, indices (P, k).
const Register sparse_codes("sparse_codes", [](const Args& a, const emu::LaunchOptions& opt) {
  const int64_t pixels = a.i("pixels"), d = a.i("d"), kk = a.i("num_codewords");
  const int k = static_cast<int>(a.i("k"));
  if (k > sc::kMaxK) throw emu::Error("sparse_codes: k > kMaxK runs the ATen formulation");
  const unsigned blocks = static_cast<unsigned>((pixels + sc::kThreadsPerBlock - 1) / sc::kThreadsPerBlock);
  dispatch_floating(a.dtype("values"), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_type<T>;
    const size_t smem = sc::topk_smem_bytes<A>(k) - a.i("smem_shortfall");
    const auto kernel = sc::sparse_codes_kernel<T, A>;
    if (smem > 48 * 1024 && cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem)) != cudaSuccess)
      throw emu::Error("cudaFuncSetAttribute refused");
    emu::launch(opt, kernel, dim3(blocks), dim3(sc::kThreadsPerBlock), smem, a.ptr<const A>("x_cols"),
                a.ptr<const A>("c_rows"), static_cast<A>(a.f("b")), pixels, d, kk, k, a.ptr<T>("values"),
                a.ptr<int64_t>("indices"));
  });
});
}  // namespace
