// Failover on the replica host with a real guest (the tiny TCG guest of
// tests/guest): the guest on the primary writes files in phases, one cycle
// apart; the failover VM boots on the replica from the point the operator
// picks and finds exactly the phases that point holds. Test failover runs
// beside ongoing replication and leaves nothing behind.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "guest/guest_console.h"
#include "guest/test_guest.h"
#include "integration/harness.h"

namespace vmreplica::testing {
namespace {

using nlohmann::json;
using namespace std::chrono_literals;

std::string ShortId(const std::string& uuid) {
  std::string hex;
  for (char c : uuid) {
    if (c != '-') hex += c;
    if (hex.size() == 16) break;
  }
  return hex;
}

constexpr const char* kMac = "52:54:00:5a:17:01";

// True when process `pid` has ended (gone, or a zombie nobody reaped yet:
// after a daemon restart QEMU's parent is no longer the daemon).
bool ProcessGone(long pid) {
  const std::string stat = ReadText("/proc/" + std::to_string(pid) + "/stat");
  const size_t paren = stat.rfind(')');
  return stat.empty() || (paren != std::string::npos && stat.size() > paren + 2 && stat[paren + 2] == 'Z');
}

struct Point {
  std::string id;
  int64_t time_ms = 0;
  int64_t sequence = 0;
};

// The fixture: a guest on the primary with an ext4 disk, replicated every
// second (test-only interval) to a second daemon.
class FailoverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Status artifacts = CheckGuestArtifacts();
    ASSERT_TRUE(artifacts.ok()) << artifacts.ToString();
    MakeCa(dir_ / "ca", "vmreplica failover test CA");
    MakeHost(dir_ / "ca", dir_ / "pki", "primary.vmreplica.test", {"localhost", "127.0.0.1"});
    MakeHost(dir_ / "ca", dir_ / "pki", "replica.vmreplica.test", {"localhost", "127.0.0.1"});
    auto r = RunProgram({"/sbin/mkfs.ext4", "-q", "-F", dir_ / "vda.raw", "64M"});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    r = RunProgram(
        {"/usr/bin/qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", dir_ / "vda.raw", dir_ / "vda.qcow2"});
    ASSERT_EQ(r.exit_code, 0) << r.err;

    GuestOptions go;
    go.disks.push_back(GuestDisk{dir_ / "vda.qcow2", "qcow2", "vda"});
    go.run_dir = dir_ / "guest";
    // One NIC on a hub with no other port (no traffic leaves): the
    // definition records it by MAC, for the failover IP settings.
    go.extra_args = {"-netdev", "hubport,id=n0,hubid=0", "-device", std::string("virtio-net-pci,netdev=n0,mac=") + kMac};
    std::filesystem::create_directories(go.run_dir);
    auto guest = TestGuest::Launch(go);
    ASSERT_TRUE(guest.ok()) << guest.status().ToString();
    guest_ = std::move(*guest);
    Guest("mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && echo mounted");

    auto spec = [&](const std::string& host, const std::string& extra) {
      return DaemonSpec{host, dir_ / "ca/ca.crt", dir_ / ("pki/" + host + ".crt"), dir_ / ("pki/" + host + ".key"),
                        FreePort(), extra};
    };
    primary_.emplace(dir_, spec("primary.vmreplica.test", "[testing]\nreplication_interval_override_ms = 1000\n"));
    // The replica side runs cycles too once a reverse makes it the primary.
    replica_.emplace(dir_, spec("replica.vmreplica.test", "[testing]\nreplication_interval_override_ms = 1000\n"));
    std::string err;
    ASSERT_TRUE(primary_->Start(&err)) << err;
    ASSERT_TRUE(replica_->Start(&err)) << err;
    ASSERT_EQ(replica_->Cli({"server", "set", "--enable", "--auth", "certificate"}).exit_code, 0);
    ASSERT_EQ(replica_->Cli({"auth", "add", "*.vmreplica.test", "--storage", dir_ / "replicas"}).exit_code, 0);
    // The definition carries the guest's direct kernel boot, so the failover
    // VM boots the same way.
    const std::string art = GuestArtifactsDir();
    r = primary_->Cli({"vm", "add", "guest", "--qmp", guest_->qmp_socket(), "--disk", "vda=vda", "--kernel",
                       art + "/vmlinuz", "--initrd", art + "/initramfs.cpio.gz", "--append", GuestKernelAppend(1)});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    r = primary_->Cli({"--json", "vm", "get", "guest"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    vm_id_ = LastJsonDocument(r.out)["vm"]["id"].get<std::string>();
    r = primary_->Cli({"enable", "guest", "--replica-server", "127.0.0.1", "--replica-port",
                       std::to_string(replica_->port())});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    r = primary_->Cli({"start", "guest"});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(primary_->log_path());
  }

  void TearDown() override {
    if (replica_) {
      // Whatever a failing test left: no VM may outlive it.
      replica_->Cli({"stop-failover", "guest", "--test"});
      replica_->Cli({"stop-failover", "guest"});
      // A committed failover VM is nobody's to stop but its QEMU's.
      for (const std::string& dir : {FailoverRunDir(), TestRunDir(), PrimaryFailoverRunDir()}) {
        const std::string text = ReadText(dir + "/qemu.pid");
        const long pid = text.empty() ? 0 : std::strtol(text.c_str(), nullptr, 10);
        if (pid > 1) ::kill(static_cast<pid_t>(pid), SIGKILL);
      }
    }
    if (guest_) guest_->Kill();
  }

  // Runs a command in the primary's guest; must exit 0.
  std::string Guest(const std::string& cmd) {
    auto g = guest_->Run(cmd, 120s);
    EXPECT_TRUE(g.ok()) << g.status().ToString();
    if (!g.ok()) return "";
    EXPECT_EQ(g->first, 0) << cmd << ": " << g->second;
    return g->second;
  }

  // Writes phase `k`: a random file, synced; answers its md5sum line.
  std::string WritePhase(int k) {
    const std::string f = "/mnt/d/p" + std::to_string(k);
    return Guest("dd if=/dev/urandom of=" + f + " bs=4k count=64 2>/dev/null && sync && md5sum " + f);
  }

  std::vector<Point> Points() {
    auto r = replica_->Cli({"--json", "points", "guest"});
    std::vector<Point> out;
    if (r.exit_code != 0) return out;
    json doc = LastJsonDocument(r.out);
    if (!doc.contains("points")) return out;
    for (const auto& p : doc["points"]) {
      out.push_back(Point{p["id"].get<std::string>(), JsonInt(p["time_unix_ms"]), JsonInt(p["sequence"])});
    }
    return out;
  }

  // Waits for a recovery point cut after `after_ms` (host clock).
  std::optional<Point> WaitPointAfter(int64_t after_ms) {
    const auto deadline = std::chrono::steady_clock::now() + 120s;
    while (std::chrono::steady_clock::now() < deadline) {
      for (const auto& p : Points()) {
        if (p.time_ms > after_ms) return p;
      }
      std::this_thread::sleep_for(200ms);
    }
    ADD_FAILURE() << "no recovery point after " << after_ms << "\n" << ReadText(replica_->log_path());
    return std::nullopt;
  }

  json Relationship(Daemon& d) {
    auto out = d.Cli({"--json", "get", "guest"});
    if (out.exit_code != 0) return json();
    return LastJsonDocument(out.out)["relationships"][0];
  }
  int64_t ReplicaState() {
    json rel = Relationship(*replica_);
    return rel.is_null() ? -1 : JsonInt(rel["replication_state"]);
  }

  static void ExpectRefused(const RunResult& r, const std::string& code) {
    EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
    EXPECT_NE(r.err.find(code), std::string::npos) << r.out << r.err;
  }

  std::string FailoverRunDir() const { return replica_->state_dir() + "/run/fo-" + ShortId(vm_id_); }
  std::string TestRunDir() const { return replica_->state_dir() + "/run/t-" + ShortId(vm_id_); }
  // The old primary's failover VM after a round trip (it fails over too).
  std::string PrimaryFailoverRunDir() const { return primary_->state_dir() + "/run/fo-" + ShortId(vm_id_); }
  std::string PointsSocket() const { return replica_->state_dir() + "/run/points.sock"; }

  // The names the replica's point server exports now (nbdinfo --list).
  std::vector<std::string> Exports() {
    auto r = RunProgram({"/usr/bin/nbdinfo", "--list", "--json", "nbd+unix://?socket=" + PointsSocket()});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    std::vector<std::string> names;
    json j = json::parse(r.out, nullptr, false);
    if (j.is_discarded() || !j.contains("exports")) return names;
    for (const auto& e : j["exports"]) names.push_back(e["export-name"].get<std::string>());
    return names;
  }

  void FailBackAfterUnplannedFailover(bool kill_primary);

  TempDir dir_;
  std::unique_ptr<TestGuest> guest_;
  std::optional<Daemon> primary_, replica_;
  std::string vm_id_;
};

// Must show: three phases one cycle apart; an unplanned failover to the
// middle point finds phases one and two; revert, then the latest finds all
// three; every illegal state answers 32775.
TEST_F(FailoverTest, UnplannedFailoverToTheMiddlePointThenRevertAndFailOverToTheLatest) {
  ASSERT_FALSE(HasFatalFailure());
  // Illegal before anything: RevertFailover in Replicating (once the initial
  // copy arrived), a failover of the primary's VM on the primary.
  auto deadline = std::chrono::steady_clock::now() + 120s;
  while (ReplicaState() != 3 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(200ms);
  ASSERT_EQ(ReplicaState(), 3) << ReadText(replica_->log_path());
  ExpectRefused(replica_->Cli({"stop-failover", "guest"}), "32775");
  ExpectRefused(primary_->Cli({"failover", "guest", "--force"}), "32775");
  ExpectRefused(replica_->Cli({"failover", "guest", "--point", "no-such-point"}), "32773");
  // Reverse replication and failback: never from Replicating, never on the primary.
  ExpectRefused(replica_->Cli({"reverse", "guest"}), "32775");
  ExpectRefused(replica_->Cli({"failback", "guest"}), "32775");
  ExpectRefused(replica_->Cli({"change-mode-to-primary", "guest"}), "32775");
  ExpectRefused(primary_->Cli({"reverse", "guest"}), "32775");
  ExpectRefused(primary_->Cli({"failback", "guest"}), "32775");
  // The failover IP settings, on the replica's VM (its definition came from
  // the primary with the NIC's MAC).
  auto r = replica_->Cli({"set-failover-ip", "guest", "--adapter", kMac, "--ip", "192.0.2.10", "--subnet", "24",
                          "--gateway", "192.0.2.1", "--dns", "192.0.2.53"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;

  const std::string sum1 = WritePhase(1);
  auto p1 = WaitPointAfter(NowMs());
  ASSERT_TRUE(p1);
  const std::string sum2 = WritePhase(2);
  const int64_t after2 = NowMs();
  auto p2 = WaitPointAfter(after2);
  ASSERT_TRUE(p2);
  const int64_t before3 = NowMs();
  const std::string sum3 = WritePhase(3);
  auto p3 = WaitPointAfter(NowMs());
  ASSERT_TRUE(p3);
  // The middle point: the newest cut between phase two's sync and phase
  // three's first write.
  std::optional<Point> middle;
  for (const auto& p : Points()) {
    if (p.time_ms > after2 && p.time_ms < before3) middle = p;
  }
  ASSERT_TRUE(middle) << "no point between phase 2 and phase 3";

  // While the primary VM runs, the replica's failover asks it and is
  // refused (32775) unless forced.
  r = replica_->Cli({"failover", "guest", "--point", middle->id});
  ExpectRefused(r, "32775");
  EXPECT_NE(r.err.find("still runs"), std::string::npos) << r.err << ReadText(replica_->log_path()) << ReadText(primary_->log_path());
  EXPECT_EQ(ReplicaState(), 3);

  // The primary is lost.
  primary_->Kill();
  guest_->Kill();

  r = replica_->Cli({"failover", "guest", "--point", middle->id, "--start"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  EXPECT_EQ(ReplicaState(), 5);
  EXPECT_EQ(Exports().size(), 1u);
  {
    auto console = GuestConsole::Connect(FailoverRunDir() + "/serial.sock", 180s);
    ASSERT_TRUE(console.ok()) << console.status().ToString() << ReadText(FailoverRunDir() + "/serial.log");
    auto g = (*console)->Run("mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && md5sum /mnt/d/p1 /mnt/d/p2", 120s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(g->first, 0) << g->second;
    EXPECT_NE(g->second.find(sum1.substr(0, 32)), std::string::npos) << g->second;
    EXPECT_NE(g->second.find(sum2.substr(0, 32)), std::string::npos) << g->second;
    g = (*console)->Run("test -e /mnt/d/p3 && echo present || echo absent");
    ASSERT_TRUE(g.ok());
    EXPECT_NE(g->second.find("absent"), std::string::npos) << "phase three is in the middle point: " << g->second;
    // The seed: a read-only second disk labelled cidata whose
    // network-config carries the settings.
    g = (*console)->Run("dd if=/dev/vdb bs=1 skip=32808 count=6 2>/dev/null; echo; cat /sys/block/vdb/ro");
    ASSERT_TRUE(g.ok());
    EXPECT_EQ(g->second, "cidata\n1\n");
    g = (*console)->Run("dd if=/dev/vdb bs=2048 2>/dev/null | grep -a -o -e 192.0.2.10/24 -e 'via: \"192.0.2.1\"' -e " +
                        std::string(kMac) + " | sort -u");
    ASSERT_TRUE(g.ok());
    EXPECT_EQ(g->second, "192.0.2.10/24\n" + std::string(kMac) + "\nvia: \"192.0.2.1\"\n") << g->second;
    // A write of the failover VM: RevertFailover must discard it.
    g = (*console)->Run("echo discarded > /mnt/d/failover-write && sync && echo ok");
    ASSERT_TRUE(g.ok());
    EXPECT_EQ(g->first, 0) << g->second;
  }
  // Illegal while failed over (5): a second failover, a test VM, a revert of
  // a test VM that does not exist.
  ExpectRefused(replica_->Cli({"failover", "guest"}), "32775");
  ExpectRefused(replica_->Cli({"failover", "guest", "--as-test"}), "32775");
  ExpectRefused(replica_->Cli({"stop-failover", "guest", "--test"}), "32775");

  r = replica_->Cli({"stop-failover", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  EXPECT_EQ(ReplicaState(), 3);
  EXPECT_FALSE(std::filesystem::exists(FailoverRunDir())) << "RevertFailover left its run directory";
  EXPECT_TRUE(Exports().empty());

  r = replica_->Cli({"failover", "guest", "--start"});  // the latest point
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  EXPECT_EQ(ReplicaState(), 5);
  {
    auto console = GuestConsole::Connect(FailoverRunDir() + "/serial.sock", 180s);
    ASSERT_TRUE(console.ok()) << console.status().ToString() << ReadText(FailoverRunDir() + "/serial.log");
    auto g = (*console)->Run(
        "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && md5sum /mnt/d/p1 /mnt/d/p2 /mnt/d/p3", 120s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(g->first, 0) << g->second;
    for (const auto* sum : {&sum1, &sum2, &sum3}) {
      EXPECT_NE(g->second.find(sum->substr(0, 32)), std::string::npos) << g->second;
    }
    g = (*console)->Run("test -e /mnt/d/failover-write && echo present || echo absent");
    ASSERT_TRUE(g.ok());
    EXPECT_NE(g->second.find("absent"), std::string::npos) << "the reverted failover's write survived";
  }
  // The points are all still there (nothing was committed).
  EXPECT_GE(Points().size(), 3u);

  // CommitFailover: one point left, the VM keeps running (now on the
  // replica's own disk files), its data intact.
  r = replica_->Cli({"complete-failover", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  EXPECT_EQ(ReplicaState(), 6);
  EXPECT_EQ(Points().size(), 1u);
  EXPECT_TRUE(Exports().empty()) << "the committed VM no longer reads a point view";
  {
    auto console = GuestConsole::Connect(FailoverRunDir() + "/serial.sock", 60s);
    ASSERT_TRUE(console.ok()) << console.status().ToString();
    auto g = (*console)->Run("echo 3 > /proc/sys/vm/drop_caches; md5sum /mnt/d/p1 /mnt/d/p2 /mnt/d/p3 && "
                             "echo after > /mnt/d/after-commit && sync && echo ok", 120s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(g->first, 0) << g->second;
    for (const auto* sum : {&sum1, &sum2, &sum3}) {
      EXPECT_NE(g->second.find(sum->substr(0, 32)), std::string::npos) << g->second;
    }
  }
  // Illegal once committed: revert, another failover, a test VM, commit again.
  // The way back is allowed but has its own conditions: a failback sends a
  // frozen image (the VM runs: 32775); a reverse needs the old primary's
  // replica server, not enabled in this test (its job ends with 32777).
  r = replica_->Cli({"failback", "guest"});
  ExpectRefused(r, "32775");
  EXPECT_NE(r.err.find("stop the failover VM first"), std::string::npos) << r.err;
  ExpectRefused(replica_->Cli({"reverse", "guest"}), "32777");
  EXPECT_EQ(ReplicaState(), 6);
  ExpectRefused(replica_->Cli({"stop-failover", "guest"}), "32775");
  ExpectRefused(replica_->Cli({"failover", "guest"}), "32775");
  ExpectRefused(replica_->Cli({"failover", "guest", "--as-test"}), "32775");
  ExpectRefused(replica_->Cli({"complete-failover", "guest"}), "32775");
}

// CommitFailover of an older point: the base rolls back to it, the running
// failover VM's writes merge into it and the VM goes on on the replica's
// own disk; afterwards the disk file alone holds exactly the point plus
// the VM's writes, with a clean file system.
TEST_F(FailoverTest, CommitOfAnOlderPointRollsBackMergesTheVmWritesAndKeepsTheVmRunning) {
  ASSERT_FALSE(HasFatalFailure());
  const std::string sum1 = WritePhase(1);
  const int64_t after1 = NowMs();
  ASSERT_TRUE(WaitPointAfter(after1));
  const int64_t before2 = NowMs();
  WritePhase(2);
  ASSERT_TRUE(WaitPointAfter(NowMs()));
  std::optional<Point> older;
  for (const auto& p : Points()) {
    if (p.time_ms > after1 && p.time_ms < before2) older = p;
  }
  ASSERT_TRUE(older);
  ASSERT_GT(Points().back().sequence, older->sequence);
  primary_->Kill();
  guest_->Kill();

  auto r = replica_->Cli({"failover", "guest", "--point", older->id, "--start"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  auto console = GuestConsole::Connect(FailoverRunDir() + "/serial.sock", 180s);
  ASSERT_TRUE(console.ok()) << console.status().ToString() << ReadText(FailoverRunDir() + "/serial.log");
  auto g = (*console)->Run(
      "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && dd if=/dev/urandom of=/mnt/d/fo bs=4k count=48 "
      "2>/dev/null && sync && md5sum /mnt/d/fo",
      120s);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  ASSERT_EQ(g->first, 0) << g->second;
  const std::string sum_fo = g->second.substr(0, 32);

  r = replica_->Cli({"complete-failover", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  EXPECT_EQ(ReplicaState(), 6);
  const auto left = Points();
  ASSERT_EQ(left.size(), 1u);
  EXPECT_GT(left[0].sequence, older->sequence) << "the committed point is the rollback, a new point";
  // Still running, reading the replica's disk: the point's data and its own.
  g = (*console)->Run(
      "echo 3 > /proc/sys/vm/drop_caches; md5sum /mnt/d/p1 /mnt/d/fo; test -e /mnt/d/p2 && echo p2-present || "
      "echo p2-absent; echo later > /mnt/d/later && sync",
      120s);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->first, 0) << g->second;
  EXPECT_NE(g->second.find(sum1.substr(0, 32)), std::string::npos) << g->second;
  EXPECT_NE(g->second.find(sum_fo), std::string::npos) << g->second;
  EXPECT_NE(g->second.find("p2-absent"), std::string::npos) << g->second;

  // The history of changed blocks was kept before it was dropped (for a
  // later reverse, docs/failover.md section 10.3): the since file and the
  // record naming it and the last point received from the primary.
  {
    const std::string since = replica_->state_dir() + "/failover/" + vm_id_ + ".since";
    EXPECT_EQ(ReadText(since).substr(0, 8), "VMRRANGE") << since;
    json record = json::parse(ReadText(replica_->state_dir() + "/failover/" + vm_id_ + ".json"), nullptr, false);
    ASSERT_TRUE(record.is_object());
    EXPECT_EQ(record.value("since_file", std::string()), since) << record.dump();
    EXPECT_GE(JsonInt(record["replicated_sequence"]), JsonInt(record["sequence"]) + 1) << record.dump();
  }
  // Power the VM off and read the replica's disk file itself.
  const long pid = std::strtol(ReadText(FailoverRunDir() + "/qemu.pid").c_str(), nullptr, 10);
  ASSERT_GT(pid, 1);
  (void)(*console)->PowerOff();
  const auto deadline = std::chrono::steady_clock::now() + 120s;
  auto gone = [&] { return ProcessGone(pid); };
  while (!gone() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(200ms);
  ASSERT_TRUE(gone()) << "the failover VM did not power off";
  const std::string image = dir_ / ("replicas/" + vm_id_ + "/disks/vda.img");
  std::filesystem::copy_file(image, dir_ / "check.img");
  auto fsck = RunProgram({"/sbin/e2fsck", "-E", "journal_only", "-p", dir_ / "check.img"});
  EXPECT_LE(fsck.exit_code, 1) << fsck.out << fsck.err;
  fsck = RunProgram({"/sbin/e2fsck", "-f", "-n", dir_ / "check.img"});
  EXPECT_EQ(fsck.exit_code, 0) << fsck.out << fsck.err;
  auto ls = RunProgram({"/sbin/debugfs", "-R", "ls /", dir_ / "check.img"});
  EXPECT_NE(ls.out.find("p1"), std::string::npos) << ls.out;
  EXPECT_NE(ls.out.find("fo"), std::string::npos) << ls.out;
  EXPECT_NE(ls.out.find("later"), std::string::npos) << ls.out;
  EXPECT_EQ(ls.out.find("p2"), std::string::npos) << ls.out;
  auto dump = RunProgram({"/sbin/debugfs", "-R", "dump /fo " + (dir_ / "fo.out"), dir_ / "check.img"});
  EXPECT_EQ(dump.exit_code, 0) << dump.err;
  auto md5 = RunProgram({"/usr/bin/md5sum", dir_ / "fo.out"});
  EXPECT_EQ(md5.out.substr(0, 32), sum_fo);

  // The committed VM starts again, directly on its disk wrappers: it finds
  // its data, and what it writes lands in the replica's disk file.
  r = replica_->Cli({"vm", "start", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  ExpectRefused(replica_->Cli({"vm", "start", "guest"}), "32775");  // already runs
  {
    auto again = GuestConsole::Connect(FailoverRunDir() + "/serial.sock", 180s);
    ASSERT_TRUE(again.ok()) << again.status().ToString() << ReadText(FailoverRunDir() + "/serial.log");
    auto g2 = (*again)->Run("mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && md5sum /mnt/d/fo && "
                            "echo restarted > /mnt/d/restarted && sync && umount /mnt/d && echo ok",
                            120s);
    ASSERT_TRUE(g2.ok()) << g2.status().ToString();
    EXPECT_EQ(g2->first, 0) << g2->second;
    EXPECT_NE(g2->second.find(sum_fo), std::string::npos) << g2->second;
    const long pid2 = std::strtol(ReadText(FailoverRunDir() + "/qemu.pid").c_str(), nullptr, 10);
    (void)(*again)->PowerOff();
    const auto until = std::chrono::steady_clock::now() + 120s;
    while (!ProcessGone(pid2) && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(200ms);
    ASSERT_TRUE(ProcessGone(pid2)) << "the restarted VM did not power off";
  }
  ls = RunProgram({"/sbin/debugfs", "-R", "ls /", image});
  EXPECT_NE(ls.out.find("restarted"), std::string::npos) << ls.out;
  // The wrapper's bitmap recorded those writes, stored at QEMU's clean exit.
  auto info = RunProgram({"/usr/bin/qemu-img", "info", "-U", "--output=json",
                          replica_->state_dir() + "/wrappers/" + vm_id_ + "/vda.qcow2"});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_NE(info.out.find("vmr-" + vm_id_ + "-g1"), std::string::npos) << info.out;
  EXPECT_EQ(info.out.find("in-use"), std::string::npos) << info.out;
}

// Must show: a test failover runs while the primary keeps writing and the
// replica keeps applying; the test VM sees the point's data; DestroySystem
// leaves no files, exports or processes behind.
TEST_F(FailoverTest, TestFailoverRunsBesideReplicationAndLeavesNothingBehind) {
  ASSERT_FALSE(HasFatalFailure());
  const std::string sum1 = WritePhase(1);
  auto p1 = WaitPointAfter(NowMs());
  ASSERT_TRUE(p1);
  // The primary keeps writing from now on.
  Guest("(i=0; while true; do echo $i >> /mnt/d/log; dd if=/dev/urandom of=/mnt/d/w$((i % 8)) bs=4k count=4 "
        "2>/dev/null; sync; i=$((i + 1)); done) >/dev/null 2>&1 & echo started");

  auto r = replica_->Cli({"failover", "guest", "--as-test", "--point", p1->id, "--start"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  EXPECT_EQ(ReplicaState(), 3) << "a test failover does not change the replica's state";
  r = replica_->Cli({"--json", "vm", "get", "guest - Test"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const json test_vm = LastJsonDocument(r.out)["vm"];
  EXPECT_EQ(JsonInt(test_vm["replication_mode"]), 3) << test_vm.dump();
  EXPECT_NE(test_vm["id"].get<std::string>(), vm_id_);
  // A second test VM of the same replica: refused (32774).
  ExpectRefused(replica_->Cli({"failover", "guest", "--as-test"}), "32774");

  const int64_t pid = std::stoll(ReadText(TestRunDir() + "/qemu.pid"));
  ASSERT_GT(pid, 0);
  const int64_t seq_before = Points().back().sequence;
  {
    auto console = GuestConsole::Connect(TestRunDir() + "/serial.sock", 180s);
    ASSERT_TRUE(console.ok()) << console.status().ToString() << ReadText(TestRunDir() + "/serial.log");
    auto g = (*console)->Run("mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && md5sum /mnt/d/p1", 120s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(g->first, 0) << g->second;
    EXPECT_NE(g->second.find(sum1.substr(0, 32)), std::string::npos) << g->second;
    // The point is the one asked for: the writer's files came later.
    g = (*console)->Run("test -e /mnt/d/log && echo present || echo absent");
    ASSERT_TRUE(g.ok());
    EXPECT_NE(g->second.find("absent"), std::string::npos) << g->second;
  }
  // The replica daemon restarts under the running test VM: its export comes
  // back under the same name, QEMU's NBD client reconnects, the VM reads on.
  ASSERT_TRUE(replica_->Stop());
  std::string err;
  ASSERT_TRUE(replica_->Start(&err)) << err;
  EXPECT_EQ(Exports().size(), 1u) << ReadText(replica_->log_path());
  {
    auto console = GuestConsole::Connect(TestRunDir() + "/serial.sock", 60s);
    ASSERT_TRUE(console.ok()) << console.status().ToString();
    auto g = (*console)->Run("echo 3 > /proc/sys/vm/drop_caches; md5sum /mnt/d/p1", 120s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(g->first, 0) << g->second;
    EXPECT_NE(g->second.find(sum1.substr(0, 32)), std::string::npos) << g->second;
  }
  // Replication kept applying while the test VM ran.
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (Points().back().sequence <= seq_before + 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(200ms);
  }
  EXPECT_GT(Points().back().sequence, seq_before + 2) << "the replica stopped applying during the test failover";
  EXPECT_EQ(Exports().size(), 1u);

  r = replica_->Cli({"stop-failover", "guest", "--test"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  EXPECT_FALSE(std::filesystem::exists(TestRunDir())) << "DestroySystem left its run directory";
  EXPECT_TRUE(Exports().empty());
  EXPECT_TRUE(ProcessGone(pid)) << "the test VM's QEMU still runs";
  EXPECT_NE(replica_->Cli({"vm", "get", "guest - Test"}).exit_code, 0);
  EXPECT_EQ(ReplicaState(), 3);
  // DestroySystem again: there is no test VM any more.
  ExpectRefused(replica_->Cli({"stop-failover", "guest", "--test"}), "32775");
}

// Planned failover (docs/failover.md section 9): refused while the guest
// runs and on the replica side; with the guest shut down the final changes
// travel as a PlannedFailover point and the primary is in 4; the replica's
// point then equals the primary's disk byte for byte and its failover VM
// finds every phase. A revert on the primary is refused while the replica
// is failed over, then brings the primary back to 3, and a shut-down VM
// keeps its relationship healthy.
TEST_F(FailoverTest, PlannedFailoverSendsTheFinalChangesAndLosesNothing) {
  ASSERT_FALSE(HasFatalFailure());
  auto deadline = std::chrono::steady_clock::now() + 120s;
  while (ReplicaState() != 3 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(200ms);
  ASSERT_EQ(ReplicaState(), 3) << ReadText(replica_->log_path());
  const std::string sum1 = WritePhase(1);
  ASSERT_TRUE(WaitPointAfter(NowMs()));

  // Refused while the guest runs (32775, naming why), and on the replica.
  auto r = primary_->Cli({"failover", "guest", "--prepare"});
  ExpectRefused(r, "32775");
  EXPECT_NE(r.err.find("shut it down"), std::string::npos) << r.err;
  ExpectRefused(replica_->Cli({"failover", "guest", "--prepare"}), "32775");
  EXPECT_EQ(JsonInt(Relationship(*primary_)["replication_state"]), 3);

  // Phase two, then the guest shuts down (its QEMU exits and stores the
  // persistent bitmaps): whatever no cycle carried yet is in the final log.
  const std::string sum2 = WritePhase(2);
  const pid_t guest_pid = guest_->pid();
  (void)guest_->Run("umount /mnt/d; poweroff -f", 10s);  // the guest dies: no answer
  deadline = std::chrono::steady_clock::now() + 120s;
  while (!ProcessGone(guest_pid) && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(100ms);
  ASSERT_TRUE(ProcessGone(guest_pid)) << "the guest did not power off";

  r = primary_->Cli({"--json", "failover", "guest", "--prepare"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(primary_->log_path());
  json result = json::parse(LastJsonDocument(r.out)["job"].value("result_json", std::string("{}")), nullptr, false);
  ASSERT_TRUE(result.is_object()) << r.out;
  EXPECT_EQ(JsonInt(result["kind"]), 3) << r.out;
  EXPECT_FALSE(result.value("resync_form", true)) << "the persistent bitmaps survived the guest's shutdown: " << r.out;
  const int64_t final_seq = JsonInt(result["sequence"]);
  json a_rel = Relationship(*primary_);
  EXPECT_EQ(JsonInt(a_rel["replication_state"]), 4) << a_rel.dump();
  EXPECT_EQ(JsonInt(a_rel["last_replication_type"]), 3) << a_rel.dump();
  // Prepared once: a second request is illegal in 4; the primary's VM is
  // not a committed failover VM that StartVm would start.
  ExpectRefused(primary_->Cli({"failover", "guest", "--prepare"}), "32775");
  ExpectRefused(primary_->Cli({"vm", "start", "guest"}), "32775");

  // The replica holds the final log as a planned-failover point.
  deadline = std::chrono::steady_clock::now() + 60s;
  std::optional<json> last_point;
  while (std::chrono::steady_clock::now() < deadline) {
    auto p = replica_->Cli({"--json", "points", "guest"});
    json doc = p.exit_code == 0 ? LastJsonDocument(p.out) : json();
    if (doc.contains("points") && !doc["points"].empty() && JsonInt(doc["points"].back()["sequence"]) == final_seq) {
      last_point = doc["points"].back();
      break;
    }
    std::this_thread::sleep_for(200ms);
  }
  ASSERT_TRUE(last_point) << ReadText(replica_->log_path());
  EXPECT_EQ(JsonInt((*last_point)["kind"]), 3) << last_point->dump();

  // Fail over to it (the primary says its VM is off: no --force needed).
  r = replica_->Cli({"failover", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  EXPECT_EQ(ReplicaState(), 5);
  EXPECT_EQ(JsonInt(Relationship(*replica_)["failed_over_replication_type"]), 3);
  // Zero loss: the point's view equals the primary's disk, byte for byte.
  const std::string view = "nbd+unix:///" + vm_id_ + "/vda@" + std::to_string(final_seq) + "?socket=" + PointsSocket();
  auto cmp = RunProgram({"/usr/bin/qemu-img", "compare", "-f", "raw", "-F", "qcow2", view, dir_ / "vda.qcow2"});
  EXPECT_EQ(cmp.exit_code, 0) << cmp.out << cmp.err;

  // While the replica is failed over, the primary may not take its VM back.
  r = primary_->Cli({"stop-failover", "guest"});
  ExpectRefused(r, "32775");
  EXPECT_NE(r.err.find("has failed over"), std::string::npos) << r.err;
  EXPECT_EQ(JsonInt(Relationship(*primary_)["replication_state"]), 4);

  // The failover VM boots from the planned point and finds both phases.
  r = replica_->Cli({"stop-failover", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  r = replica_->Cli({"failover", "guest", "--start"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  {
    auto console = GuestConsole::Connect(FailoverRunDir() + "/serial.sock", 180s);
    ASSERT_TRUE(console.ok()) << console.status().ToString() << ReadText(FailoverRunDir() + "/serial.log");
    auto g = (*console)->Run("mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && md5sum /mnt/d/p1 /mnt/d/p2", 120s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(g->first, 0) << g->second;
    EXPECT_NE(g->second.find(sum1.substr(0, 32)), std::string::npos) << g->second;
    EXPECT_NE(g->second.find(sum2.substr(0, 32)), std::string::npos) << g->second;
  }
  r = replica_->Cli({"stop-failover", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(ReplicaState(), 3);

  // The replica is back to 3: the primary cancels its planned failover.
  auto failures = [&] {
    auto m = primary_->Cli({"--json", "measure", "guest"});
    json st = m.exit_code == 0 ? LastJsonDocument(m.out)["statistics"] : json();
    return st.is_null() ? int64_t{-1}
                        : JsonInt(st["replication_failure_count"]) + JsonInt(st["network_failure_count"]);
  };
  const int64_t failures_before = failures();
  ASSERT_GE(failures_before, 0);
  const size_t log_offset = ReadText(primary_->log_path()).size();
  r = primary_->Cli({"stop-failover", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(primary_->log_path());
  EXPECT_EQ(JsonInt(Relationship(*primary_)["replication_state"]), 3);
  ExpectRefused(primary_->Cli({"stop-failover", "guest"}), "32775");  // nothing to revert in 3
  // The VM stays off: the worker, kicked by the revert, finds it off and its
  // cycles wait instead of failing (failures would make it Critical). Each
  // such cycle proves the VM off by opening its images (a qemu-storage-
  // daemon); "the VM is off" is logged once per worker, maybe before the
  // planned failover already.
  auto probes = [&] {
    const std::string text = ReadText(primary_->log_path());
    size_t n = 0;
    for (size_t at = text.find("qemu-storage-daemon started", log_offset); at != std::string::npos;
         at = text.find("qemu-storage-daemon started", at + 1)) {
      ++n;
    }
    return n;
  };
  deadline = std::chrono::steady_clock::now() + 60s;
  while (probes() < 3 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(200ms);
  const std::string log = ReadText(primary_->log_path());
  ASSERT_GE(probes(), 3u) << log.substr(log_offset);
  EXPECT_NE(log.find("the VM is off"), std::string::npos) << log;
  EXPECT_EQ(log.find("cycle failed", log_offset), std::string::npos) << log.substr(log_offset);
  EXPECT_EQ(failures(), failures_before);
  a_rel = Relationship(*primary_);
  EXPECT_EQ(JsonInt(a_rel["replication_state"]), 3) << a_rel.dump();
}

// Must show: planned failover round trip, primary -> replica -> back, zero
// bytes lost, no full copy (docs/failover.md section 18.1). A is the
// original primary, B the replica.
TEST_F(FailoverTest, PlannedFailoverRoundTripLosesNothingAndCopiesNothing) {
  ASSERT_FALSE(HasFatalFailure());
  // A takes B's logs after the reverse: its replica server admits B.
  ASSERT_EQ(primary_->Cli({"server", "set", "--enable", "--auth", "certificate"}).exit_code, 0);
  ASSERT_EQ(primary_->Cli({"auth", "add", "*.vmreplica.test", "--storage", dir_ / "replicas-a"}).exit_code, 0);
  auto deadline = std::chrono::steady_clock::now() + 120s;
  while (ReplicaState() != 3 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(200ms);
  ASSERT_EQ(ReplicaState(), 3) << ReadText(replica_->log_path());
  const std::string sum1 = WritePhase(1);
  ASSERT_TRUE(WaitPointAfter(NowMs()));
  const std::string sum2 = WritePhase(2);

  // The guest on A shuts down; the planned failover sends the rest.
  const pid_t guest_pid = guest_->pid();
  (void)guest_->Run("umount /mnt/d; poweroff -f", 10s);
  deadline = std::chrono::steady_clock::now() + 120s;
  while (!ProcessGone(guest_pid) && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(100ms);
  ASSERT_TRUE(ProcessGone(guest_pid)) << "the guest did not power off";
  auto r = primary_->Cli({"failover", "guest", "--prepare"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(primary_->log_path());
  ASSERT_EQ(JsonInt(Relationship(*primary_)["replication_state"]), 4);
  deadline = std::chrono::steady_clock::now() + 60s;
  while (std::chrono::steady_clock::now() < deadline &&
         (Points().empty() || JsonInt(Relationship(*replica_)["last_replication_type"]) != 3)) {
    std::this_thread::sleep_for(200ms);
  }
  ASSERT_EQ(JsonInt(Relationship(*replica_)["last_replication_type"]), 3) << ReadText(replica_->log_path());
  // Reverse is refused before the failover (state 3 on B) and on A.
  ExpectRefused(replica_->Cli({"reverse", "guest", "--no-start"}), "32775");
  ExpectRefused(primary_->Cli({"reverse", "guest", "--no-start"}), "32775");
  r = replica_->Cli({"failover", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  ASSERT_EQ(ReplicaState(), 5);
  EXPECT_EQ(JsonInt(Relationship(*replica_)["failed_over_replication_type"]), 3);

  // B reverses: A adopts its own disks, the reverse start sends nothing.
  r = replica_->Cli({"--json", "reverse", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path()) << ReadText(primary_->log_path());
  json start_job = LastJsonDocument(r.out)["job"];
  EXPECT_EQ(JsonInt(start_job["job_type"]), 94) << r.out;
  json result = json::parse(start_job.value("result_json", std::string("{}")), nullptr, false);
  ASSERT_TRUE(result.is_object()) << r.out;
  EXPECT_TRUE(result.value("reverse", false)) << r.out;
  EXPECT_EQ(JsonInt(result["data_bytes"]), 0) << r.out;
  EXPECT_EQ(JsonInt(result["zero_bytes"]), 0) << r.out;
  EXPECT_EQ(JsonInt(result["candidate_bytes"]), 0) << r.out << ReadText(primary_->log_path());
  EXPECT_EQ(JsonInt(result["sequence"]), 2) << r.out;
  std::cout << "reverse start (A -> B): " << result.dump() << "\n";
  // B is the primary in 3, A the replica in 3 with points 1 (planned) and 2.
  json b_rel = Relationship(*replica_);
  EXPECT_EQ(JsonInt(b_rel["replication_mode"]), 1) << b_rel.dump();
  EXPECT_EQ(JsonInt(b_rel["replication_state"]), 3) << b_rel.dump();
  deadline = std::chrono::steady_clock::now() + 60s;
  while (JsonInt(Relationship(*primary_)["replication_state"]) != 3 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(200ms);
  }
  json a_rel = Relationship(*primary_);
  EXPECT_EQ(JsonInt(a_rel["replication_mode"]), 2) << a_rel.dump();
  EXPECT_EQ(JsonInt(a_rel["replication_state"]), 3) << a_rel.dump() << ReadText(primary_->log_path());
  {
    // A's points: the adopted one (1, kind 3: the planned failover's) and log 2.
    auto p = primary_->Cli({"--json", "points", "guest"});
    ASSERT_EQ(p.exit_code, 0) << p.out << p.err;
    json pts = LastJsonDocument(p.out)["points"];
    ASSERT_EQ(pts.size(), 2u) << pts.dump();
    EXPECT_EQ(JsonInt(pts[0]["sequence"]), 1) << pts.dump();
    EXPECT_EQ(JsonInt(pts[0]["kind"]), 3) << pts.dump();
    EXPECT_EQ(JsonInt(pts[1]["sequence"]), 2) << pts.dump();
  }
  // A's store file holds exactly A's original image (adopted, not sent).
  const std::string a_store = (dir_ / "replicas-a") + "/" + vm_id_ + "/disks/vda.img";
  auto cmp = RunProgram({"/usr/bin/qemu-img", "compare", "-f", "raw", "-F", "qcow2", a_store, dir_ / "vda.qcow2"});
  EXPECT_EQ(cmp.exit_code, 0) << cmp.out << cmp.err;

  // B's VM runs on its disks, finds phases 1 and 2, writes phase 3, which
  // reaches A by an ordinary cycle.
  r = replica_->Cli({"vm", "start", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  std::string sum3;
  long b_pid = 0;
  {
    auto console = GuestConsole::Connect(FailoverRunDir() + "/serial.sock", 180s);
    ASSERT_TRUE(console.ok()) << console.status().ToString() << ReadText(FailoverRunDir() + "/serial.log");
    auto g = (*console)->Run("mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && md5sum /mnt/d/p1 /mnt/d/p2", 120s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(g->first, 0) << g->second;
    EXPECT_NE(g->second.find(sum1.substr(0, 32)), std::string::npos) << g->second;
    EXPECT_NE(g->second.find(sum2.substr(0, 32)), std::string::npos) << g->second;
    g = (*console)->Run("dd if=/dev/urandom of=/mnt/d/p3 bs=4k count=64 2>/dev/null && sync && md5sum /mnt/d/p3",
                        120s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    ASSERT_EQ(g->first, 0) << g->second;
    sum3 = g->second;
    const int64_t after = NowMs();
    deadline = std::chrono::steady_clock::now() + 120s;
    bool seen = false;
    while (!seen && std::chrono::steady_clock::now() < deadline) {
      auto p = primary_->Cli({"--json", "points", "guest"});
      json doc = p.exit_code == 0 ? LastJsonDocument(p.out) : json();
      if (doc.contains("points")) {
        for (const auto& pt : doc["points"]) seen = seen || JsonInt(pt["time_unix_ms"]) > after;
      }
      if (!seen) std::this_thread::sleep_for(200ms);
    }
    ASSERT_TRUE(seen) << ReadText(replica_->log_path());
    const std::string b_pid_text = ReadText(FailoverRunDir() + "/qemu.pid");
    b_pid = b_pid_text.empty() ? 0 : std::strtol(b_pid_text.c_str(), nullptr, 10);
    (void)(*console)->Run("umount /mnt/d; poweroff -f", 10s);
  }
  // Back to A: B's guest is off, B prepares, A fails over and reverses.
  deadline = std::chrono::steady_clock::now() + 120s;
  while (b_pid > 1 && !ProcessGone(b_pid) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_TRUE(b_pid > 1 && ProcessGone(b_pid)) << "B's guest did not power off";
  r = replica_->Cli({"failover", "guest", "--prepare"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  EXPECT_EQ(JsonInt(Relationship(*replica_)["replication_state"]), 4);
  deadline = std::chrono::steady_clock::now() + 60s;
  while (JsonInt(Relationship(*primary_)["last_replication_type"]) != 3 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(200ms);
  }
  r = primary_->Cli({"failover", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(primary_->log_path());
  EXPECT_EQ(JsonInt(Relationship(*primary_)["failed_over_replication_type"]), 3);
  r = primary_->Cli({"--json", "reverse", "guest", "--start-vm"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(primary_->log_path()) << ReadText(replica_->log_path());
  // The JSON lines: job 104, job 94, StartVm's answer; job 94 is the one
  // with the reverse start's counters, job 104 says what B adopted.
  json back, adopt;
  for (size_t pos = 0; pos < r.out.size();) {
    const size_t nl = r.out.find('\n', pos);
    json line = json::parse(r.out.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos), nullptr, false);
    if (!line.is_discarded() && line.contains("job") && JsonInt(line["job"]["job_type"]) == 94) back = line["job"];
    if (!line.is_discarded() && line.contains("job") && JsonInt(line["job"]["job_type"]) == 104) adopt = line["job"];
    if (nl == std::string::npos) break;
    pos = nl + 1;
  }
  ASSERT_TRUE(back.is_object()) << r.out;
  ASSERT_TRUE(adopt.is_object()) << r.out;
  json adopted = json::parse(adopt.value("result_json", std::string("{}")), nullptr, false);
  // B's disks were wrappers of its old store's files: adopted in place.
  EXPECT_EQ(JsonInt(adopted["a_local_copy_bytes"]), 0) << r.out;
  EXPECT_EQ(JsonInt(adopted["a_tracking"]), 1) << r.out;
  std::cout << "reverse (B -> A): " << adopted.dump() << "\n";
  result = json::parse(back.value("result_json", std::string("{}")), nullptr, false);
  EXPECT_EQ(JsonInt(result["data_bytes"]), 0) << r.out;
  EXPECT_EQ(JsonInt(result["candidate_bytes"]), 0) << r.out;
  EXPECT_EQ(JsonInt(Relationship(*primary_)["replication_mode"]), 1);
  // B's store directory was adopted in place: its disk file is the one the
  // reversed VM wrote.
  EXPECT_EQ(JsonInt(Relationship(*replica_)["replication_mode"]), 2);
  {
    auto console = GuestConsole::Connect(PrimaryFailoverRunDir() + "/serial.sock", 180s);
    ASSERT_TRUE(console.ok()) << console.status().ToString() << ReadText(PrimaryFailoverRunDir() + "/serial.log");
    auto g = (*console)->Run(
        "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && md5sum /mnt/d/p1 /mnt/d/p2 /mnt/d/p3", 120s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(g->first, 0) << g->second;
    EXPECT_NE(g->second.find(sum1.substr(0, 32)), std::string::npos) << g->second;
    EXPECT_NE(g->second.find(sum2.substr(0, 32)), std::string::npos) << g->second;
    EXPECT_NE(g->second.find(sum3.substr(0, 32)), std::string::npos) << g->second;
  }
}

// Must show: InitiateFailback after an unplanned failover sends only the
// changed blocks (counted and printed) and ends in state 14
// (docs/failover.md section 18.2). A is the primary, B the replica.
// The body of the two failback tests: A's QEMU ends cleanly (its
// persistent bitmaps name A's own changes) or is killed (tracking lost:
// every block of A is a candidate, and still only differing blocks travel).
void FailoverTest::FailBackAfterUnplannedFailover(bool kill_primary) {
  ASSERT_EQ(primary_->Cli({"server", "set", "--enable", "--auth", "certificate"}).exit_code, 0);
  ASSERT_EQ(primary_->Cli({"auth", "add", "*.vmreplica.test", "--storage", dir_ / "replicas-a"}).exit_code, 0);
  auto deadline = std::chrono::steady_clock::now() + 120s;
  while (ReplicaState() != 3 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(200ms);
  ASSERT_EQ(ReplicaState(), 3) << ReadText(replica_->log_path());
  const std::string sum1 = WritePhase(1);
  const std::string sum2 = WritePhase(2);
  ASSERT_TRUE(WaitPointAfter(NowMs()));
  // Phase X stays on A only (replication suspended), then A's QEMU exits
  // cleanly: its persistent bitmaps name what A wrote since the last cut.
  auto r = primary_->Cli({"suspend", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  if (kill_primary) {
    Guest("dd if=/dev/urandom of=/mnt/d/px bs=64k count=64 2>/dev/null && sync && echo ok");
    guest_->Kill();
  } else {
    Guest("dd if=/dev/urandom of=/mnt/d/px bs=64k count=64 2>/dev/null && sync && umount /mnt/d && echo ok");
    Status down = guest_->Shutdown(120s);
    ASSERT_TRUE(down.ok()) << down.ToString();
  }
  // "A before": A's disk as it is now, for the test's own byte count.
  r = RunProgram({"/usr/bin/qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", dir_ / "vda.qcow2",
                  dir_ / "a-before.raw"});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  // Unplanned failover on B (A's VM is off: no --force); phase Y there.
  r = replica_->Cli({"failover", "guest", "--start"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  long pid = 0;
  {
    auto console = GuestConsole::Connect(FailoverRunDir() + "/serial.sock", 180s);
    ASSERT_TRUE(console.ok()) << console.status().ToString() << ReadText(FailoverRunDir() + "/serial.log");
    auto g = (*console)->Run(
        "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && md5sum /mnt/d/p1 /mnt/d/p2 && "
        "dd if=/dev/urandom of=/mnt/d/py bs=64k count=16 2>/dev/null && sync",
        120s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    ASSERT_EQ(g->first, 0) << g->second;
    EXPECT_NE(g->second.find(sum1.substr(0, 32)), std::string::npos) << g->second;
    EXPECT_NE(g->second.find(sum2.substr(0, 32)), std::string::npos) << g->second;
    const std::string pid_text = ReadText(FailoverRunDir() + "/qemu.pid");
    pid = pid_text.empty() ? 0 : std::strtol(pid_text.c_str(), nullptr, 10);
    (void)(*console)->Run("umount /mnt/d; poweroff -f", 10s);
  }
  deadline = std::chrono::steady_clock::now() + 120s;
  while (pid > 1 && !ProcessGone(pid) && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(100ms);
  ASSERT_TRUE(pid > 1 && ProcessGone(pid)) << "the failover VM did not power off";

  // Refused on A, a primary; then the failback from B.
  ExpectRefused(primary_->Cli({"failback", "guest"}), "32775");
  r = replica_->Cli({"--json", "failback", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path()) << ReadText(primary_->log_path());
  json job = LastJsonDocument(r.out)["job"];
  EXPECT_EQ(JsonInt(job["job_type"]), 124) << r.out;
  json result = json::parse(job.value("result_json", std::string("{}")), nullptr, false);
  ASSERT_TRUE(result.is_object()) << r.out;
  EXPECT_EQ(ReplicaState(), 14);
  deadline = std::chrono::steady_clock::now() + 60s;
  while (JsonInt(Relationship(*primary_)["replication_state"]) != 3 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(200ms);
  }
  json a_rel = Relationship(*primary_);
  EXPECT_EQ(JsonInt(a_rel["replication_mode"]), 2) << a_rel.dump();
  EXPECT_EQ(JsonInt(a_rel["replication_state"]), 3) << a_rel.dump();
  EXPECT_EQ(JsonInt(a_rel["last_replication_type"]), 3) << a_rel.dump();

  // The test's own count: B's committed image against "A before", per
  // 64 KiB block (the sync's block).
  const std::string b_image = (dir_ / "replicas") + "/" + vm_id_ + "/disks/vda.img";
  const std::string a_store = (dir_ / "replicas-a") + "/" + vm_id_ + "/disks/vda.img";
  const std::string b = ReadText(b_image), before = ReadText(dir_ / "a-before.raw");
  ASSERT_EQ(b.size(), before.size());
  constexpr size_t kBlock = 64 * 1024;
  uint64_t differing = 0, differing_zero = 0;
  for (size_t off = 0; off < b.size(); off += kBlock) {
    const size_t n = std::min(kBlock, b.size() - off);
    if (b.compare(off, n, before, off, n) == 0) continue;
    differing += n;
    if (b.find_first_not_of('\0', off) >= off + n) differing_zero += n;
  }
  const uint64_t data = JsonInt(result["data_bytes"]), zeros = JsonInt(result["zero_bytes"]);
  std::cout << "failback sent " << data << " data bytes and " << zeros << " zero bytes; " << differing
            << " bytes differ in 64 KiB blocks (" << differing_zero << " of them all-zero); disk " << b.size()
            << " bytes; job result " << result.dump() << "\n";
  EXPECT_GT(differing, 0u);
  EXPECT_EQ(data + zeros, differing) << r.out;
  EXPECT_LE(zeros, differing_zero) << r.out;
  EXPECT_LT(differing, b.size() / 4) << "only a small part of the disk changed";
  if (kill_primary) {
    // A's tracking is lost: every block of A is compared by hash.
    EXPECT_EQ(JsonInt(result["a_tracking"]), 2) << r.out;
    EXPECT_TRUE(result.value("whole_disks", false)) << r.out;
    EXPECT_EQ(JsonInt(result["candidate_bytes"]), static_cast<int64_t>(b.size())) << r.out;
  } else {
    EXPECT_EQ(JsonInt(result["a_tracking"]), 1) << r.out;
    EXPECT_GT(JsonInt(result["candidate_bytes"]), 0) << r.out;
    EXPECT_LT(JsonInt(result["candidate_bytes"]), static_cast<int64_t>(b.size())) << r.out;
  }
  // A now holds exactly B's image.
  EXPECT_TRUE(ReadText(a_store) == b) << "A's store differs from B's committed image";

  // A runs the VM again from the failback point (kind 3; B answers that its
  // failover VM is stopped, so no --force): phases 1, 2 and Y, not X.
  ExpectRefused(replica_->Cli({"vm", "start", "guest"}), "32775");
  r = primary_->Cli({"failover", "guest", "--start"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(primary_->log_path());
  a_rel = Relationship(*primary_);
  EXPECT_EQ(JsonInt(a_rel["replication_state"]), 5) << a_rel.dump();
  EXPECT_EQ(JsonInt(a_rel["failed_over_replication_type"]), 3) << a_rel.dump();
  {
    auto console = GuestConsole::Connect(PrimaryFailoverRunDir() + "/serial.sock", 180s);
    ASSERT_TRUE(console.ok()) << console.status().ToString() << ReadText(PrimaryFailoverRunDir() + "/serial.log");
    auto g = (*console)->Run(
        "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && md5sum /mnt/d/p1 /mnt/d/p2 && ls /mnt/d", 120s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(g->first, 0) << g->second;
    EXPECT_NE(g->second.find(sum1.substr(0, 32)), std::string::npos) << g->second;
    EXPECT_NE(g->second.find(sum2.substr(0, 32)), std::string::npos) << g->second;
    EXPECT_NE(g->second.find("py"), std::string::npos) << g->second;
    EXPECT_EQ(g->second.find("px"), std::string::npos) << "X was never replicated; the failback replaced it\n"
                                                       << g->second;
  }
}

TEST_F(FailoverTest, FailbackAfterUnplannedFailoverSendsOnlyChangedBlocks) {
  ASSERT_FALSE(HasFatalFailure());
  FailBackAfterUnplannedFailover(/*kill_primary=*/false);
}

TEST_F(FailoverTest, FailbackAfterTheOldPrimaryWasKilledComparesEveryBlockAndSendsOnlyChangedOnes) {
  ASSERT_FALSE(HasFatalFailure());
  FailBackAfterUnplannedFailover(/*kill_primary=*/true);
}

// ReverseReplicationRelationship to a server the settings name (not the old
// primary): the failed-over VM becomes a primary whose new replica gets a
// full initial copy, read from the disks while the VM is off.
TEST_F(FailoverTest, ReverseToAnotherServerMakesAFullCopyThere) {
  ASSERT_FALSE(HasFatalFailure());
  MakeHost(dir_ / "ca", dir_ / "pki", "third.vmreplica.test", {"localhost", "127.0.0.1"});
  Daemon third(dir_, DaemonSpec{"third.vmreplica.test", dir_ / "ca/ca.crt", dir_ / "pki/third.vmreplica.test.crt",
                                dir_ / "pki/third.vmreplica.test.key", FreePort(), ""});
  std::string err;
  ASSERT_TRUE(third.Start(&err)) << err;
  ASSERT_EQ(third.Cli({"server", "set", "--enable", "--auth", "certificate"}).exit_code, 0);
  ASSERT_EQ(third.Cli({"auth", "add", "*.vmreplica.test", "--storage", dir_ / "replicas-c"}).exit_code, 0);
  auto deadline = std::chrono::steady_clock::now() + 120s;
  while (ReplicaState() != 3 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(200ms);
  ASSERT_EQ(ReplicaState(), 3) << ReadText(replica_->log_path());
  const std::string sum1 = WritePhase(1);
  ASSERT_TRUE(WaitPointAfter(NowMs()));
  Guest("umount /mnt/d && echo ok");
  Status down = guest_->Shutdown(120s);
  ASSERT_TRUE(down.ok()) << down.ToString();

  auto r = replica_->Cli({"failover", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path());
  r = replica_->Cli({"--json", "reverse", "guest", "--replica-server", "127.0.0.1", "--replica-port",
                     std::to_string(third.port())});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(replica_->log_path()) << ReadText(third.log_path());
  json start_job = LastJsonDocument(r.out)["job"];
  EXPECT_EQ(JsonInt(start_job["job_type"]), 94) << r.out;
  json result = json::parse(start_job.value("result_json", std::string("{}")), nullptr, false);
  ASSERT_TRUE(result.is_object()) << r.out;
  EXPECT_FALSE(result.value("reverse", false)) << "a full copy, not a reverse sync: " << r.out;
  EXPECT_GT(JsonInt(result["data_bytes"]), 0) << r.out;
  json b_rel = Relationship(*replica_);
  EXPECT_EQ(JsonInt(b_rel["replication_mode"]), 1) << b_rel.dump();
  EXPECT_EQ(JsonInt(b_rel["replication_state"]), 3) << b_rel.dump();
  EXPECT_EQ(b_rel["settings"].value("recovery_server_port_number", 0), third.port()) << b_rel.dump();
  // The third host holds exactly B's disk; the old primary was not touched.
  deadline = std::chrono::steady_clock::now() + 60s;
  json c_rel;
  while (std::chrono::steady_clock::now() < deadline) {
    auto out = third.Cli({"--json", "get", "guest"});
    c_rel = out.exit_code == 0 ? LastJsonDocument(out.out)["relationships"][0] : json();
    if (!c_rel.is_null() && JsonInt(c_rel["replication_state"]) == 3) break;
    std::this_thread::sleep_for(200ms);
  }
  ASSERT_FALSE(c_rel.is_null());
  EXPECT_EQ(JsonInt(c_rel["replication_mode"]), 2) << c_rel.dump();
  EXPECT_EQ(JsonInt(c_rel["replication_state"]), 3) << c_rel.dump();
  const std::string b_image = (dir_ / "replicas") + "/" + vm_id_ + "/disks/vda.img";
  const std::string c_image = (dir_ / "replicas-c") + "/" + vm_id_ + "/disks/vda.img";
  EXPECT_TRUE(ReadText(b_image) == ReadText(c_image)) << "the third host's copy differs from B's disk";
  EXPECT_EQ(JsonInt(Relationship(*primary_)["replication_mode"]), 1);
  EXPECT_FALSE(std::filesystem::exists(dir_ / "replicas-a"));
  (void)sum1;
}

}  // namespace
}  // namespace vmreplica::testing
