// MakeDiskWrapper with real qemu-img and qemu-storage-daemon (e2e, no
// guest): the wrapper shows the raw file's bytes, writes through it land in
// the raw file at the same offsets and are recorded in its persistent bitmap
// (consistent after a SIGTERM of the daemon, inconsistent after a SIGKILL),
// the raw file's size never changes, and bad inputs are refused. Expected
// bytes and ranges are computed here from what the test wrote.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "blockio/qsd_testing.h"
#include "vmreplica/nbd_reader.h"
#include "vmreplica/vm_launcher.h"

namespace vmreplica {
namespace {

using blockio_testing::QemuIo;
using blockio_testing::Qsd;
using blockio_testing::RunCommand;
using blockio_testing::TempDir;

constexpr uint64_t kSize = 32ull << 20;
constexpr uint64_t kWritable = 24ull << 20;  // writes stay below; the rest stays a hole
const char* const kBitmap = "vmr-vm1-g1";
const char* const kContext = "qemu:dirty-bitmap:vmr-vm1-g1";

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

uint64_t FileSize(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : ~0ull;
}

// A sparse raw file: data at a few places (each 4 KiB block distinct), holes
// elsewhere. Returns its bytes.
std::string MakeRaw(const std::string& path) {
  std::string bytes(kSize, '\0');
  for (uint64_t at : {0ull, 1ull << 20, 5ull << 20, 20ull << 20}) {
    for (uint64_t i = at; i < at + (256u << 10); ++i) bytes[i] = static_cast<char>((i * 31 + (i >> 12)) & 0xff);
  }
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  for (uint64_t at : {0ull, 1ull << 20, 5ull << 20, 20ull << 20}) {
    f.seekp(static_cast<std::streamoff>(at));
    f.write(bytes.data() + at, 256 << 10);
  }
  f.close();
  EXPECT_EQ(::truncate(path.c_str(), static_cast<off_t>(kSize)), 0);
  return bytes;
}

nlohmann::json Info(const std::string& image) {
  auto out = RunCommand({"qemu-img", "info", "-U", "--output=json", image});
  EXPECT_TRUE(out.ok()) << out.status().ToString();
  if (!out.ok()) return nlohmann::json();
  return nlohmann::json::parse(*out, nullptr, false);
}

// The flags of `bitmap` in the image's header; nullopt when it has none.
std::optional<std::vector<std::string>> BitmapFlags(const std::string& image, const std::string& bitmap) {
  nlohmann::json j = Info(image);
  if (!j.is_object() || !j.contains("format-specific")) return std::nullopt;
  const auto& d = j["format-specific"]["data"];
  if (!d.contains("bitmaps")) return std::nullopt;
  for (const auto& b : d["bitmaps"]) {
    if (b["name"] == bitmap) {
      EXPECT_EQ(b["granularity"], 4096);
      return b["flags"].get<std::vector<std::string>>();
    }
  }
  return std::nullopt;
}

bool Has(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

// Everything the export shows, rebuilt from a full initial-copy read.
std::string ExportBytes(const Qsd& qsd) {
  auto r = NbdDeltaReader::Open(qsd.socket(), qsd.export_name(), 0, std::nullopt);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  if (!r.ok()) return "";
  EXPECT_EQ((*r)->size(), kSize);
  std::string out(kSize, '\0');
  for (;;) {
    auto rec = (*r)->Next();
    EXPECT_TRUE(rec.ok()) << rec.status().ToString();
    if (!rec.ok() || !rec->has_value()) break;
    if (!(*rec)->zero) out.replace((*rec)->offset, (*rec)->length, (*rec)->data);
  }
  return out;
}

struct Span {
  uint64_t begin;
  uint64_t end;
  bool operator==(const Span&) const = default;
};

// Written ranges rounded out to 4 KiB, united.
std::vector<Span> Dirty(std::vector<Span> w) {
  for (Span& s : w) {
    s.begin -= s.begin % 4096;
    s.end = (s.end + 4095) / 4096 * 4096;
  }
  std::sort(w.begin(), w.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  std::vector<Span> out;
  for (const Span& s : w) {
    if (!out.empty() && s.begin <= out.back().end) {
      out.back().end = std::max(out.back().end, s.end);
    } else {
      out.push_back(s);
    }
  }
  return out;
}

std::vector<Span> DirtyOf(const Qsd& qsd) {
  auto r = NbdDirtyExtents(qsd.socket(), qsd.export_name(), kContext, 0);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  std::vector<Span> out;
  if (r.ok()) {
    for (const auto& x : *r) out.push_back(Span{x.offset, x.offset + x.length});
  }
  return out;
}

// Random writes below kWritable through the export: applied to `model`,
// recorded in `written`.
void RandomWrites(const Qsd& qsd, std::mt19937_64& rng, int count, std::string& model, std::vector<Span>& written) {
  std::vector<std::string> cmds;
  for (int i = 0; i < count; ++i) {
    const uint64_t off = rng() % (kWritable - (1u << 20));
    const uint64_t len = 1 + rng() % (rng() % 2 == 0 ? 3000 : (600u << 10));
    const int pattern = static_cast<int>(1 + rng() % 255);
    cmds.push_back("write -P " + std::to_string(pattern) + " " + std::to_string(off) + " " + std::to_string(len));
    model.replace(off, len, len, static_cast<char>(pattern));
    written.push_back(Span{off, off + len});
  }
  Status s = QemuIo(qsd.uri(), cmds);
  ASSERT_TRUE(s.ok()) << "qemu-io is required: " << s.ToString();
}

class DiskWrapperTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.ok());
    for (const char* tool : {"qemu-img", "qemu-io", "qemu-storage-daemon"}) {
      ASSERT_EQ(std::system((std::string("command -v ") + tool + " >/dev/null").c_str()), 0) << tool << " is required";
    }
    raw_ = tmp_.path() + "/store/disks/vda.img";
    std::filesystem::create_directories(tmp_.path() + "/store/disks");
    std::filesystem::create_directories(tmp_.path() + "/wrappers");
    std::filesystem::create_directories(tmp_.path() + "/q");
    wrapper_ = tmp_.path() + "/wrappers/vda.qcow2";
    bytes_ = MakeRaw(raw_);
  }

  TempDir tmp_{"vmr-wrap"};
  std::string raw_;
  std::string wrapper_;
  std::string bytes_;
};

TEST_F(DiskWrapperTest, WritesLandInTheRawFileAndTheBitmapSurvivesACleanStopOnly) {
  Status s = MakeDiskWrapper(raw_, wrapper_, kSize, kBitmap);
  ASSERT_TRUE(s.ok()) << s.ToString();
  // Only the wrapper is left; the raw file is as it was.
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(tmp_.path() + "/wrappers")) {
    names.push_back(e.path().filename().string());
  }
  EXPECT_EQ(names, std::vector<std::string>{"vda.qcow2"});
  EXPECT_EQ(FileSize(raw_), kSize);
  EXPECT_TRUE(ReadAll(raw_) == bytes_) << "the raw file changed";
  nlohmann::json info = Info(wrapper_);
  EXPECT_EQ(info["format"], "qcow2");
  EXPECT_EQ(info["virtual-size"], kSize);
  EXPECT_EQ(info["cluster-size"], 1 << 20);
  EXPECT_EQ(info["format-specific"]["data"]["data-file"], raw_);
  EXPECT_EQ(info["format-specific"]["data"]["data-file-raw"], true);
  auto flags = BitmapFlags(wrapper_, kBitmap);
  ASSERT_TRUE(flags.has_value());
  EXPECT_TRUE(Has(*flags, "auto")) << "the bitmap is not enabled";
  EXPECT_FALSE(Has(*flags, "in-use"));

  auto qsd = Qsd::Start(tmp_.path() + "/q", wrapper_, std::string(kBitmap));
  ASSERT_TRUE(qsd.ok()) << qsd.status().ToString();
  // The raw file's bytes read through the wrapper; nothing is dirty yet.
  EXPECT_TRUE(ExportBytes(**qsd) == bytes_) << "the export does not show the raw file's bytes";
  EXPECT_EQ(DirtyOf(**qsd), std::vector<Span>{});

  std::mt19937_64 rng(7);
  std::string model = bytes_;
  std::vector<Span> written;
  RandomWrites(**qsd, rng, 40, model, written);
  // Same offsets in the raw file (read beside the running daemon: the page
  // cache is shared).
  EXPECT_TRUE(ReadAll(raw_) == model) << "writes did not land in the raw file at their offsets";
  EXPECT_EQ(FileSize(raw_), kSize);
  EXPECT_EQ(DirtyOf(**qsd), Dirty(written));

  // A clean stop stores the bitmap consistent, and a new daemon sees it.
  ASSERT_TRUE((*qsd)->Stop().ok());
  flags = BitmapFlags(wrapper_, kBitmap);
  ASSERT_TRUE(flags.has_value());
  EXPECT_FALSE(Has(*flags, "in-use")) << "inconsistent after a clean stop";
  EXPECT_TRUE(Has(*flags, "auto"));
  EXPECT_TRUE(ReadAll(raw_) == model);
  EXPECT_EQ(FileSize(raw_), kSize);
  // Holes the guest never wrote stay holes.
  {
    const int fd = ::open(raw_.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    const off_t data = ::lseek(fd, static_cast<off_t>(kWritable), SEEK_DATA);
    EXPECT_TRUE(data < 0 || static_cast<uint64_t>(data) >= kSize) << "data at " << data;
    ::close(fd);
  }
  // Making it again is a no-op, also while it is in use.
  ASSERT_TRUE(MakeDiskWrapper(raw_, wrapper_, kSize, kBitmap).ok());

  qsd = Qsd::Start(tmp_.path() + "/q", wrapper_, std::string(kBitmap));
  ASSERT_TRUE(qsd.ok()) << qsd.status().ToString();
  EXPECT_EQ(DirtyOf(**qsd), Dirty(written)) << "the bitmap lost writes over a clean stop";
  EXPECT_TRUE(ExportBytes(**qsd) == model);
  s = MakeDiskWrapper(raw_, wrapper_, kSize, kBitmap);
  EXPECT_TRUE(s.ok()) << s.ToString();
  RandomWrites(**qsd, rng, 10, model, written);
  EXPECT_EQ(DirtyOf(**qsd), Dirty(written));

  // A crash leaves the bitmap inconsistent (in use, nobody holds it), the
  // data written before it in the raw file.
  (*qsd)->Kill();
  flags = BitmapFlags(wrapper_, kBitmap);
  ASSERT_TRUE(flags.has_value());
  EXPECT_TRUE(Has(*flags, "in-use")) << "a killed daemon left the bitmap consistent";
  EXPECT_TRUE(ReadAll(raw_) == model);
  EXPECT_EQ(FileSize(raw_), kSize);
  // QEMU refuses to export an inconsistent bitmap: tracking is lost.
  EXPECT_FALSE(Qsd::Start(tmp_.path() + "/q", wrapper_, std::string(kBitmap)).ok());
}

TEST_F(DiskWrapperTest, ExistingWrappersAreKeptOrRefusedAndLeftoversReplaced) {
  ASSERT_TRUE(MakeDiskWrapper(raw_, wrapper_, kSize, kBitmap).ok());
  struct stat before {};
  ASSERT_EQ(::stat(wrapper_.c_str(), &before), 0);
  ASSERT_TRUE(MakeDiskWrapper(raw_, wrapper_, kSize, kBitmap).ok());
  struct stat again {};
  ASSERT_EQ(::stat(wrapper_.c_str(), &again), 0);
  EXPECT_EQ(before.st_ino, again.st_ino) << "an existing good wrapper was made again";

  // Another raw file of the same size, another bitmap: not this wrapper.
  const std::string other_raw = tmp_.path() + "/store/disks/vdb.img";
  MakeRaw(other_raw);
  const std::string header = ReadAll(wrapper_);
  Status s = MakeDiskWrapper(other_raw, wrapper_, kSize, kBitmap);
  EXPECT_EQ(s.code(), Code::kAlreadyExists) << s.ToString();
  s = MakeDiskWrapper(raw_, wrapper_, kSize, "vmr-vm1-g2");
  EXPECT_EQ(s.code(), Code::kAlreadyExists) << s.ToString();
  EXPECT_TRUE(ReadAll(wrapper_) == header) << "a refused call changed the wrapper";
  const std::string junk = tmp_.path() + "/wrappers/junk.qcow2";
  std::ofstream(junk) << "not an image";
  s = MakeDiskWrapper(raw_, junk, kSize, kBitmap);
  EXPECT_EQ(s.code(), Code::kAlreadyExists) << s.ToString();
  EXPECT_EQ(ReadAll(junk), "not an image");

  // Leftovers of a crash in the middle: a torn .part and the scratch file.
  const std::string w2 = tmp_.path() + "/wrappers/vdb.qcow2";
  std::ofstream(w2 + ".part") << "torn";
  std::ofstream(tmp_.path() + "/wrappers/.vdb.tmp") << "scratch";
  s = MakeDiskWrapper(other_raw, w2, kSize, kBitmap);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_FALSE(std::filesystem::exists(w2 + ".part"));
  EXPECT_FALSE(std::filesystem::exists(tmp_.path() + "/wrappers/.vdb.tmp"));
  EXPECT_EQ(Info(w2)["format-specific"]["data"]["data-file"], other_raw);
  EXPECT_TRUE(BitmapFlags(w2, kBitmap).has_value());
  EXPECT_EQ(FileSize(other_raw), kSize);
}

TEST_F(DiskWrapperTest, BadInputsAreRefusedAndTheRawFileIsNeverTouched) {
  auto refused = [&](const std::string& raw, const std::string& wrapper, uint64_t size, const std::string& bitmap,
                     Code code, const std::string& needle, const std::string& qemu_img = "qemu-img") {
    Status s = MakeDiskWrapper(raw, wrapper, size, bitmap, qemu_img);
    EXPECT_EQ(s.code(), code) << s.ToString();
    EXPECT_NE(s.message().find(needle), std::string::npos) << s.ToString();
  };
  refused("store/disks/vda.img", wrapper_, kSize, kBitmap, Code::kInvalidArgument, "raw_path");
  refused(raw_, "wrappers/vda.qcow2", kSize, kBitmap, Code::kInvalidArgument, "wrapper_path");
  refused(raw_, tmp_.path() + "/wrappers/a,b.qcow2", kSize, kBitmap, Code::kInvalidArgument, "wrapper_path");
  refused(raw_, raw_, kSize, kBitmap, Code::kInvalidArgument, "wrapper_path");
  refused(raw_, wrapper_, 0, kBitmap, Code::kInvalidArgument, "size_bytes");
  refused(raw_, wrapper_, kSize + 100, kBitmap, Code::kInvalidArgument, "size_bytes");
  refused(raw_, wrapper_, kSize - 512, kBitmap, Code::kInvalidArgument, "bytes, not");  // never truncated
  refused(raw_, wrapper_, kSize + 512, kBitmap, Code::kInvalidArgument, "bytes, not");  // never grown
  refused(raw_, wrapper_, kSize, "", Code::kInvalidArgument, "bitmap_name");
  refused(raw_, wrapper_, kSize, "a\nb", Code::kInvalidArgument, "bitmap_name");
  refused(raw_, wrapper_, kSize, "-g", Code::kInvalidArgument, "bitmap_name");
  refused(tmp_.path() + "/store/disks/none.img", wrapper_, kSize, kBitmap, Code::kNotFound, "raw_path");
  refused(tmp_.path() + "/store/disks", wrapper_, kSize, kBitmap, Code::kInvalidArgument, "not a regular file");
  refused(raw_, tmp_.path() + "/nodir/vda.qcow2", kSize, kBitmap, Code::kInvalidArgument, "no directory");
  refused(raw_, wrapper_, kSize, kBitmap, Code::kFailedPrecondition, "not installed", "vmr-no-such-qemu-img");
  EXPECT_TRUE(std::filesystem::is_empty(tmp_.path() + "/wrappers"));
  EXPECT_EQ(FileSize(raw_), kSize);
  EXPECT_TRUE(ReadAll(raw_) == bytes_);
}

}  // namespace
}  // namespace vmreplica
