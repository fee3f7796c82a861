// Failover of a VM bound through libvirt: the primary is a libvirt domain
// running the tiny TCG guest; the replica host runs its test VM and its
// failover VM as libvirt domains made from the stored domain XML (disks on
// qcow2 overlays over the point's NBD view) and commits the failover with
// the live merge through libvirt's monitor; after a planned failover and a
// reverse, the VM runs on its disk wrappers as a libvirt domain and is
// replicated back through libvirt.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "guest/guest_console.h"
#include "guest/test_guest.h"
#include "integration/harness.h"
#include "vm/libvirtd_testing.h"

namespace vmreplica::testing {
namespace {

using nlohmann::json;
using namespace std::chrono_literals;

constexpr const char* kUri = "qemu:///system";
constexpr const char* kMac = "52:54:00:5a:17:21";

RunResult Virsh(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"/usr/bin/virsh", "-q", "-c", kUri};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunProgram(argv, std::chrono::seconds(300));  // a start may probe QEMU first
}

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

// "running", "shut off"..., or "" when libvirt has no such domain.
std::string DomainState(const std::string& name) {
  auto r = Virsh({"domstate", name});
  return r.exit_code == 0 ? Trim(r.out) : "";
}

class FailoverLibvirtTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Status artifacts = CheckGuestArtifacts();
    ASSERT_TRUE(artifacts.ok()) << artifacts.ToString();
    const std::string why = testutil::EnsureLibvirtd();
    ASSERT_TRUE(why.empty()) << "libvirt is required for this test: " << why;
    name_ = "vmr-lvfo-" + std::to_string(::getpid());
    MakeCa(dir_ / "ca", "vmreplica libvirt failover test CA");
    MakeHost(dir_ / "ca", dir_ / "pki", "primary.vmreplica.test", {"localhost", "127.0.0.1"});
    MakeHost(dir_ / "ca", dir_ / "pki", "replica.vmreplica.test", {"localhost", "127.0.0.1"});
    auto r = RunProgram({"/sbin/mkfs.ext4", "-q", "-F", dir_ / "vda.raw", "64M"});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    r = RunProgram(
        {"/usr/bin/qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", dir_ / "vda.raw", dir_ / "vda.qcow2"});
    ASSERT_EQ(r.exit_code, 0) << r.err;

    // The primary: a transient domain booting the test guest, one NIC (a
    // tap on no bridge), its console on a socket of ours.
    const std::string art = GuestArtifactsDir();
    const std::string xml =
        "<domain type='qemu'><name>" + name_ + "</name><memory unit='MiB'>192</memory><vcpu>1</vcpu>" +
        "<os><type arch='x86_64' machine='pc'>hvm</type><kernel>" + art + "/vmlinuz</kernel><initrd>" + art +
        "/initramfs.cpio.gz</initrd><cmdline>" + GuestKernelAppend(1) +
        "</cmdline></os><features><acpi/></features>"
        "<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>"
        "<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='" +
        (dir_ / "vda.qcow2") +
        "'/><target dev='vda' bus='virtio'/></disk>"
        "<interface type='ethernet'><mac address='" + kMac +
        "'/><model type='virtio'/></interface>"
        "<serial type='unix'><source mode='bind' path='" + (dir_ / "console.sock") +
        "'/><target port='0'/></serial><memballoon model='none'/></devices>"
        "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel></domain>";
    {
      std::ofstream(dir_ / "primary.xml") << xml;
    }
    r = Virsh({"create", dir_ / "primary.xml"});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    auto console = GuestConsole::Connect(dir_ / "console.sock", 180s);
    ASSERT_TRUE(console.ok()) << console.status().ToString();
    primary_console_ = std::move(*console);
    Guest("mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && echo mounted");

    auto spec = [&](const std::string& host) {
      return DaemonSpec{host,       dir_ / "ca/ca.crt", dir_ / ("pki/" + host + ".crt"), dir_ / ("pki/" + host + ".key"),
                        FreePort(), "[testing]\nreplication_interval_override_ms = 1000\n"};
    };
    primary_.emplace(dir_, spec("primary.vmreplica.test"));
    replica_.emplace(dir_, spec("replica.vmreplica.test"));
    std::string err;
    ASSERT_TRUE(primary_->Start(&err)) << err;
    ASSERT_TRUE(replica_->Start(&err)) << err;
    ASSERT_EQ(replica_->Cli({"server", "set", "--enable", "--auth", "certificate"}).exit_code, 0);
    ASSERT_EQ(replica_->Cli({"auth", "add", "*.vmreplica.test", "--storage", dir_ / "replicas"}).exit_code, 0);
    r = primary_->Cli({"vm", "add", name_, "--libvirt", name_, "--uri", kUri});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    r = primary_->Cli({"--json", "vm", "get", name_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    vm_id_ = LastJsonDocument(r.out)["vm"]["id"].get<std::string>();
    r = primary_->Cli(
        {"enable", name_, "--replica-server", "127.0.0.1", "--replica-port", std::to_string(replica_->port())});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    r = primary_->Cli({"start", name_});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(primary_->log_path());
  }

  void TearDown() override {
    // No domain may outlive the test (they are transient: destroy removes them).
    for (const std::string& n : {name_, name_ + " - Test"}) {
      if (!name_.empty()) Virsh({"destroy", n});
    }
  }

  std::string Guest(const std::string& cmd) {
    auto g = primary_console_->Run(cmd, 120s);
    EXPECT_TRUE(g.ok()) << g.status().ToString();
    if (!g.ok()) return "";
    EXPECT_EQ(g->first, 0) << cmd << ": " << g->second;
    return g->second;
  }

  std::string WritePhase(int k) {
    const std::string f = "/mnt/d/p" + std::to_string(k);
    return Guest("dd if=/dev/urandom of=" + f + " bs=4k count=64 2>/dev/null && sync && md5sum " + f);
  }

  // The newest recovery point's time once one is newer than `after_ms`.
  bool WaitPointAfter(int64_t after_ms) {
    const auto deadline = std::chrono::steady_clock::now() + 120s;
    while (std::chrono::steady_clock::now() < deadline) {
      auto r = replica_->Cli({"--json", "points", name_});
      if (r.exit_code == 0) {
        json doc = LastJsonDocument(r.out);
        for (const auto& p : doc.value("points", json::array())) {
          if (JsonInt(p["time_unix_ms"]) > after_ms) return true;
        }
      }
      std::this_thread::sleep_for(200ms);
    }
    ADD_FAILURE() << "no recovery point after " << after_ms << "\n"
                  << ReadText(replica_->log_path()) << ReadText(primary_->log_path());
    return false;
  }

  int64_t ReplicaState() {
    auto out = replica_->Cli({"--json", "get", name_});
    if (out.exit_code != 0) return -1;
    return JsonInt(LastJsonDocument(out.out)["relationships"][0]["replication_state"]);
  }

  // Mounts the data disk in a replica-host VM and checks the phases' sums
  // (`absent`: files that must not be there).
  void ExpectGuestData(const std::string& run_dir, const std::vector<std::string>& sums,
                       const std::vector<std::string>& absent, bool mount = true) {
    auto console = GuestConsole::Connect(run_dir + "/serial.sock", 180s);
    ASSERT_TRUE(console.ok()) << console.status().ToString() << ReadText(run_dir + "/serial.log");
    std::string cmd = mount ? "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && " : "echo 3 > /proc/sys/vm/drop_caches; ";
    cmd += "md5sum";
    for (size_t k = 1; k <= sums.size(); ++k) cmd += " /mnt/d/p" + std::to_string(k);
    auto g = (*console)->Run(cmd, 120s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(g->first, 0) << g->second;
    for (const auto& s : sums) EXPECT_NE(g->second.find(s.substr(0, 32)), std::string::npos) << g->second;
    for (const auto& f : absent) {
      g = (*console)->Run("test -e /mnt/d/" + f + " && echo present || echo absent");
      ASSERT_TRUE(g.ok());
      EXPECT_NE(g->second.find("absent"), std::string::npos) << f << " must not be there: " << g->second;
    }
  }

  std::string RunDir(const char* prefix) const {
    std::string hex;
    for (char c : vm_id_) {
      if (c != '-') hex += c;
      if (hex.size() == 16) break;
    }
    return replica_->state_dir() + "/run/" + prefix + hex;
  }

  TempDir dir_;
  std::string name_;
  std::unique_ptr<GuestConsole> primary_console_;
  std::optional<Daemon> primary_, replica_;
  std::string vm_id_;
};

TEST_F(FailoverLibvirtTest, TestAndUnplannedFailoverRunAsLibvirtDomainsFromTheStoredXml) {
  ASSERT_FALSE(HasFatalFailure());
  auto deadline = std::chrono::steady_clock::now() + 120s;
  while (ReplicaState() != 3 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(200ms);
  ASSERT_EQ(ReplicaState(), 3) << ReadText(replica_->log_path()) << ReadText(primary_->log_path());
  const std::string sum1 = WritePhase(1);
  ASSERT_TRUE(WaitPointAfter(NowMs()));

  // Test failover: a domain "<name> - Test" with a uuid of its own, its
  // NIC a tap on no bridge, its disk an overlay over the point's NBD view.
  auto r = replica_->Cli({"failover", name_, "--as-test", "--start"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  const std::string test_name = name_ + " - Test";
  EXPECT_EQ(DomainState(test_name), "running");
  r = Virsh({"dumpxml", test_name});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string test_xml = r.out;
  EXPECT_NE(test_xml.find("<source file='" + RunDir("t-") + "/vda.qcow2'"), std::string::npos) << test_xml;
  EXPECT_NE(test_xml.find("protocol='nbd'"), std::string::npos) << test_xml;
  EXPECT_NE(test_xml.find("<interface type='ethernet'>"), std::string::npos) << test_xml;
  EXPECT_NE(test_xml.find(kMac), std::string::npos) << test_xml;
  EXPECT_EQ(test_xml.find("<uuid>" + vm_id_ + "</uuid>"), std::string::npos) << "the test VM has a uuid of its own";
  ExpectGuestData(RunDir("t-"), {sum1}, {});
  r = replica_->Cli({"stop-failover", name_, "--test"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  EXPECT_EQ(DomainState(test_name), "") << "DestroySystem left the libvirt domain";
  EXPECT_FALSE(std::filesystem::exists(RunDir("t-")));

  const std::string sum2 = WritePhase(2);
  ASSERT_TRUE(WaitPointAfter(NowMs()));
  // The primary is lost: its daemon and its domain.
  primary_->Kill();
  primary_console_.reset();
  ASSERT_EQ(Virsh({"destroy", name_}).exit_code, 0);
  ASSERT_EQ(DomainState(name_), "");

  r = replica_->Cli({"failover", name_, "--start"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  EXPECT_EQ(ReplicaState(), 5);
  EXPECT_EQ(DomainState(name_), "running") << "the failover VM is the libvirt domain of the VM's name";
  r = Virsh({"domuuid", name_});
  EXPECT_EQ(Trim(r.out), vm_id_) << "the failover VM keeps the VM's uuid";
  r = Virsh({"dumpxml", name_});
  EXPECT_NE(r.out.find("<source file='" + RunDir("fo-") + "/vda.qcow2'"), std::string::npos) << r.out;
  ExpectGuestData(RunDir("fo-"), {sum1, sum2}, {});
  {
    auto console = GuestConsole::Connect(RunDir("fo-") + "/serial.sock", 60s);
    ASSERT_TRUE(console.ok()) << console.status().ToString();
    auto g = (*console)->Run("echo kept > /mnt/d/failover-write && sync && echo ok");
    ASSERT_TRUE(g.ok());
    EXPECT_EQ(g->first, 0) << g->second;
  }

  // Commit: the live merge runs through libvirt's monitor; the domain runs
  // on, now on the replica's own disk (its wrapper).
  r = replica_->Cli({"complete-failover", name_});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  EXPECT_EQ(ReplicaState(), 6);
  EXPECT_EQ(DomainState(name_), "running");
  // The guest's disk is the wrapper node the merge pivoted to.
  r = Virsh({"qemu-monitor-command", name_, R"({"execute":"query-block"})"});
  EXPECT_NE(r.out.find("\"node-name\":\"vmr-commit-vda\""), std::string::npos) << r.out << r.err;
  {
    auto console = GuestConsole::Connect(RunDir("fo-") + "/serial.sock", 60s);
    ASSERT_TRUE(console.ok()) << console.status().ToString();
    auto g = (*console)->Run("echo 3 > /proc/sys/vm/drop_caches; md5sum /mnt/d/p1 /mnt/d/p2 && cat /mnt/d/failover-write "
                             "&& echo after > /mnt/d/after-commit && sync && echo ok",
                             120s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(g->first, 0) << g->second;
    EXPECT_NE(g->second.find(sum1.substr(0, 32)), std::string::npos) << g->second;
    EXPECT_NE(g->second.find("kept"), std::string::npos) << g->second;
  }
}

}  // namespace
}  // namespace vmreplica::testing

namespace vmreplica::testing {
namespace {

// Planned failover and reverse replication of a libvirt-bound VM: the
// primary's domain powers off (a transient domain that is gone counts as
// off), the final changes travel, the replica fails over and reverses; the
// reversed VM starts as a libvirt domain on its disk wrappers, and its
// writes reach the old primary through ordinary cycles that track the
// domain through libvirt.
TEST_F(FailoverLibvirtTest, PlannedFailoverAndReverseRunTheReversedVmAsALibvirtDomain) {
  ASSERT_FALSE(HasFatalFailure());
  ASSERT_EQ(primary_->Cli({"server", "set", "--enable", "--auth", "certificate"}).exit_code, 0);
  ASSERT_EQ(primary_->Cli({"auth", "add", "*.vmreplica.test", "--storage", dir_ / "replicas-a"}).exit_code, 0);
  auto deadline = std::chrono::steady_clock::now() + 120s;
  while (ReplicaState() != 3 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(200ms);
  ASSERT_EQ(ReplicaState(), 3) << ReadText(replica_->log_path()) << ReadText(primary_->log_path());
  const std::string sum1 = WritePhase(1);
  ASSERT_TRUE(WaitPointAfter(NowMs()));
  const std::string sum2 = WritePhase(2);

  // The primary's guest powers off: its transient domain disappears.
  Guest("umount /mnt/d && echo unmounted");
  ASSERT_TRUE(primary_console_->PowerOff().ok());
  deadline = std::chrono::steady_clock::now() + 120s;
  while (DomainState(name_) != "" && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(200ms);
  ASSERT_EQ(DomainState(name_), "") << "the primary's guest did not power off";
  primary_console_.reset();

  auto r = primary_->Cli({"failover", name_, "--prepare"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(primary_->log_path());
  deadline = std::chrono::steady_clock::now() + 60s;
  auto last_type = [&] {
    auto out = replica_->Cli({"--json", "get", name_});
    return out.exit_code == 0 ? JsonInt(LastJsonDocument(out.out)["relationships"][0]["last_replication_type"]) : -1;
  };
  while (last_type() != 3 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(200ms);
  ASSERT_EQ(last_type(), 3) << ReadText(replica_->log_path());
  r = replica_->Cli({"failover", name_});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  r = replica_->Cli({"--json", "reverse", name_});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path()) << ReadText(primary_->log_path());
  r = replica_->Cli({"--json", "vm", "get", name_});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json vm = LastJsonDocument(r.out)["vm"];
  EXPECT_EQ(JsonInt(vm["kind"]), 2) << "the reversed VM stays a libvirt VM: " << vm.dump();
  EXPECT_EQ(vm.value("libvirt_domain", std::string()), name_) << vm.dump();

  r = replica_->Cli({"vm", "start", name_});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  EXPECT_EQ(DomainState(name_), "running");
  r = Virsh({"domuuid", name_});
  EXPECT_EQ(Trim(r.out), vm_id_);
  auto console = GuestConsole::Connect(RunDir("fo-") + "/serial.sock", 180s);
  ASSERT_TRUE(console.ok()) << console.status().ToString() << ReadText(RunDir("fo-") + "/serial.log");
  auto g = (*console)->Run("mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && md5sum /mnt/d/p1 /mnt/d/p2", 120s);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->first, 0) << g->second;
  EXPECT_NE(g->second.find(sum1.substr(0, 32)), std::string::npos) << g->second;
  EXPECT_NE(g->second.find(sum2.substr(0, 32)), std::string::npos) << g->second;
  g = (*console)->Run("dd if=/dev/urandom of=/mnt/d/p3 bs=4k count=64 2>/dev/null && sync && echo ok", 120s);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  ASSERT_EQ(g->first, 0) << g->second;
  // A cycle of the reversed relationship (B tracks its domain through
  // libvirt) brings a point to A after the write.
  const int64_t after = NowMs();
  deadline = std::chrono::steady_clock::now() + 120s;
  bool seen = false;
  while (!seen && std::chrono::steady_clock::now() < deadline) {
    auto p = primary_->Cli({"--json", "points", name_});
    json doc = p.exit_code == 0 ? LastJsonDocument(p.out) : json();
    for (const auto& pt : doc.value("points", json::array())) seen = seen || JsonInt(pt["time_unix_ms"]) > after;
    if (!seen) std::this_thread::sleep_for(200ms);
  }
  EXPECT_TRUE(seen) << "no point reached A from the reversed libvirt VM\n" << ReadText(replica_->log_path());
}

}  // namespace
}  // namespace vmreplica::testing
