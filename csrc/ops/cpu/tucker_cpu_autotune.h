// Run-time path selection of kdfast::tucker_conv2d on CPU (see docs/tucker-path.md).
//
// On the first inference call for a key (device, dtype, memory format, thread count, N, C, O, R_in,
// R_out, H, W, kernel, stride, padding, dilation, epilogue) the op times the fused kernel and the
// three-convolution composition in turns on that call's own input and keeps the faster in an
// in-process cache; later calls with the key are a lookup. The cache can be exported and filled
// again (kdfast.backends.tucker.save_cache / load_cache write and read it as JSON).
//
// It lives in the op (C++), not in Python, so that it holds wherever the op runs: eager calls,
// torch.compile'd graphs (Inductor calls the op as an extern kernel) and exported programs. Fake /
// Meta tensors never reach this code (the op's fake kernel is kdfast/_registrations.py), so tracing
// times nothing.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>

namespace kdfast {
namespace tucker {
namespace autotune {

// Calls whose work (multiply-adds of the three products, x2) is below this are never measured (they
// take the fused kernel): a lookup (building the key and one hash-map find under a mutex, measured
// within noise of a ~30 us call at 4 MFLOP) would no longer be small against them, and there the
// composition's three library calls cost more in fixed overhead than the fused kernel's one pass.
constexpr double kMinFlops = 4.0e6;
// Cache size bound: beyond it new keys take the default path (dynamic shapes, e.g. a server seeing
// every batch size, would otherwise measure without end).
constexpr size_t kMaxEntries = 4096;

// Whether the switch is on: kdfast.backends.tucker.autotune when Python set it, else the
// environment variable KDFAST_TUCKER_AUTOTUNE (0/false/off or 1/true/on), else on.
bool enabled();

// The cached path for `key` (kPathFused / kPathComposed) or nullptr; a found key counts as a hit.
const char* lookup(const std::string& key);

// Whether a new key may still be measured (the cache is below kMaxEntries).
bool has_room();

// Measures both paths on the call's input (the two callables run the whole op, epilogue included):
// one untimed warm-up each, then rounds in which both run in turns (order swapped every round)
// until at least kMinRounds rounds and kMinMillis of timed work, or kMaxRounds rounds. The path with
// the lower median of per-round time ratios wins (ties: the composition); it is recorded under
// `key` and the output of its last run is returned.
at::Tensor measure(const std::string& key, const std::function<at::Tensor()>& fused,
                   const std::function<at::Tensor()>& composed);

}  // namespace autotune
}  // namespace tucker
}  // namespace kdfast
