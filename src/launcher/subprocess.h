// Private to src/launcher (and src/failover, which runs qemu-img for seeds):
// running helper programs and looking at processes.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "vmreplica/status.h"

namespace vmreplica::launcher_internal {

struct Captured {
  int exit_code = -1;      // 127: the program could not be started (not installed)
  std::string output;      // stdout and stderr together, at most `max_output` bytes kept
  bool truncated = false;  // the program wrote more than `max_output` bytes
};

// Runs argv[0] (searched in PATH) with stdin from /dev/null and waits.
// IOError only when the process cannot be spawned or waited for; a failing
// program is a Captured with its exit code (128 + signal for a signal).
Result<Captured> RunCapture(const std::vector<std::string>& argv, size_t max_output = 16u << 20);

// What /proc/<pid>/stat tells: the state letter and the start time in clock
// ticks after boot (field 22). nullopt when the process does not exist.
struct ProcInfo {
  char state = '?';
  uint64_t start_ticks = 0;
};
std::optional<ProcInfo> ReadProcInfo(pid_t pid);

// Entries in /proc/<pid>/task (threads); 0 when the process does not exist.
size_t TaskCount(pid_t pid);

// QEMU's option syntax: a ',' inside a value is written twice.
std::string EscapeCommas(const std::string& s);

// True when `s` has a byte < 0x20 or 0x7f.
bool HasControlChars(const std::string& s);

}  // namespace vmreplica::launcher_internal
