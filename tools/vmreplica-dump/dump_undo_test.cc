// Runs the vmreplica-dump binary (built beside this test; ctest sets
// VMREPLICA_BUILD_DIR) on undo segments and a MANIFEST written by a real
// ReplicaStore, intact and with a flipped byte, and checks its exit codes.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "dump_test_util.h"
#include "vmreplica/delta.h"
#include "vmreplica/replica_store.h"

namespace vmreplica {
namespace {

namespace fs = std::filesystem;

using dump_testing::RunResult;

class DumpUndoTest : public ::testing::Test {
 protected:
  void SetUp() override { MakeStore(/*compress_undo=*/false); }

  // Two deltas into a fresh store; the undo segment of point 1 is kept.
  void MakeStore(bool compress_undo) {
    tool_ = dump_testing::ToolPath();
    ASSERT_FALSE(tool_.empty()) << "vmreplica-dump not found under $VMREPLICA_BUILD_DIR (run through ctest)";
    std::string tmpl = (fs::temp_directory_path() / "dump_undo_test.XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    store_dir_ = dir_ + "/store";
    ReplicaStoreOptions options;
    options.compress_undo = compress_undo;
    options.now_ms = [] { return int64_t{1'700'000'000'000}; };  // every point stays in the fine window
    auto store = ReplicaStore::Create(store_dir_, "vm-undo", {{"vda", 1 << 20}, {"vdb", 1 << 20}}, nullptr, options);
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    // Delta 1 fills blocks 0..1 of vda and 3 of vdb; delta 2 overwrites
    // block 0 of vda (a data before-image) and block 5 of vdb (a zero one).
    VectorDeltaSource d1({DataRecord(0, 0, std::string(8192, 'a')), DataRecord(1, 3 * 4096, std::string(4096, 'c'))});
    ASSERT_TRUE((*store)->Apply(1, {1'700'000'000'000, ReplicationType::kRegular, "g1"}, d1).ok());
    VectorDeltaSource d2({DataRecord(0, 0, std::string(4096, 'b')), DataRecord(1, 5 * 4096, std::string(4096, 'd')),
                          ZeroRecord(0, 4096, 4096)});
    ASSERT_TRUE((*store)->Apply(2, {1'700'000'000'000, ReplicationType::kRegular, "g2"}, d2).ok());
    ASSERT_EQ((*store)->ListPoints().size(), 3u);
    store->reset();  // closed: the files are final
    segment_ = store_dir_ + "/undo/00000000000000000001.vru";
    ASSERT_TRUE(fs::exists(segment_)) << "no undo segment for point 1 under " << store_dir_ << "/undo";
  }
  void TearDown() override {
    std::error_code ec;
    if (!dir_.empty()) fs::remove_all(dir_, ec);
  }

  RunResult Run(const std::string& args) { return dump_testing::RunTool(tool_, args); }

  // A copy of `from` with the byte at `flip_at` changed.
  std::string Flipped(const std::string& from, const std::string& name, size_t flip_at) {
    std::ifstream in(from, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    std::string bytes = ss.str();
    EXPECT_LT(flip_at, bytes.size());
    if (flip_at < bytes.size()) bytes[flip_at] ^= 0x40;
    std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }

  std::string tool_, dir_, store_dir_, segment_;
};

TEST_F(DumpUndoTest, StoreSegmentExitsZeroAndListsEntries) {
  RunResult r = Run(segment_);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("format undo-segment version 1"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("point_seq 1\nupper_seq 2"), std::string::npos) << r.out;
  // Block 0 of vda held 'a' at point 1: a data before-image, first entry.
  EXPECT_NE(r.out.find("entry @64 disk 0 block 0 offset 0 data payload 4096"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("disk 1 block 5 offset 20480 was-zero payload 0"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("disk 0 block 1 offset 4096 data"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("batch @"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("trailer complete entries 3 data 2 was-zero 1"), std::string::npos) << r.out;
}

TEST_F(DumpUndoTest, CompressedBeforeImagesAreShownAndVerified) {
  TearDown();
  MakeStore(/*compress_undo=*/true);
  RunResult r = Run(segment_);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  // 4096 bytes of 'a' compress to a few bytes: a zstd entry, payload < 4096.
  EXPECT_NE(r.out.find("entry @64 disk 0 block 0 offset 0 data zstd payload "), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("data zstd payload 4096"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("trailer complete entries 3 data 2 was-zero 1"), std::string::npos) << r.out;
}

TEST_F(DumpUndoTest, JsonOutputParses) {
  RunResult r = Run("--json " + segment_);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(j.is_discarded()) << r.out;
  EXPECT_EQ(j["ok"], true);
  EXPECT_EQ(j["format"], "undo-segment");
  EXPECT_EQ(j["header"]["point_seq"], 1);
  EXPECT_EQ(j["header"]["disk_count"], 2);
  EXPECT_EQ(j["records"][0]["type"], "entry");
  EXPECT_EQ(j["records"][0]["was_zero"], false);
  EXPECT_EQ(j["trailer"]["complete"], true);
  EXPECT_EQ(j["trailer"]["entries"], 3);
}

TEST_F(DumpUndoTest, EveryStoreSegmentExitsZero) {
  int count = 0;
  for (const auto& e : fs::directory_iterator(store_dir_ + "/undo")) {
    if (e.path().extension() != ".vru") continue;
    ++count;
    RunResult r = Run("-q " + e.path().string());
    EXPECT_EQ(r.exit_code, 0) << e.path() << "\n" << r.out;
  }
  EXPECT_EQ(count, 2);  // points 0 and 1; the latest has no segment
}

TEST_F(DumpUndoTest, FlippedPayloadByteExitsOneNamingTheEntry) {
  std::string bad = Flipped(segment_, "bad_payload.vru", 64 + 32 + 100);  // first entry's payload
  RunResult r = Run(bad);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("ERROR Corruption: undo segment: at offset 64: entry checksum mismatch"), std::string::npos)
      << r.out;
  RunResult j = Run("--json " + bad);
  EXPECT_EQ(j.exit_code, 1);
  auto parsed = nlohmann::json::parse(j.out, nullptr, false);
  ASSERT_FALSE(parsed.is_discarded()) << j.out;
  EXPECT_EQ(parsed["ok"], false);
}

TEST_F(DumpUndoTest, FlippedHeaderByteExitsOneAtOffsetZero) {
  RunResult r = Run(Flipped(segment_, "bad_header.vru", 20));  // point_seq
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("at offset 0: undo segment: header checksum mismatch"), std::string::npos) << r.out;
}

TEST_F(DumpUndoTest, FlippedTrailerByteExitsOneNamingTheTrailer) {
  size_t size = fs::file_size(segment_);
  RunResult r = Run(Flipped(segment_, "bad_trailer.vru", size - 32 + 12));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("at offset " + std::to_string(size - 32) + ": trailer checksum mismatch"), std::string::npos)
      << r.out;
}

TEST_F(DumpUndoTest, SegmentWithoutTrailerIsCorruptUnlessPartial) {
  std::string path = dir_ + "/cut.vru";
  fs::copy_file(segment_, path);
  size_t size = fs::file_size(segment_);
  fs::resize_file(path, size - 32 - 10);  // no trailer, torn end of the last batch marker
  RunResult r = Run(path);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("truncated record header"), std::string::npos) << r.out;
  r = Run("--partial " + path);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("no trailer (partial)"), std::string::npos) << r.out;
}

TEST_F(DumpUndoTest, ManifestDumpsAndFlippedByteExitsOne) {
  std::string manifest = store_dir_ + "/MANIFEST";
  RunResult r = Run(manifest);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("format replica-manifest version 1"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("vm_id vm-undo"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("points 3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("point 2 time_ms 1700000000000 kind 1 generation g2"), std::string::npos) << r.out;
  size_t size = fs::file_size(manifest);
  RunResult bad = Run(Flipped(manifest, "MANIFEST.bad", 20));
  EXPECT_EQ(bad.exit_code, 1) << bad.out;
  EXPECT_NE(bad.out.find("at offset " + std::to_string(size - 8) + ": replica MANIFEST: checksum mismatch"),
            std::string::npos)
      << bad.out;
}

}  // namespace
}  // namespace vmreplica
