// Shared by the vmreplica-dump tests: finds the built tool (ctest sets
// VMREPLICA_BUILD_DIR) and runs it, collecting stdout and the exit code.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace vmreplica::dump_testing {

struct RunResult {
  int exit_code = -1;
  std::string out;
};

// The tool's path, or "" when VMREPLICA_BUILD_DIR is unset or the tool is
// missing: the callers FAIL then, a missing tool is a broken build.
inline std::string ToolPath() {
  const char* build = std::getenv("VMREPLICA_BUILD_DIR");
  if (build == nullptr) return "";
  std::string tool = std::string(build) + "/tools/vmreplica-dump/vmreplica-dump";
  return std::filesystem::exists(tool) ? tool : "";
}

// Runs `tool args` (stderr discarded).
inline RunResult RunTool(const std::string& tool, const std::string& args) {
  RunResult r;
  std::string cmd = tool + " " + args + " 2>/dev/null";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  int status = ::pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

}  // namespace vmreplica::dump_testing
