#include "vmreplica/replica_store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
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
  void ReadsDuringApplyCheck();
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

// A seed copy moved into the empty store becomes its disk: nothing is
// copied, the store writes the moved file, and a reopened store reads it.
TEST_F(ReplicaStoreTest, AdoptedSeedFileBecomesTheDiskInPlace) {
  Create(Options());
  std::mt19937_64 rng(41);
  Image img = Zeros();
  for (char& c : img[0]) c = static_cast<char>(rng());
  const std::string seed = dir_ + "/seed.raw";
  ASSERT_TRUE(WriteFileAtomic(seed, img[0]).ok());
  struct stat before {};
  ASSERT_EQ(::stat(seed.c_str(), &before), 0);

  // Refusals first: nothing moves.
  const std::string small = dir_ + "/small.raw";
  ASSERT_TRUE(WriteFileAtomic(small, std::string(4096, 'x')).ok());
  EXPECT_EQ(store_->AdoptSeedFile(0, small).code(), Code::kInvalidArgument);
  EXPECT_EQ(store_->AdoptSeedFile(2, seed).code(), Code::kInvalidArgument);
  EXPECT_EQ(store_->AdoptSeedFile(0, dir_ + "/none.raw").code(), Code::kNotFound);
  const std::string link = dir_ + "/seed-link.raw";
  ASSERT_EQ(::link(seed.c_str(), link.c_str()), 0);
  Status linked = store_->AdoptSeedFile(0, seed);
  EXPECT_EQ(linked.code(), Code::kInvalidArgument) << linked.ToString();
  ASSERT_EQ(::unlink(link.c_str()), 0);
  char shm_tmpl[] = "/dev/shm/vmr-seed-XXXXXX";
  ASSERT_NE(::mkdtemp(shm_tmpl), nullptr);
  const std::string elsewhere = std::string(shm_tmpl) + "/seed.raw";
  ASSERT_TRUE(WriteFileAtomic(elsewhere, img[0]).ok());
  struct stat a {}, b {};
  ASSERT_EQ(::stat(shm_tmpl, &a), 0);
  ASSERT_EQ(::stat(dir_.c_str(), &b), 0);
  if (a.st_dev != b.st_dev) {
    Status other_fs = store_->AdoptSeedFile(0, elsewhere);
    EXPECT_EQ(other_fs.code(), Code::kInvalidArgument) << other_fs.ToString();
  }
  fs::remove_all(shm_tmpl);
  Status own = store_->AdoptSeedFile(1, store_->DiskPath(1));
  EXPECT_EQ(own.code(), Code::kInvalidArgument) << own.ToString();

  ASSERT_TRUE(store_->AdoptSeedFile(0, seed).ok());
  EXPECT_FALSE(fs::exists(store_->DiskPath(0) + ".adopt"));
  EXPECT_FALSE(fs::exists(seed));
  struct stat moved {};
  ASSERT_EQ(::stat(store_->DiskPath(0).c_str(), &moved), 0);
  EXPECT_EQ(moved.st_ino, before.st_ino) << "renamed, not copied";
  EXPECT_EQ(moved.st_mode & 0777, 0600u);
  ExpectPoint(0, img);

  // Point 1 is written into the moved file through the store's descriptor.
  std::vector<DeltaRecord> recs = {DataRecord(0, 8192, std::string(4096, 'A')),
                                   DataRecord(1, 0, std::string(4096, 'B'))};
  ApplyToImage(recs, &img);
  ASSERT_TRUE(Apply(1, recs, now_).ok());
  ExpectPoint(1, img);
  auto on_disk = ReadFile(store_->DiskPath(0), 2u << 20);
  ASSERT_TRUE(on_disk.ok());
  EXPECT_TRUE(*on_disk == img[0]);
  Reopen(Options());
  ExpectPoint(1, img);

  // Once a point is committed, no copy can replace a disk.
  const std::string again = dir_ + "/again.raw";
  ASSERT_TRUE(WriteFileAtomic(again, img[0]).ok());
  EXPECT_EQ(store_->AdoptSeedFile(0, again).code(), Code::kFailedPrecondition);
  EXPECT_TRUE(fs::exists(again));
}

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
  for (uint64_t batch : {kDefaultApplyBatchBytes, uint64_t{4096}}) {
    SCOPED_TRACE("apply_batch_bytes " + std::to_string(batch));
    store_.reset();
    fs::remove_all(store_dir_);
    ReplicaStoreOptions o = Options();
    o.apply_batch_bytes = batch;  // 4096: reads between batches, earlier ones written
    Create(o);
    ReadsDuringApplyCheck();
    if (HasFatalFailure()) return;
  }
}

// Reads of the old points from a thread while deltas are applied in small
// batches (the data of a batch is written without the store's lock).
TEST_F(ReplicaStoreTest, ConcurrentReaderSeesOldPointsWhileSmallBatchesApply) {
  ReplicaStoreOptions o = Options();
  o.apply_batch_bytes = 8192;
  o.fine_window_ms = 100 * kHour;
  Create(o);
  std::mt19937_64 rng(8);
  std::vector<DeltaRecord> d1 = {Data(0, 0, std::string(400000, 'a')), Data(1, 20000, std::string(30000, 'b'))};
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
        if (!store_->ReadPoint(0, d, 0, got.size(), got.data()).ok() || got != std::string(got.size(), '\0')) ++bad;
        auto ext = store_->PointExtents(1, d);
        if (!ext.ok()) {
          ++bad;
          continue;
        }
        for (const ReplicaExtent& e : *ext)
          if (e.zero && img1[d].find_first_not_of('\0', e.offset) < e.offset + e.length) ++bad;
      }
      ++reads;
    }
  });
  Image cur = img1;
  for (uint64_t seq = 2; seq <= 8; ++seq) {
    auto recs = RandomDelta(rng, disks_);
    ApplyToImage(recs, &cur);
    ASSERT_TRUE(Apply(seq, recs, now_).ok());
  }
  stop = true;
  reader.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(reads.load(), 0);
  ExpectPoint(8, cur);
  ExpectPoint(1, img1);
}

void ReplicaStoreTest::ReadsDuringApplyCheck() {
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

// After an incompressible before-image the next 7 are stored without trying
// zstd (docs/replica_store.md section 4); compression resumes after them.
// Point 1: 33 blocks of random data, then 31 blocks of 'a'. Block 32 (random)
// is tried and fails, so blocks 33..39 ('a') are stored plain and 40..63
// compressed: the segment is well below 64 plain entries, above 33 + 7.
TEST_F(ReplicaStoreTest, CompressionOfBeforeImagesResumesAfterARunOfIncompressibleOnes) {
  ReplicaStoreOptions o = Options();
  o.compress_undo = true;
  Create(o);
  std::mt19937_64 rng(11);
  std::string first(64 * 4096, 'a');
  for (size_t i = 0; i < 33 * 4096; i += 8) {
    const uint64_t x = rng();
    std::memcpy(&first[i], &x, 8);
  }
  ASSERT_TRUE(Apply(1, {Data(0, 0, first)}, now_).ok());
  ASSERT_TRUE(Apply(2, {Data(0, 0, std::string(64 * 4096, 'b'))}, now_).ok());
  const uint64_t size = fs::file_size(SegmentPath(1));
  EXPECT_GT(size, (33u + 7u) * 4096);
  EXPECT_LT(size, (33u + 7u) * 4096 + 24u * 512);
  Image img1 = Zeros();
  img1[0].replace(0, first.size(), first);
  ExpectPoint(1, img1);
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
  // Killed after the third batch was written but before its fsync and data
  // (batches of 8 KiB: each record, two blocks, is a batch of its own).
  ReplicaStoreOptions small = Options();
  small.apply_batch_bytes = 8192;
  KillChildApplyAt(dir_ + "/catalog.db", store_dir_, small, d2, "undo.fsync:before", 3);
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

// ---- Group commit (issue 8) ---------------------------------------------------

using BlockSet = std::set<std::pair<uint32_t, uint64_t>>;

BlockSet TouchedBlocks(const std::vector<DeltaRecord>& recs) {
  BlockSet out;
  for (const DeltaRecord& r : recs)
    for (uint64_t b = r.offset / 4096; b <= (r.offset + r.length - 1) / 4096; ++b) out.insert({r.disk, b});
  return out;
}

// Counts hook calls by step name (in-process, no crash).
struct StepCounter {
  std::map<std::string, int> n;
  void Attach(ReplicaStoreOptions* o) {
    o->crash_hook = [this](std::string_view s, uint64_t) { ++n[std::string(s)]; };
  }
  int operator()(const std::string& step) const {
    auto it = n.find(step);
    return it == n.end() ? 0 : it->second;
  }
};

// `count` 4 KiB data records on every other block of disk 0, from block `first`.
std::vector<DeltaRecord> ScatteredBlocks(int count, uint64_t first, char fill) {
  std::vector<DeltaRecord> out;
  for (int i = 0; i < count; ++i) {
    const uint64_t block = first + 2 * static_cast<uint64_t>(i);
    out.push_back(Data(0, block * 4096, std::string(4096, static_cast<char>(fill + i))));
  }
  return out;
}

TEST_F(ReplicaStoreTest, MultiRecordApplyDoesOneUndoFsyncPerBatch) {
  StepCounter steps;
  ReplicaStoreOptions o = Options();
  steps.Attach(&o);
  Create(o);
  Image img = Zeros();
  std::vector<DeltaRecord> d1 = {Data(0, 0, std::string(1 << 20, 'p')), Data(1, 0, std::string(256 << 10, 'r'))};
  ApplyToImage(d1, &img);
  ASSERT_TRUE(Apply(1, d1, now_).ok());
  // 100 records of 4 KiB over data: one batch, so one undo fdatasync, and
  // the segment is the header, 100 plain entries, ONE marker, the trailer.
  steps.n.clear();
  std::vector<DeltaRecord> d2 = ScatteredBlocks(100, 0, 'a');
  ApplyToImage(d2, &img);
  ASSERT_TRUE(Apply(2, d2, now_).ok());
  EXPECT_EQ(steps("undo.fsync:before"), 1);
  EXPECT_EQ(steps("disk.write:before"), 100);
  EXPECT_EQ(steps("disk.fsync:before"), 2);  // one per disk
  EXPECT_EQ(fs::file_size(SegmentPath(1)), 64u + 100u * (32 + 4096) + 32 + 32);
  ExpectPoint(2, img);
  // With 16 KiB batches the same shape of delta takes 100 * 4 KiB / 16 KiB
  // = 25 batches: 25 undo fdatasyncs and 25 markers.
  o.apply_batch_bytes = 16384;
  Reopen(o);
  steps.n.clear();
  std::vector<DeltaRecord> d3 = ScatteredBlocks(100, 1, 'k');
  ApplyToImage(d3, &img);
  ASSERT_TRUE(Apply(3, d3, now_).ok());
  EXPECT_EQ(steps("undo.fsync:before"), 25);
  EXPECT_EQ(fs::file_size(SegmentPath(2)), 64u + 100u * (32 + 4096) + 25 * 32 + 32);
  ExpectPoint(3, img);
  Image img2 = Zeros();
  ApplyToImage(d1, &img2);
  ApplyToImage(d2, &img2);
  ExpectPoint(2, img2);
  store_.reset();
  ReplicaStoreOptions bad = Options();
  bad.apply_batch_bytes = 100;
  EXPECT_EQ(ReplicaStore::Open(store_dir_, nullptr, bad).status().code(), Code::kInvalidArgument);
  bad.apply_batch_bytes = kMaxApplyBatchBytes + 1;
  EXPECT_EQ(ReplicaStore::Open(store_dir_, nullptr, bad).status().code(), Code::kInvalidArgument);
}

TEST_F(ReplicaStoreTest, BeforeImagesOfHolesAreCheap) {
  StepCounter steps;
  ReplicaStoreOptions o = Options();
  steps.Attach(&o);
  Create(o);  // sparse disks: every block is a hole
  // Zeroing holes changes nothing: no entry, no undo fdatasync.
  ASSERT_TRUE(Apply(1, {Zero(0, 0, 1 << 20), Zero(1, 4096, 8192)}, now_).ok());
  EXPECT_EQ(steps("undo.fsync:before"), 0);
  EXPECT_EQ(fs::file_size(SegmentPath(0)), 64u + 32);  // header and trailer only
  // Data over holes saves zero entries (32 bytes each, nothing read).
  Image img = Zeros();
  std::vector<DeltaRecord> d2 = {Data(0, 8192, std::string(3 * 4096, 'x')), Zero(0, 0, 4 * 4096),
                                 Data(0, 100, std::string(50, 'y'))};
  ApplyToImage(d2, &img);
  ASSERT_TRUE(Apply(2, d2, now_).ok());
  // Blocks 2, 3, 4 (the data), then block 0 (the second data record; the
  // zero record over blocks 0..1 saved nothing while they were holes).
  EXPECT_EQ(fs::file_size(SegmentPath(1)), 64u + 4 * 32 + 32 + 32);
  ExpectPoint(2, img);
  ExpectPoint(1, Zeros());
  ExpectPoint(0, Zeros());
  auto changed = store_->ChangedSince(1);
  ASSERT_TRUE(changed.ok()) << changed.status().ToString();
  ASSERT_EQ(changed->size(), 2u);
  EXPECT_EQ((*changed)[0].offset, 0u);
  EXPECT_EQ((*changed)[0].length, 4096u);
  EXPECT_EQ((*changed)[1].offset, 8192u);
  EXPECT_EQ((*changed)[1].length, 3u * 4096);
}

// Kills a child applying a delta of several batches (some records split
// across batches) at every hook call in turn; the store must come back at
// the previous point byte for byte, then take the delta.
TEST_F(ReplicaStoreTest, CrashAtEveryStepOfABatchedApplyRecoversThePreviousPoint) {
  ReplicaStoreOptions o = Options();
  o.apply_batch_bytes = 16384;  // four blocks per batch
  Create(o);
  std::vector<DeltaRecord> d1 = {Data(0, 0, std::string(200000, 'a')), Data(1, 8192, std::string(30000, 'b'))};
  ASSERT_TRUE(Apply(1, d1, now_).ok());
  Image img1 = Zeros();
  ApplyToImage(d1, &img1);
  std::vector<DeltaRecord> d2 = {Data(0, 4000, std::string(40000, 'c')),   // 11 blocks: split
                                 Zero(0, 100000, 30000),                   // over data
                                 Zero(0, 600000, 20000),                   // over holes: nothing saved
                                 Data(0, 610000, std::string(5000, 'd')),  // over the same holes
                                 Data(1, 0, std::string(12000, 'e')),      // hole + data blocks
                                 Data(0, 8000, std::string(300, 'f')),     // already saved
                                 Zero(1, 20000, 5000),
                                 Data(0, (1 << 20) - 4096, std::string(4096, 'g'))};
  Image img2 = img1;
  ApplyToImage(d2, &img2);
  store_.reset();
  catalog_.reset();
  const std::string snap = dir_ + ".snap";
  fs::remove_all(snap);
  fs::create_directories(snap);
  fs::copy(dir_, snap, fs::copy_options::recursive);
  int completed_at = 0;
  int undo_fsyncs = 0;
  for (int n = 1; n < 500 && completed_at == 0; ++n) {
    fs::remove_all(dir_);
    fs::copy(snap, dir_, fs::copy_options::recursive);
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ReplicaStoreOptions co = o;
      co.crash_hook = [n](std::string_view, uint64_t k) {
        if (k == static_cast<uint64_t>(n)) ::raise(SIGKILL);
      };
      auto st = ReplicaStore::Open(store_dir_, nullptr, co);
      if (!st.ok()) ::_exit(4);
      VectorSource src(d2);
      Status s = (*st)->Apply(2, {0, ReplicationType::kRegular, ""}, src);
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
    StepCounter steps;
    ReplicaStoreOptions ro = o;
    steps.Attach(&ro);
    Reopen(ro);
    if (store_->latest_sequence() == 1) {
      ExpectPoint(1, img1);
      ExpectPoint(0, Zeros());
      if (HasFatalFailure()) break;
      steps.n.clear();
      ASSERT_TRUE(Apply(2, d2, now_).ok()) << "n=" << n;
      undo_fsyncs = steps("undo.fsync:before");
    } else {
      ASSERT_EQ(store_->latest_sequence(), 2u) << "n=" << n;
    }
    ExpectPoint(2, img2);
    ExpectPoint(1, img1);
    ExpectPoint(0, Zeros());
    if (HasFatalFailure()) break;
    store_.reset();
    catalog_.reset();
  }
  EXPECT_GT(completed_at, 20);
  // 8 records touching 37 blocks: 10 batches of 4 blocks, one undo
  // fdatasync each, but the 6th (blocks 147..150 of the zero record over
  // holes) saves nothing and has none.
  EXPECT_EQ(undo_fsyncs, 9);
  std::printf("batched apply has %d hook calls, %d undo fdatasyncs\n", completed_at - 1, undo_fsyncs);
  fs::remove_all(snap);
  OpenCatalog();
}

// ---- ChangedSince / DropAllButLatest (issue 6) --------------------------------

BlockSet RangesToBlocks(const std::vector<ReplicaRange>& ranges) {
  BlockSet out;
  for (const ReplicaRange& r : ranges)
    for (uint64_t off = r.offset; off < r.offset + r.length; off += 4096) out.insert({r.disk, off / 4096});
  return out;
}

TEST_F(ReplicaStoreTest, ChangedSinceIsTheBlocksWrittenAfterThePoint) {
  ReplicaStoreOptions o = Options();
  o.fine_window_ms = 100 * kHour;  // every point retained
  Create(o);
  std::mt19937_64 rng(17);
  std::map<uint64_t, BlockSet> written;  // delta -> blocks its records touch
  Image cur = Zeros();
  std::map<uint64_t, Image> images = {{0, cur}};
  for (uint64_t seq = 1; seq <= 8; ++seq) {
    std::vector<DeltaRecord> recs;
    for (int i = 0; i < 4; ++i) {  // data records only: every touched block gets a before-image
      uint32_t d = static_cast<uint32_t>(rng() % disks_.size());
      uint64_t len = 1 + rng() % 30000;
      uint64_t off = rng() % (disks_[d].size - len + 1);
      recs.push_back(Data(d, off, std::string(len, static_cast<char>('a' + seq))));
    }
    ApplyToImage(recs, &cur);
    images[seq] = cur;
    written[seq] = TouchedBlocks(recs);
    ASSERT_TRUE(Apply(seq, recs, now_).ok());
  }
  for (uint64_t k = 0; k <= 8; ++k) {
    BlockSet want;
    for (uint64_t j = k + 1; j <= 8; ++j) want.insert(written[j].begin(), written[j].end());
    auto got = store_->ChangedSince(k);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_EQ(RangesToBlocks(*got), want) << "k=" << k;
    for (size_t i = 0; i < got->size(); ++i) {
      const ReplicaRange& r = (*got)[i];
      EXPECT_TRUE(r.offset % 4096 == 0 && r.length % 4096 == 0 && r.length > 0);
      if (i > 0) {  // sorted, coalesced
        const ReplicaRange& p = (*got)[i - 1];
        EXPECT_TRUE(p.disk < r.disk || (p.disk == r.disk && p.offset + p.length < r.offset)) << "k=" << k;
      }
    }
  }
  EXPECT_TRUE(store_->ChangedSince(8)->empty());
  EXPECT_EQ(store_->ChangedSince(9).status().code(), Code::kNotFound);
}

// Under thinning (carried segments) and zero records: the answer lies
// between the blocks that differ and the blocks written, and point k is the
// latest image with point k's bytes read over the answer.
TEST_F(ReplicaStoreTest, ChangedSinceRebuildsEveryRetainedPoint) {
  ReplicaStoreOptions o = Options();
  o.fine_window_ms = 40 * kMin;
  o.recovery_history_hours = 3;
  Create(o);
  std::mt19937_64 rng(23);
  std::map<uint64_t, BlockSet> written;
  std::map<uint64_t, Image> images = {{0, Zeros()}};
  Image cur = Zeros();
  bool saw_carried = false;
  for (uint64_t seq = 1; seq <= 30; ++seq) {
    now_ += static_cast<int64_t>(1 + rng() % 25) * kMin;
    auto recs = RandomDelta(rng, disks_);
    ApplyToImage(recs, &cur);
    images[seq] = cur;
    written[seq] = TouchedBlocks(recs);
    ASSERT_TRUE(Apply(seq, recs, now_).ok());
    std::vector<uint64_t> pts = PointSeqs();
    saw_carried = saw_carried || pts.back() - pts.front() + 1 > pts.size();
    for (uint64_t k : pts) {
      auto got = store_->ChangedSince(k);
      ASSERT_TRUE(got.ok()) << got.status().ToString();
      BlockSet blocks = RangesToBlocks(*got);
      BlockSet touched;
      for (uint64_t j = k + 1; j <= seq; ++j) touched.insert(written[j].begin(), written[j].end());
      for (const auto& blk : blocks) ASSERT_TRUE(touched.count(blk)) << "k=" << k << " block not written";
      Image rebuilt = cur;
      for (uint32_t d = 0; d < disks_.size(); ++d) {
        for (uint64_t b = 0; b < disks_[d].size / 4096; ++b) {
          if (images[k][d].compare(b * 4096, 4096, cur[d], b * 4096, 4096) != 0) {
            ASSERT_TRUE(blocks.count({d, b})) << "k=" << k << " differing block " << d << ":" << b << " missing";
          }
        }
      }
      for (const ReplicaRange& r : *got)
        ASSERT_TRUE(store_->ReadPoint(k, r.disk, r.offset, r.length, rebuilt[r.disk].data() + r.offset).ok());
      ASSERT_TRUE(rebuilt == images[k]) << "k=" << k;
    }
  }
  EXPECT_TRUE(saw_carried);
}

TEST_F(ReplicaStoreTest, DropAllButLatestKeepsOnlyTheLatestPoint) {
  ReplicaStoreOptions o = Options();
  o.fine_window_ms = 100 * kHour;
  Create(o);
  Image cur = Zeros();
  for (uint64_t seq = 1; seq <= 4; ++seq) {
    std::vector<DeltaRecord> recs = {Data(0, seq * 5000, std::string(9000, static_cast<char>('a' + seq))),
                                     Data(1, 0, std::string(100, static_cast<char>('k' + seq)))};
    ApplyToImage(recs, &cur);
    ASSERT_TRUE(Apply(seq, recs, now_).ok());
  }
  ASSERT_EQ(PointSeqs(), (std::vector<uint64_t>{0, 1, 2, 3, 4}));
  ASSERT_TRUE(store_->PinPoint(2).ok());
  ASSERT_TRUE(store_->PinPoint(4).ok());  // the latest may stay pinned
  EXPECT_EQ(store_->DropAllButLatest().code(), Code::kFailedPrecondition);
  EXPECT_EQ(PointSeqs(), (std::vector<uint64_t>{0, 1, 2, 3, 4}));
  ASSERT_TRUE(store_->UnpinPoint(2).ok());
  ASSERT_TRUE(store_->DropAllButLatest().ok());
  EXPECT_EQ(PointSeqs(), (std::vector<uint64_t>{4}));
  EXPECT_TRUE(fs::is_empty(store_dir_ + "/undo"));
  EXPECT_EQ(CatalogSeqs(), (std::vector<uint64_t>{4}));
  ExpectPoint(4, cur);
  EXPECT_TRUE(store_->ChangedSince(4)->empty());
  EXPECT_EQ(store_->ChangedSince(2).status().code(), Code::kNotFound);
  ASSERT_TRUE(store_->DropAllButLatest().ok());  // nothing left to drop
  ASSERT_TRUE(store_->UnpinPoint(4).ok());
  Reopen(o);
  EXPECT_EQ(PointSeqs(), (std::vector<uint64_t>{4}));
  ExpectPoint(4, cur);
  Image img4 = cur;
  std::vector<DeltaRecord> d5 = {Data(0, 0, std::string(5000, 'z'))};
  ApplyToImage(d5, &cur);
  ASSERT_TRUE(Apply(5, d5, now_).ok());
  EXPECT_EQ(PointSeqs(), (std::vector<uint64_t>{4, 5}));
  ExpectPoint(4, img4);
  ExpectPoint(5, cur);
}

// Kills a child at every hook call of DropAllButLatest on a store with
// carried segments: it reopens with either the old points or the latest
// alone, the latest's bytes intact, and no undo file beyond what it needs.
TEST_F(ReplicaStoreTest, CrashAtEveryStepOfDropAllButLatestRecovers) {
  ReplicaStoreOptions o = Options();
  o.fine_window_ms = 10 * kMin;
  o.recovery_history_hours = 24;
  now_ = 7 * kHour;  // point 0 alone in its hour
  Create(o);
  now_ = 10 * kHour;
  std::mt19937_64 rng(31);
  std::map<uint64_t, Image> images = {{0, Zeros()}};
  Image cur = Zeros();
  const int64_t times[] = {now_ - 90 * kMin, now_ - 80 * kMin, now_ - 5 * kMin, now_ - 2 * kMin};
  for (uint64_t seq = 1; seq <= 4; ++seq) {
    auto recs = RandomDelta(rng, disks_);
    ApplyToImage(recs, &cur);
    images[seq] = cur;
    ASSERT_TRUE(Apply(seq, recs, times[seq - 1]).ok());
  }
  const std::vector<uint64_t> before = PointSeqs();
  ASSERT_EQ(before, (std::vector<uint64_t>{0, 2, 3, 4}));  // 1 dropped: its segment is carried
  store_.reset();
  catalog_.reset();
  const std::string snap = dir_ + ".snap";
  fs::remove_all(snap);
  fs::create_directories(snap);
  fs::copy(dir_, snap, fs::copy_options::recursive);
  int completed_at = 0;
  bool saw_old = false, saw_new = false;
  for (int n = 1; n < 100 && completed_at == 0; ++n) {
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
      ::_exit((*st)->DropAllButLatest().ok() ? 0 : 5);
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
    std::vector<uint64_t> pts = PointSeqs();
    std::set<std::string> files;
    for (const auto& e : fs::directory_iterator(store_dir_ + "/undo")) files.insert(e.path().filename().string());
    if (pts == before) {
      saw_old = true;
      for (uint64_t k : pts) ExpectPoint(k, images[k]);
      EXPECT_EQ(files.size(), 4u) << "n=" << n;  // 0, 1 (carried), 2, 3
    } else {
      saw_new = true;
      ASSERT_EQ(pts, (std::vector<uint64_t>{4})) << "n=" << n;
      ExpectPoint(4, images[4]);
      EXPECT_TRUE(files.empty()) << "n=" << n;
    }
    EXPECT_EQ(CatalogSeqs(), pts) << "n=" << n;
    if (HasFatalFailure()) break;
    store_.reset();
    catalog_.reset();
  }
  EXPECT_GT(completed_at, 3);
  EXPECT_TRUE(saw_old);
  EXPECT_TRUE(saw_new);
  fs::remove_all(snap);
  OpenCatalog();
}

// ---- Initial load (docs section 17) ---------------------------------------------

const std::string kLoadGen = "0123456789abcdef0123456789abcdef";

// An initial load cut into chunks; chunk k writes only inside ranges[k]:
// data from an unaligned start, a zero record punched into that data, a
// small data record over part of the zeros, and untouched (hole) bytes at
// both ends.
struct LoadPlan {
  std::vector<std::vector<DeltaRecord>> chunks;
  std::vector<ReplicaRange> ranges;
};

LoadPlan MakeLoadPlan(const std::vector<ReplicaDisk>& disks, uint64_t chunk_bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  LoadPlan p;
  for (uint32_t d = 0; d < disks.size(); ++d) {
    for (uint64_t off = 0; off < disks[d].size; off += chunk_bytes) {
      const uint64_t len = std::min(chunk_bytes, disks[d].size - off);
      const uint64_t a = rng() % 5000;
      const uint64_t b = len - rng() % 9000;
      std::string bytes(b - a, '\0');
      for (char& c : bytes) c = static_cast<char>(1 + rng() % 255);
      const uint64_t z = a + rng() % ((b - a) / 2);
      const uint64_t zl = std::min<uint64_t>(1 + rng() % 20000, b - z - 200);
      std::vector<DeltaRecord> recs = {Data(d, off + a, std::move(bytes)), Zero(d, off + z, zl),
                                       Data(d, off + z + zl / 2, std::string(100, static_cast<char>('k' + d)))};
      p.chunks.push_back(std::move(recs));
      p.ranges.push_back({d, off, len});
    }
  }
  return p;
}

LoadInfo TestLoadInfo(int64_t t) {
  LoadInfo info;
  info.point = {t, ReplicationType::kApplicationConsistent, kLoadGen};
  info.source = "import";
  info.tag = "xxh3:0011223344556677";
  return info;
}

// Reads a range of a disk image file directly (point 0 cannot be read
// through the store during a load).
std::string ReadImageFile(const std::string& path, uint64_t off, uint64_t len) {
  std::string out(len, '\0');
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0) << path;
  if (fd < 0) return out;
  EXPECT_EQ(::pread(fd, out.data(), len, static_cast<off_t>(off)), static_cast<ssize_t>(len));
  ::close(fd);
  return out;
}

class ReplicaLoadTest : public ReplicaStoreTest {
 protected:
  void SetUp() override {
    disks_ = {{"vda", 4 << 20}, {"vdb", 1 << 20}};
    ReplicaStoreTest::SetUp();
    plan_ = MakeLoadPlan(disks_, 512 << 10, 4242);
    image_ = Zeros();
    for (const auto& c : plan_.chunks) ApplyToImage(c, &image_);
  }
  ReplicaStoreOptions LoadOptions() {
    ReplicaStoreOptions o = Options();
    o.load_sync_bytes = 1 << 20;  // a sync about every other chunk
    return o;
  }
  Status LoadChunk(uint64_t k) {
    VectorSource src(plan_.chunks[k]);
    return store_->LoadChunk(k, src);
  }
  std::string LoadPath() const { return store_dir_ + "/LOAD"; }
  void ExpectLoadedPointOne() {
    ASSERT_EQ(store_->latest_sequence(), 1u);
    std::vector<ReplicaPoint> pts = store_->ListPoints();
    ASSERT_EQ(pts.size(), 1u);
    EXPECT_EQ(pts[0].sequence, 1u);
    EXPECT_EQ(pts[0].time_ms, now_ - kMin);
    EXPECT_EQ(pts[0].kind, ReplicationType::kApplicationConsistent);
    EXPECT_EQ(pts[0].generation_id, kLoadGen);
    EXPECT_FALSE(store_->load_state().has_value());
    EXPECT_FALSE(fs::exists(LoadPath()));
    ExpectPoint(1, image_);
  }

  LoadPlan plan_;
  Image image_;
};

TEST_F(ReplicaLoadTest, LoadedChunksBecomePointOneExactlyAndLaterDeltasApplyOnTop) {
  StepCounter steps;
  ReplicaStoreOptions o = LoadOptions();
  steps.Attach(&o);
  Create(o);
  ASSERT_EQ(plan_.chunks.size(), 10u);
  EXPECT_FALSE(store_->load_state().has_value());
  ASSERT_TRUE(store_->BeginLoad(TestLoadInfo(now_ - kMin)).ok());
  ASSERT_TRUE(fs::exists(LoadPath()));
  auto st = store_->load_state();
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->done_chunks, 0u);
  EXPECT_EQ(st->info.source, "import");
  EXPECT_EQ(st->info.tag, "xxh3:0011223344556677");
  EXPECT_EQ(st->info.point.generation_id, kLoadGen);
  for (uint64_t k = 0; k < plan_.chunks.size(); ++k) ASSERT_TRUE(LoadChunk(k).ok()) << k;
  // About 500 KiB of data per chunk and a sync per MiB: LOAD moved on.
  st = store_->load_state();
  ASSERT_TRUE(st.has_value());
  EXPECT_GE(st->done_chunks, 4u);
  EXPECT_LT(st->done_chunks, 10u);
  EXPECT_EQ(steps("undo.create:before"), 0);  // no undo at all
  ASSERT_TRUE(store_->FinishLoad().ok());
  ExpectLoadedPointOne();
  EXPECT_EQ(CatalogSeqs(), (std::vector<uint64_t>{1}));
  auto rows = catalog_->ListRecoveryPoints(kVm);
  ASSERT_TRUE(rows.ok());
  ASSERT_EQ(rows->size(), 1u);
  EXPECT_EQ((*rows)[0].generation_id, kLoadGen);
  std::set<std::string> undo;
  for (const auto& e : fs::directory_iterator(store_dir_ + "/undo")) undo.insert(e.path().filename().string());
  EXPECT_TRUE(undo.empty());

  // Deltas on top: undo, points, reads of both.
  std::mt19937_64 rng(5);
  std::vector<DeltaRecord> d2 = RandomDelta(rng, disks_);
  d2.push_back(Zero(0, 8192, 200000));
  Image img2 = image_;
  ApplyToImage(d2, &img2);
  ASSERT_TRUE(Apply(2, d2, now_).ok());
  ExpectPoint(1, image_);
  ExpectPoint(2, img2);
  EXPECT_EQ(PointSeqs(), (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(CatalogSeqs(), (std::vector<uint64_t>{1, 2}));
  Reopen(o);
  ExpectPoint(1, image_);
  ExpectPoint(2, img2);
  auto changed = store_->ChangedSince(1);
  ASSERT_TRUE(changed.ok());
  EXPECT_FALSE(changed->empty());
}

TEST_F(ReplicaLoadTest, LoadCallsOutOfOrderOrBadInputAreRefused) {
  ReplicaStoreOptions bad = LoadOptions();
  bad.load_sync_bytes = (1 << 20) - 1;
  EXPECT_EQ(ReplicaStore::Create(store_dir_, kVm, disks_, nullptr, bad).status().code(), Code::kInvalidArgument);
  bad.load_sync_bytes = (uint64_t{16} << 30) + 1;
  EXPECT_EQ(ReplicaStore::Create(store_dir_, kVm, disks_, nullptr, bad).status().code(), Code::kInvalidArgument);
  Create(LoadOptions());

  VectorSource empty({});
  EXPECT_EQ(store_->LoadChunk(0, empty).code(), Code::kFailedPrecondition);  // no load
  EXPECT_EQ(store_->SyncLoad().code(), Code::kFailedPrecondition);
  EXPECT_EQ(store_->FinishLoad().code(), Code::kFailedPrecondition);
  EXPECT_EQ(store_->AbandonLoad().code(), Code::kFailedPrecondition);

  LoadInfo info = TestLoadInfo(now_ - kMin);
  info.source = "tape";
  EXPECT_EQ(store_->BeginLoad(info).code(), Code::kInvalidArgument);
  info = TestLoadInfo(now_ - kMin);
  info.point.generation_id = "0123";
  EXPECT_EQ(store_->BeginLoad(info).code(), Code::kInvalidArgument);
  info.point.generation_id = std::string(31, 'a') + "z";
  EXPECT_EQ(store_->BeginLoad(info).code(), Code::kInvalidArgument);
  info = TestLoadInfo(now_ - kMin);
  info.tag = "bad\ntag";
  EXPECT_EQ(store_->BeginLoad(info).code(), Code::kInvalidArgument);
  info.tag = std::string(257, 'a');
  EXPECT_EQ(store_->BeginLoad(info).code(), Code::kInvalidArgument);
  info = TestLoadInfo(now_ - kMin);
  info.point.kind = static_cast<ReplicationType>(4);
  EXPECT_EQ(store_->BeginLoad(info).code(), Code::kInvalidArgument);
  EXPECT_FALSE(fs::exists(LoadPath()));

  // A pinned point 0 (an export) refuses the load.
  ASSERT_TRUE(store_->PinPoint(0).ok());
  EXPECT_EQ(store_->BeginLoad(TestLoadInfo(now_ - kMin)).code(), Code::kFailedPrecondition);
  ASSERT_TRUE(store_->UnpinPoint(0).ok());

  ASSERT_TRUE(store_->BeginLoad(TestLoadInfo(now_ - kMin)).ok());
  EXPECT_EQ(store_->BeginLoad(TestLoadInfo(now_ - kMin)).code(), Code::kFailedPrecondition);
  EXPECT_EQ(LoadChunk(1).code(), Code::kFailedPrecondition);  // chunk 0 first

  // Point 0 is no longer "empty": refused while the load runs.
  std::string buf(4096, 'X');
  EXPECT_EQ(store_->ReadPoint(0, 0, 0, buf.size(), buf.data()).code(), Code::kFailedPrecondition);
  EXPECT_EQ(store_->PointExtents(0, 0).status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(store_->ChangedSince(0).status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(store_->PinPoint(0).code(), Code::kFailedPrecondition);
  EXPECT_EQ(store_->DropAllButLatest().code(), Code::kFailedPrecondition);
  EXPECT_EQ(Apply(1, {Data(0, 0, "x")}, now_).code(), Code::kFailedPrecondition);

  // An out-of-bounds record: nothing of it written, the chunk not counted.
  const uint64_t size0 = disks_[0].size;
  {
    // (A chunk is retried with the same records: its first one is chunk 0's.)
    VectorSource src({plan_.chunks[0][0], Data(0, size0 - 100, std::string(200, 'b'))});
    EXPECT_EQ(store_->LoadChunk(0, src).code(), Code::kInvalidArgument);
  }
  EXPECT_EQ(ReadImageFile(store_->DiskPath(0), size0 - 100, 100), std::string(100, '\0'));
  {
    VectorSource src({Zero(1, disks_[1].size, 4096)});
    EXPECT_EQ(store_->LoadChunk(0, src).code(), Code::kInvalidArgument);
    VectorSource src2({Data(2, 0, "x")});
    EXPECT_EQ(store_->LoadChunk(0, src2).code(), Code::kInvalidArgument);
  }
  // A failing source: the chunk counts as not written; the same index again.
  {
    VectorSource src(plan_.chunks[0], 1);
    EXPECT_EQ(store_->LoadChunk(0, src).code(), Code::kUnavailable);
  }
  for (uint64_t k = 0; k < plan_.chunks.size(); ++k) ASSERT_TRUE(LoadChunk(k).ok()) << k;
  EXPECT_EQ(LoadChunk(3).code(), Code::kFailedPrecondition);  // already written
  ASSERT_TRUE(store_->FinishLoad().ok());
  ExpectLoadedPointOne();

  // Once at point 1 there is nothing to load.
  EXPECT_EQ(store_->BeginLoad(TestLoadInfo(now_)).code(), Code::kFailedPrecondition);
  EXPECT_EQ(store_->FinishLoad().code(), Code::kFailedPrecondition);
  VectorSource src({Data(0, 0, "x")});
  EXPECT_EQ(store_->LoadChunk(0, src).code(), Code::kFailedPrecondition);
  // And a store that applied deltas the ordinary way refuses one too.
  store_.reset();
  fs::remove_all(store_dir_);
  Create(LoadOptions());
  ASSERT_TRUE(Apply(1, {Data(0, 0, "x")}, now_).ok());
  EXPECT_EQ(store_->BeginLoad(TestLoadInfo(now_)).code(), Code::kFailedPrecondition);
}

TEST_F(ReplicaLoadTest, AbandonedLoadLeavesEmptyDisksAndANewLoadWorks) {
  Create(LoadOptions());
  ASSERT_TRUE(store_->BeginLoad(TestLoadInfo(now_ - kMin)).ok());
  for (uint64_t k = 0; k < 5; ++k) ASSERT_TRUE(LoadChunk(k).ok()) << k;
  ASSERT_TRUE(store_->SyncLoad().ok());
  EXPECT_EQ(store_->load_state()->done_chunks, 5u);
  ASSERT_TRUE(store_->AbandonLoad().ok());
  EXPECT_FALSE(store_->load_state().has_value());
  EXPECT_FALSE(fs::exists(LoadPath()));
  EXPECT_EQ(store_->latest_sequence(), 0u);
  for (uint32_t d = 0; d < disks_.size(); ++d)
    EXPECT_TRUE(ReadImageFile(store_->DiskPath(d), 0, disks_[d].size) == std::string(disks_[d].size, '\0')) << d;
  ExpectPoint(0, Zeros());
  Reopen(LoadOptions());
  EXPECT_FALSE(store_->load_state().has_value());
  ExpectPoint(0, Zeros());

  ASSERT_TRUE(store_->BeginLoad(TestLoadInfo(now_ - kMin)).ok());
  for (uint64_t k = 0; k < plan_.chunks.size(); ++k) ASSERT_TRUE(LoadChunk(k).ok()) << k;
  ASSERT_TRUE(store_->FinishLoad().ok());
  ExpectLoadedPointOne();
}

TEST_F(ReplicaLoadTest, OpenFindsTheLoadAndItContinuesFromDoneChunks) {
  Create(LoadOptions());
  ASSERT_TRUE(store_->BeginLoad(TestLoadInfo(now_ - kMin)).ok());
  for (uint64_t k = 0; k < 6; ++k) ASSERT_TRUE(LoadChunk(k).ok()) << k;
  ASSERT_TRUE(store_->SyncLoad().ok());
  ASSERT_TRUE(LoadChunk(6).ok());  // written but not synced: not in LOAD
  Reopen(LoadOptions());
  auto st = store_->load_state();
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->done_chunks, 6u);
  EXPECT_EQ(st->info.point.generation_id, kLoadGen);
  EXPECT_EQ(st->info.point.time_ms, now_ - kMin);
  EXPECT_EQ(st->info.point.kind, ReplicationType::kApplicationConsistent);
  EXPECT_EQ(st->info.tag, "xxh3:0011223344556677");
  EXPECT_EQ(store_->latest_sequence(), 0u);
  std::string buf(10, 'X');
  EXPECT_EQ(store_->ReadPoint(0, 0, 0, buf.size(), buf.data()).code(), Code::kFailedPrecondition);
  EXPECT_EQ(Apply(1, {Data(0, 0, "x")}, now_).code(), Code::kFailedPrecondition);
  EXPECT_EQ(LoadChunk(7).code(), Code::kFailedPrecondition);
  for (uint64_t k = 6; k < plan_.chunks.size(); ++k) ASSERT_TRUE(LoadChunk(k).ok()) << k;
  ASSERT_TRUE(store_->FinishLoad().ok());
  ExpectLoadedPointOne();
  Reopen(LoadOptions());
  ExpectLoadedPointOne();
  EXPECT_EQ(CatalogSeqs(), (std::vector<uint64_t>{1}));
}

TEST_F(ReplicaLoadTest, CorruptLoadRecordIsCorruptionAtOpen) {
  Create(LoadOptions());
  ASSERT_TRUE(store_->BeginLoad(TestLoadInfo(now_ - kMin)).ok());
  store_.reset();
  auto good = ReadFile(LoadPath());
  ASSERT_TRUE(good.ok());
  ASSERT_NE(good->find("\"done_chunks\":0"), std::string::npos) << *good;
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = *good;
    size_t at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos) s.replace(at, from.size(), to);
    return s;
  };
  const std::vector<std::string> bad = {
      "",
      "{",
      "[1,2]",
      with("\"version\":1", "\"version\":2"),
      with("\"sequence\":1", "\"sequence\":2"),
      with("\"done_chunks\":0", "\"done_chunks\":-1"),
      with("\"done_chunks\":0", "\"done_chunks\":\"0\""),
      with("\"kind\":2", "\"kind\":9"),
      with("\"source\":\"import\"", "\"source\":\"tape\""),
      with(kLoadGen, "0123"),
      with("\"tag\":", "\"other\":1,\"tag\":"),
      with("\"tag\":\"xxh3:0011223344556677\",", ""),
      with("\"tag\":\"xxh3:0011223344556677\"", "\"tag\":\"a\\u0001b\""),
      with("\"cut_time_unix_ms\":" + std::to_string(now_ - kMin), "\"cut_time_unix_ms\":1.5"),
      std::string(5000, ' ') + *good,
  };
  for (const std::string& content : bad) {
    std::ofstream(LoadPath(), std::ios::binary | std::ios::trunc) << content;
    auto s = ReplicaStore::Open(store_dir_, catalog_.get(), LoadOptions());
    ASSERT_FALSE(s.ok()) << content;
    EXPECT_EQ(s.status().code(), Code::kCorruption) << content;
    EXPECT_NE(s.status().message().find("LOAD"), std::string::npos) << s.status().ToString();
  }
  std::ofstream(LoadPath(), std::ios::binary | std::ios::trunc) << *good;
  Reopen(LoadOptions());
  ASSERT_TRUE(store_->load_state().has_value());
}

// SIGKILL at every hook call of BeginLoad, LoadChunk (with syncs), SyncLoad
// and FinishLoad: Open finds nothing begun, a load in progress whose durable
// chunks are intact, or point 1 committed; either way the load finishes
// with the exact image.
TEST_F(ReplicaLoadTest, CrashAtEveryStepOfALoadRecovers) {
  ReplicaStoreOptions o = LoadOptions();
  Create(o);
  store_.reset();
  catalog_.reset();
  const std::string snap = dir_ + ".snap";
  fs::remove_all(snap);
  fs::create_directories(snap);
  fs::copy(dir_, snap, fs::copy_options::recursive);
  const uint64_t nchunks = plan_.chunks.size();
  int completed_at = 0;
  int saw_nothing = 0, saw_load = 0, saw_committed = 0, saw_partial = 0;
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
      if (!(*st)->BeginLoad(TestLoadInfo(now_ - kMin)).ok()) ::_exit(5);
      for (uint64_t k = 0; k < nchunks; ++k) {
        VectorSource src(plan_.chunks[k]);
        if (!(*st)->LoadChunk(k, src).ok()) ::_exit(6);
        if (k == 2 && !(*st)->SyncLoad().ok()) ::_exit(7);
      }
      ::_exit((*st)->FinishLoad().ok() ? 0 : 8);
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
    auto st = store_->load_state();
    if (st) {
      ++saw_load;
      ASSERT_EQ(store_->latest_sequence(), 0u) << "n=" << n;
      ASSERT_LE(st->done_chunks, nchunks) << "n=" << n;
      EXPECT_EQ(st->info.point.generation_id, kLoadGen);
      if (st->done_chunks > 0 && st->done_chunks < nchunks) ++saw_partial;
      for (uint64_t k = 0; k < st->done_chunks; ++k) {
        const ReplicaRange& r = plan_.ranges[k];
        ASSERT_TRUE(ReadImageFile(store_->DiskPath(r.disk), r.offset, r.length) ==
                    image_[r.disk].substr(r.offset, r.length))
            << "chunk " << k << " of " << st->done_chunks << " durable ones differs, n=" << n;
      }
      for (uint64_t k = st->done_chunks; k < nchunks; ++k) ASSERT_TRUE(LoadChunk(k).ok()) << "n=" << n;
      ASSERT_TRUE(store_->FinishLoad().ok()) << "n=" << n;
    } else if (store_->latest_sequence() == 0) {
      ++saw_nothing;  // killed before LOAD was renamed into place
      ASSERT_FALSE(fs::exists(LoadPath()));
      ASSERT_TRUE(store_->BeginLoad(TestLoadInfo(now_ - kMin)).ok()) << "n=" << n;
      for (uint64_t k = 0; k < nchunks; ++k) ASSERT_TRUE(LoadChunk(k).ok()) << "n=" << n;
      ASSERT_TRUE(store_->FinishLoad().ok()) << "n=" << n;
    } else {
      ++saw_committed;
    }
    ExpectLoadedPointOne();
    ASSERT_EQ(CatalogSeqs(), (std::vector<uint64_t>{1})) << "n=" << n;
    if (HasFatalFailure()) break;
    store_.reset();
    catalog_.reset();
  }
  EXPECT_GT(completed_at, 40);
  EXPECT_GT(saw_nothing, 0);
  EXPECT_GT(saw_partial, 0);
  EXPECT_GT(saw_load, saw_partial);
  EXPECT_GT(saw_committed, 0);  // a crash after the MANIFEST rename, before LOAD's unlink
  std::printf("initial load of %llu chunks has %d hook calls\n", static_cast<unsigned long long>(nchunks),
              completed_at - 1);
  fs::remove_all(snap);
  OpenCatalog();
}

// SIGKILL at every hook call of AbandonLoad: the load is still there (at
// done_chunks 0 once LOAD was rewritten) or gone with empty disks.
TEST_F(ReplicaLoadTest, CrashAtEveryStepOfAbandonLoadRecovers) {
  ReplicaStoreOptions o = LoadOptions();
  Create(o);
  ASSERT_TRUE(store_->BeginLoad(TestLoadInfo(now_ - kMin)).ok());
  for (uint64_t k = 0; k < 4; ++k) ASSERT_TRUE(LoadChunk(k).ok()) << k;
  ASSERT_TRUE(store_->SyncLoad().ok());
  store_.reset();
  catalog_.reset();
  const std::string snap = dir_ + ".snap";
  fs::remove_all(snap);
  fs::create_directories(snap);
  fs::copy(dir_, snap, fs::copy_options::recursive);
  int completed_at = 0;
  bool saw_four = false, saw_zero = false, saw_gone = false;
  for (int n = 1; n < 100 && completed_at == 0; ++n) {
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
      ::_exit((*st)->AbandonLoad().ok() ? 0 : 5);
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
    auto st = store_->load_state();
    if (st) {
      ASSERT_TRUE(st->done_chunks == 4 || st->done_chunks == 0) << "n=" << n;
      (st->done_chunks == 4 ? saw_four : saw_zero) = true;
      for (uint64_t k = 0; k < st->done_chunks; ++k) {
        const ReplicaRange& r = plan_.ranges[k];
        ASSERT_TRUE(ReadImageFile(store_->DiskPath(r.disk), r.offset, r.length) ==
                    image_[r.disk].substr(r.offset, r.length))
            << "chunk " << k << ", n=" << n;
      }
      ASSERT_TRUE(store_->AbandonLoad().ok()) << "n=" << n;
    } else {
      saw_gone = true;
    }
    ASSERT_EQ(store_->latest_sequence(), 0u);
    ExpectPoint(0, Zeros());
    ASSERT_EQ(CatalogSeqs(), (std::vector<uint64_t>{0})) << "n=" << n;
    if (HasFatalFailure()) break;
    store_.reset();
    catalog_.reset();
  }
  EXPECT_GT(completed_at, 5);
  EXPECT_TRUE(saw_four);
  EXPECT_TRUE(saw_zero);
  EXPECT_TRUE(saw_gone);
  fs::remove_all(snap);
  OpenCatalog();
}

// ---- Adoption (docs section 18) --------------------------------------------------

const std::string kAdoptGen = "fedcba9876543210fedcba9876543210";

class ReplicaAdoptTest : public ReplicaStoreTest {
 protected:
  PointInfo AdoptInfo() const { return {now_ - 5 * kMin, ReplicationType::kPlanned, kAdoptGen}; }
  std::string DiskFile(const std::string& name) const { return store_dir_ + "/disks/" + name + ".img"; }
  // What the caller of Adopt does: raw files at <dir>/disks/<name>.img,
  // sparse (all-zero blocks are left as holes).
  void PlaceFiles(const std::vector<ReplicaDisk>& disks, const Image& img) {
    fs::create_directories(store_dir_ + "/disks");
    for (size_t d = 0; d < disks.size(); ++d) {
      const std::string path = DiskFile(disks[d].name);
      int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      ASSERT_GE(fd, 0) << path;
      ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(disks[d].size)), 0);
      for (uint64_t off = 0; off < disks[d].size; off += 4096) {
        const std::string block = img[d].substr(off, 4096);
        if (block == std::string(4096, '\0')) continue;
        ASSERT_EQ(::pwrite(fd, block.data(), block.size(), static_cast<off_t>(off)), 4096);
      }
      ::close(fd);
    }
  }
  // Random content with holes, zero runs and unaligned data.
  Image RandomImage(uint64_t seed) const {
    std::mt19937_64 rng(seed);
    Image img = Zeros();
    for (int i = 0; i < 6; ++i) ApplyToImage(RandomDelta(rng, disks_), &img);
    return img;
  }
  Result<std::unique_ptr<ReplicaStore>> Adopt(uint64_t seq, ReplicaStoreOptions o) {
    return ReplicaStore::Adopt(store_dir_, kVm, disks_, seq, AdoptInfo(), catalog_.get(), std::move(o));
  }
  void AdoptOk(uint64_t seq, ReplicaStoreOptions o) {
    store_.reset();
    auto s = Adopt(seq, std::move(o));
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    store_ = std::move(s).value();
  }
  std::set<std::string> UndoFiles() const {
    std::set<std::string> out;
    for (const auto& e : fs::directory_iterator(store_dir_ + "/undo")) out.insert(e.path().filename().string());
    return out;
  }
  // The store holds point `seq` alone, as Adopt recorded it, reading `img`;
  // no undo file, no ADOPT; the catalog mirrors it.
  void ExpectAdopted(uint64_t seq, const Image& img) {
    ASSERT_EQ(store_->latest_sequence(), seq);
    std::vector<ReplicaPoint> pts = store_->ListPoints();
    ASSERT_EQ(pts.size(), 1u);
    EXPECT_EQ(pts[0].sequence, seq);
    EXPECT_EQ(pts[0].time_ms, AdoptInfo().time_ms);
    EXPECT_EQ(pts[0].kind, ReplicationType::kPlanned);
    EXPECT_EQ(pts[0].generation_id, kAdoptGen);
    EXPECT_TRUE(UndoFiles().empty());
    EXPECT_FALSE(fs::exists(store_dir_ + "/ADOPT"));
    ExpectPoint(seq, img);
    auto rows = catalog_->ListRecoveryPoints(kVm);
    ASSERT_TRUE(rows.ok());
    ASSERT_EQ(rows->size(), 1u);
    EXPECT_EQ((*rows)[0].sequence, seq);
    EXPECT_EQ((*rows)[0].generation_id, kAdoptGen);
    EXPECT_EQ((*rows)[0].time_ms, AdoptInfo().time_ms);
    EXPECT_EQ((*rows)[0].kind, static_cast<uint16_t>(ReplicationType::kPlanned));
  }
  // A store of three disks (vdc is not adopted later) with points 0..4 and
  // undo segments 0..3; images[k] is point k (disks vda, vdb only).
  void MakeOldStore(ReplicaStoreOptions o, std::map<uint64_t, Image>* images) {
    const std::vector<ReplicaDisk> adopted = disks_;
    disks_.push_back({"vdc", 64 << 10});
    Create(o);
    std::mt19937_64 rng(77);
    Image cur = Zeros();
    (*images)[0] = cur;
    for (uint64_t seq = 1; seq <= 4; ++seq) {
      auto recs = RandomDelta(rng, disks_);
      recs.push_back(Data(2, 4096 * seq, std::string(5000, static_cast<char>('p' + seq))));
      ApplyToImage(recs, &cur);
      (*images)[seq] = cur;
      ASSERT_TRUE(Apply(seq, recs, now_ - static_cast<int64_t>(10 - seq) * kMin).ok());
    }
    ASSERT_EQ(PointSeqs(), (std::vector<uint64_t>{0, 1, 2, 3, 4}));
    ASSERT_EQ(UndoFiles().size(), 4u);
    for (auto& [seq, img] : *images) img.resize(adopted.size());
    disks_ = adopted;
  }
};

TEST_F(ReplicaAdoptTest, AdoptIntoANewDirectoryMakesTheFilesTheOnlyPoint) {
  const Image img = RandomImage(11);
  PlaceFiles(disks_, img);
  ASSERT_FALSE(fs::exists(store_dir_ + "/MANIFEST"));
  StepCounter steps;
  ReplicaStoreOptions o = Options();
  steps.Attach(&o);
  AdoptOk(1, o);
  ExpectAdopted(1, img);
  EXPECT_EQ(steps("manifest.write:before"), 1);
  EXPECT_EQ(steps("disk.fsync:before"), 2);
  EXPECT_EQ(steps("undo.create:before"), 0);
  // The next delta is 2, on top of the adopted point.
  EXPECT_EQ(Apply(1, {Data(0, 0, "x")}, now_).code(), Code::kFailedPrecondition);
  EXPECT_EQ(Apply(3, {Data(0, 0, "x")}, now_).code(), Code::kFailedPrecondition);
  std::mt19937_64 rng(12);
  auto d2 = RandomDelta(rng, disks_);
  Image img2 = img;
  ApplyToImage(d2, &img2);
  ASSERT_TRUE(Apply(2, d2, now_).ok());
  EXPECT_EQ(PointSeqs(), (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(store_->ListPoints()[0].generation_id, kAdoptGen);
  EXPECT_EQ(CatalogSeqs(), (std::vector<uint64_t>{1, 2}));
  ExpectPoint(1, img);
  ExpectPoint(2, img2);
  Reopen(o);
  EXPECT_EQ(store_->ListPoints()[0].generation_id, kAdoptGen);
  ExpectPoint(1, img);
  ExpectPoint(2, img2);
}

TEST_F(ReplicaAdoptTest, AdoptAnyLaterSequenceAndAgainIsIdempotent) {
  const Image img = RandomImage(13);
  PlaceFiles(disks_, img);
  AdoptOk(41, Options());
  ExpectAdopted(41, img);
  AdoptOk(41, Options());  // the same call again: the same store
  ExpectAdopted(41, img);
  ASSERT_TRUE(Apply(42, {Data(1, 100, "abc")}, now_).ok());
  EXPECT_EQ(PointSeqs(), (std::vector<uint64_t>{41, 42}));
  ExpectPoint(41, img);
}

// The old store's point 1 has segment undo/1.vru: with point 1 adopted it
// must be deleted as an orphan, never rolled back as an unfinished apply.
TEST_F(ReplicaAdoptTest, AdoptOverAnExistingStoreDiscardsItsPointsAndSegments) {
  ReplicaStoreOptions o = Options();
  o.fine_window_ms = 100 * kHour;
  std::map<uint64_t, Image> old;
  MakeOldStore(o, &old);
  store_.reset();
  ASSERT_TRUE(fs::exists(DiskFile("vdc")));
  const Image img = RandomImage(17);
  PlaceFiles(disks_, img);
  AdoptOk(1, o);
  ExpectAdopted(1, img);
  EXPECT_FALSE(fs::exists(DiskFile("vdc")));  // the old store's disk that is not adopted
  EXPECT_EQ(store_->disks().size(), 2u);
  auto changed = store_->ChangedSince(1);
  ASSERT_TRUE(changed.ok());
  EXPECT_TRUE(changed->empty());
  for (uint64_t gone : {0, 2, 3, 4}) {
    std::string buf(10, 'X');
    EXPECT_EQ(store_->ReadPoint(gone, 0, 0, buf.size(), buf.data()).code(), Code::kNotFound) << gone;
  }
  std::mt19937_64 rng(18);
  Image cur = img;
  std::map<uint64_t, Image> images = {{1, img}};
  for (uint64_t seq = 2; seq <= 4; ++seq) {
    auto recs = RandomDelta(rng, disks_);
    ApplyToImage(recs, &cur);
    images[seq] = cur;
    ASSERT_TRUE(Apply(seq, recs, now_).ok()) << seq;
  }
  Reopen(o);
  EXPECT_EQ(PointSeqs(), (std::vector<uint64_t>{1, 2, 3, 4}));
  EXPECT_EQ(CatalogSeqs(), (std::vector<uint64_t>{1, 2, 3, 4}));
  for (const auto& [seq, want] : images) ExpectPoint(seq, want);
  EXPECT_EQ(store_->ListPoints()[0].generation_id, kAdoptGen);
}

TEST_F(ReplicaAdoptTest, RefusalsLeaveTheDirectoryAsItWas) {
  const Image img = RandomImage(19);
  // Bad arguments: nothing is looked at.
  auto code = [&](const std::vector<ReplicaDisk>& disks, uint64_t seq, const PointInfo& info) {
    return ReplicaStore::Adopt(store_dir_, kVm, disks, seq, info, catalog_.get(), Options()).status().code();
  };
  EXPECT_EQ(code(disks_, 0, AdoptInfo()), Code::kInvalidArgument);
  PointInfo bad = AdoptInfo();
  bad.generation_id = "g";
  EXPECT_EQ(code(disks_, 1, bad), Code::kInvalidArgument);
  bad.generation_id = std::string(31, 'a') + "x";
  EXPECT_EQ(code(disks_, 1, bad), Code::kInvalidArgument);
  bad = AdoptInfo();
  bad.kind = static_cast<ReplicationType>(4);
  EXPECT_EQ(code(disks_, 1, bad), Code::kInvalidArgument);
  EXPECT_EQ(code({{"../vda", 4096}}, 1, AdoptInfo()), Code::kInvalidArgument);
  EXPECT_EQ(code({{"vda", 4000}}, 1, AdoptInfo()), Code::kInvalidArgument);
  EXPECT_EQ(code({{"vda", 4096}, {"vda", 4096}}, 1, AdoptInfo()), Code::kInvalidArgument);
  EXPECT_EQ(ReplicaStore::Adopt(store_dir_, "", disks_, 1, AdoptInfo(), nullptr, Options()).status().code(),
            Code::kInvalidArgument);

  // A disk file missing, of another size, not a regular file: no store.
  PlaceFiles({disks_[0]}, {img[0]});
  EXPECT_EQ(Adopt(1, Options()).status().code(), Code::kNotFound);
  EXPECT_FALSE(fs::exists(store_dir_ + "/MANIFEST"));
  PlaceFiles({{disks_[1].name, disks_[1].size + 4096}}, {img[1] + std::string(4096, '\0')});
  EXPECT_EQ(Adopt(1, Options()).status().code(), Code::kInvalidArgument);
  fs::remove(DiskFile(disks_[1].name));
  fs::create_directory(DiskFile(disks_[1].name));
  EXPECT_EQ(Adopt(1, Options()).status().code(), Code::kInvalidArgument);
  EXPECT_FALSE(fs::exists(store_dir_ + "/MANIFEST"));
  EXPECT_EQ(ReplicaStore::Open(store_dir_, catalog_.get(), Options()).status().code(), Code::kNotFound);
  fs::remove(DiskFile(disks_[1].name));
  EXPECT_TRUE(CatalogSeqs().empty());

  // An existing store: open elsewhere (LOCK held), of another VM, with a
  // load in progress. Each refusal leaves it as it was.
  fs::remove_all(store_dir_);
  Create(Options());
  ASSERT_TRUE(Apply(1, {Data(0, 0, std::string(9000, 'q'))}, now_).ok());
  Image old1 = Zeros();
  ApplyToImage({Data(0, 0, std::string(9000, 'q'))}, &old1);
  EXPECT_EQ(Adopt(2, Options()).status().code(), Code::kBusy);
  store_.reset();
  ASSERT_TRUE(catalog_->PutVm({"vm-2", "vm two", ReplicationMode::kReplica, "{}", 0}).ok());
  EXPECT_EQ(ReplicaStore::Adopt(store_dir_, "vm-2", disks_, 2, AdoptInfo(), catalog_.get(), Options())
                .status()
                .code(),
            Code::kInvalidArgument);
  Reopen(Options());
  EXPECT_EQ(PointSeqs(), (std::vector<uint64_t>{0, 1}));
  ExpectPoint(0, Zeros());
  ExpectPoint(1, old1);
  EXPECT_EQ(CatalogSeqs(), (std::vector<uint64_t>{0, 1}));

  store_.reset();
  fs::remove_all(store_dir_);
  Create(Options());
  LoadInfo load;
  load.point = {now_, ReplicationType::kRegular, kLoadGen};
  load.source = "network";
  ASSERT_TRUE(store_->BeginLoad(load).ok());
  VectorSource chunk({Data(0, 4096, std::string(4096, 'L'))});
  ASSERT_TRUE(store_->LoadChunk(0, chunk).ok());
  ASSERT_TRUE(store_->SyncLoad().ok());
  store_.reset();
  EXPECT_EQ(Adopt(1, Options()).status().code(), Code::kFailedPrecondition);
  EXPECT_FALSE(fs::exists(store_dir_ + "/ADOPT"));
  Reopen(Options());
  ASSERT_TRUE(store_->load_state().has_value());
  EXPECT_EQ(store_->load_state()->done_chunks, 1u);
  EXPECT_EQ(store_->latest_sequence(), 0u);
}

TEST_F(ReplicaAdoptTest, CorruptAdoptionRecordIsCorruptionAtOpen) {
  PlaceFiles(disks_, RandomImage(23));
  AdoptOk(1, Options());
  store_.reset();
  const std::string path = store_dir_ + "/ADOPT";
  const std::vector<std::string> bad = {
      "",
      "{",
      "{\"version\":1}",
      "{\"version\":2,\"sequence\":1,\"generation\":\"" + kAdoptGen +
          "\",\"manifest_xxh3\":\"0000000000000000\",\"drop_disks\":[]}",
      "{\"version\":1,\"sequence\":0,\"generation\":\"" + kAdoptGen +
          "\",\"manifest_xxh3\":\"0000000000000000\",\"drop_disks\":[]}",
      "{\"version\":1,\"sequence\":1,\"generation\":\"xyz\",\"manifest_xxh3\":\"0000000000000000\",\"drop_disks\":[]}",
      "{\"version\":1,\"sequence\":1,\"generation\":\"" + kAdoptGen +
          "\",\"manifest_xxh3\":\"00000000000000\",\"drop_disks\":[]}",
      "{\"version\":1,\"sequence\":1,\"generation\":\"" + kAdoptGen +
          "\",\"manifest_xxh3\":\"0000000000000000\",\"drop_disks\":[\"../x\"]}",
      "{\"version\":1,\"sequence\":1,\"generation\":\"" + kAdoptGen +
          "\",\"manifest_xxh3\":\"0000000000000000\",\"drop_disks\":[],\"extra\":1}",
  };
  for (const std::string& content : bad) {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << content;
    auto s = ReplicaStore::Open(store_dir_, catalog_.get(), Options());
    ASSERT_FALSE(s.ok()) << content;
    EXPECT_EQ(s.status().code(), Code::kCorruption) << content;
    EXPECT_NE(s.status().message().find("ADOPT"), std::string::npos) << s.status().ToString();
  }
  // A well-formed record that does not match MANIFEST: an adoption that did
  // not commit; it is removed and the store opens.
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      << "{\"version\":1,\"sequence\":1,\"generation\":\"" + kAdoptGen +
             "\",\"manifest_xxh3\":\"0123456789abcdef\",\"drop_disks\":[\"vdz\"]}";
  Reopen(Options());
  EXPECT_FALSE(fs::exists(path));
  EXPECT_EQ(PointSeqs(), (std::vector<uint64_t>{1}));
}

// Kills a child at every hook call of Adopt over a store with points 0..4
// (its point 1 has a segment: adopting point 1 must never roll it back) and
// a disk that is not adopted. The files adopted are the old store's own
// disks (the round trip). Open then gives the old store, every point exact,
// or the adopted point alone reading the files; never a mix.
TEST_F(ReplicaAdoptTest, CrashAtEveryStepOfAdoptOverAStoreGivesTheOldOrTheNew) {
  ReplicaStoreOptions o = Options();
  o.fine_window_ms = 100 * kHour;
  std::map<uint64_t, Image> old;
  MakeOldStore(o, &old);
  const std::vector<uint64_t> before = PointSeqs();
  store_.reset();
  catalog_.reset();
  const std::string snap = dir_ + ".snap";
  fs::remove_all(snap);
  fs::create_directories(snap);
  fs::copy(dir_, snap, fs::copy_options::recursive);
  int completed_at = 0;
  int saw_old = 0, saw_new = 0;
  for (int n = 1; n < 200 && completed_at == 0; ++n) {
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
      auto st = ReplicaStore::Adopt(store_dir_, kVm, disks_, 1, AdoptInfo(), cat->get(), co);
      ::_exit(st.ok() ? 0 : 4);
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
    EXPECT_FALSE(fs::exists(store_dir_ + "/ADOPT")) << "n=" << n;
    if (PointSeqs() == before) {
      ++saw_old;
      ASSERT_EQ(store_->disks().size(), 3u);
      for (const ReplicaPoint& p : store_->ListPoints()) {
        EXPECT_EQ(p.generation_id, p.sequence == 0 ? "" : "g");
        ExpectPoint(p.sequence, old[p.sequence]);  // vda, vdb (vdc is checked by the store's reads)
      }
      EXPECT_EQ(UndoFiles().size(), 4u) << "n=" << n;
      EXPECT_TRUE(fs::exists(DiskFile("vdc"))) << "n=" << n;
      EXPECT_EQ(CatalogSeqs(), before) << "n=" << n;
    } else {
      ++saw_new;
      ExpectAdopted(1, old[4]);
      EXPECT_FALSE(fs::exists(DiskFile("vdc"))) << "n=" << n;
      ASSERT_TRUE(Apply(2, {Data(1, 3, "after")}, now_).ok()) << "n=" << n;
    }
    if (HasFatalFailure()) break;
    store_.reset();
    catalog_.reset();
  }
  EXPECT_GT(completed_at, 10);
  EXPECT_GT(saw_old, 0);
  EXPECT_GT(saw_new, 1);  // crashes after the commit, before the cleanup ended
  std::printf("adoption over a store has %d hook calls\n", completed_at - 1);
  fs::remove_all(snap);
  OpenCatalog();
}

// The same for a new directory: no store, or the adopted one.
TEST_F(ReplicaAdoptTest, CrashAtEveryStepOfAdoptIntoANewDirectoryGivesNoneOrTheNew) {
  const Image img = RandomImage(29);
  PlaceFiles(disks_, img);
  catalog_.reset();
  const std::string snap = dir_ + ".snap";
  fs::remove_all(snap);
  fs::create_directories(snap);
  fs::copy(dir_, snap, fs::copy_options::recursive);
  int completed_at = 0;
  int saw_none = 0, saw_new = 0;
  for (int n = 1; n < 200 && completed_at == 0; ++n) {
    fs::remove_all(dir_);
    fs::copy(snap, dir_, fs::copy_options::recursive);
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      auto cat = Catalog::Open(dir_ + "/catalog.db");
      if (!cat.ok()) ::_exit(3);
      ReplicaStoreOptions co = Options();
      co.crash_hook = [n](std::string_view, uint64_t k) {
        if (k == static_cast<uint64_t>(n)) ::raise(SIGKILL);
      };
      auto st = ReplicaStore::Adopt(store_dir_, kVm, disks_, 1, AdoptInfo(), cat->get(), co);
      ::_exit(st.ok() ? 0 : 4);
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
    auto opened = ReplicaStore::Open(store_dir_, catalog_.get(), Options());
    if (!opened.ok()) {
      ++saw_none;
      ASSERT_EQ(opened.status().code(), Code::kNotFound) << "n=" << n << ": " << opened.status().ToString();
      EXPECT_TRUE(CatalogSeqs().empty());
      for (size_t d = 0; d < disks_.size(); ++d)
        ASSERT_TRUE(ReadImageFile(DiskFile(disks_[d].name), 0, disks_[d].size) == img[d]) << "n=" << n;
      AdoptOk(1, Options());  // the caller adopts again
    } else {
      ++saw_new;
      store_ = std::move(opened).value();
    }
    ExpectAdopted(1, img);
    if (HasFatalFailure()) break;
    store_.reset();
    catalog_.reset();
  }
  EXPECT_GT(completed_at, 5);
  EXPECT_GT(saw_none, 0);
  EXPECT_GT(saw_new, 0);
  fs::remove_all(snap);
  OpenCatalog();
}

// An adoption killed right after its commit leaves the old store's
// segments and ADOPT; Open finishes the cleanup. Killing that Open at every
// hook call, the next Open still gives the adopted point alone.
TEST_F(ReplicaAdoptTest, CrashAtEveryStepOfOpenFinishingAnAdoptionRecovers) {
  ReplicaStoreOptions o = Options();
  o.fine_window_ms = 100 * kHour;
  std::map<uint64_t, Image> old;
  MakeOldStore(o, &old);
  store_.reset();
  catalog_.reset();
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto cat = Catalog::Open(dir_ + "/catalog.db");
    if (!cat.ok()) ::_exit(3);
    ReplicaStoreOptions co = o;
    co.crash_hook = [](std::string_view step, uint64_t) {
      if (step == "manifest.write:after") ::raise(SIGKILL);
    };
    auto st = ReplicaStore::Adopt(store_dir_, kVm, disks_, 1, AdoptInfo(), cat->get(), co);
    ::_exit(st.ok() ? 0 : 4);
  }
  int wstatus = 0;
  ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL);
  ASSERT_TRUE(fs::exists(store_dir_ + "/ADOPT"));
  ASSERT_EQ(UndoFiles().size(), 4u);
  const std::string snap = dir_ + ".snap";
  fs::remove_all(snap);
  fs::create_directories(snap);
  fs::copy(dir_, snap, fs::copy_options::recursive);
  int completed_at = 0;
  for (int n = 1; n < 100 && completed_at == 0; ++n) {
    fs::remove_all(dir_);
    fs::copy(snap, dir_, fs::copy_options::recursive);
    pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      auto cat = Catalog::Open(dir_ + "/catalog.db");
      if (!cat.ok()) ::_exit(3);
      ReplicaStoreOptions co = o;
      co.crash_hook = [n](std::string_view, uint64_t k) {
        if (k == static_cast<uint64_t>(n)) ::raise(SIGKILL);
      };
      ::_exit(ReplicaStore::Open(store_dir_, cat->get(), co).ok() ? 0 : 4);
    }
    ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
    if (WIFEXITED(wstatus)) {
      ASSERT_EQ(WEXITSTATUS(wstatus), 0) << "child failed at n=" << n;
      completed_at = n;
    } else {
      ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL);
    }
    OpenCatalog();
    Reopen(o);
    ExpectAdopted(1, old[4]);
    EXPECT_FALSE(fs::exists(DiskFile("vdc"))) << "n=" << n;
    if (HasFatalFailure()) break;
    store_.reset();
    catalog_.reset();
  }
  // 4 segments, undo/, vdc, disks/, ADOPT, the directory: 9 steps.
  EXPECT_EQ(completed_at, 19);
  fs::remove_all(snap);
  OpenCatalog();
}

}  // namespace
}  // namespace vmreplica
