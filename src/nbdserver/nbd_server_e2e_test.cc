// End-to-end tests with real NBD clients written elsewhere: nbdinfo,
// qemu-img, nbdcopy and a QEMU guest booting from an export.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "nbdserver/memory_export_source.h"
#include "nbdserver/nbd_test_util.h"
#include "vmreplica/nbd_server.h"

namespace vmreplica {
namespace {

using nbd::testing::MakeSparseFile;
using nbd::testing::TempDir;

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

// Runs a shell command (with a time limit) and captures its output.
RunResult RunCommand(const std::string& command, int timeout_s = 60) {
  RunResult r;
  std::string cmd = "timeout " + std::to_string(timeout_s) + " " + command + " 2>&1";
  FILE* f = ::popen(cmd.c_str(), "r");
  if (f == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) r.output.append(buf, n);
  int status = ::pclose(f);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

constexpr uint64_t kDiskSize = 16 << 20;

class NbdE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Random data regions with holes between them, some unaligned ends.
    regions_ = {{0, 4096},          {65536, 131072},     {(2 << 20) + 8192, 4096},
                {6 << 20, 1 << 20}, {(12 << 20), 40960}, {kDiskSize - 8192, 8192}};
    content_ = MakeSparseFile(dir_.Join("disk.img"), kDiskSize, regions_, 42);
    ASSERT_EQ(content_.size(), kDiskSize);
    auto src = FileExportSource::Open(dir_.Join("disk.img"));
    ASSERT_TRUE(src.ok()) << src.status().ToString();
    server_ = std::make_unique<NbdServer>(NbdServerOptions{socket_, 64});
    ASSERT_TRUE(server_->AddExport("disk", "replica disk", *src).ok());
    ASSERT_TRUE(server_->Start().ok());
  }
  std::string Uri(const std::string& name) const {
    return "'nbd+unix:///" + name + "?socket=" + socket_ + "'";
  }

  TempDir dir_;
  std::string socket_ = dir_.Join("nbd.sock");
  std::vector<std::pair<uint64_t, uint64_t>> regions_;
  std::string content_;
  std::unique_ptr<NbdServer> server_;
};

TEST_F(NbdE2eTest, NbdinfoListShowsEveryExport) {
  ASSERT_TRUE(server_
                  ->AddExport("point-2", "a recovery point",
                              std::make_shared<nbd::MemoryExportSource>(std::string(1 << 20, 'p')))
                  .ok());
  RunResult r = RunCommand("nbdinfo --list " + Uri(""));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("export=\"disk\""), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("replica disk"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("export=\"point-2\""), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("a recovery point"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("is_read_only: true"), std::string::npos) << r.output;
}

TEST_F(NbdE2eTest, NbdinfoSizeAndMapShowDataAndHoles) {
  RunResult size = RunCommand("nbdinfo --size " + Uri("disk"));
  ASSERT_EQ(size.exit_code, 0) << size.output;
  EXPECT_EQ(std::stoull(size.output), kDiskSize);

  RunResult r = RunCommand("nbdinfo --map " + Uri("disk"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // Lines: offset length type description ("data" / "hole,zero").
  std::istringstream in(r.output);
  std::string line;
  uint64_t pos = 0;
  uint64_t data_bytes = 0;
  int holes = 0;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    uint64_t off, len;
    int type;
    std::string desc;
    ASSERT_TRUE(ls >> off >> len >> type >> desc) << line;
    EXPECT_EQ(off, pos);
    if (type & 1) {
      ++holes;
      EXPECT_EQ(desc, "hole,zero");
      EXPECT_TRUE(content_.compare(off, len, std::string(len, '\0')) == 0) << line;
    } else {
      EXPECT_EQ(desc, "data");
      data_bytes += len;
    }
    pos = off + len;
  }
  EXPECT_EQ(pos, kDiskSize);
  EXPECT_GE(holes, 5);
  uint64_t written = 0;
  for (auto [o, l] : regions_) written += l;
  EXPECT_GE(data_bytes, written);
  EXPECT_LT(data_bytes, kDiskSize / 2);
}

TEST_F(NbdE2eTest, QemuImgConvertIsByteIdentical) {
  std::string out = dir_.Join("qemu-img.out");
  RunResult r = RunCommand("qemu-img convert -f raw -O raw " + Uri("disk") + " " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(ReadWholeFile(out) == content_);
}

TEST_F(NbdE2eTest, NbdcopyIsByteIdentical) {
  std::string out = dir_.Join("nbdcopy.out");
  RunResult r = RunCommand("nbdcopy " + Uri("disk") + " " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(ReadWholeFile(out) == content_);
}

TEST_F(NbdE2eTest, QemuImgOverlayReadsThroughTheExport) {
  std::string ov = dir_.Join("overlay.qcow2");
  RunResult r = RunCommand("qemu-img create -f qcow2 -b " + Uri("disk") + " -F raw " + ov);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // Writes land in the overlay; the export stays read-only and unchanged.
  r = RunCommand("qemu-io -f qcow2 -c 'write -P 0x5a 0 64k' " + ov);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::string out = dir_.Join("flat.out");
  r = RunCommand("qemu-img convert -f qcow2 -O raw " + ov + " " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::string flat = ReadWholeFile(out);
  ASSERT_EQ(flat.size(), kDiskSize);
  EXPECT_EQ(flat.substr(0, 65536), std::string(65536, 'Z'));
  EXPECT_TRUE(flat.compare(65536, std::string::npos, content_, 65536) == 0);
}

// Real-mode boot sector: DS=0, print the marker on COM1 (0x3F8), then leave
// QEMU through isa-debug-exit (port 0xF4, exit code (0x10 << 1) | 1 = 33).
std::string BootImage(const std::string& marker) {
  const unsigned char code[] = {
      0xFA,              // 00 cli
      0x31, 0xC0,        // 01 xor ax, ax
      0x8E, 0xD8,        // 03 mov ds, ax
      0xBA, 0xF8, 0x03,  // 05 mov dx, 0x3f8
      0xBE, 0x1B, 0x7C,  // 08 mov si, 0x7c1b (message)
      0xFC,              // 0b cld
      0xAC,              // 0c lodsb
      0x84, 0xC0,        // 0d test al, al
      0x74, 0x03,        // 0f jz 0x14
      0xEE,              // 11 out dx, al
      0xEB, 0xF8,        // 12 jmp 0x0c
      0xB0, 0x10,        // 14 mov al, 0x10
      0xE6, 0xF4,        // 16 out 0xf4, al
      0xF4,              // 18 hlt
      0xEB, 0xFD,        // 19 jmp 0x18
  };                     // 1b message
  std::string img(1 << 20, '\0');
  std::memcpy(img.data(), code, sizeof(code));
  std::string msg = marker + "\r\n";
  std::memcpy(img.data() + sizeof(code), msg.data(), msg.size());
  img[510] = static_cast<char>(0x55);
  img[511] = static_cast<char>(0xAA);
  return img;
}

TEST_F(NbdE2eTest, QemuGuestBootsFromExport) {
  const std::string kMarker = "VMREPLICA-NBD-BOOT-OK";
  ASSERT_TRUE(
      server_->AddExport("boot", "", std::make_shared<nbd::MemoryExportSource>(BootImage(kMarker)))
          .ok());
  RunResult r = RunCommand(
      "qemu-system-x86_64 -accel tcg -nographic -nodefaults -serial stdio -no-reboot "
      "-device isa-debug-exit,iobase=0xf4,iosize=0x04 "
      "-drive file=nbd+unix:///boot?socket=" +
          socket_ + ",format=raw,readonly=on,if=virtio </dev/null",
      90);
  EXPECT_NE(r.output.find(kMarker), std::string::npos) << r.output;
  EXPECT_EQ(r.exit_code, 33) << r.output;
}

}  // namespace
}  // namespace vmreplica
