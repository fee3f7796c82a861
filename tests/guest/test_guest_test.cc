// Boots the real test guest under QEMU (TCG): the serial command loop, disk
// writes that reach the host's image files, and the guest agent freezing a
// mounted file system. Needs the artifacts of scripts/build-test-guest.sh;
// without them every test fails with a message naming the script.
#include "guest/test_guest.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "qemu/qemu_test_util.h"
#include "vmreplica/guest_agent.h"
#include "vmreplica/qmp.h"

namespace vmreplica::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using testutil::TempDir;

std::string RandomHex(size_t n) {
  static const char kHex[] = "0123456789abcdef";
  std::random_device rd;
  std::string s;
  for (size_t i = 0; i < n; ++i) s += kHex[rd() % 16];
  return s;
}

std::string ReadFileBytes(const std::string& path, size_t offset, size_t length) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::string out(length, '\0');
  in.read(out.data(), static_cast<std::streamsize>(length));
  out.resize(static_cast<size_t>(in.gcount()));
  return out;
}

void MakeImage(const std::string& path) {
  auto r = testutil::Run("qemu-img create -f qcow2 '" + path + "' 64M");
  ASSERT_EQ(r.exit_code, 0) << r.output;
}

class TestGuestTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Status s = CheckGuestArtifacts();
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
};

TEST(TestGuestArtifactsTest, MissingArtifactsNameTheBuildScript) {
  TempDir empty("guest-none");
  ASSERT_EQ(::setenv("VMREPLICA_GUEST_DIR", empty.path().c_str(), 1), 0);
  EXPECT_EQ(GuestArtifactsDir(), empty.path());
  Status s = CheckGuestArtifacts();
  EXPECT_EQ(s.code(), Code::kFailedPrecondition);
  EXPECT_NE(s.message().find("vmlinuz"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("scripts/build-test-guest.sh"), std::string::npos) << s.message();
  GuestOptions options;
  options.run_dir = empty.path();
  auto guest = TestGuest::Launch(options);
  EXPECT_EQ(guest.status().code(), Code::kFailedPrecondition) << guest.status().ToString();
  ::unsetenv("VMREPLICA_GUEST_DIR");
}

TEST_F(TestGuestTest, QemuFailingToStartIsReportedWithItsLog) {
  TempDir dir("guest");
  GuestOptions options;
  options.run_dir = dir.path();
  options.extra_args = {"-no-such-option"};
  auto guest = TestGuest::Launch(options);
  ASSERT_FALSE(guest.ok());
  EXPECT_NE(guest.status().message().find("no-such-option"), std::string::npos) << guest.status().ToString();
}

TEST_F(TestGuestTest, CommandLoopAndWritesReachBothDisks) {
  TempDir dir("guest");
  const std::string d0 = dir.path() + "/d0.qcow2";
  const std::string d1 = dir.path() + "/d1.qcow2";
  MakeImage(d0);
  MakeImage(d1);
  GuestOptions options;
  options.run_dir = dir.path();
  // Disk 1 goes through the blockdev_json path (its node name filled in).
  options.disks = {
      GuestDisk{.path = d0},
      GuestDisk{.node_name = "second",
                .blockdev_json = R"({"driver":"qcow2","file":{"driver":"file","filename":")" + d1 + R"("}})"}};
  auto launched = TestGuest::Launch(options);
  ASSERT_TRUE(launched.ok()) << launched.status().ToString();
  TestGuest& guest = **launched;
  EXPECT_GT(guest.pid(), 0);
  EXPECT_EQ(guest.qga_socket(), "");
  {
    auto qmp = QmpClient::Connect(guest.qmp_socket());
    ASSERT_TRUE(qmp.ok()) << qmp.status().ToString();
    auto nodes = (*qmp)->Execute("query-named-block-nodes");
    ASSERT_TRUE(nodes.ok()) << nodes.status().ToString();
    std::string names;
    for (const auto& n : *nodes) names += n.value("node-name", "") + " ";
    EXPECT_NE(names.find("disk0 "), std::string::npos) << names;
    EXPECT_NE(names.find("disk0-file "), std::string::npos) << names;
    EXPECT_NE(names.find("second "), std::string::npos) << names;
  }

  // Exit codes and output come back exactly (no echo, no CR, no extra newline).
  auto r = guest.Run("printf 'a b\\n\\nc'");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->first, 0);
  EXPECT_EQ(r->second, "a b\n\nc");
  r = guest.Run("echo out; echo err >&2; exit 7");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->first, 7);
  EXPECT_EQ(r->second, "out\nerr\n");
  r = guest.Run("true");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->second, "");
  EXPECT_EQ(guest.Run("echo a\nb").status().code(), Code::kInvalidArgument);
  // A command that outlives its timeout does not disturb the next one.
  auto slow = guest.Run("sleep 4; echo late", seconds(1));
  EXPECT_EQ(slow.status().code(), Code::kTimeout) << slow.status().ToString();
  r = guest.Run("echo next");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->second, "next\n");

  // The disks appear in order; a file system on vda, raw bytes on vdb.
  const std::string token = RandomHex(32);
  r = guest.Run("cat /sys/block/vda/size /sys/block/vdb/size");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->second, "131072\n131072\n");
  r = guest.Run("mke2fs /dev/vda >/dev/null && mkdir -p /mnt/a && mount -t ext4 /dev/vda /mnt/a && echo " + token +
                " > /mnt/a/token && sync && umount /mnt/a && mount -t ext4 -o ro /dev/vda /mnt/a && cat /mnt/a/token"
                " && umount /mnt/a");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->first, 0) << r->second;
  EXPECT_EQ(r->second, token + "\n");
  r = guest.Run("printf " + token +
                " | dd of=/dev/vdb bs=512 seek=2048 conv=fsync 2>/dev/null && "
                "dd if=/dev/vdb bs=512 skip=2048 count=1 2>/dev/null | head -c 32");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->first, 0) << r->second;
  EXPECT_EQ(r->second, token);

  Status s = guest.Shutdown(seconds(60));
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_FALSE(guest.running());

  // On the host: the raw bytes of vdb at 1 MiB, the file in vda's ext4.
  auto conv = testutil::Run("qemu-img convert -O raw '" + d1 + "' '" + dir.path() +
                            "/d1.raw' && "
                            "qemu-img convert -O raw '" +
                            d0 + "' '" + dir.path() + "/d0.raw'");
  ASSERT_EQ(conv.exit_code, 0) << conv.output;
  EXPECT_EQ(ReadFileBytes(dir.path() + "/d1.raw", 1 << 20, 32), token);
  auto cat = testutil::Run("debugfs -R 'cat /token' '" + dir.path() + "/d0.raw' 2>/dev/null");
  ASSERT_EQ(cat.exit_code, 0) << cat.output;
  EXPECT_NE(cat.output.find(token + "\n"), std::string::npos) << cat.output;
}

TEST_F(TestGuestTest, GuestAgentFreezesAMountedFileSystem) {
  TempDir dir("guest");
  const std::string d0 = dir.path() + "/d0.qcow2";
  MakeImage(d0);
  GuestOptions options;
  options.run_dir = dir.path();
  options.guest_agent = true;
  options.disks = {GuestDisk{.path = d0}};
  auto launched = TestGuest::Launch(options);
  ASSERT_TRUE(launched.ok()) << launched.status().ToString();
  TestGuest& guest = **launched;
  ASSERT_EQ(guest.qga_socket(), dir.path() + "/qga.sock");
  auto r =
      guest.Run("mke2fs /dev/vda >/dev/null && mkdir -p /mnt/a && mount -t ext4 /dev/vda /mnt/a && echo x > /mnt/a/f");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->first, 0) << r->second;

  auto client = GuestAgentClient::Connect(guest.qga_socket(), milliseconds(5000));
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  GuestAgentClient& qga = **client;
  // qemu-ga starts in the background during boot: poll until it answers.
  Status ping = Status::Unavailable("not tried");
  auto deadline = std::chrono::steady_clock::now() + seconds(60);
  while (!(ping = qga.Ping(milliseconds(2000))).ok() && std::chrono::steady_clock::now() < deadline) {
  }
  ASSERT_TRUE(ping.ok()) << ping.ToString();

  auto status = qga.FreezeStatus(seconds(10));
  ASSERT_TRUE(status.ok()) << status.status().ToString();
  EXPECT_EQ(*status, "thawed");
  auto frozen = qga.FreezeFileSystems(seconds(30));
  ASSERT_TRUE(frozen.ok()) << frozen.status().ToString();
  EXPECT_GE(*frozen, 1);
  status = qga.FreezeStatus(seconds(10));
  ASSERT_TRUE(status.ok()) << status.status().ToString();
  EXPECT_EQ(*status, "frozen");
  // A second freeze is refused by the agent; its error comes back as a Status.
  auto again = qga.FreezeFileSystems(seconds(10));
  EXPECT_FALSE(again.ok());
  EXPECT_NE(again.status().message().find("qga guest-fsfreeze-freeze"), std::string::npos) << again.status().ToString();
  auto thawed = qga.ThawFileSystems(seconds(30));
  ASSERT_TRUE(thawed.ok()) << thawed.status().ToString();
  EXPECT_EQ(*thawed, *frozen);
  status = qga.FreezeStatus(seconds(10));
  ASSERT_TRUE(status.ok()) << status.status().ToString();
  EXPECT_EQ(*status, "thawed");
  r = guest.Run("echo y >> /mnt/a/f && sync && cat /mnt/a/f && umount /mnt/a");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->second, "x\ny\n");
  EXPECT_TRUE(qga.Ping(seconds(10)).ok());
  Status s = guest.Shutdown(seconds(60));
  EXPECT_TRUE(s.ok()) << s.ToString();
}

}  // namespace
}  // namespace vmreplica::testing
