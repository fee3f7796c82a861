// Block-status replies a server could send, including ones that break the
// protocol, and what the reader plans from them.
#include "blockio/extent_map.h"

#include <gtest/gtest.h>

#include <ostream>
#include <vector>

namespace vmreplica::blockio_internal {
namespace {

constexpr const char* kAlloc = "base:allocation";
constexpr const char* kDirty = "qemu:dirty-bitmap:bm0";
constexpr uint32_t kData = 0;
constexpr uint32_t kHole = 1;
constexpr uint32_t kZero = 2;
constexpr uint32_t kHoleZero = 3;
constexpr uint32_t kClean = 0;
constexpr uint32_t kDirtyBit = 1;

struct Planned {
  uint64_t offset;
  uint64_t length;
  bool zero;
  bool operator==(const Planned&) const = default;
};

std::ostream& operator<<(std::ostream& os, const Planned& p) {
  return os << "{" << p.offset << "," << p.length << (p.zero ? ",zero}" : ",data}");
}

struct WalkResult {
  Result<uint64_t> end = Status::Internal("not run");
  std::vector<Planned> planned;
};

WalkResult Walk(uint64_t size, const ContextExtents& alloc, const ContextExtents* dirty) {
  WalkResult run;
  run.end = Intersect(size, alloc, kAlloc, dirty, kDirty, [&](uint64_t o, uint64_t l, bool z) {
    run.planned.push_back({o, l, z});
  });
  return run;
}

ContextExtents Make(uint64_t start, std::vector<uint32_t> words) {
  ContextExtents c;
  c.Reset(start);
  EXPECT_EQ(c.Add(kAlloc, start, words.data(), words.size()), "");
  return c;
}

TEST(ContextExtentsTest, ZeroLengthExtentIsRejected) {
  ContextExtents c;
  c.Reset(0);
  std::vector<uint32_t> w = {4096, kData, 0, kData};
  EXPECT_NE(c.Add(kAlloc, 0, w.data(), w.size()).find("zero-length"), std::string::npos);
}

TEST(ContextExtentsTest, OddWordCountIsRejected) {
  ContextExtents c;
  c.Reset(0);
  std::vector<uint32_t> w = {4096, kData, 4096};
  EXPECT_NE(c.Add(kAlloc, 0, w.data(), w.size()), "");
  EXPECT_NE(c.Add(kAlloc, 0, w.data(), 0), "");
}

TEST(ContextExtentsTest, ExtentsAtTheWrongOffsetAreRejected) {
  ContextExtents c;
  c.Reset(8192);
  std::vector<uint32_t> w = {4096, kData};
  EXPECT_NE(c.Add(kAlloc, 0, w.data(), w.size()).find("expected 8192"), std::string::npos);
}

TEST(ContextExtentsTest, RepeatedCallbackMustContinueWhereTheLastEnded) {
  ContextExtents c;
  c.Reset(0);
  std::vector<uint32_t> w = {4096, kData};
  EXPECT_EQ(c.Add(kAlloc, 0, w.data(), w.size()), "");
  EXPECT_EQ(c.Add(kAlloc, 4096, w.data(), w.size()), "");
  EXPECT_NE(c.Add(kAlloc, 4096, w.data(), w.size()), "");
  EXPECT_EQ(c.end(), 8192u);
}

TEST(ContextExtentsTest, OverflowPast64BitsIsRejected) {
  ContextExtents c;
  const uint64_t near_end = UINT64_MAX - 100;
  c.Reset(near_end);
  std::vector<uint32_t> w = {4096, kData};
  EXPECT_NE(c.Add(kAlloc, near_end, w.data(), w.size()).find("overflows"), std::string::npos);
}

TEST(IntersectTest, InitialCopyReadsDataAndHolesWithoutZeroSkipsZeros) {
  auto alloc = Make(0, {4096, kData, 4096, kHoleZero, 4096, kHole, 4096, kZero, 4096, kData});
  WalkResult r = Walk(1 << 20, alloc, nullptr);
  ASSERT_TRUE(r.end.ok());
  EXPECT_EQ(*r.end, 5 * 4096u);
  // A hole that is not also ZERO may show backing bytes: it is read.
  EXPECT_EQ(r.planned,
            (std::vector<Planned>{{0, 4096, false}, {8192, 4096, false}, {16384, 4096, false}}));
}

TEST(IntersectTest, DeltaSendsDirtyZerosAsZeroAndDirtyDataAsData) {
  auto alloc = Make(0, {8192, kData, 8192, kHoleZero});
  ContextExtents dirty;
  dirty.Reset(0);
  std::vector<uint32_t> d = {4096, kClean, 8192, kDirtyBit, 4096, kClean};
  ASSERT_EQ(dirty.Add(kDirty, 0, d.data(), d.size()), "");
  WalkResult r = Walk(1 << 20, alloc, &dirty);
  ASSERT_TRUE(r.end.ok());
  EXPECT_EQ(*r.end, 16384u);
  EXPECT_EQ(r.planned, (std::vector<Planned>{{4096, 4096, false}, {8192, 4096, true}}));
}

// The server may answer for less than asked, and the two contexts may answer
// for different lengths: only the part both covered is used.
TEST(IntersectTest, ShorterContextBoundsTheKnownRange) {
  auto alloc = Make(65536, {1 << 20, kData});
  ContextExtents dirty;
  dirty.Reset(65536);
  std::vector<uint32_t> d = {4096, kDirtyBit};
  ASSERT_EQ(dirty.Add(kDirty, 65536, d.data(), d.size()), "");
  WalkResult r = Walk(1ull << 30, alloc, &dirty);
  ASSERT_TRUE(r.end.ok());
  EXPECT_EQ(*r.end, 65536u + 4096);
  EXPECT_EQ(r.planned, (std::vector<Planned>{{65536, 4096, false}}));
}

TEST(IntersectTest, ExtentsPastTheEndOfTheExportAreClipped) {
  auto alloc = Make(0, {1 << 20, kData});
  WalkResult r = Walk(10000, alloc, nullptr);
  ASSERT_TRUE(r.end.ok());
  EXPECT_EQ(*r.end, 10000u);
  EXPECT_EQ(r.planned, (std::vector<Planned>{{0, 10000, false}}));
}

TEST(IntersectTest, MissingContextIsCorruption) {
  auto alloc = Make(0, {4096, kData});
  ContextExtents dirty;
  dirty.Reset(0);
  WalkResult r = Walk(1 << 20, alloc, &dirty);
  ASSERT_FALSE(r.end.ok());
  EXPECT_EQ(r.end.status().code(), Code::kCorruption);
  EXPECT_NE(r.end.status().message().find(kDirty), std::string::npos);

  ContextExtents none;
  none.Reset(0);
  r = Walk(1 << 20, none, nullptr);
  ASSERT_FALSE(r.end.ok());
  EXPECT_EQ(r.end.status().code(), Code::kCorruption);
}

TEST(IntersectTest, NoProgressIsCorruptionNotALoop) {
  // Start at the end of the export: whatever the server says, nothing new.
  auto alloc = Make(4096, {4096, kData});
  WalkResult r = Walk(4096, alloc, nullptr);
  ASSERT_FALSE(r.end.ok());
  EXPECT_EQ(r.end.status().code(), Code::kCorruption);
}

TEST(IntersectTest, ManySmallExtentsAgainstOneLargeOne) {
  std::vector<uint32_t> a;
  for (int i = 0; i < 16; ++i) {
    a.push_back(512);
    a.push_back(i % 2 == 0 ? kData : kHoleZero);
  }
  auto alloc = Make(0, a);
  ContextExtents dirty;
  dirty.Reset(0);
  std::vector<uint32_t> d = {8192, kDirtyBit};
  ASSERT_EQ(dirty.Add(kDirty, 0, d.data(), d.size()), "");
  WalkResult r = Walk(1 << 20, alloc, &dirty);
  ASSERT_TRUE(r.end.ok());
  EXPECT_EQ(*r.end, 8192u);
  ASSERT_EQ(r.planned.size(), 16u);
  uint64_t pos = 0;
  for (size_t i = 0; i < r.planned.size(); ++i) {
    EXPECT_EQ(r.planned[i], (Planned{pos, 512, i % 2 == 1}));
    pos += 512;
  }
}

}  // namespace
}  // namespace vmreplica::blockio_internal
