#include "nbdserver/session.h"

#include <gtest/gtest.h>

#include <memory>

#include "nbdserver/memory_export_source.h"
#include "nbdserver/nbd_test_util.h"
#include "nbdserver/protocol.h"

namespace vmreplica::nbd {
namespace {

using testing::GoData;
using testing::MetaData;
using testing::Option;
using testing::Request;
using testing::U32;

struct OptReply {
  uint32_t option = 0;
  uint32_t type = 0;
  std::string data;
};

// Parses the server's output as it arrives.
class Output {
 public:
  explicit Output(Session* s) : s_(s) {}
  std::string Take(size_t n) {
    Pull();
    if (buf_.size() < n) {
      ADD_FAILURE() << "wanted " << n << " bytes, have " << buf_.size();
      return {};
    }
    std::string r = buf_.substr(0, n);
    buf_.erase(0, n);
    return r;
  }
  OptReply TakeOptReply() {
    std::string h = Take(20);
    if (h.size() != 20) return {};
    EXPECT_EQ(GetU64(h.data()), kOptionReplyMagic);
    OptReply r{GetU32(h.data() + 8), GetU32(h.data() + 12), {}};
    r.data = Take(GetU32(h.data() + 16));
    return r;
  }
  // Simple reply: returns the error, checks the cookie.
  uint32_t TakeSimpleReply(uint64_t cookie) {
    std::string h = Take(16);
    if (h.size() != 16) return ~0U;
    EXPECT_EQ(GetU32(h.data()), kSimpleReplyMagic);
    EXPECT_EQ(GetU64(h.data() + 8), cookie);
    return GetU32(h.data() + 4);
  }
  struct Chunk {
    uint16_t flags = 0, type = 0;
    std::string payload;
  };
  Chunk TakeChunk(uint64_t cookie) {
    std::string h = Take(20);
    if (h.size() != 20) return {};
    EXPECT_EQ(GetU32(h.data()), kStructuredReplyMagic);
    EXPECT_EQ(GetU64(h.data() + 8), cookie);
    Chunk c{GetU16(h.data() + 4), GetU16(h.data() + 6), {}};
    c.payload = Take(GetU32(h.data() + 16));
    return c;
  }
  size_t pending() {
    Pull();
    return buf_.size();
  }

 private:
  void Pull() {
    buf_ += *s_->output();
    s_->output()->clear();
  }
  Session* s_;
  std::string buf_;
};

class SessionTest : public ::testing::Test {
 protected:
  SessionTest() {
    data_.assign(1 << 20, '\0');
    for (size_t i = 0; i < 65536; ++i) data_[i] = static_cast<char>(i * 7 + 1);
    for (size_t i = 512 * 1024; i < 512 * 1024 + 8192; ++i) data_[i] = 'x';
    source_ = std::make_shared<MemoryExportSource>(data_);
    EXPECT_TRUE(table_.Add({"disk", "the test disk", source_}).ok());
    EXPECT_TRUE(table_.Add({"other", "", std::make_shared<MemoryExportSource>("abc")}).ok());
  }

  // Sends `bytes` and runs the session.
  void Send(const std::string& bytes) {
    s_.Feed(bytes);
    s_.StepAll();
  }
  // Greeting + client flags.
  void Handshake(uint32_t flags = kClientFlagFixedNewstyle | kClientFlagNoZeroes) {
    std::string g = out_.Take(18);
    ASSERT_EQ(g.size(), 18u);
    EXPECT_EQ(GetU64(g.data()), kNbdMagic);
    EXPECT_EQ(GetU64(g.data() + 8), kOptionMagic);
    EXPECT_EQ(GetU16(g.data() + 16), kFlagFixedNewstyle | kFlagNoZeroes);
    Send(U32(flags));
  }
  // Handshake, optional structured replies + base:allocation, GO "disk".
  void Connect(bool structured) {
    Handshake();
    if (structured) {
      Send(Option(kOptStructuredReply, ""));
      ASSERT_EQ(out_.TakeOptReply().type, kRepAck);
      Send(Option(kOptSetMetaContext, MetaData("disk", {kBaseAllocation})));
      OptReply r = out_.TakeOptReply();
      ASSERT_EQ(r.type, kRepMetaContext);
      ASSERT_EQ(out_.TakeOptReply().type, kRepAck);
    }
    Send(Option(kOptGo, GoData("disk")));
    while (true) {
      OptReply r = out_.TakeOptReply();
      if (r.type != kRepInfo) {
        ASSERT_EQ(r.type, kRepAck);
        break;
      }
    }
    ASSERT_EQ(s_.phase(), Session::Phase::kTransmission);
  }

  std::string data_;
  std::shared_ptr<MemoryExportSource> source_;
  ExportTable table_;
  Session s_{&table_};
  Output out_{&s_};
};

TEST_F(SessionTest, GreetingIsFixedNewstyle) {
  Handshake();
  EXPECT_EQ(s_.phase(), Session::Phase::kOptions);
}

TEST_F(SessionTest, UnknownClientFlagsClose) {
  Handshake(kClientFlagFixedNewstyle | 0x80);
  EXPECT_TRUE(s_.closed());
  EXPECT_EQ(out_.pending(), 0u);
}

TEST_F(SessionTest, ClientWithoutFixedNewstyleIsClosed) {
  Handshake(0);
  EXPECT_TRUE(s_.closed());
}

TEST_F(SessionTest, BadOptionMagicCloses) {
  Handshake();
  Send("IHAVEOPX" + U32(kOptList) + U32(0));
  EXPECT_TRUE(s_.closed());
}

TEST_F(SessionTest, OversizeOptionLengthClosesWithoutWaitingForPayload) {
  Handshake();
  Send(testing::U64(kOptionMagic) + U32(kOptGo) + U32(kMaxOptionLength + 1));
  EXPECT_TRUE(s_.closed());
  Session s2(&table_);
  s2.Feed(U32(3) + testing::U64(kOptionMagic) + U32(kOptGo) + U32(0xffffffff));
  s2.StepAll();
  EXPECT_TRUE(s2.closed());
}

TEST_F(SessionTest, UnknownOptionGetsUnsupAndSessionContinues) {
  Handshake();
  Send(Option(4242, "junk"));
  OptReply r = out_.TakeOptReply();
  EXPECT_EQ(r.option, 4242u);
  EXPECT_EQ(r.type, kRepErrUnsup);
  Send(Option(kOptStartTls, ""));
  EXPECT_EQ(out_.TakeOptReply().type, kRepErrUnsup);
  Send(Option(kOptList, ""));
  EXPECT_EQ(out_.TakeOptReply().type, kRepServer);
}

TEST_F(SessionTest, ListShowsEveryExportWithDescription) {
  Handshake();
  Send(Option(kOptList, ""));
  OptReply a = out_.TakeOptReply();
  ASSERT_EQ(a.type, kRepServer);
  EXPECT_EQ(a.data, U32(4) + "disk" + "the test disk");
  OptReply b = out_.TakeOptReply();
  EXPECT_EQ(b.data, U32(5) + "other");
  EXPECT_EQ(out_.TakeOptReply().type, kRepAck);
}

TEST_F(SessionTest, ListWithPayloadIsInvalid) {
  Handshake();
  Send(Option(kOptList, "x"));
  EXPECT_EQ(out_.TakeOptReply().type, kRepErrInvalid);
  EXPECT_FALSE(s_.closed());
}

TEST_F(SessionTest, InfoReportsSizeFlagsNameAndBlockSize) {
  Handshake();
  Send(Option(kOptInfo, GoData("disk", {kInfoName, kInfoDescription, kInfoBlockSize})));
  OptReply e = out_.TakeOptReply();
  ASSERT_EQ(e.type, kRepInfo);
  ASSERT_EQ(e.data.size(), 12u);
  EXPECT_EQ(GetU16(e.data.data()), kInfoExport);
  EXPECT_EQ(GetU64(e.data.data() + 2), data_.size());
  uint16_t flags = GetU16(e.data.data() + 10);
  EXPECT_TRUE(flags & kTxReadOnly);
  EXPECT_TRUE(flags & kTxSendFlush);
  EXPECT_EQ(out_.TakeOptReply().data, testing::U16(kInfoName) + "disk");
  EXPECT_EQ(out_.TakeOptReply().data, testing::U16(kInfoDescription) + "the test disk");
  OptReply bs = out_.TakeOptReply();
  ASSERT_EQ(bs.data.size(), 14u);
  EXPECT_EQ(GetU32(bs.data.data() + 10), kMaxRequestLength);
  EXPECT_EQ(out_.TakeOptReply().type, kRepAck);
  EXPECT_EQ(s_.phase(), Session::Phase::kOptions);  // INFO does not end negotiation
}

TEST_F(SessionTest, GoForUnknownExportGetsErrUnknownAndContinues) {
  Handshake();
  Send(Option(kOptGo, GoData("nope")));
  EXPECT_EQ(out_.TakeOptReply().type, kRepErrUnknown);
  EXPECT_EQ(s_.phase(), Session::Phase::kOptions);
}

TEST_F(SessionTest, MalformedGoPayloadsAreInvalid) {
  Handshake();
  const std::string bad[] = {
      "",                                 // no name length
      U32(10) + "disk",                   // name overruns
      U32(4) + "disk",                    // no request count
      U32(4) + "disk" + testing::U16(2),  // count says 2, none follow
      GoData("disk") + "x",               // trailing byte
      U32(0xffffffff),                    // huge name length
  };
  for (const std::string& b : bad) {
    Send(Option(kOptGo, b));
    EXPECT_EQ(out_.TakeOptReply().type, kRepErrInvalid);
  }
  EXPECT_EQ(s_.phase(), Session::Phase::kOptions);
}

TEST_F(SessionTest, ExportNameUnknownCloses) {
  Handshake();
  Send(Option(kOptExportName, "nope"));
  EXPECT_TRUE(s_.closed());
}

TEST_F(SessionTest, ExportNameSendsSizeFlagsAndZeroesUnlessNoZeroes) {
  Handshake(kClientFlagFixedNewstyle);
  Send(Option(kOptExportName, "other"));
  std::string r = out_.Take(8 + 2 + 124);
  ASSERT_EQ(r.size(), 134u);
  EXPECT_EQ(GetU64(r.data()), 3u);
  EXPECT_EQ(r.substr(10), std::string(124, '\0'));
  EXPECT_EQ(s_.phase(), Session::Phase::kTransmission);

  Session s2(&table_);
  s2.Feed(U32(kClientFlagFixedNewstyle | kClientFlagNoZeroes) + Option(kOptExportName, "other"));
  s2.StepAll();
  EXPECT_EQ(s2.output()->size(), 18u + 10u);
}

TEST_F(SessionTest, AbortIsAckedThenClosed) {
  Handshake();
  Send(Option(kOptAbort, ""));
  EXPECT_EQ(out_.TakeOptReply().type, kRepAck);
  EXPECT_TRUE(s_.closed());
}

TEST_F(SessionTest, MetaContextNeedsStructuredReplies) {
  Handshake();
  Send(Option(kOptListMetaContext, MetaData("disk", {})));
  EXPECT_EQ(out_.TakeOptReply().type, kRepErrInvalid);
  Send(Option(kOptSetMetaContext, MetaData("disk", {kBaseAllocation})));
  EXPECT_EQ(out_.TakeOptReply().type, kRepErrInvalid);
}

TEST_F(SessionTest, ListMetaContextAnswersBaseQueries) {
  Handshake();
  Send(Option(kOptStructuredReply, ""));
  ASSERT_EQ(out_.TakeOptReply().type, kRepAck);
  for (const auto& queries :
       std::vector<std::vector<std::string>>{{}, {"base:"}, {kBaseAllocation}}) {
    Send(Option(kOptListMetaContext, MetaData("disk", queries)));
    OptReply r = out_.TakeOptReply();
    EXPECT_EQ(r.type, kRepMetaContext);
    EXPECT_EQ(r.data.substr(4), kBaseAllocation);
    EXPECT_EQ(out_.TakeOptReply().type, kRepAck);
  }
  Send(Option(kOptListMetaContext, MetaData("disk", {"qemu:dirty-bitmap:x"})));
  EXPECT_EQ(out_.TakeOptReply().type, kRepAck);
  Send(Option(kOptSetMetaContext, MetaData("nope", {kBaseAllocation})));
  EXPECT_EQ(out_.TakeOptReply().type, kRepErrUnknown);
  Send(Option(kOptSetMetaContext, MetaData("disk", {kBaseAllocation}) + "z"));
  EXPECT_EQ(out_.TakeOptReply().type, kRepErrInvalid);
}

TEST_F(SessionTest, ReadWithSimpleReply) {
  Connect(false);
  Send(Request(0, kCmdRead, 77, 100, 4000));
  EXPECT_EQ(out_.TakeSimpleReply(77), 0u);
  EXPECT_EQ(out_.Take(4000), data_.substr(100, 4000));
}

TEST_F(SessionTest, ReadWithStructuredReplyIsOneDataChunk) {
  Connect(true);
  Send(Request(kCmdFlagDf, kCmdRead, 5, 65000, 1000));
  auto c = out_.TakeChunk(5);
  EXPECT_EQ(c.type, kReplyTypeOffsetData);
  EXPECT_EQ(c.flags, kReplyFlagDone);
  ASSERT_EQ(c.payload.size(), 1008u);
  EXPECT_EQ(GetU64(c.payload.data()), 65000u);
  EXPECT_EQ(c.payload.substr(8), data_.substr(65000, 1000));
}

TEST_F(SessionTest, ReadBeyondEndIsEinval) {
  Connect(false);
  Send(Request(0, kCmdRead, 1, data_.size() - 10, 11));
  EXPECT_EQ(out_.TakeSimpleReply(1), kEinval);
  Send(Request(0, kCmdRead, 2, ~0ULL, 1));
  EXPECT_EQ(out_.TakeSimpleReply(2), kEinval);
  Send(Request(0, kCmdRead, 3, data_.size() - 10, 10));
  EXPECT_EQ(out_.TakeSimpleReply(3), 0u);
  out_.Take(10);
}

TEST_F(SessionTest, OversizeAndEmptyReadsAreEinvalStructured) {
  Connect(true);
  Send(Request(0, kCmdRead, 9, 0, kMaxRequestLength + 1));
  auto c = out_.TakeChunk(9);
  EXPECT_EQ(c.type, kReplyTypeError);
  ASSERT_GE(c.payload.size(), 6u);
  EXPECT_EQ(GetU32(c.payload.data()), kEinval);
  EXPECT_EQ(GetU16(c.payload.data() + 4) + 6u, c.payload.size());
  Send(Request(0, kCmdRead, 10, 0, 0));
  EXPECT_EQ(GetU32(out_.TakeChunk(10).payload.data()), kEinval);
}

TEST_F(SessionTest, ReadFailureIsEio) {
  Connect(false);
  source_->set_fail_reads(true);
  Send(Request(0, kCmdRead, 4, 0, 512));
  EXPECT_EQ(out_.TakeSimpleReply(4), kEio);
  EXPECT_EQ(out_.pending(), 0u);
}

TEST_F(SessionTest, WriteIsRefusedWithEpermAfterItsPayload) {
  Connect(false);
  std::string script =
      Request(0, kCmdWrite, 8, 0, 5000) + std::string(5000, 'w') + Request(0, kCmdFlush, 9, 0, 0);
  for (char c : script) Send(std::string(1, c));  // byte by byte
  EXPECT_EQ(out_.TakeSimpleReply(8), kEperm);
  EXPECT_EQ(out_.TakeSimpleReply(9), 0u);
  EXPECT_FALSE(s_.closed());
}

TEST_F(SessionTest, TrimAndWriteZeroesAreEperm) {
  Connect(false);
  Send(Request(0, kCmdTrim, 1, 0, 4096) + Request(0, kCmdWriteZeroes, 2, 0, 4096) +
       Request(0, kCmdWrite, 3, 0, 0));
  EXPECT_EQ(out_.TakeSimpleReply(1), kEperm);
  EXPECT_EQ(out_.TakeSimpleReply(2), kEperm);
  EXPECT_EQ(out_.TakeSimpleReply(3), kEperm);
}

TEST_F(SessionTest, OversizeWriteCloses) {
  Connect(false);
  Send(Request(0, kCmdWrite, 1, 0, kMaxRequestLength + 1));
  EXPECT_TRUE(s_.closed());
}

TEST_F(SessionTest, UnknownCommandAndFlagsAreEinval) {
  Connect(false);
  Send(Request(0, 99, 1, 0, 0) + Request(0x8000, kCmdRead, 2, 0, 10) +
       Request(0, kCmdCache, 3, 0, 10));
  EXPECT_EQ(out_.TakeSimpleReply(1), kEinval);
  EXPECT_EQ(out_.TakeSimpleReply(2), kEinval);
  EXPECT_EQ(out_.TakeSimpleReply(3), kEinval);
}

TEST_F(SessionTest, BadRequestMagicCloses) {
  Connect(false);
  std::string r = Request(0, kCmdRead, 1, 0, 10);
  r[0] ^= 1;
  Send(r);
  EXPECT_TRUE(s_.closed());
  EXPECT_EQ(out_.pending(), 0u);
}

TEST_F(SessionTest, DiscCloses) {
  Connect(false);
  Send(Request(0, kCmdDisc, 1, 0, 0) + Request(0, kCmdFlush, 2, 0, 0));
  EXPECT_TRUE(s_.closed());
  EXPECT_EQ(out_.pending(), 0u);
}

TEST_F(SessionTest, BlockStatusReportsDataAndHoles) {
  Connect(true);
  Send(Request(0, kCmdBlockStatus, 6, 0, data_.size()));
  auto c = out_.TakeChunk(6);
  EXPECT_EQ(c.type, kReplyTypeBlockStatus);
  EXPECT_EQ(c.flags, kReplyFlagDone);
  ASSERT_EQ(c.payload.size(), 4u + 4 * 8);
  EXPECT_EQ(GetU32(c.payload.data()), 1u);  // the id SET_META_CONTEXT gave
  const char* d = c.payload.data() + 4;
  EXPECT_EQ(GetU32(d), 65536u);
  EXPECT_EQ(GetU32(d + 4), 0u);
  EXPECT_EQ(GetU32(d + 8), 512u * 1024 - 65536);
  EXPECT_EQ(GetU32(d + 12), kStateHole | kStateZero);
  EXPECT_EQ(GetU32(d + 16), 8192u);
  EXPECT_EQ(GetU32(d + 20), 0u);
  EXPECT_EQ(GetU32(d + 24), data_.size() - 512 * 1024 - 8192);

  Send(Request(kCmdFlagReqOne, kCmdBlockStatus, 7, 1000, 100000));
  c = out_.TakeChunk(7);
  ASSERT_EQ(c.payload.size(), 12u);
  EXPECT_EQ(GetU32(c.payload.data() + 4), 65536u - 1000);

  Send(Request(0, kCmdBlockStatus, 8, data_.size(), 1));
  EXPECT_EQ(GetU32(out_.TakeChunk(8).payload.data()), kEinval);
}

TEST_F(SessionTest, BlockStatusWithoutContextIsEinval) {
  Handshake();
  Send(Option(kOptStructuredReply, ""));
  out_.TakeOptReply();
  Send(Option(kOptGo, GoData("disk")));
  while (out_.TakeOptReply().type != kRepAck) {
  }
  Send(Request(0, kCmdBlockStatus, 1, 0, 4096));
  auto c = out_.TakeChunk(1);
  EXPECT_EQ(c.type, kReplyTypeError);
  EXPECT_EQ(GetU32(c.payload.data()), kEinval);
}

TEST_F(SessionTest, MetaContextForAnotherExportIsDroppedOnGo) {
  Handshake();
  Send(Option(kOptStructuredReply, ""));
  out_.TakeOptReply();
  Send(Option(kOptSetMetaContext, MetaData("other", {kBaseAllocation})));
  out_.TakeOptReply();
  out_.TakeOptReply();
  Send(Option(kOptGo, GoData("disk")));
  while (out_.TakeOptReply().type != kRepAck) {
  }
  Send(Request(0, kCmdBlockStatus, 1, 0, 4096));
  EXPECT_EQ(out_.TakeChunk(1).type, kReplyTypeError);
}

TEST_F(SessionTest, RemovedExportKeepsServingOpenSession) {
  Connect(false);
  ASSERT_TRUE(table_.Remove("disk").ok());
  Send(Request(0, kCmdRead, 1, 0, 16));
  EXPECT_EQ(out_.TakeSimpleReply(1), 0u);
  EXPECT_EQ(out_.Take(16), data_.substr(0, 16));
}

TEST_F(SessionTest, ByteAtATimeGivesTheSameOutputAsOneBlock) {
  std::string script = U32(3) + Option(kOptStructuredReply, "") +
                       Option(kOptSetMetaContext, MetaData("disk", {kBaseAllocation})) +
                       Option(kOptGo, GoData("disk", {kInfoBlockSize})) +
                       Request(0, kCmdRead, 1, 4096, 8192) +
                       Request(0, kCmdBlockStatus, 2, 0, 1 << 20) + Request(0, kCmdDisc, 3, 0, 0);
  Session a(&table_);
  a.Feed(script);
  a.StepAll();
  Session b(&table_);
  for (char c : script) {
    b.Feed(&c, 1);
    b.StepAll();
  }
  EXPECT_TRUE(a.closed());
  EXPECT_TRUE(b.closed());
  EXPECT_EQ(*a.output(), *b.output());
}

}  // namespace
}  // namespace vmreplica::nbd
