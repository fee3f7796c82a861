// The serial command loop of the tiny test guest (see test_guest.h and
// init.sh) for a guest whose QEMU someone else started, e.g. VmLauncher:
// connect to the serial console socket and run commands.
//
// Such a QEMU must boot GuestArtifactsDir()/vmlinuz with its
// initramfs.cpio.gz, GuestKernelAppend(n) as the kernel command line, and its
// first serial port on a unix socket server (wait=off).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "vmreplica/status.h"

namespace vmreplica::testing {

// "console=ttyS0 panic=-1 quiet vmr.disks=<disks>": what init.sh expects
// (it waits for `disks` virtio disks before it answers).
std::string GuestKernelAppend(int disks);

// One console connection. Not thread-safe: one owner drives it.
class GuestConsole {
 public:
  // Connects to `serial_socket` and waits until the guest's command loop
  // answers. Timeout when it does not within `timeout`, Unavailable when
  // the console closes (QEMU ended).
  static Result<std::unique_ptr<GuestConsole>> Connect(const std::string& serial_socket,
                                                       std::chrono::seconds timeout = std::chrono::seconds(120));
  ~GuestConsole();  // closes the connection (the guest keeps running)
  GuestConsole(const GuestConsole&) = delete;
  GuestConsole& operator=(const GuestConsole&) = delete;

  // As TestGuest::Run: one line, exit code and combined output.
  Result<std::pair<int, std::string>> Run(const std::string& command,
                                          std::chrono::seconds timeout = std::chrono::seconds(60));
  // Asks the guest to sync and power off; does not wait for QEMU.
  Status PowerOff();

 private:
  explicit GuestConsole(int fd) : fd_(fd) {}
  Status SendLine(const std::string& line);
  Status ReadSome(std::chrono::steady_clock::time_point until);

  int fd_;
  std::string buffer_;
  uint64_t next_id_ = 1;
};

}  // namespace vmreplica::testing
