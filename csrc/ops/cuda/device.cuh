// The two device-code spellings that differ between nvcc and tests/emulator (the CPU emulator that
// runs these kernels' source on host threads, which defines both macros before including a kernel
// header). Everything else in the kernel headers is plain CUDA C++.
#pragma once

#include <cassert>

// The block's dynamic shared memory (the launch's third <<<>>> argument), as `type name[]`.
#ifndef KDFAST_DYNAMIC_SHARED
#define KDFAST_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// A device-side assert: c10's CUDA_KERNEL_ASSERT where the .cu included c10 first, assert otherwise.
#ifndef KDFAST_DEVICE_ASSERT
#ifdef CUDA_KERNEL_ASSERT
#define KDFAST_DEVICE_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#else
#define KDFAST_DEVICE_ASSERT(cond) assert(cond)
#endif
#endif
