// PointExports with the real NBD server and real clients (nbdinfo, qemu-img,
// nbdcopy): every disk of every exported point reads back as the image the
// test computed itself, and an exported point is pinned against retention.
#include "vmreplica/point_exports.h"

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>

namespace vmreplica {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kDiskA = 4 << 20;
constexpr uint64_t kDiskB = 1 << 20;

std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Runs `cmd` through the shell; answers its exit code and its stdout.
int Sh(const std::string& cmd, std::string* out = nullptr) {
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return -1;
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  int rc = ::pclose(p);
  if (out) *out = text;
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

void RequireTool(const std::string& tool) {
  ASSERT_EQ(Sh("command -v " + tool + " >/dev/null 2>&1"), 0)
      << tool << " is missing: install it (see scripts/debian-packages.txt)";
}

using Image = std::vector<std::string>;  // one per disk

class PointExportsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* t : {"nbdinfo", "nbdcopy", "qemu-img"}) ASSERT_NO_FATAL_FAILURE(RequireTool(t));
    char tmpl[] = "/tmp/vmr-pxs-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    ReplicaStoreOptions o;
    // No history: retention keeps only the latest point, unless pinned.
    o.fine_window_ms = 0;
    o.now_ms = [this] { return clock_ms_; };
    auto s = ReplicaStore::Create(dir_ + "/vm", "vm-1", {{"vda", kDiskA}, {"vdb", kDiskB}}, nullptr, o);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    store_ = std::move(*s);
    expected_[0] = Image{std::string(kDiskA, '\0'), std::string(kDiskB, '\0')};
    NbdServerOptions so;
    so.socket_path = dir_ + "/nbd.sock";
    exports_ = std::make_unique<PointExports>(so);
    ASSERT_TRUE(exports_->Start().ok());
  }
  void TearDown() override {
    exports_.reset();
    store_.reset();
    fs::remove_all(dir_);
  }

  // Applies a random delta (data and zero records on both disks) as the
  // next point and records the expected image.
  void ApplyRandomDelta(uint64_t seed) {
    std::mt19937_64 rng(seed);
    const uint64_t seq = store_->latest_sequence() + 1;
    Image img = expected_[seq - 1];
    std::vector<DeltaRecord> recs;
    for (int i = 0; i < 16; ++i) {
      DeltaRecord r;
      r.disk = static_cast<uint32_t>(i % 2);
      const uint64_t size = r.disk == 0 ? kDiskA : kDiskB;
      r.offset = (rng() % (size / 512 - 64)) * 512;  // not block-aligned on purpose
      r.length = 512 + rng() % 20000;
      r.zero = (i % 5 == 4);
      if (!r.zero) {
        r.data.resize(r.length);
        for (auto& c : r.data) c = static_cast<char>(rng() | 1);
      }
      std::memcpy(img[r.disk].data() + r.offset, r.zero ? std::string(r.length, '\0').data() : r.data.data(), r.length);
      recs.push_back(std::move(r));
    }
    VectorDeltaSource src(std::move(recs));
    clock_ms_ += 60000;
    Status st = store_->Apply(seq, PointInfo{clock_ms_, ReplicationType::kRegular, "g"}, src);
    ASSERT_TRUE(st.ok()) << st.ToString();
    expected_[seq] = img;
  }

  bool Retained(uint64_t seq) {
    for (const ReplicaPoint& p : store_->ListPoints())
      if (p.sequence == seq) return true;
    return false;
  }

  std::string dir_;
  int64_t clock_ms_ = 1700000000000;
  std::unique_ptr<ReplicaStore> store_;
  std::unique_ptr<PointExports> exports_;
  std::map<uint64_t, Image> expected_;
};

TEST_F(PointExportsTest, EveryDiskOfAnExportedPointReadsAsTheExpectedImage) {
  ApplyRandomDelta(1);
  auto names = exports_->ExportPoint(store_.get(), 1);
  ASSERT_TRUE(names.ok()) << names.status().ToString();
  EXPECT_EQ(*names, (std::vector<std::string>{"vm-1/vda@1", "vm-1/vdb@1"}));
  ApplyRandomDelta(2);
  ApplyRandomDelta(3);
  ASSERT_TRUE(Retained(1)) << "the exported point must be pinned";
  EXPECT_FALSE(Retained(2));  // not exported: pruned as usual
  ASSERT_TRUE(exports_->Export(store_.get(), 3, "vda").ok());

  std::string list;
  ASSERT_EQ(Sh("nbdinfo --list '" + exports_->Uri("vm-1/vda@1") + "'", &list), 0);
  for (const char* n : {"vm-1/vda@1", "vm-1/vdb@1", "vm-1/vda@3"})
    EXPECT_NE(list.find(std::string("export=\"") + n + "\""), std::string::npos) << n << " missing in:\n" << list;

  for (const auto& [name, seq, disk] :
       {std::tuple<std::string, uint64_t, int>{"vm-1/vda@1", 1, 0}, {"vm-1/vdb@1", 1, 1}, {"vm-1/vda@3", 3, 0}}) {
    SCOPED_TRACE(name);
    const std::string& want = expected_[seq][static_cast<size_t>(disk)];
    const std::string conv = dir_ + "/conv.img", copy = dir_ + "/copy.img";
    fs::remove(conv);
    fs::remove(copy);
    ASSERT_EQ(Sh("qemu-img convert -f raw -O raw '" + exports_->Uri(name) + "' " + conv), 0);
    EXPECT_TRUE(ReadAll(conv) == want);
    ASSERT_EQ(Sh("nbdcopy '" + exports_->Uri(name) + "' " + copy), 0);
    EXPECT_TRUE(ReadAll(copy) == want);

    // base:allocation map: extents cover the disk in order; a range said to
    // read as zeros does, and every non-zero byte lies in a data extent.
    std::string map;
    ASSERT_EQ(Sh("nbdinfo --map '" + exports_->Uri(name) + "'", &map), 0);
    std::istringstream in(map);
    uint64_t off = 0, len = 0, expect_off = 0;
    unsigned type = 0;
    std::string line;
    int zero_extents = 0;
    while (std::getline(in, line)) {
      ASSERT_EQ(std::sscanf(line.c_str(), "%lu %lu %u", &off, &len, &type), 3) << line;
      ASSERT_EQ(off, expect_off) << line;
      if (type & 2) {
        ++zero_extents;
        EXPECT_EQ(want.compare(off, len, std::string(len, '\0')), 0) << "zero extent with data: " << line;
      }
      expect_off = off + len;
    }
    EXPECT_EQ(expect_off, want.size());
    EXPECT_GT(zero_extents, 0);  // the disks are mostly never written
  }
}

TEST_F(PointExportsTest, PinnedPointIsPrunedOnlyAfterItIsUnexported) {
  ApplyRandomDelta(1);
  ASSERT_TRUE(exports_->Export(store_.get(), 1, "vdb").ok());
  ApplyRandomDelta(2);
  ApplyRandomDelta(3);
  ASSERT_TRUE(Retained(1));
  EXPECT_EQ(store_->ListPoints().size(), 2u);  // 1 (pinned) and 3 (latest)

  ASSERT_TRUE(exports_->Unexport("vm-1/vdb@1").ok());
  EXPECT_EQ(exports_->Unexport("vm-1/vdb@1").code(), Code::kNotFound);
  EXPECT_TRUE(exports_->ListExports().empty());
  EXPECT_NE(Sh("nbdinfo '" + exports_->Uri("vm-1/vdb@1") + "' >/dev/null 2>&1"), 0);
  ASSERT_TRUE(store_->ApplyRetention().ok());
  EXPECT_FALSE(Retained(1));
  EXPECT_EQ(store_->UnpinPoint(1).code(), Code::kNotFound);  // no pin leaked
}

TEST_F(PointExportsTest, BadRequestsAreRefusedWithoutLeakingAPin) {
  ApplyRandomDelta(1);
  EXPECT_EQ(exports_->Export(store_.get(), 9, "vda").status().code(), Code::kNotFound);
  EXPECT_EQ(exports_->Export(store_.get(), 1, "sdz").status().code(), Code::kNotFound);
  EXPECT_EQ(exports_->Export(nullptr, 1, "vda").status().code(), Code::kInvalidArgument);
  ASSERT_TRUE(exports_->Export(store_.get(), 1, "vda").ok());
  EXPECT_EQ(exports_->Export(store_.get(), 1, "vda").status().code(), Code::kAlreadyExists);
  // ExportPoint is all or nothing: vda@1 is taken, so vdb@1 is not added.
  EXPECT_EQ(exports_->ExportPoint(store_.get(), 1).status().code(), Code::kAlreadyExists);
  EXPECT_EQ(exports_->ListExports(), std::vector<std::string>{"vm-1/vda@1"});
  exports_->UnexportStore(store_.get());
  EXPECT_TRUE(exports_->ListExports().empty());
  EXPECT_EQ(store_->UnpinPoint(1).code(), Code::kNotFound);
}

}  // namespace
}  // namespace vmreplica
