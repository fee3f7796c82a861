// Tests only: a libvirtd on qemu:///system for tests that run libvirt
// domains. Reuses a running one, else starts virtlogd and libvirtd as
// shared/notes/environment.md describes (no systemd here). The daemons are
// left running: tests of one ctest run share them, and one test stopping
// libvirtd under another would fail it.
#pragma once

#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

#include <chrono>
#include <string>
#include <thread>

#include "qemu/qemu_test_util.h"

namespace vmreplica::testutil {

inline bool LibvirtAnswers(const char* uri = "qemu:///system") {
  virSetErrorFunc(nullptr, [](void*, virErrorPtr) {});
  virConnectPtr c = virConnectOpen(uri);
  if (c == nullptr) return false;
  virConnectClose(c);
  return true;
}

// Empty string when libvirt answers on qemu:///system, else why not.
inline std::string EnsureLibvirtd() {
  using namespace std::chrono_literals;
  // Debian's udev rule makes /dev/kvm root:kvm 0660 and libvirt's QEMU user
  // is in group kvm. Without udev (containers) the node may be 0600: libvirt
  // then finds its cached QEMU capabilities (probed as root, with KVM)
  // invalid for its QEMU user and probes QEMU again at every domain start,
  // about 50 s each time here.
  Run("getent group kvm || groupadd -r kvm; if [ -c /dev/kvm ]; then chgrp kvm /dev/kvm && chmod 0660 /dev/kvm; fi");
  if (LibvirtAnswers()) return "";
  for (const char* tool : {"libvirtd", "virtlogd"}) {
    if (Run(std::string("command -v ") + tool).exit_code != 0) {
      return std::string(tool) + " is missing (packages libvirt-daemon libvirt-daemon-driver-qemu)";
    }
  }
  Run("getent group kvm || groupadd -r kvm; getent group libvirt-qemu || groupadd -r libvirt-qemu; "
      "id libvirt-qemu || useradd -r -g libvirt-qemu -G kvm libvirt-qemu; "
      "mkdir -p /var/log/libvirt /var/run/libvirt");
  // Another test may be starting them at the same moment: a failed start
  // is only an error when libvirt then does not answer.
  std::string why;
  if (Run("pgrep -x virtlogd").exit_code != 0) {
    auto r = Run("virtlogd -d");
    if (r.exit_code != 0) why += "virtlogd -d: " + r.output + " ";
  }
  if (Run("pgrep -x libvirtd").exit_code != 0) {
    auto r = Run("libvirtd -d");
    if (r.exit_code != 0) why += "libvirtd -d: " + r.output;
  }
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (!LibvirtAnswers()) {
    if (std::chrono::steady_clock::now() > deadline) return "libvirtd did not answer on qemu:///system " + why;
    std::this_thread::sleep_for(100ms);  // polling a condition (the socket answering)
  }
  return "";
}

}  // namespace vmreplica::testutil
