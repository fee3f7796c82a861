// NbdDirtyExtents against a real qemu-storage-daemon (e2e): qcow2 disks with
// a persistent dirty bitmap, written through their NBD export with qemu-io at
// random offsets; the expected ranges are computed here from the offsets
// written and the bitmap's granularity alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

#include "blockio/qsd_testing.h"
#include "vmreplica/nbd_reader.h"

namespace vmreplica {
namespace {

using blockio_testing::CreateQcow2;
using blockio_testing::QemuIo;
using blockio_testing::Qsd;
using blockio_testing::TempDir;

struct Span {
  uint64_t begin;
  uint64_t end;
  bool operator==(const Span&) const = default;
};

// Each write's bytes rounded out to `granularity` (what QEMU's bitmap
// marks), clipped to the disk, united: sorted, no two touching.
std::vector<Span> Expected(std::vector<Span> writes, uint64_t granularity, uint64_t size) {
  for (Span& w : writes) {
    w.begin -= w.begin % granularity;
    w.end = std::min(size, (w.end + granularity - 1) / granularity * granularity);
  }
  std::sort(writes.begin(), writes.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  std::vector<Span> out;
  for (const Span& w : writes) {
    if (!out.empty() && w.begin <= out.back().end) {
      out.back().end = std::max(out.back().end, w.end);
    } else {
      out.push_back(w);
    }
  }
  return out;
}

std::vector<Span> Spans(const std::vector<ReplicaRange>& r, uint32_t disk) {
  std::vector<Span> out;
  for (const ReplicaRange& x : r) {
    EXPECT_EQ(x.disk, disk);
    out.push_back(Span{x.offset, x.offset + x.length});
  }
  return out;
}

class DirtyExtentsTest : public ::testing::TestWithParam<uint32_t> {};

TEST_P(DirtyExtentsTest, EqualsTheRangesWrittenThroughTheExport) {
  const uint32_t granularity = GetParam();
  TempDir tmp("vmr-dirty");
  ASSERT_TRUE(tmp.ok());
  const uint64_t size = (48ull << 20) + 1536;  // not a multiple of 4096: the last range ends at the size
  const std::string image = tmp.path() + "/d.qcow2";
  Status s = CreateQcow2(image, size, std::string("bm0"), granularity);
  ASSERT_TRUE(s.ok()) << "qemu-img is required: " << s.ToString();
  auto qsd = Qsd::Start(tmp.path(), image, std::string("bm0"));
  ASSERT_TRUE(qsd.ok()) << "qemu-storage-daemon is required: " << qsd.status().ToString();
  const std::string ctx = "qemu:dirty-bitmap:bm0";

  // Nothing written yet: nothing dirty.
  auto none = NbdDirtyExtents((*qsd)->socket(), (*qsd)->export_name(), ctx, 5);
  ASSERT_TRUE(none.ok()) << none.status().ToString();
  EXPECT_TRUE(none->empty());

  std::mt19937_64 rng(granularity);
  std::vector<Span> written;
  std::vector<std::string> cmds;
  for (int i = 0; i < 60; ++i) {
    // Sizes from a few bytes to a few MiB, offsets anywhere (512-aligned for
    // qemu-io's zero writes, byte-aligned for data).
    const bool zero = rng() % 4 == 0;
    uint64_t len = 1 + rng() % (rng() % 3 == 0 ? (3u << 20) : 20000);
    uint64_t off = rng() % size;
    if (zero) {
      off -= off % 512;
      len = (len + 511) / 512 * 512;
    }
    len = std::min(len, size - off);
    if (len == 0) continue;
    written.push_back(Span{off, off + len});
    cmds.push_back(zero ? "write -z " + std::to_string(off) + " " + std::to_string(len)
                        : "write -P " + std::to_string(rng() % 256) + " " + std::to_string(off) + " " +
                              std::to_string(len));
  }
  written.push_back(Span{size - 700, size});  // the end of the disk
  cmds.push_back("write -P 7 " + std::to_string(size - 700) + " 700");
  s = QemuIo((*qsd)->uri(), cmds);
  ASSERT_TRUE(s.ok()) << "qemu-io is required: " << s.ToString();

  auto got = NbdDirtyExtents((*qsd)->socket(), (*qsd)->export_name(), ctx, 5);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  const std::vector<Span> expected = Expected(written, granularity, size);
  EXPECT_EQ(Spans(*got, 5), expected);
  for (const ReplicaRange& r : *got) {
    EXPECT_EQ(r.offset % 4096, 0u);
    EXPECT_TRUE(r.length % 4096 == 0 || r.offset + r.length == size) << r.offset << "+" << r.length;
  }
  std::printf("granularity %u: %zu writes, %zu dirty ranges\n", granularity, written.size(), got->size());

  // A context the server does not offer: tracking lost.
  auto missing = NbdDirtyExtents((*qsd)->socket(), (*qsd)->export_name(), "qemu:dirty-bitmap:other", 0);
  EXPECT_EQ(missing.status().code(), Code::kFailedPrecondition) << missing.status().ToString();
  auto no_export = NbdDirtyExtents((*qsd)->socket(), "nope", ctx, 0);
  EXPECT_EQ(no_export.status().code(), Code::kUnavailable) << no_export.status().ToString();
  EXPECT_EQ(NbdDirtyExtents((*qsd)->socket(), (*qsd)->export_name(), "base:allocation", 0).status().code(),
            Code::kInvalidArgument);
  EXPECT_EQ(NbdDirtyExtents((*qsd)->socket(), (*qsd)->export_name(), "", 0).status().code(), Code::kInvalidArgument);
  ASSERT_TRUE((*qsd)->Stop().ok());
  EXPECT_EQ(NbdDirtyExtents((*qsd)->socket(), (*qsd)->export_name(), ctx, 0).status().code(), Code::kUnavailable);
}

INSTANTIATE_TEST_SUITE_P(Granularity, DirtyExtentsTest, ::testing::Values(4096u, 65536u));

}  // namespace
}  // namespace vmreplica
