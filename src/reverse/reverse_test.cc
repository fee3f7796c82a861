// Tests of the reverse module: range lists v1 (docs/failover.md 15.1), the
// since list of a real ReplicaStore and ChangedAfter against brute force,
// UniteRanges / RoundToBlocks against brute force, the reverse records
// (15.2).
#include "vmreplica/reverse.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>
#include <xxhash.h>

#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <tuple>

#include "reverse/range_list.h"
#include "vmreplica/fileutil.h"

namespace vmreplica {
namespace {

namespace fs = std::filesystem;

// A unique temporary directory, removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/vmr-reverse-XXXXXX";
    const char* d = ::mkdtemp(tmpl);
    EXPECT_NE(d, nullptr);
    path_ = d != nullptr ? d : "/tmp/vmr-reverse-failed";
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

GenerationId Gen(uint8_t seed) {
  GenerationId g{};
  for (size_t i = 0; i < g.size(); ++i) g[i] = static_cast<uint8_t>(seed * 31 + i + 1);
  return g;
}

std::string Hex(const GenerationId& g) {
  static const char* k = "0123456789abcdef";
  std::string s;
  for (uint8_t b : g) {
    s.push_back(k[b >> 4]);
    s.push_back(k[b & 15]);
  }
  return s;
}

// ------------------------------------------------------------ range lists

// A random valid list: entries sorted, disjoint, 4 KiB-aligned; kind 2 labels
// drawn from the points.
SinceList RandomList(std::mt19937_64& rng, uint16_t kind, uint32_t disks, size_t max_entries) {
  SinceList l;
  if (kind == kRangeListSince) {
    l.base_sequence = rng() % 50;
    l.generation = Gen(static_cast<uint8_t>(rng()));
    uint64_t p = l.base_sequence + rng() % 3;
    const size_t n = 1 + rng() % 20;
    for (size_t i = 0; i < n; ++i) {
      l.points.push_back(p);
      p += 1 + rng() % 5;
    }
    l.replicated_sequence = l.points.back() + rng() % 3;
  }
  const size_t n = max_entries == 0 ? 0 : rng() % (max_entries + 1);
  uint32_t disk = 0;
  uint64_t off = 0;
  for (size_t i = 0; i < n && disk < disks; ++i) {
    if (rng() % 8 == 0) {
      disk += 1 + static_cast<uint32_t>(rng() % 3);
      off = 0;
      if (disk >= disks) break;
    }
    off += (rng() % 4) * kRangeListAlign;  // 0: adjacent entries are allowed
    const uint64_t len = (1 + rng() % 16) * kRangeListAlign;
    const uint64_t label = kind == kRangeListSince ? l.points[rng() % l.points.size()] : 0;
    l.entries.push_back({disk, off, len, label});
    off += len;
  }
  return l;
}

TEST(RangeListTest, RoundTripsBothKindsManyDisksAndEmptyLists) {
  std::mt19937_64 rng(7);
  for (int iter = 0; iter < 300; ++iter) {
    const uint16_t kind = iter % 2 == 0 ? kRangeListCandidates : kRangeListSince;
    const uint32_t disks = 1 + static_cast<uint32_t>(rng() % kRangeListMaxDisks);
    const SinceList l = RandomList(rng, kind, disks, iter % 10 == 0 ? 0 : 200);
    const std::string bytes = SerializeRangeList(kind, disks, l);
    EXPECT_EQ(bytes.size(), kRangeListHeaderBytes + 8 * l.points.size() + 32 * l.entries.size() + 8);
    auto p = ParseRangeList(bytes, kind, disks);
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    EXPECT_EQ(*p, l);
  }
  // Empty lists of both kinds; 64 disks.
  for (uint16_t kind : {kRangeListCandidates, kRangeListSince}) {
    SinceList empty;
    auto p = ParseRangeList(SerializeRangeList(kind, 64, empty), kind, 64);
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    EXPECT_EQ(*p, empty);
  }
}

TEST(RangeListTest, FileRoundTripAndCorruptFileIsCorruption) {
  TempDir dir;
  std::mt19937_64 rng(11);
  const std::string path = dir.path() + "/x.since";
  SinceList l = RandomList(rng, kRangeListSince, 3, 500);
  ASSERT_TRUE(WriteRangeListFile(path, kRangeListSince, 3, l).ok());
  auto r = ReadRangeListFile(path, kRangeListSince, 3);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, l);
  EXPECT_EQ(fs::status(path).permissions() & fs::perms::all, fs::perms::owner_read | fs::perms::owner_write);
  // Read as the wrong kind or disk count.
  EXPECT_EQ(ReadRangeListFile(path, kRangeListCandidates, 3).status().code(), Code::kCorruption);
  EXPECT_EQ(ReadRangeListFile(path, kRangeListSince, 4).status().code(), Code::kCorruption);
  // A flipped body byte, a truncated file, a missing one.
  auto bytes = ReadFile(path);
  ASSERT_TRUE(bytes.ok());
  std::string bad = *bytes;
  bad[kRangeListHeaderBytes + 3] ^= 1;
  ASSERT_TRUE(WriteFileAtomic(path, bad).ok());
  auto c = ReadRangeListFile(path, kRangeListSince, 3);
  EXPECT_EQ(c.status().code(), Code::kCorruption);
  EXPECT_NE(c.status().message().find("body checksum"), std::string::npos) << c.status().ToString();
  ASSERT_TRUE(WriteFileAtomic(path, bytes->substr(0, bytes->size() - 1)).ok());
  c = ReadRangeListFile(path, kRangeListSince, 3);
  EXPECT_EQ(c.status().code(), Code::kCorruption);
  EXPECT_NE(c.status().message().find("size mismatch"), std::string::npos) << c.status().ToString();
  ASSERT_TRUE(WriteFileAtomic(path, bytes->substr(0, 40)).ok());
  c = ReadRangeListFile(path, kRangeListSince, 3);
  EXPECT_EQ(c.status().code(), Code::kCorruption);
  EXPECT_NE(c.status().message().find("truncated"), std::string::npos) << c.status().ToString();
  EXPECT_EQ(ReadRangeListFile(dir.path() + "/none", kRangeListSince, 3).status().code(), Code::kNotFound);
  // The writer refuses a list that breaks a rule (nothing written).
  SinceList unsorted = l;
  ASSERT_GE(unsorted.entries.size(), 2u);
  std::swap(unsorted.entries[0], unsorted.entries[1]);
  const std::string path2 = dir.path() + "/y.since";
  Status w = WriteRangeListFile(path2, kRangeListSince, 3, unsorted);
  EXPECT_EQ(w.code(), Code::kInvalidArgument) << w.ToString();
  EXPECT_FALSE(fs::exists(path2));
}

// Recomputes both checksums of a serialized list (so that a test reaches the
// rule it targets); the header fields are read from the bytes.
void Reseal(std::string* b) {
  const uint64_t h = XXH3_64bits(b->data(), 64);
  for (int i = 0; i < 8; ++i) (*b)[64 + i] = static_cast<char>(h >> (8 * i));
  if (b->size() >= kRangeListHeaderBytes + 8) {
    const uint64_t t = XXH3_64bits(b->data() + kRangeListHeaderBytes, b->size() - kRangeListHeaderBytes - 8);
    for (int i = 0; i < 8; ++i) (*b)[b->size() - 8 + i] = static_cast<char>(t >> (8 * i));
  }
}

void Put(std::string* b, size_t at, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) (*b)[at + i] = static_cast<char>(v >> (8 * i));
}

// Expects InvalidArgument whose message contains `want`.
void ExpectRefused(const Result<SinceList>& r, const std::string& want) {
  ASSERT_FALSE(r.ok()) << "accepted; wanted '" << want << "'";
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << r.status().ToString();
  EXPECT_NE(r.status().message().find(want), std::string::npos)
      << "wanted '" << want << "', got " << r.status().ToString();
}

SinceList SmallSince() {
  SinceList l;
  l.base_sequence = 3;
  l.replicated_sequence = 9;
  l.generation = Gen(1);
  l.points = {3, 5, 9};
  l.entries = {{0, 0, 8192, 5}, {0, 16384, 4096, 3}, {1, 4096, 4096, 3}};
  return l;
}

TEST(RangeListTest, EachBrokenHeaderRuleIsRefusedBeforeUse) {
  const std::string good = SerializeRangeList(kRangeListSince, 2, SmallSince());
  ASSERT_TRUE(ParseRangeList(good, kRangeListSince, 2).ok());
  {  // header checksum, checked first: the magic is broken too
    std::string b = good;
    b[0] = 'X';
    b[20] ^= 1;
    ExpectRefused(ParseRangeList(b, kRangeListSince, 2), "header checksum");
  }
  {  // body checksum
    std::string b = good;
    b[kRangeListHeaderBytes + 1] ^= 1;
    ExpectRefused(ParseRangeList(b, kRangeListSince, 2), "body checksum");
  }
  ExpectRefused(ParseRangeList(good.substr(0, 71), kRangeListSince, 2), "truncated");
  ExpectRefused(ParseRangeList(good.substr(0, good.size() - 8), kRangeListSince, 2), "size mismatch");
  ExpectRefused(ParseRangeList(good + std::string(8, '\0'), kRangeListSince, 2), "size mismatch");
  {  // magic
    std::string b = good;
    b[1] = 'X';
    Reseal(&b);
    ExpectRefused(ParseRangeList(b, kRangeListSince, 2), "magic");
  }
  {  // version
    std::string b = good;
    Put(&b, 8, 2, 2);
    Reseal(&b);
    ExpectRefused(ParseRangeList(b, kRangeListSince, 2), "version 2");
  }
  {  // kind
    std::string b = good;
    Put(&b, 10, 3, 2);
    Reseal(&b);
    ExpectRefused(ParseRangeList(b, kRangeListSince, 2), "kind 3");
    ExpectRefused(ParseRangeList(good, kRangeListCandidates, 2), "expected 1");
  }
  {  // disk count
    std::string b = good;
    Put(&b, 12, 65, 4);
    Reseal(&b);
    ExpectRefused(ParseRangeList(b, kRangeListSince, 65), "outside 1..64");
    Put(&b, 12, 0, 4);
    Reseal(&b);
    ExpectRefused(ParseRangeList(b, kRangeListSince, 0), "outside 1..64");
    ExpectRefused(ParseRangeList(good, kRangeListSince, 3), "disk_count 2, expected 3");
  }
  {  // reserved header field
    std::string b = good;
    Put(&b, 52, 1, 4);
    Reseal(&b);
    ExpectRefused(ParseRangeList(b, kRangeListSince, 2), "reserved header");
  }
  {  // counts over their bounds: refused on the header alone, before the size
     // (the blob is tiny) and before anything is allocated
    std::string b = good;
    Put(&b, 56, kRangeListMaxEntries + 1, 8);
    Reseal(&b);
    ExpectRefused(ParseRangeList(b, kRangeListSince, 2), "entry_count 16777217 over 2^24");
    Put(&b, 56, ~uint64_t{0}, 8);
    Reseal(&b);
    ExpectRefused(ParseRangeList(b, kRangeListSince, 2), "over 2^24");
    b = good;
    Put(&b, 48, kRangeListMaxPoints + 1, 4);
    Reseal(&b);
    ExpectRefused(ParseRangeList(b, kRangeListSince, 2), "point_count 1048577 over 2^20");
  }
  {  // counts within bounds that do not match the size
    std::string b = good;
    Put(&b, 56, kRangeListMaxEntries, 8);
    Reseal(&b);
    ExpectRefused(ParseRangeList(b, kRangeListSince, 2), "size mismatch");
  }
  {  // kind 1 with kind-2 header fields
    SinceList l;
    l.base_sequence = 1;
    ExpectRefused(ParseRangeList(SerializeRangeList(kRangeListCandidates, 1, l), kRangeListCandidates, 1), "must be 0");
    l = SinceList();
    l.generation = Gen(2);
    ExpectRefused(ParseRangeList(SerializeRangeList(kRangeListCandidates, 1, l), kRangeListCandidates, 1), "must be 0");
    l = SinceList();
    l.points = {1};
    ExpectRefused(ParseRangeList(SerializeRangeList(kRangeListCandidates, 1, l), kRangeListCandidates, 1), "must be 0");
  }
}

TEST(RangeListTest, EachBrokenBodyRuleIsRefusedWithItsReason) {
  struct Case {
    const char* want;
    uint16_t kind;
    std::function<void(SinceList*)> breakit;
  };
  const std::vector<Case> cases = {
      {"not sorted", kRangeListSince, [](SinceList* l) { std::swap(l->entries[0], l->entries[1]); }},
      {"not sorted", kRangeListSince, [](SinceList* l) { std::swap(l->entries[1], l->entries[2]); }},
      {"overlaps", kRangeListSince, [](SinceList* l) { l->entries[1].offset = 4096; }},
      {"overlaps", kRangeListSince, [](SinceList* l) { l->entries[0].length = 20480; }},
      {"offset 16484 is not a multiple of 4096", kRangeListSince,
       [](SinceList* l) { l->entries[1].offset = 16384 + 100; }},
      {"length 4097 is not a multiple of 4096", kRangeListSince, [](SinceList* l) { l->entries[1].length = 4097; }},
      {"length 0 is below 4096", kRangeListSince, [](SinceList* l) { l->entries[1].length = 0; }},
      {"length 2048 is below 4096", kRangeListSince, [](SinceList* l) { l->entries[2].length = 2048; }},
      {"offset + length overflows", kRangeListSince,
       [](SinceList* l) {
         l->entries[2].offset = ~uint64_t{0} - 4095;
         l->entries[2].length = 8192;
       }},
      {"disk 2 not below disk_count 2", kRangeListSince, [](SinceList* l) { l->entries[2].disk = 2; }},
      {"label 4 is not a listed point", kRangeListSince, [](SinceList* l) { l->entries[0].label = 4; }},
      {"label 0 is not a listed point", kRangeListSince, [](SinceList* l) { l->entries[2].label = 0; }},
      {"points not ascending", kRangeListSince,
       [](SinceList* l) {
         l->points = {3, 9, 5};
       }},
      {"points not ascending", kRangeListSince,
       [](SinceList* l) {
         l->points = {3, 5, 5, 9};
       }},
      {"below base_sequence", kRangeListSince, [](SinceList* l) { l->base_sequence = 4; }},
      {"label 5 is not 0 in a kind 1 list", kRangeListCandidates,
       [](SinceList* l) {
         *l = SinceList();
         l->entries = {{0, 0, 4096, 0}, {1, 0, 4096, 5}};
       }},
  };
  for (const Case& c : cases) {
    SinceList l = SmallSince();
    c.breakit(&l);
    SCOPED_TRACE(c.want);
    ExpectRefused(ParseRangeList(SerializeRangeList(c.kind, 2, l), c.kind, 2), c.want);
  }
  {  // reserved entry field
    std::string b = SerializeRangeList(kRangeListSince, 2, SmallSince());
    Put(&b, kRangeListHeaderBytes + 3 * 8 + 32 + 4, 1, 4);
    Reseal(&b);
    ExpectRefused(ParseRangeList(b, kRangeListSince, 2), "entry 1: reserved field is not 0");
  }
}

// ------------------------------------------------------------ since lists on a real store

using Image = std::vector<std::string>;  // one string per disk

std::vector<DeltaRecord> RandomDelta(std::mt19937_64& rng, const std::vector<ReplicaDisk>& disks) {
  std::vector<DeltaRecord> out;
  const int n = 1 + static_cast<int>(rng() % 4);
  for (int i = 0; i < n; ++i) {
    const uint32_t d = static_cast<uint32_t>(rng() % disks.size());
    const uint64_t size = disks[d].size;
    const uint64_t len = std::min<uint64_t>(1 + rng() % 12000, size);
    const uint64_t off = rng() % (size - len + 1);
    if (rng() % 5 == 0) {
      out.push_back(ZeroRecord(d, off, len));
    } else {
      std::string b(len, '\0');
      for (uint64_t k = 0; k < len; ++k) b[k] = static_cast<char>('a' + (rng() % 26));
      out.push_back(DataRecord(d, off, std::move(b)));
    }
  }
  return out;
}

void ApplyToImage(const std::vector<DeltaRecord>& recs, Image* img) {
  for (const DeltaRecord& r : recs) {
    if (r.zero) {
      (*img)[r.disk].replace(r.offset, r.length, std::string(r.length, '\0'));
    } else {
      (*img)[r.disk].replace(r.offset, r.length, r.data);
    }
  }
}

// (disk, block) pairs covered by `ranges`.
std::set<std::pair<uint32_t, uint64_t>> Blocks(const std::vector<ReplicaRange>& ranges) {
  std::set<std::pair<uint32_t, uint64_t>> s;
  for (const ReplicaRange& r : ranges) {
    for (uint64_t b = r.offset / kReplicaBlockSize; b * kReplicaBlockSize < r.offset + r.length; ++b) {
      s.insert({r.disk, b});
    }
  }
  return s;
}

// Blocks whose content differs between two images.
std::set<std::pair<uint32_t, uint64_t>> DiffBlocks(const Image& a, const Image& b) {
  std::set<std::pair<uint32_t, uint64_t>> s;
  for (uint32_t d = 0; d < a.size(); ++d) {
    for (uint64_t off = 0; off < a[d].size(); off += kReplicaBlockSize) {
      if (a[d].compare(off, kReplicaBlockSize, b[d], off, kReplicaBlockSize) != 0) {
        s.insert({d, off / kReplicaBlockSize});
      }
    }
  }
  return s;
}

class SinceStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    ReplicaStoreOptions o;
    o.now_ms = [this] { return now_; };
    o.compress_undo = false;
    o.fine_window_ms = 20 * 60 * 1000;  // every point for 20 minutes
    o.recovery_history_hours = 2;       // then hourly ones for 2 hours
    auto s = ReplicaStore::Create(dir_.path() + "/store", vm_, disks_, nullptr, std::move(o));
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    store_ = std::move(s).value();
    Image zeros;
    for (const ReplicaDisk& d : disks_) zeros.emplace_back(d.size, '\0');
    images_[0] = zeros;
  }

  // Applies a random delta as the next point, remembering its content.
  void ApplyRandom(std::mt19937_64& rng, uint64_t max_minutes = 25) {
    const uint64_t seq = store_->latest_sequence() + 1;
    const std::vector<DeltaRecord> recs = RandomDelta(rng, disks_);
    Image img = images_.rbegin()->second;
    ApplyToImage(recs, &img);
    VectorDeltaSource src(recs);
    now_ += static_cast<int64_t>(1 + rng() % max_minutes) * 60 * 1000;
    Status s = store_->Apply(seq, {now_, ReplicationType::kRegular, Hex(gen_)}, src);
    ASSERT_TRUE(s.ok()) << s.ToString();
    images_[seq] = std::move(img);
  }

  // Checks the since list of the store now against brute force.
  void CheckSince() {
    auto since = LabelChangedSince(*store_);
    ASSERT_TRUE(since.ok()) << since.status().ToString();
    // It survives its own format.
    auto parsed = ParseRangeList(SerializeRangeList(kRangeListSince, 2, *since), kRangeListSince, 2);
    ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
    ASSERT_EQ(*parsed, *since);
    const std::vector<ReplicaPoint> points = store_->ListPoints();
    const uint64_t latest = store_->latest_sequence();
    EXPECT_EQ(since->replicated_sequence, latest);
    EXPECT_EQ(since->generation, gen_);
    std::vector<uint64_t> retained;
    for (const ReplicaPoint& p : points) retained.push_back(p.sequence);
    EXPECT_EQ(since->points, retained);  // nothing corrupt: every retained point listed
    EXPECT_EQ(since->base_sequence, retained.front());
    const Image& now_img = images_.at(latest);
    // Every sequence from the oldest retained point up, retained or not.
    for (uint64_t c = retained.front(); c <= latest; ++c) {
      SCOPED_TRACE("common point " + std::to_string(c));
      auto after = ChangedAfter(*since, gen_, c);
      ASSERT_TRUE(after.ok()) << after.status().ToString();
      const auto got = Blocks(*after);
      for (const auto& blk : DiffBlocks(images_.at(c), now_img)) {
        ASSERT_TRUE(got.count(blk)) << "block " << blk.second << " of disk " << blk.first << " differs but is missing";
      }
      if (std::binary_search(retained.begin(), retained.end(), c)) {
        // The store's own view of point c agrees with the model.
        for (uint32_t d = 0; d < disks_.size(); ++d) {
          std::string buf(disks_[d].size, 'X');
          ASSERT_TRUE(store_->ReadPoint(c, d, 0, buf.size(), buf.data()).ok());
          ASSERT_EQ(buf, images_.at(c)[d]) << "disk " << d;
        }
        auto changed = store_->ChangedSince(c);
        ASSERT_TRUE(changed.ok()) << changed.status().ToString();
        const auto want = Blocks(*changed);
        for (const auto& blk : got) ASSERT_TRUE(want.count(blk)) << "block " << blk.second << " not in ChangedSince";
      }
    }
    // Below every listed point and above the last received one: unknown.
    if (retained.front() > 0) {
      EXPECT_EQ(ChangedAfter(*since, gen_, retained.front() - 1).status().code(), Code::kFailedPrecondition);
    }
    EXPECT_EQ(ChangedAfter(*since, gen_, latest + 1).status().code(), Code::kFailedPrecondition);
    EXPECT_EQ(ChangedAfter(*since, Gen(99), latest).status().code(), Code::kFailedPrecondition);
    ++checks_;
  }

  TempDir dir_;
  const std::string vm_ = "vm-reverse";
  const std::vector<ReplicaDisk> disks_ = {{"a", 96 * 1024}, {"b", 64 * 1024}};
  const GenerationId gen_ = Gen(5);
  int64_t now_ = int64_t{1700000000} * 1000;
  std::unique_ptr<ReplicaStore> store_;
  std::map<uint64_t, Image> images_;
  int checks_ = 0;
};

TEST_F(SinceStoreTest, ChangedAfterCoversEveryDifferingBlockUnderRandomHistories) {
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    std::mt19937_64 rng(seed);
    for (int step = 0; step < 25; ++step) {
      ApplyRandom(rng);
      if (HasFatalFailure()) return;
      if (step % 3 == 2) CheckSince();
      if (HasFatalFailure()) return;
    }
  }
  // Retention dropped points (the history is longer than 20 minutes + 2 hours).
  EXPECT_GT(store_->ListPoints().front().sequence, 0u);
  EXPECT_GT(checks_, 20);
}

TEST_F(SinceStoreTest, OnlyTheLatestPointGivesAnEmptyListAndUnknownBelowIt) {
  std::mt19937_64 rng(3);
  ApplyRandom(rng);
  ApplyRandom(rng);
  ASSERT_TRUE(store_->DropAllButLatest().ok());
  auto since = LabelChangedSince(*store_);
  ASSERT_TRUE(since.ok()) << since.status().ToString();
  EXPECT_EQ(since->points, std::vector<uint64_t>{2});
  EXPECT_TRUE(since->entries.empty());
  auto after = ChangedAfter(*since, gen_, 2);
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  EXPECT_TRUE(after->empty());
  EXPECT_EQ(ChangedAfter(*since, gen_, 1).status().code(), Code::kFailedPrecondition);
}

TEST_F(SinceStoreTest, CorruptSegmentEndsTheWalk) {
  std::mt19937_64 rng(4);
  for (int i = 0; i < 4; ++i) ApplyRandom(rng, 1);  // points 0..4, all in the fine window
  // Make sure point 1's segment holds something, then damage it.
  const std::string seg = dir_.path() + "/store/undo/00000000000000000001.vru";
  ASSERT_TRUE(fs::exists(seg));
  store_.reset();
  {
    const int fd = ::open(seg.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    char c = 0;
    const off_t at = 64 + 32 + 100;  // inside the first before-image
    ASSERT_EQ(::pread(fd, &c, 1, at), 1);
    c ^= 0x20;
    ASSERT_EQ(::pwrite(fd, &c, 1, at), 1);
    ::close(fd);
  }
  ReplicaStoreOptions o;
  o.now_ms = [this] { return now_; };
  auto s = ReplicaStore::Open(dir_.path() + "/store", nullptr, std::move(o));
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  store_ = std::move(s).value();
  auto since = LabelChangedSince(*store_);
  ASSERT_TRUE(since.ok()) << since.status().ToString();
  // Points 0 and 1 need the damaged segment: not listed.
  EXPECT_EQ(since->points, (std::vector<uint64_t>{2, 3, 4}));
  EXPECT_EQ(since->base_sequence, 2u);
  for (uint64_t c : {2, 3, 4}) {
    auto after = ChangedAfter(*since, gen_, c);
    ASSERT_TRUE(after.ok()) << after.status().ToString();
    for (const auto& blk : DiffBlocks(images_.at(c), images_.at(4))) EXPECT_TRUE(Blocks(*after).count(blk));
  }
  EXPECT_EQ(ChangedAfter(*since, gen_, 1).status().code(), Code::kFailedPrecondition);
}

// ReplicaRange has no operator==: compare as tuples.
std::vector<std::tuple<uint32_t, uint64_t, uint64_t>> T(const std::vector<ReplicaRange>& v) {
  std::vector<std::tuple<uint32_t, uint64_t, uint64_t>> out;
  for (const ReplicaRange& r : v) out.emplace_back(r.disk, r.offset, r.length);
  return out;
}

TEST(ChangedAfterTest, RefusesUnknownGenerationAndPoints) {
  SinceList l = SmallSince();
  auto ok = ChangedAfter(l, Gen(1), 6);  // k* = 5: entries labelled 5
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(T(*ok), T({{0, 0, 8192}}));
  ok = ChangedAfter(l, Gen(1), 3);  // every entry
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(T(*ok), T({{0, 0, 8192}, {0, 16384, 4096}, {1, 4096, 4096}}));
  ok = ChangedAfter(l, Gen(1), 9);
  ASSERT_TRUE(ok.ok());
  EXPECT_TRUE(ok->empty());
  EXPECT_EQ(ChangedAfter(l, Gen(2), 5).status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(ChangedAfter(l, Gen(1), 10).status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(ChangedAfter(l, Gen(1), 2).status().code(), Code::kFailedPrecondition);
  l.generation = GenerationId{};
  EXPECT_EQ(ChangedAfter(l, GenerationId{}, 5).status().code(), Code::kFailedPrecondition);
  l = SmallSince();
  l.points.clear();
  l.entries.clear();
  EXPECT_EQ(ChangedAfter(l, Gen(1), 5).status().code(), Code::kFailedPrecondition);
}

// ------------------------------------------------------------ range arithmetic

TEST(RangesTest, UniteRangesEqualsTheUnionOfBytes) {
  std::mt19937_64 rng(21);
  constexpr uint64_t kSpace = 3000;
  for (int iter = 0; iter < 2000; ++iter) {
    std::vector<ReplicaRange> a, b;
    std::vector<std::vector<bool>> want(3, std::vector<bool>(kSpace, false));
    for (auto* v : {&a, &b}) {
      const size_t n = rng() % 8;
      for (size_t i = 0; i < n; ++i) {
        ReplicaRange r{static_cast<uint32_t>(rng() % 3), rng() % 2800, rng() % 150};
        for (uint64_t x = r.offset; x < r.offset + r.length; ++x) want[r.disk][x] = true;
        v->push_back(r);
      }
    }
    const auto got = UniteRanges(a, b);
    std::vector<std::vector<bool>> have(3, std::vector<bool>(kSpace, false));
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_GT(got[i].length, 0u);
      if (i > 0) {  // sorted, and neither overlapping nor touching
        ASSERT_TRUE(got[i - 1].disk < got[i].disk ||
                    (got[i - 1].disk == got[i].disk && got[i - 1].offset + got[i - 1].length < got[i].offset));
      }
      for (uint64_t x = got[i].offset; x < got[i].offset + got[i].length; ++x) have[got[i].disk][x] = true;
    }
    ASSERT_EQ(have, want) << "iteration " << iter;
  }
  // An end past 2^64 is clamped.
  const auto big = UniteRanges({{0, ~uint64_t{0} - 10, 100}}, {{0, 5, 0}});
  ASSERT_EQ(big.size(), 1u);
  EXPECT_EQ(big[0].offset + big[0].length, ~uint64_t{0});
}

TEST(RangesTest, RoundToBlocksEqualsBruteForceBlockRuns) {
  std::mt19937_64 rng(22);
  for (int iter = 0; iter < 3000; ++iter) {
    const uint32_t bs = std::vector<uint32_t>{512, 4096, 1000}[rng() % 3];
    const uint64_t disk_size = 1 + rng() % (60 * bs);
    const uint64_t blocks = (disk_size + bs - 1) / bs;
    const uint64_t merge_gap = rng() % 3 == 0 ? 0 : rng() % (6 * bs);
    const uint32_t disk = static_cast<uint32_t>(rng() % 2);
    std::vector<ReplicaRange> in;
    const size_t n = rng() % 10;
    for (size_t i = 0; i < n; ++i) {
      in.push_back({static_cast<uint32_t>(rng() % 2), rng() % (disk_size + 3 * bs), rng() % (4 * bs)});
    }
    // Brute force: the set of touched blocks inside the disk, by byte.
    std::vector<bool> touched(blocks, false);
    for (const ReplicaRange& r : in) {
      if (r.disk != disk) continue;
      for (uint64_t x = r.offset; x < r.offset + r.length; ++x) {
        if (x / bs < blocks) touched[x / bs] = true;
      }
    }
    // Maximal runs, then runs whose gap in bytes is below merge_gap joined.
    std::vector<BlockRun> want;
    for (uint64_t b = 0; b < blocks; ++b) {
      if (!touched[b]) continue;
      if (!want.empty() && (b - (want.back().first_block + want.back().block_count)) * bs < merge_gap) {
        want.back().block_count = b + 1 - want.back().first_block;
      } else if (!want.empty() && want.back().first_block + want.back().block_count == b) {
        ++want.back().block_count;
      } else {
        want.push_back({b, 1});
      }
    }
    const auto got = RoundToBlocks(in, disk, bs, disk_size, merge_gap);
    ASSERT_EQ(got, want) << "iteration " << iter << " bs " << bs << " size " << disk_size << " gap " << merge_gap;
  }
  EXPECT_TRUE(RoundToBlocks({{0, 0, 100}}, 0, 0, 4096, 0).empty());
  // Near 2^64: clamped to the disk, no overflow.
  EXPECT_EQ(RoundToBlocks({{0, 8192, ~uint64_t{0}}}, 0, 4096, 5 * 4096 + 1, 0), (std::vector<BlockRun>{{2, 4}}));
}

TEST(RangesTest, CoarsenedSinceEntriesAreASupersetForEveryCommonPoint) {
  std::mt19937_64 rng(23);
  for (int iter = 0; iter < 500; ++iter) {
    const SinceList l = RandomList(rng, kRangeListSince, 3, 60);
    const uint64_t gap = (rng() % 6) * kRangeListAlign;
    const auto out = reverse_internal::CoarsenEntries(l.entries, gap);
    ASSERT_LE(out.size(), l.entries.size());
    // Still a valid list of the same points.
    SinceList c = l;
    c.entries = out;
    ASSERT_TRUE(ParseRangeList(SerializeRangeList(kRangeListSince, 3, c), kRangeListSince, 3).ok());
    // Neighbours left apart are at least `gap` apart.
    for (size_t i = 1; i < out.size(); ++i) {
      if (out[i].disk == out[i - 1].disk) {
        ASSERT_GE(out[i].offset - (out[i - 1].offset + out[i - 1].length), gap);
      }
    }
    // For every k, what the entries labelled >= k cover only grows.
    for (uint64_t k : l.points) {
      std::vector<ReplicaRange> before, after;
      for (const RangeEntry& e : l.entries) {
        if (e.label >= k) before.push_back({e.disk, e.offset, e.length});
      }
      for (const RangeEntry& e : out) {
        if (e.label >= k) after.push_back({e.disk, e.offset, e.length});
      }
      const auto have = Blocks(after);
      for (const auto& blk : Blocks(before)) ASSERT_TRUE(have.count(blk)) << "iteration " << iter << " k " << k;
    }
  }
}

// ------------------------------------------------------------ records

const std::string kVmId = "0f8c2a10-1b2c-4d3e-8f90-a1b2c3d4e5f6";
const std::string kReqId = "11111111-2222-4333-8444-555555555555";

ReverseSendRecord GoodSend() {
  ReverseSendRecord r;
  r.purpose = "reverse";
  r.vm_id = kVmId;
  r.request_id = kReqId;
  r.phase = "switched";
  r.target = "hosta.vmreplica.test:7443";
  r.claim = ReverseClaim{Gen(7), 42, true, 65536, 1 << 20};
  return r;
}

ReverseRecvRecord GoodRecv(const std::string& state) {
  ReverseRecvRecord r;
  r.purpose = "failback";
  r.vm_id = kVmId;
  r.request_id = kReqId;
  r.phase = "adopting";
  r.caller_names = {"hostb.vmreplica.test", "*.vmreplica.test"};
  r.claim = ReverseClaim{Gen(8), 7, false, 0, 12345};
  r.store_dir = "/srv/replicas/" + kVmId;
  r.created_dir = true;
  r.acand_file = state + "/reverse/" + kVmId + ".acand";
  return r;
}

TEST(ReverseRecordTest, RoundTripThroughAFile) {
  TempDir dir;
  const std::string state = dir.path();
  ASSERT_TRUE(MakeDirs(state + "/reverse").ok());
  EXPECT_EQ(ReverseSendRecordPath(state, kVmId), state + "/reverse/" + kVmId + ".send.json");
  EXPECT_EQ(ReverseRecvRecordPath(state, kVmId), state + "/reverse/" + kVmId + ".recv.json");

  ReverseSendRecord early = GoodSend();
  early.phase = "started";
  early.claim.reset();
  early.target = "[fd00::1]:443";
  for (const ReverseSendRecord& s : {GoodSend(), early}) {
    const std::string path = ReverseSendRecordPath(state, kVmId);
    ASSERT_TRUE(WriteReverseRecord(path, s.Encode()).ok());
    auto j = ReadReverseRecord(path);
    ASSERT_TRUE(j.ok()) << j.status().ToString();
    auto back = ReverseSendRecord::Decode(*j, state);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(*back, s);
    // Also straight from Encode (no text in between).
    auto direct = ReverseSendRecord::Decode(s.Encode(), state);
    ASSERT_TRUE(direct.ok()) << direct.status().ToString();
    EXPECT_EQ(*direct, s);
  }
  ReverseRecvRecord inspecting = GoodRecv(state);
  inspecting.phase = "inspecting";
  inspecting.claim.reset();
  inspecting.store_dir = "";
  inspecting.created_dir = false;
  for (const ReverseRecvRecord& r : {GoodRecv(state), inspecting}) {
    const std::string path = ReverseRecvRecordPath(state, kVmId);
    ASSERT_TRUE(WriteReverseRecord(path, r.Encode()).ok());
    auto j = ReadReverseRecord(path);
    ASSERT_TRUE(j.ok()) << j.status().ToString();
    auto back = ReverseRecvRecord::Decode(*j, state);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(*back, r);
  }
  // A sender record is not a receiver record, and the other way round.
  EXPECT_EQ(ReverseRecvRecord::Decode(GoodSend().Encode(), state).status().code(), Code::kCorruption);
  EXPECT_EQ(ReverseSendRecord::Decode(GoodRecv(state).Encode(), state).status().code(), Code::kCorruption);
}

TEST(ReverseRecordTest, FileBoundsAndBadJson) {
  TempDir dir;
  const std::string path = dir.path() + "/r.json";
  EXPECT_EQ(ReadReverseRecord(path).status().code(), Code::kNotFound);
  ASSERT_TRUE(WriteFileAtomic(path, "{\"version\": 1").ok());
  EXPECT_EQ(ReadReverseRecord(path).status().code(), Code::kCorruption);
  ASSERT_TRUE(WriteFileAtomic(path, "[1, 2]").ok());
  EXPECT_EQ(ReadReverseRecord(path).status().code(), Code::kCorruption);
  ASSERT_TRUE(WriteFileAtomic(path, "{\"pad\": \"" + std::string(kReverseRecordMaxBytes, 'x') + "\"}").ok());
  auto big = ReadReverseRecord(path);
  EXPECT_EQ(big.status().code(), Code::kCorruption);
  EXPECT_NE(big.status().message().find("64 KiB"), std::string::npos) << big.status().ToString();
  nlohmann::json huge = GoodSend().Encode();
  huge["target"] = std::string(kReverseRecordMaxBytes, 'h');
  EXPECT_EQ(WriteReverseRecord(path, huge).code(), Code::kInvalidArgument);
}

// Applies `edit` to a good record's JSON and expects Corruption naming `member`.
template <typename Record>
void ExpectBadMember(const nlohmann::json& good, const std::string& state, const std::string& member,
                     const std::function<void(nlohmann::json*)>& edit) {
  nlohmann::json j = good;
  edit(&j);
  auto r = Record::Decode(j, state);
  ASSERT_FALSE(r.ok()) << member << " accepted: " << j.dump();
  EXPECT_EQ(r.status().code(), Code::kCorruption);
  EXPECT_NE(r.status().message().find("'" + member + "'"), std::string::npos)
      << "wanted member " << member << ", got " << r.status().ToString();
}

using J = nlohmann::json;

TEST(ReverseRecordTest, EveryBadSenderMemberIsRefused) {
  const std::string state = "/var/lib/vmreplica";
  const J good = GoodSend().Encode();
  ASSERT_TRUE(ReverseSendRecord::Decode(good, state).ok());
  auto bad = [&](const std::string& member, std::function<void(J*)> edit) {
    SCOPED_TRACE(member);
    ExpectBadMember<ReverseSendRecord>(good, state, member, edit);
  };
  bad("version", [](J* j) { (*j)["version"] = 2; });
  bad("version", [](J* j) { (*j)["version"] = "1"; });
  bad("version", [](J* j) { j->erase("version"); });
  bad("side", [](J* j) { (*j)["side"] = "receiver"; });
  bad("purpose", [](J* j) { (*j)["purpose"] = "sideways"; });
  bad("purpose", [](J* j) { (*j)["purpose"] = 1; });
  bad("vm_id", [](J* j) { (*j)["vm_id"] = "0F8C2A10-1B2C-4D3E-8F90-A1B2C3D4E5F6"; });
  bad("vm_id", [](J* j) { (*j)["vm_id"] = "../../etc"; });
  bad("request_id", [](J* j) { j->erase("request_id"); });
  bad("phase", [](J* j) { (*j)["phase"] = "adopting"; });
  bad("target", [](J* j) { (*j)["target"] = "hosta"; });
  bad("target", [](J* j) { (*j)["target"] = "hosta:0"; });
  bad("target", [](J* j) { (*j)["target"] = "hosta:65536"; });
  bad("target", [](J* j) { (*j)["target"] = "host a:443"; });
  bad("target", [](J* j) { (*j)["target"] = "[fd00::1:443"; });
  bad("target", [](J* j) { (*j)["target"] = ":443"; });
  bad("claim", [](J* j) { j->erase("claim"); });  // phase switched
  bad("claim", [](J* j) { (*j)["claim"] = 5; });
  bad("claim.generation", [](J* j) { (*j)["claim"]["generation"] = std::string(31, 'a'); });
  bad("claim.generation", [](J* j) { (*j)["claim"]["generation"] = std::string(32, 'A'); });
  bad("claim.generation", [](J* j) { (*j)["claim"]["generation"] = std::string(32, 'g'); });
  bad("claim.common_sequence", [](J* j) { (*j)["claim"]["common_sequence"] = -1; });
  bad("claim.common_sequence", [](J* j) { (*j)["claim"]["common_sequence"] = 1.5; });
  bad("claim.tracking", [](J* j) { (*j)["claim"]["tracking"] = 3; });
  bad("claim.tracking", [](J* j) { (*j)["claim"]["tracking"] = true; });
  bad("claim.candidate_bytes", [](J* j) { (*j)["claim"].erase("candidate_bytes"); });
  bad("claim.local_copy_bytes", [](J* j) { (*j)["claim"]["local_copy_bytes"] = "1"; });
  bad("claim.extra", [](J* j) { (*j)["claim"]["extra"] = 1; });
  bad("caller_names", [](J* j) { (*j)["caller_names"] = J::array({"x"}); });
  bad("store_dir", [](J* j) { (*j)["store_dir"] = "/x"; });
  EXPECT_EQ(ReverseSendRecord::Decode(J::array(), state).status().code(), Code::kCorruption);
}

TEST(ReverseRecordTest, EveryBadReceiverMemberIsRefused) {
  const std::string state = "/var/lib/vmreplica";
  const J good = GoodRecv(state).Encode();
  ASSERT_TRUE(ReverseRecvRecord::Decode(good, state).ok());
  auto bad = [&](const std::string& member, std::function<void(J*)> edit) {
    SCOPED_TRACE(member);
    ExpectBadMember<ReverseRecvRecord>(good, state, member, edit);
  };
  bad("version", [](J* j) { (*j)["version"] = 0; });
  bad("side", [](J* j) { (*j)["side"] = "sender"; });
  bad("purpose", [](J* j) { (*j)["purpose"] = "Reverse"; });
  bad("vm_id", [](J* j) { (*j)["vm_id"] = ""; });
  bad("request_id", [](J* j) { (*j)["request_id"] = "11111111222243338444555555555555"; });
  bad("phase", [](J* j) { (*j)["phase"] = "peer"; });
  bad("caller_names", [](J* j) { (*j)["caller_names"] = J::array(); });
  bad("caller_names", [](J* j) { (*j)["caller_names"] = "hostb"; });
  bad("caller_names", [](J* j) { (*j)["caller_names"] = J::array({"ok", 5}); });
  bad("caller_names", [](J* j) { (*j)["caller_names"] = J::array({"with space"}); });
  bad("caller_names", [](J* j) { (*j)["caller_names"] = J::array({std::string(256, 'n')}); });
  bad("caller_names", [](J* j) {
    J a = J::array();
    for (int i = 0; i < 65; ++i) a.push_back("n" + std::to_string(i));
    (*j)["caller_names"] = a;
  });
  bad("claim.tracking", [](J* j) { (*j)["claim"]["tracking"] = 0; });
  bad("claim", [](J* j) {
    (*j)["phase"] = "switched";
    j->erase("claim");
  });
  bad("store_dir", [](J* j) { (*j)["store_dir"] = "relative/dir"; });
  bad("store_dir", [](J* j) { (*j)["store_dir"] = "/srv/replicas/../etc"; });
  bad("store_dir", [](J* j) { (*j)["store_dir"] = "/srv//replicas"; });
  bad("store_dir", [](J* j) { (*j)["store_dir"] = "/srv/replicas/"; });
  bad("store_dir", [](J* j) { (*j)["store_dir"] = "/"; });
  bad("store_dir", [](J* j) { (*j)["store_dir"] = ""; });  // phase adopting
  bad("store_dir", [](J* j) { (*j)["store_dir"] = 7; });
  bad("created_dir", [](J* j) {
    (*j)["phase"] = "inspecting";
    (*j)["store_dir"] = "";
  });
  bad("created_dir", [](J* j) { (*j)["created_dir"] = 1; });
  bad("acand_file", [](J* j) { (*j)["acand_file"] = "/tmp/x.acand"; });
  bad("acand_file", [&](J* j) { (*j)["acand_file"] = state + "/reverse/other.acand"; });
  bad("target", [](J* j) { (*j)["target"] = "hosta:1"; });
}

}  // namespace
}  // namespace vmreplica
