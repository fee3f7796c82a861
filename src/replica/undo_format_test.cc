#include "replica/undo_format.h"

#include <gtest/gtest.h>

namespace vmreplica::replica_internal {
namespace {

Manifest Sample(bool carried = false) {
  Manifest m;
  m.vm_id = "vm-1";
  m.disks = {{"vda", 1 << 20}, {"vdb", 8192}};
  m.points = {{0, 0, 0, ""}, {3, 1000, 2, "gen"}};
  if (carried) m.carried = {1, 2};
  return m;
}

TEST(ManifestTest, CarriedSegmentsRoundTripAsVersionTwo) {
  std::string b = EncodeManifest(Sample(true));
  EXPECT_EQ(GetU32(b.data() + 8), kManifestVersionCarried);
  EXPECT_EQ(GetU32(EncodeManifest(Sample()).data() + 8), kFormatVersion);  // none: still version 1
  auto d = DecodeManifest(b);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->carried, (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(d->points.size(), 2u);
  for (size_t i = 0; i < b.size(); ++i) {
    std::string c = b;
    c[i] ^= 0x10;
    EXPECT_EQ(DecodeManifest(c).status().code(), Code::kCorruption) << "byte " << i;
  }
  for (size_t n = 0; n < b.size(); ++n)
    EXPECT_EQ(DecodeManifest(b.substr(0, n)).status().code(), Code::kCorruption) << n;
}

TEST(ManifestTest, CarriedSegmentThatIsAPointOrOutOfRangeOrUnorderedIsCorruption) {
  for (const std::vector<uint64_t>& bad : std::vector<std::vector<uint64_t>>{{0}, {3}, {4}, {2, 1}, {1, 1}}) {
    Manifest m = Sample();
    m.carried = bad;
    EXPECT_EQ(DecodeManifest(EncodeManifest(m)).status().code(), Code::kCorruption) << bad[0];
  }
  Manifest m = Sample();
  m.points = {{0, 0, 0, ""}, {2, 0, 0, ""}, {5, 0, 0, ""}};
  m.carried = {2};
  EXPECT_EQ(DecodeManifest(EncodeManifest(m)).status().code(), Code::kCorruption);
  m.carried = {1, 4};
  EXPECT_TRUE(DecodeManifest(EncodeManifest(m)).ok());
}

TEST(ManifestTest, RoundTrips) {
  auto d = DecodeManifest(EncodeManifest(Sample()));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->vm_id, "vm-1");
  ASSERT_EQ(d->disks.size(), 2u);
  EXPECT_EQ(d->disks[1].size, 8192u);
  ASSERT_EQ(d->points.size(), 2u);
  EXPECT_EQ(d->points[1].kind, 2);
  EXPECT_EQ(d->points[1].generation, "gen");
}

TEST(ManifestTest, EveryFlippedByteIsCorruption) {
  std::string b = EncodeManifest(Sample());
  for (size_t i = 0; i < b.size(); ++i) {
    std::string c = b;
    c[i] ^= 0x10;
    EXPECT_EQ(DecodeManifest(c).status().code(), Code::kCorruption) << "byte " << i;
  }
}

TEST(ManifestTest, EveryTruncationIsCorruption) {
  std::string b = EncodeManifest(Sample());
  for (size_t n = 0; n < b.size(); ++n)
    EXPECT_EQ(DecodeManifest(b.substr(0, n)).status().code(), Code::kCorruption) << n;
}

TEST(SegmentFormatTest, HeaderRoundTripsAndFlipsAreDetected) {
  std::string h = EncodeSegmentHeader({kReplicaBlockSize, 4, 5, 2});
  ASSERT_EQ(h.size(), kSegmentHeaderSize);
  SegmentHeader d;
  ASSERT_TRUE(DecodeSegmentHeader(h.data(), &d).ok());
  EXPECT_EQ(d.point_seq, 4u);
  EXPECT_EQ(d.upper_seq, 5u);
  for (size_t i = 0; i < h.size(); ++i) {
    std::string c = h;
    c[i] ^= 1;
    EXPECT_FALSE(DecodeSegmentHeader(c.data(), &d).ok()) << i;
  }
}

TEST(SegmentFormatTest, EntryChecksumCoversPayload) {
  std::string payload(kReplicaBlockSize, 'x');
  std::string e;
  AppendEntry(&e, 1, 77, false, payload.data(), kReplicaBlockSize);
  ASSERT_EQ(e.size(), kRecordHeaderSize + kReplicaBlockSize);
  RecordHeader h = ParseRecordHeader(e.data());
  EXPECT_EQ(h.tag, kEntryTag);
  EXPECT_EQ(h.disk, 1u);
  EXPECT_EQ(h.block, 77u);
  EXPECT_TRUE(EntryChecksumOk(e.data(), e.data() + kRecordHeaderSize, h.payload_len));
  e[kRecordHeaderSize + 100] ^= 4;
  EXPECT_FALSE(EntryChecksumOk(e.data(), e.data() + kRecordHeaderSize, h.payload_len));
}

TEST(SegmentFormatTest, MarkerChecksum) {
  std::string m;
  AppendMarker(&m, kBatchTag, 4096, 3);
  RecordHeader h = ParseRecordHeader(m.data());
  EXPECT_EQ(h.offset, 4096u);
  EXPECT_EQ(h.entry_count, 3u);
  EXPECT_TRUE(MarkerChecksumOk(m.data()));
  m[9] ^= 1;
  EXPECT_FALSE(MarkerChecksumOk(m.data()));
}

}  // namespace
}  // namespace vmreplica::replica_internal
