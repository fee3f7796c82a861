// VmLauncher and OverlayDeltaSource with the tiny test guest (tests/guest)
// under real QEMU: disks are qcow2 overlays backed by a qemu-storage-daemon
// NBD export of a raw base file; the guest reads the base and writes through
// the overlay; the base never changes and the overlay yields exactly what the
// guest wrote. Also: networks (none / isolated), Adopt after the launcher is
// gone, and a cloud-init seed attached as a second disk.
#include "vmreplica/vm_launcher.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "guest/guest_console.h"
#include "guest/test_guest.h"
#include "vmreplica/cloud_init.h"
#include "vmreplica/nbd_reader.h"
#include "vmreplica/qmp.h"

namespace vmreplica {
namespace {

using namespace std::chrono_literals;
using testing::GuestConsole;

constexpr uint64_t kDiskSize = 8u << 20;
constexpr uint64_t k64K = 64u << 10;

struct TempDir {
  TempDir() {
    std::string t = "/tmp/vmr-l-XXXXXX";  // short: unix socket paths live below
    if (::mkdtemp(t.data()) != nullptr) path = t;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string path;
};

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string Sha256Hex(const std::string& data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

std::pair<int, std::string> Shell(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return {-1, ""};
  char buf[4096];
  size_t n = 0;
  while ((n = ::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int st = ::pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, out};
}

// The base disk's bytes: every 4 KiB block differs (its index and a
// position-dependent byte), so a misplaced read or write shows.
std::string BaseBytes() {
  std::string b(kDiskSize, '\0');
  for (uint64_t i = 0; i < kDiskSize; ++i) {
    b[i] = static_cast<char>((i * 131 + (i >> 12) * 7 + 3) & 0xff);
  }
  return b;
}

bool ProcessExists(pid_t pid) { return std::filesystem::exists("/proc/" + std::to_string(pid)); }

std::vector<std::string> DirEntries(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> Cmdline(pid_t pid) {
  std::string raw = ReadAll("/proc/" + std::to_string(pid) + "/cmdline");
  std::vector<std::string> out;
  size_t at = 0;
  while (at < raw.size()) {
    size_t end = raw.find('\0', at);
    if (end == std::string::npos) end = raw.size();
    out.push_back(raw.substr(at, end - at));
    at = end + 1;
  }
  return out;
}

class LauncherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Status artifacts = testing::CheckGuestArtifacts();
    ASSERT_TRUE(artifacts.ok()) << artifacts.ToString();
    for (const char* tool : {"qemu-system-x86_64", "qemu-img", "qemu-storage-daemon"}) {
      ASSERT_EQ(Shell(std::string("command -v ") + tool + " >/dev/null").first, 0) << tool << " is required";
    }
    ASSERT_FALSE(dir_.path.empty());
    base_path_ = dir_.path + "/base.raw";
    base_ = BaseBytes();
    std::ofstream(base_path_, std::ios::binary).write(base_.data(), static_cast<std::streamsize>(base_.size()));
    std::filesystem::create_directories(dir_.path + "/qsd");
    std::filesystem::create_directories(run_dir());

    // A read-only NBD view of the base, as the replica's point exports are.
    QsdOptions qo;
    qo.run_dir = dir_.path + "/qsd";
    qo.disks = {QsdDisk{"base", base_path_, "raw", false}};
    qsd_ = std::make_unique<QsdProcess>(qo);
    Status s = qsd_->Start();
    ASSERT_TRUE(s.ok()) << s.ToString();
    auto qmp = QmpClient::Connect(qsd_->qmp_socket());
    ASSERT_TRUE(qmp.ok()) << qmp.status().ToString();
    auto r = (*qmp)->Execute(
        "block-export-add",
        {{"type", "nbd"}, {"id", "base-exp"}, {"node-name", "base"}, {"name", "base"}, {"writable", false}});
    ASSERT_TRUE(r.ok()) << r.status().ToString();
  }

  void TearDown() override {
    // A failed test must not leave a QEMU behind.
    for (auto* l : {&vm_, &adopted_}) {
      if (*l && (*l)->IsRunning()) (*l)->Stop(0ms).IgnoreError();
    }
    // Also one whose launcher object the test dropped.
    auto left = VmLauncher::Adopt(run_dir());
    if (left.ok() && (*left)->IsRunning()) (*left)->Stop(0ms).IgnoreError();
  }

  std::string run_dir() const { return dir_.path + "/run"; }
  std::string nbd_uri() const { return "nbd+unix:///base?socket=" + qsd_->nbd_socket(); }

  VmDefinition Definition(size_t nics = 0) const {
    VmDefinition d;
    d.name = "guest-a";
    d.uuid = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";
    d.memory_mib = 256;
    d.vcpus = 1;
    d.disks = {VmDiskSpec{"vda", "vda", base_path_, "raw", kDiskSize}};
    for (size_t i = 0; i < nics; ++i) {
      char mac[18];
      std::snprintf(mac, sizeof(mac), "52:54:00:12:34:%02zx", 0x50 + i);
      d.nics.push_back(VmNicSpec{mac, "virtio", "lan"});
    }
    return d;
  }

  VmLaunchSpec Spec(size_t nics = 0, int extra_disks = 0) const {
    VmLaunchSpec s;
    s.definition = Definition(nics);
    s.run_dir = run_dir();
    VmLaunchDisk disk;
    disk.backing = nbd_uri();
    disk.size_bytes = kDiskSize;
    s.disks = {disk};
    s.kernel_boot =
        VmKernelBoot{testing::GuestArtifactsDir() + "/vmlinuz", testing::GuestArtifactsDir() + "/initramfs.cpio.gz",
                     testing::GuestKernelAppend(1 + extra_disks)};
    s.start_timeout = 120s;
    return s;
  }

  // Runs a guest command that must succeed; answers its output.
  std::string MustRun(GuestConsole& c, const std::string& cmd) {
    auto r = c.Run(cmd, 120s);
    EXPECT_TRUE(r.ok()) << cmd << ": " << r.status().ToString();
    if (!r.ok()) return "";
    EXPECT_EQ(r->first, 0) << cmd << ": " << r->second;
    return r->second;
  }

  TempDir dir_;
  std::string base_path_;
  std::string base_;
  std::unique_ptr<QsdProcess> qsd_;
  std::unique_ptr<VmLauncher> vm_;
  std::unique_ptr<VmLauncher> adopted_;
};

TEST_F(LauncherTest, GuestReadsTheBaseAndItsWritesStayInTheOverlay) {
  auto vm = VmLauncher::Start(Spec());
  ASSERT_TRUE(vm.ok()) << vm.status().ToString();
  vm_ = std::move(*vm);
  EXPECT_TRUE(vm_->IsRunning());
  EXPECT_EQ(vm_->accel() == VmAccel::kKvm, ProbeKvm().ok()) << ProbeKvm().ToString();
  std::printf("accelerator: %s (KVM probe: %s)\n", VmAccelName(vm_->accel()), ProbeKvm().ToString().c_str());
  ASSERT_EQ(vm_->overlays().size(), 1u);
  auto info = Shell("qemu-img info --force-share --output=json " + vm_->overlays()[0]);
  EXPECT_NE(info.second.find("\"backing-filename\": \"" + nbd_uri() + "\""), std::string::npos) << info.second;
  {
    auto qmp = QmpClient::Connect(vm_->qmp_socket());
    ASSERT_TRUE(qmp.ok()) << qmp.status().ToString();
    auto name = (*qmp)->Execute("query-name");
    ASSERT_TRUE(name.ok());
    EXPECT_EQ((*name)["name"], "guest-a");
    auto uuid = (*qmp)->Execute("query-uuid");
    ASSERT_TRUE(uuid.ok());
    EXPECT_EQ((*uuid)["UUID"], "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b");
  }
  auto console = GuestConsole::Connect(vm_->serial_socket());
  ASSERT_TRUE(console.ok()) << console.status().ToString() << "\n" << ReadAll(vm_->serial_log());
  GuestConsole& c = **console;

  // The guest sees the base through the NBD view.
  EXPECT_EQ(MustRun(c, "cat /sys/block/vda/size"), std::to_string(kDiskSize / 512) + "\n");
  EXPECT_EQ(MustRun(c, "dd if=/dev/vda bs=65536 skip=5 count=3 2>/dev/null | sha256sum"),
            Sha256Hex(base_.substr(5 * k64K, 3 * k64K)) + "  -\n");
  // Writes: the base's first 128 KiB copied to 2 MiB, 64 KiB of zeros at
  // 3 MiB, each flushed to the disk.
  MustRun(c, "dd if=/dev/vda of=/dev/vda bs=65536 skip=0 seek=32 count=2 conv=notrunc,fsync 2>/dev/null");
  MustRun(c, "dd if=/dev/zero of=/dev/vda bs=65536 seek=48 count=1 conv=notrunc,fsync 2>/dev/null && sync");
  EXPECT_EQ(MustRun(c,
                    "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=65536 skip=32 count=2 2>/dev/null | "
                    "sha256sum"),
            Sha256Hex(base_.substr(0, 2 * k64K)) + "  -\n");

  // Not while the VM runs.
  EXPECT_EQ(vm_->OpenWrites().status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(OverlayDeltaSource::Open(vm_->overlays()).status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(vm_->DropOverlays().code(), Code::kFailedPrecondition);

  console->reset();
  const pid_t pid = vm_->pid();
  // The guest ignores the ACPI button: quit follows the grace period.
  Status st = vm_->Stop(1s);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_FALSE(vm_->IsRunning());
  EXPECT_FALSE(ProcessExists(pid));
  EXPECT_TRUE(ReadAll(base_path_) == base_) << "the base file changed";

  auto src = vm_->OpenWrites();
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  // Rebuild what the overlay holds: data extents coalesced, zero extents
  // (or data that is all zeros) as zeros.
  std::map<uint64_t, std::string> data;  // offset -> bytes
  uint64_t zero_bytes = 0;
  for (;;) {
    auto rec = (*src)->Next();
    ASSERT_TRUE(rec.ok()) << rec.status().ToString();
    if (!rec->has_value()) break;
    const DeltaRecord& r = **rec;
    EXPECT_EQ(r.disk, 0u);
    if (r.zero) {
      EXPECT_EQ(r.data.size(), 0u);
      data[r.offset] = std::string(r.length, '\0');
      zero_bytes += r.length;
    } else {
      EXPECT_EQ(r.data.size(), r.length);
      data[r.offset] = r.data;
    }
  }
  std::vector<std::pair<uint64_t, std::string>> runs;
  for (auto& [off, bytes] : data) {
    if (!runs.empty() && runs.back().first + runs.back().second.size() == off) {
      runs.back().second += bytes;
    } else {
      runs.emplace_back(off, bytes);
    }
  }
  ASSERT_EQ(runs.size(), 2u) << "the overlay holds other ranges than the two written";
  EXPECT_EQ(runs[0].first, 2u << 20);
  EXPECT_TRUE(runs[0].second == base_.substr(0, 2 * k64K)) << "bytes at 2 MiB differ";
  EXPECT_EQ(runs[1].first, 3u << 20);
  EXPECT_TRUE(runs[1].second == std::string(k64K, '\0')) << "bytes at 3 MiB are not zeros";
  const OverlayDeltaStats& stats = (*src)->stats();
  EXPECT_EQ(stats.data_bytes + stats.zero_bytes, 3 * k64K);
  EXPECT_EQ(stats.zero_bytes, zero_bytes);
  EXPECT_GE(stats.data_bytes, 2 * k64K);  // the copied range is read from the file
  std::printf("overlay delta: %llu data bytes read, %llu zero bytes\n",
              static_cast<unsigned long long>(stats.data_bytes), static_cast<unsigned long long>(stats.zero_bytes));
  src->reset();

  ASSERT_TRUE(vm_->DropOverlays().ok());
  EXPECT_EQ(DirEntries(run_dir()), std::vector<std::string>{});
}

TEST_F(LauncherTest, ReconnectingBackingSurvivesARestartOfTheNbdServer) {
  VmLaunchSpec spec = Spec();
  spec.disks[0].nbd_reconnect_delay_s = 60;
  auto vm = VmLauncher::Start(spec);
  ASSERT_TRUE(vm.ok()) << vm.status().ToString();
  vm_ = std::move(*vm);
  auto info = Shell("qemu-img info --force-share " + vm_->overlays()[0]);
  EXPECT_NE(info.second.find("\"reconnect-delay\":60"), std::string::npos) << info.second;
  EXPECT_NE(info.second.find("backing file format: nbd"), std::string::npos) << info.second;
  auto console = GuestConsole::Connect(vm_->serial_socket());
  ASSERT_TRUE(console.ok()) << console.status().ToString();
  EXPECT_EQ(MustRun(**console, "dd if=/dev/vda bs=65536 skip=1 count=1 2>/dev/null | sha256sum"),
            Sha256Hex(base_.substr(k64K, k64K)) + "  -\n");

  // The server that serves the view goes away and comes back on the same
  // socket (as the daemon's point exports do across a restart).
  ASSERT_TRUE(qsd_->Stop().ok());
  Status s = qsd_->Start();
  ASSERT_TRUE(s.ok()) << s.ToString();
  {
    auto qmp = QmpClient::Connect(qsd_->qmp_socket());
    ASSERT_TRUE(qmp.ok());
    auto r = (*qmp)->Execute(
        "block-export-add",
        {{"type", "nbd"}, {"id", "base-exp"}, {"node-name", "base"}, {"name", "base"}, {"writable", false}});
    ASSERT_TRUE(r.ok()) << r.status().ToString();
  }
  // Data the guest has not read yet comes through the new connection.
  EXPECT_EQ(MustRun(**console,
                    "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=65536 skip=100 count=4 "
                    "2>/dev/null | sha256sum"),
            Sha256Hex(base_.substr(100 * k64K, 4 * k64K)) + "  -\n");
  console->reset();
  ASSERT_TRUE(vm_->Stop(0ms).ok());
  ASSERT_TRUE(vm_->DropOverlays().ok());
}

TEST_F(LauncherTest, NetworkNoneGivesTheGuestNoNic) {
  VmLaunchSpec spec = Spec(/*nics=*/2);
  spec.network = VmNetworkMode::kNone;
  auto vm = VmLauncher::Start(spec);
  ASSERT_TRUE(vm.ok()) << vm.status().ToString();
  vm_ = std::move(*vm);
  auto args = Cmdline(vm_->pid());
  for (const auto& a : args) {
    EXPECT_NE(a, "-netdev");
    EXPECT_NE(a, "-net");
  }
  auto console = GuestConsole::Connect(vm_->serial_socket());
  ASSERT_TRUE(console.ok()) << console.status().ToString();
  // PCI class 0x02xxxx: network controllers.
  EXPECT_EQ(MustRun(**console, "cat /sys/bus/pci/devices/*/class | grep -c '^0x02' || true"), "0\n");
  console->reset();
  ASSERT_TRUE(vm_->Stop(0ms).ok());
  ASSERT_TRUE(vm_->DropOverlays().ok());
}

TEST_F(LauncherTest, IsolatedNetworkGivesNicsWithTheirMacsAndNoUplink) {
  VmLaunchSpec spec = Spec(/*nics=*/2);
  spec.network = VmNetworkMode::kIsolated;
  auto vm = VmLauncher::Start(spec);
  ASSERT_TRUE(vm.ok()) << vm.status().ToString();
  vm_ = std::move(*vm);

  // The command line: every netdev is a hub port, each on its own hub.
  auto args = Cmdline(vm_->pid());
  std::vector<std::string> netdevs;
  for (size_t i = 0; i + 1 < args.size(); ++i) {
    if (args[i] == "-netdev" || args[i] == "-net" || args[i] == "-nic") netdevs.push_back(args[i + 1]);
  }
  ASSERT_EQ(netdevs.size(), 2u);
  EXPECT_EQ(netdevs[0].rfind("hubport,", 0), 0u) << netdevs[0];
  EXPECT_EQ(netdevs[1].rfind("hubport,", 0), 0u) << netdevs[1];
  EXPECT_NE(netdevs[0].find("hubid=0"), std::string::npos);
  EXPECT_NE(netdevs[1].find("hubid=1"), std::string::npos);
  {
    // QEMU's own view: two NICs with the stored MACs, each hub with one port.
    auto qmp = QmpClient::Connect(vm_->qmp_socket());
    ASSERT_TRUE(qmp.ok());
    auto r = (*qmp)->Execute("human-monitor-command", {{"command-line", "info network"}});
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    const std::string net = r->get<std::string>();
    EXPECT_NE(net.find("macaddr=52:54:00:12:34:50"), std::string::npos) << net;
    EXPECT_NE(net.find("macaddr=52:54:00:12:34:51"), std::string::npos) << net;
    for (const char* uplink : {"type=user", "type=tap", "type=socket", "type=bridge", "type=vde", "type=stream",
                               "type=dgram", "type=l2tpv3", "type=vhost-user"}) {
      EXPECT_EQ(net.find(uplink), std::string::npos) << uplink << " in\n" << net;
    }
  }
  auto console = GuestConsole::Connect(vm_->serial_socket());
  ASSERT_TRUE(console.ok()) << console.status().ToString();
  EXPECT_EQ(MustRun(**console, "cat /sys/bus/pci/devices/*/class | grep -c '^0x0200'"), "2\n");
  // virtio-net (vendor 0x1af4, device 0x1000).
  EXPECT_EQ(MustRun(**console,
                    "for d in /sys/bus/pci/devices/*; do grep -q '^0x0200' $d/class && "
                    "echo $(cat $d/vendor) $(cat $d/device); done"),
            "0x1af4 0x1000\n0x1af4 0x1000\n");
  console->reset();
  ASSERT_TRUE(vm_->Stop(0ms).ok());
  ASSERT_TRUE(vm_->DropOverlays().ok());
}

TEST_F(LauncherTest, AdoptFindsTheVmAfterTheLauncherIsGoneAndStopLeavesNothing) {
  VmLaunchSpec spec = Spec();
  spec.name_override = "guest-a - Test";
  spec.uuid_override = "00000000-1111-4222-8333-444444444444";
  auto vm = VmLauncher::Start(spec);
  ASSERT_TRUE(vm.ok()) << vm.status().ToString();
  const pid_t pid = (*vm)->pid();
  const VmAccel accel = (*vm)->accel();
  {
    auto console = GuestConsole::Connect((*vm)->serial_socket());
    ASSERT_TRUE(console.ok()) << console.status().ToString();
    MustRun(**console, "echo before-adopt > /tmp/marker");
  }
  vm.value().reset();  // the daemon "restarts": the object is gone, the VM is not
  ASSERT_TRUE(ProcessExists(pid));

  // A second start in the same run dir is refused.
  EXPECT_EQ(VmLauncher::Start(spec).status().code(), Code::kAlreadyExists);

  auto adopted = VmLauncher::Adopt(run_dir());
  ASSERT_TRUE(adopted.ok()) << adopted.status().ToString();
  adopted_ = std::move(*adopted);
  EXPECT_TRUE(adopted_->IsRunning());
  EXPECT_EQ(adopted_->pid(), pid);
  EXPECT_EQ(adopted_->accel(), accel);
  EXPECT_EQ(adopted_->name(), "guest-a - Test");
  EXPECT_EQ(adopted_->uuid(), "00000000-1111-4222-8333-444444444444");
  {
    auto qmp = QmpClient::Connect(adopted_->qmp_socket());
    ASSERT_TRUE(qmp.ok());
    auto name = (*qmp)->Execute("query-name");
    ASSERT_TRUE(name.ok());
    EXPECT_EQ((*name)["name"], "guest-a - Test");
  }
  {
    // The same guest, still running: its tmpfs kept the marker.
    auto console = GuestConsole::Connect(adopted_->serial_socket());
    ASSERT_TRUE(console.ok()) << console.status().ToString();
    EXPECT_EQ(MustRun(**console, "cat /tmp/marker"), "before-adopt\n");
  }
  Status st = adopted_->Stop(0ms);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_FALSE(adopted_->IsRunning());
  // Gone, and reaped (this test process is QEMU's parent here).
  EXPECT_FALSE(ProcessExists(pid));
  ASSERT_TRUE(adopted_->DropOverlays().ok());
  EXPECT_EQ(DirEntries(run_dir()), std::vector<std::string>{});
  EXPECT_EQ(VmLauncher::Adopt(run_dir()).status().code(), Code::kNotFound);
}

TEST_F(LauncherTest, AdoptNoticesAVmThatDiedAndItsFilesCanBeDropped) {
  auto vm = VmLauncher::Start(Spec());
  ASSERT_TRUE(vm.ok()) << vm.status().ToString();
  const pid_t pid = (*vm)->pid();
  vm.value().reset();
  // QEMU crashes while no launcher looks.
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  int ws = 0;
  ASSERT_EQ(::waitpid(pid, &ws, 0), pid);
  auto adopted = VmLauncher::Adopt(run_dir());
  ASSERT_TRUE(adopted.ok()) << adopted.status().ToString();
  EXPECT_FALSE((*adopted)->IsRunning());
  EXPECT_TRUE((*adopted)->Stop(0ms).ok());
  ASSERT_TRUE((*adopted)->DropOverlays().ok());
  EXPECT_EQ(DirEntries(run_dir()), std::vector<std::string>{});
}

TEST_F(LauncherTest, CloudInitSeedShowsUpAsASecondDiskInTheGuest) {
  ASSERT_EQ(Shell("command -v isoinfo >/dev/null").first, 0) << "isoinfo (package genisoimage) is required";
  NoCloudSeed seed;
  seed.instance_id = "iid-guest-a-failover-1";
  seed.local_hostname = "guest-a";
  FailoverNetworkAdapterSettings nic;
  nic.adapter = "52:54:00:12:34:50";
  nic.ip_addresses = {"198.51.100.7"};
  nic.subnets = {"255.255.255.0"};
  nic.default_gateways = {"198.51.100.1"};
  nic.dns_servers = {"198.51.100.53"};
  seed.network = {nic};
  const std::string iso = dir_.path + "/seed.iso";
  Status s = WriteNoCloudSeedImage(seed, iso);
  ASSERT_TRUE(s.ok()) << s.ToString();
  const uint64_t iso_size = std::filesystem::file_size(iso);

  // Where network-config sits in the image: "[ <extent> <flags>]" in isoinfo -l.
  auto listing = Shell("isoinfo -J -l -i " + iso);
  ASSERT_EQ(listing.first, 0);
  uint64_t extent = 0, size = 0;
  {
    std::istringstream in(listing.second);
    std::string line;
    while (std::getline(in, line)) {
      if (line.find("]  network-config") == std::string::npos) continue;
      size_t lb = line.find('[');
      ASSERT_NE(lb, std::string::npos) << line;
      extent = std::stoull(line.substr(lb + 1));
      std::istringstream fields(line.substr(0, lb));
      std::string f;
      std::vector<std::string> v;
      while (fields >> f) v.push_back(f);
      ASSERT_GE(v.size(), 5u) << line;
      size = std::stoull(v[4]);  // mode, links, uid, gid, size
    }
  }
  ASSERT_GT(extent, 0u) << listing.second;
  auto expected = RenderNetworkConfigV2(seed.network);
  ASSERT_TRUE(expected.ok());
  ASSERT_EQ(size, expected->size());

  VmLaunchSpec spec = Spec(/*nics=*/1, /*extra_disks=*/1);
  spec.network = VmNetworkMode::kIsolated;
  spec.extra_drives = {VmExtraDrive{iso, "raw"}};
  auto vm = VmLauncher::Start(spec);
  ASSERT_TRUE(vm.ok()) << vm.status().ToString();
  vm_ = std::move(*vm);
  auto console = GuestConsole::Connect(vm_->serial_socket());
  ASSERT_TRUE(console.ok()) << console.status().ToString();
  GuestConsole& c = **console;
  EXPECT_EQ(MustRun(c, "cat /sys/block/vdb/size"), std::to_string(iso_size / 512) + "\n");
  EXPECT_EQ(MustRun(c, "cat /sys/block/vdb/ro"), "1\n");
  // The primary volume descriptor's volume id (sector 16, byte 40).
  EXPECT_EQ(MustRun(c, "dd if=/dev/vdb bs=1 skip=32808 count=6 2>/dev/null"), "cidata");
  EXPECT_EQ(MustRun(c, "dd if=/dev/vdb bs=2048 skip=" + std::to_string(extent) + " count=" +
                           std::to_string((size + 2047) / 2048) + " 2>/dev/null | head -c " + std::to_string(size)),
            *expected);
  EXPECT_NE(MustRun(c, "echo x > /dev/vdb 2>&1; echo rc=$?"), "rc=0\n");  // read-only
  console->reset();
  ASSERT_TRUE(vm_->Stop(0ms).ok());
  ASSERT_TRUE(vm_->DropOverlays().ok());
  EXPECT_EQ(DirEntries(run_dir()), std::vector<std::string>{});
  EXPECT_TRUE(std::filesystem::exists(iso));  // not the launcher's file
}

// A committed failover VM runs on disk wrappers of the store's files: no
// overlay, QEMU opens the wrapper itself (node vmr-commit-<disk>), the
// guest's writes land in the raw file and the wrapper's persistent bitmap
// records exactly them across QEMU's exit.
TEST_F(LauncherTest, DirectWrapperDiskWritesLandInTheRawFileAndItsBitmap) {
  const std::string raw = dir_.path + "/store.img";
  std::ofstream(raw, std::ios::binary).write(base_.data(), static_cast<std::streamsize>(base_.size()));
  std::filesystem::create_directories(dir_.path + "/wrappers");
  const std::string wrapper = dir_.path + "/wrappers/vda.qcow2";
  const std::string bitmap = "vmr-vm-g1";
  Status made = MakeDiskWrapper(raw, wrapper, kDiskSize, bitmap);
  ASSERT_TRUE(made.ok()) << made.ToString();

  VmLaunchSpec spec = Spec();
  spec.disks[0] = VmLaunchDisk{};
  spec.disks[0].size_bytes = kDiskSize;
  spec.disks[0].direct_image = wrapper;
  auto vm = VmLauncher::Start(spec);
  ASSERT_TRUE(vm.ok()) << vm.status().ToString();
  vm_ = std::move(*vm);
  EXPECT_TRUE(vm_->overlays().empty());
  EXPECT_EQ(vm_->direct_images(), std::vector<std::string>{wrapper});
  for (const auto& name : DirEntries(run_dir())) EXPECT_EQ(name.find(".qcow2"), std::string::npos) << name;
  // QEMU's command line opens the wrapper under the commit node name.
  {
    auto args = Cmdline(vm_->pid());
    bool blockdev = false, device = false;
    for (size_t i = 0; i + 1 < args.size(); ++i) {
      if (args[i] == "-blockdev") {
        auto j = nlohmann::json::parse(args[i + 1], nullptr, false);
        if (j.is_object() && j["node-name"] == "vmr-commit-vda") {
          blockdev = true;
          EXPECT_EQ(j["driver"], "qcow2");
          EXPECT_EQ(j["file"]["filename"], wrapper);
        }
      }
      if (args[i] == "-device" && args[i + 1].rfind("virtio-blk-pci,drive=vmr-commit-vda,id=vmr-disk0,", 0) == 0) {
        device = true;
      }
    }
    EXPECT_TRUE(blockdev && device);
  }
  {
    auto console = GuestConsole::Connect(vm_->serial_socket());
    ASSERT_TRUE(console.ok()) << console.status().ToString() << "\n" << ReadAll(vm_->serial_log());
    GuestConsole& c = **console;
    EXPECT_EQ(MustRun(c, "dd if=/dev/vda bs=65536 skip=5 count=3 2>/dev/null | sha256sum"),
              Sha256Hex(base_.substr(5 * k64K, 3 * k64K)) + "  -\n");
    MustRun(c, "dd if=/dev/vda of=/dev/vda bs=65536 skip=0 seek=32 count=2 conv=notrunc,fsync 2>/dev/null");
    MustRun(c, "dd if=/dev/zero of=/dev/vda bs=65536 seek=48 count=1 conv=notrunc,fsync 2>/dev/null && sync");
  }
  EXPECT_EQ(vm_->OpenWrites().status().code(), Code::kFailedPrecondition);
  // The state names the wrapper: a restarted daemon finds it.
  {
    auto adopted = VmLauncher::Adopt(run_dir());
    ASSERT_TRUE(adopted.ok()) << adopted.status().ToString();
    EXPECT_EQ((*adopted)->direct_images(), std::vector<std::string>{wrapper});
    EXPECT_TRUE((*adopted)->overlays().empty());
  }
  Status st = vm_->Stop(1s);  // the guest ignores the button: quit, a clean exit
  ASSERT_TRUE(st.ok()) << st.ToString();

  std::string model = base_;
  model.replace(2u << 20, 2 * k64K, base_.substr(0, 2 * k64K));
  model.replace(3u << 20, k64K, std::string(k64K, '\0'));
  EXPECT_EQ(std::filesystem::file_size(raw), kDiskSize);
  EXPECT_TRUE(ReadAll(raw) == model) << "the guest's writes are not in the raw file at their offsets";
  EXPECT_TRUE(ReadAll(base_path_) == base_);
  EXPECT_EQ(vm_->OpenWrites().status().code(), Code::kFailedPrecondition);

  // The bitmap is stored consistent and holds exactly the two writes.
  auto info = Shell("qemu-img info --output=json " + wrapper);
  ASSERT_EQ(info.first, 0) << info.second;
  auto j = nlohmann::json::parse(info.second, nullptr, false);
  ASSERT_TRUE(j.is_object()) << info.second;
  bool found = false;
  for (const auto& b : j["format-specific"]["data"]["bitmaps"]) {
    if (b["name"] != bitmap) continue;
    found = true;
    auto flags = b["flags"].get<std::vector<std::string>>();
    EXPECT_EQ(std::count(flags.begin(), flags.end(), "in-use"), 0) << info.second;
  }
  EXPECT_TRUE(found) << info.second;
  {
    std::filesystem::create_directories(dir_.path + "/q2");
    QsdOptions qo;
    qo.run_dir = dir_.path + "/q2";
    qo.disks = {QsdDisk{"vda", wrapper, "qcow2", false}};
    QsdProcess qsd(qo);
    Status s = qsd.Start();
    ASSERT_TRUE(s.ok()) << s.ToString();
    auto qmp = QmpClient::Connect(qsd.qmp_socket());
    ASSERT_TRUE(qmp.ok()) << qmp.status().ToString();
    auto r = (*qmp)->Execute("block-export-add", {{"type", "nbd"},
                                                  {"id", "e"},
                                                  {"node-name", "vda"},
                                                  {"name", "vda"},
                                                  {"writable", true},  // QEMU exports enabled bitmaps only so
                                                  {"bitmaps", nlohmann::json::array({bitmap})}});
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    auto dirty = NbdDirtyExtents(qsd.nbd_socket(), "vda", "qemu:dirty-bitmap:" + bitmap, 0);
    ASSERT_TRUE(dirty.ok()) << dirty.status().ToString();
    ASSERT_EQ(dirty->size(), 2u);
    EXPECT_EQ((*dirty)[0].offset, 2u << 20);
    EXPECT_EQ((*dirty)[0].length, 2 * k64K);
    EXPECT_EQ((*dirty)[1].offset, 3u << 20);
    EXPECT_EQ((*dirty)[1].length, k64K);
    ASSERT_TRUE(qsd.Stop().ok());
  }
  ASSERT_TRUE(vm_->DropOverlays().ok());
  EXPECT_EQ(DirEntries(run_dir()), std::vector<std::string>{});
  EXPECT_TRUE(std::filesystem::exists(wrapper));  // never the launcher's to remove
  EXPECT_TRUE(ReadAll(raw) == model);
}

TEST_F(LauncherTest, BadDirectImagesAreRefusedNamingTheFieldAndLeaveNothing) {
  const std::string raw = dir_.path + "/store.img";
  std::ofstream(raw, std::ios::binary).write(base_.data(), static_cast<std::streamsize>(base_.size()));
  const std::string wrapper = dir_.path + "/vda.qcow2";
  ASSERT_TRUE(MakeDiskWrapper(raw, wrapper, kDiskSize, "vmr-vm-g1").ok());
  auto direct = [&](const std::string& image) {
    VmLaunchSpec s = Spec();
    s.disks[0] = VmLaunchDisk{};
    s.disks[0].size_bytes = kDiskSize;
    s.disks[0].direct_image = image;
    return s;
  };
  auto refused = [&](const VmLaunchSpec& s, Code code, const std::string& needle) {
    auto r = VmLauncher::Start(s);
    if (r.ok()) {
      (*r)->Stop(0ms).IgnoreError();
      (*r)->DropOverlays().IgnoreError();
    }
    EXPECT_EQ(r.status().code(), code) << r.status().ToString();
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().ToString();
    EXPECT_EQ(DirEntries(run_dir()), std::vector<std::string>{});
  };
  VmLaunchSpec s = direct("vda.qcow2");
  refused(s, Code::kInvalidArgument, "disks[0].direct_image");
  s = direct(dir_.path + "/none.qcow2");
  refused(s, Code::kInvalidArgument, "disks[0].direct_image");
  s = direct(wrapper);
  s.disks[0].backing = nbd_uri();
  refused(s, Code::kInvalidArgument, "disks[0].backing");
  s = direct(wrapper);
  s.disks[0].size_bytes = kDiskSize / 2;
  refused(s, Code::kInvalidArgument, "disks[0].direct_image");
  s = direct(raw);  // not a qcow2 wrapper
  refused(s, Code::kInvalidArgument, "not a qcow2");
  s = direct(wrapper);
  s.definition.disks[0].name = "d123456789012345678901";  // 22 bytes: "vmr-commit-" + it is too long for QEMU
  s.definition.disks[0].node_name = s.definition.disks[0].name;
  refused(s, Code::kInvalidArgument, "longer than 20 bytes");
  // Mixed: one overlay disk and one direct disk.
  s = Spec();
  s.definition.disks.push_back(VmDiskSpec{"vdb", "vdb", raw, "raw", kDiskSize});
  s.disks.push_back(direct(wrapper).disks[0]);
  refused(s, Code::kInvalidArgument, "disks[1].direct_image");
  // A wrapper another process holds (a VM or a daemon) is not opened twice.
  std::filesystem::create_directories(dir_.path + "/q3");
  QsdOptions qo;
  qo.run_dir = dir_.path + "/q3";
  qo.disks = {QsdDisk{"vda", wrapper, "qcow2", false}};
  QsdProcess holder(qo);
  Status started = holder.Start();
  ASSERT_TRUE(started.ok()) << started.ToString();
  refused(direct(wrapper), Code::kFailedPrecondition, "in use");
  ASSERT_TRUE(holder.Stop().ok());
}

TEST_F(LauncherTest, BadSpecsAreRefusedNamingTheFieldAndLeaveNothing) {
  auto code_and_message = [](const VmLaunchSpec& s) {
    auto r = VmLauncher::Start(s);
    if (r.ok()) {  // a failure of this test: do not leave the VM running
      (*r)->Stop(0ms).IgnoreError();
      (*r)->DropOverlays().IgnoreError();
    }
    Status st = r.status();
    return std::make_pair(st.code(), st.message());
  };
  VmLaunchSpec s = Spec();
  s.disks.clear();
  auto [c1, m1] = code_and_message(s);
  EXPECT_EQ(c1, Code::kInvalidArgument);
  EXPECT_NE(m1.find("disks"), std::string::npos) << m1;
  s = Spec();
  s.disks[0].backing = "relative/path.raw";
  auto [c2, m2] = code_and_message(s);
  EXPECT_EQ(c2, Code::kInvalidArgument);
  EXPECT_NE(m2.find("disks[0].backing"), std::string::npos) << m2;
  s = Spec();
  s.disks[0].size_bytes = 1000;
  auto [c3, m3] = code_and_message(s);
  EXPECT_EQ(c3, Code::kInvalidArgument);
  EXPECT_NE(m3.find("disks[0].size_bytes"), std::string::npos) << m3;
  s = Spec();
  s.disks[0].backing = base_path_;
  s.disks[0].nbd_reconnect_delay_s = 5;
  auto [c6, m6] = code_and_message(s);
  EXPECT_EQ(c6, Code::kInvalidArgument);
  EXPECT_NE(m6.find("disks[0].nbd_reconnect_delay_s"), std::string::npos) << m6;
  s = Spec();
  s.uuid_override = "not-a-uuid";
  EXPECT_EQ(code_and_message(s).first, Code::kInvalidArgument);
  s = Spec();
  s.run_dir = dir_.path + "/" + std::string(90, 'r');
  EXPECT_EQ(code_and_message(s).first, Code::kInvalidArgument);
  s = Spec();
  s.extra_drives = {VmExtraDrive{dir_.path + "/missing.iso", "raw"}};
  auto [c4, m4] = code_and_message(s);
  EXPECT_EQ(c4, Code::kInvalidArgument);
  EXPECT_NE(m4.find("extra_drives[0].path"), std::string::npos) << m4;
  if (!ProbeKvm().ok()) {
    s = Spec();
    s.accel = VmAccel::kKvm;
    EXPECT_EQ(code_and_message(s).first, Code::kFailedPrecondition);
  }
  // An NBD view nobody serves: qemu-img cannot open the backing.
  s = Spec();
  s.disks[0].backing = "nbd+unix:///base?socket=" + dir_.path + "/nobody.sock";
  auto [c5, m5] = code_and_message(s);
  EXPECT_EQ(c5, Code::kUnavailable) << m5;
  // No QEMU binary: IOError, nothing left.
  s = Spec();
  s.qemu_binary = "vmr-no-such-qemu";
  Status st = VmLauncher::Start(s).status();
  EXPECT_EQ(st.code(), Code::kIOError) << st.ToString();
  EXPECT_EQ(DirEntries(run_dir()), std::vector<std::string>{});
  // QEMU refuses its command line (a raw ISO opened as qcow2): IOError with
  // QEMU's complaint, nothing left.
  const std::string not_qcow2 = dir_.path + "/plain.img";
  std::ofstream(not_qcow2) << std::string(4096, 'x');
  s = Spec();
  s.extra_drives = {VmExtraDrive{not_qcow2, "qcow2"}};
  st = VmLauncher::Start(s).status();
  EXPECT_EQ(st.code(), Code::kIOError) << st.ToString();
  EXPECT_NE(st.message().find("qcow2"), std::string::npos) << st.message();
  EXPECT_EQ(DirEntries(run_dir()), std::vector<std::string>{});
}

}  // namespace
}  // namespace vmreplica

namespace vmreplica {
namespace {

// vm.json as docs/failover_vm.md describes it, written by hand: what a
// daemon that crashed between writing the state and starting QEMU leaves.
TEST(LauncherStateTest, AdoptOfAVmThatNeverStartedLetsItsFilesBeDropped) {
  TempDir dir;
  ASSERT_FALSE(dir.path.empty());
  std::ofstream(dir.path + "/vm.json")
      << R"({"version":1,"pid":0,"start_ticks":0,"accel":"tcg","name":"x","uuid":"u",)"
      << R"("overlays":["vda.qcow2"],"files":["vm.json","qemu.pid","qemu.log","vda.qcow2"]})";
  std::ofstream(dir.path + "/vda.qcow2") << "partial";
  std::ofstream(dir.path + "/keep.iso") << "not ours";
  auto l = VmLauncher::Adopt(dir.path);
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  EXPECT_FALSE((*l)->IsRunning());
  EXPECT_EQ((*l)->overlays(), std::vector<std::string>{dir.path + "/vda.qcow2"});
  ASSERT_TRUE((*l)->DropOverlays().ok());
  EXPECT_EQ(DirEntries(dir.path), std::vector<std::string>{"keep.iso"});
}

TEST(LauncherStateTest, AdoptRefusesAMalformedState) {
  TempDir dir;
  ASSERT_FALSE(dir.path.empty());
  EXPECT_EQ(VmLauncher::Adopt(dir.path).status().code(), Code::kNotFound);
  for (
      const std::string& bad :
      {std::string("not json"),
       std::string(
           R"({"version":2,"pid":1,"start_ticks":0,"accel":"tcg","name":"x","uuid":"u","overlays":[],"files":[]})"),
       std::string(
           R"({"version":1,"pid":-1,"start_ticks":0,"accel":"tcg","name":"x","uuid":"u","overlays":[],"files":[]})"),
       std::string(
           R"({"version":1,"pid":1,"start_ticks":0,"accel":"xen","name":"x","uuid":"u","overlays":[],"files":[]})"),
       std::string(
           R"({"version":1,"pid":1,"start_ticks":0,"accel":"tcg","name":"x","uuid":"u","overlays":[],"files":["../etc/passwd"]})"),
       std::string(
           R"({"version":1,"pid":1,"start_ticks":0,"accel":"tcg","name":"x","uuid":"u","overlays":["a/b"],"files":[]})"),
       std::string(R"({"version":1,"pid":1,"accel":"tcg","name":"x","uuid":"u","overlays":[],"files":[]})")}) {
    std::ofstream(dir.path + "/vm.json", std::ios::trunc) << bad;
    EXPECT_EQ(VmLauncher::Adopt(dir.path).status().code(), Code::kCorruption) << bad;
  }
}

}  // namespace
}  // namespace vmreplica
