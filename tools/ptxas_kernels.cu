// Every kernel of csrc/ops/cuda/*.cuh with the template arguments the .cu files launch it with, so that
// tools/ptxas_resources.py can read ptxas's resource report per kernel without compiling the ATen host
// code. Half types are c10's, as in the extension build (header-only here).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kd_loss_kernels.cuh"
#include "kernels.cuh"
#include "sparse_codes_kernels.cuh"
#include "sparse_recoding_kernels.cuh"
#include "tucker_conv2d_kernels.cuh"

namespace cuda = kdfast::cuda;
namespace tucker = kdfast::tucker;
namespace sc = kdfast::sparse_codes;
using Half = c10::Half;
using BFloat16 = c10::BFloat16;

// Taking each instantiation's address makes nvcc compile it.
const void* const kdfast_kernels[] = {
    // primitives.cu: AT_DISPATCH_FLOATING_TYPES / ..._AND2(Half, BFloat16)
    reinterpret_cast<const void*>(&cuda::sum_of_squares_kernel<float>),
    reinterpret_cast<const void*>(&cuda::sum_of_squares_kernel<double>),
    reinterpret_cast<const void*>(&cuda::gaussian_rows_kernel<float>),
    reinterpret_cast<const void*>(&cuda::gaussian_rows_kernel<double>),
    reinterpret_cast<const void*>(&cuda::normalize_rows_backward_kernel<double, double>),
    reinterpret_cast<const void*>(&cuda::normalize_rows_backward_kernel<float, float>),
    reinterpret_cast<const void*>(&cuda::normalize_rows_backward_kernel<Half, float>),
    reinterpret_cast<const void*>(&cuda::normalize_rows_backward_kernel<BFloat16, float>),
    // kd_loss_kernel.cu
    reinterpret_cast<const void*>(&cuda::kd_forward_kernel<double, double>),
    reinterpret_cast<const void*>(&cuda::kd_forward_kernel<float, float>),
    reinterpret_cast<const void*>(&cuda::kd_forward_kernel<Half, float>),
    reinterpret_cast<const void*>(&cuda::kd_forward_kernel<BFloat16, float>),
    reinterpret_cast<const void*>(&cuda::kd_backward_kernel<double, double>),
    reinterpret_cast<const void*>(&cuda::kd_backward_kernel<float, float>),
    reinterpret_cast<const void*>(&cuda::kd_backward_kernel<Half, float>),
    reinterpret_cast<const void*>(&cuda::kd_backward_kernel<BFloat16, float>),
    // sparse_recoding_kernel.cu (acc_t = at::opmath_type)
    reinterpret_cast<const void*>(&cuda::recoding::recode_chunks_kernel<double, double>),
    reinterpret_cast<const void*>(&cuda::recoding::recode_chunks_kernel<float, float>),
    reinterpret_cast<const void*>(&cuda::recoding::recode_chunks_kernel<Half, float>),
    reinterpret_cast<const void*>(&cuda::recoding::recode_chunks_kernel<BFloat16, float>),
    reinterpret_cast<const void*>(&cuda::recoding::update_taus_kernel<double>),
    reinterpret_cast<const void*>(&cuda::recoding::update_taus_kernel<float>),
    // sparse_codes_kernel.cu
    reinterpret_cast<const void*>(&sc::sparse_codes_kernel<double, double>),
    reinterpret_cast<const void*>(&sc::sparse_codes_kernel<float, float>),
    reinterpret_cast<const void*>(&sc::sparse_codes_kernel<Half, float>),
    reinterpret_cast<const void*>(&sc::sparse_codes_kernel<BFloat16, float>),
    // tucker_conv2d_kernel.cu
    reinterpret_cast<const void*>(&tucker::tucker_conv2d_fused_kernel<float>),
    reinterpret_cast<const void*>(&tucker::tucker_conv2d_fused_kernel<Half>),
    reinterpret_cast<const void*>(&tucker::tucker_conv2d_fused_kernel<BFloat16>),
};
