// Entry point of the emulator runner: emu_runner COMMAND DIR SCHEDULES SEED
// (SCHEDULES: comma-separated of free, forward, reverse, random). Exit 0: every schedule ran; 3: the
// emulator reported an error (message on stderr, "EMULATOR ERROR ..."); 2: bad usage or input.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>

#include "runner.h"

namespace emu_runner {

size_t element_size(DType d) {
  switch (d) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    default: return 2;
  }
}

static DType parse_dtype(const std::string& s) {
  static const std::map<std::string, DType> names = {{"f64", DType::F64}, {"f32", DType::F32}, {"f16", DType::F16},
                                                     {"bf16", DType::BF16}, {"i64", DType::I64}, {"i32", DType::I32}};
  const auto it = names.find(s);
  if (it == names.end()) throw emu::Error("unknown dtype " + s);
  return it->second;
}

std::map<std::string, Command>& commands() {
  static std::map<std::string, Command> m;
  return m;
}

int64_t Args::i(const std::string& name) const {
  const auto it = ints_.find(name);
  if (it == ints_.end()) throw emu::Error("missing int argument " + name);
  return it->second;
}
double Args::f(const std::string& name) const {
  const auto it = floats_.find(name);
  if (it == floats_.end()) throw emu::Error("missing float argument " + name);
  return it->second;
}
const Array& Args::array(const std::string& name) const {
  const auto it = arrays_.find(name);
  if (it == arrays_.end()) throw emu::Error("missing array argument " + name);
  return it->second;
}

void Args::load(const std::string& dir) {
  std::ifstream in(dir + "/args.txt");
  if (!in) throw emu::Error("cannot read " + dir + "/args.txt");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string kind, name;
    if (!(ls >> kind >> name)) continue;
    if (kind == "int") {
      ls >> ints_[name];
    } else if (kind == "float") {
      ls >> floats_[name];
    } else {
      std::string dtype;
      Array a;
      ls >> dtype >> a.count;
      a.dtype = parse_dtype(dtype);
      const size_t bytes = a.count * element_size(a.dtype);
      a.data = static_cast<unsigned char*>(::operator new[](bytes == 0 ? 1 : bytes, std::align_val_t(64)));
      a.write_back = kind != "in";
      if (kind == "out") {
        const bool floating = a.dtype != DType::I64 && a.dtype != DType::I32;
        if (floating && element_size(a.dtype) >= 4) {
          emu::fill_nan(a.data, bytes);
        } else {
          std::memset(a.data, floating ? 0xff : 0x5a, bytes);  // 0xffff is a NaN in half and bfloat16
        }
      } else {
        std::ifstream bin(dir + "/" + name + ".bin", std::ios::binary);
        if (!bin.read(reinterpret_cast<char*>(a.data), static_cast<std::streamsize>(bytes)))
          throw emu::Error("cannot read " + name + ".bin (" + std::to_string(bytes) + " bytes)");
      }
      arrays_[name] = a;
    }
  }
}

void Args::save(const std::string& dir, const std::string& suffix) const {
  for (const auto& [name, a] : arrays_) {
    if (!a.write_back) continue;
    std::ofstream out(dir + "/" + name + "." + suffix + ".bin", std::ios::binary);
    out.write(reinterpret_cast<const char*>(a.data), static_cast<std::streamsize>(a.count * element_size(a.dtype)));
  }
}

Args::~Args() {
  for (auto& [name, a] : arrays_) ::operator delete[](a.data, std::align_val_t(64));
}

}  // namespace emu_runner

int main(int argc, char** argv) {
  using namespace emu_runner;
  if (argc == 2 && std::strcmp(argv[1], "--list") == 0) {
    for (const auto& [name, c] : commands()) std::printf("%s\n", name.c_str());
    return 0;
  }
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s COMMAND DIR SCHEDULES SEED | --list\n", argv[0]);
    return 2;
  }
  const auto it = commands().find(argv[1]);
  if (it == commands().end()) {
    std::fprintf(stderr, "unknown command %s\n", argv[1]);
    return 2;
  }
  const std::string dir = argv[2];
  std::vector<emu::Schedule> schedules;
  {
    std::istringstream s(argv[3]);
    std::string name;
    while (std::getline(s, name, ',')) {
      if (name == "free") schedules.push_back(emu::Schedule::Free);
      else if (name == "forward") schedules.push_back(emu::Schedule::Forward);
      else if (name == "reverse") schedules.push_back(emu::Schedule::Reverse);
      else if (name == "random") schedules.push_back(emu::Schedule::Random);
      else {
        std::fprintf(stderr, "unknown schedule %s\n", name.c_str());
        return 2;
      }
    }
  }
  const uint64_t seed = std::stoull(argv[4]);
  for (const emu::Schedule schedule : schedules) {
    Args args;
    try {
      args.load(dir);
    } catch (const emu::Error& e) {
      std::fprintf(stderr, "bad input: %s\n", e.what());
      return 2;
    }
    emu::dynamic_smem_optin().clear();
    try {
      it->second(args, emu::LaunchOptions{schedule, seed});
    } catch (const emu::Error& e) {
      std::fprintf(stderr, "EMULATOR ERROR [%s schedule]: %s\n", emu::schedule_name(schedule), e.what());
      return 3;
    }
    args.save(dir, emu::schedule_name(schedule));
  }
  return 0;
}
