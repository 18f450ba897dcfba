// kdfast::_build_info(): the torch and CUDA versions this binary was compiled against, so the
// Python side can refuse a stale build with a clear message, and whether at::parallel_for runs in
// parallel in it (ATen defines INTRA_OP_PARALLEL when compiled with OpenMP; without it every CPU
// kernel runs on one thread). The version macros come from setup.py / CMake.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#ifndef KDFAST_TORCH_VERSION_MAJOR
#error "KDFAST_TORCH_VERSION_MAJOR/MINOR/PATCH must be defined by the build (setup.py or CMakeLists.txt)"
#endif
#ifndef KDFAST_CUDA_VERSION
#define KDFAST_CUDA_VERSION -1
#endif

namespace {
std::vector<int64_t> build_info() {
#ifdef INTRA_OP_PARALLEL
  const int64_t intra_op_parallel = 1;
#else
  const int64_t intra_op_parallel = 0;
#endif
  return {KDFAST_TORCH_VERSION_MAJOR, KDFAST_TORCH_VERSION_MINOR, KDFAST_TORCH_VERSION_PATCH, KDFAST_CUDA_VERSION,
          intra_op_parallel};
}
}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CatchAll, m) {
  m.impl("_build_info", &build_info);
}
