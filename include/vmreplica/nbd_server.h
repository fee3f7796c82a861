// A read-only NBD server on a unix socket. The replica daemon uses it to
// serve any recovery point of a replicated disk to QEMU (failover / test VM
// through a qcow2 overlay) and to nbdinfo / qemu-img / nbdcopy.
//
// Protocol subset, limits and the answer to every malformed message:
// docs/nbd_server.md. The protocol state machine lives in
// src/nbdserver/session.h; this header is the public surface.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "vmreplica/status.h"

namespace vmreplica {

// One run of bytes with the same base:allocation state.
struct Extent {
  uint64_t length = 0;  // > 0
  bool hole = false;    // NBD_STATE_HOLE: not allocated
  bool zero = false;    // NBD_STATE_ZERO: reads as zeroes
};

// The bytes behind one export. Implementations must be thread-safe: several
// connections call them concurrently. The size never changes while the
// source is exported.
class ExportSource {
 public:
  virtual ~ExportSource() = default;

  // Size in bytes.
  virtual uint64_t size() const = 0;

  // Fills out[0, length) with the bytes at [offset, offset + length).
  // Precondition (checked by the caller): offset + length <= size().
  virtual Status Read(uint64_t offset, uint64_t length, char* out) = 0;

  // Describes [offset, offset + length): a non-empty list of extents with
  // non-zero lengths that covers a prefix of the range (it may stop early,
  // e.g. after many extents; it never goes beyond the range). Same
  // precondition as Read, and length > 0.
  virtual Result<std::vector<Extent>> Extents(uint64_t offset, uint64_t length) = 0;
};

// A (sparse) raw file, opened read-only. Reads use pread; extents use
// SEEK_DATA / SEEK_HOLE (a file system without them reports all data).
// The size is fixed at Open() time.
class FileExportSource : public ExportSource {
 public:
  static Result<std::shared_ptr<FileExportSource>> Open(const std::string& path);
  ~FileExportSource() override;
  FileExportSource(const FileExportSource&) = delete;
  FileExportSource& operator=(const FileExportSource&) = delete;

  uint64_t size() const override { return size_; }
  Status Read(uint64_t offset, uint64_t length, char* out) override;
  Result<std::vector<Extent>> Extents(uint64_t offset, uint64_t length) override;

 private:
  FileExportSource(int fd, uint64_t size, std::string path)
      : fd_(fd), size_(size), path_(std::move(path)) {}
  const int fd_;
  const uint64_t size_;
  const std::string path_;
};

namespace nbd {
class ExportTable;
}

struct NbdServerOptions {
  // Unix socket path; a stale socket at this path is replaced. Created with
  // mode 0600 (before listen(), so nobody else can connect in between).
  std::string socket_path;
  // Connections served at once, 1..4096. Extra connections are closed at
  // once after accept().
  int max_connections = 64;
  // A client must finish negotiation (reach transmission) within this time,
  // 1..3600000 ms, or it is disconnected: a silent client cannot hold a
  // connection slot forever. In transmission there is no idle limit (QEMU
  // keeps its connection open and idle while the guest does no I/O).
  int handshake_timeout_ms = 30000;
};

// Serves the exports in its table, one thread per connection.
//
// Thread safety: all methods may be called from any thread. AddExport /
// RemoveExport work before and after Start().
//
// RemoveExport: new negotiations no longer see the export; connections
// already in transmission on it keep their reference to the source and are
// served until they disconnect or Stop() is called.
class NbdServer {
 public:
  explicit NbdServer(NbdServerOptions options);
  ~NbdServer();  // Stop()
  NbdServer(const NbdServer&) = delete;
  NbdServer& operator=(const NbdServer&) = delete;

  // name: 1..4096 bytes, no NUL. AlreadyExists when the name is taken.
  Status AddExport(const std::string& name, const std::string& description,
                   std::shared_ptr<ExportSource> source);
  // NotFound when there is no such export.
  Status RemoveExport(const std::string& name);

  // Binds and listens, then accepts in a background thread.
  // FailedPrecondition when already started; IOError from the OS.
  Status Start();

  // Stops accepting, shuts down every connection, joins every thread and
  // removes the socket file. Idempotent.
  void Stop();

  // Connections being served now (for tests and statistics).
  int active_connections() const;

  // Connections taken off the listen queue so far, served or refused.
  uint64_t accepted_connections() const { return accepted_.load(); }

 private:
  struct Connection;
  void AcceptLoop();
  void ServeConnection(Connection* conn);
  void ReapFinished();  // joins connections whose thread ended

  // Constant after construction.
  const NbdServerOptions options_;
  const std::unique_ptr<nbd::ExportTable> exports_;

  mutable std::mutex mu_;
  bool started_ = false;                            // guarded by mu_
  int listen_fd_ = -1;                              // guarded by mu_
  int wake_fd_ = -1;                                // eventfd; guarded by mu_
  std::thread accept_thread_;                       // guarded by mu_
  std::vector<std::unique_ptr<Connection>> conns_;  // guarded by mu_
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> accepted_{0};
};

}  // namespace vmreplica
