// The table of hand-written CUDA kernels and whether each is verified on a GPU (see kernel_paths.h).
//
// To add an op: one row here (kernel = nullptr if the op has no hand-written CUDA code), its name
// in kdfast/info.py's OPS, its schema in schemas.cpp and its autocast entry in autocast.cpp
// (tests/ops/test_kernel_paths.py checks that the four agree).
//
// To mark a kernel verified: run `make gpu-check OUT=...` on a GPU, commit its files under
// benchmarks/results/<device>/, and set `verified`, `dtypes` (and `in_scope` for a shape range) only
// where those results show the kernel passes the CUDA tests and is faster than the ATen path; name
// the results in `evidence`.
#include "kernel_paths.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace kdfast {
namespace paths {
namespace {

// Dtype sets of a verified entry.
enum DtypeMask : unsigned {
  kF32 = 1u << 0,
  kF16 = 1u << 1,
  kBF16 = 1u << 2,
  kF64 = 1u << 3,
};

struct CudaKernelEntry {
  const char* op;        // public op name
  const char* kernel;    // the hand-written CUDA code it would run; nullptr: none (ATen only)
  bool verified;         // flipped only with committed GPU results (see above)
  unsigned dtypes;       // DtypeMask the verification covers (0 when not verified)
  const char* scope;     // the shape range it covers, in words ("" = every shape)
  bool (*in_scope)(const at::Tensor& primary);  // that range as code; nullptr = every shape
  const char* evidence;  // benchmarks/results/<device>/... that shows it ("" when not verified)
};

// Today no hand-written CUDA kernel has run on a GPU: every entry is "not verified".
constexpr CudaKernelEntry kCudaKernels[] = {
    {kFspMatrix, nullptr, false, 0, "", nullptr, ""},
    {kFspLoss, "per-sample sum of squares (csrc/ops/cuda/primitives.cu)", false, 0, "", nullptr, ""},
    {kNstLoss,
     "sum of squares, gaussian kernel rows, normalisation backward (csrc/ops/cuda/primitives.cu)", false, 0, "",
     nullptr, ""},
    {kTuckerConv2d, "fused Tucker-2 block, FFMA (csrc/ops/cuda/tucker_conv2d_kernel.cu)", false, 0, "", nullptr, ""},
    {kKdLoss, "fused row statistics and gradients (csrc/ops/cuda/kd_loss_kernel.cu)", false, 0, "", nullptr, ""},
    {kSparseRecoding, "multi-tensor recode and threshold update (csrc/ops/cuda/sparse_recoding_kernel.cu)", false, 0,
     "", nullptr, ""},
    {kSparseCodes, "fused projection + running top-k, forward, k <= 32 (csrc/ops/cuda/sparse_codes_kernel.cu)", false,
     0, "", nullptr, ""},
};

const CudaKernelEntry& entry(const char* op) {
  for (const auto& e : kCudaKernels)
    if (std::strcmp(e.op, op) == 0) return e;
  TORCH_INTERNAL_ASSERT(false, "kdfast: op '", op, "' is missing from the kernel table (csrc/ops/kernel_paths.cpp)");
}

std::string known_ops() {
  std::string out;
  for (const auto& e : kCudaKernels) out += (out.empty() ? "" : ", ") + std::string(e.op);
  return out;
}

unsigned dtype_bit(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: return 0;
  }
}

// What an override variable says about `op`: -1 unset/"auto" (use the default), 0 off, 1 on.
int override_for(const char* var, const char* op) {
  const char* raw = std::getenv(var);
  if (raw == nullptr) return -1;
  const std::string value(raw);
  if (value.empty() || value == "auto") return -1;
  if (value == "all") return 1;
  if (value == "none") return 0;
  int found = 0;
  std::stringstream items(value);
  std::string name;
  while (std::getline(items, name, ',')) {
    const auto b = name.find_first_not_of(" \t"), e = name.find_last_not_of(" \t");
    name = b == std::string::npos ? "" : name.substr(b, e - b + 1);
    if (name.empty()) continue;
    bool known = false;
    for (const auto& k : kCudaKernels) known = known || name == k.op;
    TORCH_CHECK_VALUE(known, var, "='", value, "': unknown op '", name, "'; expected 'all', 'none', 'auto' or a ",
                      "comma-separated list of: ", known_ops());
    if (name == op) found = 1;
  }
  return found;
}

bool default_on_cuda(const CudaKernelEntry& e, const at::Tensor& primary) {
  return e.kernel != nullptr && e.verified && (e.dtypes & dtype_bit(primary.scalar_type())) != 0 &&
         (e.in_scope == nullptr || e.in_scope(primary));
}

std::string json_string(const char* s) {
  std::string out = "\"";
  for (const char* p = s; *p; ++p) {
    if (*p == '"' || *p == '\\') out += '\\';
    out += *p;
  }
  return out + "\"";
}

std::string dtype_list(unsigned mask) {
  const std::pair<unsigned, const char*> names[] = {
      {kF32, "float32"}, {kF16, "float16"}, {kBF16, "bfloat16"}, {kF64, "float64"}};
  std::string out = "[";
  for (const auto& [bit, name] : names)
    if (mask & bit) out += (out.size() > 1 ? ", " : "") + json_string(name);
  return out + "]";
}

std::string env_json(const char* var) {
  const char* v = std::getenv(var);
  return v == nullptr ? "null" : json_string(v);
}

}  // namespace

bool use_kernel(const char* op, const at::Tensor& primary) {
  const CudaKernelEntry& e = entry(op);
  if (primary.is_cuda()) {
    if (e.kernel == nullptr) return false;
    const int forced = override_for("KDFAST_CUDA_KERNELS", op);
    return forced >= 0 ? forced == 1 : default_on_cuda(e, primary);
  }
  const int forced = override_for("KDFAST_CPU_KERNELS", op);
  return forced != 0;
}

std::string table_json() {
  std::string out = "{\"KDFAST_CUDA_KERNELS\": " + env_json("KDFAST_CUDA_KERNELS") +
                    ", \"KDFAST_CPU_KERNELS\": " + env_json("KDFAST_CPU_KERNELS") + ", \"ops\": {";
  bool first = true;
  for (const auto& e : kCudaKernels) {
    const bool has = e.kernel != nullptr;
    const bool by_default = has && e.verified;
    const int forced_cuda = override_for("KDFAST_CUDA_KERNELS", e.op);
    const bool cuda_now = has && (forced_cuda >= 0 ? forced_cuda == 1 : by_default);
    const bool cpu_now = override_for("KDFAST_CPU_KERNELS", e.op) != 0;
    out += std::string(first ? "" : ", ") + json_string(e.op) + ": {";
    out += "\"cuda_kernel\": " + (has ? json_string(e.kernel) : std::string("null"));
    out += ", \"cuda_kernel_verified\": " + std::string(e.verified ? "true" : "false");
    out += ", \"cuda_verified_dtypes\": " + dtype_list(e.verified ? e.dtypes : 0);
    out += ", \"cuda_verified_scope\": " + json_string(e.verified ? (*e.scope ? e.scope : "all shapes") : "");
    out += ", \"cuda_verified_evidence\": " + json_string(e.evidence);
    out += ", \"cuda_default_path\": " + json_string(by_default ? "kernel" : "aten");
    out += ", \"cuda_path_now\": " + json_string(cuda_now ? "kernel" : "aten");
    out += ", \"cpu_path_now\": " + json_string(cpu_now ? "kernel" : "aten");
    out += "}";
    first = false;
  }
  return out + "}}";
}

}  // namespace paths
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CatchAll, m) {
  m.impl("_kernel_paths", &kdfast::paths::table_json);
}
