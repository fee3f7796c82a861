// The libvirt kind against a real libvirtd: a transient TCG domain with one
// qcow2 disk. When the tiny test guest is installed
// (/var/cache/vmreplica/test-guest/{vmlinuz,initramfs.cpio.gz}) the domain
// boots it and the guest writes with dd; otherwise the domain runs with no
// OS and nothing is written.
#include <gtest/gtest.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "qemu/qemu_test_util.h"
#include "vm/libvirtd_testing.h"
#include "vmreplica/nbd_reader.h"
#include "vmreplica/tracker.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica {
namespace {

using namespace std::chrono_literals;

constexpr const char* kUri = "qemu:///system";
constexpr const char* kGuestDir = "/var/cache/vmreplica/test-guest";

// The guest's serial console on a unix socket (protocol in tests/guest/init.sh).
class Serial {
 public:
  ~Serial() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool Connect(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof(a.sun_path), "%s", path.c_str());
    return ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  }
  // Sends "<id> <cmd>" and waits for "@@END <id> <rc>"; returns rc or -1.
  int Run(int id, const std::string& cmd, std::chrono::seconds timeout) {
    std::string line = std::to_string(id) + " " + cmd + "\n";
    if (::write(fd_, line.data(), line.size()) != static_cast<ssize_t>(line.size())) return -1;
    std::string marker = "@@END " + std::to_string(id) + " ";
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      auto pos = buffer_.find(marker);
      if (pos != std::string::npos) {
        auto eol = buffer_.find('\n', pos);
        if (eol != std::string::npos) {
          int rc = std::atoi(buffer_.c_str() + pos + marker.size());
          buffer_.erase(0, eol + 1);
          return rc;
        }
      }
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 200) > 0) {
        char b[4096];
        ssize_t n = ::read(fd_, b, sizeof(b));
        if (n <= 0) return -1;
        buffer_.append(b, static_cast<size_t>(n));
      }
    }
    return -1;
  }

 private:
  int fd_ = -1;
  std::string buffer_;
};

TEST(VmLibvirtTest, InspectAttachTrackAndCutATransientDomain) {
  std::string why = testutil::EnsureLibvirtd();
  ASSERT_TRUE(why.empty()) << "libvirt is required for this test: " << why;

  testutil::TempDir dir("vmlv");
  ::chmod(dir.path().c_str(), 0755);  // QEMU runs as another user and must reach the image
  std::string image = dir.path() + "/vda.qcow2";
  auto mk = testutil::Run("qemu-img create -q -f qcow2 " + image + " 64M");
  ASSERT_EQ(mk.exit_code, 0) << mk.output;
  std::string console = dir.path() + "/console.sock";
  const bool with_guest = std::filesystem::exists(std::string(kGuestDir) + "/vmlinuz") &&
                          std::filesystem::exists(std::string(kGuestDir) + "/initramfs.cpio.gz");
  const std::string name = "vmr-lv-" + std::to_string(::getpid());
  const std::string uuid = "6a1f0c3e-2b4d-4e5f-8a9b-" + [] {
    char b[13];
    std::snprintf(b, sizeof(b), "%012x", static_cast<unsigned>(::getpid()));
    return std::string(b);
  }();
  std::string os = "<os><type arch='x86_64' machine='pc'>hvm</type>";
  if (with_guest) {
    os += std::string("<kernel>") + kGuestDir + "/vmlinuz</kernel><initrd>" + kGuestDir +
          "/initramfs.cpio.gz</initrd><cmdline>console=ttyS0 panic=-1 vmr.disks=1</cmdline>";
  }
  os += "</os>";
  std::string xml = "<domain type='qemu'><name>" + name + "</name><uuid>" + uuid +
                    "</uuid><memory unit='MiB'>192</memory><vcpu>1</vcpu>" + os +
                    "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>"
                    "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
                    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='" +
                    image +
                    "'/><target dev='vda' bus='virtio'/></disk>"
                    "<serial type='unix'><source mode='bind' path='" +
                    console +
                    "'/><target port='0'/></serial>"
                    "<memballoon model='none'/></devices></domain>";

  virConnectPtr conn = virConnectOpen(kUri);
  ASSERT_NE(conn, nullptr);
  virDomainPtr dom = virDomainCreateXML(conn, xml.c_str(), 0);
  ASSERT_NE(dom, nullptr) << "virDomainCreateXML: " << (virGetLastError() ? virGetLastError()->message : "?");
  struct Cleanup {
    virConnectPtr conn;
    virDomainPtr dom;
    ~Cleanup() {
      virDomainDestroy(dom);
      virDomainFree(dom);
      virConnectClose(conn);
    }
  } cleanup{conn, dom};

  VmAddRequest req;
  req.kind = VmSourceKind::kLibvirt;
  req.libvirt_uri = kUri;
  req.libvirt_domain = name;
  auto def = InspectVm(req);
  ASSERT_TRUE(def.ok()) << def.status().ToString();
  EXPECT_EQ(def->name, name);
  EXPECT_EQ(def->uuid, uuid);
  EXPECT_EQ(def->memory_mib, 192u);
  EXPECT_EQ(def->vcpus, 1u);
  ASSERT_EQ(def->disks.size(), 1u);
  EXPECT_EQ(def->disks[0].name, "vda");
  EXPECT_EQ(def->disks[0].path, image);
  EXPECT_EQ(def->disks[0].format, "qcow2");
  EXPECT_EQ(def->disks[0].size_bytes, 64u << 20);
  EXPECT_FALSE(def->disks[0].node_name.empty());
  EXPECT_NE(def->libvirt_xml.find("<name>" + name + "</name>"), std::string::npos);
  auto round = VmDefinition::FromJson(def->ToJson());
  ASSERT_TRUE(round.ok()) << round.status().ToString();

  VmAddRequest missing = req;
  missing.libvirt_domain = name + "-missing";
  EXPECT_EQ(InspectVm(missing).status().code(), Code::kNotFound);

  testutil::TempDir run("vmlvrun");
  auto vm = AttachVm(*def, run.path());
  ASSERT_TRUE(vm.ok()) << vm.status().ToString();
  TrackerOptions to;
  to.nbd_socket = (*vm)->nbd_socket();
  ChangeTracker tracker((*vm)->qmp(), "rel-lv", (*vm)->tracked_disks(), to);
  Status enabled = tracker.Enable();
  ASSERT_TRUE(enabled.ok()) << enabled.ToString();

  bool wrote = false;
  if (with_guest) {
    Serial serial;
    ASSERT_TRUE(serial.Connect(console)) << console;
    // The guest answers once its console loop runs.
    int ready = -1;
    auto deadline = std::chrono::steady_clock::now() + 180s;
    for (int id = 1; ready != 0 && std::chrono::steady_clock::now() < deadline; ++id) {
      ready = serial.Run(id, "true", 5s);
    }
    ASSERT_EQ(ready, 0) << "the test guest did not answer on its serial console";
    // 64 KiB of 'Z' at 3 MiB, written by the guest through its virtio disk.
    ASSERT_EQ(serial.Run(1000,
                         "dd if=/dev/zero bs=65536 count=1 2>/dev/null | tr '\\000' 'Z' | "
                         "dd of=/dev/vda bs=65536 seek=48 conv=fsync",
                         60s),
              0);
    wrote = true;
  }
  std::cout << (wrote ? "the test guest wrote 64 KiB at 3 MiB\n" : "no test guest installed: the domain runs no OS\n");

  auto cut = tracker.TakeCut((*vm)->export_dir());
  ASSERT_TRUE(cut.ok()) << cut.status().ToString();
  ASSERT_EQ(cut->disks.size(), 1u);
  auto reader =
      NbdDeltaReader::Open(cut->disks[0].socket_path, cut->disks[0].export_name, 0, cut->disks[0].bitmap_context);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  uint64_t data_bytes = 0;
  bool covers = false;
  for (;;) {
    auto r = (*reader)->Next();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    if (!r->has_value()) break;
    if (!(*r)->zero) data_bytes += (*r)->length;
    const uint64_t at = 3u * 1048576;
    if ((*r)->offset <= at && (*r)->offset + (*r)->length >= at + 65536 && !(*r)->zero) {
      covers = (*r)->data.compare(at - (*r)->offset, 65536, std::string(65536, 'Z')) == 0;
    }
  }
  reader->reset();
  if (wrote) {
    EXPECT_TRUE(covers) << "the guest's 64 KiB of 'Z' at 3 MiB are not in the cut";
  } else {
    EXPECT_EQ(data_bytes, 0u) << "nothing was written, yet the cut carries data";
  }
  Status committed = tracker.Commit(*cut);
  EXPECT_TRUE(committed.ok()) << committed.ToString();
}

}  // namespace
}  // namespace vmreplica
