#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "qemu/qemu_test_util.h"
#include "vmreplica/qmp.h"

namespace vmreplica {
namespace {

using namespace std::chrono_literals;
using testutil::TempDir;

// A QSD with two 64 MiB qcow2 disks, disk0 and disk1.
class QsdFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* d : {"disk0", "disk1"}) {
      auto r = testutil::Run("qemu-img create -q -f qcow2 " + dir_.path() + "/" + d + ".qcow2 64M");
      ASSERT_EQ(r.exit_code, 0) << r.output;
    }
    QsdOptions o;
    o.run_dir = dir_.path();
    o.disks = {{"disk0", dir_.path() + "/disk0.qcow2", "qcow2", true},
               {"disk1", dir_.path() + "/disk1.qcow2", "qcow2", false}};
    qsd_ = std::make_unique<QsdProcess>(o);
    ASSERT_TRUE(qsd_->Start().ok());
    auto c = QmpClient::Connect(qsd_->qmp_socket());
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    qmp_ = std::move(c).value();
  }
  void TearDown() override {
    qmp_.reset();
    if (qsd_) qsd_->Kill().IgnoreError();
  }

  TempDir dir_{"qmp"};
  std::unique_ptr<QsdProcess> qsd_;
  std::unique_ptr<QmpClient> qmp_;
};

TEST_F(QsdFixture, GreetingAndQueryVersion) {
  EXPECT_GE(qmp_->qemu_major(), 7);
  auto v = qmp_->Execute("query-version", nullptr, 5s);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(v->at("qemu").at("major").get<int>(), qmp_->qemu_major());
  EXPECT_EQ(qmp_->qemu_version().rfind(std::to_string(qmp_->qemu_major()) + ".", 0), 0u);
}

TEST_F(QsdFixture, UnknownCommandIsNotSupportedWithQemuClass) {
  auto r = qmp_->Execute("no-such-command", nullptr, 5s);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotSupported);
  EXPECT_NE(r.status().message().find("CommandNotFound"), std::string::npos) << r.status().message();
  // The session stays usable after an error reply.
  EXPECT_TRUE(qmp_->Execute("query-version", nullptr, 5s).ok());
}

TEST_F(QsdFixture, BadArgumentsGiveQemuDescription) {
  auto r = qmp_->Execute("block-dirty-bitmap-add", {{"node", "disk0"}}, 5s);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("GenericError"), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find("name"), std::string::npos) << r.status().message();
}

TEST_F(QsdFixture, MissingNodeIsAnError) {
  auto r = qmp_->Execute("block-dirty-bitmap-add", {{"node", "nonode"}, {"name", "b"}}, 5s);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("nonode"), std::string::npos) << r.status().message();
}

TEST_F(QsdFixture, BackupJobEventsArriveInQueueAndCallback) {
  std::atomic<int> seen{0};
  qmp_->SetEventCallback([&](const QmpEvent& e) {
    if (e.name == "JOB_STATUS_CHANGE") seen++;
  });
  auto r = qmp_->Execute("blockdev-backup",
                         {{"device", "disk0"}, {"target", "disk1"}, {"sync", "full"}, {"job-id", "j0"}}, 5s);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  auto created = qmp_->WaitForEvent(
      [](const QmpEvent& e) {
        return e.name == "JOB_STATUS_CHANGE" && e.data.value("id", "") == "j0" &&
               e.data.value("status", "") == "created";
      },
      5s);
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  EXPECT_GT(created->timestamp_us, 0);
  auto done = qmp_->WaitForEvent([](const QmpEvent& e) { return e.name == "BLOCK_JOB_COMPLETED"; }, 10s);
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  EXPECT_EQ(done->data.value("device", ""), "j0");
  EXPECT_GE(seen.load(), 2);
  qmp_->SetEventCallback(nullptr);
}

TEST_F(QsdFixture, WaitForEventTimesOut) {
  auto r = qmp_->WaitForEvent([](const QmpEvent& e) { return e.name == "NEVER"; }, 50ms);
  EXPECT_EQ(r.status().code(), Code::kTimeout);
}

TEST_F(QsdFixture, KilledDaemonMakesNextExecuteUnavailable) {
  ASSERT_TRUE(qsd_->Kill().ok());
  auto r = qmp_->Execute("query-version", nullptr, 5s);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kUnavailable) << r.status().ToString();
  EXPECT_EQ(qmp_->status().code(), Code::kUnavailable);
}

TEST_F(QsdFixture, ConcurrentExecutesGetTheirOwnReplies) {
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 25; ++i) {
        auto r = qmp_->Execute("query-version", nullptr, 5s);
        if (r.ok() && r->contains("qemu")) ok++;
        auto e = qmp_->Execute("no-such-command", nullptr, 5s);
        if (!e.ok() && e.status().code() == Code::kNotSupported) ok++;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 200);
}

TEST(QsdProcessTest, BadImageFailsStartWithLog) {
  TempDir dir("qsdbad");
  QsdOptions o;
  o.run_dir = dir.path();
  o.disks = {{"disk0", dir.path() + "/missing.qcow2", "qcow2", false}};
  QsdProcess qsd(o);
  Status s = qsd.Start();
  EXPECT_EQ(s.code(), Code::kIOError) << s.ToString();
  EXPECT_NE(s.message().find("missing.qcow2"), std::string::npos) << s.message();
  EXPECT_FALSE(qsd.running());
}

TEST(QsdProcessTest, RejectsBadDiskName) {
  TempDir dir("qsdname");
  QsdOptions o;
  o.run_dir = dir.path();
  o.disks = {{"a,b", "/dev/null", "raw", false}};
  QsdProcess qsd(o);
  EXPECT_EQ(qsd.Start().code(), Code::kInvalidArgument);
}

// ---------------------------------------------------------------------------
// TEST DOUBLE, for faults real QEMU never produces: a hand-written socket
// server that sends a valid greeting and then malformed bytes. Everything a
// real QEMU does is tested against qemu-storage-daemon above.
class FakeQmpServer {
 public:
  // `after_caps` is sent once the client's second message (the first command
  // after qmp_capabilities) arrives.
  FakeQmpServer(const std::string& path, std::string after_caps) : path_(path) {
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof(a.sun_path) - 1);
    ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    ::listen(listen_fd_, 1);
    thread_ = std::thread([this, after_caps = std::move(after_caps)] {
      int fd = ::accept(listen_fd_, nullptr, nullptr);
      if (fd < 0) return;
      Send(
          fd,
          R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}})"
          "\r\n");
      std::string got;
      char buf[4096];
      int lines = 0;
      while (lines < 2) {
        ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
        if (n <= 0) break;
        for (ssize_t i = 0; i < n; ++i) {
          if (buf[i] == '\n') {
            ++lines;
            if (lines == 1) Send(fd, "{\"return\": {}, \"id\": 1}\r\n");
          }
        }
      }
      Send(fd, after_caps);
      // Hold the connection until the client goes away.
      while (::recv(fd, buf, sizeof(buf), 0) > 0) {
      }
      ::close(fd);
    });
  }
  ~FakeQmpServer() {
    ::shutdown(listen_fd_, SHUT_RDWR);
    thread_.join();
    ::close(listen_fd_);
    ::unlink(path_.c_str());
  }

 private:
  static void Send(int fd, const std::string& s) {
    size_t off = 0;
    while (off < s.size()) {
      ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return;
      off += static_cast<size_t>(n);
    }
  }
  std::string path_;
  int listen_fd_ = -1;
  std::thread thread_;
};

TEST(QmpFaultTest, GarbageJsonIsCorruptionAndDisconnects) {
  TempDir dir("qmpfake");
  FakeQmpServer server(dir.path() + "/q.sock", "{\"return\": {}, \"id\": 2 garbage\r\n");
  auto c = QmpClient::Connect(dir.path() + "/q.sock");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto r = (*c)->Execute("query-version", nullptr, 5s);
  EXPECT_EQ(r.status().code(), Code::kCorruption) << r.status().ToString();
  EXPECT_EQ((*c)->Execute("query-version", nullptr, 5s).status().code(), Code::kCorruption);
}

TEST(QmpFaultTest, OversizedLineIsCorruption) {
  TempDir dir("qmpbig");
  FakeQmpServer server(dir.path() + "/q.sock", "{\"return\": \"" + std::string(64 * 1024, 'x'));
  QmpClientOptions o;
  o.max_message_bytes = 8192;
  auto c = QmpClient::Connect(dir.path() + "/q.sock", o);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto r = (*c)->Execute("query-version", nullptr, 5s);
  EXPECT_EQ(r.status().code(), Code::kCorruption) << r.status().ToString();
  EXPECT_NE(r.status().message().find("longer than"), std::string::npos);
}

TEST(QmpFaultTest, OversizedCompleteLineIsCorruption) {
  TempDir dir("qmpbig2");
  FakeQmpServer server(dir.path() + "/q.sock",
                       "{\"return\": \"" + std::string(10000, 'x') + "\", \"id\": 2}\r\n");
  QmpClientOptions o;
  o.max_message_bytes = 8192;
  auto c = QmpClient::Connect(dir.path() + "/q.sock", o);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ((*c)->Execute("query-version", nullptr, 5s).status().code(), Code::kCorruption);
}

TEST(QmpFaultTest, NonObjectMessageIsCorruption) {
  TempDir dir("qmparr");
  FakeQmpServer server(dir.path() + "/q.sock", "[1, 2, 3]\r\n");
  auto c = QmpClient::Connect(dir.path() + "/q.sock");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ((*c)->Execute("query-version", nullptr, 5s).status().code(), Code::kCorruption);
}

TEST(QmpFaultTest, SilentPeerIsTimeoutAndLateRepliesAreDropped) {
  TempDir dir("qmpmute");
  // The double never answers the command (a hung QEMU); a reply to an id
  // nobody waits for any more is ignored.
  FakeQmpServer server(dir.path() + "/q.sock", "{\"return\": {}, \"id\": 99}\r\n");
  auto c = QmpClient::Connect(dir.path() + "/q.sock");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto r = (*c)->Execute("query-version", nullptr, 100ms);
  EXPECT_EQ(r.status().code(), Code::kTimeout) << r.status().ToString();
  EXPECT_TRUE((*c)->status().ok());
}

TEST_F(QsdFixture, WaitForEventEndsWhenTheDaemonDies) {
  std::thread killer([this] {
    std::this_thread::sleep_for(100ms);
    qsd_->Kill().IgnoreError();
  });
  auto r = qmp_->WaitForEvent([](const QmpEvent& e) { return e.name == "NEVER"; }, 10s);
  killer.join();
  EXPECT_EQ(r.status().code(), Code::kUnavailable) << r.status().ToString();
}

TEST(QmpFaultTest, MalformedGreetingIsCorruption) {
  TempDir dir("qmpgreet");
  std::string path = dir.path() + "/q.sock";
  int lfd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof(a.sun_path) - 1);
  ASSERT_EQ(::bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ::listen(lfd, 1);
  std::thread t([lfd] {
    int fd = ::accept(lfd, nullptr, nullptr);
    const char g[] = "{\"QMP\": {\"nothing\": 1}}\n";
    (void)!::send(fd, g, sizeof(g) - 1, MSG_NOSIGNAL);
    char buf[16];
    while (::recv(fd, buf, sizeof(buf), 0) > 0) {
    }
    ::close(fd);
  });
  auto c = QmpClient::Connect(path);
  EXPECT_EQ(c.status().code(), Code::kCorruption);
  c = Status::Cancelled("drop");  // closes the socket so the server thread ends
  t.join();
  ::close(lfd);
}

TEST(QmpFaultTest, NobodyListeningIsUnavailable) {
  TempDir dir("qmpnone");
  auto c = QmpClient::Connect(dir.path() + "/none.sock");
  EXPECT_EQ(c.status().code(), Code::kUnavailable);
}

}  // namespace
}  // namespace vmreplica
