// Test and benchmark support: a qemu-storage-daemon holding one qcow2 disk,
// exported over NBD on a unix socket, started from the command line exactly
// as docs/environment notes show. Not for production use (the product drives
// QEMU through src/qemu).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "vmreplica/status.h"

namespace vmreplica::blockio_testing {

// A fresh directory under $TMPDIR (or /tmp), removed with its contents on
// destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "vmr-blockio");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  bool ok() const { return !path_.empty(); }

 private:
  std::string path_;
};

// Runs argv[0] (searched in PATH) and waits. Returns its stdout+stderr; a
// non-zero exit or a signal is an IOError carrying that output.
Result<std::string> RunCommand(const std::vector<std::string>& argv);

// qemu-img create -f qcow2 PATH SIZE [+ qemu-img bitmap --add -g GRAN PATH NAME].
Status CreateQcow2(const std::string& path, uint64_t size,
                   const std::optional<std::string>& bitmap = std::nullopt,
                   uint32_t granularity = 4096);

// One qemu-storage-daemon process. The export is named "disk0" and writable;
// `bitmap`, when given, is exported as qemu:dirty-bitmap:<bitmap>.
class Qsd {
 public:
  // Starts the daemon (--daemonize) with its socket and pid file in `dir`.
  // Makes this process a child subreaper (prctl) so the daemon is reaped
  // here rather than by init; Start, Stop and Kill reap any exited child of
  // this process (waitpid(-1)): meant for test and benchmark processes.
  static Result<std::unique_ptr<Qsd>> Start(const std::string& dir, const std::string& image,
                                            const std::optional<std::string>& bitmap);
  // Stops the daemon (SIGTERM, then SIGKILL after 10 s) if still running.
  ~Qsd();
  Qsd(const Qsd&) = delete;
  Qsd& operator=(const Qsd&) = delete;

  const std::string& socket() const { return socket_; }
  // The QMP monitor socket (dir/qmp.sock).
  const std::string& qmp_socket() const { return qmp_socket_; }
  std::string export_name() const { return "disk0"; }
  std::string uri() const { return "nbd+unix:///disk0?socket=" + socket_; }
  pid_t pid() const { return pid_; }

  // Graceful stop (persistent bitmaps are written back).
  Status Stop();
  // kill -9; waits until the process is gone.
  void Kill();

 private:
  Qsd(std::string socket, std::string qmp_socket, pid_t pid)
      : socket_(std::move(socket)), qmp_socket_(std::move(qmp_socket)), pid_(pid) {}
  bool WaitGone(int timeout_ms) const;

  std::string socket_;
  std::string qmp_socket_;
  pid_t pid_;
};

// Minimal QMP session for tests: connects, negotiates capabilities, runs
// commands given as JSON text and skips events. Not a QMP client (that is
// src/qemu); no JSON parsing beyond finding "return" / "error".
class QmpSession {
 public:
  static Result<std::unique_ptr<QmpSession>> Connect(const std::string& socket_path);
  ~QmpSession();
  QmpSession(const QmpSession&) = delete;
  QmpSession& operator=(const QmpSession&) = delete;
  // Sends {"execute": command, "arguments": arguments_json}; returns the
  // reply line, or an error carrying the server's error reply.
  Result<std::string> Execute(const std::string& command, const std::string& arguments_json = "{}");

 private:
  explicit QmpSession(int fd) : fd_(fd) {}
  Result<std::string> ReadLine();
  int fd_;
  std::string pending_;
};

// qemu-io -f raw URI -c CMD1 -c CMD2 ... in one process.
Status QemuIo(const std::string& uri, const std::vector<std::string>& commands);

}  // namespace vmreplica::blockio_testing
