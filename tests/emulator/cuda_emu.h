// An exact-barrier CUDA emulator for kdfast's kernel headers (csrc/ops/cuda/*.cuh): the kernels'
// own source, compiled by g++, with every CUDA thread a host thread. Test infrastructure only (not in
// the wheel); docs/cuda.md says what it proves and what it cannot.
//
//  - Blocks run one after another; the threads of a block run as std::threads.
//  - __syncthreads is a checked barrier: every thread of the block must reach the same call site
//    (file:line) the same number of times. A barrier in divergent code, a thread that exits while
//    others wait at a barrier, and a deadlock (every live thread waiting) are reported as errors.
//  - Warp operations (__shfl_*_sync, __ballot_sync, __all_sync, __any_sync, __syncwarp) wait for every
//    lane named in the mask, check that they all arrived at the same call with the same mask, and
//    report a lane that is not in its own mask, a mask naming an exited or absent lane, a read of a
//    lane outside the mask, or a lane that reaches __syncthreads while its warp waits for it.
//  - Dynamic shared memory is a fresh heap buffer of exactly the launched size, filled with NaN;
//    over 48 KiB it needs cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
//    n) first, and never more than the emulated device's opt-in maximum (sm_90: 227 KiB).
//  - Static __shared__ arrays are function statics (one block at a time, so one copy is the block's).
//    Plain builds place them in one linker section that is refilled with NaN before every block;
//    sanitizer builds keep them as ordinary statics so that AddressSanitizer puts redzones around them.
//  - Schedules: Free (all threads run at once: ThreadSanitizer sees every unsynchronised access) and
//    one thread at a time, switching only at barriers, warp operations and exits, picking the next
//    thread in Forward (lowest index first), Reverse (highest first) or Random (seeded) order. The
//    serial orders turn a missing barrier into a wrong value deterministically.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

// ------------------------------------------------------------------------------- CUDA spellings
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define KDFAST_EMU_STATIC_SHARED_IN_SECTION 0
#define __shared__ static
#else
#define KDFAST_EMU_STATIC_SHARED_IN_SECTION 1
#define __shared__ static __attribute__((section("kdfast_emu_shared"), aligned(16)))
#endif
#define KDFAST_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::emu::dynamic_shared())
#define KDFAST_DEVICE_ASSERT(cond) ::emu::device_assert(static_cast<bool>(cond), #cond, __FILE__, __LINE__)

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// Set per thread before its kernel body runs; blockDim / gridDim are set before a launch's threads start.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };

namespace emu {

enum class Schedule { Free, Forward, Reverse, Random };

inline const char* schedule_name(Schedule s) {
  switch (s) {
    case Schedule::Free: return "free";
    case Schedule::Forward: return "forward";
    case Schedule::Reverse: return "reverse";
    default: return "random";
  }
}

// A call site, for the checks' messages and for matching barriers / warp operations.
struct Site {
  const char* file = "";
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
  bool operator!=(const Site& o) const { return !(*this == o); }
  std::string str() const {
    const char* base = std::strrchr(file, '/');
    return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
  }
};

// Thrown inside a kernel thread to unwind it once its block has failed.
struct Abort {};

// A launch that the emulator refuses or a block that failed a check.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The emulated device (sm_90: H100/H200).
struct Device {
  size_t default_dynamic_smem = 48 * 1024;  // without cudaFuncSetAttribute
  size_t optin_smem = 232448;               // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int max_threads = 1024;
};
inline Device device;

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, n), per kernel.
inline std::map<const void*, size_t>& dynamic_smem_optin() {
  static std::map<const void*, size_t> m;
  return m;
}

enum class WarpKind { ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, All, Any, SyncWarp };
inline const char* warp_kind_name(WarpKind k) {
  const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                         "__ballot_sync", "__all_sync", "__any_sync", "__syncwarp"};
  return names[static_cast<int>(k)];
}

enum class WaitKind { None, Barrier, Warp };

struct ThreadState {
  WaitKind waiting = WaitKind::None;
  bool started = false, exited = false;
  uint64_t barriers = 0;  // barriers passed
  uint64_t result = 0;    // a warp operation's result, written by the lane that completed it
  Site site;              // where it waits
  std::condition_variable cv;
};

struct WarpOp {
  bool pending = false;
  Site site;
  WarpKind kind = WarpKind::ShflIdx;
  unsigned mask = 0, arrived = 0;
  int param = 0, width = 32;
  uint64_t in[32] = {};
};

class Block {
 public:
  Block(int threads, Schedule schedule, uint64_t seed, void* dyn_smem)
      : n_(threads), schedule_(schedule), rng_(seed), ts_(threads), warps_((threads + 31) / 32), smem_(dyn_smem) {}

  void* dynamic_shared() const { return smem_; }
  bool failed() {
    std::lock_guard<std::mutex> lock(m_);
    return failed_;
  }
  std::string error() {
    std::lock_guard<std::mutex> lock(m_);
    return error_;
  }

  // Thread entry and exit.
  void begin(int me) {
    {
      std::unique_lock<std::mutex> lock(m_);
      ts_[me].started = true;
      ++started_;
      main_cv_.notify_all();
      if (serial()) {
        wait_for_turn(lock, me);
        return;
      }
    }
    // Free schedule: wait for the start on a relaxed atomic, not on the lock, so that ThreadSanitizer
    // sees no order between the threads' kernel bodies other than the barriers and warp operations.
    while (!go_.load(std::memory_order_relaxed)) std::this_thread::yield();
  }
  void start() {  // main thread, once every thread has begun: the first turn, or the free start
    std::unique_lock<std::mutex> lock(m_);
    main_cv_.wait(lock, [&] { return started_ == n_; });
    if (serial()) {
      pass_turn();
    } else {
      go_.store(true, std::memory_order_relaxed);
    }
  }
  void end(int me) {
    std::unique_lock<std::mutex> lock(m_);
    ts_[me].exited = true;
    ++exited_;
    if (failed_) return;
    if (barrier_arrived_ > 0)
      fail("thread " + std::to_string(me) + " exited while " + std::to_string(barrier_arrived_) +
           " thread(s) wait at __syncthreads at " + barrier_site_.str() + " (a barrier in divergent code)");
    const WarpOp& op = warps_[me / 32];
    if (!failed_ && op.pending && (op.mask >> (me % 32) & 1u))
      fail("lane " + std::to_string(me % 32) + " of warp " + std::to_string(me / 32) + " exited while named in the mask of " +
           warp_kind_name(op.kind) + " at " + op.site.str());
    if (!failed_) check_deadlock();
    if (!failed_ && serial() && exited_ < n_) pass_turn();
  }
  // Records the first error and wakes every thread (they unwind with Abort).
  void fail_external(const std::string& msg) {
    std::unique_lock<std::mutex> lock(m_);
    fail(msg);
  }

  void syncthreads(int me, Site site) {
    std::unique_lock<std::mutex> lock(m_);
    throw_if_failed();
    const WarpOp& op = warps_[me / 32];
    if (op.pending && (op.mask >> (me % 32) & 1u) && !(op.arrived >> (me % 32) & 1u))
      fail_and_throw("thread " + std::to_string(me) + " reached __syncthreads at " + site.str() +
                     " while its warp waits for it at " + warp_kind_name(op.kind) + " at " + op.site.str());
    if (exited_ > 0)
      fail_and_throw("thread " + std::to_string(me) + " reached __syncthreads at " + site.str() + " after " +
                     std::to_string(exited_) + " thread(s) of the block exited (a barrier in divergent code)");
    if (barrier_arrived_ == 0) {
      barrier_site_ = site;
    } else if (barrier_site_ != site) {
      fail_and_throw("divergent __syncthreads: thread " + std::to_string(me) + " at " + site.str() + " while " +
                     std::to_string(barrier_arrived_) + " thread(s) wait at " + barrier_site_.str());
    }
    ++ts_[me].barriers;
    if (++barrier_arrived_ == n_) {
      barrier_arrived_ = 0;
      for (int t = 0; t < n_; ++t) {
        if (ts_[t].barriers != ts_[me].barriers)
          fail_and_throw("barrier counts differ at " + site.str() + ": thread " + std::to_string(t) + " passed " +
                         std::to_string(ts_[t].barriers) + ", thread " + std::to_string(me) + " " +
                         std::to_string(ts_[me].barriers));
        if (ts_[t].waiting == WaitKind::Barrier) release(t);
      }
      if (serial()) yield(lock, me);
      return;
    }
    wait(lock, me, WaitKind::Barrier, site);
  }

  uint64_t warp_op(int me, WarpKind kind, unsigned mask, uint64_t value, int param, int width, Site site) {
    std::unique_lock<std::mutex> lock(m_);
    throw_if_failed();
    const int lane = me % 32, warp = me / 32;
    const std::string who = "lane " + std::to_string(lane) + " of warp " + std::to_string(warp) + " at " +
                            warp_kind_name(kind) + " (" + site.str() + ")";
    if (!(mask >> lane & 1u)) fail_and_throw(who + ": the calling lane is not in the mask");
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail_and_throw(who + ": width must be a power of 2 <= 32");
    const int present = std::min(32, n_ - warp * 32);
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      if (l >= present) fail_and_throw(who + ": the mask names lane " + std::to_string(l) + ", absent from this block");
      if (ts_[warp * 32 + l].exited) fail_and_throw(who + ": the mask names lane " + std::to_string(l) + ", which exited");
      if (ts_[warp * 32 + l].waiting == WaitKind::Barrier)
        fail_and_throw(who + ": the mask names lane " + std::to_string(l) + ", which waits at __syncthreads at " +
                       ts_[warp * 32 + l].site.str());
    }
    WarpOp& op = warps_[warp];
    if (!op.pending) {
      op.pending = true;
      op.site = site, op.kind = kind, op.mask = mask, op.param = param, op.width = width, op.arrived = 0;
    } else if (op.site != site || op.kind != kind || op.mask != mask || op.param != param || op.width != width) {
      fail_and_throw(who + " with mask " + hex(mask) + " while lanes " + hex(op.arrived) + " wait at " +
                     warp_kind_name(op.kind) + " (" + op.site.str() + ") with mask " + hex(op.mask) +
                     " (divergent warp operation)");
    }
    op.in[lane] = value;
    op.arrived |= 1u << lane;
    if (op.arrived == op.mask) {
      complete(warp, op);
      if (serial()) yield(lock, me);
      return ts_[me].result;
    }
    wait(lock, me, WaitKind::Warp, site);
    return ts_[me].result;
  }

  void device_assert_failed(const std::string& msg) {
    std::unique_lock<std::mutex> lock(m_);
    fail_and_throw(msg);
  }

 private:
  bool serial() const { return schedule_ != Schedule::Free; }
  static std::string hex(unsigned v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", v);
    return buf;
  }

  void throw_if_failed() {
    if (failed_) throw Abort{};
  }
  void fail(const std::string& msg) {
    if (!failed_) {
      failed_ = true;
      error_ = msg;
    }
    for (auto& t : ts_) t.cv.notify_all();
    main_cv_.notify_all();
  }
  [[noreturn]] void fail_and_throw(const std::string& msg) {
    fail(msg);
    throw Abort{};
  }

  // Computes every lane's result of a completed warp operation and releases the waiting lanes.
  void complete(int warp, WarpOp& op) {
    op.pending = false;
    uint64_t vote = 0;
    int count = 0;
    for (int l = 0; l < 32; ++l)
      if (op.mask >> l & 1u) {
        ++count;
        if (op.in[l] != 0) vote |= 1ull << l;
      }
    for (int l = 0; l < 32; ++l) {
      if (!(op.mask >> l & 1u)) continue;
      const int base = l & ~(op.width - 1), in_seg = l - base;
      int src = l;
      switch (op.kind) {
        case WarpKind::ShflIdx: src = base + ((op.param % op.width) + op.width) % op.width; break;
        case WarpKind::ShflUp: src = in_seg >= op.param ? l - op.param : l; break;
        case WarpKind::ShflDown: src = in_seg + op.param < op.width ? l + op.param : l; break;
        case WarpKind::ShflXor: {
          const int x = l ^ op.param;
          src = (x & ~(op.width - 1)) == base ? x : l;
          break;
        }
        default: break;
      }
      uint64_t out = 0;
      switch (op.kind) {
        case WarpKind::Ballot: out = vote; break;
        case WarpKind::All: out = __builtin_popcountll(vote) == count; break;
        case WarpKind::Any: out = vote != 0; break;
        case WarpKind::SyncWarp: break;
        default:
          if (!(op.mask >> src & 1u)) {
            fail("lane " + std::to_string(l) + " of warp " + std::to_string(warp) + " at " + warp_kind_name(op.kind) +
                 " (" + op.site.str() + ") reads lane " + std::to_string(src) + ", outside the mask " + hex(op.mask));
            return;
          }
          out = op.in[src];
      }
      const int t = warp * 32 + l;
      ts_[t].result = out;
      if (ts_[t].waiting == WaitKind::Warp) release(t);
    }
  }

  void release(int t) {
    ts_[t].waiting = WaitKind::None;
    --blocked_;
    if (!serial()) ts_[t].cv.notify_all();
  }

  void check_deadlock() {
    const int live = n_ - exited_;
    if (live == 0 || blocked_ < live) return;
    std::map<std::string, int> where;
    for (const auto& t : ts_)
      if (!t.exited && t.waiting != WaitKind::None)
        ++where[(t.waiting == WaitKind::Barrier ? "__syncthreads at " : "a warp operation at ") + t.site.str()];
    std::string msg = "deadlock: every live thread waits:";
    for (const auto& [site, count] : where) msg += " " + std::to_string(count) + " at " + site + ";";
    fail(msg);
  }

  void wait(std::unique_lock<std::mutex>& lock, int me, WaitKind kind, Site site) {
    ts_[me].waiting = kind;
    ts_[me].site = site;
    ++blocked_;
    check_deadlock();
    throw_if_failed();
    if (serial()) {
      pass_turn();
      wait_for_turn(lock, me);
    } else {
      ts_[me].cv.wait(lock, [&] { return failed_ || ts_[me].waiting == WaitKind::None; });
      throw_if_failed();
    }
  }

  // Serial schedules: the running thread gives the turn to the next runnable thread in the
  // schedule's order (itself included when it is runnable) and waits until the turn comes back.
  void yield(std::unique_lock<std::mutex>& lock, int me) {
    pass_turn();
    wait_for_turn(lock, me);
  }
  void wait_for_turn(std::unique_lock<std::mutex>& lock, int me) {
    ts_[me].cv.wait(lock, [&] { return failed_ || running_ == me; });
    throw_if_failed();
  }
  void pass_turn() {
    std::vector<int> ready;
    for (int t = 0; t < n_; ++t)
      if (ts_[t].started && !ts_[t].exited && ts_[t].waiting == WaitKind::None) ready.push_back(t);
    if (ready.empty()) {
      if (exited_ < n_) check_deadlock();
      return;
    }
    int next;
    switch (schedule_) {
      case Schedule::Forward: next = ready.front(); break;
      case Schedule::Reverse: next = ready.back(); break;
      default: next = ready[std::uniform_int_distribution<size_t>(0, ready.size() - 1)(rng_)]; break;
    }
    running_ = next;
    ts_[next].cv.notify_all();
  }

  std::mutex m_;
  std::condition_variable main_cv_;
  const int n_;
  const Schedule schedule_;
  std::mt19937_64 rng_;
  std::vector<ThreadState> ts_;
  std::vector<WarpOp> warps_;
  void* smem_;
  int started_ = 0, exited_ = 0, blocked_ = 0, running_ = -1;
  int barrier_arrived_ = 0;
  Site barrier_site_;
  bool failed_ = false;
  std::string error_;
  std::atomic<bool> go_{false};
};

struct ThreadContext {
  Block* block = nullptr;
  int tid = 0;
};
inline thread_local ThreadContext self;

inline void* dynamic_shared() { return self.block->dynamic_shared(); }

inline void device_assert(bool ok, const char* cond, const char* file, int line) {
  if (!ok) self.block->device_assert_failed(std::string("device assert failed: ") + cond + " at " + Site{file, line}.str());
}

// Static __shared__ of plain builds: refilled with NaN before each block.
#if KDFAST_EMU_STATIC_SHARED_IN_SECTION
extern "C" __attribute__((weak)) unsigned char __start_kdfast_emu_shared[];
extern "C" __attribute__((weak)) unsigned char __stop_kdfast_emu_shared[];
#endif
inline void fill_nan(void* p, size_t bytes) {
  const uint32_t nan_bits = 0x7fc00000u;  // float NaN; two of them are a double NaN
  unsigned char* b = static_cast<unsigned char*>(p);
  for (size_t i = 0; i < bytes; ++i) b[i] = reinterpret_cast<const unsigned char*>(&nan_bits)[i % 4];
}
inline void poison_static_shared() {
#if KDFAST_EMU_STATIC_SHARED_IN_SECTION
  if (__start_kdfast_emu_shared != nullptr) fill_nan(__start_kdfast_emu_shared, __stop_kdfast_emu_shared - __start_kdfast_emu_shared);
#endif
}

#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kGuardBytes = 0;
#else
constexpr size_t kGuardBytes = 4096;
#endif
inline bool guard_is_nan(const unsigned char* guard) {
  std::vector<unsigned char> want(kGuardBytes);
  fill_nan(want.data(), kGuardBytes);
  return kGuardBytes == 0 || std::memcmp(guard, want.data(), kGuardBytes) == 0;
}

struct LaunchOptions {
  Schedule schedule = Schedule::Free;
  uint64_t seed = 0;
};

// kernel<<<grid, block, smem>>>(args...), synchronously; throws Error on a refused launch or a failed block.
template <typename... Params, typename... Args>
void launch(const LaunchOptions& opt, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  if (block.y != 1 || block.z != 1) throw Error("emulator: only 1-D blocks are emulated");
  if (block.x == 0 || block.x > static_cast<unsigned>(device.max_threads))
    throw Error("launch: " + std::to_string(block.x) + " threads per block (1.." + std::to_string(device.max_threads) + ")");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw Error("launch: empty grid");
  if (grid.y > 65535 || grid.z > 65535) throw Error("launch: grid.y / grid.z over 65535");
  if (smem > device.default_dynamic_smem) {
    const auto it = dynamic_smem_optin().find(reinterpret_cast<const void*>(kernel));
    const size_t allowed = it == dynamic_smem_optin().end() ? device.default_dynamic_smem : it->second;
    if (smem > allowed)
      throw Error("launch: " + std::to_string(smem) + " bytes of dynamic shared memory > " + std::to_string(allowed) +
                  " without cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, >= " +
                  std::to_string(smem) + ")");
  }
  std::tuple<Params...> params(static_cast<Params>(std::forward<Args>(args))...);
  blockDim = block;
  gridDim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        // Exactly `smem` bytes, filled with NaN: AddressSanitizer sees any access past them; other
        // builds put a NaN-filled guard after them and check after the block that nothing wrote there.
        void* buffer = ::operator new[](smem + kGuardBytes, std::align_val_t(16));
        fill_nan(buffer, smem + kGuardBytes);
        poison_static_shared();
        Block state(static_cast<int>(block.x), opt.schedule, opt.seed * 1000003u + (bz * grid.y + by) * grid.x + bx,
                    smem == 0 ? nullptr : buffer);
        std::vector<std::thread> threads;
        threads.reserve(block.x);
        for (unsigned t = 0; t < block.x; ++t) {
          threads.emplace_back([&, t, bx, by, bz] {
            self = ThreadContext{&state, static_cast<int>(t)};
            threadIdx = uint3{t, 0, 0};
            blockIdx = uint3{bx, by, bz};
            try {
              state.begin(static_cast<int>(t));
              std::apply(kernel, params);
            } catch (const Abort&) {
            } catch (const std::exception& e) {
              state.fail_external(std::string("exception in kernel: ") + e.what());
            }
            state.end(static_cast<int>(t));
          });
        }
        state.start();
        for (auto& th : threads) th.join();
        const bool guard_intact = guard_is_nan(static_cast<unsigned char*>(buffer) + smem);
        ::operator delete[](buffer, std::align_val_t(16));
        if (!guard_intact && !state.failed())
          state.fail_external("a thread wrote past the block's " + std::to_string(smem) +
                              " bytes of dynamic shared memory");
        if (state.failed())
          throw Error("block (" + std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) + "), " +
                      schedule_name(opt.schedule) + " schedule: " + state.error());
      }
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp operations move at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace emu

// ------------------------------------------------------------------------------- device built-ins
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu::self.block->syncthreads(emu::self.tid, emu::Site{file, line});
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu::self.block->warp_op(emu::self.tid, emu::WarpKind::SyncWarp, mask, 0, 0, 32, emu::Site{file, line});
}
#define KDFAST_EMU_SHFL(NAME, KIND)                                                                              \
  template <typename T>                                                                                          \
  T NAME(unsigned mask, T var, int arg, int width = 32, const char* file = __builtin_FILE(),                     \
         int line = __builtin_LINE()) {                                                                          \
    return emu::from_bits<T>(emu::self.block->warp_op(emu::self.tid, emu::WarpKind::KIND, mask, emu::to_bits(var), \
                                                      arg, width, emu::Site{file, line}));                       \
  }
KDFAST_EMU_SHFL(__shfl_sync, ShflIdx)
KDFAST_EMU_SHFL(__shfl_up_sync, ShflUp)
KDFAST_EMU_SHFL(__shfl_down_sync, ShflDown)
KDFAST_EMU_SHFL(__shfl_xor_sync, ShflXor)
#undef KDFAST_EMU_SHFL
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<unsigned>(emu::self.block->warp_op(emu::self.tid, emu::WarpKind::Ballot, mask, pred != 0, 0, 32,
                                                        emu::Site{file, line}));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(
      emu::self.block->warp_op(emu::self.tid, emu::WarpKind::All, mask, pred != 0, 0, 32, emu::Site{file, line}));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(
      emu::self.block->warp_op(emu::self.tid, emu::WarpKind::Any, mask, pred != 0, 0, 32, emu::Site{file, line}));
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// Atomics (sequentially consistent host atomics; the GPU's are relaxed, which only weakens ordering).
template <typename T>
inline T emu_atomic_update(T* address, T (*f)(T, T), T val) {
  T old, desired;
  __atomic_load(address, &old, __ATOMIC_SEQ_CST);
  do {
    desired = f(old, val);
  } while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* a, float v) {
  return emu_atomic_update<float>(a, [](float x, float y) { return x + y; }, v);
}
inline double atomicAdd(double* a, double v) {
  return emu_atomic_update<double>(a, [](double x, double y) { return x + y; }, v);
}
inline int atomicMax(int* a, int v) {
  return emu_atomic_update<int>(a, [](int x, int y) { return x > y ? x : y; }, v);
}
inline int atomicMin(int* a, int v) {
  return emu_atomic_update<int>(a, [](int x, int y) { return x < y ? x : y; }, v);
}
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
inline int atomicCAS(int* a, int compare, int v) {
  __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long compare, unsigned long long v) {
  __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}

// Math intrinsics (host libm: the GPU's fast-math versions differ in the last bits, see docs/cuda.md).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > emu::device.optin_smem)
    return cudaErrorInvalidValue;
  emu::dynamic_smem_optin()[kernel] = static_cast<size_t>(value);
  return cudaSuccess;
}
template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// ------------------------------------------------------------------------------- half types
namespace emu {
// IEEE binary16, converted with round-to-nearest-even (GCC's _Float16).
struct half {
  _Float16 v;
  half() = default;
  half(float f) : v(static_cast<_Float16>(f)) {}
  half(double f) : v(static_cast<_Float16>(f)) {}
  operator float() const { return static_cast<float>(v); }
};
// bfloat16: the top 16 bits of a float, rounded to nearest even.
struct bfloat16 {
  uint16_t bits;
  bfloat16() = default;
  bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = 0x7fc0;
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  bfloat16(double f) : bfloat16(static_cast<float>(f)) {}
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
static_assert(sizeof(half) == 2 && sizeof(bfloat16) == 2, "16-bit types");
}  // namespace emu
