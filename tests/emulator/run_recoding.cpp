// Emulator command for csrc/ops/cuda/sparse_recoding_kernels.cuh: builds the pointer table and chunk
// plan as sparse_recoding_kernel.cu does (make_chunk_plan) and runs both launches.
#include "runner.h"  // the emulator first: it defines the CUDA spellings
#include "sparse_recoding_kernels.cuh"

namespace {
using namespace emu_runner;
namespace rc = kdfast::cuda::recoding;

// theta / grad: one buffer each holding every tensor at offsets[t] (elements; odd offsets make the
// pointers misaligned for the 16-byte vector path), numels[t] entries; taus (n,) float32 in place.
const Register sparse_recoding("sparse_recoding", [](const Args& a, const emu::LaunchOptions& opt) {
  const int64_t n = a.count("numels");
  const int64_t* numels = a.ptr<const int64_t>("numels");
  const int64_t* offsets = a.ptr<const int64_t>("offsets");
  std::vector<int64_t> chunk_tensor, chunk_start, first_chunk;
  for (int64_t t = 0; t < n; ++t) {
    first_chunk.push_back(static_cast<int64_t>(chunk_tensor.size()));
    for (int64_t start = 0; start < numels[t]; start += rc::kChunk) {
      chunk_tensor.push_back(t);
      chunk_start.push_back(start);
    }
  }
  first_chunk.push_back(static_cast<int64_t>(chunk_tensor.size()));
  const rc::TableLayout layout{n, static_cast<int64_t>(chunk_tensor.size())};
  std::vector<int64_t> table(layout.size());
  dispatch_floating(a.dtype("theta"), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_type<T>;
    for (int64_t t = 0; t < n; ++t) {
      table[layout.theta(t)] = reinterpret_cast<int64_t>(a.ptr<T>("theta", offsets[t]));
      table[layout.grad(t)] = reinterpret_cast<int64_t>(a.ptr<T>("grad", offsets[t]));
      table[layout.numel(t)] = numels[t];
      table[layout.first_chunk(t)] = first_chunk[t];
    }
    table[layout.first_chunk(n)] = first_chunk[n];
    for (int64_t c = 0; c < layout.chunks; ++c) {
      table[layout.chunk_tensor(c)] = chunk_tensor[c];
      table[layout.chunk_start(c)] = chunk_start[c];
    }
    std::vector<A> partial(std::max<int64_t>(layout.chunks, 1), std::numeric_limits<A>::quiet_NaN());
    if (layout.chunks > 0)
      emu::launch(opt, rc::recode_chunks_kernel<T, A>, dim3(static_cast<unsigned>(layout.chunks)),
                  dim3(kdfast::cuda::kThreads), 0, table.data(), layout, a.ptr<const float>("taus"),
                  static_cast<A>(a.f("boost")), static_cast<A>(a.f("damp")), static_cast<A>(a.f("shrink")),
                  partial.data());
    emu::launch(opt, rc::update_taus_kernel<A>, dim3(static_cast<unsigned>(n)), dim3(kdfast::cuda::kThreads), 0,
                table.data(), layout, partial.data(), a.f("tau_rate"), a.ptr<float>("taus"));
  });
});
}  // namespace
