// QMP (QEMU Machine Protocol) client and a qemu-storage-daemon launcher.
//
// QmpClient speaks QMP over a unix socket to a QEMU process or a
// qemu-storage-daemon (QSD): it reads the greeting, negotiates capabilities,
// sends commands with unique ids and matches the replies, and collects the
// asynchronous events QEMU emits (JOB_STATUS_CHANGE, BLOCK_JOB_CANCELLED,
// BLOCK_EXPORT_DELETED, SHUTDOWN, ...).
//
// QsdProcess starts and owns a qemu-storage-daemon child for a set of disk
// image files, with a QMP monitor and an NBD server on unix sockets.
// Node names of a QSD started here (see docs/tracking.md):
//   protocol node  "<disk>-file"   (driver=file, the image file)
//   format node    "<disk>"        (driver=qcow2 or raw, on top of the above)
//   NBD export     id "<disk>-exp", name "<disk>" (only when requested)
#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "vmreplica/status.h"

namespace vmreplica {

// One asynchronous QMP event.
struct QmpEvent {
  std::string name;          // "JOB_STATUS_CHANGE", "SHUTDOWN", ...
  nlohmann::json data;       // the "data" member (null when absent)
  int64_t timestamp_us = 0;  // QEMU's timestamp, microseconds since the epoch
};

struct QmpClientOptions {
  // Longest message accepted from the socket. A longer line is Corruption
  // and disconnects (a sane QEMU never sends one). Range 4 KiB .. 1 GiB.
  size_t max_message_bytes = 16u << 20;
  // Events kept for WaitForEvent(); the oldest is dropped beyond this.
  size_t max_queued_events = 1024;
  // Deadline for connect + greeting + qmp_capabilities.
  std::chrono::milliseconds connect_timeout{5000};
};

// The one call a QMP user needs: run a command and get its "return" member.
// Implemented by QmpClient (a direct socket) and by the libvirt binding
// (virDomainQemuMonitorCommand), so ChangeTracker works through either.
//
// Thread safety: implementations must allow concurrent Execute() calls.
// Errors: as QmpClient::Execute (QEMU error reply -> NotSupported / NotFound /
// FailedPrecondition with QEMU's class and description; Unavailable when the
// channel is gone; Timeout when no answer came in time).
class QmpChannel {
 public:
  virtual ~QmpChannel() = default;
  virtual Result<nlohmann::json> Execute(const std::string& command, const nlohmann::json& arguments,
                                         std::chrono::milliseconds timeout) = 0;
};

// A connected QMP session.
//
// Thread safety: Execute(), WaitForEvent() and the accessors may be called
// from any thread concurrently. One internal reader thread receives all
// messages; replies are matched to callers by id.
//
// Errors: once the socket closes or delivers malformed bytes the session is
// dead: every pending and later Execute() returns Unavailable (peer closed /
// socket error) or Corruption (malformed or oversized message). Reconnect by
// making a new client.
class QmpClient : public QmpChannel {
 public:
  using EventCallback = std::function<void(const QmpEvent&)>;

  // Connects to the QMP unix socket at `socket_path`, checks the greeting
  // ({"QMP": {"version": {"qemu": {major, minor, micro}}}}) and sends
  // qmp_capabilities. Unavailable when nobody listens, Timeout when the
  // peer does not answer in time, Corruption for a malformed greeting.
  static Result<std::unique_ptr<QmpClient>> Connect(const std::string& socket_path,
                                                    QmpClientOptions options = {});

  // Closes the socket and joins the reader thread. Pending Execute() calls
  // on other threads return Unavailable; do not destroy while another thread
  // may still call into the object.
  ~QmpClient() override;
  QmpClient(const QmpClient&) = delete;
  QmpClient& operator=(const QmpClient&) = delete;

  // Runs one command and returns its "return" member.
  //   QEMU error reply  -> a Status whose message holds the QEMU error class
  //                        and description ("QMP blockdev-del: GenericError:
  //                        ..."); the code is NotSupported for
  //                        CommandNotFound, NotFound for DeviceNotFound,
  //                        FailedPrecondition otherwise (QEMU refused in its
  //                        current state or with these arguments).
  //   socket closed     -> Unavailable; malformed input -> Corruption.
  //   no reply in time  -> Timeout (the command may still run in QEMU; a
  //                        late reply is discarded).
  // `arguments` may be null or an object.
  Result<nlohmann::json> Execute(const std::string& command, const nlohmann::json& arguments = nullptr,
                                 std::chrono::milliseconds timeout = std::chrono::seconds(10)) override;

  // Installs `callback`, called on the reader thread for every event before
  // it is queued. It must be quick and must not call Execute() (that would
  // deadlock: the reply is read by the same thread). nullptr removes it.
  void SetEventCallback(EventCallback callback);

  // Removes and returns the oldest queued event for which `predicate` is
  // true, waiting up to `timeout` for one to arrive. Timeout when none came,
  // the session's error when it died while waiting. `predicate` runs under
  // the client's lock: it must not call into the client.
  Result<QmpEvent> WaitForEvent(const std::function<bool(const QmpEvent&)>& predicate,
                                std::chrono::milliseconds timeout);

  // Drops all queued events.
  void ClearEvents();

  // OK while connected; the reason otherwise.
  Status status() const;

  // The QEMU version from the greeting, e.g. "7.2.22".
  const std::string& qemu_version() const { return qemu_version_; }
  int qemu_major() const { return qemu_major_; }
  int qemu_minor() const { return qemu_minor_; }

 private:
  struct Pending {
    bool done = false;
    bool qemu_error = false;  // `value` holds QEMU's "error" member
    Status status;
    nlohmann::json value;
  };

  QmpClient(int fd, QmpClientOptions options);
  Status ReadGreeting(std::chrono::steady_clock::time_point deadline);
  Result<std::string> ReadLineBlocking(std::chrono::steady_clock::time_point deadline);
  void ReaderLoop();
  void HandleMessage(const std::string& line);
  void Fail(Status status);
  Status SendAll(const std::string& bytes);

  // Constant after construction.
  const int fd_;
  const QmpClientOptions options_;
  std::string qemu_version_;
  int qemu_major_ = 0;
  int qemu_minor_ = 0;

  std::string read_buffer_;  // owned by the reader thread (or Connect before it starts)
  std::thread reader_;

  std::mutex write_mu_;  // serialises writes to fd_

  mutable std::mutex mu_;
  std::condition_variable cv_;
  Status dead_;                                           // GUARDED_BY(mu_)
  uint64_t next_id_ = 1;                                  // GUARDED_BY(mu_)
  std::map<uint64_t, std::shared_ptr<Pending>> pending_;  // GUARDED_BY(mu_)
  std::deque<QmpEvent> events_;                           // GUARDED_BY(mu_)
  EventCallback callback_;                                // GUARDED_BY(mu_)
};

// A disk image served by a QsdProcess.
struct QsdDisk {
  std::string name;              // [A-Za-z][A-Za-z0-9_]{0,25}: becomes the format node name
  std::string path;              // image file
  std::string format;            // "qcow2" or "raw"
  bool export_writable = false;  // also export it read-write over NBD as "<name>"
};

struct QsdOptions {
  std::string binary = "qemu-storage-daemon";
  // Directory for qmp.sock, nbd.sock and qsd.log (must exist; keep the path
  // short: unix socket paths are limited to 107 bytes).
  std::string run_dir;
  std::vector<QsdDisk> disks;
  // Start the NBD server on nbd.sock at launch (needed for export_writable).
  bool nbd_server = true;
  std::chrono::milliseconds start_timeout{10000};
};

// Owns one qemu-storage-daemon child process (not daemonized). The child gets
// SIGKILL if this process dies (PR_SET_PDEATHSIG).
//
// Thread safety: not thread-safe; one owner. The destructor kills the child
// if it still runs.
class QsdProcess {
 public:
  explicit QsdProcess(QsdOptions options);
  ~QsdProcess();
  QsdProcess(const QsdProcess&) = delete;
  QsdProcess& operator=(const QsdProcess&) = delete;

  // Starts the daemon and waits until its QMP monitor greets. InvalidArgument
  // for bad names/formats, FailedPrecondition when already running, IOError
  // when the child exits early (the message holds the end of its log),
  // Timeout when QMP does not answer within start_timeout.
  Status Start();
  // SIGTERM, wait up to `grace`, then SIGKILL. OK when not running.
  Status Stop(std::chrono::milliseconds grace = std::chrono::seconds(5));
  // SIGKILL and reap (simulates a crash). OK when not running.
  Status Kill();

  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  std::string qmp_socket() const { return options_.run_dir + "/qmp.sock"; }
  std::string nbd_socket() const { return options_.run_dir + "/nbd.sock"; }
  std::string log_path() const { return options_.run_dir + "/qsd.log"; }
  const QsdOptions& options() const { return options_; }

  // Node names (see the file comment).
  static std::string FormatNodeName(const std::string& disk) { return disk; }
  static std::string FileNodeName(const std::string& disk) { return disk + "-file"; }

 private:
  Status Reap(std::chrono::milliseconds wait);
  std::string LogTail() const;

  QsdOptions options_;
  pid_t pid_ = -1;
};

}  // namespace vmreplica
