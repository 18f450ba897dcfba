// The emulator's own checks, on small kernels written for them (tests/ops/test_cuda_emulator.py):
// each `bug_*` command must be reported, `builtins` must compute what CUDA defines.
#include "runner.h"

namespace {
using namespace emu_runner;

// A barrier that only half of the block reaches.
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();
}
// Two different barriers, one per half of the block.
__global__ void two_barriers_kernel() {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}
// Lane 3 leaves before a full-mask shuffle.
__global__ void exit_before_shuffle_kernel(float* out) {
  if (threadIdx.x % 32 == 3) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}
// Lane 0 shuffles with lane 1, which waits at a barrier instead: a hang on a GPU.
__global__ void shuffle_vs_barrier_kernel(float* out) {
  if (threadIdx.x == 0) out[0] = __shfl_sync(0x3u, 1.0f, 1);
  __syncthreads();
}
// A loop with a barrier whose trip count differs by thread.
__global__ void uneven_loop_kernel() {
  for (unsigned i = 0; i <= threadIdx.x % 2; ++i) __syncthreads();
}
// Reads a neighbour's shared slot with no barrier after the writes: a race.
__global__ void missing_barrier_kernel(float* out) {
  __shared__ float slots[64];
  slots[threadIdx.x] = static_cast<float>(threadIdx.x + 1);
  out[threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}
// Reads dynamic shared memory it never wrote.
__global__ void uninitialised_dynamic_kernel(float* out) {
  KDFAST_DYNAMIC_SHARED(float, buffer);
  out[threadIdx.x] = buffer[threadIdx.x];
}

// Every warp built-in and atomic the emulator provides, one result per thread and test.
__global__ void builtins_kernel(float* out, float* total, int* count, float* half_round) {
  const int lane = threadIdx.x % 32, tid = threadIdx.x, n = blockDim.x;
  float v = static_cast<float>(tid);
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);        // warp sum, every lane
  out[0 * n + tid] = v;
  out[1 * n + tid] = __shfl_up_sync(0xffffffffu, static_cast<float>(tid), 1);        // tid - 1, lane 0 keeps tid
  out[2 * n + tid] = __shfl_sync(0xffffffffu, static_cast<float>(tid), 5);           // lane 5 of the warp
  out[3 * n + tid] = __shfl_down_sync(0xffffffffu, static_cast<float>(tid), 2, 8);   // width 8 segments
  out[4 * n + tid] = static_cast<float>(__ballot_sync(0xffffffffu, lane % 3 == 0) == 0x49249249u);
  out[5 * n + tid] = static_cast<float>(__all_sync(0xffffffffu, lane < 32) + 2 * __any_sync(0xffffffffu, lane == 7));
  __syncwarp();
  atomicAdd(total, 0.5f);
  atomicAdd(count, 1);
  __syncthreads();
  out[6 * n + tid] = *total;
  half_round[2 * tid] = static_cast<float>(emu::half(1.0f + static_cast<float>(tid) / 4096.0f));
  half_round[2 * tid + 1] = static_cast<float>(emu::bfloat16(1.0f + static_cast<float>(tid) / 512.0f));
}

const Register bugs("selftest", [](const Args& a, const emu::LaunchOptions& opt) {
  const int64_t which = a.i("case");
  const dim3 block(static_cast<unsigned>(a.i("threads")));
  float* out = a.ptr<float>("out");
  switch (which) {
    case 0: emu::launch(opt, divergent_barrier_kernel, dim3(1), block, 0); break;
    case 1: emu::launch(opt, two_barriers_kernel, dim3(1), block, 0); break;
    case 2: emu::launch(opt, exit_before_shuffle_kernel, dim3(1), block, 0, out); break;
    case 3: emu::launch(opt, shuffle_vs_barrier_kernel, dim3(1), block, 0, out); break;
    case 4: emu::launch(opt, uneven_loop_kernel, dim3(1), block, 0); break;
    case 5: emu::launch(opt, missing_barrier_kernel, dim3(1), block, 0, out); break;
    case 6: emu::launch(opt, uninitialised_dynamic_kernel, dim3(1), block, block.x * sizeof(float), out); break;
    case 7: emu::launch(opt, uninitialised_dynamic_kernel, dim3(1), block, 49 * 1024, out); break;  // no opt-in
    case 8: {
      float* total = a.ptr<float>("total");
      int* count = a.ptr<int>("count");
      *total = 0.f, *count = 0;
      emu::launch(opt, builtins_kernel, dim3(1), block, 0, out, total, count, a.ptr<float>("half_round"));
      break;
    }
    default: throw emu::Error("unknown selftest case");
  }
});
}  // namespace
