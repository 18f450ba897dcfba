// The Tucker path cache and its measurement (see tucker_cpu_autotune.h), and the control op
// kdfast::_tucker_autotune that kdfast/backends/tucker.py drives.
#include "tucker_cpu_autotune.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <vector>

#include "../tucker_conv2d_common.h"

namespace kdfast {
namespace tucker {
namespace autotune {
namespace {

constexpr int kMinRounds = 3;
constexpr int kMaxRounds = 15;
constexpr double kMinMillis = 30.0;  // of timed work (both paths), once kMinRounds are done

struct Entry {
  const char* path;  // kPathFused / kPathComposed
  double fused_ms, composed_ms;
  int rounds;
  bool loaded;  // from a file (load_cache), not measured in this process
};

std::mutex mutex;
std::map<std::string, Entry> cache;  // ordered: the exported JSON is stable
std::atomic<int> python_setting{-1};  // -1: not set from Python; 0 off; 1 on
std::atomic<int64_t> n_tunings{0}, n_timed_runs{0}, n_hits{0};

// KDFAST_TUCKER_AUTOTUNE: -1 unset/empty, else 0 or 1; anything else is an error naming the values.
int env_setting() {
  const char* raw = std::getenv("KDFAST_TUCKER_AUTOTUNE");
  if (raw == nullptr || *raw == '\0') return -1;
  const std::string v(raw);
  if (v == "1" || v == "true" || v == "on") return 1;
  if (v == "0" || v == "false" || v == "off") return 0;
  TORCH_CHECK_VALUE(false, "KDFAST_TUCKER_AUTOTUNE='", v, "': expected 1/true/on or 0/false/off");
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

std::string json_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", v);
  return buf;
}

std::string state_json() {
  const int py = python_setting.load(), env = env_setting();
  const char* env_raw = std::getenv("KDFAST_TUCKER_AUTOTUNE");
  std::string out = "{\"enabled\": " + std::string(enabled() ? "true" : "false");
  out += ", \"set_by\": " + json_string(py >= 0 ? "kdfast.backends.tucker.autotune"
                                                 : env >= 0 ? "KDFAST_TUCKER_AUTOTUNE" : "default");
  out += ", \"env\": " + (env_raw ? json_string(env_raw) : std::string("null"));
  out += ", \"min_flops\": " + json_number(kMinFlops) + ", \"max_entries\": " + std::to_string(kMaxEntries);
  out += ", \"tunings\": " + std::to_string(n_tunings.load()) + ", \"timed_runs\": " +
         std::to_string(n_timed_runs.load()) + ", \"hits\": " + std::to_string(n_hits.load());
  out += ", \"entries\": [";
  std::lock_guard<std::mutex> lock(mutex);
  bool first = true;
  for (const auto& [key, e] : cache) {
    out += std::string(first ? "" : ", ") + "{\"key\": " + json_string(key) + ", \"path\": " + json_string(e.path) +
           ", \"fused_ms\": " + json_number(e.fused_ms) + ", \"composed_ms\": " + json_number(e.composed_ms) +
           ", \"rounds\": " + std::to_string(e.rounds) + ", \"source\": " +
           json_string(e.loaded ? "file" : "measured") + "}";
    first = false;
  }
  return out + "]}";
}

// "key\tpath\tfused_ms\tcomposed_ms\trounds" (kdfast/backends/tucker.py:load_cache writes it).
void insert(const std::string& line) {
  std::vector<std::string> parts;
  std::stringstream ss(line);
  std::string part;
  while (std::getline(ss, part, '\t')) parts.push_back(part);
  TORCH_CHECK_VALUE(parts.size() == 5, "_tucker_autotune('insert', ...): expected 5 tab-separated fields ",
                    "(key, path, fused_ms, composed_ms, rounds), got ", parts.size());
  TORCH_CHECK_VALUE(!parts[0].empty(), "_tucker_autotune('insert', ...): empty key");
  const char* path = parts[1] == kPathFused ? kPathFused : parts[1] == kPathComposed ? kPathComposed : nullptr;
  TORCH_CHECK_VALUE(path != nullptr, "_tucker_autotune('insert', ...): path must be 'fused' or 'composed', got '",
                    parts[1], "'");
  Entry e{path, std::strtod(parts[2].c_str(), nullptr), std::strtod(parts[3].c_str(), nullptr),
          std::atoi(parts[4].c_str()), true};
  std::lock_guard<std::mutex> lock(mutex);
  cache[parts[0]] = e;
}

std::string control(const std::string& command, const std::string& argument) {
  if (command == "state") return state_json();
  if (command == "set") {
    TORCH_CHECK_VALUE(argument == "1" || argument == "0" || argument.empty(),
                      "_tucker_autotune('set', ...): expected '1', '0' or '' (follow KDFAST_TUCKER_AUTOTUNE), got '",
                      argument, "'");
    python_setting.store(argument.empty() ? -1 : argument == "1" ? 1 : 0);
    return "";
  }
  if (command == "clear") {
    std::lock_guard<std::mutex> lock(mutex);
    cache.clear();
    return "";
  }
  if (command == "insert") {
    insert(argument);
    return "";
  }
  TORCH_CHECK_VALUE(false, "_tucker_autotune: unknown command '", command,
                    "'; expected 'state', 'set', 'clear' or 'insert'");
}

}  // namespace

bool enabled() {
  const int py = python_setting.load();
  if (py >= 0) return py == 1;
  return env_setting() != 0;  // unset: on
}

const char* lookup(const std::string& key) {
  std::lock_guard<std::mutex> lock(mutex);
  const auto it = cache.find(key);
  if (it == cache.end()) return nullptr;
  ++n_hits;
  return it->second.path;
}

bool has_room() {
  std::lock_guard<std::mutex> lock(mutex);
  return cache.size() < kMaxEntries;
}

at::Tensor measure(const std::string& key, const std::function<at::Tensor()>& fused,
                   const std::function<at::Tensor()>& composed) {
  using clock = std::chrono::steady_clock;
  ++n_tunings;
  // Warm-up: oneDNN builds its primitives and the allocator maps its pages on a first call.
  at::Tensor y_fused = fused(), y_composed = composed();
  std::vector<double> t_fused, t_composed, ratios;
  double total_ms = 0.0;
  const auto timed = [&](const std::function<at::Tensor()>& run, at::Tensor& out) {
    const auto t0 = clock::now();
    out = run();
    const double ms = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    ++n_timed_runs;
    total_ms += ms;
    return ms;
  };
  for (int round = 0; round < kMaxRounds; ++round) {
    if (round >= kMinRounds && total_ms >= kMinMillis) break;
    double f, c;
    if (round % 2 == 0) {
      f = timed(fused, y_fused);
      c = timed(composed, y_composed);
    } else {
      c = timed(composed, y_composed);
      f = timed(fused, y_fused);
    }
    t_fused.push_back(f), t_composed.push_back(c), ratios.push_back(c / std::max(f, 1e-9));
  }
  // Paired: the median of per-round ratios resists a shared machine's drift better than two medians.
  const bool fused_wins = median(ratios) > 1.0;
  Entry e{fused_wins ? kPathFused : kPathComposed, median(t_fused), median(t_composed),
          static_cast<int>(ratios.size()), false};
  {
    std::lock_guard<std::mutex> lock(mutex);
    cache[key] = e;
  }
  return fused_wins ? y_fused : y_composed;
}

}  // namespace autotune
}  // namespace tucker
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CatchAll, m) {
  m.impl("_tucker_autotune", &kdfast::tucker::autotune::control);
}
