// NbdDeltaReader against a real qemu-storage-daemon (e2e): a qcow2 disk with
// a persistent 4 KiB dirty bitmap, written through its NBD export with
// qemu-io, read back with the reader and checked against an image the test
// computes on its own.
#include "vmreplica/nbd_reader.h"

#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <vector>

#include "blockio/qsd_testing.h"

namespace vmreplica {
namespace {

using blockio_testing::CreateQcow2;
using blockio_testing::QemuIo;
using blockio_testing::Qsd;
using blockio_testing::RunCommand;
using blockio_testing::TempDir;

constexpr uint64_t kDiskSize = 64ull << 20;
constexpr uint64_t kGranularity = 4096;
constexpr uint64_t kKi = 1024;
constexpr uint64_t kMi = 1024 * 1024;

struct Write {
  uint64_t offset;
  uint64_t length;
  int pattern;  // byte value, or -1 for write -z
};

// Scattered writes: unaligned, overlapping, zero writes (cluster-aligned and
// not), a write of explicit zero bytes, one touching the end of the disk.
const std::vector<Write>& TestWrites() {
  static const std::vector<Write> w = {
      {1000, 5000, 0xAB},  // unaligned, spans two granules
      {4096, 4096, 0xCD},  // overlaps the previous one
      {1 * kMi, 300 * kKi, 0x11},
      {1 * kMi + 100 * kKi, 50 * kKi, 0x22},  // inside the previous one
      {8 * kMi, 128 * kKi, -1},               // cluster-aligned zero write
      {12 * kMi + 512, 1000, -1},             // small unaligned zero write
      {20 * kMi + 4095, 2, 0x33},             // two bytes across a granule edge
      {kDiskSize - 3000, 3000, 0x44},         // end of the disk
      {30 * kMi, 5 * kMi, 0x55},              // larger than one request
      {31 * kMi, 64 * kKi, -1},               // zeroes a cluster inside it
      {40 * kMi, 8 * kKi, 0x00},              // data that happens to be zeros
  };
  return w;
}

struct Interval {
  uint64_t begin;
  uint64_t end;
  bool operator==(const Interval&) const = default;
};

// Sorted, merged list of intervals.
std::vector<Interval> Normalize(std::vector<Interval> v) {
  std::sort(v.begin(), v.end(),
            [](const Interval& a, const Interval& b) { return a.begin < b.begin; });
  std::vector<Interval> out;
  for (const Interval& i : v) {
    if (!out.empty() && i.begin <= out.back().end) {
      out.back().end = std::max(out.back().end, i.end);
    } else {
      out.push_back(i);
    }
  }
  return out;
}

std::string Describe(const std::vector<Interval>& v) {
  std::string s;
  for (const Interval& i : v)
    s += "[" + std::to_string(i.begin) + "," + std::to_string(i.end) + ") ";
  return s;
}

bool Covers(const std::vector<Interval>& normalized, uint64_t begin, uint64_t end) {
  for (const Interval& i : normalized)
    if (i.begin <= begin && end <= i.end) return true;
  return false;
}

std::string QemuIoCommand(const Write& w) {
  if (w.pattern < 0) return "write -z " + std::to_string(w.offset) + " " + std::to_string(w.length);
  return "write -P " + std::to_string(w.pattern) + " " + std::to_string(w.offset) + " " +
         std::to_string(w.length);
}

class NbdReaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(dir_.ok());
    image_ = dir_.path() + "/d.qcow2";
    ASSERT_TRUE(CreateQcow2(image_, kDiskSize, "bm0", kGranularity).ok());
    auto qsd = Qsd::Start(dir_.path(), image_, "bm0");
    ASSERT_TRUE(qsd.ok()) << qsd.status().ToString();
    qsd_ = std::move(qsd).value();
    expected_.assign(kDiskSize, 0);
  }

  // Applies the writes to the disk (one qemu-io process) and to expected_.
  void ApplyWrites(const std::vector<Write>& writes) {
    std::vector<std::string> cmds;
    for (const Write& w : writes) {
      cmds.push_back(QemuIoCommand(w));
      std::memset(expected_.data() + w.offset, w.pattern < 0 ? 0 : w.pattern, w.length);
      dirty_.push_back({w.offset / kGranularity * kGranularity,
                        std::min(kDiskSize, (w.offset + w.length + kGranularity - 1) /
                                                kGranularity * kGranularity)});
    }
    Status s = QemuIo(qsd_->uri(), cmds);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  Result<std::vector<DeltaRecord>> ReadAll(NbdDeltaReader& reader) {
    std::vector<DeltaRecord> out;
    for (;;) {
      auto r = reader.Next();
      if (!r.ok()) return r.status();
      if (!r->has_value()) return out;
      out.push_back(std::move(**r));
    }
  }

  // Structure every stream must have: ordered, disjoint, sized, in range.
  static void CheckShape(const std::vector<DeltaRecord>& records, uint32_t max_request) {
    uint64_t prev_end = 0;
    for (const DeltaRecord& r : records) {
      EXPECT_EQ(r.disk, 7u);
      EXPECT_GT(r.length, 0u);
      EXPECT_GE(r.offset, prev_end) << "records out of order or overlapping";
      EXPECT_LE(r.offset + r.length, kDiskSize);
      if (r.zero) {
        EXPECT_TRUE(r.data.empty());
      } else {
        EXPECT_EQ(r.data.size(), r.length);
        EXPECT_LE(r.length, max_request);
      }
      prev_end = r.offset + r.length;
    }
  }

  TempDir dir_;
  std::string image_;
  std::unique_ptr<Qsd> qsd_;
  std::vector<char> expected_;
  std::vector<Interval> dirty_;  // granule-rounded write ranges
};

struct OptionCase {
  const char* name;
  NbdReaderOptions options;
};

void PrintTo(const OptionCase& c, std::ostream* os) { *os << c.name; }

NbdReaderOptions Opts(uint32_t max_request, uint32_t in_flight, uint64_t chunk) {
  NbdReaderOptions o;
  o.max_request_bytes = max_request;
  o.requests_in_flight = in_flight;
  o.status_chunk = chunk;
  o.io_timeout = std::chrono::seconds(10);
  return o;
}

class NbdReaderDeltaTest : public NbdReaderTest,
                           public ::testing::WithParamInterface<OptionCase> {};

// Every dirty byte is covered, nothing clean outside the bitmap granules is,
// data matches the independently computed image, and cluster-aligned zero
// writes come back as zero records (the other zero writes come back as data
// that is all zeros, or as zero records: both are checked against the image).
TEST_P(NbdReaderDeltaTest, DeltaMatchesWritesAtBitmapGranularity) {
  ApplyWrites(TestWrites());
  const NbdReaderOptions options = GetParam().options;
  auto reader = NbdDeltaReader::Open(qsd_->socket(), "disk0", 7, "qemu:dirty-bitmap:bm0", options);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  EXPECT_EQ((*reader)->size(), kDiskSize);
  auto records = ReadAll(**reader);
  ASSERT_TRUE(records.ok()) << records.status().ToString();
  CheckShape(*records, options.max_request_bytes);

  std::vector<Interval> covered;
  std::vector<Interval> zero_covered;
  uint64_t data_bytes = 0, zero_bytes = 0;
  for (const DeltaRecord& r : *records) {
    covered.push_back({r.offset, r.offset + r.length});
    const char* want = expected_.data() + r.offset;
    if (r.zero) {
      zero_covered.push_back({r.offset, r.offset + r.length});
      zero_bytes += r.length;
      EXPECT_TRUE(std::all_of(want, want + r.length, [](char c) { return c == 0; }))
          << "zero record over non-zero bytes at " << r.offset;
    } else {
      data_bytes += r.length;
      EXPECT_EQ(0, std::memcmp(r.data.data(), want, r.length)) << "data differs at " << r.offset;
    }
  }
  // Exactly the dirty granules: every written byte, and nothing else.
  EXPECT_EQ(Normalize(covered), Normalize(dirty_))
      << "got " << Describe(Normalize(covered)) << "want " << Describe(Normalize(dirty_));
  zero_covered = Normalize(zero_covered);
  EXPECT_TRUE(Covers(zero_covered, 8 * kMi, 8 * kMi + 128 * kKi)) << Describe(zero_covered);
  EXPECT_TRUE(Covers(zero_covered, 31 * kMi, 31 * kMi + 64 * kKi)) << Describe(zero_covered);

  const NbdReaderStats& st = (*reader)->stats();
  EXPECT_EQ(st.data_bytes, data_bytes);
  EXPECT_EQ(st.zero_bytes, zero_bytes);
  EXPECT_EQ(st.read_requests, st.data_records);
  EXPECT_EQ(st.data_records + st.zero_records, records->size());
  EXPECT_EQ(st.scanned_bytes, kDiskSize);
  EXPECT_GE(st.status_requests, (kDiskSize + options.status_chunk - 1) / options.status_chunk);

  // The end is sticky.
  auto again = (*reader)->Next();
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->has_value());
}

INSTANTIATE_TEST_SUITE_P(
    Options, NbdReaderDeltaTest,
    ::testing::Values(OptionCase{"Defaults", Opts(256 << 10, 16, 1ull << 30)},
                      OptionCase{"LargeRequests", Opts(4 << 20, 8, 1ull << 30)},
                      OptionCase{"SmallRequestsSmallChunks", Opts(64 << 10, 3, 64 << 10)},
                      OptionCase{"OneRequestTinyChunks", Opts(4096, 1, 4096)},
                      OptionCase{"OddChunk", Opts(1 << 20, 64, 3 * 4096 + 4096 * 7)}),
    [](const ::testing::TestParamInfo<OptionCase>& info) { return std::string(info.param.name); });

TEST_F(NbdReaderTest, CleanBitmapGivesEmptyDelta) {
  auto reader = NbdDeltaReader::Open(qsd_->socket(), "disk0", 7, "qemu:dirty-bitmap:bm0");
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  auto r = (*reader)->Next();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_FALSE(r->has_value());
  EXPECT_EQ((*reader)->stats().scanned_bytes, kDiskSize);
}

// Initial copy: applying the records to a zero image gives the disk exactly
// as `qemu-img convert` reads it; zero extents are skipped.
TEST_F(NbdReaderTest, InitialCopyReproducesDisk) {
  ApplyWrites(TestWrites());
  auto reader =
      NbdDeltaReader::Open(qsd_->socket(), "disk0", 7, std::nullopt, Opts(1 << 20, 4, 8 << 20));
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  auto records = ReadAll(**reader);
  ASSERT_TRUE(records.ok()) << records.status().ToString();
  CheckShape(*records, 1 << 20);

  std::vector<char> image(kDiskSize, 0);
  std::vector<Interval> covered;
  for (const DeltaRecord& r : *records) {
    EXPECT_FALSE(r.zero) << "initial copy sends no zero records";
    std::memcpy(image.data() + r.offset, r.data.data(), r.data.size());
    covered.push_back({r.offset, r.offset + r.length});
  }
  const std::string raw = dir_.path() + "/converted.raw";
  auto conv = RunCommand({"qemu-img", "convert", "-f", "raw", "-O", "raw", qsd_->uri(), raw});
  ASSERT_TRUE(conv.ok()) << conv.status().ToString();
  std::ifstream in(raw, std::ios::binary);
  std::vector<char> disk(kDiskSize + 1);
  in.read(disk.data(), static_cast<std::streamsize>(disk.size()));
  ASSERT_EQ(static_cast<uint64_t>(in.gcount()), kDiskSize) << "converted image has the wrong size";
  disk.resize(kDiskSize);
  EXPECT_TRUE(disk == image) << "initial copy differs from qemu-img convert";
  EXPECT_TRUE(disk == expected_) << "disk differs from the test's own image";
  // Sparse: the untouched part of the disk and the zeroed cluster are not read.
  EXPECT_LT((*reader)->stats().data_bytes, 16 * kMi);
  EXPECT_FALSE(Covers(Normalize(covered), 8 * kMi, 8 * kMi + 4096));
}

// Buffers given back with Recycle are read into again, and a reused buffer
// holds exactly the new read: bigger buffers reused for smaller reads still
// give the disk's bytes. A new buffer's capacity is its size (more than the
// short-string size), so a record with more capacity than bytes was read
// into a buffer given back before.
TEST_F(NbdReaderTest, RecycledBuffersAreReusedAndHoldOnlyTheNewRead) {
  ApplyWrites(TestWrites());
  auto reader =
      NbdDeltaReader::Open(qsd_->socket(), "disk0", 7, std::nullopt, Opts(64 << 10, 1, 8 << 20));
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  std::vector<char> image(kDiskSize, 0);
  int data_records = 0, in_bigger = 0;
  for (;;) {
    auto r = (*reader)->Next();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    if (!r->has_value()) break;
    DeltaRecord& rec = **r;
    ASSERT_FALSE(rec.zero);
    ASSERT_EQ(rec.data.size(), rec.length);
    ASSERT_LE(rec.offset + rec.length, kDiskSize);
    std::memcpy(image.data() + rec.offset, rec.data.data(), rec.data.size());
    ++data_records;
    if (rec.data.capacity() > rec.length && rec.length > 15) ++in_bigger;
    (*reader)->Recycle(std::move(rec.data));
  }
  EXPECT_TRUE(image == expected_) << "records read into recycled buffers differ from the disk";
  ASSERT_GT(data_records, 10);
  EXPECT_GT(in_bigger, 0) << "no read went into a buffer given back";
}

TEST_F(NbdReaderTest, MissingBitmapContextIsFailedPreconditionNamingIt) {
  auto reader = NbdDeltaReader::Open(qsd_->socket(), "disk0", 0, "qemu:dirty-bitmap:vmr-gone-g9");
  ASSERT_FALSE(reader.ok());
  EXPECT_EQ(reader.status().code(), Code::kFailedPrecondition) << reader.status().ToString();
  EXPECT_NE(reader.status().message().find("qemu:dirty-bitmap:vmr-gone-g9"), std::string::npos)
      << reader.status().ToString();
}

TEST_F(NbdReaderTest, UnknownExportIsUnavailable) {
  auto reader = NbdDeltaReader::Open(qsd_->socket(), "nosuch", 0, std::nullopt);
  ASSERT_FALSE(reader.ok());
  EXPECT_EQ(reader.status().code(), Code::kUnavailable) << reader.status().ToString();
}

// A server killed in the middle of a delta ends the stream with an error
// (not a hang, not a crash, not a silent end), and the error sticks.
TEST_F(NbdReaderTest, KilledServerMidReadIsAnError) {
  ApplyWrites({{0, 32 * kMi, 0x5A}});
  NbdReaderOptions o = Opts(64 << 10, 4, 1ull << 30);
  o.io_timeout = std::chrono::seconds(5);
  auto reader = NbdDeltaReader::Open(qsd_->socket(), "disk0", 7, "qemu:dirty-bitmap:bm0", o);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  auto first = (*reader)->Next();
  ASSERT_TRUE(first.ok() && first->has_value()) << first.status().ToString();
  qsd_->Kill();
  Status error;
  uint64_t after_kill = 0;
  for (;;) {
    auto r = (*reader)->Next();
    if (!r.ok()) {
      error = r.status();
      break;
    }
    ASSERT_TRUE(r->has_value()) << "stream ended cleanly although the server died";
    ++after_kill;
  }
  EXPECT_LE(after_kill, o.requests_in_flight);  // only reads already answered
  EXPECT_TRUE(error.code() == Code::kUnavailable || error.code() == Code::kIOError)
      << error.ToString();
  auto again = (*reader)->Next();
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), error.code());
}

// A server that stops answering (SIGSTOP) gives Timeout after io_timeout.
TEST_F(NbdReaderTest, StalledServerTimesOut) {
  ApplyWrites({{0, 8 * kMi, 0x5A}});
  NbdReaderOptions o = Opts(64 << 10, 2, 1ull << 30);
  o.io_timeout = std::chrono::milliseconds(300);
  auto reader = NbdDeltaReader::Open(qsd_->socket(), "disk0", 7, "qemu:dirty-bitmap:bm0", o);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  ASSERT_EQ(kill(qsd_->pid(), SIGSTOP), 0);
  Status error;
  for (int i = 0; i < 1000; ++i) {
    auto r = (*reader)->Next();
    if (!r.ok()) {
      error = r.status();
      break;
    }
    ASSERT_TRUE(r->has_value());
  }
  kill(qsd_->pid(), SIGCONT);
  EXPECT_EQ(error.code(), Code::kTimeout) << error.ToString();
}

// The product's path (design step 3, QMP sequence from the environment
// notes): bitmap g1 tracks writes, a transaction starts g2, disables g1 and
// starts image fleecing; the fleecing node is exported with g1. Writes after
// the cut must not leak into the delta: it shows the disk as of the cut.
TEST_F(NbdReaderTest, FleecingExportGivesTheCutNotLaterWrites) {
  using blockio_testing::QmpSession;
  auto qmp = QmpSession::Connect(qsd_->qmp_socket());
  ASSERT_TRUE(qmp.ok()) << qmp.status().ToString();
  auto exec = [&](const std::string& cmd, const std::string& args) {
    auto r = (*qmp)->Execute(cmd, args);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok();
  };
  ASSERT_TRUE(exec("block-dirty-bitmap-add",
                   R"({"node":"disk0","name":"g1","granularity":4096,"persistent":true})"));
  ApplyWrites(TestWrites());  // expected_ / dirty_ now describe the cut

  const std::string fleece = dir_.path() + "/fleece.qcow2";
  ASSERT_TRUE(CreateQcow2(fleece, kDiskSize).ok());
  ASSERT_TRUE(
      exec("blockdev-add",
           R"({"driver":"qcow2","node-name":"fleece0","file":{"driver":"file","filename":")" +
               fleece + R"("},"backing":"disk0"})"));
  ASSERT_TRUE(exec("transaction", R"({"actions":[
      {"type":"block-dirty-bitmap-add","data":{"node":"disk0","name":"g2","granularity":4096,"persistent":true}},
      {"type":"block-dirty-bitmap-disable","data":{"node":"disk0","name":"g1"}},
      {"type":"blockdev-backup","data":{"device":"disk0","target":"fleece0","sync":"none","job-id":"fl0"}}]})"));
  ASSERT_TRUE(exec(
      "block-export-add",
      R"({"type":"nbd","id":"fexp","node-name":"fleece0","name":"fleece0","writable":false,"bitmaps":[{"node":"disk0","name":"g1"}]})"));

  // After the cut: overwrite dirty and clean areas, zero a dirty one.
  Status s = QemuIo(qsd_->uri(), {"write -P 0xEE 0 64k", "write -P 0xEE 1M 1M",
                                  "write -P 0xEE 50M 64k", "write -z 30M 64k"});
  ASSERT_TRUE(s.ok()) << s.ToString();

  auto reader = NbdDeltaReader::Open(qsd_->socket(), "fleece0", 7, "qemu:dirty-bitmap:g1",
                                     Opts(256 << 10, 8, 1ull << 30));
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  auto records = ReadAll(**reader);
  ASSERT_TRUE(records.ok()) << records.status().ToString();
  CheckShape(*records, 256 << 10);
  std::vector<Interval> covered;
  for (const DeltaRecord& r : *records) {
    covered.push_back({r.offset, r.offset + r.length});
    const char* want = expected_.data() + r.offset;
    if (r.zero) {
      EXPECT_TRUE(std::all_of(want, want + r.length, [](char c) { return c == 0; }))
          << "zero record over non-zero bytes at " << r.offset;
    } else {
      EXPECT_EQ(0, std::memcmp(r.data.data(), want, r.length)) << "data differs at " << r.offset;
    }
  }
  EXPECT_EQ(Normalize(covered), Normalize(dirty_))
      << "got " << Describe(Normalize(covered)) << "want " << Describe(Normalize(dirty_));
  reader->reset();

  // Tear the cut down as the product does, so the daemon stops cleanly.
  exec("block-export-del", R"({"id":"fexp"})");
  exec("block-job-cancel", R"({"device":"fl0"})");
}

TEST(NbdReaderOpenTest, RejectsOptionsOutOfRange) {
  auto bad = [](NbdReaderOptions o) {
    auto r = NbdDeltaReader::Open("/nonexistent.sock", "disk0", 0, std::nullopt, o);
    return !r.ok() && r.status().code() == Code::kInvalidArgument;
  };
  NbdReaderOptions o;
  o.max_request_bytes = 100;
  EXPECT_TRUE(bad(o));
  o = {};
  o.max_request_bytes = 64u << 20;
  EXPECT_TRUE(bad(o));
  o = {};
  o.requests_in_flight = 0;
  EXPECT_TRUE(bad(o));
  o = {};
  o.status_chunk = 4ull << 30;
  EXPECT_TRUE(bad(o));
  o = {};
  o.io_timeout = std::chrono::milliseconds(0);
  EXPECT_TRUE(bad(o));
}

TEST(NbdReaderOpenTest, MissingSocketIsUnavailable) {
  TempDir dir;
  auto r = NbdDeltaReader::Open(dir.path() + "/none.sock", "disk0", 0, std::nullopt);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kUnavailable) << r.status().ToString();
}

}  // namespace
}  // namespace vmreplica
