// A tiny real Linux guest under QEMU (TCG) for end-to-end tests.
//
// The guest is Debian's cloud kernel with a busybox initramfs built by
// scripts/build-test-guest.sh (artifacts in GuestArtifactsDir()); its /init
// is tests/guest/init.sh. The host drives it over the serial console, a unix
// socket: each Run() sends one line "<id> <command>" and the guest answers
// "@@BEGIN <id>\n<output>\n@@END <id> <exit code>\n" (see init.sh).
//
// QEMU command line (run_dir holds every socket and log):
//   qemu-system-x86_64 -accel tcg -m N -nographic -nodefaults -no-reboot
//     -kernel vmlinuz -initrd initramfs.cpio.gz
//     -append "console=ttyS0 panic=-1 quiet vmr.disks=<n> [vmr.qga=1]"
//     -chardev socket,id=ser0,path=run_dir/serial.sock,server=on,wait=off,logfile=run_dir/serial.log
//     -serial chardev:ser0  -qmp unix:run_dir/qmp.sock,server=on,wait=off
//     per disk i: -blockdev file node "<node>-file" + format node "<node>"
//                 (node = node_name or "disk<i>"), or the given blockdev_json;
//                 -device virtio-blk-pci,drive=<node>   -> /dev/vda, /dev/vdb, ... in order
//     with guest_agent: -device virtio-serial -chardev socket,id=qga0,path=run_dir/qga.sock,...
//                       -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
//   QEMU's own stdout/stderr go to run_dir/qemu.log, the console to run_dir/serial.log.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "vmreplica/status.h"

namespace vmreplica::testing {

struct GuestDisk {
  std::string path{};            // image file
  std::string format = "qcow2";  // "qcow2" or "raw"
  std::string node_name{};       // format node name; "" = "disk<i>"
  bool read_only = false;
  // Optional: the whole -blockdev JSON object of the format node (e.g. a
  // qcow2 node over an NBD export) instead of path/format. Its "node-name"
  // is used for the device; when absent, node_name / "disk<i>" is filled in.
  std::string blockdev_json{};
};

struct GuestOptions {
  std::vector<GuestDisk> disks;
  // Existing directory for the sockets and logs (short: unix socket paths
  // are limited to 107 bytes; no commas).
  std::string run_dir;
  bool guest_agent = false;
  int memory_mib = 256;                 // 128 .. 4096
  std::vector<std::string> extra_args;  // appended to the QEMU command line
  std::string qemu_binary = "qemu-system-x86_64";
  // Boot deadline for Launch (TCG on a loaded machine is slow).
  std::chrono::seconds boot_timeout{120};
};

// One running guest. Not thread-safe: one owner drives it.
class TestGuest {
 public:
  // Starts QEMU and waits until the guest's command loop answers. IOError
  // when QEMU exits (the message holds the end of qemu.log / serial.log),
  // Timeout when the loop does not answer within boot_timeout,
  // FailedPrecondition when the artifacts are missing (CheckGuestArtifacts),
  // InvalidArgument for bad options.
  static Result<std::unique_ptr<TestGuest>> Launch(const GuestOptions& options);

  ~TestGuest();  // kills QEMU if it still runs
  TestGuest(const TestGuest&) = delete;
  TestGuest& operator=(const TestGuest&) = delete;

  // Runs `command` (one line, no '\n'/'\r', < 3500 bytes) with /bin/sh in the
  // guest; returns its exit code and combined stdout+stderr. Timeout when no
  // answer came in time (the command may still run; its late answer is
  // ignored), Unavailable when QEMU is gone.
  Result<std::pair<int, std::string>> Run(const std::string& command,
                                          std::chrono::seconds timeout = std::chrono::seconds(60));

  std::string qmp_socket() const { return run_dir_ + "/qmp.sock"; }
  std::string qga_socket() const { return guest_agent_ ? run_dir_ + "/qga.sock" : std::string(); }
  std::string serial_log() const { return run_dir_ + "/serial.log"; }
  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0; }

  // Asks the guest to sync and power off, waits for QEMU to exit. Timeout
  // (and QEMU is killed) when it does not exit in time.
  Status Shutdown(std::chrono::seconds timeout);
  // SIGKILL and reap. No-op when not running.
  void Kill();

 private:
  TestGuest(std::string run_dir, bool guest_agent, pid_t pid);
  Status ConnectSerial(std::chrono::steady_clock::time_point deadline);
  Status SendLine(const std::string& line);
  // Reads what the serial socket has, waiting up to `until`. Unavailable on EOF.
  Status ReadSome(std::chrono::steady_clock::time_point until);
  bool Exited();
  std::string Diagnostics() const;

  const std::string run_dir_;
  const bool guest_agent_;
  pid_t pid_;
  int serial_fd_ = -1;
  std::string buffer_;  // serial bytes not yet consumed
  uint64_t next_id_ = 1;
};

// $VMREPLICA_GUEST_DIR, or /var/cache/vmreplica/test-guest.
std::string GuestArtifactsDir();
// OK when vmlinuz and initramfs.cpio.gz exist in GuestArtifactsDir();
// FailedPrecondition naming the missing file and scripts/build-test-guest.sh.
Status CheckGuestArtifacts();

}  // namespace vmreplica::testing
