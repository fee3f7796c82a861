// Runs the vmreplica-dump binary (built beside this test; ctest sets
// VMREPLICA_BUILD_DIR) on good and bad files and checks its exit codes.
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
#include "vmreplica/logformat.h"

namespace vmreplica {
namespace {

namespace fs = std::filesystem;

using dump_testing::RunResult;

class DumpToolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tool_ = dump_testing::ToolPath();
    ASSERT_FALSE(tool_.empty()) << "vmreplica-dump not found under $VMREPLICA_BUILD_DIR (run through ctest)";
    std::string tmpl = (fs::temp_directory_path() / "dump_test.XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    good_ = dir_ + "/good.vrl";
    LogHeader h;
    h.relationship_id = "vm-dump";
    h.sequence = 3;
    h.kind = ReplicationType::kPlanned;
    h.disks = {{"vda", 1 << 20}, {"vdb", 1 << 20}};
    LogWriterOptions options;
    options.sync = false;
    auto w = LogWriter::Create(good_, h, options);
    ASSERT_TRUE(w.ok());
    DeltaRecord data{0, 0, 8192, false, std::string(8192, 'q')};
    DeltaRecord zero{1, 4096, 4096, true, ""};
    ASSERT_TRUE((*w)->Add(data).ok());
    ASSERT_TRUE((*w)->Add(zero).ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }
  void TearDown() override {
    std::error_code ec;
    if (!dir_.empty()) fs::remove_all(dir_, ec);
  }

  RunResult Run(const std::string& args) { return dump_testing::RunTool(tool_, args); }

  std::string Copy(const std::string& name, size_t flip_at) {
    std::ifstream in(good_, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    std::string bytes = ss.str();
    if (flip_at < bytes.size()) bytes[flip_at] ^= 0x40;
    std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }

  std::string tool_, dir_, good_;
};

TEST_F(DumpToolTest, GoodLogExitsZeroAndListsRecords) {
  RunResult r = Run(good_);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("relationship vm-dump"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("data disk 0 offset 0 length 8192 compression zstd"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("zero disk 1 offset 4096 length 4096"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("trailer complete records 2"), std::string::npos) << r.out;
}

TEST_F(DumpToolTest, JsonOutputParses) {
  RunResult r = Run("--json " + good_);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(j.is_discarded()) << r.out;
  EXPECT_EQ(j["ok"], true);
  EXPECT_EQ(j["header"]["kind"], 3);
  EXPECT_EQ(j["records"].size(), 2u);
  EXPECT_EQ(j["records"][0]["compression"], "zstd");
  EXPECT_EQ(j["trailer"]["record_count"], 2);
}

TEST_F(DumpToolTest, CorruptLogExitsOneWithOffset) {
  std::string bad = Copy("bad.vrl", 200);  // inside the first record
  RunResult r = Run(bad);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("Corruption"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("at offset"), std::string::npos) << r.out;
  RunResult j = Run("--json " + bad);
  EXPECT_EQ(j.exit_code, 1);
  auto parsed = nlohmann::json::parse(j.out, nullptr, false);
  ASSERT_FALSE(parsed.is_discarded()) << j.out;
  EXPECT_EQ(parsed["ok"], false);
}

TEST_F(DumpToolTest, TruncatedLogIsCorruptUnlessPartial) {
  std::string path = dir_ + "/cut.vrl";
  fs::copy_file(good_, path);
  fs::resize_file(path, fs::file_size(good_) - 10);
  EXPECT_EQ(Run(path).exit_code, 1);
  RunResult r = Run("--partial " + path);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("no trailer (partial) records 2"), std::string::npos) << r.out;
}

TEST_F(DumpToolTest, UnknownMagicExitsOne) {
  std::string path = dir_ + "/other";
  std::ofstream(path) << "this is not a vmreplica file";
  EXPECT_EQ(Run(path).exit_code, 1);
}

TEST_F(DumpToolTest, UsageErrorsExitTwo) {
  EXPECT_EQ(Run("").exit_code, 2);
  EXPECT_EQ(Run("--no-such-flag " + good_).exit_code, 2);
  EXPECT_EQ(Run(dir_ + "/missing.vrl").exit_code, 2);
}

}  // namespace
}  // namespace vmreplica
