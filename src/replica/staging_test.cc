#include "vmreplica/staging.h"

#include <gtest/gtest.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>

#include "vmreplica/fileutil.h"

namespace vmreplica {
namespace {

namespace fs = std::filesystem;
const std::string kVm = "vm-1";
constexpr uint64_t kDiskA = 64 * 1024;
constexpr uint64_t kDiskB = 32 * 1024;
constexpr uint64_t kHeaderLengthOffset = 12;  // docs/log_format.md, grammar
constexpr uint64_t kRecordHeaderBytes = 48;

using Image = std::vector<std::string>;  // one string per disk

std::string Bytes(char c, size_t n) {
  std::string s(n, c);
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(c + static_cast<char>(i % 5));
  return s;
}

// The three deltas of the happy path, and the images they must produce.
std::vector<DeltaRecord> Delta(uint64_t seq) {
  switch (seq) {
    case 1:
      return {DataRecord(0, 0, Bytes('a', 8192)), DataRecord(1, 4096, Bytes('b', 100)),
              DataRecord(0, 60000, Bytes('c', 5536))};
    case 2:
      return {ZeroRecord(0, 4096, 4096), DataRecord(1, 4100, Bytes('d', 10)), DataRecord(0, 20000, Bytes('e', 3))};
    case 3:
      return {DataRecord(1, 0, Bytes('f', 32768)), ZeroRecord(0, 61000, 1000)};
    default:
      return {DataRecord(0, 0, Bytes('x', 4096)), DataRecord(1, 0, Bytes('y', 4096))};
  }
}

void ApplyToImage(const std::vector<DeltaRecord>& recs, Image* img) {
  for (const DeltaRecord& r : recs) {
    if (r.zero) {
      (*img)[r.disk].replace(r.offset, r.length, std::string(r.length, '\0'));
    } else {
      (*img)[r.disk].replace(r.offset, r.length, r.data);
    }
  }
}

Image Expected(uint64_t upto) {
  Image img{std::string(kDiskA, '\0'), std::string(kDiskB, '\0')};
  for (uint64_t s = 1; s <= upto; ++s) ApplyToImage(Delta(s), &img);
  return img;
}

LogHeader Header(uint64_t seq) {
  LogHeader h;
  h.relationship_id = kVm;
  h.sequence = seq;
  h.base_generation.fill(static_cast<uint8_t>(seq - 1));
  h.new_generation.fill(static_cast<uint8_t>(seq));
  h.new_generation[0] = 0xab;
  h.cut_time_unix_ms = 1700000000000 + seq * 1000;
  h.kind = seq == 2 ? ReplicationType::kApplicationConsistent : ReplicationType::kRegular;
  h.disks = {{"vda", kDiskA}, {"vdb", kDiskB}};
  return h;
}

// Offset of the first payload byte of record `index` of a log of `recs`
// written without compression.
uint64_t PayloadOffset(const std::string& path, const std::vector<DeltaRecord>& recs, size_t index) {
  auto bytes = ReadFile(path);
  EXPECT_TRUE(bytes.ok());
  uint32_t header_length = 0;
  std::memcpy(&header_length, bytes->data() + kHeaderLengthOffset, 4);
  uint64_t off = header_length;
  for (size_t i = 0; i < index; ++i) off += kRecordHeaderBytes + (recs[i].zero ? 0 : recs[i].length);
  return off + kRecordHeaderBytes;
}

void FlipByte(const std::string& path, uint64_t offset) {
  auto bytes = ReadFile(path);
  ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
  ASSERT_LT(offset, bytes->size());
  (*bytes)[offset] = static_cast<char>((*bytes)[offset] ^ 0x40);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << *bytes;
}

LogWriterOptions WriterOptions() {
  LogWriterOptions o;
  o.compress = false;  // so the tests know where a payload is
  o.sync = false;
  return o;
}

// Writes a complete log outside the staging area.
void WriteLog(const std::string& path, uint64_t seq, const std::vector<DeltaRecord>& recs) {
  auto w = LogWriter::Create(path, Header(seq), WriterOptions());
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  for (const DeltaRecord& r : recs) ASSERT_TRUE((*w)->Add(r).ok());
  ASSERT_TRUE((*w)->Finish().ok());
}

// Records from a vector.
class VectorRecords : public DeltaSource {
 public:
  explicit VectorRecords(std::vector<DeltaRecord> recs) : recs_(std::move(recs)) {}
  Result<std::optional<DeltaRecord>> Next() override {
    if (i_ == recs_.size()) return std::optional<DeltaRecord>();
    return std::optional<DeltaRecord>(recs_[i_++]);
  }

 private:
  std::vector<DeltaRecord> recs_;
  size_t i_ = 0;
};

class StagingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmr-staging-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    store_dir_ = dir_ + "/vm";
    ReplicaStoreOptions o;
    o.now_ms = [] { return int64_t{1700000000000} + 10000; };  // every point in the fine window
    auto s = ReplicaStore::Create(store_dir_, kVm, {{"vda", kDiskA}, {"vdb", kDiskB}}, nullptr, o);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    store_ = std::move(s).value();
    auto c = Catalog::Open(dir_ + "/catalog.db");
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    catalog_ = std::move(c).value();
    ASSERT_TRUE(catalog_->PutVm({kVm, "vm", ReplicationMode::kReplica, "{}", 1}).ok());
    OpenStaging();
  }
  void TearDown() override {
    staging_.reset();
    store_.reset();
    catalog_.reset();
    fs::remove_all(dir_);
  }
  void OpenStaging() {
    staging_.reset();
    StagingOptions o;
    o.writer = WriterOptions();
    o.catalog = catalog_.get();
    auto st = Staging::Open(store_dir_ + "/staging", *store_, o);
    ASSERT_TRUE(st.ok()) << st.status().ToString();
    staging_ = std::move(st).value();
  }
  Status Receive(uint64_t seq, const std::vector<DeltaRecord>& recs) {
    auto w = staging_->BeginReceive(Header(seq));
    if (!w.ok()) return w.status();
    for (const DeltaRecord& r : recs) VMR_RETURN_IF_ERROR((*w)->Add(r));
    VMR_RETURN_IF_ERROR((*w)->Finish());
    return staging_->CommitReceived(seq);
  }
  Image ReadImage() {
    Image img;
    uint64_t latest = store_->latest_sequence();
    for (uint32_t d = 0; d < 2; ++d) {
      std::string buf(d == 0 ? kDiskA : kDiskB, '\0');
      Status st = store_->ReadPoint(latest, d, 0, buf.size(), buf.data());
      EXPECT_TRUE(st.ok()) << st.ToString();
      img.push_back(std::move(buf));
    }
    return img;
  }
  std::vector<std::string> Files(const std::string& dir) {
    std::vector<std::string> out;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      if (e.is_regular_file()) out.push_back(e.path().filename().string());
    }
    std::sort(out.begin(), out.end());
    return out;
  }
  std::string PartPath(uint64_t seq) { return staging_->LogPath(seq) + ".part"; }
  // The catalog's staged_logs rows as "<seq>:<state>:<file>", checking each
  // row's size against its file.
  std::vector<std::string> Rows() {
    std::vector<std::string> out;
    auto rows = catalog_->ListStagedLogs(kVm);
    EXPECT_TRUE(rows.ok()) << rows.status().ToString();
    if (!rows.ok()) return out;
    for (const StagedLogRecord& r : *rows) {
      std::error_code ec;
      uint64_t size = fs::file_size(staging_->dir() + "/" + r.file_name, ec);
      EXPECT_FALSE(ec) << r.file_name;
      EXPECT_EQ(size, r.size_bytes) << r.file_name;
      EXPECT_GT(r.received_ms, 0);
      out.push_back(std::to_string(r.sequence) + ":" + (r.state == StagedLogState::kStaged ? "staged" : "rejected") +
                    ":" + r.file_name);
    }
    return out;
  }

  std::string dir_, store_dir_;
  std::unique_ptr<Catalog> catalog_;
  std::unique_ptr<ReplicaStore> store_;
  std::unique_ptr<Staging> staging_;
};

using RowList = std::vector<std::string>;

TEST_F(StagingTest, StagedLogsApplyInSequence) {
  for (uint64_t s = 1; s <= 3; ++s) ASSERT_TRUE(Receive(s, Delta(s)).ok()) << s;
  EXPECT_EQ(Files(staging_->dir()), (std::vector<std::string>{"00000000000000000001.vrl", "00000000000000000002.vrl",
                                                              "00000000000000000003.vrl"}));
  EXPECT_EQ(store_->latest_sequence(), 0u);  // staged is not applied
  EXPECT_EQ(Rows(), (RowList{"1:staged:00000000000000000001.vrl", "2:staged:00000000000000000002.vrl",
                          "3:staged:00000000000000000003.vrl"}));

  auto n = staging_->ApplyReady(*store_);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 3u);
  EXPECT_EQ(store_->latest_sequence(), 3u);
  EXPECT_TRUE(ReadImage() == Expected(3));
  EXPECT_TRUE(Files(staging_->dir()).empty());
  EXPECT_TRUE(Rows().empty());

  // Spot checks of the expected image itself.
  Image img = ReadImage();
  EXPECT_EQ(img[0].substr(0, 4), "abcd");
  EXPECT_EQ(img[0].substr(4096, 4096), std::string(4096, '\0'));
  EXPECT_EQ(img[0].substr(20000, 3), "efg");
  EXPECT_EQ(img[1].substr(0, 3), "fgh");

  std::vector<ReplicaPoint> points = store_->ListPoints();
  ASSERT_EQ(points.back().sequence, 3u);
  EXPECT_EQ(points.back().time_ms, 1700000003000);
  EXPECT_EQ(points.back().generation_id, "ab030303030303030303030303030303");
  EXPECT_EQ(points[points.size() - 2].kind, ReplicationType::kApplicationConsistent);

  auto again = staging_->ApplyReady(*store_);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 0u);
}

TEST_F(StagingTest, DuplicateAndGapAreRefusedAtBeginReceive) {
  ASSERT_TRUE(Receive(1, Delta(1)).ok());

  auto dup = staging_->BeginReceive(Header(1));
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(dup.status().message().find("already staged"), std::string::npos) << dup.status().ToString();

  auto gap = staging_->BeginReceive(Header(3));
  ASSERT_FALSE(gap.ok());
  EXPECT_EQ(gap.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(gap.status().message().find("expected sequence 2, got 3"), std::string::npos) << gap.status().ToString();
  EXPECT_FALSE(fs::exists(PartPath(3)));

  ASSERT_TRUE(staging_->ApplyReady(*store_).ok());
  auto applied = staging_->BeginReceive(Header(1));
  ASSERT_FALSE(applied.ok());
  EXPECT_EQ(applied.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(applied.status().message().find("already applied"), std::string::npos) << applied.status().ToString();

  EXPECT_EQ(*staging_->expected_sequence(), 2u);
  ASSERT_TRUE(Receive(2, Delta(2)).ok());
  EXPECT_EQ(*staging_->expected_sequence(), 3u);
}

TEST_F(StagingTest, LogOfAnotherRelationshipOrDiskLayoutIsRefused) {
  LogHeader h = Header(1);
  h.relationship_id = "vm-2";
  EXPECT_EQ(staging_->BeginReceive(h).status().code(), Code::kInvalidArgument);
  h = Header(1);
  h.disks[1].size_bytes = kDiskB * 2;
  EXPECT_EQ(staging_->BeginReceive(h).status().code(), Code::kInvalidArgument);
}

class CorruptCommitTest : public StagingTest, public ::testing::WithParamInterface<bool> {};

TEST_P(CorruptCommitTest, FlippedByteIsRefusedAtCommit) {
  const bool in_header = GetParam();
  std::vector<DeltaRecord> recs = Delta(1);
  auto w = staging_->BeginReceive(Header(1));
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  for (const DeltaRecord& r : recs) ASSERT_TRUE((*w)->Add(r).ok());
  ASSERT_TRUE((*w)->Finish().ok());
  std::string part = (*w)->path();
  FlipByte(part, in_header ? 0x18 /* sequence */ : PayloadOffset(part, recs, 2) + 7);

  Status st = staging_->CommitReceived(1);
  EXPECT_EQ(st.code(), Code::kCorruption) << st.ToString();
  EXPECT_NE(st.message().find("offset"), std::string::npos) << st.ToString();
  EXPECT_FALSE(fs::exists(part));
  EXPECT_TRUE(Files(staging_->dir()).empty());

  // The sender resends it.
  ASSERT_TRUE(Receive(1, recs).ok());
  ASSERT_TRUE(staging_->ApplyReady(*store_).ok());
  EXPECT_TRUE(ReadImage() == Expected(1));
}

TEST_P(CorruptCommitTest, RottedStagedLogIsRejectedAndNothingOfItApplied) {
  const bool in_header = GetParam();
  ASSERT_TRUE(Receive(1, Delta(1)).ok());
  ASSERT_TRUE(staging_->ApplyReady(*store_).ok());
  const Image before = ReadImage();
  ASSERT_TRUE(before == Expected(1));

  // Log 2 was committed whole, then a byte rotted on disk: in the header,
  // or in the payload of the last record (the first two are fine).
  std::vector<DeltaRecord> recs = Delta(2);
  std::string outside = dir_ + "/log2.vrl";
  WriteLog(outside, 2, recs);
  FlipByte(outside, in_header ? 0x50 /* relationship id */ : PayloadOffset(outside, recs, 2) + 1);
  fs::copy_file(outside, staging_->LogPath(2));
  OpenStaging();  // reconciles: the file placed behind its back gets a row
  EXPECT_EQ(Rows(), RowList{"2:staged:00000000000000000002.vrl"});

  auto n = staging_->ApplyReady(*store_);
  ASSERT_FALSE(n.ok());
  EXPECT_EQ(n.status().code(), Code::kCorruption);
  const std::string msg = n.status().message();
  EXPECT_NE(msg.find(staging_->LogPath(2)), std::string::npos) << msg;
  EXPECT_NE(msg.find("at offset"), std::string::npos) << msg;
  EXPECT_NE(msg.find("resynchronised"), std::string::npos) << msg;

  EXPECT_EQ(store_->latest_sequence(), 1u);
  EXPECT_EQ(store_->ListPoints().size(), 2u);
  EXPECT_TRUE(ReadImage() == before);
  EXPECT_FALSE(fs::exists(staging_->LogPath(2)));
  EXPECT_TRUE(fs::exists(staging_->dir() + "/rejected/00000000000000000002.vrl"));
  EXPECT_EQ(Rows(), RowList{"2:rejected:rejected/00000000000000000002.vrl"});

  // Nothing more is applied until the log is resent.
  auto again = staging_->ApplyReady(*store_);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 0u);
}

INSTANTIATE_TEST_SUITE_P(Where, CorruptCommitTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Header" : "Payload"; });

// A byte rots in a log that CommitReceived verified in this process, and
// the file keeps its identity (same inode, size and mtime: the file system
// did not see a write). ApplyReady applies it without a separate
// verification pass (staging.h, "Read once"): the apply's reader must catch
// the rot, the store roll back, and the log be rejected as a verification
// first would have done.
TEST_P(CorruptCommitTest, RotUnseenByTheFileSystemIsStillRejectedWhenTheApplyIsTheOnlyCheck) {
  const bool in_header = GetParam();
  ASSERT_TRUE(Receive(1, Delta(1)).ok());
  ASSERT_TRUE(staging_->ApplyReady(*store_).ok());
  const Image before = ReadImage();
  ASSERT_TRUE(before == Expected(1));

  std::vector<DeltaRecord> recs = Delta(2);
  ASSERT_TRUE(Receive(2, recs).ok());
  const std::string path = staging_->LogPath(2);
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  FlipByte(path, in_header ? 0x50 /* relationship id */ : PayloadOffset(path, recs, 2) + 1);
  const struct timespec times[2] = {st.st_atim, st.st_mtim};
  ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), times, 0), 0);
  struct stat now {};
  ASSERT_EQ(::stat(path.c_str(), &now), 0);
  ASSERT_EQ(now.st_ino, st.st_ino);
  ASSERT_EQ(now.st_size, st.st_size);

  auto n = staging_->ApplyReady(*store_);
  ASSERT_FALSE(n.ok());
  EXPECT_EQ(n.status().code(), Code::kCorruption) << n.status().ToString();
  const std::string msg = n.status().message();
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("at offset"), std::string::npos) << msg;
  EXPECT_NE(msg.find("resynchronised"), std::string::npos) << msg;
  EXPECT_EQ(store_->latest_sequence(), 1u);
  EXPECT_EQ(store_->ListPoints().size(), 2u);
  EXPECT_TRUE(ReadImage() == before);
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(fs::exists(staging_->dir() + "/rejected/00000000000000000002.vrl"));
  EXPECT_EQ(Rows(), RowList{"2:rejected:rejected/00000000000000000002.vrl"});

  // The resent log applies.
  ASSERT_TRUE(Receive(2, recs).ok());
  auto again = staging_->ApplyReady(*store_);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(*again, 1u);
  EXPECT_TRUE(ReadImage() == Expected(2));
}

// Bytes this process has read so far (read, pread...: /proc/self/io rchar).
uint64_t BytesReadByThisProcess() {
  std::ifstream in("/proc/self/io");
  std::string key;
  uint64_t value = 0;
  while (in >> key >> value) {
    if (key == "rchar:") return value;
  }
  ADD_FAILURE() << "no rchar in /proc/self/io";
  return 0;
}

// One log of 4 MiB applied by the Staging that committed it reads the
// staged file once less than the same log applied after a reopen (as after
// a restart, when the full verification comes first).
TEST(StagingReadOnceTest, ALogCommittedInThisProcessIsReadOnceLessByItsApply) {
  constexpr uint64_t kDisk = 8ull << 20;
  constexpr int kRecords = 64;
  constexpr size_t kRecordBytes = 64 * 1024;
  char tmpl[] = "/tmp/vmr-staging-once-XXXXXX";
  const std::string root = ::mkdtemp(tmpl);
  uint64_t read_by_apply[2] = {0, 0};
  uint64_t log_bytes = 0;
  for (int reopen = 0; reopen < 2; ++reopen) {
    const std::string store_dir = root + "/vm" + std::to_string(reopen);
    auto store = ReplicaStore::Create(store_dir, kVm, {{"vda", kDisk}}, nullptr, ReplicaStoreOptions{});
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    StagingOptions o;
    o.writer = WriterOptions();
    auto staging = Staging::Open(store_dir + "/staging", **store, o);
    ASSERT_TRUE(staging.ok()) << staging.status().ToString();
    LogHeader h = Header(1);
    h.disks = {{"vda", kDisk}};
    auto w = (*staging)->BeginReceive(h);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    for (int i = 0; i < kRecords; ++i) {
      ASSERT_TRUE((*w)->Add(DataRecord(0, static_cast<uint64_t>(i) * 2 * kRecordBytes,
                                       Bytes(static_cast<char>('a' + i % 20), kRecordBytes)))
                      .ok());
    }
    ASSERT_TRUE((*w)->Finish().ok());
    w->reset();
    ASSERT_TRUE((*staging)->CommitReceived(1).ok());
    log_bytes = fs::file_size((*staging)->LogPath(1));
    if (reopen) {
      staging->reset();
      staging = Staging::Open(store_dir + "/staging", **store, o);
      ASSERT_TRUE(staging.ok()) << staging.status().ToString();
    }
    const uint64_t r0 = BytesReadByThisProcess();
    auto n = (*staging)->ApplyReady(**store);
    const uint64_t r1 = BytesReadByThisProcess();
    ASSERT_TRUE(n.ok()) << n.status().ToString();
    ASSERT_EQ(*n, 1u);
    ASSERT_EQ((*store)->latest_sequence(), 1u);
    std::string got(kRecordBytes, '\0');
    ASSERT_TRUE((*store)->ReadPoint(1, 0, 6 * kRecordBytes, kRecordBytes, got.data()).ok());
    EXPECT_TRUE(got == Bytes('d', kRecordBytes));
    read_by_apply[reopen] = r1 - r0;
  }
  fs::remove_all(root);
  ASSERT_GT(log_bytes, static_cast<uint64_t>(kRecords) * kRecordBytes);
  std::ostringstream what;
  what << "log " << log_bytes << " bytes; ApplyReady read " << read_by_apply[0] << " bytes after a commit here, "
       << read_by_apply[1] << " after a reopen";
  EXPECT_GE(read_by_apply[1], read_by_apply[0] + log_bytes * 9 / 10) << what.str();
  EXPECT_LE(read_by_apply[1], read_by_apply[0] + log_bytes * 11 / 10) << what.str();
  EXPECT_GE(read_by_apply[0], log_bytes) << what.str();  // the apply's own read
}

TEST_F(StagingTest, GoodLogsBeforeARottedOneAreApplied) {
  ASSERT_TRUE(Receive(1, Delta(1)).ok());
  ASSERT_TRUE(Receive(2, Delta(2)).ok());
  ASSERT_TRUE(Receive(3, Delta(3)).ok());
  std::vector<DeltaRecord> recs = Delta(3);
  FlipByte(staging_->LogPath(3), PayloadOffset(staging_->LogPath(3), recs, 0) + 100);

  auto n = staging_->ApplyReady(*store_);
  EXPECT_EQ(n.status().code(), Code::kCorruption);
  EXPECT_EQ(store_->latest_sequence(), 2u);
  EXPECT_TRUE(ReadImage() == Expected(2));
}

TEST_F(StagingTest, AlreadyAppliedLogIsDeletedNotAppliedTwice) {
  ASSERT_TRUE(Receive(1, Delta(1)).ok());
  ASSERT_TRUE(Receive(2, Delta(2)).ok());
  ASSERT_TRUE(staging_->ApplyReady(*store_).ok());
  ASSERT_EQ(store_->latest_sequence(), 2u);

  // A crash after the apply of 2 committed, before its log was unlinked.
  // Its content differs here, so applying it again would show.
  WriteLog(staging_->LogPath(2), 2, Delta(99));
  WriteLog(staging_->LogPath(1), 1, Delta(99));
  OpenStaging();  // as after the restart

  auto n = staging_->ApplyReady(*store_);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 0u);
  EXPECT_TRUE(Files(staging_->dir()).empty());
  EXPECT_TRUE(Rows().empty());
  EXPECT_EQ(store_->latest_sequence(), 2u);
  EXPECT_EQ(store_->ListPoints().size(), 3u);
  EXPECT_TRUE(ReadImage() == Expected(2));

  // And with the next log staged too, only that one is applied.
  WriteLog(staging_->LogPath(2), 2, Delta(99));
  ASSERT_TRUE(Receive(3, Delta(3)).ok());
  n = staging_->ApplyReady(*store_);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 1u);
  EXPECT_TRUE(ReadImage() == Expected(3));
  EXPECT_TRUE(Files(staging_->dir()).empty());
}

TEST_F(StagingTest, UnfinishedReceiveIsNeverAppliedAndRemovedAtOpen) {
  {
    auto w = staging_->BeginReceive(Header(1));
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->Add(Delta(1)[0]).ok());
    // The connection drops: the writer is destroyed without Finish().
  }
  ASSERT_TRUE(fs::exists(PartPath(1)));
  auto n = staging_->ApplyReady(*store_);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0u);

  OpenStaging();
  EXPECT_FALSE(fs::exists(PartPath(1)));
  ASSERT_TRUE(Receive(1, Delta(1)).ok());
  ASSERT_TRUE(staging_->ApplyReady(*store_).ok());
  EXPECT_TRUE(ReadImage() == Expected(1));
}

TEST_F(StagingTest, CatalogIsReconciledWithTheFilesAtOpen) {
  ASSERT_TRUE(Receive(1, Delta(1)).ok());
  ASSERT_TRUE(Receive(2, Delta(2)).ok());
  ASSERT_EQ(Rows().size(), 2u);
  // As after crashes: log 1's file vanished after its row was written (the
  // row stays), log 3 was renamed into place before its row was written, a
  // stale row names a wrong size, and another VM's rows are left alone.
  fs::remove(staging_->LogPath(1));
  WriteLog(staging_->LogPath(3), 3, Delta(3));
  ASSERT_TRUE(catalog_->PutStagedLog({kVm, 2, StagedLogState::kStaged, "00000000000000000002.vrl", 1, 1}).ok());
  ASSERT_TRUE(catalog_->PutVm({"vm-2", "other", ReplicationMode::kReplica, "{}", 1}).ok());
  ASSERT_TRUE(catalog_->PutStagedLog({"vm-2", 1, StagedLogState::kStaged, "x.vrl", 1, 1}).ok());

  OpenStaging();
  EXPECT_EQ(Rows(), (RowList{"2:staged:00000000000000000002.vrl", "3:staged:00000000000000000003.vrl"}));
  EXPECT_EQ(catalog_->ListStagedLogs("vm-2")->size(), 1u);
}

TEST_F(StagingTest, MissingVmInTheCatalogDoesNotStopStagingAndIsRepairedLater) {
  ASSERT_TRUE(catalog_->DeleteVm(kVm).ok());
  OpenStaging();  // nothing to reconcile yet
  ASSERT_TRUE(Receive(1, Delta(1)).ok());  // the row cannot be written: logged only
  EXPECT_TRUE(Rows().empty());
  ASSERT_TRUE(catalog_->PutVm({kVm, "vm", ReplicationMode::kReplica, "{}", 1}).ok());
  // A stale row that only a reconciliation removes.
  ASSERT_TRUE(catalog_->PutStagedLog({kVm, 9, StagedLogState::kStaged, "00000000000000000009.vrl", 1, 1}).ok());
  // The log rots; ApplyReady first repairs the mirror (row 1 staged), then
  // rejects the log (row 1 rejected).
  FlipByte(staging_->LogPath(1), PayloadOffset(staging_->LogPath(1), Delta(1), 0) + 3);
  EXPECT_EQ(staging_->ApplyReady(*store_).status().code(), Code::kCorruption);
  EXPECT_EQ(Rows(), RowList{"1:rejected:rejected/00000000000000000001.vrl"});
}

TEST_F(StagingTest, CommitWithoutFinishIsRefused) {
  auto w = staging_->BeginReceive(Header(1));
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE((*w)->Add(Delta(1)[0]).ok());
  Status st = staging_->CommitReceived(1);
  EXPECT_EQ(st.code(), Code::kCorruption) << st.ToString();
  EXPECT_FALSE(fs::exists(staging_->LogPath(1)));
  EXPECT_EQ(staging_->CommitReceived(7).code(), Code::kNotFound);
}

// ---- Import reservation (docs/replica_store.md section 17) ----------------------

const std::string kGen = "00112233445566778899aabbccddeeff";

// Loads Delta(1) into the store as point 1, the way an import does.
void LoadPointOne(ReplicaStore& store) {
  LoadInfo info;
  info.point = {int64_t{1700000001000}, ReplicationType::kRegular, kGen};
  info.source = "import";
  info.tag = "sha256:0123";
  ASSERT_TRUE(store.BeginLoad(info).ok());
  VectorRecords recs(Delta(1));
  ASSERT_TRUE(store.LoadChunk(0, recs).ok());
  Status s = store.FinishLoad();
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_EQ(store.latest_sequence(), 1u);
}

TEST_F(StagingTest, ImportReservationSkipsLogOneUntilTheLoadIsDone) {
  EXPECT_EQ(*staging_->expected_sequence(), 1u);
  auto none = staging_->import_reservation();
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  ASSERT_TRUE(staging_->ReserveImport(kGen).ok());
  ASSERT_TRUE(staging_->ReserveImport(kGen).ok());  // idempotent
  EXPECT_EQ(**staging_->import_reservation(), kGen);
  EXPECT_EQ(*staging_->expected_sequence(), 2u);

  auto one = staging_->BeginReceive(Header(1));
  ASSERT_FALSE(one.ok());
  EXPECT_EQ(one.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(one.status().message().find("reserved"), std::string::npos) << one.status().ToString();
  EXPECT_FALSE(fs::exists(PartPath(1)));

  ASSERT_TRUE(Receive(2, Delta(2)).ok());
  EXPECT_EQ(*staging_->expected_sequence(), 3u);
  ASSERT_TRUE(Receive(3, Delta(3)).ok());
  EXPECT_EQ(*staging_->expected_sequence(), 4u);
  auto n = staging_->ApplyReady(*store_);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 0u);  // stops at the gap: log 1 is never staged
  EXPECT_EQ(store_->latest_sequence(), 0u);
  EXPECT_TRUE(fs::exists(staging_->LogPath(2)));
  EXPECT_TRUE(fs::exists(staging_->LogPath(3)));

  // The reservation and the staged logs survive a restart.
  OpenStaging();
  EXPECT_EQ(**staging_->import_reservation(), kGen);
  EXPECT_EQ(*staging_->expected_sequence(), 4u);
  EXPECT_EQ(staging_->BeginReceive(Header(1)).status().code(), Code::kFailedPrecondition);

  LoadPointOne(*store_);
  if (HasFatalFailure()) return;
  ASSERT_TRUE(staging_->ClearImportReservation().ok());
  EXPECT_FALSE(fs::exists(staging_->ImportPath()));
  ASSERT_TRUE(staging_->ClearImportReservation().ok());  // absent: OK
  EXPECT_FALSE(staging_->import_reservation()->has_value());
  n = staging_->ApplyReady(*store_);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 2u);
  EXPECT_EQ(store_->latest_sequence(), 3u);
  EXPECT_TRUE(ReadImage() == Expected(3));
  std::vector<ReplicaPoint> points = store_->ListPoints();
  ASSERT_EQ(points.size(), 3u);
  EXPECT_EQ(points[0].sequence, 1u);
  EXPECT_EQ(points[0].generation_id, kGen);
  EXPECT_EQ(points[1].generation_id, "ab020202020202020202020202020202");
  EXPECT_EQ(points[2].generation_id, "ab030303030303030303030303030303");
  EXPECT_TRUE(Files(staging_->dir()).empty());
  EXPECT_TRUE(Rows().empty());
}

TEST_F(StagingTest, ImportReservationIsRefusedWhenALogIsStagedOrAnotherGenerationHoldsIt) {
  EXPECT_EQ(staging_->ReserveImport("0011").code(), Code::kInvalidArgument);
  EXPECT_EQ(staging_->ReserveImport(std::string(32, 'g')).code(), Code::kInvalidArgument);

  ASSERT_TRUE(Receive(1, Delta(1)).ok());
  Status staged = staging_->ReserveImport(kGen);
  EXPECT_EQ(staged.code(), Code::kFailedPrecondition) << staged.ToString();
  EXPECT_FALSE(fs::exists(staging_->ImportPath()));

  ASSERT_TRUE(staging_->ApplyReady(*store_).ok());
  ASSERT_EQ(store_->latest_sequence(), 1u);
  Status applied = staging_->ReserveImport(kGen);
  EXPECT_EQ(applied.code(), Code::kFailedPrecondition) << applied.ToString();
  EXPECT_FALSE(fs::exists(staging_->ImportPath()));
}

// The primary gave the export up: the staged logs and the reservation go,
// and log 1 is expected again.
TEST_F(StagingTest, DiscardStagedDeletesTheLogsAndTheirRowsOnlyAtPointZero) {
  ASSERT_TRUE(staging_->ReserveImport(kGen).ok());
  ASSERT_TRUE(Receive(2, Delta(2)).ok());
  ASSERT_TRUE(Receive(3, Delta(3)).ok());
  EXPECT_EQ(Rows().size(), 2u);
  ASSERT_TRUE(staging_->DiscardStaged().ok());
  ASSERT_TRUE(staging_->ClearImportReservation().ok());
  EXPECT_FALSE(fs::exists(staging_->LogPath(2)));
  EXPECT_FALSE(fs::exists(staging_->LogPath(3)));
  EXPECT_TRUE(Rows().empty());
  EXPECT_EQ(*staging_->expected_sequence(), 1u);
  ASSERT_TRUE(staging_->DiscardStaged().ok());  // nothing staged: OK

  ASSERT_TRUE(Receive(1, Delta(1)).ok());
  ASSERT_TRUE(staging_->ApplyReady(*store_).ok());
  ASSERT_TRUE(Receive(2, Delta(2)).ok());
  Status kept = staging_->DiscardStaged();
  EXPECT_EQ(kept.code(), Code::kFailedPrecondition) << kept.ToString();
  EXPECT_TRUE(fs::exists(staging_->LogPath(2)));
}

TEST_F(StagingTest, ImportReservationOfAnotherGenerationIsRefused) {
  ASSERT_TRUE(staging_->ReserveImport(kGen).ok());
  Status other = staging_->ReserveImport("ffeeddccbbaa99887766554433221100");
  EXPECT_EQ(other.code(), Code::kFailedPrecondition) << other.ToString();
  EXPECT_EQ(**staging_->import_reservation(), kGen);
}

TEST_F(StagingTest, ReceiveBegunBeforeTheReservationCannotTakeLogOne) {
  auto w = staging_->BeginReceive(Header(1));
  ASSERT_TRUE(w.ok());
  for (const DeltaRecord& r : Delta(1)) ASSERT_TRUE((*w)->Add(r).ok());
  ASSERT_TRUE((*w)->Finish().ok());
  // A receive in progress refuses the reservation ...
  EXPECT_EQ(staging_->ReserveImport(kGen).code(), Code::kFailedPrecondition);
  // ... and a reservation written anyway (as by another process) keeps log 1 out.
  ASSERT_TRUE(WriteFileAtomic(staging_->ImportPath(),
                              R"({"version":1,"sequence":1,"generation":")" + kGen + "\"}\n", 0600)
                  .ok());
  EXPECT_EQ(staging_->CommitReceived(1).code(), Code::kFailedPrecondition);
  EXPECT_FALSE(fs::exists(staging_->LogPath(1)));
}

TEST_F(StagingTest, CorruptImportReservationIsCorruption) {
  const std::vector<std::string> bad = {
      "not json",
      R"({"version":2,"sequence":1,"generation":")" + kGen + "\"}",
      R"({"version":1,"sequence":2,"generation":")" + kGen + "\"}",
      R"({"version":1,"sequence":1,"generation":"0011"})",
      R"({"version":1,"sequence":1})",
      R"({"version":1,"sequence":1,"generation":")" + kGen + R"(","extra":1})",
      R"({"version":"1","sequence":1,"generation":")" + kGen + "\"}",
      std::string(2000, ' ') + R"({"version":1,"sequence":1,"generation":")" + kGen + "\"}",
  };
  for (const std::string& content : bad) {
    std::ofstream(staging_->ImportPath(), std::ios::binary | std::ios::trunc) << content;
    auto r = staging_->import_reservation();
    EXPECT_EQ(r.status().code(), Code::kCorruption) << content;
    EXPECT_EQ(staging_->expected_sequence().status().code(), Code::kCorruption) << content;
    StagingOptions o;
    o.writer = WriterOptions();
    auto st = Staging::Open(store_dir_ + "/staging", *store_, o);
    ASSERT_FALSE(st.ok()) << content;
    EXPECT_EQ(st.status().code(), Code::kCorruption) << content;
    EXPECT_NE(st.status().message().find("IMPORT"), std::string::npos) << st.status().ToString();
  }
  // The one good form, for contrast.
  std::ofstream(staging_->ImportPath(), std::ios::binary | std::ios::trunc)
      << R"({"version":1,"sequence":1,"generation":")" + kGen + "\"}";
  EXPECT_EQ(**staging_->import_reservation(), kGen);
}

}  // namespace
}  // namespace vmreplica
