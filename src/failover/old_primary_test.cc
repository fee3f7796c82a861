// PlaceAdoptedDisk and InspectOldPrimary against real qemu-img and
// qemu-storage-daemon processes (e2e, no guest). Expected contents are
// checked with `qemu-img compare`; expected candidate ranges are computed
// here from the offsets written and the bitmap granularity alone.
#include "failover/old_primary.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "blockio/qsd_testing.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/qmp.h"
#include "vmreplica/reverse.h"
#include "vmreplica/tracker.h"
#include "vmreplica/vm_launcher.h"

namespace vmreplica {
namespace {

using blockio_testing::QemuIo;
using blockio_testing::RunCommand;
using blockio_testing::TempDir;

constexpr uint64_t kMiB = 1ull << 20;
constexpr char kVmUuid[] = "3f2b8c1e-5d4a-4e6f-9a7b-0c1d2e3f4a5b";

uint64_t RoundUp(uint64_t v, uint64_t unit) { return (v + unit - 1) / unit * unit; }

bool Exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

uint64_t FileSize(const std::string& p) {
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) return 0;
  return static_cast<uint64_t>(st.st_size);
}

uint64_t Allocated(const std::string& p) {
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) return 0;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

std::string Contents(const std::string& p) {
  auto r = ReadFile(p, 256 * kMiB);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? *r : std::string();
}

struct Span {
  uint64_t begin = 0, end = 0;
};

// Union of spans, sorted, touching ones merged.
std::vector<Span> Unite(std::vector<Span> s) {
  std::sort(s.begin(), s.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  std::vector<Span> out;
  for (const Span& x : s) {
    if (!out.empty() && x.begin <= out.back().end) {
      out.back().end = std::max(out.back().end, x.end);
    } else {
      out.push_back(x);
    }
  }
  return out;
}

uint64_t Bytes(const std::vector<Span>& s) {
  uint64_t n = 0;
  for (const Span& x : s) n += x.end - x.begin;
  return n;
}

// A sparse raw file of `size` bytes with random bytes in `count` random
// spans (the data spans are returned) and one span of explicit zeros.
std::vector<Span> MakeSparseRandomRaw(const std::string& path, uint64_t size, int count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Span> spans;
  {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.seekp(static_cast<std::streamoff>(size - 1));
    f.put('\0');
  }
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  // Explicit zeros (allocated in the raw file, not data).
  {
    std::string zeros(kMiB, '\0');
    f.seekp(static_cast<std::streamoff>(size / 2));
    f.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
  }
  for (int i = 0; i < count; ++i) {
    const uint64_t len = 1 + rng() % (256 * 1024);
    const uint64_t off = rng() % (size - len);
    std::string buf(len, '\0');
    for (char& c : buf) c = static_cast<char>(1 + rng() % 255);  // no zero byte: every block is data
    f.seekp(static_cast<std::streamoff>(off));
    f.write(buf.data(), static_cast<std::streamsize>(buf.size()));
    spans.push_back(Span{off, off + len});
  }
  f.close();
  EXPECT_TRUE(f.good() || !f.is_open());
  return Unite(spans);
}

void ExpectSameContent(const std::string& target, const std::string& source, const std::string& source_format) {
  auto c = RunCommand({"qemu-img", "compare", "-f", "raw", target, "-F", source_format, source});
  EXPECT_TRUE(c.ok()) << "qemu-img compare: " << c.status().ToString();
}

// ---------------------------------------------------------------- PlaceAdoptedDisk

class PlaceAdoptedDiskTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.ok());
    store_ = tmp_.path() + "/store";
    auto v = RunCommand({"qemu-img", "--version"});
    ASSERT_TRUE(v.ok()) << "qemu-img (package qemu-utils) is required: " << v.status().ToString();
  }
  std::string Target(const std::string& name) const { return store_ + "/disks/" + name + ".img"; }

  TempDir tmp_{"vmr-op"};
  std::string store_;
};

TEST_F(PlaceAdoptedDiskTest, Qcow2SourceIsCopiedExactlySparseAndUntouched) {
  const uint64_t size = 48 * kMiB + 12 * 1024;
  const std::string raw = tmp_.path() + "/src.raw";
  const std::string qcow = tmp_.path() + "/src.qcow2";
  const auto data = MakeSparseRandomRaw(raw, size, 24, 101);
  ASSERT_TRUE(RunCommand({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow}).ok());
  const std::string before = Contents(qcow);

  VmDiskSpec disk{"vda", "vda", qcow, "qcow2", size};
  const uint64_t rounded = RoundUp(size, 65536);
  auto placed = PlaceAdoptedDisk(disk, store_, rounded);
  ASSERT_TRUE(placed.ok()) << placed.status().ToString();
  EXPECT_FALSE(placed->in_place);
  EXPECT_EQ(FileSize(Target("vda")), rounded);
  ExpectSameContent(Target("vda"), qcow, "qcow2");
  // Only data was written: at least every random byte, at most those spans
  // rounded out to 4 KiB blocks; holes and the explicit zeros stayed holes.
  EXPECT_GE(placed->local_copy_bytes, Bytes(data));
  EXPECT_LE(placed->local_copy_bytes, Bytes(data) + data.size() * 8192);
  EXPECT_LT(Allocated(Target("vda")), Bytes(data) + data.size() * 8192 + kMiB);
  EXPECT_FALSE(Exists(Target("vda") + ".part"));
  EXPECT_TRUE(Contents(qcow) == before) << "the original image changed";
  struct stat st {};
  ASSERT_EQ(::stat((store_ + "/disks").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
}

TEST_F(PlaceAdoptedDiskTest, RawSourceIsCopiedExactlySparseAndUntouched) {
  const uint64_t size = 20 * kMiB + 512;
  const std::string raw = tmp_.path() + "/src.raw";
  const auto data = MakeSparseRandomRaw(raw, size, 16, 202);
  const std::string before = Contents(raw);

  VmDiskSpec disk{"disk_1", "disk_1", raw, "raw", size};
  const uint64_t rounded = RoundUp(size, 65536) + 65536;  // the store may be larger than the disk
  auto placed = PlaceAdoptedDisk(disk, store_, rounded);
  ASSERT_TRUE(placed.ok()) << placed.status().ToString();
  EXPECT_FALSE(placed->in_place);
  EXPECT_EQ(FileSize(Target("disk_1")), rounded);
  ExpectSameContent(Target("disk_1"), raw, "raw");
  EXPECT_GE(placed->local_copy_bytes, Bytes(data));
  EXPECT_LE(placed->local_copy_bytes, Bytes(data) + data.size() * 8192);
  EXPECT_LT(Allocated(Target("disk_1")), Bytes(data) + data.size() * 8192 + kMiB);
  EXPECT_TRUE(Contents(raw) == before) << "the original image changed";

  // Placing again replaces the target with the same content (a retry).
  auto again = PlaceAdoptedDisk(disk, store_, rounded);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->local_copy_bytes, placed->local_copy_bytes);
  ExpectSameContent(Target("disk_1"), raw, "raw");
}

TEST_F(PlaceAdoptedDiskTest, WrapperOfTheTargetIsAdoptedInPlace) {
  const uint64_t size = 16 * kMiB;
  ASSERT_TRUE(MakeDirs(store_ + "/disks", 0700).ok());
  const auto data = MakeSparseRandomRaw(Target("vda"), size, 8, 303);
  const std::string before = Contents(Target("vda"));
  ASSERT_TRUE(MakeDirs(tmp_.path() + "/wrappers", 0700).ok());
  const std::string wrapper = tmp_.path() + "/wrappers/vda.qcow2";
  Status w = MakeDiskWrapper(Target("vda"), wrapper, size, std::string("vmr-") + kVmUuid + "-g1");
  ASSERT_TRUE(w.ok()) << w.ToString();
  struct stat st_before {};
  ASSERT_EQ(::stat(Target("vda").c_str(), &st_before), 0);

  VmDiskSpec disk{"vda", "vda", wrapper, "qcow2", size};
  auto placed = PlaceAdoptedDisk(disk, store_, size);
  ASSERT_TRUE(placed.ok()) << placed.status().ToString();
  EXPECT_TRUE(placed->in_place);
  EXPECT_EQ(placed->local_copy_bytes, 0u);
  struct stat st_after {};
  ASSERT_EQ(::stat(Target("vda").c_str(), &st_after), 0);
  EXPECT_EQ(st_after.st_ino, st_before.st_ino) << "the target was replaced";
  EXPECT_TRUE(Contents(Target("vda")) == before) << "the target was written";
  EXPECT_FALSE(Exists(Target("vda") + ".part"));

  // The same wrapper for a store that wants another size: refused.
  auto bigger = PlaceAdoptedDisk(disk, store_, size + 65536);
  EXPECT_EQ(bigger.status().code(), Code::kInvalidArgument) << bigger.status().ToString();
}

TEST_F(PlaceAdoptedDiskTest, RawImageThatIsTheTargetIsAdoptedInPlace) {
  const uint64_t size = 4 * kMiB;
  ASSERT_TRUE(MakeDirs(store_ + "/disks", 0700).ok());
  MakeSparseRandomRaw(Target("vda"), size, 4, 505);
  const std::string before = Contents(Target("vda"));
  auto placed = PlaceAdoptedDisk(VmDiskSpec{"vda", "vda", Target("vda"), "raw", size}, store_, size);
  ASSERT_TRUE(placed.ok()) << placed.status().ToString();
  EXPECT_TRUE(placed->in_place);
  EXPECT_TRUE(Contents(Target("vda")) == before);
  // The same file for a larger store: refused, not extended.
  auto bigger = PlaceAdoptedDisk(VmDiskSpec{"vda", "vda", Target("vda"), "raw", size}, store_, size + 65536);
  EXPECT_EQ(bigger.status().code(), Code::kInvalidArgument) << bigger.status().ToString();
  EXPECT_EQ(FileSize(Target("vda")), size);
}

TEST_F(PlaceAdoptedDiskTest, WrapperOfAnotherFileIsCopied) {
  const uint64_t size = 8 * kMiB;
  const std::string raw = tmp_.path() + "/elsewhere.img";
  MakeSparseRandomRaw(raw, size, 6, 404);
  const std::string wrapper = tmp_.path() + "/vda.qcow2";
  ASSERT_TRUE(MakeDiskWrapper(raw, wrapper, size, "vmr-x-g1").ok());
  const std::string before = Contents(raw);

  auto placed = PlaceAdoptedDisk(VmDiskSpec{"vda", "vda", wrapper, "qcow2", size}, store_, size);
  ASSERT_TRUE(placed.ok()) << placed.status().ToString();
  EXPECT_FALSE(placed->in_place);
  ExpectSameContent(Target("vda"), raw, "raw");
  EXPECT_TRUE(Contents(raw) == before);
}

TEST_F(PlaceAdoptedDiskTest, RefusesWrongSizesMissingImagesAndImagesInUse) {
  const uint64_t size = 4 * kMiB;
  const std::string qcow = tmp_.path() + "/d.qcow2";
  ASSERT_TRUE(RunCommand({"qemu-img", "create", "-f", "qcow2", qcow, std::to_string(size)}).ok());

  auto code = [&](const VmDiskSpec& d, uint64_t rounded) {
    auto r = PlaceAdoptedDisk(d, store_, rounded);
    EXPECT_FALSE(r.ok());
    return r.ok() ? Code::kOk : r.status().code();
  };
  // Defined size differs from the image's virtual size.
  EXPECT_EQ(code(VmDiskSpec{"vda", "vda", qcow, "qcow2", size - 512}, size), Code::kInvalidArgument);
  // Larger than the store's rounded size; rounded size not a multiple of 4 KiB.
  EXPECT_EQ(code(VmDiskSpec{"vda", "vda", qcow, "qcow2", size}, size - 65536), Code::kInvalidArgument);
  EXPECT_EQ(code(VmDiskSpec{"vda", "vda", qcow, "qcow2", size}, size + 512), Code::kInvalidArgument);
  // Missing image, bad names.
  EXPECT_EQ(code(VmDiskSpec{"vda", "vda", tmp_.path() + "/none.qcow2", "qcow2", size}, size), Code::kInvalidArgument);
  EXPECT_EQ(code(VmDiskSpec{"../x", "x", qcow, "qcow2", size}, size), Code::kInvalidArgument);
  EXPECT_EQ(code(VmDiskSpec{"vda", "vda", qcow, "vmdk", size}, size), Code::kInvalidArgument);
  EXPECT_FALSE(Exists(Target("vda")));

  // A qemu-storage-daemon holds the image for writing.
  ASSERT_TRUE(MakeDirs(tmp_.path() + "/q", 0700).ok());
  QsdOptions o;
  o.run_dir = tmp_.path() + "/q";
  o.nbd_server = false;
  o.disks.push_back(QsdDisk{"vda", qcow, "qcow2", false});
  QsdProcess qsd(o);
  Status started = qsd.Start();
  ASSERT_TRUE(started.ok()) << "qemu-storage-daemon is required: " << started.ToString();
  const std::string before = Contents(qcow);
  auto held = PlaceAdoptedDisk(VmDiskSpec{"vda", "vda", qcow, "qcow2", size}, store_, size);
  ASSERT_FALSE(held.ok());
  EXPECT_EQ(held.status().code(), Code::kFailedPrecondition) << held.status().ToString();
  EXPECT_NE(held.status().message().find("in use by another process"), std::string::npos) << held.status().ToString();
  EXPECT_FALSE(Exists(Target("vda")));
  EXPECT_FALSE(Exists(Target("vda") + ".part"));
  ASSERT_TRUE(qsd.Stop().ok());
  EXPECT_TRUE(Contents(qcow) == before);

  // Once released the same call succeeds.
  auto free_now = PlaceAdoptedDisk(VmDiskSpec{"vda", "vda", qcow, "qcow2", size}, store_, size);
  ASSERT_TRUE(free_now.ok()) << free_now.status().ToString();
  EXPECT_EQ(free_now->local_copy_bytes, 0u);  // an empty image: nothing written
}

// ---------------------------------------------------------------- InspectOldPrimary

struct TestDisk {
  std::string name;
  std::string format;
  uint64_t size = 0;
};

class InspectOldPrimaryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.ok());
    auto v = RunCommand({"qemu-storage-daemon", "--version"});
    ASSERT_TRUE(v.ok()) << "qemu-storage-daemon (package qemu-system-common) is required: " << v.status().ToString();
    auto io = RunCommand({"qemu-io", "--version"});
    ASSERT_TRUE(io.ok()) << "qemu-io (package qemu-utils) is required: " << io.status().ToString();
  }

  // Creates the images and the definition (offline kind; node = disk name,
  // as an offline attach names them).
  void MakeVm(const std::vector<TestDisk>& disks) {
    def_.name = "old-primary";
    def_.uuid = kVmUuid;
    def_.memory_mib = 256;
    def_.vcpus = 1;
    def_.kind = VmSourceKind::kOffline;
    for (const TestDisk& d : disks) {
      const std::string path = tmp_.path() + "/" + d.name + "." + d.format;
      auto c = RunCommand({"qemu-img", "create", "-f", d.format, path, std::to_string(d.size)});
      ASSERT_TRUE(c.ok()) << "qemu-img is required: " << c.status().ToString();
      def_.disks.push_back(VmDiskSpec{d.name, d.name, path, d.format, d.size});
    }
  }

  // A qemu-storage-daemon over all disks, each exported writable as its name.
  std::unique_ptr<QsdProcess> StartQsd() {
    const std::string dir = tmp_.path() + "/q" + std::to_string(++runs_);
    EXPECT_TRUE(MakeDirs(dir, 0700).ok());
    QsdOptions o;
    o.run_dir = dir;
    o.nbd_server = true;
    for (const auto& d : def_.disks) o.disks.push_back(QsdDisk{d.name, d.path, d.format, true});
    auto qsd = std::make_unique<QsdProcess>(o);
    Status s = qsd->Start();
    EXPECT_TRUE(s.ok()) << "qemu-storage-daemon is required: " << s.ToString();
    return s.ok() ? std::move(qsd) : nullptr;
  }

  std::vector<TrackedDisk> Tracked(const std::vector<VmDiskSpec>& included) const {
    std::vector<TrackedDisk> t;
    for (const auto& d : included) t.push_back(TrackedDisk{d.name, d.name, d.size_bytes, d.format == "qcow2"});
    return t;
  }

  std::vector<VmDiskSpec> Included(const std::vector<std::string>& names) const {
    std::vector<VmDiskSpec> out;
    for (const auto& n : names) {
      for (const auto& d : def_.disks) {
        if (d.name == n) out.push_back(d);
      }
    }
    return out;
  }

  // Random writes to `disk` through the daemon's export; records them.
  void WriteRandom(const QsdProcess& qsd, const std::string& disk, uint64_t size, int count, std::mt19937_64& rng,
                   std::vector<Span>* written) {
    std::vector<std::string> cmds;
    for (int i = 0; i < count; ++i) {
      const uint64_t len = 512 * (1 + rng() % 256);
      const uint64_t off = (rng() % ((size - len) / 512 + 1)) * 512;
      char pattern[8];
      std::snprintf(pattern, sizeof(pattern), "0x%02x", static_cast<unsigned>(1 + rng() % 254));
      cmds.push_back("write -P " + std::string(pattern) + " " + std::to_string(off) + " " + std::to_string(len));
      if (written != nullptr) written->push_back(Span{off, off + len});
    }
    Status s = QemuIo("nbd+unix:///" + disk + "?socket=" + qsd.nbd_socket(), cmds);
    EXPECT_TRUE(s.ok()) << s.ToString();
  }

  std::string RunDir() {
    const std::string dir = tmp_.path() + "/r" + std::to_string(++runs_);
    EXPECT_TRUE(MakeDirs(dir, 0700).ok());
    return dir;
  }

  TempDir tmp_{"vmr-op"};
  VmDefinition def_;
  int runs_ = 0;
};

// The writes rounded out to the 4 KiB bitmap granularity, clipped at the
// disk's size rounded up to 4 KiB, united.
std::vector<ReplicaRange> ExpectedRanges(const std::vector<std::vector<Span>>& per_disk,
                                         const std::vector<uint64_t>& sizes) {
  std::vector<ReplicaRange> out;
  for (uint32_t d = 0; d < per_disk.size(); ++d) {
    std::vector<Span> r;
    for (const Span& w : per_disk[d]) {
      r.push_back(Span{w.begin / 4096 * 4096, std::min(RoundUp(w.end, 4096), RoundUp(sizes[d], 4096))});
    }
    for (const Span& s : Unite(r)) out.push_back(ReplicaRange{d, s.begin, s.end - s.begin});
  }
  return out;
}

void ExpectRanges(const std::vector<ReplicaRange>& got, const std::vector<ReplicaRange>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].disk, want[i].disk) << i;
    EXPECT_EQ(got[i].offset, want[i].offset) << i;
    EXPECT_EQ(got[i].length, want[i].length) << i;
  }
}

TEST_F(InspectOldPrimaryTest, IntactTrackingAnswersTheBlocksWrittenSinceTheLastCut) {
  // vdx is not replicated; vdb's size is not a multiple of 4 KiB.
  MakeVm({{"vda", "qcow2", 32 * kMiB}, {"vdx", "qcow2", 8 * kMiB}, {"vdb", "qcow2", 16 * kMiB + 1536}});
  const auto included = Included({"vda", "vdb"});
  std::mt19937_64 rng(7);
  std::vector<std::vector<Span>> after_cut(2);
  {
    auto qsd = StartQsd();
    ASSERT_NE(qsd, nullptr);
    auto client = QmpClient::Connect(qsd->qmp_socket());
    ASSERT_TRUE(client.ok()) << client.status().ToString();
    TrackerOptions topt;
    topt.nbd_socket = qsd->nbd_socket();
    ChangeTracker tracker(client->get(), kVmUuid, Tracked(included), topt);
    ASSERT_TRUE(tracker.Enable().ok());
    // Replicated and acknowledged: not candidates any more.
    WriteRandom(*qsd, "vda", 32 * kMiB, 20, rng, nullptr);
    WriteRandom(*qsd, "vdb", 16 * kMiB + 1536, 20, rng, nullptr);
    auto cut = tracker.TakeCut(qsd->options().run_dir);
    ASSERT_TRUE(cut.ok()) << cut.status().ToString();
    ASSERT_TRUE(tracker.Commit(*cut).ok());
    // Written after the last acknowledged cut.
    WriteRandom(*qsd, "vda", 32 * kMiB, 30, rng, &after_cut[0]);
    WriteRandom(*qsd, "vdb", 16 * kMiB + 1536, 30, rng, &after_cut[1]);
    after_cut[1].push_back(Span{16 * kMiB + 1024, 16 * kMiB + 1536});  // the last bytes of vdb
    ASSERT_TRUE(QemuIo("nbd+unix:///vdb?socket=" + qsd->nbd_socket(), {"write -P 0x33 16778240 512"}).ok());
    WriteRandom(*qsd, "vdx", 8 * kMiB, 10, rng, nullptr);  // not tracked
    client->reset();
    ASSERT_TRUE(qsd->Stop().ok());
  }
  const auto want = ExpectedRanges(after_cut, {32 * kMiB, 16 * kMiB + 1536});
  uint64_t want_bytes = 0;
  for (const auto& r : want) want_bytes += r.length;

  auto first = InspectOldPrimary(def_, included, kVmUuid, RunDir());
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_TRUE(first->tracking_intact);
  ExpectRanges(first->ranges, want);
  EXPECT_EQ(first->candidate_bytes, want_bytes);
  EXPECT_EQ(first->ranges.back().offset + first->ranges.back().length, 16 * kMiB + 4096);

  // Nothing changed: a second inspection answers the same.
  auto second = InspectOldPrimary(def_, included, kVmUuid, RunDir());
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_TRUE(second->tracking_intact);
  ExpectRanges(second->ranges, want);
  EXPECT_EQ(second->candidate_bytes, want_bytes);

  // The acand file round trip.
  const std::string acand = tmp_.path() + "/x.acand";
  ASSERT_TRUE(WriteCandidatesFile(acand, 2, *first).ok());
  auto read = ReadRangeListFile(acand, kRangeListCandidates, 2);
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  ASSERT_EQ(read->entries.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(read->entries[i], (RangeEntry{want[i].disk, want[i].offset, want[i].length, 0})) << i;
  }
  struct stat st {};
  ASSERT_EQ(::stat(acand.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(InspectOldPrimaryTest, NothingWrittenSinceTheCutAnswersNoCandidate) {
  MakeVm({{"vda", "qcow2", 8 * kMiB}});
  const auto included = Included({"vda"});
  {
    auto qsd = StartQsd();
    ASSERT_NE(qsd, nullptr);
    auto client = QmpClient::Connect(qsd->qmp_socket());
    ASSERT_TRUE(client.ok());
    TrackerOptions topt;
    topt.nbd_socket = qsd->nbd_socket();
    ChangeTracker tracker(client->get(), kVmUuid, Tracked(included), topt);
    ASSERT_TRUE(tracker.Enable().ok());
    std::mt19937_64 rng(11);
    WriteRandom(*qsd, "vda", 8 * kMiB, 10, rng, nullptr);
    auto cut = tracker.TakeCut(qsd->options().run_dir);
    ASSERT_TRUE(cut.ok()) << cut.status().ToString();
    ASSERT_TRUE(tracker.Commit(*cut).ok());
    client->reset();
    ASSERT_TRUE(qsd->Stop().ok());
  }
  auto c = InspectOldPrimary(def_, included, kVmUuid, RunDir());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_TRUE(c->tracking_intact);
  EXPECT_TRUE(c->ranges.empty());
  EXPECT_EQ(c->candidate_bytes, 0u);
}

TEST_F(InspectOldPrimaryTest, KilledDaemonLosesTrackingAndEveryBlockIsACandidate) {
  MakeVm({{"vda", "qcow2", 16 * kMiB}, {"vdb", "qcow2", 8 * kMiB + 512}});
  const auto included = Included({"vda", "vdb"});
  std::mt19937_64 rng(13);
  {
    auto qsd = StartQsd();
    ASSERT_NE(qsd, nullptr);
    auto client = QmpClient::Connect(qsd->qmp_socket());
    ASSERT_TRUE(client.ok());
    TrackerOptions topt;
    topt.nbd_socket = qsd->nbd_socket();
    ChangeTracker tracker(client->get(), kVmUuid, Tracked(included), topt);
    ASSERT_TRUE(tracker.Enable().ok());
    WriteRandom(*qsd, "vda", 16 * kMiB, 5, rng, nullptr);
    client->reset();
    ASSERT_TRUE(qsd->Stop().ok());
  }
  // Stopped cleanly: intact.
  auto intact = InspectOldPrimary(def_, included, kVmUuid, RunDir());
  ASSERT_TRUE(intact.ok()) << intact.status().ToString();
  EXPECT_TRUE(intact->tracking_intact);
  {
    auto qsd = StartQsd();
    ASSERT_NE(qsd, nullptr);
    WriteRandom(*qsd, "vdb", 8 * kMiB + 512, 5, rng, nullptr);
    ASSERT_TRUE(qsd->Kill().ok());  // the bitmaps stay marked in use: inconsistent
  }
  auto lost = InspectOldPrimary(def_, included, kVmUuid, RunDir());
  ASSERT_TRUE(lost.ok()) << lost.status().ToString();
  EXPECT_FALSE(lost->tracking_intact);
  ExpectRanges(lost->ranges, {ReplicaRange{0, 0, 16 * kMiB}, ReplicaRange{1, 0, 8 * kMiB + 4096}});
  EXPECT_EQ(lost->candidate_bytes, 24 * kMiB + 4096);
  // Still lost on a second look (nothing repaired it behind the caller's back).
  auto again = InspectOldPrimary(def_, included, kVmUuid, RunDir());
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_FALSE(again->tracking_intact);
}

TEST_F(InspectOldPrimaryTest, RawImageKeepsNoBitmapSoTrackingIsLost) {
  MakeVm({{"vda", "raw", 4 * kMiB}});
  const auto included = Included({"vda"});
  {
    auto qsd = StartQsd();
    ASSERT_NE(qsd, nullptr);
    auto client = QmpClient::Connect(qsd->qmp_socket());
    ASSERT_TRUE(client.ok());
    TrackerOptions topt;
    topt.nbd_socket = qsd->nbd_socket();
    ChangeTracker tracker(client->get(), kVmUuid, Tracked(included), topt);
    ASSERT_TRUE(tracker.Enable().ok());
    std::mt19937_64 rng(17);
    WriteRandom(*qsd, "vda", 4 * kMiB, 5, rng, nullptr);
    ASSERT_TRUE(tracker.CheckTracking().ok());  // tracking while this QEMU runs
    client->reset();
    ASSERT_TRUE(qsd->Stop().ok());
  }
  auto c = InspectOldPrimary(def_, included, kVmUuid, RunDir());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_FALSE(c->tracking_intact);
  ExpectRanges(c->ranges, {ReplicaRange{0, 0, 4 * kMiB}});
  EXPECT_EQ(c->candidate_bytes, 4 * kMiB);
}

TEST_F(InspectOldPrimaryTest, ImagesHeldByAnotherProcessAreRefused) {
  MakeVm({{"vda", "qcow2", 4 * kMiB}});
  auto qsd = StartQsd();
  ASSERT_NE(qsd, nullptr);
  auto c = InspectOldPrimary(def_, Included({"vda"}), kVmUuid, RunDir());
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Code::kFailedPrecondition) << c.status().ToString();
  EXPECT_NE(c.status().message().find("in use by another process"), std::string::npos) << c.status().ToString();
}

TEST_F(InspectOldPrimaryTest, RefusesBadArguments) {
  MakeVm({{"vda", "qcow2", 4 * kMiB}});
  const std::string run = RunDir();
  EXPECT_EQ(InspectOldPrimary(def_, {}, kVmUuid, run).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(InspectOldPrimary(def_, Included({"vda"}), "", run).status().code(), Code::kInvalidArgument);
  auto twice = Included({"vda", "vda"});
  EXPECT_EQ(InspectOldPrimary(def_, twice, kVmUuid, run).status().code(), Code::kInvalidArgument);
  VmDiskSpec other = def_.disks[0];
  other.name = "vdz";
  EXPECT_EQ(InspectOldPrimary(def_, {other}, kVmUuid, run).status().code(), Code::kInvalidArgument);
}

// ---------------------------------------------------------------- CoarsenRanges

TEST(CoarsenRangesTest, FitsTheLimitAndCoversTheInput) {
  std::mt19937_64 rng(5);
  std::vector<ReplicaRange> in;
  for (uint32_t d = 0; d < 3; ++d) {
    uint64_t pos = 0;
    for (int i = 0; i < 400; ++i) {
      pos += 4096 * (1 + rng() % 64);  // gaps of 4 KiB .. 256 KiB
      const uint64_t len = 4096 * (1 + rng() % 8);
      in.push_back(ReplicaRange{d, pos, len});
      pos += len;
    }
  }
  EXPECT_EQ(CoarsenRanges(in, in.size()).size(), in.size());  // fits: unchanged
  for (uint64_t limit : {uint64_t{3}, uint64_t{10}, uint64_t{100}, uint64_t{600}}) {
    const auto out = CoarsenRanges(in, limit);
    EXPECT_LE(out.size(), limit);
    for (size_t i = 1; i < out.size(); ++i) {
      const bool ordered = out[i - 1].disk < out[i].disk ||
                           (out[i - 1].disk == out[i].disk && out[i - 1].offset + out[i - 1].length <= out[i].offset);
      EXPECT_TRUE(ordered) << i;
    }
    for (const ReplicaRange& r : in) {  // every input range inside one output range
      const bool covered = std::any_of(out.begin(), out.end(), [&](const ReplicaRange& o) {
        return o.disk == r.disk && o.offset <= r.offset && r.offset + r.length <= o.offset + o.length;
      });
      EXPECT_TRUE(covered) << r.disk << ":" << r.offset;
    }
  }
}

}  // namespace
}  // namespace vmreplica
