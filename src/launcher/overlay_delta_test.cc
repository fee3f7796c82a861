// OverlayDeltaSource on overlays written with qemu-io (no guest): data,
// zero clusters, record splitting, several disks, and the backing never read.
#include <gtest/gtest.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "vmreplica/vm_launcher.h"

namespace vmreplica {
namespace {

struct TempDir {
  TempDir() {
    std::string t = (std::filesystem::temp_directory_path() / "vmr-ovl-XXXXXX").string();
    if (::mkdtemp(t.data()) != nullptr) path = t;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string path;
};

int Sh(const std::string& cmd) {
  int st = std::system(("(" + cmd + ") >/dev/null 2>&1").c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

std::vector<DeltaRecord> Drain(DeltaSource& src) {
  std::vector<DeltaRecord> out;
  for (;;) {
    auto r = src.Next();
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    if (!r.ok() || !r->has_value()) return out;
    out.push_back(std::move(**r));
  }
}

class OverlayDeltaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(Sh("command -v qemu-img && command -v qemu-io"), 0) << "qemu-img and qemu-io are required";
    ASSERT_FALSE(dir_.path.empty());
  }
  // A raw base full of 0xEE and a qcow2 overlay on it.
  std::string MakeOverlay(const std::string& name, const std::string& size) {
    const std::string base = dir_.path + "/" + name + ".raw";
    const std::string ov = dir_.path + "/" + name + ".qcow2";
    EXPECT_EQ(Sh("qemu-img create -q -f raw " + base + " " + size), 0);
    EXPECT_EQ(Sh("qemu-io -f raw " + base + " -c 'write -P 0xee 0 " + size + "'"), 0);
    EXPECT_EQ(Sh("qemu-img create -q -f qcow2 -F raw -b " + base + " " + ov + " " + size), 0);
    return ov;
  }
  TempDir dir_;
};

TEST_F(OverlayDeltaTest, YieldsExactlyTheOverlaysExtentsDiskByDisk) {
  const std::string a = MakeOverlay("a", "4M");
  const std::string b = MakeOverlay("b", "2M");
  ASSERT_EQ(Sh("qemu-io -f qcow2 " + a +
               " -c 'write -P 0x11 64k 192k' -c 'write -z 1M 128k' -c "
               "'write -P 0x22 3M 64k'"),
            0);
  ASSERT_EQ(Sh("qemu-io -f qcow2 " + b + " -c 'write -P 0x33 0 64k'"), 0);
  // The backing goes away: the overlay alone must be enough.
  std::filesystem::remove(dir_.path + "/a.raw");
  std::filesystem::remove(dir_.path + "/b.raw");

  OverlayDeltaOptions o;
  o.max_record_bytes = 64 << 10;
  auto src = OverlayDeltaSource::Open({a, b}, o);
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  auto recs = Drain(**src);
  // disk 0: 3 x 64 KiB of 0x11 (split at 64 KiB), 128 KiB zeros, 64 KiB 0x22;
  // disk 1: 64 KiB of 0x33.
  struct Want {
    uint32_t disk;
    uint64_t offset, length;
    bool zero;
    char fill;
  };
  const std::vector<Want> want = {{0, 64 << 10, 64 << 10, false, 0x11},  {0, 128 << 10, 64 << 10, false, 0x11},
                                  {0, 192 << 10, 64 << 10, false, 0x11}, {0, 1 << 20, 128 << 10, true, 0},
                                  {0, 3 << 20, 64 << 10, false, 0x22},   {1, 0, 64 << 10, false, 0x33}};
  ASSERT_EQ(recs.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(recs[i].disk, want[i].disk) << i;
    EXPECT_EQ(recs[i].offset, want[i].offset) << i;
    EXPECT_EQ(recs[i].length, want[i].length) << i;
    EXPECT_EQ(recs[i].zero, want[i].zero) << i;
    if (!want[i].zero) {
      EXPECT_TRUE(recs[i].data == std::string(want[i].length, want[i].fill)) << i;
    }
  }
  EXPECT_EQ((*src)->stats().data_bytes, 5u * (64 << 10));
  EXPECT_EQ((*src)->stats().zero_bytes, 128u << 10);
  EXPECT_EQ((*src)->stats().data_records, 5u);
  EXPECT_EQ((*src)->stats().zero_records, 1u);
}

TEST_F(OverlayDeltaTest, AnUntouchedOverlayYieldsNothing) {
  const std::string a = MakeOverlay("a", "1M");
  auto src = OverlayDeltaSource::Open({a});
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  EXPECT_TRUE(Drain(**src).empty());
}

TEST_F(OverlayDeltaTest, MissingOrNonQcow2OverlaysAndBadOptionsAreRefused) {
  EXPECT_EQ(OverlayDeltaSource::Open({dir_.path + "/none.qcow2"}).status().code(), Code::kNotFound);
  const std::string junk = dir_.path + "/junk.qcow2";
  std::ofstream(junk) << std::string(4096, 'j');
  EXPECT_FALSE(OverlayDeltaSource::Open({junk}).ok());
  OverlayDeltaOptions o;
  o.max_record_bytes = 100;
  EXPECT_EQ(OverlayDeltaSource::Open({}, o).status().code(), Code::kInvalidArgument);
}

}  // namespace
}  // namespace vmreplica
