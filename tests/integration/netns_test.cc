// Two hosts on a real (virtual) network: the primary and the replica
// vmreplicad each run in their own network namespace, joined by a veth pair
// (netns.h). The CLI reaches each daemon over its unix admin socket from the
// root namespace; the daemons reach each other only over the veth pair, so
// setting the link down cuts them apart.
//
// Covers: TestReplicationConnection over the link, with the link down and
// after it came back; replication of a qemu-storage-daemon disk over the
// link for several cycles (replica hash == primary hash after each cycle);
// a link cut longer than two intervals (nothing lost, back to Replicating,
// failures and misses counted). The interval is shortened with the
// test-only key [testing] replication_interval_override_ms.
//
// Needs root, iproute2, qemu-img, qemu-io and qemu-storage-daemon; a missing
// piece fails the test with a message.
#include "integration/netns.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <thread>

#include "integration/harness.h"
#include "vmreplica/qmp.h"

namespace vmreplica::testing {
namespace {

using nlohmann::json;
using namespace std::chrono_literals;
using Side = NetnsPair::Side;

constexpr uint64_t kDiskBytes = 64ull << 20;
constexpr int64_t kConnectTimeoutMs = 5000;
constexpr int64_t kIntervalMs = 2000;  // [testing] replication_interval_override_ms
constexpr uint16_t kPort = 7443;       // any port is free in a fresh namespace

// A tool the test runs: absolute path, or a failure naming it.
std::string Tool(const std::string& name) {
  for (const char* dir : {"/usr/bin/", "/usr/sbin/", "/bin/", "/sbin/", "/usr/local/bin/"}) {
    const std::string p = dir + name;
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  ADD_FAILURE() << name << " is not installed (Debian: qemu-utils / qemu-system-common)";
  return "/nonexistent/" + name;
}

class NetnsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto net = NetnsPair::Create();
    ASSERT_TRUE(net.ok()) << "two-host network: " << net.status().ToString();
    net_ = std::move(net.value());
    const std::string primary_ip = net_->address(Side::kA);
    const std::string replica_ip = net_->address(Side::kB);

    MakeCa(dir_ / "ca", "vmreplica netns test CA");
    // Each host is reached by its veth address: that is the name it must carry.
    MakeHost(dir_ / "ca", dir_ / "pki", "primary.vmreplica.test", {primary_ip});
    MakeHost(dir_ / "ca", dir_ / "pki", "replica.vmreplica.test", {replica_ip});
    const std::string toml = "[knobs]\nconnect_timeout_ms = " + std::to_string(kConnectTimeoutMs) +
                             "\n[testing]\nreplication_interval_override_ms = " + std::to_string(kIntervalMs) + "\n";
    primary_ = std::make_unique<Daemon>(dir_, Spec("primary.vmreplica.test", Side::kA, toml));
    replica_ = std::make_unique<Daemon>(dir_, Spec("replica.vmreplica.test", Side::kB, toml));
    std::string err;
    ASSERT_TRUE(primary_->Start(&err)) << err;
    ASSERT_TRUE(replica_->Start(&err)) << err;
    auto r = replica_->Cli({"server", "set", "--enable", "--auth", "certificate"});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    r = replica_->Cli({"auth", "add", "*.vmreplica.test", "--storage", dir_ / "replicas", "--trust-group", "lab"});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    // 7-day statistics windows: the counters the tests compare must not be
    // reset by a window starting at 09:00 or 21:00 during the test.
    r = primary_->Cli({"server", "set", "--monitoring-interval", "604800"});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  }

  void TearDown() override {
    if (HasFailure()) {
      if (primary_) std::cerr << "--- primary log\n" << ReadText(primary_->log_path());
      if (replica_) std::cerr << "--- replica log\n" << ReadText(replica_->log_path());
    }
  }

  DaemonSpec Spec(const std::string& host, Side side, const std::string& toml) {
    DaemonSpec s{host, dir_ / "ca/ca.crt", dir_ / ("pki/" + host + ".crt"), dir_ / ("pki/" + host + ".key"), kPort,
                 toml};
    s.listen_address = net_->address(side);
    s.exec_prefix = net_->ExecPrefix(side);
    return s;
  }

  RunResult TestConnection() {
    return primary_->Cli({"--json", "test-connection", net_->address(Side::kB), std::to_string(kPort)});
  }

  // --- replication helpers -------------------------------------------------

  // A 64 MiB qcow2 disk "vda" in a qemu-storage-daemon (root namespace; the
  // primary reaches it over unix sockets), exported read-write over NBD so
  // the test can write to it.
  void StartQsd() {
    std::filesystem::create_directories(dir_ / "qsd");
    auto r = RunProgram(
        {Tool("qemu-img"), "create", "-q", "-f", "qcow2", dir_ / "qsd/vda.qcow2", std::to_string(kDiskBytes)});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    QsdOptions o;
    o.binary = Tool("qemu-storage-daemon");
    o.run_dir = dir_ / "qsd";
    o.disks.push_back({"vda", dir_ / "qsd/vda.qcow2", "qcow2", /*export_writable=*/true});
    qsd_ = std::make_unique<QsdProcess>(o);
    Status s = qsd_->Start();
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  std::string NbdUri() const { return "nbd+unix:///vda?socket=" + qsd_->nbd_socket(); }

  // Binds the QSD as VM "demo" on the primary, enables replication to the
  // replica's veth address and runs the initial copy (the CLI waits).
  void Protect() {
    auto r = primary_->Cli({"vm", "add", "demo", "--qmp", qsd_->qmp_socket(), "--nbd-socket", qsd_->nbd_socket(),
                            "--disk", "vda=vda", "--memory", "256", "--vcpus", "1"});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    r = primary_->Cli({"--json", "vm", "get", "demo"});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    json vm = LastJsonDocument(r.out);
    ASSERT_TRUE(vm.contains("vm") && vm["vm"].contains("id")) << r.out;
    vm_uuid_ = vm["vm"]["id"].get<std::string>();
    r = primary_->Cli({"enable", "demo", "--replica-server", net_->address(Side::kB), "--replica-port",
                       std::to_string(kPort), "--interval", "30"});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    r = primary_->Cli({"start", "demo"});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  }

  void Write(const std::vector<std::string>& qemu_io_commands) {
    std::vector<std::string> argv = {Tool("qemu-io"), "-f", "raw"};
    for (const auto& c : qemu_io_commands) {
      argv.push_back("-c");
      argv.push_back(c);
    }
    argv.push_back(NbdUri());
    auto r = RunProgram(argv);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  }

  // `count` writes of random length (512 B .. 256 KiB, sector-aligned),
  // offset and pattern, plus one zero write of 64 KiB.
  std::vector<std::string> RandomWrites(int count) {
    std::uniform_int_distribution<uint64_t> sectors(1, 512), start(0, kDiskBytes / 512 - 1), pattern(1, 255);
    std::vector<std::string> cmds;
    for (int i = 0; i < count; ++i) {
      const uint64_t len = sectors(rng_) * 512;
      const uint64_t off = std::min(start(rng_) * 512, kDiskBytes - len);
      cmds.push_back("write -P " + std::to_string(pattern(rng_)) + " " + std::to_string(off) + " " +
                     std::to_string(len));
    }
    const uint64_t zero_off = std::min(start(rng_) * 512 / 65536 * 65536, kDiskBytes - 65536);
    cmds.push_back("write -z " + std::to_string(zero_off) + " 65536");
    return cmds;
  }

  // The VM's first relationship on the primary (null when none / error).
  json Relationship() {
    auto r = primary_->Cli({"--json", "get", "demo"});
    if (r.exit_code != 0) return json();
    json doc = LastJsonDocument(r.out);
    if (!doc.is_object() || !doc.contains("relationships") || doc["relationships"].empty()) return json();
    return doc["relationships"][0];
  }

  int64_t LastReplicationMs() {
    json rel = Relationship();
    if (!rel.is_object() || !rel.contains("last_replication_time_unix_ms")) return 0;
    return JsonInt(rel["last_replication_time_unix_ms"]);
  }

  int ReplicationState() {
    json rel = Relationship();
    if (!rel.is_object() || !rel.contains("replication_state")) return -1;
    return rel["replication_state"].get<int>();
  }

  json Statistics() {
    auto r = primary_->Cli({"--json", "measure", "demo"});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    json doc = LastJsonDocument(r.out);
    if (!doc.is_object() || !doc.contains("statistics")) {
      ADD_FAILURE() << "no statistics in: " << r.out;
      return json::object();
    }
    return doc["statistics"];
  }

  static uint64_t Count(const json& stats, const char* field) {
    return stats.contains(field) ? static_cast<uint64_t>(JsonInt(stats[field])) : 0;
  }

  // Polls until a cycle whose cut was taken after `after_ms` completed.
  bool WaitForCycleAfter(int64_t after_ms, std::chrono::seconds timeout = 120s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (LastReplicationMs() > after_ms) return true;
      std::this_thread::sleep_for(200ms);
    }
    return false;
  }

  bool WaitForState(int state, std::chrono::seconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (ReplicationState() == state) return true;
      std::this_thread::sleep_for(200ms);
    }
    return false;
  }

  // The primary's disk as read over NBD right now (no writes run meanwhile,
  // so this is the content of the last cut).
  std::string PrimaryHash() {
    const std::string raw = dir_ / "primary.raw";
    auto r = RunProgram({Tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", NbdUri(), raw});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    std::error_code ec;
    EXPECT_EQ(std::filesystem::file_size(raw, ec), kDiskBytes) << ec.message();
    return Sha256Padded(raw, kDiskBytes);
  }

  std::string ReplicaDisk() const { return dir_ / ("replicas/" + vm_uuid_ + "/disks/vda.img"); }

  // The replica applies after it acknowledged: polls until its latest image
  // equals the primary's content.
  void ExpectReplicaEqualsPrimary(const std::string& when) {
    const std::string want = PrimaryHash();
    std::string got;
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (std::chrono::steady_clock::now() < deadline) {
      std::error_code ec;
      const uintmax_t size = std::filesystem::file_size(ReplicaDisk(), ec);
      if (!ec) {
        got = Sha256Padded(ReplicaDisk(), kDiskBytes);
        if (got == want) {
          EXPECT_LE(size, kDiskBytes) << "replica image longer than the disk";
          return;
        }
      }
      std::this_thread::sleep_for(200ms);
    }
    ADD_FAILURE() << when << ": replica " << ReplicaDisk() << " sha256 " << got << " != primary " << want;
  }

  // Destroyed in reverse order: daemons and QSD first, the network last.
  std::unique_ptr<NetnsPair> net_;
  TempDir dir_;
  std::unique_ptr<QsdProcess> qsd_;
  std::unique_ptr<Daemon> primary_;
  std::unique_ptr<Daemon> replica_;
  std::string vm_uuid_;
  std::mt19937_64 rng_{0x6e65746e73};
};

// The fixture itself: the addresses sit in their namespaces, LinkDown /
// LinkUp change both ends, and nothing is left behind.
TEST(NetnsPairTest, MakesTheNetworkAndDeletesItAgain) {
  auto made = NetnsPair::Create();
  ASSERT_TRUE(made.ok()) << made.status().ToString();
  std::unique_ptr<NetnsPair> net = std::move(made.value());
  const std::string ip = net->ExecPrefix(Side::kA)[0];
  const std::vector<std::string> names = {net->name(Side::kA), net->name(Side::kB)};
  EXPECT_NE(names[0], names[1]);
  for (Side side : {Side::kA, Side::kB}) {
    auto r = RunProgram({ip, "-n", net->name(side), "-o", "addr", "show"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find(" " + net->address(side) + "/24 "), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("127.0.0.1/8"), std::string::npos) << r.out;
  }
  auto state = [&](Side side) {
    return RunProgram({ip, "-n", net->name(side), "-o", "link", "show", "dev", side == Side::kA ? "veth-a" : "veth-b"})
        .out;
  };
  ASSERT_TRUE(net->LinkDown().ok());
  EXPECT_EQ(state(Side::kA).find(",UP"), std::string::npos) << state(Side::kA);
  EXPECT_EQ(state(Side::kB).find(",UP"), std::string::npos) << state(Side::kB);
  ASSERT_TRUE(net->LinkUp().ok());
  EXPECT_NE(state(Side::kA).find("LOWER_UP"), std::string::npos) << state(Side::kA);
  EXPECT_NE(state(Side::kB).find("LOWER_UP"), std::string::npos) << state(Side::kB);

  net.reset();
  auto r = RunProgram({ip, "netns", "list"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const auto& n : names) EXPECT_EQ(r.out.find(n), std::string::npos) << r.out;
}

TEST_F(NetnsTest, ConnectionTestFailsWhileTheLinkIsDownAndSucceedsAfterItReturns) {
  auto r = TestConnection();
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  json job = LastJsonDocument(r.out)["job"];
  ASSERT_TRUE(job.is_object()) << r.out;
  EXPECT_EQ(job["job_state"], 7) << r.out;  // Completed
  json learnt = json::parse(job.value("result_json", std::string("{}")), nullptr, false);
  ASSERT_TRUE(learnt.is_object()) << r.out;
  EXPECT_EQ(learnt["remote_host_name"], "replica.vmreplica.test") << r.out;
  // The replica saw the primary arrive over the veth pair.
  EXPECT_NE(ReadText(replica_->log_path()).find("hello from primary.vmreplica.test"), std::string::npos);

  ASSERT_TRUE(net_->LinkDown().ok());
  const auto start = std::chrono::steady_clock::now();
  r = TestConnection();
  const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_TRUE(r.err.find("32777") != std::string::npos || r.err.find("32772") != std::string::npos)
      << "want 32777 (system not available) or 32772 (timeout):\n"
      << r.out << r.err;
  // Within the daemon's connect timeout (the job's own clock), and the CLI
  // came back soon after (margin for process start-up and job polling).
  json failed = LastJsonDocument(r.out)["job"];
  ASSERT_TRUE(failed.is_object() && failed.contains("elapsed_ms")) << r.out;
  EXPECT_EQ(failed["job_state"], 10) << r.out;  // Exception
  EXPECT_TRUE(failed["error_code"] == 32777 || failed["error_code"] == 32772) << r.out;
  EXPECT_LE(JsonInt(failed["elapsed_ms"]), kConnectTimeoutMs + 1000) << r.out;
  EXPECT_LT(waited.count(), kConnectTimeoutMs + 10000) << r.out << r.err;

  ASSERT_TRUE(net_->LinkUp().ok());
  r = TestConnection();
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(LastJsonDocument(r.out)["job"]["job_state"], 7) << r.out;
}

TEST_F(NetnsTest, EveryCycleOverTheLinkLeavesTheReplicaEqualToThePrimaryCut) {
  StartQsd();
  if (HasFatalFailure()) return;
  Write({"write -P 0x11 0 4M", "write -P 0x22 10M 1M", "write -P 0x33 63M 1M"});
  if (HasFatalFailure()) return;
  Protect();
  if (HasFatalFailure()) return;
  ExpectReplicaEqualsPrimary("after the initial copy");
  EXPECT_TRUE(WaitForState(3, 30s)) << "state " << ReplicationState();  // Replicating

  for (int cycle = 0; cycle < 4; ++cycle) {
    Write(RandomWrites(30));
    if (HasFatalFailure()) return;
    const int64_t written = NowMs();
    ASSERT_TRUE(WaitForCycleAfter(written)) << "no cycle after the writes of round " << cycle;
    ExpectReplicaEqualsPrimary("after cycle " + std::to_string(cycle));
  }
  json stats = Statistics();
  EXPECT_GE(Count(stats, "replication_success_count"), 4u) << stats.dump();
  EXPECT_EQ(Count(stats, "network_failure_count"), 0u) << stats.dump();
  EXPECT_EQ(ReplicationState(), 3);
}

TEST_F(NetnsTest, LinkCutLongerThanTwoIntervalsLosesNoWriteAndRecovers) {
  StartQsd();
  if (HasFatalFailure()) return;
  Write({"write -P 0x44 0 2M"});
  if (HasFatalFailure()) return;
  Protect();
  if (HasFatalFailure()) return;
  ExpectReplicaEqualsPrimary("after the initial copy");
  ASSERT_TRUE(WaitForState(3, 30s)) << "state " << ReplicationState();
  const json before = Statistics();

  ASSERT_TRUE(net_->LinkDown().ok());
  const auto cut = std::chrono::steady_clock::now();
  Write(RandomWrites(20));
  if (HasFatalFailure()) return;
  // Three failed cycles in a row turn the relationship Critical (8).
  EXPECT_TRUE(WaitForState(8, 90s)) << "state " << ReplicationState() << " while the link is down";
  // The cut must last longer than two intervals: the length of the outage
  // is the thing under test here, not a synchronisation.
  const auto min_cut = std::chrono::milliseconds(2 * kIntervalMs + 1000);
  if (std::chrono::steady_clock::now() - cut < min_cut) {
    std::this_thread::sleep_for(min_cut - (std::chrono::steady_clock::now() - cut));
  }
  Write(RandomWrites(20));
  if (HasFatalFailure()) return;
  const int64_t written = NowMs();

  ASSERT_TRUE(net_->LinkUp().ok());
  ASSERT_TRUE(WaitForCycleAfter(written)) << "no cycle after the link came back";
  ExpectReplicaEqualsPrimary("after the link came back");
  EXPECT_TRUE(WaitForState(3, 30s)) << "state " << ReplicationState() << " after the link came back";

  const json after = Statistics();
  EXPECT_GE(Count(after, "network_failure_count"), Count(before, "network_failure_count") + 1) << before.dump() << "\n"
                                                                                               << after.dump();
  EXPECT_GE(Count(after, "replication_miss_count"), Count(before, "replication_miss_count") + 2)
      << before.dump() << "\n"
      << after.dump();
  EXPECT_GT(Count(after, "replication_success_count"), Count(before, "replication_success_count")) << after.dump();
}

}  // namespace
}  // namespace vmreplica::testing
