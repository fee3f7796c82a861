// The primary side end to end, with real parts only: qemu-storage-daemon
// holds two qcow2 disks, "guest" writes go through its writable NBD exports
// (libnbd), ChangeTracker cuts over QMP, NbdDeltaReader reads each cut's
// fleecing export. Expected content and dirty sets are computed by the test
// from the writes it made.
#include <gtest/gtest.h>
#include <libnbd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "integration/harness.h"
#include "vmreplica/nbd_reader.h"
#include "vmreplica/qmp.h"
#include "vmreplica/tracker.h"

namespace vmreplica::testing {
namespace {

constexpr uint64_t kDiskSize = 16 << 20;
constexpr uint64_t kGranule = 4096;
using Image = std::vector<uint8_t>;

// A writable NBD connection to one disk of the QSD (the guest's view).
class GuestDisk {
 public:
  GuestDisk(const std::string& socket, const std::string& name) : nbd_(nbd_create()) {
    if (nbd_ == nullptr || nbd_set_export_name(nbd_, name.c_str()) == -1 ||
        nbd_connect_unix(nbd_, socket.c_str()) == -1) {
      throw std::runtime_error(std::string("guest connect: ") + nbd_get_error());
    }
  }
  ~GuestDisk() { nbd_close(nbd_); }
  void Write(uint64_t offset, const std::string& bytes) {
    if (nbd_pwrite(nbd_, bytes.data(), bytes.size(), offset, 0) == -1) {
      throw std::runtime_error(std::string("guest write: ") + nbd_get_error());
    }
  }
  void Flush() { nbd_flush(nbd_, 0); }

 private:
  nbd_handle* nbd_;
};

class TrackingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Unix socket paths are short: keep the run dir near the root.
    run_dir_ = dir_.path();
    QsdOptions o;
    o.run_dir = run_dir_;
    for (const char* d : {"d0", "d1"}) {
      std::string path = dir_ / (std::string(d) + ".qcow2");
      auto r = RunProgram({"/usr/bin/qemu-img", "create", "-q", "-f", "qcow2", path, std::to_string(kDiskSize)});
      ASSERT_EQ(r.exit_code, 0) << r.err;
      o.disks.push_back(QsdDisk{d, path, "qcow2", /*export_writable=*/true});
      images_[d] = Image(kDiskSize, 0);
    }
    qsd_ = std::make_unique<QsdProcess>(o);
    ASSERT_TRUE(qsd_->Start().ok());
    Attach();
    ASSERT_TRUE(tracker_->Enable().ok());
    guest_["d0"] = std::make_unique<GuestDisk>(qsd_->nbd_socket(), "d0");
    guest_["d1"] = std::make_unique<GuestDisk>(qsd_->nbd_socket(), "d1");
  }

  // (Re)connects QMP and makes a tracker, as vmreplicad does when it attaches.
  void Attach() {
    tracker_.reset();
    qmp_.reset();
    auto c = QmpClient::Connect(qsd_->qmp_socket());
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    qmp_ = std::move(*c);
    TrackerOptions to;
    to.nbd_socket = qsd_->nbd_socket();
    std::vector<TrackedDisk> disks = {{"d0", "d0", kDiskSize, true}, {"d1", "d1", kDiskSize, true}};
    tracker_ = std::make_unique<ChangeTracker>(qmp_.get(), "rel1", disks, to);
  }

  void GuestWrite(const std::string& disk, uint64_t offset, const std::string& bytes) {
    guest_[disk]->Write(offset, bytes);
    std::memcpy(images_[disk].data() + offset, bytes.data(), bytes.size());
    for (uint64_t g = offset / kGranule; g <= (offset + bytes.size() - 1) / kGranule; ++g) dirty_[disk].insert(g);
  }

  // Reads the delta of every disk of `cut` and applies it onto `base`.
  // Returns the granules the delta touched per disk.
  std::map<std::string, std::set<uint64_t>> ApplyDelta(const Cut& cut, std::map<std::string, Image>* base,
                                                       const std::function<void()>& after_first = nullptr) {
    std::map<std::string, std::set<uint64_t>> touched;
    uint32_t index = 0;
    for (const auto& d : cut.disks) {
      auto reader = NbdDeltaReader::Open(d.socket_path, d.export_name, index++, d.bitmap_context);
      EXPECT_TRUE(reader.ok()) << reader.status().ToString();
      if (!reader.ok()) return touched;
      bool first = true;
      for (;;) {
        auto rec = (*reader)->Next();
        EXPECT_TRUE(rec.ok()) << rec.status().ToString();
        if (!rec.ok() || !rec->has_value()) break;
        const DeltaRecord& r = **rec;
        EXPECT_LE(r.offset + r.length, kDiskSize);
        Image& img = (*base)[d.disk];
        if (r.zero) {
          std::memset(img.data() + r.offset, 0, r.length);
        } else {
          EXPECT_EQ(r.data.size(), r.length);
          std::memcpy(img.data() + r.offset, r.data.data(), r.length);
        }
        for (uint64_t g = r.offset / kGranule; g <= (r.offset + r.length - 1) / kGranule; ++g) {
          touched[d.disk].insert(g);
        }
        if (first && after_first) after_first();
        first = false;
      }
    }
    return touched;
  }

  static std::string Pattern(uint64_t seed, size_t len) {
    std::mt19937_64 rng(seed);
    std::string s(len, '\0');
    for (auto& c : s) c = static_cast<char>(rng() | 1);  // never all zeros
    return s;
  }

  TempDir dir_;
  std::string run_dir_;
  std::unique_ptr<QsdProcess> qsd_;
  std::unique_ptr<QmpClient> qmp_;
  std::unique_ptr<ChangeTracker> tracker_;
  std::map<std::string, std::unique_ptr<GuestDisk>> guest_;
  std::map<std::string, Image> images_;                  // what the guest wrote
  std::map<std::string, std::set<uint64_t>> dirty_;      // granules written since the last commit
};

TEST_F(TrackingTest, WritesBetweenCutsArriveExactlyInTheNextDelta) {
  // Cut 1 carries nothing (fresh bitmaps): commit it.
  auto c1 = tracker_->TakeCut(run_dir_);
  ASSERT_TRUE(c1.ok()) << c1.status().ToString();
  std::map<std::string, Image> replica = images_;
  auto touched = ApplyDelta(*c1, &replica);
  EXPECT_TRUE(touched.empty());
  ASSERT_TRUE(tracker_->Commit(*c1).ok());

  std::mt19937_64 rng(42);
  for (int i = 0; i < 60; ++i) {
    std::string disk = (i % 3 == 0) ? "d1" : "d0";
    uint64_t len = 1 + rng() % 20000;  // unaligned lengths and offsets on purpose
    uint64_t off = rng() % (kDiskSize - len);
    GuestWrite(disk, off, Pattern(i, len));
  }
  GuestWrite("d0", 5 * kGranule, std::string(kGranule, '\0'));  // zeros written over zeros: still dirty

  auto c2 = tracker_->TakeCut(run_dir_);
  ASSERT_TRUE(c2.ok()) << c2.status().ToString();
  touched = ApplyDelta(*c2, &replica);
  ASSERT_TRUE(tracker_->Commit(*c2).ok());
  for (const char* d : {"d0", "d1"}) {
    EXPECT_TRUE(replica[d] == images_[d]) << d << ": replica differs from what the guest wrote";
    // Nothing outside the written granules travels, and every written granule does.
    EXPECT_EQ(touched[d], dirty_[d]) << d;
  }
}

TEST_F(TrackingTest, WritesDuringTheReadLandInTheNextDeltaAndTheCutKeepsItsPoint) {
  GuestWrite("d0", 0, Pattern(1, 3 * kGranule));
  GuestWrite("d0", 10 * kGranule, Pattern(2, kGranule));
  std::map<std::string, Image> at_cut = images_;
  auto dirty_at_cut = dirty_;
  dirty_.clear();

  auto cut = tracker_->TakeCut(run_dir_);
  ASSERT_TRUE(cut.ok()) << cut.status().ToString();
  std::map<std::string, Image> replica(
      {{"d0", Image(kDiskSize, 0)}, {"d1", Image(kDiskSize, 0)}});
  // The cut is open: before any byte of it is read, the guest overwrites a
  // block of the cut and a clean block (only copy-before-write fleecing keeps
  // the cut's bytes); after the first record arrives it writes once more.
  GuestWrite("d0", 10 * kGranule, std::string(kGranule, 'M'));
  GuestWrite("d0", 40 * kGranule, std::string(kGranule, 'N'));
  auto touched = ApplyDelta(*cut, &replica, [&] { GuestWrite("d0", 1 * kGranule, std::string(kGranule, 'O')); });
  ASSERT_TRUE(tracker_->Commit(*cut).ok());
  EXPECT_TRUE(replica["d0"] == at_cut["d0"]) << "the cut must read the point-in-time content, not the marker";
  EXPECT_EQ(touched["d0"], dirty_at_cut["d0"]);

  auto next = tracker_->TakeCut(run_dir_);
  ASSERT_TRUE(next.ok());
  touched = ApplyDelta(*next, &replica);
  ASSERT_TRUE(tracker_->Commit(*next).ok());
  EXPECT_TRUE(replica["d0"] == images_["d0"]);
  EXPECT_EQ(touched["d0"], (std::set<uint64_t>{1, 10, 40}));
}

TEST_F(TrackingTest, AbortThenANewCutLosesNothing) {
  GuestWrite("d1", 7 * kGranule, Pattern(3, 2 * kGranule));
  auto cut = tracker_->TakeCut(run_dir_);
  ASSERT_TRUE(cut.ok());
  ASSERT_TRUE(tracker_->Abort(*cut).ok());  // e.g. the replica did not acknowledge
  GuestWrite("d1", 100 * kGranule, Pattern(4, kGranule));
  auto again = tracker_->TakeCut(run_dir_);
  ASSERT_TRUE(again.ok());
  std::map<std::string, Image> replica({{"d0", Image(kDiskSize, 0)}, {"d1", Image(kDiskSize, 0)}});
  auto touched = ApplyDelta(*again, &replica);
  ASSERT_TRUE(tracker_->Commit(*again).ok());
  EXPECT_TRUE(replica["d1"] == images_["d1"]);
  EXPECT_EQ(touched["d1"], dirty_["d1"]);
}

TEST_F(TrackingTest, DaemonCrashDuringACutIsReconciledAndTheNextDeltaIsComplete) {
  GuestWrite("d0", 3 * kGranule, Pattern(5, kGranule));
  auto cut = tracker_->TakeCut(run_dir_);
  ASSERT_TRUE(cut.ok());
  // vmreplicad dies with the cut open: no Commit, no Abort.
  Attach();
  auto report = tracker_->Reconcile();
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  EXPECT_FALSE(report->actions.empty());
  ASSERT_TRUE(tracker_->CheckTracking().ok());
  GuestWrite("d0", 9 * kGranule, Pattern(6, kGranule));
  auto next = tracker_->TakeCut(run_dir_);
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  std::map<std::string, Image> replica({{"d0", Image(kDiskSize, 0)}, {"d1", Image(kDiskSize, 0)}});
  auto touched = ApplyDelta(*next, &replica);
  ASSERT_TRUE(tracker_->Commit(*next).ok());
  EXPECT_TRUE(replica["d0"] == images_["d0"]);
  EXPECT_EQ(touched["d0"], (std::set<uint64_t>{3, 9}));
}

// Write order across disks: the guest writes counter i to disk d0, waits
// for it, then writes i to d1. In every cut, d1 never shows a counter that
// d0 does not (crash consistency across the VM's disks).
TEST_F(TrackingTest, CutAcrossTwoDisksNeverShowsTheSecondWriteWithoutTheFirst) {
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> written{0};
  std::thread writer([&] {
    GuestDisk d0(qsd_->nbd_socket(), "d0"), d1(qsd_->nbd_socket(), "d1");
    for (uint64_t i = 1; !stop; ++i) {
      std::string block(kGranule, '\0');
      std::memcpy(block.data(), &i, sizeof i);
      d0.Write(0, block);
      d1.Write(0, block);
      written = i;
    }
  });
  int checked = 0;
  for (int n = 0; n < 15; ++n) {
    while (written < static_cast<uint64_t>(n * 20 + 1)) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    auto cut = tracker_->TakeCut(run_dir_);
    ASSERT_TRUE(cut.ok()) << cut.status().ToString();
    std::map<std::string, uint64_t> seen;
    uint32_t index = 0;
    for (const auto& d : cut->disks) {
      // The whole point-in-time view of block 0 (initial-copy mode reads all data).
      auto reader = NbdDeltaReader::Open(d.socket_path, d.export_name, index++, std::nullopt);
      ASSERT_TRUE(reader.ok()) << reader.status().ToString();
      auto rec = (*reader)->Next();
      ASSERT_TRUE(rec.ok() && rec->has_value());
      ASSERT_EQ((*rec)->offset, 0u);
      uint64_t v = 0;
      std::memcpy(&v, (*rec)->data.data(), sizeof v);
      seen[d.disk] = v;
    }
    ASSERT_TRUE(tracker_->Commit(*cut).ok());
    EXPECT_LE(seen["d1"], seen["d0"]) << "cut " << n;
    EXPECT_LE(seen["d0"], seen["d1"] + 1) << "cut " << n;
    ++checked;
  }
  stop = true;
  writer.join();
  EXPECT_EQ(checked, 15);
}

}  // namespace
}  // namespace vmreplica::testing
