#include "vmreplica/fileutil.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

namespace vmreplica {
namespace {

std::string TempDir() {
  char tmpl[] = "/tmp/vmr-fileutil-XXXXXX";
  return ::mkdtemp(tmpl);
}

TEST(FileUtilTest, AtomicWriteReplacesContentAndLeavesNoTemp) {
  std::string dir = TempDir();
  std::string p = dir + "/f";
  ASSERT_TRUE(WriteFileAtomic(p, "one").ok());
  ASSERT_TRUE(WriteFileAtomic(p, "two", 0600).ok());
  EXPECT_EQ(*ReadFile(p), "two");
  EXPECT_FALSE(std::filesystem::exists(p + ".tmp"));
  EXPECT_EQ(std::filesystem::status(p).permissions() & std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  std::filesystem::remove_all(dir);
}

TEST(FileUtilTest, MissingFileIsNotFoundAndOversizedIsRefused) {
  std::string dir = TempDir();
  EXPECT_EQ(ReadFile(dir + "/nope").status().code(), Code::kNotFound);
  ASSERT_TRUE(WriteFileAtomic(dir + "/big", std::string(100, 'x')).ok());
  EXPECT_EQ(ReadFile(dir + "/big", 10).status().code(), Code::kInvalidArgument);
  std::filesystem::remove_all(dir);
}

TEST(FileUtilTest, SecondLockOnTheSameFileIsBusy) {
  std::string dir = TempDir();
  auto first = FileLock::Acquire(dir + "/lock");
  ASSERT_TRUE(first.ok());
  // flock locks belong to the open file description: a second open in the
  // same process conflicts just as another process would.
  auto second = FileLock::Acquire(dir + "/lock");
  EXPECT_EQ(second.status().code(), Code::kBusy);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace vmreplica
