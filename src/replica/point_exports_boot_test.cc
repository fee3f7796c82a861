// A real guest boots from an exported recovery point: the point holds an
// ext4 file system made on the host (mke2fs -d) with a known file; the
// guest (tests/guest, QEMU TCG) runs on a qcow2 overlay backed by the NBD
// export, mounts it, reads the file and writes into it; the store's point
// stays byte for byte what it was.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "guest/test_guest.h"
#include "vmreplica/point_exports.h"

namespace vmreplica {
namespace {

namespace fs = std::filesystem;
using std::chrono::seconds;
constexpr uint64_t kDisk = 32 << 20;

int Sh(const std::string& cmd, std::string* out = nullptr) {
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  int rc = ::pclose(p);
  if (out) *out = text;
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string RandomToken() {
  std::random_device rd;
  std::string s;
  for (int i = 0; i < 24; ++i) s += "abcdefghijklmnopqrstuvwxyz0123456789"[rd() % 36];
  return s;
}

TEST(PointExportsBootTest, GuestBootsOnAnOverlayOfAnExportedPointAndThePointStaysUnchanged) {
  Status artifacts = testing::CheckGuestArtifacts();
  ASSERT_TRUE(artifacts.ok()) << artifacts.ToString();
  for (const char* t : {"mke2fs", "qemu-img", "qemu-system-x86_64"})
    ASSERT_EQ(Sh(std::string("command -v ") + t), 0) << t << " is missing";

  char tmpl[] = "/tmp/vmr-pxb-XXXXXX";  // short: socket paths are limited
  const std::string dir = ::mkdtemp(tmpl);
  struct Cleanup {
    std::string dir;
    ~Cleanup() { fs::remove_all(dir); }
  } cleanup{dir};

  // The file system, made on the host.
  const std::string token = RandomToken();
  fs::create_directories(dir + "/root");
  std::ofstream(dir + "/root/hello.txt") << token << "\n";
  const std::string fs_img = dir + "/fs.img";
  std::string out;
  ASSERT_EQ(
      Sh("mke2fs -q -t ext4 -b 4096 -d " + dir + "/root " + fs_img + " " + std::to_string(kDisk >> 20) + "M", &out), 0)
      << out;
  const std::string image = ReadAll(fs_img);
  ASSERT_EQ(image.size(), kDisk);

  // A store whose point 1 is that image (point 2 changes it again, so
  // point 1 is an older point read through an undo segment).
  ReplicaStoreOptions o;
  o.fine_window_ms = 24LL * 3600 * 1000;
  o.now_ms = [] { return int64_t{1700000120000}; };  // both points in the fine window
  auto created = ReplicaStore::Create(dir + "/vm", "vm-1", {{"vda", kDisk}}, nullptr, o);
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  std::unique_ptr<ReplicaStore> store = std::move(*created);
  {
    std::vector<DeltaRecord> recs;
    const std::string zero(4096, '\0');
    for (uint64_t off = 0; off < kDisk; off += 4096) {
      if (image.compare(off, 4096, zero) != 0) recs.push_back(DataRecord(0, off, image.substr(off, 4096)));
    }
    VectorDeltaSource src(std::move(recs));
    ASSERT_TRUE(store->Apply(1, PointInfo{1700000000000, ReplicationType::kRegular, "g1"}, src).ok());
    VectorDeltaSource later({DataRecord(0, 0, std::string(1 << 20, 'x'))});  // wipes the superblock
    ASSERT_TRUE(store->Apply(2, PointInfo{1700000060000, ReplicationType::kRegular, "g2"}, later).ok());
  }

  NbdServerOptions so;
  so.socket_path = dir + "/nbd.sock";
  PointExports exports(so);
  ASSERT_TRUE(exports.Start().ok());
  auto name = exports.Export(store.get(), 1, "vda");
  ASSERT_TRUE(name.ok()) << name.status().ToString();
  const std::string overlay = dir + "/ov.qcow2";
  ASSERT_EQ(Sh("qemu-img create -q -f qcow2 -b '" + exports.Uri(*name) + "' -F raw " + overlay, &out), 0) << out;

  {
    testing::GuestOptions g;
    g.run_dir = dir;
    g.disks = {testing::GuestDisk{.path = overlay, .format = "qcow2"}};
    auto guest = testing::TestGuest::Launch(g);
    ASSERT_TRUE(guest.ok()) << guest.status().ToString();
    auto r = (*guest)->Run("mkdir -p /mnt/r && mount -t ext4 /dev/vda /mnt/r && cat /mnt/r/hello.txt");
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(r->first, 0) << r->second;
    EXPECT_NE(r->second.find(token), std::string::npos) << r->second;
    r = (*guest)->Run(
        "echo changed-in-guest > /mnt/r/hello.txt && dd if=/dev/urandom of=/mnt/r/new bs=64k count=16"
        " 2>/dev/null && sync && cat /mnt/r/hello.txt && umount /mnt/r");
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(r->first, 0) << r->second;
    EXPECT_NE(r->second.find("changed-in-guest"), std::string::npos) << r->second;
    Status s = (*guest)->Shutdown(seconds(60));
    EXPECT_TRUE(s.ok()) << s.ToString();
  }

  // The guest's writes are in the overlay ...
  const std::string ov_raw = dir + "/ov.raw";
  ASSERT_EQ(Sh("qemu-img convert -O raw " + overlay + " " + ov_raw, &out), 0) << out;
  EXPECT_FALSE(ReadAll(ov_raw) == image);
  // ... and not in the store: the point reads as before, directly and
  // through the export.
  std::string point(kDisk, '\0');
  ASSERT_TRUE(store->ReadPoint(1, 0, 0, kDisk, point.data()).ok());
  EXPECT_TRUE(point == image);
  const std::string exported = dir + "/exported.raw";
  ASSERT_EQ(Sh("qemu-img convert -f raw -O raw '" + exports.Uri(*name) + "' " + exported, &out), 0) << out;
  EXPECT_TRUE(ReadAll(exported) == image);
  exports.Stop();
}

}  // namespace
}  // namespace vmreplica
