#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "logformat/log_format.h"
#include "vmreplica/logformat.h"

namespace vmreplica {
namespace {

constexpr auto Data = DataRecord;
constexpr auto Zero = ZeroRecord;

namespace fs = std::filesystem;
using namespace log;

LogHeader TwoDiskHeader() {
  LogHeader h;
  h.relationship_id = "4c3b9a2e-0d1f-4a8e-9b7c-5e6f7a8b9c0d";
  h.relationship_index = 1;
  h.sequence = 42;
  h.base_generation.fill(0xab);
  h.new_generation.fill(0xcd);
  h.cut_time_unix_ms = 1700000000123;
  h.kind = ReplicationType::kApplicationConsistent;
  h.disks = {{"vda", 64u << 20}, {"data-disk_1.raw", 1u << 30}};
  return h;
}


std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

std::string Compressible(size_t n) {
  std::string s;
  while (s.size() < n) s += "vmreplica block " + std::to_string(s.size() % 97) + "\n";
  s.resize(n);
  return s;
}

bool SameRecord(const DeltaRecord& a, const DeltaRecord& b) {
  return a.disk == b.disk && a.offset == b.offset && a.length == b.length && a.zero == b.zero && a.data == b.data;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

class LogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "logformat_test.XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string Path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  // Writes a log and answers its bytes.
  std::string WriteLog(const std::string& name, const LogHeader& header, const std::vector<DeltaRecord>& records,
                       bool compress = true) {
    LogWriterOptions options;
    options.compress = compress;
    options.sync = false;
    auto writer = LogWriter::Create(Path(name), header, options);
    EXPECT_TRUE(writer.ok()) << writer.status().ToString();
    if (!writer.ok()) return "";
    for (const DeltaRecord& r : records) EXPECT_TRUE((*writer)->Add(r).ok());
    EXPECT_TRUE((*writer)->Finish().ok());
    return ReadAll(Path(name));
  }

  std::string dir_;
};

// A small log with data (compressed and not) and zero records on two disks.
std::vector<DeltaRecord> SmallRecords() {
  return {Data(0, 4096, "abcd"), Zero(1, 0, 1 << 20), Data(1, 512, Compressible(300)),
          Data(0, 8192, RandomBytes(40, 7))};
}

// Reads everything; answers the records or the first error.
Status ReadEverything(std::unique_ptr<LogReader>& reader, std::vector<DeltaRecord>* out) {
  while (true) {
    auto next = reader->Next();
    if (!next.ok()) return next.status();
    if (!*next) return Status::Ok();
    out->push_back(std::move(**next));
  }
}

Status ReadBuffer(const std::string& bytes, LogReadMode mode, std::vector<DeltaRecord>* out = nullptr) {
  auto reader = LogReader::OpenBuffer(bytes, mode);
  if (!reader.ok()) return reader.status();
  std::vector<DeltaRecord> sink;
  VMR_RETURN_IF_ERROR(ReadEverything(*reader, out ? out : &sink));
  if (mode == LogReadMode::kComplete && !(*reader)->trailer()) return Status::Internal("no trailer and no error");
  return Status::Ok();
}

TEST_F(LogTest, RoundTripsDataZeroCompressedAndRawRecordsOnTwoDisks) {
  LogHeader header = TwoDiskHeader();
  std::vector<DeltaRecord> records = {
      Data(0, 0, Compressible(1 << 20)),         // compresses
      Data(1, 4096, RandomBytes(256 << 10, 1)),  // does not
      Zero(0, 1 << 20, 8 << 20),
      Zero(1, (1u << 30) - 4096, 4096),  // ends exactly at the disk end
      Data(0, 63u << 20, Compressible(1 << 20)),
      Data(1, 0, "x"),
  };
  std::string bytes = WriteLog("a.vrl", header, records);
  auto reader = LogReader::Open(Path("a.vrl"), LogReadMode::kComplete);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  EXPECT_EQ((*reader)->header(), header);
  std::vector<LogRecordInfo> infos;
  while (true) {
    auto next = (*reader)->NextRecord();
    ASSERT_TRUE(next.ok()) << next.status().ToString();
    if (!*next) break;
    infos.push_back(std::move(**next));
  }
  ASSERT_EQ(infos.size(), records.size());
  for (size_t i = 0; i < records.size(); ++i) EXPECT_TRUE(SameRecord(infos[i].record, records[i])) << i;
  EXPECT_EQ(infos[0].compression, LogCompression::kZstd);
  EXPECT_LT(infos[0].stored_length, 1u << 20);
  EXPECT_EQ(infos[1].compression, LogCompression::kNone);
  EXPECT_EQ(infos[1].stored_length, 256u << 10);
  EXPECT_EQ(infos[2].stored_length, 0u);
  EXPECT_EQ(infos[5].compression, LogCompression::kNone);
  ASSERT_TRUE((*reader)->trailer().has_value());
  EXPECT_EQ((*reader)->trailer()->record_count, 6u);
  EXPECT_EQ((*reader)->trailer()->data_bytes, (2u << 20) + (256u << 10) + 1);
  EXPECT_EQ((*reader)->trailer()->zero_bytes, (8u << 20) + 4096);
  EXPECT_EQ((*reader)->valid_prefix_bytes(), bytes.size());
  // The end is sticky.
  auto again = (*reader)->Next();
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->has_value());

  auto summary = VerifyLog(Path("a.vrl"));
  ASSERT_TRUE(summary.ok()) << summary.status().ToString();
  EXPECT_TRUE(summary->complete);
  EXPECT_EQ(summary->data_records, 4u);
  EXPECT_EQ(summary->zero_records, 2u);
  EXPECT_EQ(summary->compressed_records, 2u);
  EXPECT_EQ(summary->valid_bytes, bytes.size());
}

TEST_F(LogTest, CompressionOffStoresPayloadAsIs) {
  std::string bytes = WriteLog("a.vrl", TwoDiskHeader(), {Data(0, 0, Compressible(4096))}, /*compress=*/false);
  auto reader = LogReader::OpenBuffer(bytes, LogReadMode::kComplete);
  ASSERT_TRUE(reader.ok());
  auto next = (*reader)->NextRecord();
  ASSERT_TRUE(next.ok() && next->has_value());
  EXPECT_EQ((*next)->compression, LogCompression::kNone);
  EXPECT_EQ((*next)->record.data, Compressible(4096));
}

// The receiver stages the records of a wire chunk zstd did not shrink with
// try_compress false: they are stored as they are even when compression is on.
TEST_F(LogTest, RecordsAddedWithoutTryCompressAreStoredAsIs) {
  LogWriterOptions options;
  options.compress = true;
  options.sync = false;
  auto writer = LogWriter::Create(Path("b.vrl"), TwoDiskHeader(), options);
  ASSERT_TRUE(writer.ok()) << writer.status().ToString();
  ASSERT_TRUE((*writer)->Add(Data(0, 0, Compressible(4096)), /*try_compress=*/false).ok());
  ASSERT_TRUE((*writer)->Add(Data(0, 8192, Compressible(4096)), /*try_compress=*/true).ok());
  ASSERT_TRUE((*writer)->Finish().ok());
  auto reader = LogReader::OpenBuffer(ReadAll(Path("b.vrl")), LogReadMode::kComplete);
  ASSERT_TRUE(reader.ok());
  auto first = (*reader)->NextRecord();
  ASSERT_TRUE(first.ok() && first->has_value());
  EXPECT_EQ((*first)->compression, LogCompression::kNone);
  EXPECT_EQ((*first)->record.data, Compressible(4096));
  auto second = (*reader)->NextRecord();
  ASSERT_TRUE(second.ok() && second->has_value());
  EXPECT_EQ((*second)->compression, LogCompression::kZstd);
  EXPECT_EQ((*second)->record.data, Compressible(4096));
}

TEST_F(LogTest, EmptyLogHasHeaderAndTrailerOnly) {
  std::string bytes = WriteLog("a.vrl", TwoDiskHeader(), {});
  std::vector<DeltaRecord> got;
  EXPECT_TRUE(ReadBuffer(bytes, LogReadMode::kComplete, &got).ok());
  EXPECT_TRUE(got.empty());
}

// Partial mode: every prefix of a valid log reads as the records that are
// whole in it, never an error, never garbage.
TEST_F(LogTest, TruncatedAtEveryOffsetReadsAsCleanPrefixInPartialMode) {
  std::vector<DeltaRecord> records = SmallRecords();
  std::string bytes = WriteLog("a.vrl", TwoDiskHeader(), records);
  // Record boundaries, from a full read.
  std::vector<uint64_t> ends;
  uint64_t header_length = 0;
  {
    auto reader = LogReader::OpenBuffer(bytes, LogReadMode::kComplete);
    ASSERT_TRUE(reader.ok());
    header_length = (*reader)->valid_prefix_bytes();
    while (true) {
      auto next = (*reader)->Next();
      ASSERT_TRUE(next.ok());
      if (!*next) break;
      ends.push_back((*reader)->valid_prefix_bytes());
    }
  }
  ASSERT_EQ(ends.size(), records.size());
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    SCOPED_TRACE("cut at " + std::to_string(cut));
    auto reader = LogReader::OpenBuffer(bytes.substr(0, cut), LogReadMode::kPartial);
    if (cut < header_length) {
      ASSERT_FALSE(reader.ok());
      EXPECT_EQ(reader.status().code(), Code::kUnavailable) << reader.status().ToString();
      continue;
    }
    ASSERT_TRUE(reader.ok()) << reader.status().ToString();
    std::vector<DeltaRecord> got;
    Status s = ReadEverything(*reader, &got);
    ASSERT_TRUE(s.ok()) << s.ToString();
    size_t whole = 0;
    while (whole < ends.size() && ends[whole] <= cut) ++whole;
    ASSERT_EQ(got.size(), whole);
    for (size_t i = 0; i < whole; ++i) EXPECT_TRUE(SameRecord(got[i], records[i]));
    EXPECT_EQ((*reader)->valid_prefix_bytes(), whole ? ends[whole - 1] : header_length);
    EXPECT_FALSE((*reader)->trailer().has_value());
  }
  // The whole file in partial mode reads to its trailer.
  std::vector<DeltaRecord> got;
  EXPECT_TRUE(ReadBuffer(bytes, LogReadMode::kPartial, &got).ok());
  EXPECT_EQ(got.size(), records.size());
}

TEST_F(LogTest, TruncatedAtEveryOffsetIsCorruptionInCompleteMode) {
  std::string bytes = WriteLog("a.vrl", TwoDiskHeader(), SmallRecords());
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    Status s = ReadBuffer(bytes.substr(0, cut), LogReadMode::kComplete);
    EXPECT_EQ(s.code(), Code::kCorruption) << "cut at " << cut << ": " << s.ToString();
  }
  EXPECT_TRUE(ReadBuffer(bytes, LogReadMode::kComplete).ok());
}

// The same through files, for a few cuts (the buffer and file inputs share
// the parser; this covers the file input).
TEST_F(LogTest, TruncatedFileOnDiskBehavesLikeBuffer) {
  std::string bytes = WriteLog("a.vrl", TwoDiskHeader(), SmallRecords());
  for (size_t cut : {size_t{0}, size_t{5}, bytes.size() / 2, bytes.size() - 1}) {
    WriteAll(Path("cut.vrl"), bytes.substr(0, cut));
    auto summary = VerifyLog(Path("cut.vrl"), LogReadMode::kComplete);
    EXPECT_EQ(summary.status().code(), Code::kCorruption) << cut;
    auto partial = VerifyLog(Path("cut.vrl"), LogReadMode::kPartial);
    if (partial.ok()) {
      EXPECT_FALSE(partial->complete);
    } else {
      EXPECT_EQ(partial.status().code(), Code::kUnavailable) << cut;
    }
  }
}

TEST_F(LogTest, EveryFlippedByteIsCorruption) {
  std::string bytes = WriteLog("a.vrl", TwoDiskHeader(), SmallRecords());
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (char mask : {char(0x01), char(0x80), char(0xff)}) {
      std::string bad = bytes;
      bad[i] ^= mask;
      Status s = ReadBuffer(bad, LogReadMode::kComplete);
      EXPECT_EQ(s.code(), Code::kCorruption) << "byte " << i << ": " << s.ToString();
      Status p = ReadBuffer(bad, LogReadMode::kPartial);
      // In partial mode a grown header length reads as "not all here yet";
      // everything else is corruption.
      if (i >= 12 && i < 16) {
        EXPECT_TRUE(p.code() == Code::kCorruption || p.code() == Code::kUnavailable) << i << ": " << p.ToString();
      } else {
        EXPECT_EQ(p.code(), Code::kCorruption) << "byte " << i << ": " << p.ToString();
      }
    }
  }
}

// Byte ranges of the records of a log.
std::vector<std::pair<uint64_t, uint64_t>> RecordRanges(const std::string& bytes) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  auto reader = LogReader::OpenBuffer(bytes, LogReadMode::kComplete);
  EXPECT_TRUE(reader.ok());
  if (!reader.ok()) return out;
  while (true) {
    auto next = (*reader)->NextRecord();
    EXPECT_TRUE(next.ok());
    if (!next.ok() || !*next) break;
    out.emplace_back((*next)->file_offset, (*reader)->valid_prefix_bytes());
  }
  return out;
}

TEST_F(LogTest, DroppedRecordIsCaughtByTrailer) {
  std::string bytes = WriteLog("a.vrl", TwoDiskHeader(), SmallRecords());
  auto ranges = RecordRanges(bytes);
  for (auto [begin, end] : ranges) {
    std::string bad = bytes.substr(0, begin) + bytes.substr(end);
    Status s = ReadBuffer(bad, LogReadMode::kComplete);
    EXPECT_EQ(s.code(), Code::kCorruption) << s.ToString();
    EXPECT_NE(s.message().find("trailer"), std::string::npos) << s.ToString();
  }
}

TEST_F(LogTest, ReorderedRecordsAreCaughtByTrailerChain) {
  // Same counts and sizes, other order: only the chain can tell.
  std::string bytes = WriteLog("a.vrl", TwoDiskHeader(), {Data(0, 0, "aaaa"), Data(0, 8, "bbbb")});
  auto ranges = RecordRanges(bytes);
  ASSERT_EQ(ranges.size(), 2u);
  std::string first = bytes.substr(ranges[0].first, ranges[0].second - ranges[0].first);
  std::string second = bytes.substr(ranges[1].first, ranges[1].second - ranges[1].first);
  std::string bad = bytes.substr(0, ranges[0].first) + second + first + bytes.substr(ranges[1].second);
  ASSERT_EQ(bad.size(), bytes.size());
  Status s = ReadBuffer(bad, LogReadMode::kComplete);
  EXPECT_EQ(s.code(), Code::kCorruption);
  EXPECT_NE(s.message().find("chain"), std::string::npos) << s.ToString();
}

TEST_F(LogTest, RecordFromAnotherLogIsCaughtByTrailerChain) {
  LogHeader other = TwoDiskHeader();
  other.sequence = 43;
  std::string a = WriteLog("a.vrl", TwoDiskHeader(), {Data(0, 0, "aaaa")});
  std::string b = WriteLog("b.vrl", other, {Data(0, 0, "aaaa")});
  // Header of b, record and trailer of a: the chain starts at the header checksum.
  auto ra = RecordRanges(a);
  auto rb = RecordRanges(b);
  std::string spliced = b.substr(0, rb[0].first) + a.substr(ra[0].first);
  Status s = ReadBuffer(spliced, LogReadMode::kComplete);
  EXPECT_EQ(s.code(), Code::kCorruption);
  EXPECT_NE(s.message().find("chain"), std::string::npos) << s.ToString();
}

// Builds a record header block with valid checksums (payload checksum over
// `payload`), as a malicious or buggy writer could.
std::string ForgedRecord(uint8_t type, uint8_t compression, uint32_t disk, uint64_t offset, uint64_t length,
                         uint32_t stored_length, std::string_view payload = {}) {
  std::string b;
  b.push_back(static_cast<char>(type));
  b.push_back(static_cast<char>(compression));
  PutU16(&b, 0);
  PutU32(&b, disk);
  PutU64(&b, offset);
  PutU64(&b, length);
  PutU32(&b, stored_length);
  PutU32(&b, 0);
  PutU64(&b, Checksum2(b, payload));
  PutU64(&b, Checksum(b));
  return b + std::string(payload);
}

std::string HeaderBytes(const LogHeader& h) { return EncodeHeader(h); }

TEST_F(LogTest, OversizeLengthIsRefusedBeforeReadingThePayload) {
  std::string header = HeaderBytes(TwoDiskHeader());
  // 1 GiB data record (disk 1 is 1 GiB): over the 64 MiB limit. No payload
  // follows; the answer must be the bound, not a truncated payload.
  Status s = ReadBuffer(header + ForgedRecord(kTypeData, 0, 1, 0, 1u << 30, 0), LogReadMode::kComplete);
  EXPECT_EQ(s.code(), Code::kCorruption);
  EXPECT_NE(s.message().find("over the limit"), std::string::npos) << s.ToString();
  // Stored length larger than the length.
  s = ReadBuffer(header + ForgedRecord(kTypeData, 0, 0, 0, 16, 0xffffffffu), LogReadMode::kPartial);
  EXPECT_EQ(s.code(), Code::kCorruption) << s.ToString();
  s = ReadBuffer(header + ForgedRecord(kTypeData, 1, 0, 0, 16, 0xffffffffu), LogReadMode::kPartial);
  EXPECT_EQ(s.code(), Code::kCorruption) << s.ToString();
  // A zero record claiming a payload.
  s = ReadBuffer(header + ForgedRecord(kTypeZero, 0, 0, 0, 16, 16, std::string(16, 'z')), LogReadMode::kPartial);
  EXPECT_EQ(s.code(), Code::kCorruption) << s.ToString();
  // Unknown type and compression.
  s = ReadBuffer(header + ForgedRecord(9, 0, 0, 0, 4, 4, "abcd"), LogReadMode::kPartial);
  EXPECT_EQ(s.code(), Code::kCorruption) << s.ToString();
  s = ReadBuffer(header + ForgedRecord(kTypeData, 7, 0, 0, 4, 3, "abc"), LogReadMode::kPartial);
  EXPECT_EQ(s.code(), Code::kCorruption) << s.ToString();
}

TEST_F(LogTest, ZstdPayloadThatLiesAboutItsSizeIsCorruption) {
  std::string header = HeaderBytes(TwoDiskHeader());
  std::string plain = Compressible(8192);
  // A valid zstd frame of 8192 bytes declared as a 4096-byte record.
  std::string bytes = WriteLog("a.vrl", TwoDiskHeader(), {Data(0, 0, plain)});
  auto reader = LogReader::OpenBuffer(bytes, LogReadMode::kComplete);
  ASSERT_TRUE(reader.ok());
  auto rec = (*reader)->NextRecord();
  ASSERT_TRUE(rec.ok() && rec->has_value());
  ASSERT_EQ((*rec)->compression, LogCompression::kZstd);
  std::string frame = bytes.substr((*rec)->file_offset + kBlockSize, (*rec)->stored_length);
  Status s = ReadBuffer(header + ForgedRecord(kTypeData, 1, 0, 0, 4096, frame.size(), frame), LogReadMode::kPartial);
  EXPECT_EQ(s.code(), Code::kCorruption);
  EXPECT_NE(s.message().find("zstd"), std::string::npos) << s.ToString();
  // Garbage that claims to be zstd.
  std::string junk = RandomBytes(100, 3);
  s = ReadBuffer(header + ForgedRecord(kTypeData, 1, 0, 0, 4096, junk.size(), junk), LogReadMode::kPartial);
  EXPECT_EQ(s.code(), Code::kCorruption) << s.ToString();
}

TEST_F(LogTest, ExtentBeyondDiskSizeIsRefused) {
  std::string header = HeaderBytes(TwoDiskHeader());
  const uint64_t size = 64u << 20;  // disk 0
  for (auto [offset, length] : std::vector<std::pair<uint64_t, uint64_t>>{
           {size, 1}, {size - 1, 2}, {UINT64_MAX, 2}, {1, UINT64_MAX}, {0, size + 1}}) {
    Status s = ReadBuffer(header + ForgedRecord(kTypeZero, 0, 0, offset, length, 0), LogReadMode::kPartial);
    EXPECT_EQ(s.code(), Code::kCorruption) << offset << "+" << length;
    EXPECT_NE(s.message().find("beyond"), std::string::npos) << s.ToString();
  }
  Status ok = ReadBuffer(header + ForgedRecord(kTypeZero, 0, 0, size - 1, 1, 0), LogReadMode::kPartial);
  EXPECT_TRUE(ok.ok()) << ok.ToString();
  Status bad_disk = ReadBuffer(header + ForgedRecord(kTypeZero, 0, 2, 0, 1, 0), LogReadMode::kPartial);
  EXPECT_EQ(bad_disk.code(), Code::kCorruption);

  LogWriterOptions options;
  options.sync = false;
  auto writer = LogWriter::Create(Path("w.vrl"), TwoDiskHeader(), options);
  ASSERT_TRUE(writer.ok());
  EXPECT_EQ((*writer)->Add(Zero(0, size, 1)).code(), Code::kInvalidArgument);
  EXPECT_EQ((*writer)->Add(Zero(0, UINT64_MAX, 2)).code(), Code::kInvalidArgument);
  EXPECT_EQ((*writer)->Add(Zero(2, 0, 1)).code(), Code::kInvalidArgument);
  EXPECT_EQ((*writer)->Add(Zero(0, 0, 0)).code(), Code::kInvalidArgument);
  EXPECT_EQ((*writer)->Add(Data(0, size - 2, "abc")).code(), Code::kInvalidArgument);
  DeltaRecord mismatch = Data(0, 0, "abc");
  mismatch.length = 4;
  EXPECT_EQ((*writer)->Add(mismatch).code(), Code::kInvalidArgument);
  EXPECT_TRUE((*writer)->Add(Zero(0, 0, size)).ok());  // whole disk
  EXPECT_TRUE((*writer)->Finish().ok());
}

TEST_F(LogTest, DataRecordOverLimitIsRefusedByWriter) {
  LogHeader h = TwoDiskHeader();
  LogWriterOptions options;
  options.sync = false;
  auto writer = LogWriter::Create(Path("w.vrl"), h, options);
  ASSERT_TRUE(writer.ok());
  Status s = (*writer)->Add(Data(1, 0, std::string(kLogMaxDataRecordLength + 1, 'x')));
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_TRUE((*writer)->Add(Data(1, 0, std::string(kLogMaxDataRecordLength, 'x'))).ok());
  EXPECT_TRUE((*writer)->Finish().ok());
  auto summary = VerifyLog(Path("w.vrl"));
  ASSERT_TRUE(summary.ok()) << summary.status().ToString();
  EXPECT_EQ(summary->trailer.data_bytes, kLogMaxDataRecordLength);
}

// Re-signs a header after editing its fixed fields.
std::string Resign(std::string header) {
  header.resize(header.size() - 8);
  PutU64(&header, Checksum(header));
  return header;
}

TEST_F(LogTest, UnknownVersionIsNotSupported) {
  std::string bytes = WriteLog("a.vrl", TwoDiskHeader(), {Data(0, 0, "abcd")});
  uint32_t header_length = GetU32(bytes.data() + 12);
  std::string header = bytes.substr(0, header_length);
  header[8] = 2;
  std::string v2 = Resign(header) + bytes.substr(header_length);
  auto reader = LogReader::OpenBuffer(v2, LogReadMode::kComplete);
  ASSERT_FALSE(reader.ok());
  EXPECT_EQ(reader.status().code(), Code::kNotSupported) << reader.status().ToString();
  // A future version with a header length this version does not allow.
  std::string big = bytes;
  big[8] = 3;
  PutU32(&big, 0);  // (unused tail)
  big.replace(12, 4, std::string("\xff\xff\x00\x00", 4));
  reader = LogReader::OpenBuffer(big, LogReadMode::kComplete);
  ASSERT_FALSE(reader.ok());
  EXPECT_EQ(reader.status().code(), Code::kNotSupported);
  // Unknown header flags in version 1 (validly signed) are corruption.
  header = bytes.substr(0, header_length);
  header[16] = 1;
  reader = LogReader::OpenBuffer(Resign(header) + bytes.substr(header_length), LogReadMode::kComplete);
  EXPECT_EQ(reader.status().code(), Code::kCorruption);
}

TEST_F(LogTest, BadMagicIsCorruptionInBothModes) {
  std::string bytes = WriteLog("a.vrl", TwoDiskHeader(), {});
  bytes[0] = 'X';
  EXPECT_EQ(LogReader::OpenBuffer(bytes, LogReadMode::kPartial).status().code(), Code::kCorruption);
  EXPECT_EQ(LogReader::OpenBuffer("VMRX", LogReadMode::kPartial).status().code(), Code::kCorruption);
  EXPECT_EQ(LogReader::OpenBuffer("VMRD", LogReadMode::kPartial).status().code(), Code::kUnavailable);
}

TEST_F(LogTest, BytesAfterTrailerAreCorruption) {
  std::string bytes = WriteLog("a.vrl", TwoDiskHeader(), {Data(0, 0, "abcd")});
  EXPECT_EQ(ReadBuffer(bytes + "x", LogReadMode::kComplete).code(), Code::kCorruption);
  EXPECT_EQ(ReadBuffer(bytes + "x", LogReadMode::kPartial).code(), Code::kCorruption);
}

TEST_F(LogTest, ZeroFilledTailIsEndInPartialModeOnly) {
  LogWriterOptions options;
  options.sync = false;
  auto writer = LogWriter::Create(Path("a.vrl"), TwoDiskHeader(), options);
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE((*writer)->Add(Data(0, 0, "abcd")).ok());
  std::string bytes = ReadAll(Path("a.vrl"));
  std::string padded = bytes + std::string(4096, '\0');
  std::vector<DeltaRecord> got;
  auto reader = LogReader::OpenBuffer(padded, LogReadMode::kPartial);
  ASSERT_TRUE(reader.ok());
  EXPECT_TRUE(ReadEverything(*reader, &got).ok());
  EXPECT_EQ(got.size(), 1u);
  EXPECT_EQ((*reader)->valid_prefix_bytes(), bytes.size());
  EXPECT_EQ(ReadBuffer(padded, LogReadMode::kComplete).code(), Code::kCorruption);
  (*writer)->Abandon();
}

TEST_F(LogTest, PartialReaderFollowsAGrowingFile) {
  LogWriterOptions options;
  options.sync = false;
  auto writer = LogWriter::Create(Path("a.vrl"), TwoDiskHeader(), options);
  ASSERT_TRUE(writer.ok());
  auto reader = LogReader::Open(Path("a.vrl"), LogReadMode::kPartial);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  std::vector<DeltaRecord> records = SmallRecords();
  for (const DeltaRecord& r : records) {
    auto none = (*reader)->Next();
    ASSERT_TRUE(none.ok());
    EXPECT_FALSE(none->has_value());
    ASSERT_TRUE((*writer)->Add(r).ok());
    auto next = (*reader)->Next();
    ASSERT_TRUE(next.ok()) << next.status().ToString();
    ASSERT_TRUE(next->has_value());
    EXPECT_TRUE(SameRecord(**next, r));
    EXPECT_EQ((*reader)->valid_prefix_bytes(), (*writer)->bytes_written());
  }
  ASSERT_TRUE((*writer)->Finish().ok());
  auto end = (*reader)->Next();
  ASSERT_TRUE(end.ok());
  EXPECT_FALSE(end->has_value());
  EXPECT_TRUE((*reader)->trailer().has_value());
}

TEST_F(LogTest, ReopenContinuesAfterTheLastWholeRecord) {
  std::vector<DeltaRecord> records = SmallRecords();
  std::string full = WriteLog("full.vrl", TwoDiskHeader(), records);
  auto ranges = RecordRanges(full);
  ASSERT_EQ(ranges.size(), records.size());
  LogWriterOptions options;
  options.sync = false;
  // Cut inside record 2 (as a crash mid-write would): records 0 and 1 stay.
  for (uint64_t cut : {ranges[2].first, ranges[2].first + 1, ranges[2].second - 1}) {
    SCOPED_TRACE(cut);
    WriteAll(Path("r.vrl"), full.substr(0, cut));
    auto writer = LogWriter::Reopen(Path("r.vrl"), options);
    ASSERT_TRUE(writer.ok()) << writer.status().ToString();
    EXPECT_EQ((*writer)->bytes_written(), ranges[2].first);
    EXPECT_EQ((*writer)->record_count(), 2u);
    for (size_t i = 2; i < records.size(); ++i) ASSERT_TRUE((*writer)->Add(records[i]).ok());
    ASSERT_TRUE((*writer)->Finish().ok());
    EXPECT_EQ(ReadAll(Path("r.vrl")), full);
    fs::remove(Path("r.vrl"));
  }
  // Nothing to continue.
  WriteAll(Path("h.vrl"), full.substr(0, 20));
  EXPECT_EQ(LogWriter::Reopen(Path("h.vrl"), options).status().code(), Code::kUnavailable);
  EXPECT_EQ(LogWriter::Reopen(Path("full.vrl"), options).status().code(), Code::kFailedPrecondition);
  std::string bad = full.substr(0, ranges[2].first);
  bad[ranges[0].first + 50] ^= 1;  // payload of record 0
  WriteAll(Path("bad.vrl"), bad);
  EXPECT_EQ(LogWriter::Reopen(Path("bad.vrl"), options).status().code(), Code::kCorruption);
}

TEST_F(LogTest, WriterRefusesInvalidHeaders) {
  LogWriterOptions options;
  options.sync = false;
  auto bad = [&](auto edit) {
    LogHeader h = TwoDiskHeader();
    edit(h);
    auto w = LogWriter::Create(Path("h.vrl"), h, options);
    EXPECT_FALSE(fs::exists(Path("h.vrl")));
    return w.status().code();
  };
  EXPECT_EQ(bad([](LogHeader& h) { h.disks.clear(); }), Code::kInvalidArgument);
  EXPECT_EQ(bad([](LogHeader& h) { h.disks.resize(kLogMaxDisks + 1, {"d", 1}); }), Code::kInvalidArgument);
  EXPECT_EQ(bad([](LogHeader& h) { h.disks[0].name = "../etc"; }), Code::kInvalidArgument);
  EXPECT_EQ(bad([](LogHeader& h) { h.disks[0].name = ".hidden"; }), Code::kInvalidArgument);
  EXPECT_EQ(bad([](LogHeader& h) { h.disks[0].name = "a/b"; }), Code::kInvalidArgument);
  EXPECT_EQ(bad([](LogHeader& h) { h.disks[0].name = std::string(256, 'a'); }), Code::kInvalidArgument);
  EXPECT_EQ(bad([](LogHeader& h) { h.disks[1].name = h.disks[0].name; }), Code::kInvalidArgument);
  EXPECT_EQ(bad([](LogHeader& h) { h.disks[0].size_bytes = 0; }), Code::kInvalidArgument);
  EXPECT_EQ(bad([](LogHeader& h) { h.relationship_id = ""; }), Code::kInvalidArgument);
  EXPECT_EQ(bad([](LogHeader& h) { h.relationship_id = std::string(65, 'a'); }), Code::kInvalidArgument);
  EXPECT_EQ(bad([](LogHeader& h) { h.relationship_id = "with space"; }), Code::kInvalidArgument);
  EXPECT_EQ(bad([](LogHeader& h) { h.kind = ReplicationType::kNone; }), Code::kInvalidArgument);
  // Largest header: 64 disks with 255-byte names.
  LogHeader big = TwoDiskHeader();
  big.relationship_id = std::string(64, 'r');
  big.disks.clear();
  for (int i = 0; i < 64; ++i) big.disks.push_back({std::string(253, 'd') + std::to_string(10 + i), 1});
  std::string bytes = WriteLog("big.vrl", big, {Zero(63, 0, 1)});
  EXPECT_EQ(GetU32(bytes.data() + 12), kMaxHeaderSize);
  auto reader = LogReader::OpenBuffer(bytes, LogReadMode::kComplete);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  EXPECT_EQ((*reader)->header(), big);
}

TEST_F(LogTest, CreateRefusesExistingFileAbandonRemovesItDestructorKeepsIt) {
  WriteAll(Path("x.vrl"), "keep");
  LogWriterOptions options;
  options.sync = false;
  EXPECT_EQ(LogWriter::Create(Path("x.vrl"), TwoDiskHeader(), options).status().code(), Code::kAlreadyExists);
  EXPECT_EQ(ReadAll(Path("x.vrl")), "keep");
  {
    auto w = LogWriter::Create(Path("y.vrl"), TwoDiskHeader(), options);
    ASSERT_TRUE(w.ok());
    EXPECT_TRUE(fs::exists(Path("y.vrl")));
    (*w)->Abandon();
    EXPECT_FALSE(fs::exists(Path("y.vrl")));
    EXPECT_EQ((*w)->Add(Zero(0, 0, 1)).code(), Code::kFailedPrecondition);
    EXPECT_EQ((*w)->Finish().code(), Code::kFailedPrecondition);
    (*w)->Abandon();
  }
  {
    auto w = LogWriter::Create(Path("z.vrl"), TwoDiskHeader(), options);
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->Add(Zero(0, 0, 1)).ok());
  }  // destroyed unfinished: kept, without trailer, and can be continued
  EXPECT_EQ(VerifyLog(Path("z.vrl")).status().code(), Code::kCorruption);
  auto partial = VerifyLog(Path("z.vrl"), LogReadMode::kPartial);
  ASSERT_TRUE(partial.ok());
  EXPECT_FALSE(partial->complete);
  EXPECT_EQ(partial->zero_records, 1u);
  {
    auto w = LogWriter::Reopen(Path("z.vrl"), options);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    ASSERT_TRUE((*w)->Finish().ok());
  }
  EXPECT_TRUE(VerifyLog(Path("z.vrl")).ok());
  {
    auto w = LogWriter::Create(Path("f.vrl"), TwoDiskHeader());  // with sync
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->Finish().ok());
    EXPECT_EQ((*w)->Finish().code(), Code::kFailedPrecondition);
    (*w)->Abandon();  // no effect once finished
  }
  EXPECT_TRUE(VerifyLog(Path("f.vrl")).ok());
}

TEST_F(LogTest, MissingFileIsNotFound) {
  EXPECT_EQ(LogReader::Open(Path("none.vrl"), LogReadMode::kComplete).status().code(), Code::kNotFound);
}

// Writes a few valid logs as a seed corpus for fuzz/log_reader_fuzzer.cc
// when VMREPLICA_LOG_SEED_DIR names a directory.
TEST_F(LogTest, WritesFuzzSeedCorpus) {
  const char* seed_dir = std::getenv("VMREPLICA_LOG_SEED_DIR");
  if (seed_dir == nullptr) GTEST_SKIP() << "VMREPLICA_LOG_SEED_DIR not set";
  LogHeader one_disk = TwoDiskHeader();
  one_disk.disks.resize(1);
  std::vector<std::pair<std::string, std::string>> seeds = {
      {"small", WriteLog("s1", TwoDiskHeader(), SmallRecords())},
      {"empty", WriteLog("s2", one_disk, {})},
      {"zeros", WriteLog("s3", one_disk, {Zero(0, 0, 1), Zero(0, 4096, 65536)})},
      {"raw", WriteLog("s4", TwoDiskHeader(), {Data(1, 0, RandomBytes(64, 5)), Data(0, 7, "z")}, false)},
      {"zstd", WriteLog("s5", one_disk, {Data(0, 0, Compressible(2048))})},
  };
  for (const auto& [name, bytes] : seeds) {
    ASSERT_FALSE(bytes.empty());
    WriteAll(std::string(seed_dir) + "/" + name + ".vrl", bytes);
  }
}

// docs/log_format.md shows this log as a hex dump; keep them in step.
std::string HexDump(const std::string& bytes) {
  std::string out;
  char buf[32];
  for (size_t i = 0; i < bytes.size(); i += 16) {
    std::snprintf(buf, sizeof(buf), "%08zx ", i);
    out += buf;
    for (size_t j = i; j < std::min(bytes.size(), i + 16); ++j) {
      std::snprintf(buf, sizeof(buf), " %02x", static_cast<unsigned char>(bytes[j]));
      out += buf;
    }
    out += "\n";
  }
  return out;
}

TEST_F(LogTest, WorkedExampleMatchesDoc) {
  LogHeader h;
  h.relationship_id = "vm-1";
  h.sequence = 7;
  h.base_generation.fill(0x11);
  h.new_generation.fill(0x22);
  h.cut_time_unix_ms = 1700000000000;
  h.kind = ReplicationType::kRegular;
  h.disks = {{"vda", 1 << 20}};
  std::string bytes = WriteLog("example.vrl", h, {Data(0, 4096, "abcd"), Zero(0, 0, 8192)});
  std::string dump = HexDump(bytes);
  std::string doc = ReadAll(std::string(VMREPLICA_SOURCE_DIR) + "/docs/log_format.md");
  size_t section = doc.find("## Worked example");
  ASSERT_NE(section, std::string::npos);
  size_t begin = doc.find("```\n", section);
  ASSERT_NE(begin, std::string::npos);
  begin += 4;
  size_t end = doc.find("```", begin);
  ASSERT_NE(end, std::string::npos);
  EXPECT_EQ(doc.substr(begin, end - begin), dump) << "size " << bytes.size() << "\n" << dump;
}

}  // namespace
}  // namespace vmreplica
