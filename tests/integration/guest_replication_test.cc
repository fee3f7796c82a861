// A real Linux guest (the tiny TCG guest of tests/guest) keeps writing files
// to its ext4 disk while vmreplica replicates that disk to a second daemon.
// The replica's latest point must be a crash-consistent file system: after
// the journal replay a mount would do, e2fsck finds nothing to fix.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "guest/test_guest.h"
#include "integration/harness.h"
#include "vmreplica/guest_agent.h"

namespace vmreplica::testing {
namespace {

using nlohmann::json;
using namespace std::chrono_literals;

TEST(GuestReplicationTest, GuestWritingDuringReplicationLeavesAConsistentFileSystemOnTheReplica) {
  Status artifacts = CheckGuestArtifacts();
  ASSERT_TRUE(artifacts.ok()) << artifacts.ToString();
  TempDir dir;
  MakeCa(dir / "ca", "vmreplica guest test CA");
  MakeHost(dir / "ca", dir / "pki", "primary.vmreplica.test", {"localhost", "127.0.0.1"});
  MakeHost(dir / "ca", dir / "pki", "replica.vmreplica.test", {"localhost", "127.0.0.1"});
  // A journalled ext4 made on the host (busybox's mke2fs makes ext2, which
  // is not crash-safe), converted to the guest's qcow2 disk.
  auto r = RunProgram({"/sbin/mkfs.ext4", "-q", "-F", dir / "vda.raw", "64M"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  r = RunProgram({"/usr/bin/qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", dir / "vda.raw", dir / "vda.qcow2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  GuestOptions go;
  go.disks.push_back(GuestDisk{dir / "vda.qcow2", "qcow2", "vda"});
  go.run_dir = dir / "guest";
  std::filesystem::create_directories(go.run_dir);
  auto guest = TestGuest::Launch(go);
  ASSERT_TRUE(guest.ok()) << guest.status().ToString();
  auto g = (*guest)->Run("mkdir -p /mnt/d && mount -t ext4 -o commit=1 /dev/vda /mnt/d && echo mounted");
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  ASSERT_EQ(g->first, 0) << g->second;
  // A writer that never stops: files rewritten, appended, renamed; the
  // journal commits every second (commit=1) and every 20 rounds it syncs,
  // so the disk keeps changing under the cuts.
  g = (*guest)->Run(
      "(i=0; while true; do dd if=/dev/urandom of=/mnt/d/f$((i % 16)) bs=4k count=$((i % 7 + 1)) 2>/dev/null; "
      "echo $i >> /mnt/d/log; mv /mnt/d/f$((i % 16)) /mnt/d/g$((i % 5)) 2>/dev/null; "
      "[ $((i % 20)) -eq 0 ] && sync; i=$((i + 1)); done) >/dev/null 2>&1 & echo started");
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  ASSERT_EQ(g->first, 0) << g->second;

  auto spec = [&](const std::string& host, const std::string& extra) {
    return DaemonSpec{host, dir / "ca/ca.crt", dir / ("pki/" + host + ".crt"), dir / ("pki/" + host + ".key"),
                      FreePort(), extra};
  };
  Daemon primary(dir, spec("primary.vmreplica.test", "[testing]\nreplication_interval_override_ms = 1000\n"));
  Daemon replica(dir, spec("replica.vmreplica.test", ""));
  std::string err;
  ASSERT_TRUE(primary.Start(&err)) << err;
  ASSERT_TRUE(replica.Start(&err)) << err;
  ASSERT_EQ(replica.Cli({"server", "set", "--enable", "--auth", "certificate"}).exit_code, 0);
  ASSERT_EQ(replica.Cli({"auth", "add", "*.vmreplica.test", "--storage", dir / "replicas"}).exit_code, 0);

  // The guest's QEMU, bound by its QMP socket; vmreplica starts the NBD
  // server for its cuts itself (QEMU runs none).
  r = primary.Cli({"vm", "add", "guest", "--qmp", (*guest)->qmp_socket(), "--disk", "vda=vda"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  r = primary.Cli({"--json", "vm", "get", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string vm_id = LastJsonDocument(r.out)["vm"]["id"].get<std::string>();
  r = primary.Cli({"enable", "guest", "--replica-server", "127.0.0.1", "--replica-port",
                   std::to_string(replica.port())});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  r = primary.Cli({"start", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(primary.log_path());

  // Cycles cut while the guest writes: wait 4 s of writing, then for two
  // more cycles.
  std::this_thread::sleep_for(4s);
  const int64_t started = NowMs();
  auto last_replication = [&]() -> int64_t {
    auto out = primary.Cli({"--json", "get", "guest"});
    if (out.exit_code != 0) return 0;
    json doc = LastJsonDocument(out.out);
    return JsonInt(doc["relationships"][0]["last_replication_time_unix_ms"]);
  };
  auto deadline = std::chrono::steady_clock::now() + 120s;
  int64_t first = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    int64_t t = last_replication();
    if (first == 0 && t > started) first = t;
    if (first != 0 && t > first) break;
    std::this_thread::sleep_for(200ms);
  }
  ASSERT_GT(last_replication(), first) << "no two cycles during the writes\n" << ReadText(primary.log_path());
  // The guest is still writing: the last point was cut mid-stream.
  g = (*guest)->Run("tail -n 1 /mnt/d/log");
  ASSERT_TRUE(g.ok() && g->first == 0);

  // Freeze the replica at its latest point: no more deltas, let the
  // applier finish, stop the daemon cleanly, then read its image.
  ASSERT_EQ(primary.Cli({"suspend", "guest"}).exit_code, 0);
  std::this_thread::sleep_for(2s);
  ASSERT_TRUE(replica.Stop());
  const std::string image = dir / ("replicas/" + vm_id + "/disks/vda.img");
  ASSERT_TRUE(std::filesystem::exists(image)) << image;
  std::filesystem::copy_file(image, dir / "check.img");
  // What a mount does first: replay the journal. Then a full read-only
  // check must find nothing to fix.
  r = RunProgram({"/sbin/e2fsck", "-E", "journal_only", "-p", dir / "check.img"});
  EXPECT_LE(r.exit_code, 1) << r.out << r.err;
  r = RunProgram({"/sbin/e2fsck", "-f", "-n", dir / "check.img"});
  EXPECT_EQ(r.exit_code, 0) << "the replica's file system is not consistent:\n" << r.out << r.err;
  // And the guest's files are there.
  r = RunProgram({"/sbin/debugfs", "-R", "ls -l /", dir / "check.img"});
  EXPECT_NE(r.out.find("log"), std::string::npos) << r.out << r.err;
  (void)(*guest)->Shutdown(30s);
}

}  // namespace
}  // namespace vmreplica::testing

namespace vmreplica::testing {
namespace {

// The same writing guest with its agent reachable and an application-
// consistent point due at every cycle (test-only override of the hours):
// the guest's file systems are frozen around each cut, so the replica's
// point is clean as it is: no journal to replay, nothing for e2fsck to fix.
TEST(GuestReplicationTest, ApplicationConsistentPointsNeedNoJournalReplay) {
  Status artifacts = CheckGuestArtifacts();
  ASSERT_TRUE(artifacts.ok()) << artifacts.ToString();
  TempDir dir;
  MakeCa(dir / "ca", "vmreplica guest test CA");
  MakeHost(dir / "ca", dir / "pki", "primary.vmreplica.test", {"localhost", "127.0.0.1"});
  MakeHost(dir / "ca", dir / "pki", "replica.vmreplica.test", {"localhost", "127.0.0.1"});
  auto r = RunProgram({"/sbin/mkfs.ext4", "-q", "-F", dir / "vda.raw", "64M"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  r = RunProgram({"/usr/bin/qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", dir / "vda.raw", dir / "vda.qcow2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  GuestOptions go;
  go.disks.push_back(GuestDisk{dir / "vda.qcow2", "qcow2", "vda"});
  go.run_dir = dir / "guest";
  go.guest_agent = true;
  std::filesystem::create_directories(go.run_dir);
  auto guest = TestGuest::Launch(go);
  ASSERT_TRUE(guest.ok()) << guest.status().ToString();
  auto g = (*guest)->Run("mkdir -p /mnt/d && mount -t ext4 -o commit=1 /dev/vda /mnt/d && echo mounted");
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  ASSERT_EQ(g->first, 0) << g->second;
  g = (*guest)->Run(
      "(i=0; while true; do dd if=/dev/urandom of=/mnt/d/f$((i % 16)) bs=4k count=$((i % 7 + 1)) 2>/dev/null; "
      "echo $i >> /mnt/d/log; mv /mnt/d/f$((i % 16)) /mnt/d/g$((i % 5)) 2>/dev/null; i=$((i + 1)); done) "
      ">/dev/null 2>&1 & echo started");
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  ASSERT_EQ(g->first, 0) << g->second;

  auto spec = [&](const std::string& host, const std::string& extra) {
    return DaemonSpec{host, dir / "ca/ca.crt", dir / ("pki/" + host + ".crt"), dir / ("pki/" + host + ".key"),
                      FreePort(), extra};
  };
  Daemon primary(dir, spec("primary.vmreplica.test",
                           "[testing]\nreplication_interval_override_ms = 1000\n"
                           "app_consistent_interval_override_ms = 100\n"));
  Daemon replica(dir, spec("replica.vmreplica.test", ""));
  std::string err;
  ASSERT_TRUE(primary.Start(&err)) << err;
  ASSERT_TRUE(replica.Start(&err)) << err;
  ASSERT_EQ(replica.Cli({"server", "set", "--enable", "--auth", "certificate"}).exit_code, 0);
  ASSERT_EQ(replica.Cli({"auth", "add", "*.vmreplica.test", "--storage", dir / "replicas"}).exit_code, 0);
  r = primary.Cli({"vm", "add", "guest", "--qmp", (*guest)->qmp_socket(), "--qga-socket", (*guest)->qga_socket(),
                   "--disk", "vda=vda"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  r = primary.Cli({"--json", "vm", "get", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string vm_id = LastJsonDocument(r.out)["vm"]["id"].get<std::string>();
  r = primary.Cli({"enable", "guest", "--replica-server", "127.0.0.1", "--replica-port",
                   std::to_string(replica.port()), "--history", "1", "--vss-hours", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  r = primary.Cli({"start", "guest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << ReadText(primary.log_path());

  auto relationship = [&](Daemon& d) -> json {
    auto out = d.Cli({"--json", "get", "guest"});
    if (out.exit_code != 0) return json();
    return LastJsonDocument(out.out)["relationships"][0];
  };
  // Two application-consistent cycles after the writing started.
  const int64_t started = NowMs();
  auto deadline = std::chrono::steady_clock::now() + 180s;
  int64_t first = 0, second = 0;
  while (std::chrono::steady_clock::now() < deadline && second == 0) {
    json rel = relationship(primary);
    const int64_t t = rel.is_null() ? 0 : JsonInt(rel["last_application_consistent_replication_time_unix_ms"]);
    if (first == 0 && t > started) first = t;
    if (first != 0 && t > first) second = t;
    std::this_thread::sleep_for(200ms);
  }
  ASSERT_NE(second, 0) << "no two application-consistent cycles\n" << ReadText(primary.log_path());

  // Stop at an application-consistent point: suspend, then check that the
  // last cycle was one (the guest keeps writing all along).
  ASSERT_EQ(primary.Cli({"suspend", "guest"}).exit_code, 0);
  std::this_thread::sleep_for(2s);  // a cycle in flight at the suspend ends
  // Every freeze was thawed: the agent says so and the writer goes on.
  {
    auto agent = GuestAgentClient::Connect((*guest)->qga_socket(), 10s);
    ASSERT_TRUE(agent.ok()) << agent.status().ToString();
    auto st = (*agent)->FreezeStatus(10s);
    ASSERT_TRUE(st.ok()) << st.status().ToString();
    EXPECT_EQ(*st, "thawed");
  }
  auto line = [&]() -> long {
    auto out = (*guest)->Run("tail -n 1 /mnt/d/log");
    return out.ok() && out->first == 0 ? std::atol(out->second.c_str()) : -1;
  };
  const long before = line();
  std::this_thread::sleep_for(1s);
  EXPECT_GT(line(), before) << "the guest's writer does not progress after the cycles";
  json rel = relationship(primary);
  ASSERT_EQ(rel["last_replication_type"], 2) << rel.dump() << ReadText(primary.log_path());
  auto stats = primary.Cli({"--json", "measure", "guest"});
  ASSERT_EQ(stats.exit_code, 0) << stats.err;
  EXPECT_EQ(JsonInt(LastJsonDocument(stats.out)["statistics"].value("application_consistent_snapshot_failure_count",
                                                                     json(0))),
            0)
      << stats.out;
  // The replica recorded the point's kind as it arrived.
  auto replica_deadline = std::chrono::steady_clock::now() + 30s;
  json rrel;
  while (std::chrono::steady_clock::now() < replica_deadline) {
    rrel = relationship(replica);
    if (!rrel.is_null() && JsonInt(rrel["last_apply_time_unix_ms"]) >= JsonInt(rel["last_replication_time_unix_ms"]))
      break;
    std::this_thread::sleep_for(200ms);
  }
  EXPECT_EQ(rrel["last_replication_type"], 2) << rrel.dump();
  // Its recovery points carry the kind: the newest is application-consistent.
  auto pts = replica.Cli({"--json", "points", "guest"});
  ASSERT_EQ(pts.exit_code, 0) << pts.out << pts.err;
  json points = LastJsonDocument(pts.out).value("points", json::array());
  ASSERT_FALSE(points.empty()) << pts.out;
  EXPECT_EQ(points.back()["kind"], 2) << pts.out;
  std::this_thread::sleep_for(2s);
  ASSERT_TRUE(replica.Stop());
  const std::string image = dir / ("replicas/" + vm_id + "/disks/vda.img");
  ASSERT_TRUE(std::filesystem::exists(image)) << image;
  // No journal replay first: a frozen ext4 has its journal flushed.
  r = RunProgram({"/sbin/e2fsck", "-f", "-n", image});
  EXPECT_EQ(r.exit_code, 0) << "the application-consistent point is not clean as it is:\n" << r.out << r.err;
  (void)(*guest)->Shutdown(30s);
}

}  // namespace
}  // namespace vmreplica::testing
