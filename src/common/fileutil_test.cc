#include "vmreplica/fileutil.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <random>
#include <vector>

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

// A file of `size` bytes: holes except the given extents, each of
// (offset, bytes, fill) where fill < 0 means random bytes.
struct Extent {
  uint64_t offset;
  uint64_t bytes;
  int fill;
};
void MakeSparse(const std::string& path, uint64_t size, const std::vector<Extent>& extents, uint32_t seed) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  ASSERT_GE(fd, 0) << path;
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(size)), 0);
  std::mt19937 rng(seed);
  for (const Extent& e : extents) {
    std::string b(e.bytes, static_cast<char>(e.fill < 0 ? 0 : e.fill));
    if (e.fill < 0)
      for (char& c : b) c = static_cast<char>(rng());
    ASSERT_EQ(::pwrite(fd, b.data(), b.size(), static_cast<off_t>(e.offset)), static_cast<ssize_t>(b.size()));
  }
  ::close(fd);
}

// Whether [offset, offset+len) of the file holds no allocated block.
bool IsHole(const std::string& path, uint64_t offset, uint64_t len) {
  int fd = ::open(path.c_str(), O_RDONLY);
  const off_t d = ::lseek(fd, static_cast<off_t>(offset), SEEK_DATA);
  ::close(fd);
  return d < 0 || static_cast<uint64_t>(d) >= offset + len;
}

Status Copy(const std::string& src, const std::string& dst, uint64_t size, SparseCopyStats* stats,
            const std::function<bool()>& cancelled = {}) {
  int in = ::open(src.c_str(), O_RDONLY);
  int out = ::open(dst.c_str(), O_WRONLY);
  Status s = CopyFileSparse(in, out, size, stats, {}, cancelled);
  ::close(in);
  ::close(out);
  return s;
}

constexpr uint64_t kMiB = 1u << 20;

// The destination held other data everywhere: after the copy it reads as
// the source, the source's holes are holes in it, and on one file system
// the kernel copied the data.
TEST(CopyFileSparseTest, SameFileSystemCopiesTheDataAndPunchesTheHoles) {
  std::string dir = TempDir();
  const uint64_t size = 24 * kMiB;
  MakeSparse(dir + "/src", size, {{0, kMiB, -1}, {5 * kMiB, 3 * kMiB, -1}, {20 * kMiB, 4 * kMiB, 7}}, 1);
  MakeSparse(dir + "/dst", size, {{0, size, 0xAA}}, 2);
  SparseCopyStats stats;
  ASSERT_TRUE(Copy(dir + "/src", dir + "/dst", size, &stats).ok());
  EXPECT_EQ(*ReadFile(dir + "/dst", size), *ReadFile(dir + "/src", size));
  EXPECT_EQ(stats.data_bytes, 8 * kMiB);
  EXPECT_EQ(stats.hole_bytes, 16 * kMiB);
  EXPECT_TRUE(IsHole(dir + "/dst", kMiB, 4 * kMiB));
  EXPECT_TRUE(IsHole(dir + "/dst", 8 * kMiB, 12 * kMiB));
  EXPECT_FALSE(IsHole(dir + "/dst", 5 * kMiB, 3 * kMiB));
  EXPECT_EQ(stats.kernel_bytes, stats.data_bytes) << "copy_file_range within one file system";
  std::filesystem::remove_all(dir);
}

// From another file system (tmpfs into /tmp) the kernel refuses
// copy_file_range (EXDEV): the copy reads and writes, and a data extent of
// zeros becomes a hole.
TEST(CopyFileSparseTest, AcrossFileSystemsReadsAndWritesAndZerosBecomeHoles) {
  std::string dir = TempDir();
  char tmpl[] = "/dev/shm/vmr-fileutil-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string shm = tmpl;
  struct stat a, b;
  ASSERT_EQ(::stat(shm.c_str(), &a), 0);
  ASSERT_EQ(::stat(dir.c_str(), &b), 0);
  ASSERT_NE(a.st_dev, b.st_dev) << "the test needs /dev/shm and /tmp on different file systems";
  const uint64_t size = 8 * kMiB + 4096;  // a tail shorter than a piece
  MakeSparse(shm + "/src", size, {{kMiB, 2 * kMiB, -1}, {4 * kMiB, 2 * kMiB, 0}, {8 * kMiB, 4096, -1}}, 3);
  MakeSparse(dir + "/dst", size, {{0, size, 0x55}}, 4);
  SparseCopyStats stats;
  ASSERT_TRUE(Copy(shm + "/src", dir + "/dst", size, &stats).ok());
  EXPECT_EQ(*ReadFile(dir + "/dst", size), *ReadFile(shm + "/src", size));
  EXPECT_EQ(stats.kernel_bytes, 0u);
  EXPECT_EQ(stats.data_bytes, 2 * kMiB + 4096);
  EXPECT_EQ(stats.hole_bytes, size - stats.data_bytes);
  EXPECT_TRUE(IsHole(dir + "/dst", 4 * kMiB, 2 * kMiB)) << "written zeros of the source became a hole";
  std::filesystem::remove_all(shm);
  std::filesystem::remove_all(dir);
}

TEST(CopyFileSparseTest, ASourceShorterThanTheSizeOrACancelIsAnError) {
  std::string dir = TempDir();
  MakeSparse(dir + "/src", 2 * kMiB, {{0, 2 * kMiB, -1}}, 5);
  MakeSparse(dir + "/dst", 4 * kMiB, {}, 6);
  SparseCopyStats stats;
  Status s = Copy(dir + "/src", dir + "/dst", 4 * kMiB, &stats);
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.ToString();
  s = Copy(dir + "/src", dir + "/dst", 2 * kMiB, &stats, [] { return true; });
  EXPECT_EQ(s.code(), Code::kCancelled) << s.ToString();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace vmreplica
