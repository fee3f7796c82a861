#include "vmreplica/replica_store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "vmreplica/catalog.h"
#include "vmreplica/fileutil.h"

namespace vmreplica {
namespace {

constexpr auto Data = DataRecord;
constexpr auto Zero = ZeroRecord;

namespace fs = std::filesystem;
constexpr int64_t kMin = 60 * 1000;
constexpr int64_t kHour = 60 * kMin;
const std::string kVm = "vm-1";

using Image = std::vector<std::string>;  // one string per disk

// Records from a vector; optionally fails after `fail_after` records, and
// runs `between` before handing out each record.
class VectorSource : public DeltaSource {
 public:
  explicit VectorSource(std::vector<DeltaRecord> recs, int fail_after = -1)
      : recs_(std::move(recs)), fail_after_(fail_after) {}
  Result<std::optional<DeltaRecord>> Next() override {
    if (between) between(i_);
    if (fail_after_ >= 0 && i_ == static_cast<size_t>(fail_after_)) return Status::Unavailable("source broke");
    if (i_ == recs_.size()) return std::optional<DeltaRecord>();
    return std::optional<DeltaRecord>(recs_[i_++]);
  }
  std::function<void(size_t)> between;

 private:
  std::vector<DeltaRecord> recs_;
  int fail_after_;
  size_t i_ = 0;
};

void ApplyToImage(const std::vector<DeltaRecord>& recs, Image* img) {
  for (const DeltaRecord& r : recs) {
    if (r.zero) {
      std::fill((*img)[r.disk].begin() + static_cast<long>(r.offset),
                (*img)[r.disk].begin() + static_cast<long>(r.offset + r.length), '\0');
    } else {
      (*img)[r.disk].replace(r.offset, r.length, r.data);
    }
  }
}

std::vector<DeltaRecord> RandomDelta(std::mt19937_64& rng, const std::vector<ReplicaDisk>& disks) {
  std::vector<DeltaRecord> out;
  int n = 1 + static_cast<int>(rng() % 6);
  for (int i = 0; i < n; ++i) {
    uint32_t d = static_cast<uint32_t>(rng() % disks.size());
    uint64_t size = disks[d].size;
    uint64_t len = 1 + rng() % (rng() % 4 == 0 ? 200000 : 20000);
    len = std::min(len, size);
    uint64_t off = rng() % (size - len + 1);
    if (rng() % 3 == 0) off -= off % 4096;  // sometimes aligned
    if (rng() % 4 == 0) {
      out.push_back(Zero(d, off, len));
    } else {
      std::string b(len, '\0');
      char c = static_cast<char>('a' + rng() % 26);
      for (uint64_t k = 0; k < len; ++k) b[k] = static_cast<char>(c + (k % 7));
      out.push_back(Data(d, off, std::move(b)));
    }
  }
  return out;
}

class ReplicaStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmr-replica-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    store_dir_ = dir_ + "/vm";
    OpenCatalog();
    ASSERT_TRUE(catalog_->PutVm({kVm, "vm one", ReplicationMode::kReplica, "{}", 0}).ok());
  }
  void TearDown() override {
    store_.reset();
    catalog_.reset();
    fs::remove_all(dir_);
  }
  void OpenCatalog() {
    auto c = Catalog::Open(dir_ + "/catalog.db");
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    catalog_ = std::move(c).value();
  }
  ReplicaStoreOptions Options() {
    ReplicaStoreOptions o;
    o.now_ms = [this] { return now_; };
    // Plain before-images unless a test turns compression (the product's
    // default) on: both entry shapes stay covered.
    o.compress_undo = false;
    return o;
  }
  void Create(ReplicaStoreOptions o) {
    auto s = ReplicaStore::Create(store_dir_, kVm, disks_, catalog_.get(), std::move(o));
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    store_ = std::move(s).value();
  }
  void Reopen(ReplicaStoreOptions o) {
    store_.reset();
    auto s = ReplicaStore::Open(store_dir_, catalog_.get(), std::move(o));
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    store_ = std::move(s).value();
  }
  Image Zeros() const {
    Image img;
    for (const ReplicaDisk& d : disks_) img.emplace_back(d.size, '\0');
    return img;
  }
  Status Apply(uint64_t seq, const std::vector<DeltaRecord>& recs, int64_t t,
               ReplicationType kind = ReplicationType::kRegular) {
    VectorSource src(recs);
    return store_->Apply(seq, {t, kind, "g"}, src);
  }
  // Reads every disk of `seq` and compares it with `want`.
  void ExpectPoint(uint64_t seq, const Image& want) {
    for (uint32_t d = 0; d < want.size(); ++d) {
      std::string got(want[d].size(), 'X');
      Status s = store_->ReadPoint(seq, d, 0, got.size(), got.data());
      ASSERT_TRUE(s.ok()) << "point " << seq << " disk " << d << ": " << s.ToString();
      ASSERT_TRUE(got == want[d]) << "point " << seq << " disk " << d << " differs";
      // Extents: cover the disk; zero extents read as zeros.
      auto ext = store_->PointExtents(seq, d);
      ASSERT_TRUE(ext.ok()) << ext.status().ToString();
      uint64_t pos = 0;
      for (const ReplicaExtent& e : *ext) {
        ASSERT_EQ(e.offset, pos);
        if (e.zero) {
          for (uint64_t k = e.offset; k < e.offset + e.length; ++k)
            ASSERT_EQ(want[d][k], '\0') << "zero extent at " << k;
        }
        pos += e.length;
      }
      ASSERT_EQ(pos, want[d].size());
    }
  }
  std::vector<uint64_t> PointSeqs() {
    std::vector<uint64_t> out;
    for (const ReplicaPoint& p : store_->ListPoints()) out.push_back(p.sequence);
    return out;
  }
  std::vector<uint64_t> CatalogSeqs() {
    std::vector<uint64_t> out;
    auto rows = catalog_->ListRecoveryPoints(kVm);
    EXPECT_TRUE(rows.ok());
    if (!rows.ok()) return out;
    for (const RecoveryPointRecord& r : *rows) out.push_back(r.sequence);
    std::sort(out.begin(), out.end());
    return out;
  }
  std::string SegmentPath(uint64_t seq) {
    char b[32];
    std::snprintf(b, sizeof b, "%020llu.vru", static_cast<unsigned long long>(seq));
    return store_dir_ + "/undo/" + b;
  }

  // A seeded random sequence of deltas under retention; after every step
  // every retained point must read back exactly as the model says, and the
  // catalog must list exactly the retained points.
  void RunModel(ReplicaStoreOptions o, uint64_t seed, int steps) {
    std::mt19937_64 rng(seed);
    Create(o);
    std::map<uint64_t, Image> expected;
    std::map<uint64_t, int64_t> times;
    expected[0] = Zeros();
    times[0] = now_;
    Image cur = Zeros();
    for (int step = 1; step <= steps; ++step) {
      now_ += static_cast<int64_t>(1 + rng() % 25) * kMin;
      auto recs = RandomDelta(rng, disks_);
      ApplyToImage(recs, &cur);
      ReplicationType kind = rng() % 8 == 0 ? ReplicationType::kApplicationConsistent : ReplicationType::kRegular;
      Status s = Apply(static_cast<uint64_t>(step), recs, now_, kind);
      ASSERT_TRUE(s.ok()) << "step " << step << ": " << s.ToString();
      expected[static_cast<uint64_t>(step)] = cur;
      times[static_cast<uint64_t>(step)] = now_;
      if (step % 17 == 0) Reopen(o);
      std::vector<uint64_t> have = PointSeqs();
      ASSERT_FALSE(have.empty());
      ASSERT_EQ(have.back(), static_cast<uint64_t>(step));
      for (const auto& [seq, tm] : times) {
        if (tm >= now_ - o.fine_window_ms) {
          ASSERT_TRUE(std::count(have.begin(), have.end(), seq)) << "fine point " << seq;
        }
      }
      for (uint64_t seq : have) {
        ASSERT_TRUE(expected.count(seq)) << "unknown point " << seq;
        ExpectPoint(seq, expected[seq]);
        if (HasFatalFailure()) return;
      }
      ASSERT_EQ(CatalogSeqs(), have);
      std::set<uint64_t> keep(have.begin(), have.end());
      for (auto it = expected.begin(); it != expected.end();)
        it = keep.count(it->first) ? std::next(it) : expected.erase(it);
      for (auto it = times.begin(); it != times.end();) it = keep.count(it->first) ? std::next(it) : times.erase(it);
    }
  }

  std::string dir_, store_dir_;
  std::unique_ptr<Catalog> catalog_;
  std::unique_ptr<ReplicaStore> store_;
  std::vector<ReplicaDisk> disks_ = {{"vda", 1 << 20}, {"vdb", 256 << 10}};
  int64_t now_ = 100 * kHour;
};

TEST_F(ReplicaStoreTest, CreateRefusesBadInputAndExistingStore) {
  EXPECT_EQ(ReplicaStore::Create(store_dir_, kVm, {{"../x", 4096}}, nullptr, {}).status().code(),
            Code::kInvalidArgument);
  EXPECT_EQ(ReplicaStore::Create(store_dir_, kVm, {{"vda", 4000}}, nullptr, {}).status().code(),
            Code::kInvalidArgument);
  Create(Options());
  store_.reset();
  EXPECT_EQ(ReplicaStore::Create(store_dir_, kVm, disks_, nullptr, {}).status().code(), Code::kAlreadyExists);
  EXPECT_EQ(ReplicaStore::Open(dir_ + "/none", nullptr, {}).status().code(), Code::kNotFound);
}

TEST_F(ReplicaStoreTest, SecondOpenOfTheSameDirectoryIsRefused) {
  Create(Options());
  EXPECT_EQ(ReplicaStore::Open(store_dir_, nullptr, Options()).status().code(), Code::kBusy);
}

TEST_F(ReplicaStoreTest, ConcurrentReaderSeesOldPointUnchangedWhileApplying) {
  Create(Options());
  std::mt19937_64 rng(5);
  std::vector<DeltaRecord> d1 = RandomDelta(rng, disks_);
  ASSERT_TRUE(Apply(1, d1, now_).ok());
  Image img1 = Zeros();
  ApplyToImage(d1, &img1);
  std::atomic<bool> stop{false};
  std::atomic<int> reads{0}, bad{0};
  std::thread reader([&] {
    while (!stop.load()) {
      for (uint32_t d = 0; d < img1.size(); ++d) {
        std::string got(img1[d].size(), 'X');
        if (!store_->ReadPoint(1, d, 0, got.size(), got.data()).ok() || got != img1[d]) ++bad;
      }
      ++reads;
    }
  });
  Image cur = img1;
  for (uint64_t seq = 2; seq <= 12; ++seq) {
    auto recs = RandomDelta(rng, disks_);
    ApplyToImage(recs, &cur);
    ASSERT_TRUE(Apply(seq, recs, now_).ok());
  }
  stop = true;
  reader.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(reads.load(), 0);
  ExpectPoint(12, cur);
}

TEST_F(ReplicaStoreTest, DuplicateAndOutOfSequenceDeltasAreRefused) {
  Create(Options());
  ASSERT_TRUE(Apply(1, {Data(0, 0, "abc")}, now_).ok());
  Status dup = Apply(1, {Data(0, 0, "zzz")}, now_);
  EXPECT_EQ(dup.code(), Code::kFailedPrecondition);
  EXPECT_NE(dup.message().find("duplicate"), std::string::npos) << dup.message();
  Status gap = Apply(3, {Data(0, 0, "zzz")}, now_);
  EXPECT_EQ(gap.code(), Code::kFailedPrecondition);
  EXPECT_NE(gap.message().find("out of sequence"), std::string::npos) << gap.message();
  Image img = Zeros();
  img[0].replace(0, 3, "abc");
  ExpectPoint(1, img);
  EXPECT_EQ(store_->latest_sequence(), 1u);
}

TEST_F(ReplicaStoreTest, SourceFailingMidwayLeavesThePreviousPoint) {
  Create(Options());
  std::vector<DeltaRecord> d1 = {Data(0, 100, std::string(10000, 'a')), Data(1, 0, std::string(5000, 'b'))};
  ASSERT_TRUE(Apply(1, d1, now_).ok());
  Image img1 = Zeros();
  ApplyToImage(d1, &img1);
  std::vector<DeltaRecord> d2 = {Data(0, 0, std::string(70000, 'c')), Zero(1, 0, 8192), Data(0, 500000, "d")};
  VectorSource bad(d2, 2);
  Status s = store_->Apply(2, {now_, ReplicationType::kRegular, ""}, bad);
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.ToString();
  EXPECT_EQ(store_->latest_sequence(), 1u);
  ExpectPoint(1, img1);
  EXPECT_FALSE(fs::exists(SegmentPath(1)));
  // A record outside the disk is refused the same way.
  s = Apply(2, {Data(0, 0, "x"), Data(1, (256 << 10) - 1, "yy")}, now_);
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.ToString();
  ExpectPoint(1, img1);
  // And the delta then applies.
  ASSERT_TRUE(Apply(2, d2, now_).ok());
  Image img2 = img1;
  ApplyToImage(d2, &img2);
  ExpectPoint(2, img2);
  ExpectPoint(1, img1);
  Reopen(Options());
  ExpectPoint(2, img2);
  ExpectPoint(1, img1);
  EXPECT_EQ(CatalogSeqs(), (std::vector<uint64_t>{0, 1, 2}));
}

TEST_F(ReplicaStoreTest, ReadsDuringApplySeeConsistentPoints) {
  Create(Options());
  std::vector<DeltaRecord> d1 = {Data(0, 0, std::string(300000, 'a'))};
  ASSERT_TRUE(Apply(1, d1, now_).ok());
  Image img1 = Zeros();
  ApplyToImage(d1, &img1);
  std::vector<DeltaRecord> d2 = {Data(0, 4000, std::string(20000, 'b')), Zero(0, 0, 100000),
                                 Data(0, 50000, std::string(9000, 'c'))};
  VectorSource src(d2);
  src.between = [&](size_t) {
    ExpectPoint(1, img1);
    ExpectPoint(0, Zeros());
  };
  ASSERT_TRUE(store_->Apply(2, {now_, ReplicationType::kRegular, ""}, src).ok());
  Image img2 = img1;
  ApplyToImage(d2, &img2);
  ExpectPoint(2, img2);
  ExpectPoint(1, img1);
}

TEST_F(ReplicaStoreTest, ModelWithHourlyHistory) {
  ReplicaStoreOptions o = Options();
  o.fine_window_ms = 40 * kMin;
  o.recovery_history_hours = 3;
  RunModel(o, 42, 70);
  // Points older than the history are gone; hourly ones are retained.
  for (const ReplicaPoint& p : store_->ListPoints()) EXPECT_GE(p.time_ms, now_ - 3 * kHour - kHour);
  EXPECT_GT(store_->ListPoints().size(), 3u);
}

TEST_F(ReplicaStoreTest, ModelWithHourlyHistoryAndCompressedUndo) {
  ReplicaStoreOptions o = Options();
  o.fine_window_ms = 40 * kMin;
  o.recovery_history_hours = 3;
  o.compress_undo = true;  // the model's data is patterned: most before-images compress
  RunModel(o, 43, 70);
}

TEST_F(ReplicaStoreTest, ModelLatestOnlyWithByteBudget) {
  ReplicaStoreOptions o = Options();
  o.fine_window_ms = 20 * kMin;
  o.recovery_history_hours = 0;
  o.extended_retention_bytes = 600 << 10;
  RunModel(o, 7, 60);
  // The budget bounds the undo bytes unless only fine points remain.
  uint64_t total = 0;
  for (const auto& e : fs::directory_iterator(store_dir_ + "/undo")) total += fs::file_size(e.path());
  bool extended_left = false;
  auto pts = store_->ListPoints();
  for (size_t i = 0; i + 1 < pts.size(); ++i) extended_left |= pts[i].time_ms < now_ - o.fine_window_ms;
  EXPECT_TRUE(total <= o.extended_retention_bytes || !extended_left) << total;
}

TEST_F(ReplicaStoreTest, ModelFineOnly) {
  ReplicaStoreOptions o = Options();
  o.fine_window_ms = 50 * kMin;
  RunModel(o, 1234, 50);
  for (const ReplicaPoint& p : store_->ListPoints()) EXPECT_GE(p.time_ms, now_ - 50 * kMin);
}

void FlipByte(const std::string& path, off_t at) {
  int fd = ::open(path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0) << path;
  char c = 0;
  ASSERT_EQ(::pread(fd, &c, 1, at), 1);
  c ^= 0x20;
  ASSERT_EQ(::pwrite(fd, &c, 1, at), 1);
  ::close(fd);
}

TEST_F(ReplicaStoreTest, CompressedBeforeImagesAreSmallerAndAFlippedByteIsCorruption) {
  ReplicaStoreOptions o = Options();
  o.compress_undo = true;
  Create(o);
  ASSERT_TRUE(Apply(1, {Data(0, 0, std::string(16 * 4096, 'a'))}, now_).ok());
  ASSERT_TRUE(Apply(2, {Data(0, 0, std::string(16 * 4096, 'b'))}, now_).ok());
  // 16 before-images of 4 KiB of 'a': far less than 16 plain entries.
  EXPECT_LT(fs::file_size(SegmentPath(1)), 16u * 4096 / 4);
  Image img1 = Zeros();
  img1[0].replace(0, 16 * 4096, std::string(16 * 4096, 'a'));
  ExpectPoint(1, img1);
  Reopen(o);
  ExpectPoint(1, img1);
  FlipByte(SegmentPath(1), 64 + 32 + 5);  // inside the first compressed payload
  char buf[16];
  EXPECT_EQ(store_->ReadPoint(1, 0, 0, sizeof buf, buf).code(), Code::kCorruption);
  ASSERT_TRUE(store_->ReadPoint(2, 0, 0, sizeof buf, buf).ok());
  EXPECT_EQ(std::string(buf, 16), std::string(16, 'b'));
}

TEST_F(ReplicaStoreTest, FlippedByteInUndoSegmentIsCorruptionAtOpen) {
  Create(Options());
  std::vector<DeltaRecord> d1 = {Data(0, 0, std::string(9000, 'a'))};
  std::vector<DeltaRecord> d2 = {Data(0, 0, std::string(9000, 'b'))};
  std::vector<DeltaRecord> d3 = {Data(0, 0, std::string(9000, 'c'))};
  ASSERT_TRUE(Apply(1, d1, now_).ok());
  ASSERT_TRUE(Apply(2, d2, now_).ok());
  ASSERT_TRUE(Apply(3, d3, now_).ok());
  Image img3 = Zeros(), img2 = Zeros();
  ApplyToImage(d1, &img2);
  ApplyToImage(d2, &img2);
  img3 = img2;
  ApplyToImage(d3, &img3);
  store_.reset();
  FlipByte(SegmentPath(1), 64 + 32 + 100);  // inside the first before-image
  Reopen(Options());
  char buf[16];
  EXPECT_EQ(store_->ReadPoint(1, 0, 0, sizeof buf, buf).code(), Code::kCorruption);
  EXPECT_EQ(store_->ReadPoint(0, 0, 0, sizeof buf, buf).code(), Code::kCorruption);
  EXPECT_EQ(store_->PointExtents(1, 0).status().code(), Code::kCorruption);
  ExpectPoint(2, img2);
  ExpectPoint(3, img3);
  auto pts = store_->ListPoints();
  ASSERT_EQ(pts.size(), 4u);
  EXPECT_FALSE(pts[0].readable);
  EXPECT_FALSE(pts[1].readable);
  EXPECT_TRUE(pts[2].readable);
  // Applies continue on top of a damaged history.
  ASSERT_TRUE(Apply(4, {Data(1, 0, "x")}, now_).ok());
}

TEST_F(ReplicaStoreTest, FlippedByteInUndoSegmentIsCorruptionAtRead) {
  Create(Options());
  ASSERT_TRUE(Apply(1, {Data(0, 0, std::string(9000, 'a'))}, now_).ok());
  ASSERT_TRUE(Apply(2, {Data(0, 0, std::string(9000, 'b'))}, now_).ok());
  FlipByte(SegmentPath(1), 64 + 32 + 5);
  char buf[16];
  EXPECT_EQ(store_->ReadPoint(1, 0, 0, sizeof buf, buf).code(), Code::kCorruption);
  ASSERT_TRUE(store_->ReadPoint(2, 0, 0, sizeof buf, buf).ok());
  EXPECT_EQ(std::string(buf, 16), std::string(16, 'b'));
}

TEST_F(ReplicaStoreTest, CorruptManifestIsRefused) {
  Create(Options());
  store_.reset();
  FlipByte(store_dir_ + "/MANIFEST", 12);
  EXPECT_EQ(ReplicaStore::Open(store_dir_, nullptr, Options()).status().code(), Code::kCorruption);
}

TEST_F(ReplicaStoreTest, HourlyThinningPrefersAppConsistentAndPlannedPoints) {
  ReplicaStoreOptions o = Options();
  o.fine_window_ms = 10 * kMin;
  o.recovery_history_hours = 5;
  now_ = 20 * kHour;
  Create(o);
  // Hour 20: regular, app-consistent, regular. Hour 21: planned, regular.
  ASSERT_TRUE(Apply(1, {Data(0, 0, "1")}, 20 * kHour + 5 * kMin).ok());
  ASSERT_TRUE(Apply(2, {Data(0, 0, "2")}, 20 * kHour + 20 * kMin, ReplicationType::kApplicationConsistent).ok());
  ASSERT_TRUE(Apply(3, {Data(0, 0, "3")}, 20 * kHour + 40 * kMin).ok());
  ASSERT_TRUE(Apply(4, {Data(0, 0, "4")}, 21 * kHour + 5 * kMin, ReplicationType::kPlanned).ok());
  ASSERT_TRUE(Apply(5, {Data(0, 0, "5")}, 21 * kHour + 30 * kMin).ok());
  now_ = 23 * kHour;
  ASSERT_TRUE(Apply(6, {Data(0, 0, "6")}, now_).ok());
  // Point 0 (hour 20 too, regular) lost to the app-consistent point 2.
  EXPECT_EQ(PointSeqs(), (std::vector<uint64_t>{2, 4, 6}));
  for (uint64_t seq : {2, 4, 6}) {
    char c = 0;
    ASSERT_TRUE(store_->ReadPoint(seq, 0, 0, 1, &c).ok());
    EXPECT_EQ(c, static_cast<char>('0' + seq));
  }
  auto rows = catalog_->ListRecoveryPoints(kVm);
  ASSERT_TRUE(rows.ok());
  ASSERT_EQ(rows->size(), 3u);
  EXPECT_EQ((*rows)[0].kind, 2);
  EXPECT_EQ((*rows)[1].kind, 3);
  EXPECT_EQ((*rows)[2].kind, 1);
  EXPECT_EQ((*rows)[0].id, kVm + "/00000000000000000002");
  // Past the history, everything but the latest goes.
  now_ = 40 * kHour;
  ASSERT_TRUE(store_->ApplyRetention().ok());
  EXPECT_EQ(PointSeqs(), (std::vector<uint64_t>{6}));
  EXPECT_EQ(CatalogSeqs(), (std::vector<uint64_t>{6}));
  EXPECT_TRUE(fs::is_empty(store_dir_ + "/undo"));
}

TEST_F(ReplicaStoreTest, CatalogMirrorCatchesUpAtOpen) {
  ASSERT_TRUE(catalog_->DeleteVm(kVm).ok());
  Create(Options());
  ASSERT_TRUE(Apply(1, {Data(0, 0, "x")}, now_).ok());  // mirror fails: no VM row
  EXPECT_TRUE(CatalogSeqs().empty());
  ASSERT_TRUE(catalog_->PutVm({kVm, "vm one", ReplicationMode::kReplica, "{}", 0}).ok());
  Reopen(Options());
  EXPECT_EQ(CatalogSeqs(), (std::vector<uint64_t>{0, 1}));
}

// Runs Apply(2, recs) in a child killed at the `count`-th call of hook
// step `step`.
void KillChildApplyAt(const std::string& catalog_path, const std::string& store_dir, ReplicaStoreOptions o,
                      const std::vector<DeltaRecord>& recs, const std::string& step, int count) {
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto cat = Catalog::Open(catalog_path);
    if (!cat.ok()) ::_exit(3);
    int seen = 0;
    o.crash_hook = [&](std::string_view s, uint64_t) {
      if (s == step && ++seen == count) ::raise(SIGKILL);
    };
    auto st = ReplicaStore::Open(store_dir, cat->get(), o);
    if (!st.ok()) ::_exit(4);
    VectorSource src(recs);
    Status s = (*st)->Apply(2, {0, ReplicationType::kRegular, ""}, src);
    ::_exit(s.ok() ? 0 : 5);
  }
  int wstatus = 0;
  ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL) << "child was not killed at " << step;
}

TEST_F(ReplicaStoreTest, TornTailOfAnUnfinishedApplyIsIgnoredAtRecovery) {
  Create(Options());
  std::vector<DeltaRecord> d1 = {Data(0, 0, std::string(300000, 'a'))};
  ASSERT_TRUE(Apply(1, d1, now_).ok());
  Image img1 = Zeros();
  ApplyToImage(d1, &img1);
  store_.reset();
  std::vector<DeltaRecord> d2 = {Data(0, 0, std::string(5000, 'b')), Data(0, 100000, std::string(5000, 'c')),
                                 Data(0, 200000, std::string(5000, 'd'))};
  // Killed after the third batch was written but before its fsync and data.
  KillChildApplyAt(dir_ + "/catalog.db", store_dir_, Options(), d2, "undo.fsync:before", 3);
  if (HasFatalFailure()) return;
  ASSERT_EQ(::truncate(SegmentPath(1).c_str(), static_cast<off_t>(fs::file_size(SegmentPath(1)) - 10)), 0);
  Reopen(Options());
  EXPECT_EQ(store_->latest_sequence(), 1u);
  ExpectPoint(1, img1);
  EXPECT_FALSE(fs::exists(SegmentPath(1)));
}

TEST_F(ReplicaStoreTest, CorruptEntryOfAnUnfinishedApplyFailsRecovery) {
  Create(Options());
  std::vector<DeltaRecord> d1 = {Data(0, 0, std::string(300000, 'a'))};
  ASSERT_TRUE(Apply(1, d1, now_).ok());
  store_.reset();
  std::vector<DeltaRecord> d2 = {Data(0, 0, std::string(5000, 'b')), Data(0, 100000, std::string(5000, 'c')),
                                 Data(0, 200000, std::string(5000, 'd'))};
  KillChildApplyAt(dir_ + "/catalog.db", store_dir_, Options(), d2, "disk.write:after", 3);
  if (HasFatalFailure()) return;
  FlipByte(SegmentPath(1), 64 + 32 + 100);  // the first before-image, followed by valid markers
  auto st = ReplicaStore::Open(store_dir_, catalog_.get(), Options());
  EXPECT_EQ(st.status().code(), Code::kCorruption) << st.status().ToString();
}

TEST_F(ReplicaStoreTest, CrashDuringRecoveryRollbackRecovers) {
  Create(Options());
  std::vector<DeltaRecord> d1 = {Data(0, 0, std::string(300000, 'a')), Data(1, 0, std::string(9000, 'e'))};
  ASSERT_TRUE(Apply(1, d1, now_).ok());
  Image img1 = Zeros();
  ApplyToImage(d1, &img1);
  store_.reset();
  catalog_.reset();
  std::vector<DeltaRecord> d2 = {Data(0, 0, std::string(5000, 'b')), Zero(0, 100000, 50000),
                                 Data(1, 4000, std::string(5000, 'd'))};
  // All data written, not yet committed.
  KillChildApplyAt(dir_ + "/catalog.db", store_dir_, Options(), d2, "disk.fsync:before", 1);
  if (HasFatalFailure()) return;
  const std::string snap = dir_ + ".snap";
  fs::remove_all(snap);
  fs::create_directories(snap);
  fs::copy(dir_, snap, fs::copy_options::recursive);
  bool finished = false;
  for (int n = 1; n < 200 && !finished; ++n) {
    fs::remove_all(dir_);
    fs::copy(snap, dir_, fs::copy_options::recursive);
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ReplicaStoreOptions o = Options();
      o.crash_hook = [n](std::string_view, uint64_t k) {
        if (k == static_cast<uint64_t>(n)) ::raise(SIGKILL);
      };
      auto st = ReplicaStore::Open(store_dir_, nullptr, o);
      ::_exit(st.ok() ? 0 : 4);
    }
    int wstatus = 0;
    ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
    if (WIFEXITED(wstatus)) {
      ASSERT_EQ(WEXITSTATUS(wstatus), 0);
      finished = true;
    }
    OpenCatalog();
    Reopen(Options());
    ASSERT_EQ(store_->latest_sequence(), 1u) << "n=" << n;
    ExpectPoint(1, img1);
    ExpectPoint(0, Zeros());
    store_.reset();
    catalog_.reset();
  }
  EXPECT_TRUE(finished);
  fs::remove_all(snap);
  OpenCatalog();
}

// Kills a child applying delta 3 at every hook call in turn; after each kill
// the parent recovers, re-applies, and checks images and catalog.
TEST_F(ReplicaStoreTest, CrashAtEveryStepOfApplyAndRetentionRecovers) {
  ReplicaStoreOptions o = Options();
  o.fine_window_ms = 10 * kMin;
  o.recovery_history_hours = 24;
  o.compress_undo = true;  // rollbacks restore compressed before-images too
  now_ = 7 * kHour;  // point 0 is alone in its hour: kept as an hourly point
  Create(o);
  now_ = 10 * kHour;
  std::mt19937_64 rng(99);
  std::vector<DeltaRecord> d1 = RandomDelta(rng, disks_);
  std::vector<DeltaRecord> d2 = RandomDelta(rng, disks_);
  std::vector<DeltaRecord> d3 = RandomDelta(rng, disks_);
  d3.push_back(Zero(0, 0, 300000));
  d3.push_back(Data(1, 4090, std::string(10000, 'q')));
  ASSERT_TRUE(Apply(1, d1, now_ - 90 * kMin).ok());
  ASSERT_TRUE(Apply(2, d2, now_ - 80 * kMin).ok());
  ASSERT_EQ(PointSeqs(), (std::vector<uint64_t>{0, 2}));  // 1 dropped, its segment carried for 0
  Image img2 = Zeros();
  ApplyToImage(d1, &img2);
  ApplyToImage(d2, &img2);
  Image img3 = img2;
  ApplyToImage(d3, &img3);
  store_.reset();
  catalog_.reset();
  const std::string snap = dir_ + ".snap";
  fs::remove_all(snap);
  fs::create_directories(snap);
  fs::copy(dir_, snap, fs::copy_options::recursive);

  int completed_at = 0;
  for (int n = 1; n < 1000 && completed_at == 0; ++n) {
    fs::remove_all(dir_);
    fs::copy(snap, dir_, fs::copy_options::recursive);
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      auto cat = Catalog::Open(dir_ + "/catalog.db");
      if (!cat.ok()) ::_exit(3);
      ReplicaStoreOptions co = o;
      co.crash_hook = [n](std::string_view, uint64_t k) {
        if (k == static_cast<uint64_t>(n)) ::raise(SIGKILL);
      };
      auto st = ReplicaStore::Open(store_dir_, cat->get(), co);
      if (!st.ok()) ::_exit(4);
      VectorSource src(d3);
      Status s = (*st)->Apply(3, {now_ - 70 * kMin, ReplicationType::kRegular, "g"}, src);
      ::_exit(s.ok() ? 0 : 5);
    }
    int wstatus = 0;
    ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
    if (WIFEXITED(wstatus)) {
      ASSERT_EQ(WEXITSTATUS(wstatus), 0) << "child failed at n=" << n;
      completed_at = n;
    } else {
      ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL);
    }
    OpenCatalog();
    Reopen(o);
    if (store_->latest_sequence() == 2) {
      ExpectPoint(2, img2);
      ASSERT_TRUE(Apply(3, d3, now_ - 70 * kMin).ok()) << "n=" << n;
    } else {
      ASSERT_EQ(store_->latest_sequence(), 3u) << "n=" << n;
      ASSERT_EQ(Apply(3, d3, now_ - 70 * kMin).code(), Code::kFailedPrecondition);
      ASSERT_TRUE(store_->ApplyRetention().ok());
    }
    ASSERT_EQ(PointSeqs(), (std::vector<uint64_t>{0, 3})) << "n=" << n;
    ExpectPoint(0, Zeros());
    ExpectPoint(3, img3);
    ASSERT_EQ(CatalogSeqs(), (std::vector<uint64_t>{0, 3})) << "n=" << n;
    if (HasFatalFailure()) break;
    std::set<std::string> files;
    for (const auto& e : fs::directory_iterator(store_dir_ + "/undo")) files.insert(e.path().filename().string());
    // Point 0's segment and the carried ones of the dropped points 1 and 2:
    // no segment is ever rewritten.
    ASSERT_EQ(files, (std::set<std::string>{fs::path(SegmentPath(0)).filename().string(),
                                            fs::path(SegmentPath(1)).filename().string(),
                                            fs::path(SegmentPath(2)).filename().string()}))
        << "n=" << n;
    store_.reset();
    catalog_.reset();
  }
  EXPECT_GT(completed_at, 20);
  std::printf("apply of delta 3 with retention has %d hook calls\n", completed_at - 1);
  fs::remove_all(snap);
  OpenCatalog();
}

}  // namespace
}  // namespace vmreplica
