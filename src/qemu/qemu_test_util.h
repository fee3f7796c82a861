// Test-only helpers shared by qemu_test and primary_test: temp dirs, running
// the QEMU command-line tools, parsing `nbdinfo --map`.
#pragma once

#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <cstdint>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

namespace vmreplica::testutil {

// A fresh directory under /tmp (short: unix socket paths must fit), removed
// with its content at scope exit.
class TempDir {
 public:
  explicit TempDir(const char* tag) {
    std::string tmpl = std::string("/tmp/vmr-") + tag + "-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    path_ = ::mkdtemp(buf.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Runs `cmd` through the shell; returns its exit code and stdout+stderr.
struct CommandResult {
  int exit_code = -1;
  std::string output;
};
inline CommandResult Run(const std::string& cmd) {
  CommandResult r;
  FILE* f = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!f) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) r.output.append(buf, n);
  int st = ::pclose(f);
  r.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

inline std::string NbdUri(const std::string& export_name, const std::string& socket) {
  return "nbd+unix:///" + export_name + "?socket=" + socket;
}

// One extent of `nbdinfo --map`.
struct MapExtent {
  uint64_t offset;
  uint64_t length;
  uint32_t type;
  bool operator==(const MapExtent&) const = default;
};

// `nbdinfo --map=<context>` parsed; for qemu:dirty-bitmap:* type 1 is dirty.
inline std::vector<MapExtent> NbdMap(const std::string& uri, const std::string& context,
                                     std::string* raw = nullptr) {
  auto r = Run("nbdinfo --map=" + context + " '" + uri + "'");
  if (raw) *raw = r.output;
  std::vector<MapExtent> out;
  if (r.exit_code != 0) return out;
  std::istringstream in(r.output);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    MapExtent e{};
    if (ls >> e.offset >> e.length >> e.type) out.push_back(e);
  }
  return out;
}

// The extents with type 1 (dirty), adjacent ones merged.
inline std::vector<MapExtent> DirtyExtents(const std::vector<MapExtent>& map) {
  std::vector<MapExtent> out;
  for (const auto& e : map) {
    if (e.type != 1) continue;
    if (!out.empty() && out.back().offset + out.back().length == e.offset) {
      out.back().length += e.length;
    } else {
      out.push_back(e);
    }
  }
  return out;
}

}  // namespace vmreplica::testutil
