// Recovery points of a real ReplicaStore served by the real NBD server and
// read by clients written elsewhere (qemu-img, nbdcopy): every point reads
// back byte for byte as the image the test expects, also while a newer
// delta is being applied.
#include "vmreplica/point_export.h"

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
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

constexpr uint64_t kDisk = 4 << 20;

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

int Shell(const std::string& cmd) {
  int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

class PointExportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmr-px-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    ReplicaStoreOptions o;
    o.fine_window_ms = 24LL * 3600 * 1000;  // keep every point
    auto s = ReplicaStore::Create(dir_ + "/vm", "vm-1", {{"disk0", kDisk}}, nullptr, o);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    store_ = std::move(*s);
    expected_[0] = std::string(kDisk, '\0');
    NbdServerOptions so;
    so.socket_path = dir_ + "/nbd.sock";
    server_ = std::make_unique<NbdServer>(so);
    ASSERT_TRUE(server_->Start().ok());
  }
  void TearDown() override {
    server_->Stop();
    std::filesystem::remove_all(dir_);
  }

  // Applies a random delta as the next point and records the expected image.
  void ApplyRandomDelta(uint64_t seed) {
    std::mt19937_64 rng(seed);
    const uint64_t seq = store_->latest_sequence() + 1;
    std::string img = expected_[seq - 1];
    std::vector<DeltaRecord> recs;
    for (int i = 0; i < 12; ++i) {
      DeltaRecord r;
      r.offset = (rng() % (kDisk / 4096 - 16)) * 4096;
      r.length = (1 + rng() % 8) * 4096;
      r.zero = (i % 5 == 4);
      if (!r.zero) {
        r.data.resize(r.length);
        for (auto& c : r.data) c = static_cast<char>(rng());
      }
      std::memcpy(img.data() + r.offset, r.zero ? std::string(r.length, '\0').data() : r.data.data(), r.length);
      recs.push_back(std::move(r));
    }
    VectorDeltaSource src(std::move(recs));
    ASSERT_TRUE(store_->Apply(seq, PointInfo{NowMs() - 60000 + 1000 * static_cast<int64_t>(seq), ReplicationType::kRegular, "g"}, src).ok());
    expected_[seq] = img;
  }

  std::string Uri(const std::string& name) { return "nbd+unix:///" + name + "?socket=" + dir_ + "/nbd.sock"; }

  void Export(uint64_t seq) {
    auto src = PointExportSource::Create(store_.get(), seq, 0);
    ASSERT_TRUE(src.ok()) << src.status().ToString();
    ASSERT_TRUE(server_->AddExport("p" + std::to_string(seq), "point " + std::to_string(seq), *src).ok());
  }

  std::string dir_;
  std::unique_ptr<ReplicaStore> store_;
  std::unique_ptr<NbdServer> server_;
  std::map<uint64_t, std::string> expected_;
};

TEST_F(PointExportTest, QemuImgConvertOfEveryPointEqualsTheExpectedImage) {
  for (uint64_t s = 1; s <= 3; ++s) ApplyRandomDelta(s);
  for (uint64_t p = 0; p <= 3; ++p) {
    Export(p);
    std::string out = dir_ + "/p" + std::to_string(p) + ".img";
    ASSERT_EQ(Shell("qemu-img convert -f raw -O raw '" + Uri("p" + std::to_string(p)) + "' " + out), 0);
    EXPECT_TRUE(ReadAll(out) == expected_[p]) << "point " << p;
  }
}

TEST_F(PointExportTest, NbdcopyOfAnOldPointIsStableWhileANewerDeltaApplies) {
  ApplyRandomDelta(11);
  ApplyRandomDelta(12);
  Export(1);
  ApplyRandomDelta(13);  // the exported point 1 must not change
  std::string out = dir_ + "/copy.img";
  ASSERT_EQ(Shell("nbdcopy '" + Uri("p1") + "' " + out), 0);
  EXPECT_TRUE(ReadAll(out) == expected_[1]);
  // And the list shows it.
  EXPECT_EQ(Shell("nbdinfo --list '" + Uri("p1") + "' | grep -q 'export=\"p1\"'"), 0);
}

TEST_F(PointExportTest, UnknownPointOrDiskIsRefused) {
  EXPECT_EQ(PointExportSource::Create(store_.get(), 9, 0).status().code(), Code::kNotFound);
  EXPECT_EQ(PointExportSource::Create(store_.get(), 0, 3).status().code(), Code::kNotFound);
}

}  // namespace
}  // namespace vmreplica
