// GuestAgentClient against plain unix sockets: what it does when nobody
// listens, nobody answers, or the peer hangs up. The exchange with a real
// qemu-ga runs in tests/guest/test_guest_test.cc.
#include "vmreplica/guest_agent.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "qemu/qemu_test_util.h"

namespace vmreplica {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

// A listening unix socket; accepted connections are handed to `on_accept`.
class Listener {
 public:
  explicit Listener(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    ok_ = fd_ >= 0 && ::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 && ::listen(fd_, 4) == 0;
  }
  ~Listener() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool ok() const { return ok_; }
  int Accept() { return ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC); }

 private:
  int fd_ = -1;
  bool ok_ = false;
};

TEST(GuestAgentClientTest, MissingSocketIsUnavailable) {
  testutil::TempDir dir("qga");
  auto client = GuestAgentClient::Connect(dir.path() + "/none.sock", milliseconds(100));
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), Code::kUnavailable) << client.status().ToString();
}

TEST(GuestAgentClientTest, SilentAgentIsUnavailableWithinTheTimeout) {
  testutil::TempDir dir("qga");
  Listener listener(dir.path() + "/qga.sock");
  ASSERT_TRUE(listener.ok());
  auto client = GuestAgentClient::Connect(dir.path() + "/qga.sock", milliseconds(1000));
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  int peer = listener.Accept();  // accepted, never answers
  ASSERT_GE(peer, 0);
  auto start = Clock::now();
  Status s = (*client)->Ping(milliseconds(300));
  auto took = Clock::now() - start;
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.ToString();
  EXPECT_GE(took, milliseconds(250));
  EXPECT_LT(took, milliseconds(5000));
  auto frozen = (*client)->FreezeFileSystems(milliseconds(200));
  EXPECT_EQ(frozen.status().code(), Code::kUnavailable) << frozen.status().ToString();
  ::close(peer);
}

TEST(GuestAgentClientTest, StaleBytesWithoutDelimiterNeverCountAsAnAnswer) {
  testutil::TempDir dir("qga");
  Listener listener(dir.path() + "/qga.sock");
  ASSERT_TRUE(listener.ok());
  auto client = GuestAgentClient::Connect(dir.path() + "/qga.sock", milliseconds(1000));
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  int peer = listener.Accept();
  ASSERT_GE(peer, 0);
  // Replies that look like answers but are not preceded by the sync
  // delimiter are leftovers of an earlier session.
  std::string stale = "{\"return\": {}}\n{\"return\": 1}\n";
  ASSERT_EQ(::write(peer, stale.data(), stale.size()), static_cast<ssize_t>(stale.size()));
  Status s = (*client)->Ping(milliseconds(300));
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.ToString();
  ::close(peer);
}

TEST(GuestAgentClientTest, PeerHangingUpIsUnavailable) {
  testutil::TempDir dir("qga");
  Listener listener(dir.path() + "/qga.sock");
  ASSERT_TRUE(listener.ok());
  auto client = GuestAgentClient::Connect(dir.path() + "/qga.sock", milliseconds(1000));
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  int peer = listener.Accept();
  ASSERT_GE(peer, 0);
  ::close(peer);
  auto start = Clock::now();
  auto status = (*client)->FreezeStatus(milliseconds(5000));
  EXPECT_EQ(status.status().code(), Code::kUnavailable) << status.status().ToString();
  EXPECT_LT(Clock::now() - start, milliseconds(4000)) << "a closed socket must not wait for the timeout";
}

}  // namespace
}  // namespace vmreplica
