// Initial-replica export: writer and reader on real files (spec:
// docs/export_format.md). Expected contents come from the generated source
// bytes, never from the code under test.

#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include "blockio/qsd_testing.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/initial_export.h"

namespace vmreplica {
namespace {

using blockio_testing::TempDir;
using Json = nlohmann::json;

constexpr const char* kVmId = "6f1c2b9e-3a4d-4e5f-8a9b-0c1d2e3f4a5b";
constexpr const char* kOtherVmId = "11111111-2222-3333-4444-555555555555";
constexpr uint32_t kChunk = 1u << 20;

// One generated disk: its bytes and the records describing it.
struct GeneratedVm {
  ExportInfo info;
  std::vector<std::string> images;
  std::vector<DeltaRecord> records;
  uint64_t data_bytes = 0;  // bytes in data records
};

// Random data (some compressible), zero records and holes (ranges no record
// covers) on each disk, with unaligned boundaries.
GeneratedVm Generate(uint32_t seed, std::vector<uint64_t> sizes, bool all_zero = false) {
  std::mt19937_64 rng(seed);
  GeneratedVm vm;
  vm.info.vm_id = kVmId;
  vm.info.vm_name = "web server 1";
  vm.info.definition = R"({"name":"web server 1","memory_mib":512,"disks":["vda","vdb"]})";
  vm.info.generation_id = "0123456789abcdef0123456789ABCDEF";
  vm.info.cut_time_unix_ms = 1'790'000'000'123;
  for (uint32_t d = 0; d < sizes.size(); ++d) {
    vm.info.disks.push_back({d == 0 ? "vda" : "vdb", sizes[d]});
    std::string image(sizes[d], '\0');
    uint64_t pos = 0;
    while (pos < sizes[d]) {
      uint64_t len = 1 + rng() % (3u << 19);
      if (rng() % 3 == 0) len = 4096 * (1 + rng() % 64);
      len = std::min<uint64_t>(len, sizes[d] - pos);
      const int kind = all_zero ? 1 + static_cast<int>(rng() % 2) : static_cast<int>(rng() % 4);
      if (kind == 0 || kind == 3) {  // data, random or compressible
        std::string bytes(len, '\0');
        for (uint64_t i = 0; i < len; ++i)
          bytes[i] = kind == 0 ? static_cast<char>(rng()) : static_cast<char>("abcab\n"[i % 6]);
        image.replace(pos, len, bytes);
        // Split into up to three records.
        uint64_t off = 0;
        while (off < len) {
          uint64_t part = std::min<uint64_t>(len - off, 1 + rng() % len);
          vm.records.push_back(DataRecord(d, pos + off, bytes.substr(off, part)));
          off += part;
        }
        vm.data_bytes += len;
      } else if (kind == 1) {
        vm.records.push_back(ZeroRecord(d, pos, len));
      }  // kind 2: hole
      pos += len;
    }
    vm.images.push_back(std::move(image));
  }
  return vm;
}

ExportOptions SmallOptions(bool compress) {
  ExportOptions o;
  o.chunk_size = kChunk;
  o.compress = compress;
  o.max_data_file_bytes = 2u << 20;  // several data files
  return o;
}

Result<ExportSummary> Export(const std::string& location, const GeneratedVm& vm,
                             const ExportOptions& options) {
  VectorDeltaSource src(vm.records);
  return WriteInitialExport(location, vm.info, src, options);
}

std::string Hash(const std::string& s) {
  XXH128_hash_t h = XXH3_128bits(s.data(), s.size());
  char buf[40];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(h.high64),
                static_cast<unsigned long long>(h.low64));
  return buf;
}

// Applies a stream to images pre-filled with 0xAA, checking that records of
// each disk follow each other without gap or overlap. Answers the images,
// and the number of records consumed in `count`.
struct Rebuilt {
  std::vector<std::string> images;
  std::vector<DeltaRecord> records;  // without data, for comparisons
  Status end;                        // status that ended the stream
};

Rebuilt Drain(DeltaSource& src, const std::vector<ExportDisk>& disks) {
  Rebuilt r;
  for (const auto& d : disks) r.images.emplace_back(d.size, '\xAA');
  for (;;) {
    auto next = src.Next();
    if (!next.ok()) {
      r.end = next.status();
      return r;
    }
    if (!next->has_value()) return r;
    DeltaRecord& rec = **next;
    EXPECT_LT(rec.disk, disks.size());
    if (rec.disk >= disks.size()) return r;
    EXPECT_LE(rec.offset + rec.length, disks[rec.disk].size);
    if (rec.zero) {
      r.images[rec.disk].replace(rec.offset, rec.length, rec.length, '\0');
    } else {
      EXPECT_EQ(rec.data.size(), rec.length);
      r.images[rec.disk].replace(rec.offset, rec.length, rec.data);
    }
    rec.data.clear();
    r.records.push_back(std::move(rec));
  }
}

// Records must cover every disk exactly, in order.
void ExpectExactCover(const std::vector<DeltaRecord>& recs, const std::vector<ExportDisk>& disks) {
  uint32_t disk = 0;
  uint64_t pos = 0;
  for (const auto& r : recs) {
    if (r.disk != disk) {
      ASSERT_EQ(pos, disks[disk].size);
      ASSERT_EQ(r.disk, disk + 1);
      disk = r.disk;
      pos = 0;
    }
    ASSERT_EQ(r.offset, pos);
    pos += r.length;
  }
  EXPECT_EQ(disk + 1, disks.size());
  EXPECT_EQ(pos, disks.back().size);
}

std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") out.push_back(n);
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

uint64_t FileSize(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return 0;
  return static_cast<uint64_t>(st.st_size);
}

std::string ExportDir(const std::string& location) {
  return location + "/web server 1-" + std::string(kVmId);
}

void RoundTrip(bool compress) {
  TempDir tmp("vmr-export");
  ASSERT_TRUE(tmp.ok());
  GeneratedVm vm = Generate(compress ? 7 : 8, {9u << 20, (5u << 20) + 12345});
  std::vector<std::pair<uint64_t, uint64_t>> progress;
  VectorDeltaSource src(vm.records);
  auto summary = WriteInitialExport(
      tmp.path(), vm.info, src, SmallOptions(compress),
      [&](uint64_t done, uint64_t total) { progress.emplace_back(done, total); });
  ASSERT_TRUE(summary.ok()) << summary.status().ToString();
  const std::string dir = ExportDir(tmp.path());
  EXPECT_EQ(summary->directory, dir);
  const uint64_t total = vm.images[0].size() + vm.images[1].size();
  ASSERT_FALSE(progress.empty());
  EXPECT_EQ(progress.back(), std::make_pair(total, total));
  for (size_t i = 1; i < progress.size(); ++i) EXPECT_LE(progress[i - 1].first, progress[i].first);

  // Zeros are not stored: the data files hold exactly the stored bytes, and
  // the data chunks hold exactly the source's data bytes.
  uint64_t on_disk = 0;
  for (const auto& name : ListDir(dir))
    if (name.rfind("data-", 0) == 0) on_disk += FileSize(dir + "/" + name);
  EXPECT_EQ(on_disk, summary->totals.stored_bytes);
  EXPECT_EQ(summary->totals.data_bytes, vm.data_bytes);
  EXPECT_EQ(summary->totals.data_bytes + summary->totals.zero_bytes, total);
  EXPECT_GT(summary->data_files, 1u);
  if (compress) {
    EXPECT_LT(summary->totals.stored_bytes, vm.data_bytes);
  } else {
    EXPECT_EQ(summary->totals.stored_bytes, vm.data_bytes);
  }

  auto reader = ExportReader::Open(dir, kVmId);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  const ExportReader& r = **reader;
  EXPECT_EQ(r.info().vm_name, vm.info.vm_name);
  EXPECT_EQ(r.info().definition, vm.info.definition);
  EXPECT_EQ(r.info().generation_id, "0123456789abcdef0123456789abcdef");
  EXPECT_EQ(r.info().cut_time_unix_ms, vm.info.cut_time_unix_ms);
  ASSERT_EQ(r.info().disks.size(), 2u);
  EXPECT_EQ(r.info().disks[1].size, vm.images[1].size());
  EXPECT_EQ(r.chunk_size(), kChunk);
  bool saw_zstd = false;
  for (size_t i = 0; i < r.chunk_count(); ++i) {
    const ExportChunk& c = r.chunk(i);
    saw_zstd = saw_zstd || c.zstd;
    if (!c.zero) {
      EXPECT_LE(c.length, kChunk);
    }
  }
  EXPECT_EQ(saw_zstd, compress);
  uint64_t last_done = 0;
  ASSERT_TRUE(r.VerifyAll([&](uint64_t done, uint64_t) { last_done = done; }).ok());
  EXPECT_EQ(last_done, total);

  auto records = r.Records(0);
  ASSERT_TRUE(records.ok());
  Rebuilt rebuilt = Drain(**records, r.info().disks);
  ASSERT_TRUE(rebuilt.end.ok()) << rebuilt.end.ToString();
  EXPECT_EQ(rebuilt.records.size(), r.chunk_count());
  ExpectExactCover(rebuilt.records, r.info().disks);
  for (size_t d = 0; d < 2; ++d) EXPECT_EQ(Hash(rebuilt.images[d]), Hash(vm.images[d])) << d;
}

TEST(InitialExport, RoundTripReproducesDisksUncompressed) { RoundTrip(false); }
TEST(InitialExport, RoundTripReproducesDisksCompressed) { RoundTrip(true); }

TEST(InitialExport, AllZeroDisksStoreNothing) {
  TempDir tmp("vmr-export");
  GeneratedVm vm = Generate(3, {4u << 20, 3u << 20}, /*all_zero=*/true);
  auto summary = Export(tmp.path(), vm, SmallOptions(true));
  ASSERT_TRUE(summary.ok()) << summary.status().ToString();
  EXPECT_EQ(summary->totals.stored_bytes, 0u);
  EXPECT_EQ(summary->totals.data_chunks, 0u);
  EXPECT_EQ(summary->data_files, 0u);
  // Adjacent zero records and holes merge: one zero chunk per disk.
  EXPECT_EQ(summary->totals.zero_chunks, 2u);
  auto reader = ExportReader::Open(ExportDir(tmp.path()), kVmId);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  auto records = (*reader)->Records(0);
  ASSERT_TRUE(records.ok());
  Rebuilt rebuilt = Drain(**records, (*reader)->info().disks);
  ASSERT_TRUE(rebuilt.end.ok());
  for (size_t d = 0; d < 2; ++d)
    EXPECT_EQ(rebuilt.images[d], std::string(vm.images[d].size(), '\0'));
}

TEST(InitialExport, ShortZeroRunsStoredOnlyWhenAsked) {
  TempDir tmp("vmr-export");
  GeneratedVm vm;
  vm.info = Generate(1, {1}).info;
  vm.info.disks = {{"vda", 2u << 20}};
  std::string a(100000, 'a'), b(50000, 'b');
  vm.records = {DataRecord(0, 0, a), ZeroRecord(0, 100000, 4096), DataRecord(0, 104096, b)};
  std::string image(2u << 20, '\0');
  image.replace(0, a.size(), a);
  image.replace(104096, b.size(), b);
  ExportOptions o = SmallOptions(false);
  auto plain = Export(tmp.path(), vm, o);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->totals.stored_bytes, 150000u);
  o.min_zero_run = 65536;
  auto merged = Export(tmp.path(), vm, o);
  ASSERT_TRUE(merged.ok());
  EXPECT_EQ(merged->totals.stored_bytes, 154096u);
  auto reader = ExportReader::Open(ExportDir(tmp.path()), kVmId);
  ASSERT_TRUE(reader.ok());
  auto records = (*reader)->Records(0);
  ASSERT_TRUE(records.ok());
  Rebuilt rebuilt = Drain(**records, (*reader)->info().disks);
  ASSERT_TRUE(rebuilt.end.ok());
  EXPECT_EQ(Hash(rebuilt.images[0]), Hash(image));
}

TEST(InitialExport, SeveralVmsShareOneLocation) {
  TempDir tmp("vmr-export");
  GeneratedVm a = Generate(11, {1u << 20});
  GeneratedVm b = Generate(12, {2u << 20});
  b.info.vm_id = kOtherVmId;
  b.info.vm_name = "db";
  ASSERT_TRUE(Export(tmp.path(), a, SmallOptions(true)).ok());
  ASSERT_TRUE(Export(tmp.path(), b, SmallOptions(true)).ok());
  EXPECT_TRUE(ExportReader::Open(ExportDir(tmp.path()), kVmId).ok());
  auto rb = ExportReader::Open(tmp.path() + "/db-" + kOtherVmId, kOtherVmId);
  ASSERT_TRUE(rb.ok()) << rb.status().ToString();
  EXPECT_TRUE((*rb)->VerifyAll().ok());
}

TEST(InitialExport, BadSourceRecordsAreRefused) {
  TempDir tmp("vmr-export");
  GeneratedVm vm = Generate(1, {1u << 20, 1u << 20});
  struct Case {
    std::vector<DeltaRecord> recs;
    const char* why;
  };
  std::vector<Case> cases = {
      {{ZeroRecord(0, 4096, 4096), ZeroRecord(0, 0, 4096)}, "overlaps or precedes"},
      {{ZeroRecord(1, 0, 4096), ZeroRecord(0, 0, 4096)}, "after disk"},
      {{ZeroRecord(2, 0, 4096)}, "out of range"},
      {{ZeroRecord(0, (1u << 20) - 4096, 8192)}, "beyond the disk size"},
      {{ZeroRecord(0, 0, 0)}, "length 0"},
  };
  DeltaRecord bad = DataRecord(0, 0, "abc");
  bad.length = 4;
  cases.push_back({{bad}, "bytes of data for length"});
  for (const auto& c : cases) {
    VectorDeltaSource src(c.recs);
    auto s = WriteInitialExport(tmp.path(), vm.info, src, SmallOptions(true));
    ASSERT_FALSE(s.ok()) << c.why;
    EXPECT_EQ(s.status().code(), Code::kInvalidArgument) << s.status().ToString();
    EXPECT_NE(s.status().message().find(c.why), std::string::npos) << s.status().ToString();
    EXPECT_EQ(ExportReader::Open(ExportDir(tmp.path()), kVmId).status().code(), Code::kNotFound);
  }
  ExportInfo info = vm.info;
  info.vm_name = "../escape";
  VectorDeltaSource src({});
  EXPECT_EQ(WriteInitialExport(tmp.path(), info, src).status().code(), Code::kInvalidArgument);
  info = vm.info;
  info.vm_id = "not-a-uuid";
  EXPECT_EQ(WriteInitialExport(tmp.path(), info, src).status().code(), Code::kInvalidArgument);
  info = vm.info;
  info.disks[1].name = "vda";
  EXPECT_EQ(WriteInitialExport(tmp.path(), info, src).status().code(), Code::kInvalidArgument);
  ExportOptions o;
  o.chunk_size = 3u << 20;
  EXPECT_EQ(WriteInitialExport(tmp.path(), vm.info, src, o).status().code(),
            Code::kInvalidArgument);
}

TEST(InitialExport, SecondWriterOfSameExportIsBusy) {
  TempDir tmp("vmr-export");
  GeneratedVm vm = Generate(2, {1u << 20});
  ASSERT_TRUE(MakeDirs(ExportDir(tmp.path())).ok());
  auto lock = FileLock::Acquire(ExportDir(tmp.path()) + "/LOCK");
  ASSERT_TRUE(lock.ok());
  auto s = Export(tmp.path(), vm, SmallOptions(true));
  EXPECT_EQ(s.status().code(), Code::kBusy) << s.status().ToString();
}

// ---------------------------------------------------------------- refusals

class ExportRefusal : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.ok());
    vm_ = Generate(21, {(3u << 20) + 4096, 2u << 20});
    auto s = Export(tmp_.path(), vm_, SmallOptions(false));
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    dir_ = s->directory;
    auto m = ReadFile(dir_ + "/MANIFEST");
    ASSERT_TRUE(m.ok());
    manifest_ = *m;
  }

  Status OpenStatus(const std::string& id = kVmId) { return ExportReader::Open(dir_, id).status(); }

  void WriteManifest(const std::string& text) {
    std::ofstream(dir_ + "/MANIFEST", std::ios::binary | std::ios::trunc) << text;
  }

  // Rewrites the manifest body through `edit`, with a correct checksum (as
  // the spec defines it), so only the edited rule can refuse it.
  void Forge(const std::function<void(Json&)>& edit,
             const std::string& magic = "vmreplica-export 1") {
    const size_t nl1 = manifest_.find('\n');
    const size_t nl2 = manifest_.find('\n', nl1 + 1);
    Json body = Json::parse(manifest_.substr(nl1 + 1, nl2 - nl1 - 1));
    edit(body);
    std::string text = magic + "\n" + body.dump() + "\n";
    text += "xxh3-128 " + Hash(text) + "\n";
    WriteManifest(text);
  }

  void ExpectRefused(const std::string& needle) {
    Status s = OpenStatus();
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.ToString();
    EXPECT_NE(s.message().find(needle), std::string::npos) << s.ToString();
  }

  // Puts the original manifest back: the export verifies again.
  void ExpectRepairable() {
    WriteManifest(manifest_);
    auto r = ExportReader::Open(dir_, kVmId);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_TRUE((*r)->VerifyAll().ok());
  }

  TempDir tmp_{"vmr-export"};
  GeneratedVm vm_;
  std::string dir_;
  std::string manifest_;
};

TEST_F(ExportRefusal, FlippedByteInChunkIsNamedAndStopsRecords) {
  auto r = ExportReader::Open(dir_, kVmId);
  ASSERT_TRUE(r.ok());
  size_t bad = 0;
  size_t data_seen = 0;
  for (size_t i = 0; i < (*r)->chunk_count(); ++i) {
    if ((*r)->chunk(i).zero) continue;
    bad = i;
    if (++data_seen == 3) break;
  }
  ASSERT_EQ(data_seen, 3u) << "generated export has too few data chunks";
  const ExportChunk c = (*r)->chunk(bad);
  const std::string file = dir_ + "/" + [&] {
    char b[32];
    std::snprintf(b, sizeof b, "data-%06u.bin", c.file_index);
    return std::string(b);
  }();
  auto flip = [&] {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(c.file_offset + c.stored_length / 2));
    char ch = 0;
    f.get(ch);
    f.seekp(static_cast<std::streamoff>(c.file_offset + c.stored_length / 2));
    f.put(static_cast<char>(ch ^ 0x10));
  };
  flip();
  // Open reads no chunk data; VerifyAll names the chunk.
  auto broken = ExportReader::Open(dir_, kVmId);
  ASSERT_TRUE(broken.ok());
  Status v = (*broken)->VerifyAll();
  EXPECT_EQ(v.code(), Code::kInvalidArgument);
  const std::string name = "chunk " + std::to_string(bad) + " of disk " +
                           vm_.info.disks[c.disk].name + " fails its hash";
  EXPECT_NE(v.message().find(name), std::string::npos) << v.ToString();
  // Records stops at the bad chunk: exactly chunks 0..bad-1 delivered.
  auto recs = (*broken)->Records(0);
  ASSERT_TRUE(recs.ok());
  Rebuilt got = Drain(**recs, vm_.info.disks);
  EXPECT_EQ(got.end.code(), Code::kInvalidArgument);
  EXPECT_EQ(got.records.size(), bad);
  auto again = (*recs)->Next();
  EXPECT_FALSE(again.ok());
  flip();
  ExpectRepairable();
}

TEST_F(ExportRefusal, TruncatedManifest) {
  WriteManifest(manifest_.substr(0, manifest_.size() / 2));
  ExpectRefused("truncated");
  WriteManifest(manifest_.substr(0, manifest_.size() - 5));
  ExpectRefused("truncated");
  WriteManifest("");
  ExpectRefused("bad magic");
  ExpectRepairable();
}

TEST_F(ExportRefusal, ManifestChecksumWrong) {
  std::string text = manifest_;
  const size_t at = text.find("web server 1");
  ASSERT_NE(at, std::string::npos);
  text[at] = 'W';
  WriteManifest(text);
  ExpectRefused("manifest checksum does not match");
  ExpectRepairable();
}

TEST_F(ExportRefusal, ManifestOfAnotherVm) {
  Status s = OpenStatus(kOtherVmId);
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_EQ(s.message(), std::string("manifest is for VM ") + kVmId + ", not " + kOtherVmId);
}

TEST_F(ExportRefusal, ChunkOffsetOutOfBounds) {
  Forge([](Json& b) {
    Json& last = b["chunks"].back();
    last["length"] = last["length"].get<uint64_t>() + 4096;
    if (last["kind"] == "zero") {
      b["totals"]["zero_bytes"] = b["totals"]["zero_bytes"].get<uint64_t>() + 4096;
    }
  });
  ExpectRefused("beyond the disk size");
  ExpectRepairable();
}

TEST_F(ExportRefusal, OverlappingChunks) {
  Forge([](Json& b) {
    Json& c = b["chunks"][2];
    c["offset"] = c["offset"].get<uint64_t>() - 512;
    c["length"] = c["length"].get<uint64_t>() + 512;
  });
  ExpectRefused("overlaps the previous chunk");
  ExpectRepairable();
}

TEST_F(ExportRefusal, FileNameEscapingTheDirectory) {
  for (const char* name : {"../data-000000.bin", "/etc/passwd", "data-000000.bin/..", "x"}) {
    Forge([&](Json& b) {
      for (Json& c : b["chunks"])
        if (c["kind"] == "data") {
          c["file"] = name;
          break;
        }
    });
    ExpectRefused("is not a data file name");
  }
  ExpectRepairable();
}

TEST_F(ExportRefusal, UnknownVersion) {
  Forge([](Json& b) { b["version"] = 2; }, "vmreplica-export 2");
  ExpectRefused("unknown export format version 2");
  ExpectRepairable();
}

TEST_F(ExportRefusal, UnknownKeyAndBadTotals) {
  Forge([](Json& b) { b["extra"] = 1; });
  ExpectRefused("unknown key \"extra\"");
  Forge([](Json& b) { b["totals"]["stored_bytes"] = 1; });
  ExpectRefused("totals do not match");
  Forge([](Json& b) {
    for (Json& c : b["chunks"])
      if (c["kind"] == "data") {
        c["xxh3_128"] = "nothex";
        break;
      }
  });
  ExpectRefused("xxh3_128");
  Forge([](Json& b) { b["disks"][0]["size"] = -1; });
  ExpectRefused("not a non-negative integer");
  ExpectRepairable();
}

TEST_F(ExportRefusal, DataFileMissingOrResized) {
  const std::string f = dir_ + "/data-000000.bin";
  auto bytes = ReadFile(f);
  ASSERT_TRUE(bytes.ok());
  ASSERT_EQ(std::rename(f.c_str(), (f + ".away").c_str()), 0);
  ExpectRefused("data file data-000000.bin is missing");
  ASSERT_EQ(std::rename((f + ".away").c_str(), f.c_str()), 0);
  std::ofstream(f, std::ios::binary | std::ios::app) << "x";
  ExpectRefused("data file data-000000.bin has");
  ASSERT_TRUE(WriteFileAtomic(f, *bytes).ok());
  ExpectRepairable();
}

TEST(InitialExportOpen, MissingDirectoryOrManifestIsNotFound) {
  TempDir tmp("vmr-export");
  EXPECT_EQ(ExportReader::Open(tmp.path() + "/nope", kVmId).status().code(), Code::kNotFound);
  EXPECT_EQ(ExportReader::Open(tmp.path(), kVmId).status().code(), Code::kNotFound);
  EXPECT_EQ(ExportReader::Open(tmp.path(), "bad id").status().code(), Code::kInvalidArgument);
}

// ---------------------------------------------------------------- crash safety

// Hands out the first `limit` records, then fails like a broken NBD read.
class FailingSource final : public DeltaSource {
 public:
  FailingSource(std::vector<DeltaRecord> recs, size_t limit)
      : inner_(std::move(recs)), left_(limit) {}
  Result<std::optional<DeltaRecord>> Next() override {
    if (left_ == 0) return Status::IOError("simulated read failure");
    --left_;
    return inner_.Next();
  }

 private:
  VectorDeltaSource inner_;
  size_t left_;
};

TEST(InitialExportCrash, InterruptedExportIsNotValidAndRerunReplacesIt) {
  TempDir tmp("vmr-export");
  GeneratedVm first = Generate(31, {6u << 20, 6u << 20});
  GeneratedVm second = Generate(32, {6u << 20, 6u << 20});
  const std::string dir = ExportDir(tmp.path());

  // Interrupted before any manifest existed.
  {
    FailingSource src(first.records, first.records.size() / 2);
    auto s = WriteInitialExport(tmp.path(), first.info, src, SmallOptions(false));
    EXPECT_EQ(s.status().code(), Code::kIOError);
    EXPECT_EQ(ExportReader::Open(dir, kVmId).status().code(), Code::kNotFound);
  }
  // A complete export, then an interrupted rerun over it: the old one is no
  // longer valid either (no mix of old manifest and new data).
  ASSERT_TRUE(Export(tmp.path(), first, SmallOptions(false)).ok());
  ASSERT_TRUE(ExportReader::Open(dir, kVmId).ok());
  {
    FailingSource src(second.records, second.records.size() / 2);
    EXPECT_FALSE(WriteInitialExport(tmp.path(), second.info, src, SmallOptions(false)).ok());
    EXPECT_EQ(ExportReader::Open(dir, kVmId).status().code(), Code::kNotFound);
  }
  // A leftover temp manifest, as a crash during its write would leave.
  std::ofstream(dir + "/MANIFEST.tmp") << "vmreplica-export 1\n{";
  EXPECT_EQ(ExportReader::Open(dir, kVmId).status().code(), Code::kNotFound);

  // The rerun replaces everything.
  ExportOptions small_files = SmallOptions(false);
  small_files.max_data_file_bytes = 64u << 20;  // fewer files than before
  auto s = Export(tmp.path(), second, small_files);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  auto r = ExportReader::Open(dir, kVmId);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_TRUE((*r)->VerifyAll().ok());
  auto recs = (*r)->Records(0);
  ASSERT_TRUE(recs.ok());
  Rebuilt got = Drain(**recs, second.info.disks);
  ASSERT_TRUE(got.end.ok());
  for (size_t d = 0; d < 2; ++d) EXPECT_EQ(Hash(got.images[d]), Hash(second.images[d]));
  // Only the new export's files remain.
  std::vector<std::string> expected = {"LOCK", "MANIFEST"};
  for (uint64_t f = 0; f < s->data_files; ++f) {
    char b[32];
    std::snprintf(b, sizeof b, "data-%06u.bin", static_cast<unsigned>(f));
    expected.push_back(b);
  }
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(ListDir(dir), expected);
}

// Hands out `limit` records, then announces it (creates `ready`) and hangs,
// so that a test can kill the writing process in the middle of its work.
class StallingSource final : public DeltaSource {
 public:
  StallingSource(std::vector<DeltaRecord> recs, size_t limit, std::string ready)
      : inner_(std::move(recs)), left_(limit), ready_(std::move(ready)) {}
  Result<std::optional<DeltaRecord>> Next() override {
    if (left_ == 0) {
      std::ofstream(ready_) << "stalled";
      for (;;) pause();
    }
    --left_;
    return inner_.Next();
  }

 private:
  VectorDeltaSource inner_;
  size_t left_;
  std::string ready_;
};

TEST(InitialExportCrash, KilledWriterLeavesNoValidExport) {
  TempDir tmp("vmr-export");
  GeneratedVm first = Generate(34, {4u << 20});
  GeneratedVm second = Generate(35, {4u << 20});
  const std::string dir = ExportDir(tmp.path());
  ASSERT_TRUE(Export(tmp.path(), first, SmallOptions(true)).ok());
  const std::string ready = tmp.path() + "/ready";
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    StallingSource src(second.records, second.records.size() / 2, ready);
    WriteInitialExport(tmp.path(), second.info, src, SmallOptions(true)).status().IgnoreError();
    _exit(0);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (access(ready.c_str(), F_OK) != 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // polls the condition
  const bool stalled = access(ready.c_str(), F_OK) == 0;
  kill(pid, SIGKILL);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(stalled) << "the writer never reached the middle of the export";
  ASSERT_TRUE(WIFSIGNALED(status));
  // Killed with data files half written: not a valid export, old one gone.
  EXPECT_EQ(ExportReader::Open(dir, kVmId).status().code(), Code::kNotFound);
  // The dead writer's lock went with it; a rerun replaces the remains.
  ASSERT_TRUE(Export(tmp.path(), second, SmallOptions(true)).ok());
  auto r = ExportReader::Open(dir, kVmId);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  auto recs = (*r)->Records(0);
  ASSERT_TRUE(recs.ok());
  Rebuilt got = Drain(**recs, second.info.disks);
  ASSERT_TRUE(got.end.ok()) << got.end.ToString();
  EXPECT_EQ(Hash(got.images[0]), Hash(second.images[0]));
}

TEST(InitialExportCrash, CancelLeavesNoValidExport) {
  TempDir tmp("vmr-export");
  GeneratedVm vm = Generate(33, {2u << 20});
  std::atomic<bool> cancel{true};
  ExportOptions o = SmallOptions(true);
  o.cancel = &cancel;
  EXPECT_EQ(Export(tmp.path(), vm, o).status().code(), Code::kCancelled);
  EXPECT_EQ(ExportReader::Open(ExportDir(tmp.path()), kVmId).status().code(), Code::kNotFound);
}

// ---------------------------------------------------------------- resume

TEST(InitialExportResume, RecordsFromChunkKYieldExactlyTheRest) {
  TempDir tmp("vmr-export");
  GeneratedVm vm = Generate(41, {5u << 20, (3u << 20) + 8192});
  ASSERT_TRUE(Export(tmp.path(), vm, SmallOptions(true)).ok());
  auto r = ExportReader::Open(ExportDir(tmp.path()), kVmId);
  ASSERT_TRUE(r.ok());
  const size_t n = (*r)->chunk_count();
  ASSERT_GT(n, 6u);
  for (size_t k : {size_t{1}, n / 3, n / 2, n - 1, n}) {
    auto recs = (*r)->Records(k);
    ASSERT_TRUE(recs.ok());
    // Start from images equal to the source everywhere before chunk k's
    // range and garbage after: the records must restore the rest exactly.
    std::vector<std::string> images = vm.images;
    for (size_t i = k; i < n; ++i) {
      const ExportChunk& c = (*r)->chunk(i);
      images[c.disk].replace(c.offset, c.length, c.length, '\x5A');
    }
    size_t i = k;
    for (;;) {
      auto next = (*recs)->Next();
      ASSERT_TRUE(next.ok()) << next.status().ToString();
      if (!next->has_value()) break;
      const DeltaRecord& rec = **next;
      ASSERT_LT(i, n);
      const ExportChunk& c = (*r)->chunk(i);
      EXPECT_EQ(rec.disk, c.disk);
      EXPECT_EQ(rec.offset, c.offset);
      EXPECT_EQ(rec.length, c.length);
      EXPECT_EQ(rec.zero, c.zero);
      if (rec.zero) {
        images[rec.disk].replace(rec.offset, rec.length, rec.length, '\0');
      } else {
        images[rec.disk].replace(rec.offset, rec.length, rec.data);
      }
      ++i;
    }
    EXPECT_EQ(i, n);
    for (size_t d = 0; d < 2; ++d) EXPECT_EQ(Hash(images[d]), Hash(vm.images[d])) << "k=" << k;
  }
  EXPECT_EQ((*r)->Records(n + 1).status().code(), Code::kInvalidArgument);
}

}  // namespace
}  // namespace vmreplica
