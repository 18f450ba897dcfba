// Emulator commands for the kernels of csrc/ops/cuda/kernels.cuh (the CudaPrimitives behind FSP and NST).
#include "runner.h"  // the emulator first: it defines the CUDA spellings
#include "kernels.cuh"

namespace {
using namespace emu_runner;
using kdfast::cuda::kThreads;

// partial (rows * chunks) = per-chunk sums of squares of x (rows, n); grid.y = grid_y (< rows loops).
const Register sum_of_squares("sum_of_squares", [](const Args& a, const emu::LaunchOptions& opt) {
  const int64_t rows = a.i("rows"), n = a.i("n"), chunk = a.i("chunk_len");
  const unsigned chunks = static_cast<unsigned>((n + chunk - 1) / chunk);
  dispatch_floating(a.dtype("x"), [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
      emu::launch(opt, kdfast::cuda::sum_of_squares_kernel<T>, dim3(chunks, static_cast<unsigned>(a.i("grid_y"))),
                  dim3(kThreads), 0, a.ptr<const T>("x"), rows, n, chunk, a.ptr<T>("partial"));
    } else {
      throw emu::Error("sum_of_squares: float32 / float64 only (as primitives.cu dispatches)");
    }
  });
});

// One block per row of dots (nb * rows, cols), in place, and row_sums.
const Register gaussian_rows("gaussian_rows", [](const Args& a, const emu::LaunchOptions& opt) {
  const int64_t nb = a.i("nb"), rows = a.i("rows"), cols = a.i("cols");
  dispatch_floating(a.dtype("dots"), [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
      emu::launch(opt, kdfast::cuda::gaussian_rows_kernel<T>, dim3(static_cast<unsigned>(nb * rows)), dim3(kThreads),
                  0, a.ptr<T>("dots"), a.ptr<const T>("sqnorm_rows"), a.ptr<const T>("sqnorm_cols"),
                  a.ptr<const T>("col_weights"), rows, cols, static_cast<T>(a.f("inv_two_sigma_sq")),
                  a.i("diag_col0"), a.i("keep_diagonal") != 0, a.ptr<T>("row_sums"));
    } else {
      throw emu::Error("gaussian_rows: float32 / float64 only");
    }
  });
});

// One block per (n, c) row; g in the accumulate dtype, f and out in f's dtype.
const Register normalize_rows_backward("normalize_rows_backward", [](const Args& a, const emu::LaunchOptions& opt) {
  const int64_t batch = a.i("batch"), channels = a.i("channels"), hw = a.i("hw");
  const kdfast::cuda::RowStrides gs{a.i("g_batch"), a.i("g_channel"), a.i("g_position")};
  const kdfast::cuda::RowStrides fs{a.i("f_batch"), a.i("f_channel"), a.i("f_position")};
  dispatch_floating(a.dtype("f"), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_type<T>;
    emu::launch(opt, kdfast::cuda::normalize_rows_backward_kernel<T, A>, dim3(static_cast<unsigned>(batch * channels)),
                dim3(kThreads), 0, a.ptr<const A>("g"), gs, a.ptr_or_null<const A>("row_scale"), a.ptr<const T>("f"),
                fs, a.ptr<const A>("norms"), a.ptr<const A>("scale"), channels, hw, static_cast<A>(a.f("eps")),
                a.ptr<T>("out"));
  });
});
// block_sum's contract, every thread gets the block's sum, on `rounds` back-to-back calls per block
// (the callers above read the result in thread 0 only, or call it once).
template <typename T>
__global__ void block_sum_test_kernel(const T* in, int rounds, T* out) {
  __shared__ T shared[kThreads / kdfast::cuda::kWarp];
  for (int r = 0; r < rounds; ++r) {
    const int64_t i = (static_cast<int64_t>(blockIdx.x) * rounds + r) * blockDim.x + threadIdx.x;
    out[i] = kdfast::cuda::block_sum(in[i], shared);
  }
}

const Register block_sum("block_sum", [](const Args& a, const emu::LaunchOptions& opt) {
  dispatch_floating(a.dtype("in"), [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
      emu::launch(opt, block_sum_test_kernel<T>, dim3(static_cast<unsigned>(a.i("blocks"))),
                  dim3(static_cast<unsigned>(a.i("threads"))), 0, a.ptr<const T>("in"), static_cast<int>(a.i("rounds")),
                  a.ptr<T>("out"));
    } else {
      throw emu::Error("block_sum: float32 / float64 only");
    }
  });
});
}  // namespace
