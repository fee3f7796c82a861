#include "vmreplica/nbd_server.h"

#include <gtest/gtest.h>
#include <libnbd.h>
#include <sys/stat.h>

#include <chrono>
#include <thread>

#include "nbdserver/memory_export_source.h"
#include "nbdserver/nbd_test_util.h"
#include "nbdserver/protocol.h"

namespace vmreplica {
namespace {

using namespace nbd;  // NOLINT: protocol constants
using nbd::testing::GoData;
using nbd::testing::MakeSparseFile;
using nbd::testing::MetaData;
using nbd::testing::Option;
using nbd::testing::RawClient;
using nbd::testing::Request;
using nbd::testing::TempDir;
using nbd::testing::U32;

constexpr uint64_t kDiskSize = 8 << 20;
const std::vector<std::pair<uint64_t, uint64_t>> kRegions = {
    {0, 65536}, {1 << 20, 12288}, {(5 << 20) + 4096, 200704}, {kDiskSize - 4096, 4096}};

bool WaitFor(const std::function<bool()>& cond, int ms = 5000) {
  for (int i = 0; i < ms / 10; ++i) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return cond();
}

class NbdServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    content_ = MakeSparseFile(dir_.Join("disk.img"), kDiskSize, kRegions);
    ASSERT_EQ(content_.size(), kDiskSize);
    auto src = FileExportSource::Open(dir_.Join("disk.img"));
    ASSERT_TRUE(src.ok()) << src.status().ToString();
    server_ = std::make_unique<NbdServer>(NbdServerOptions{socket_, 8});
    ASSERT_TRUE(server_->AddExport("disk", "a sparse disk", *src).ok());
    ASSERT_TRUE(server_->Start().ok());
  }

  // Full handshake with GO on `name` (no structured replies); true when in
  // transmission.
  bool Go(RawClient* c, const std::string& name = "disk") {
    if (c->Read(18).size() != 18) return false;
    if (!c->Send(U32(3) + Option(kOptGo, GoData(name)))) return false;
    while (true) {
      std::string h = c->Read(20);
      if (h.size() != 20) return false;
      uint32_t type = GetU32(h.data() + 12);
      c->Read(GetU32(h.data() + 16));
      if (type == kRepAck) return true;
      if (type != kRepInfo) return false;
    }
  }

  // A libnbd client reads the whole disk and checks it.
  void CheckLibnbdReadsDisk() {
    nbd_handle* h = nbd_create();
    ASSERT_NE(h, nullptr);
    ASSERT_EQ(nbd_set_export_name(h, "disk"), 0);
    ASSERT_EQ(nbd_connect_unix(h, socket_.c_str()), 0) << nbd_get_error();
    EXPECT_EQ(nbd_get_size(h), static_cast<int64_t>(kDiskSize));
    std::string buf(kDiskSize, '\0');
    ASSERT_EQ(nbd_pread(h, buf.data(), buf.size(), 0, 0), 0) << nbd_get_error();
    EXPECT_TRUE(buf == content_);
    nbd_shutdown(h, 0);
    nbd_close(h);
  }

  TempDir dir_;
  std::string socket_ = dir_.Join("nbd.sock");
  std::string content_;
  std::unique_ptr<NbdServer> server_;
};

TEST_F(NbdServerTest, SocketIsPrivate) {
  struct stat st;
  ASSERT_EQ(::lstat(socket_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(NbdServerTest, StartTwiceFails) {
  EXPECT_EQ(server_->Start().code(), Code::kFailedPrecondition);
}

TEST_F(NbdServerTest, AddExportRejectsDuplicatesAndBadNames) {
  auto src = std::make_shared<MemoryExportSource>("x");
  EXPECT_EQ(server_->AddExport("disk", "", src).code(), Code::kAlreadyExists);
  EXPECT_EQ(server_->AddExport("", "", src).code(), Code::kInvalidArgument);
  EXPECT_EQ(server_->AddExport(std::string(4097, 'a'), "", src).code(), Code::kInvalidArgument);
  EXPECT_EQ(server_->AddExport("y", "", nullptr).code(), Code::kInvalidArgument);
  EXPECT_EQ(server_->RemoveExport("nope").code(), Code::kNotFound);
}

TEST_F(NbdServerTest, LibnbdPreadAndBlockStatusMatchTheFile) {
  nbd_handle* h = nbd_create();
  ASSERT_NE(h, nullptr);
  ASSERT_EQ(nbd_set_export_name(h, "disk"), 0);
  ASSERT_EQ(nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION), 0);
  ASSERT_EQ(nbd_connect_unix(h, socket_.c_str()), 0) << nbd_get_error();
  EXPECT_EQ(nbd_is_read_only(h), 1);
  EXPECT_EQ(nbd_can_flush(h), 1);
  EXPECT_EQ(nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION), 1);
  EXPECT_EQ(nbd_get_structured_replies_negotiated(h), 1);

  std::string buf(kDiskSize, '\0');
  // Several request sizes, including the 32 MiB maximum region of 8 MiB.
  ASSERT_EQ(nbd_pread(h, buf.data(), buf.size(), 0, 0), 0) << nbd_get_error();
  EXPECT_TRUE(buf == content_);
  std::string small(777, '\0');
  ASSERT_EQ(nbd_pread(h, small.data(), small.size(), (1 << 20) + 5, 0), 0);
  EXPECT_EQ(small, content_.substr((1 << 20) + 5, 777));
  // Past the end: libnbd checks this itself, so only the error matters.
  EXPECT_EQ(nbd_pread(h, small.data(), 2, kDiskSize - 1, 0), -1);
  EXPECT_EQ(nbd_flush(h, 0), 0);

  struct Seen {
    uint64_t offset = 0;
    std::vector<std::pair<uint32_t, uint32_t>> extents;
  } seen;
  auto cb = [](void* user, const char* ctx, uint64_t offset, uint32_t* entries, size_t n,
               int* /*error*/) -> int {
    auto* s = static_cast<Seen*>(user);
    if (std::string(ctx) != LIBNBD_CONTEXT_BASE_ALLOCATION) return 0;
    s->offset = offset;
    for (size_t i = 0; i + 1 < n; i += 2) s->extents.push_back({entries[i], entries[i + 1]});
    return 0;
  };
  ASSERT_EQ(nbd_block_status(h, kDiskSize, 0, (nbd_extent_callback){cb, &seen, nullptr}, 0), 0)
      << nbd_get_error();
  uint64_t pos = 0;
  for (auto [len, flags] : seen.extents) {
    if ((flags & kStateHole) != 0) {
      EXPECT_EQ(content_.substr(pos, len), std::string(len, '\0')) << "hole at " << pos;
    }
    pos += len;
  }
  EXPECT_EQ(pos, kDiskSize);
  EXPECT_GE(seen.extents.size(), 7u);  // 4 data regions with holes between them
  nbd_shutdown(h, 0);
  nbd_close(h);
}

TEST_F(NbdServerTest, ListExportsWithLibnbd) {
  ASSERT_TRUE(server_->AddExport("second", "", std::make_shared<MemoryExportSource>("abc")).ok());
  nbd_handle* h = nbd_create();
  ASSERT_EQ(nbd_set_opt_mode(h, true), 0);
  ASSERT_EQ(nbd_connect_unix(h, socket_.c_str()), 0) << nbd_get_error();
  std::vector<std::string> names;
  auto cb = [](void* user, const char* name, const char* /*desc*/) -> int {
    static_cast<std::vector<std::string>*>(user)->push_back(name);
    return 0;
  };
  ASSERT_GE(nbd_opt_list(h, (nbd_list_callback){cb, &names, nullptr}), 0) << nbd_get_error();
  EXPECT_EQ(names, (std::vector<std::string>{"disk", "second"}));
  nbd_opt_abort(h);
  nbd_close(h);
}

// Each script is a malformed or hostile client; the answer is an error
// reply or a closed connection, and the server keeps serving others.
TEST_F(NbdServerTest, MalformedClientsAreAnsweredAndServerKeepsServing) {
  {  // wrong client flags
    RawClient c(socket_);
    ASSERT_EQ(c.Read(18).size(), 18u);
    c.Send(U32(0xff));
    EXPECT_TRUE(c.WaitClosed());
  }
  {  // bad option magic
    RawClient c(socket_);
    c.Read(18);
    c.Send(U32(3) + "XHAVEOPT" + U32(kOptList) + U32(0));
    EXPECT_TRUE(c.WaitClosed());
  }
  {  // oversize option length
    RawClient c(socket_);
    c.Read(18);
    c.Send(U32(3) + nbd::testing::U64(kOptionMagic) + U32(kOptGo) + U32(0x7fffffff));
    EXPECT_TRUE(c.WaitClosed());
  }
  {  // unknown option -> ERR_UNSUP, session continues with LIST
    RawClient c(socket_);
    c.Read(18);
    c.Send(U32(3) + Option(1234, "abc") + Option(kOptList, ""));
    std::string r = c.Read(20);
    ASSERT_EQ(r.size(), 20u);
    EXPECT_EQ(GetU32(r.data() + 12), kRepErrUnsup);
    c.Read(GetU32(r.data() + 16));
    r = c.Read(20);
    ASSERT_EQ(r.size(), 20u);
    EXPECT_EQ(GetU32(r.data() + 12), kRepServer);
  }
  {  // unknown export name via GO -> ERR_UNKNOWN; via EXPORT_NAME -> closed
    RawClient c(socket_);
    EXPECT_FALSE(Go(&c, "nope"));
    RawClient d(socket_);
    d.Read(18);
    d.Send(U32(3) + Option(kOptExportName, "nope"));
    EXPECT_TRUE(d.WaitClosed());
  }
  {  // bad request magic
    RawClient c(socket_);
    ASSERT_TRUE(Go(&c));
    std::string r = Request(0, kCmdRead, 1, 0, 512);
    r[3] ^= 0x55;
    c.Send(r);
    EXPECT_TRUE(c.WaitClosed());
  }
  {  // read beyond the end, oversize read, write, trim: error replies
    RawClient c(socket_);
    ASSERT_TRUE(Go(&c));
    c.Send(Request(0, kCmdRead, 1, kDiskSize - 1, 2) +
           Request(0, kCmdRead, 2, 0, kMaxRequestLength + 1) + Request(0, kCmdWrite, 3, 0, 4096) +
           std::string(4096, 'w') + Request(0, kCmdTrim, 4, 0, 4096) +
           Request(0, kCmdRead, 5, 0, 8));
    const uint32_t want[] = {kEinval, kEinval, kEperm, kEperm, 0};
    for (uint64_t cookie = 1; cookie <= 5; ++cookie) {
      std::string r = c.Read(16);
      ASSERT_EQ(r.size(), 16u);
      EXPECT_EQ(GetU32(r.data()), kSimpleReplyMagic);
      EXPECT_EQ(GetU32(r.data() + 4), want[cookie - 1]) << "cookie " << cookie;
      EXPECT_EQ(GetU64(r.data() + 8), cookie);
    }
    EXPECT_EQ(c.Read(8), content_.substr(0, 8));
  }
  {  // oversize write closes
    RawClient c(socket_);
    ASSERT_TRUE(Go(&c));
    c.Send(Request(0, kCmdWrite, 1, 0, kMaxRequestLength + 1));
    EXPECT_TRUE(c.WaitClosed());
  }
  // The server allows 8 connections: let the hung-up ones finish first.
  EXPECT_TRUE(WaitFor([&] { return server_->active_connections() == 0; }));
  CheckLibnbdReadsDisk();
}

// A client that hangs up after every prefix of a valid conversation.
TEST_F(NbdServerTest, AbruptDisconnectAtEveryStage) {
  std::string script = U32(3) + Option(kOptStructuredReply, "") +
                       Option(kOptSetMetaContext, MetaData("disk", {kBaseAllocation})) +
                       Option(kOptGo, GoData("disk", {kInfoBlockSize})) +
                       Request(0, kCmdRead, 1, 0, 65536) + Request(0, kCmdWrite, 2, 0, 100) +
                       std::string(100, 'w') + Request(0, kCmdBlockStatus, 3, 0, kDiskSize);
  const uint64_t before = server_->accepted_connections();
  uint64_t clients = 0;
  for (size_t cut = 0; cut <= script.size(); cut += (cut < 200 ? 1 : 37)) {
    RawClient c(socket_);
    ++clients;
    ASSERT_TRUE(c.connected());
    c.Send(script.substr(0, cut));
    c.Close();  // maybe before the server even sent its greeting
  }
  // The server allows 8 connections: let it take every hung-up one off its
  // listen queue and finish it first, or the check below may be refused.
  EXPECT_TRUE(WaitFor([&] {
    return server_->accepted_connections() == before + clients &&
           server_->active_connections() == 0;
  }));
  CheckLibnbdReadsDisk();
}

TEST_F(NbdServerTest, ConnectionsBeyondTheLimitAreClosed) {
  std::vector<std::unique_ptr<RawClient>> clients;
  for (int i = 0; i < 8; ++i) {
    clients.push_back(std::make_unique<RawClient>(socket_));
    ASSERT_EQ(clients.back()->Read(18).size(), 18u);
  }
  RawClient extra(socket_);
  EXPECT_TRUE(extra.WaitClosed());
  clients.pop_back();
  EXPECT_TRUE(WaitFor([&] { return server_->active_connections() == 7; }));
  RawClient again(socket_);
  EXPECT_EQ(again.Read(18).size(), 18u);
}

TEST_F(NbdServerTest, RemovedExportIsHiddenButOpenClientFinishes) {
  RawClient c(socket_);
  ASSERT_TRUE(Go(&c));
  ASSERT_TRUE(server_->RemoveExport("disk").ok());
  RawClient d(socket_);
  EXPECT_FALSE(Go(&d));  // ERR_UNKNOWN now
  c.Send(Request(0, kCmdRead, 1, 0, 16));
  std::string r = c.Read(16 + 16);
  ASSERT_EQ(r.size(), 32u);
  EXPECT_EQ(GetU32(r.data() + 4), 0u);
  EXPECT_EQ(r.substr(16), content_.substr(0, 16));
}

TEST_F(NbdServerTest, StopClosesConnectionsAndRemovesSocket) {
  RawClient c(socket_);
  ASSERT_TRUE(Go(&c));
  RawClient idle(socket_);
  ASSERT_EQ(idle.Read(18).size(), 18u);
  server_->Stop();
  EXPECT_TRUE(c.WaitClosed(1000));
  EXPECT_TRUE(idle.WaitClosed(1000));
  struct stat st;
  EXPECT_NE(::lstat(socket_.c_str(), &st), 0);
  server_->Stop();  // idempotent
  // Restart on the same path works.
  ASSERT_TRUE(server_->Start().ok());
  CheckLibnbdReadsDisk();
}

TEST(NbdServerTimeoutTest, SilentClientIsDisconnectedDuringNegotiation) {
  TempDir dir;
  NbdServerOptions options;
  options.socket_path = dir.Join("s.sock");
  options.handshake_timeout_ms = 200;
  NbdServer server(options);
  ASSERT_TRUE(server.AddExport("m", "", std::make_shared<MemoryExportSource>("0123")).ok());
  ASSERT_TRUE(server.Start().ok());
  RawClient silent(options.socket_path);
  ASSERT_EQ(silent.Read(18).size(), 18u);
  EXPECT_TRUE(silent.WaitClosed(3000));
  // A client in transmission stays connected past the limit.
  RawClient idle(options.socket_path);
  ASSERT_EQ(idle.Read(18).size(), 18u);
  ASSERT_TRUE(idle.Send(U32(3) + Option(kOptExportName, "m")));
  ASSERT_EQ(idle.Read(10).size(), 10u);
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  ASSERT_TRUE(idle.Send(Request(0, kCmdRead, 1, 0, 4)));
  EXPECT_EQ(idle.Read(20).substr(16), "0123");
}

TEST(NbdServerTimeoutTest, BadOptionsAreRejectedAtStart) {
  TempDir dir;
  NbdServer a(NbdServerOptions{dir.Join("a.sock"), 0});
  EXPECT_EQ(a.Start().code(), Code::kInvalidArgument);
  NbdServer b(NbdServerOptions{std::string(200, 'x'), 4});
  EXPECT_EQ(b.Start().code(), Code::kInvalidArgument);
  std::string file = dir.Join("plain");
  ASSERT_FALSE(MakeSparseFile(file, 10, {}).empty());
  NbdServer c(NbdServerOptions{file, 4});
  EXPECT_EQ(c.Start().code(), Code::kAlreadyExists);
}

}  // namespace
}  // namespace vmreplica
