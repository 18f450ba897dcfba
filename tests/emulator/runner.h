// The emulator's test driver: one executable, one command per kernel (run_*.cpp), driven by
// tests/emulator/harness.py. A run directory holds args.txt, one line per argument:
//   int NAME VALUE | float NAME VALUE | in NAME DTYPE COUNT | out NAME DTYPE COUNT | inout NAME DTYPE COUNT
// with NAME.bin for `in` / `inout` arrays (raw little-endian). Each schedule starts from the files again;
// `out` arrays start as NaN (floats) or 0x5a bytes (integers); `out` and `inout` arrays are written to
// NAME.SCHEDULE.bin.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "cuda_emu.h"

namespace emu_runner {

enum class DType { F64, F32, F16, BF16, I64, I32 };

struct Array {
  DType dtype = DType::F32;
  int64_t count = 0;
  bool write_back = false;
  unsigned char* data = nullptr;  // exactly count * element size bytes (AddressSanitizer sees overruns)
};

size_t element_size(DType d);

class Args {
 public:
  int64_t i(const std::string& name) const;
  double f(const std::string& name) const;
  bool has(const std::string& name) const { return arrays_.count(name) != 0; }
  DType dtype(const std::string& name) const { return array(name).dtype; }
  int64_t count(const std::string& name) const { return array(name).count; }
  // The array's data as T (the dtype must match T's size); `offset` elements in.
  template <typename T>
  T* ptr(const std::string& name, int64_t offset = 0) const {
    const Array& a = array(name);
    if (element_size(a.dtype) != sizeof(T)) throw emu::Error("argument " + name + ": element size mismatch");
    return reinterpret_cast<T*>(a.data) + offset;
  }
  template <typename T>
  T* ptr_or_null(const std::string& name) const {
    return has(name) ? ptr<T>(name) : nullptr;
  }

  void load(const std::string& dir);
  void save(const std::string& dir, const std::string& suffix) const;
  ~Args();

 private:
  const Array& array(const std::string& name) const;
  std::map<std::string, int64_t> ints_;
  std::map<std::string, double> floats_;
  std::map<std::string, Array> arrays_;
};

using Command = std::function<void(const Args&, const emu::LaunchOptions&)>;
// Each run_*.cpp registers its commands with a static Register object.
std::map<std::string, Command>& commands();
struct Register {
  Register(const char* name, Command c) { commands()[name] = std::move(c); }
};

// Calls f(tag) with a value of the C++ type of a floating dtype (half types: the emulator's).
template <typename F>
void dispatch_floating(DType d, F&& f) {
  switch (d) {
    case DType::F64: f(double{}); break;
    case DType::F32: f(float{}); break;
    case DType::F16: f(emu::half{}); break;
    case DType::BF16: f(emu::bfloat16{}); break;
    default: throw emu::Error("not a floating dtype");
  }
}

// The accumulate type of the kernels: double for double, float otherwise.
template <typename T>
using acc_type = std::conditional_t<std::is_same<T, double>::value, double, float>;

}  // namespace emu_runner
