// Small file helpers with the crash-safety discipline of the project:
// write a temporary file, fsync it, rename it over the target, fsync the
// directory. A reader sees either the old or the new content, never a mix.
#pragma once

#include <string>

#include "vmreplica/status.h"

namespace vmreplica {

// Replaces `path` atomically with `content`, file mode `mode`.
Status WriteFileAtomic(const std::string& path, const std::string& content, unsigned mode = 0644);

// Reads a whole file (at most `max_bytes`; larger files are an error).
Result<std::string> ReadFile(const std::string& path, size_t max_bytes = 64u << 20);

// fsyncs the directory that holds `path` (so a rename or create is durable).
Status FsyncParentDir(const std::string& path);

// Creates `dir` and its parents with `mode` when missing.
Status MakeDirs(const std::string& dir, unsigned mode = 0755);

// In a forked child before exec: unblocks every signal and restores the
// default action of SIGTERM, SIGINT, SIGHUP and SIGPIPE. The daemon blocks
// SIGTERM and SIGINT in all its threads (a signal thread waits for them),
// and exec keeps a blocked mask: without this a qemu-storage-daemon or QEMU
// we start would ignore the SIGTERM that asks it to store its persistent
// bitmaps and exit. Async-signal-safe.
void ResetSignalsForExec() noexcept;

// Holds an exclusive flock() on a file for its lifetime. Used so that two
// daemons never share one state directory.
class FileLock {
 public:
  static Result<FileLock> Acquire(const std::string& path);
  FileLock(FileLock&& other) noexcept;
  FileLock& operator=(FileLock&& other) noexcept;
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;
  ~FileLock();

 private:
  explicit FileLock(int fd) : fd_(fd) {}
  int fd_ = -1;
};

}  // namespace vmreplica
