#include <gtest/gtest.h>

#include "nbdserver/nbd_test_util.h"
#include "vmreplica/nbd_server.h"

namespace vmreplica {
namespace {

using nbd::testing::MakeSparseFile;
using nbd::testing::TempDir;

TEST(FileExportSourceTest, MissingFileIsNotFound) {
  TempDir dir;
  auto r = FileExportSource::Open(dir.Join("missing.img"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
}

TEST(FileExportSourceTest, DirectoryIsNotSupported) {
  TempDir dir;
  auto r = FileExportSource::Open(dir.path());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotSupported);
}

TEST(FileExportSourceTest, ReadsBytesAndReportsDataAndHoles) {
  TempDir dir;
  const uint64_t kSize = 4 << 20;
  std::string content =
      MakeSparseFile(dir.Join("a.img"), kSize, {{0, 65536}, {1 << 20, 8192}, {3 << 20, 4096}});
  ASSERT_EQ(content.size(), kSize);
  auto src = FileExportSource::Open(dir.Join("a.img"));
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  EXPECT_EQ((*src)->size(), kSize);

  std::string buf(100000, '\0');
  ASSERT_TRUE((*src)->Read(1000, buf.size(), buf.data()).ok());
  EXPECT_EQ(buf, content.substr(1000, buf.size()));
  EXPECT_FALSE((*src)->Read(kSize - 1, 2, buf.data()).ok());

  auto ext = (*src)->Extents(0, kSize);
  ASSERT_TRUE(ext.ok());
  // Sum of lengths covers the range; data extents hold exactly the regions
  // (file systems allocate at least 4 KiB blocks, regions are aligned).
  uint64_t pos = 0, data_bytes = 0;
  for (const Extent& e : *ext) {
    ASSERT_GT(e.length, 0u);
    EXPECT_EQ(e.hole, e.zero);
    if (!e.hole) {
      data_bytes += e.length;
    } else {
      EXPECT_EQ(content.substr(pos, e.length), std::string(e.length, '\0'));
    }
    pos += e.length;
  }
  EXPECT_EQ(pos, kSize);
  EXPECT_GE(data_bytes, 65536u + 8192 + 4096);
  EXPECT_LT(data_bytes, kSize);  // the holes are reported

  auto tail = (*src)->Extents(kSize - 100, 100);
  ASSERT_TRUE(tail.ok());
  ASSERT_EQ(tail->size(), 1u);
  EXPECT_EQ((*tail)[0].length, 100u);
  EXPECT_TRUE((*tail)[0].hole);
  EXPECT_FALSE((*src)->Extents(kSize, 1).ok());
}

}  // namespace
}  // namespace vmreplica
