// End-to-end tests of ChangeTracker against a real qemu-storage-daemon.
// Guest writes are injected through the QSD's writable NBD export of each
// disk; the cut is read back with nbdinfo / qemu-io over the fleecing export.
#include <gtest/gtest.h>

#include <filesystem>

#include "qemu/qemu_test_util.h"
#include "vmreplica/qmp.h"
#include "vmreplica/tracker.h"

namespace vmreplica {
namespace {

using namespace std::chrono_literals;
using testutil::DirtyExtents;
using testutil::MapExtent;
using testutil::NbdMap;
using testutil::NbdUri;
using testutil::TempDir;

constexpr uint64_t kDiskSize = 64u << 20;
constexpr uint64_t kMiB = 1u << 20;

class TrackerTest : public ::testing::Test {
 protected:
  void StartQsd(int disks, bool writable_exports = true, bool nbd_server = true) {
    std::vector<QsdDisk> qd;
    for (int i = 0; i < disks; ++i) {
      std::string name = "disk" + std::to_string(i);
      std::string path = dir_.path() + "/" + name + "." + format_;
      if (!std::filesystem::exists(path)) {
        auto r = testutil::Run("qemu-img create -q -f " + format_ + " " + path + " 64M");
        ASSERT_EQ(r.exit_code, 0) << r.output;
      }
      qd.push_back({name, path, format_, writable_exports});
    }
    QsdOptions o;
    o.run_dir = dir_.path();
    o.disks = qd;
    o.nbd_server = nbd_server;
    qsd_ = std::make_unique<QsdProcess>(o);
    Status s = qsd_->Start();
    ASSERT_TRUE(s.ok()) << s.ToString();
    Attach();
  }

  // A fresh QMP session and tracker, as after a vmreplicad restart.
  void Attach() {
    tracker_.reset();
    qmp_.reset();
    auto c = QmpClient::Connect(qsd_->qmp_socket());
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    qmp_ = std::move(c).value();
    std::vector<TrackedDisk> disks;
    for (const auto& d : qsd_->options().disks) {
      disks.push_back({d.name, QsdProcess::FormatNodeName(d.name), kDiskSize, d.format == "qcow2"});
    }
    TrackerOptions to;
    if (qsd_->options().nbd_server) to.nbd_socket = qsd_->nbd_socket();
    tracker_ = std::make_unique<ChangeTracker>(qmp_.get(), "rel-1", disks, to);
  }

  void RestartQsd(bool crash) {
    tracker_.reset();
    qmp_.reset();
    if (crash) {
      ASSERT_TRUE(qsd_->Kill().ok());
    } else {
      ASSERT_TRUE(qsd_->Stop().ok());
    }
    Status s = qsd_->Start();
    ASSERT_TRUE(s.ok()) << s.ToString();
    Attach();
  }

  void TearDown() override {
    tracker_.reset();
    qmp_.reset();
    if (qsd_) qsd_->Kill().IgnoreError();
  }

  // A guest write through the QSD's writable export.
  void Write(const std::string& disk, uint64_t offset, uint64_t length, int pattern) {
    auto r = testutil::Run("qemu-io -f raw '" + NbdUri(disk, qsd_->nbd_socket()) + "' -c 'write -P " +
                           std::to_string(pattern) + " " + std::to_string(offset) + " " +
                           std::to_string(length) + "'");
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }

  // True when [offset, offset+length) of `uri` holds `pattern` everywhere.
  static bool Holds(const std::string& uri, uint64_t offset, uint64_t length, int pattern) {
    auto r = testutil::Run("qemu-io -r -f raw '" + uri + "' -c 'read -P " + std::to_string(pattern) + " " +
                           std::to_string(offset) + " " + std::to_string(length) + "'");
    return r.exit_code == 0 && r.output.find("Pattern verification failed") == std::string::npos &&
           r.output.find("read ") != std::string::npos;
  }

  std::vector<MapExtent> Dirty(const CutDisk& cd) {
    std::string raw;
    auto map = NbdMap(NbdUri(cd.export_name, cd.socket_path), cd.bitmap_context, &raw);
    EXPECT_FALSE(map.empty()) << raw;
    return DirtyExtents(map);
  }

  std::string ExportDir() { return dir_.path(); }

  std::string format_ = "qcow2";
  TempDir dir_{"trk"};
  std::unique_ptr<QsdProcess> qsd_;
  std::unique_ptr<QmpClient> qmp_;
  std::unique_ptr<ChangeTracker> tracker_;
};

TEST_F(TrackerTest, CutShowsExactlyTheWritten4KRangesAndIsPointInTime) {
  StartQsd(1);
  ASSERT_TRUE(tracker_->Enable().ok());
  EXPECT_EQ(tracker_->generation(), 1u);
  Write("disk0", 1 * kMiB, 4096, 0x55);
  Write("disk0", 8 * kMiB + 4096, 8192, 0x55);
  Write("disk0", 20 * kMiB + 100, 512, 0x55);  // unaligned: its whole 4 KiB block is dirty

  auto cut = tracker_->TakeCut(ExportDir());
  ASSERT_TRUE(cut.ok()) << cut.status().ToString();
  ASSERT_EQ(cut->disks.size(), 1u);
  const CutDisk& cd = cut->disks[0];
  EXPECT_EQ(cd.generation, 1u);
  EXPECT_EQ(cd.bitmap_context, "qemu:dirty-bitmap:vmr-rel-1-g1");
  EXPECT_EQ(cd.size_bytes, kDiskSize);
  EXPECT_EQ(tracker_->generation(), 2u);
  std::vector<MapExtent> want = {{1 * kMiB, 4096, 1}, {8 * kMiB + 4096, 8192, 1}, {20 * kMiB, 4096, 1}};
  EXPECT_EQ(Dirty(cd), want);

  // The guest goes on writing: the view keeps the old bytes, bitmap g does
  // not change, bitmap g+1 records the new write.
  Write("disk0", 1 * kMiB, 4096, 0xaa);
  Write("disk0", 30 * kMiB, 4096, 0xaa);
  std::string view = NbdUri(cd.export_name, cd.socket_path);
  EXPECT_TRUE(Holds(view, 1 * kMiB, 4096, 0x55));
  EXPECT_TRUE(Holds(view, 30 * kMiB, 4096, 0));
  EXPECT_TRUE(Holds(NbdUri("disk0", qsd_->nbd_socket()), 1 * kMiB, 4096, 0xaa));
  EXPECT_EQ(Dirty(cd), want);

  EXPECT_EQ(tracker_->TakeCut(ExportDir()).status().code(), Code::kFailedPrecondition);
  ASSERT_TRUE(tracker_->Commit(*cut).ok());
  EXPECT_FALSE(std::filesystem::exists(cd.overlay_path));

  auto next = tracker_->TakeCut(ExportDir());
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  EXPECT_EQ(next->generation, 2u);
  std::vector<MapExtent> want2 = {{1 * kMiB, 4096, 1}, {30 * kMiB, 4096, 1}};
  EXPECT_EQ(Dirty(next->disks[0]), want2);
  EXPECT_TRUE(Holds(NbdUri(next->disks[0].export_name, next->disks[0].socket_path), 1 * kMiB, 4096, 0xaa));
  ASSERT_TRUE(tracker_->Commit(*next).ok());
  EXPECT_TRUE(tracker_->CheckTracking().ok());
}

TEST_F(TrackerTest, AbortLosesNothing) {
  StartQsd(1);
  ASSERT_TRUE(tracker_->Enable().ok());
  Write("disk0", 2 * kMiB, 4096, 0x11);
  auto cut = tracker_->TakeCut(ExportDir());
  ASSERT_TRUE(cut.ok()) << cut.status().ToString();
  Write("disk0", 40 * kMiB, 4096, 0x22);
  Status a = tracker_->Abort(*cut);
  ASSERT_TRUE(a.ok()) << a.ToString();
  EXPECT_FALSE(tracker_->cut_open());
  EXPECT_EQ(tracker_->Commit(*cut).code(), Code::kFailedPrecondition);

  auto again = tracker_->TakeCut(ExportDir());
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->generation, 2u);
  std::vector<MapExtent> want = {{2 * kMiB, 4096, 1}, {40 * kMiB, 4096, 1}};
  EXPECT_EQ(Dirty(again->disks[0]), want);
  ASSERT_TRUE(tracker_->Commit(*again).ok());
}

TEST_F(TrackerTest, TwoDisksInOneTransaction) {
  StartQsd(2);
  ASSERT_TRUE(tracker_->Enable().ok());
  Write("disk0", 0, 4096, 0x01);
  Write("disk1", 63 * kMiB, 8192, 0x02);
  auto cut = tracker_->TakeCut(ExportDir());
  ASSERT_TRUE(cut.ok()) << cut.status().ToString();
  ASSERT_EQ(cut->disks.size(), 2u);
  EXPECT_EQ(cut->disks[0].generation, cut->disks[1].generation);
  EXPECT_NE(cut->disks[0].export_name, cut->disks[1].export_name);
  EXPECT_EQ(Dirty(cut->disks[0]), (std::vector<MapExtent>{{0, 4096, 1}}));
  EXPECT_EQ(Dirty(cut->disks[1]), (std::vector<MapExtent>{{63 * kMiB, 8192, 1}}));
  EXPECT_TRUE(Holds(NbdUri(cut->disks[1].export_name, cut->disks[1].socket_path), 63 * kMiB, 8192, 0x02));
  ASSERT_TRUE(tracker_->Commit(*cut).ok());
}

TEST_F(TrackerTest, BitmapSurvivesCleanRestartButNotAKill) {
  StartQsd(1);
  ASSERT_TRUE(tracker_->Enable().ok());
  Write("disk0", 3 * kMiB, 4096, 0x33);
  RestartQsd(/*crash=*/false);
  auto rep = tracker_->Reconcile();
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->generation, 1u);
  Status ok = tracker_->CheckTracking();
  EXPECT_TRUE(ok.ok()) << ok.ToString();
  auto cut = tracker_->TakeCut(ExportDir());
  ASSERT_TRUE(cut.ok()) << cut.status().ToString();
  EXPECT_EQ(Dirty(cut->disks[0]), (std::vector<MapExtent>{{3 * kMiB, 4096, 1}}));
  ASSERT_TRUE(tracker_->Commit(*cut).ok());

  // Now the persistent bitmap is in the image, marked in use: a kill leaves
  // it inconsistent.
  RestartQsd(/*crash=*/false);
  ASSERT_TRUE(tracker_->Reconcile().ok());
  RestartQsd(/*crash=*/true);
  rep = tracker_->Reconcile();
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  Status lost = tracker_->CheckTracking();
  EXPECT_EQ(lost.code(), Code::kFailedPrecondition);
  EXPECT_NE(lost.message().find("resynchronization required"), std::string::npos) << lost.message();
  EXPECT_NE(lost.message().find("inconsistent"), std::string::npos) << lost.message();
  auto refused = tracker_->TakeCut(ExportDir());
  EXPECT_EQ(refused.status().code(), Code::kFailedPrecondition);

  // The start of a resynchronization: fresh bitmaps, tracking works again.
  ASSERT_TRUE(tracker_->RestartTracking().ok());
  EXPECT_TRUE(tracker_->CheckTracking().ok());
}

TEST_F(TrackerTest, KillRightAfterEnableLosesTracking) {
  StartQsd(1);
  ASSERT_TRUE(tracker_->Enable().ok());
  RestartQsd(/*crash=*/true);
  ASSERT_TRUE(tracker_->Reconcile().ok());
  // A bitmap never saved to the image is gone, or (had it been saved) inconsistent.
  Status lost = tracker_->CheckTracking();
  EXPECT_EQ(lost.code(), Code::kFailedPrecondition);
  EXPECT_NE(lost.message().find("resynchronization required"), std::string::npos) << lost.message();
}

TEST_F(TrackerTest, DiskSizeChangeLosesTracking) {
  StartQsd(1, /*writable_exports=*/false);  // an NBD export forbids resizing its node
  ASSERT_TRUE(tracker_->Enable().ok());
  auto resized = qmp_->Execute("block_resize", {{"node-name", "disk0"}, {"size", 2 * kDiskSize}}, 5s);
  ASSERT_TRUE(resized.ok()) << resized.status().ToString();
  Status lost = tracker_->CheckTracking();
  EXPECT_NE(lost.message().find("resynchronization required"), std::string::npos) << lost.message();
  EXPECT_NE(lost.message().find("size changed"), std::string::npos) << lost.message();
  EXPECT_EQ(tracker_->TakeCut(ExportDir()).status().code(), Code::kFailedPrecondition);
}

TEST_F(TrackerTest, EnableTwiceIsAlreadyExists) {
  StartQsd(1);
  ASSERT_TRUE(tracker_->Enable().ok());
  Attach();
  EXPECT_EQ(tracker_->Enable().code(), Code::kAlreadyExists);
}

TEST_F(TrackerTest, TrackerDroppedMidCutIsReconciledWithoutLoss) {
  StartQsd(2);
  ASSERT_TRUE(tracker_->Enable().ok());
  Write("disk0", 5 * kMiB, 4096, 0x44);
  auto cut = tracker_->TakeCut(ExportDir());
  ASSERT_TRUE(cut.ok()) << cut.status().ToString();
  std::string overlay = cut->disks[0].overlay_path;
  ASSERT_TRUE(std::filesystem::exists(overlay));
  Write("disk0", 6 * kMiB, 4096, 0x45);
  Write("disk1", 7 * kMiB, 4096, 0x46);

  Attach();  // the old tracker and session vanish without Commit or Abort
  auto rep = tracker_->Reconcile();
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  std::string all;
  for (const auto& a : rep->actions) all += a + "\n";
  EXPECT_NE(all.find("removed NBD export"), std::string::npos) << all;
  EXPECT_NE(all.find("cancelled job"), std::string::npos) << all;
  EXPECT_NE(all.find("deleted fleecing node"), std::string::npos) << all;
  EXPECT_NE(all.find("merged bitmap vmr-rel-1-g1 into vmr-rel-1-g2"), std::string::npos) << all;
  EXPECT_EQ(rep->generation, 2u);
  EXPECT_FALSE(std::filesystem::exists(overlay));
  auto exports = qmp_->Execute("query-block-exports", nlohmann::json::object(), 5s);
  ASSERT_TRUE(exports.ok());
  for (const auto& e : *exports) EXPECT_EQ(e.value("id", "").rfind("vmrx-", 0), std::string::npos);
  EXPECT_TRUE(tracker_->CheckTracking().ok());

  // Reconcile again: nothing left to do.
  auto rep2 = tracker_->Reconcile();
  ASSERT_TRUE(rep2.ok());
  EXPECT_TRUE(rep2->actions.empty());

  auto next = tracker_->TakeCut(ExportDir());
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  EXPECT_EQ(Dirty(next->disks[0]), (std::vector<MapExtent>{{5 * kMiB, 4096, 1}, {6 * kMiB, 4096, 1}}));
  EXPECT_EQ(Dirty(next->disks[1]), (std::vector<MapExtent>{{7 * kMiB, 4096, 1}}));
  ASSERT_TRUE(tracker_->Commit(*next).ok());
}

TEST_F(TrackerTest, FailedCutTearsDownAndKeepsChanges) {
  StartQsd(2);
  ASSERT_TRUE(tracker_->Enable().ok());
  Write("disk0", 9 * kMiB, 4096, 0x66);
  // Occupy the export id the cut will use for disk1, so the cut fails after
  // its transaction (the worst place: bitmaps already switched).
  std::string taken = "vmrx-" + tracker_->Tag() + "-disk1";
  ASSERT_TRUE(
      qmp_->Execute(
              "block-export-add",
              {{"type", "nbd"}, {"id", taken}, {"node-name", "disk1"}, {"name", taken}, {"writable", false}},
              5s)
          .ok());
  auto cut = tracker_->TakeCut(ExportDir());
  ASSERT_FALSE(cut.ok());
  EXPECT_FALSE(tracker_->cut_open());
  EXPECT_EQ(tracker_->generation(), 2u);  // g1 was merged into g2
  auto nodes = qmp_->Execute("query-named-block-nodes", {{"flat", true}}, 5s);
  ASSERT_TRUE(nodes.ok());
  for (const auto& n : *nodes) EXPECT_EQ(n.value("node-name", "").rfind("vmrf-", 0), std::string::npos);
  auto jobs = qmp_->Execute("query-jobs", nlohmann::json::object(), 5s);
  ASSERT_TRUE(jobs.ok());
  EXPECT_TRUE(jobs->empty()) << jobs->dump();
  for (const auto& e : std::filesystem::directory_iterator(ExportDir())) {
    EXPECT_EQ(e.path().filename().string().rfind("vmrf-", 0), std::string::npos) << e.path();
  }

  ASSERT_TRUE(qmp_->Execute("block-export-del", {{"id", taken}}, 5s).ok());
  auto retry = tracker_->TakeCut(ExportDir());
  ASSERT_TRUE(retry.ok()) << retry.status().ToString();
  EXPECT_EQ(Dirty(retry->disks[0]), (std::vector<MapExtent>{{9 * kMiB, 4096, 1}}));
  ASSERT_TRUE(tracker_->Commit(*retry).ok());
}

TEST_F(TrackerTest, StartsItsOwnNbdServerAndReusesItAfterRestart) {
  StartQsd(1, /*writable_exports=*/false, /*nbd_server=*/false);
  ASSERT_TRUE(tracker_->Enable().ok());
  auto cut = tracker_->TakeCut(ExportDir());
  ASSERT_TRUE(cut.ok()) << cut.status().ToString();
  EXPECT_EQ(cut->disks[0].socket_path, ExportDir() + "/vmr-" + tracker_->Tag() + ".nbd.sock");
  EXPECT_TRUE(Dirty(cut->disks[0]).empty());
  ASSERT_TRUE(tracker_->Commit(*cut).ok());
  Attach();  // a new daemon finds the server of the old one running
  ASSERT_TRUE(tracker_->Reconcile().ok());
  auto again = tracker_->TakeCut(ExportDir());
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_TRUE(Holds(NbdUri(again->disks[0].export_name, again->disks[0].socket_path), 0, 65536, 0));
  ASSERT_TRUE(tracker_->Commit(*again).ok());
}

TEST_F(TrackerTest, CommitAfterQemuDiedIsUnavailable) {
  StartQsd(1);
  ASSERT_TRUE(tracker_->Enable().ok());
  auto cut = tracker_->TakeCut(ExportDir());
  ASSERT_TRUE(cut.ok()) << cut.status().ToString();
  ASSERT_TRUE(qsd_->Kill().ok());
  EXPECT_EQ(tracker_->Commit(*cut).code(), Code::kUnavailable);
  EXPECT_TRUE(tracker_->cut_open());
}

TEST_F(TrackerTest, RawDiskTracksUntilQemuRestarts) {
  format_ = "raw";
  StartQsd(1);
  ASSERT_TRUE(tracker_->Enable().ok());
  Write("disk0", 12 * kMiB, 4096, 0x77);
  auto cut = tracker_->TakeCut(ExportDir());
  ASSERT_TRUE(cut.ok()) << cut.status().ToString();
  EXPECT_EQ(Dirty(cut->disks[0]), (std::vector<MapExtent>{{12 * kMiB, 4096, 1}}));
  EXPECT_TRUE(Holds(NbdUri(cut->disks[0].export_name, cut->disks[0].socket_path), 12 * kMiB, 4096, 0x77));
  ASSERT_TRUE(tracker_->Commit(*cut).ok());
  // A raw image cannot store a bitmap: even a clean restart loses tracking.
  RestartQsd(/*crash=*/false);
  ASSERT_TRUE(tracker_->Reconcile().ok());
  Status lost = tracker_->CheckTracking();
  EXPECT_NE(lost.message().find("resynchronization required"), std::string::npos) << lost.message();
}

TEST(TrackerConfigTest, BadNamesAreInvalidArgument) {
  ChangeTracker bad_rel(nullptr, "rel 1", {{"disk0", "disk0", kDiskSize, true}});
  EXPECT_EQ(bad_rel.Enable().code(), Code::kInvalidArgument);
  ChangeTracker bad_disk(nullptr, "rel1", {{"0disk", "disk0", kDiskSize, true}});
  EXPECT_EQ(bad_disk.Enable().code(), Code::kInvalidArgument);
  ChangeTracker dup(nullptr, "rel1", {{"a", "n", kDiskSize, true}, {"a", "m", kDiskSize, true}});
  EXPECT_EQ(dup.Enable().code(), Code::kInvalidArgument);
  TrackerOptions o;
  o.granularity = 3000;
  ChangeTracker gran(nullptr, "rel1", {{"a", "n", kDiskSize, true}}, o);
  EXPECT_EQ(gran.Enable().code(), Code::kInvalidArgument);
}

}  // namespace
}  // namespace vmreplica
