// Small file helpers with the crash-safety discipline of the project:
// write a temporary file, fsync it, rename it over the target, fsync the
// directory. A reader sees either the old or the new content, never a mix.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
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

// Whether the `n` bytes at `data` are all zero.
bool IsAllZero(const void* data, size_t n);

// What CopyFileSparse did.
struct SparseCopyStats {
  uint64_t data_bytes = 0;    // bytes of the source's data extents copied
  uint64_t hole_bytes = 0;    // bytes made holes (or zeros) in the destination
  uint64_t kernel_bytes = 0;  // of data_bytes, copied by copy_file_range (reflink or in-kernel copy)
};

// Copies bytes [0, size) of the open file or block device `src_fd` into
// the open regular file `dst_fd` at the same offsets, so that the
// destination reads exactly as the source (its size is left as it is and
// must be at least `size`):
// - the source's data extents (SEEK_DATA / SEEK_HOLE; a source without
//   them, such as a block device, is all data) go by copy_file_range: a
//   reflink where the file system shares extents, an in-kernel copy
//   elsewhere; where the kernel refuses (another file system, a block
//   device) by read and write, and a read piece of all zeros becomes a hole;
// - the source's holes become holes in the destination
//   (FALLOC_FL_PUNCH_HOLE), or written zeros where the file system cannot
//   punch, whatever the destination held there before.
// Nothing is fsynced: the caller decides when the copy must be durable.
// `progress(done, size)` is called after each piece (at most 64 MiB);
// `cancelled()` is asked between pieces (Cancelled). IOError names the
// offset and the call that failed.
Status CopyFileSparse(int src_fd, int dst_fd, uint64_t size, SparseCopyStats* stats = nullptr,
                      const std::function<void(uint64_t done, uint64_t size)>& progress = {},
                      const std::function<bool()>& cancelled = {});

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
