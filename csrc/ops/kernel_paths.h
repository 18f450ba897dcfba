// Which implementation an op runs: its backend's hand-written kernel, or the ATen path (the same
// driver over AtenPrimitives / ATen calls only; csrc/ops/aten/).
//
// CUDA: the ATen path by default. A hand-written CUDA kernel runs by default only where the table in
// kernel_paths.cpp marks it verified (for its dtypes and shape range), which is changed only
// together with committed GPU results (benchmarks/results/<device>/) showing the kernel passes the
// CUDA tests and is faster than the ATen path. KDFAST_CUDA_KERNELS=all|none|<op,op,...> overrides
// the table (tests and `make gpu-check` use it).
// CPU: the CPU kernels by default (the test-suite proves them); KDFAST_CPU_KERNELS=all|none|<op,...>
// selects the ATen path instead, so the CPU tests run the code a GPU user gets by default.
// Both variables are read at every call; an unknown op name in them is an error.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace kdfast {
namespace paths {

// Names of the ops in the table (the public op names of kdfast/info.py's OPS).
constexpr const char* kFspMatrix = "fsp_matrix";
constexpr const char* kFspLoss = "fsp_loss";
constexpr const char* kNstLoss = "nst_loss";
constexpr const char* kTuckerConv2d = "tucker_conv2d";
constexpr const char* kKdLoss = "kd_loss";
constexpr const char* kSparseRecoding = "sparse_recoding_";
constexpr const char* kSparseCodes = "sparse_codes";

// True when `op` on `primary`'s device runs its hand-written kernel there (CUDA: table or
// KDFAST_CUDA_KERNELS; CPU: KDFAST_CPU_KERNELS, default on); false for the ATen path.
bool use_kernel(const char* op, const at::Tensor& primary);

// The table and the current environment as JSON (kdfast::_kernel_paths, read by kdfast/info.py).
std::string table_json();

}  // namespace paths
}  // namespace kdfast
