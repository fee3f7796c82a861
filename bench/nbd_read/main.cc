// bench_nbd_read: how long does pulling a delta out of a QEMU NBD export
// take with NbdDeltaReader, next to copying the whole export with nbdcopy?
// See README.md for what it does and how to read the table.
#include <libnbd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "blockio/qsd_testing.h"
#include "vmreplica/nbd_reader.h"
#include "common/bench_util.h"

namespace vmreplica {
namespace {

using blockio_testing::CreateQcow2;
using blockio_testing::QmpSession;
using blockio_testing::Qsd;
using blockio_testing::RunCommand;
using blockio_testing::TempDir;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kGranularity = 4096;

struct Flags {
  uint64_t size = 4ull << 30;
  double change_percent = 5.0;
  uint64_t max_write = 64 << 10;  // changes are 4 KiB .. max_write, 4 KiB aligned
  int runs = 3;
  uint64_t seed = 1;
  uint64_t request = NbdReaderOptions{}.max_request_bytes;
  uint32_t in_flight = NbdReaderOptions{}.requests_in_flight;  // for (a) and (d)
};

using vmreplica::bench::ParseSize;

void Usage() {
  std::fprintf(
      stderr,
      "usage: bench_nbd_read [--size N[KMG]] [--change PERCENT] [--max-write N[KMG]]\n"
      "                      [--request N[KMG]] [--in-flight N] [--runs N] [--seed N]\n"
      "defaults: --size 4G --change 5 --max-write 64K --request 256K --in-flight 16 --runs 3\n");
}

bool ParseFlags(int argc, char** argv, Flags* f) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--size" && v && ParseSize(v, &f->size)) {
      ++i;
    } else if (a == "--change" && v) {
      f->change_percent = std::atof(v);
      ++i;
    } else if (a == "--max-write" && v && ParseSize(v, &f->max_write)) {
      ++i;
    } else if (a == "--request" && v && ParseSize(v, &f->request)) {
      ++i;
    } else if (a == "--in-flight" && v) {
      f->in_flight = static_cast<uint32_t>(std::atoi(v));
      ++i;
    } else if (a == "--runs" && v) {
      f->runs = std::atoi(v);
      ++i;
    } else if (a == "--seed" && v) {
      f->seed = std::strtoull(v, nullptr, 10);
      ++i;
    } else {
      return false;
    }
  }
  f->size -= f->size % (1 << 20);
  f->max_write = std::max<uint64_t>(kGranularity, f->max_write - f->max_write % kGranularity);
  return f->size >= (16u << 20) && f->change_percent > 0 && f->change_percent <= 100 &&
         f->runs >= 1;
}

// A connected libnbd handle for setup writes; exits on error (setup only).
struct Writer {
  explicit Writer(const std::string& uri) : h(nbd_create()) {
    if (h == nullptr || nbd_connect_uri(h, uri.c_str()) == -1) Die("connect");
  }
  ~Writer() { nbd_close(h); }
  void Die(const char* what) {
    std::fprintf(stderr, "%s: %s\n", what, nbd_get_error());
    std::exit(1);
  }
  // Pipelined writes: at most 16 in flight; `buf` must stay valid until Drain.
  void Write(const char* buf, size_t len, uint64_t off) {
    while (nbd_aio_in_flight(h) >= 16) {
      if (nbd_poll(h, -1) == -1) Die("poll");
      Retire();
    }
    if (nbd_aio_pwrite(h, buf, len, off, nbd_completion_callback{nullptr, nullptr, nullptr}, 0) ==
        -1)
      Die("pwrite");
  }
  void Retire() {
    int64_t c;
    while ((c = nbd_aio_peek_command_completed(h)) > 0) {
      if (nbd_aio_command_completed(h, static_cast<uint64_t>(c)) == -1) Die("write");
    }
  }
  void Drain() {
    while (nbd_aio_in_flight(h) > 0) {
      if (nbd_poll(h, -1) == -1) Die("poll");
      Retire();
    }
    Retire();
    if (nbd_flush(h, 0) == -1) Die("flush");
  }
  nbd_handle* h;
};

void Check(const Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

struct RunResult {
  double seconds = 0;
  uint64_t bytes = 0;  // payload bytes moved
};

// Reads export `export_name` (empty: the plain one) with the reader;
// `bitmap`: the full meta context, or nullopt for the whole export.
RunResult RunReader(const Qsd& qsd, std::optional<std::string> bitmap, uint64_t request,
                    uint32_t in_flight, const std::string& export_name = {}) {
  NbdReaderOptions o;
  o.requests_in_flight = in_flight;
  o.max_request_bytes = static_cast<uint32_t>(request);
  auto start = Clock::now();
  auto reader = NbdDeltaReader::Open(qsd.socket(), export_name.empty() ? qsd.export_name() : export_name, 0,
                                     std::move(bitmap), o);
  Check(reader.status(), "open reader");
  uint64_t bytes = 0;
  for (;;) {
    auto r = (*reader)->Next();
    Check(r.status(), "read");
    if (!r->has_value()) break;
    bytes += (*r)->data.size();
  }
  return {std::chrono::duration<double>(Clock::now() - start).count(), bytes};
}

RunResult RunNbdcopy(const Qsd& qsd, uint64_t data_bytes) {
  auto start = Clock::now();
  Check(RunCommand({"nbdcopy", qsd.uri(), "null:"}).status(), "nbdcopy");
  return {std::chrono::duration<double>(Clock::now() - start).count(), data_bytes};
}

// A point-in-time view of disk0, exported with a disabled copy of bm0 (bm1
// or bm2) as "overlay" or "snapshot", the way the
// primary exports a cut (src/primary/change_tracker.cc): "overlay" is
// blockdev-backup sync=none into a qcow2 overlay backed by disk0 (what the
// product does), "snapshot-access" is a copy-before-write filter on disk0
// with a plain qcow2 target, read through a snapshot-access node (QEMU 7.0+).
// Nothing writes to the disk while the views are read, so the filter not
// being in the export's write path does not matter here.
void AddView(QmpSession& qmp, const std::string& dir, const std::string& kind, uint64_t size) {
  const std::string tmp = dir + "/" + kind + ".qcow2";
  Check(RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", tmp, std::to_string(size)}).status(), "create view file");
  auto x = [&](const std::string& cmd, const std::string& args) { Check(qmp.Execute(cmd, args).status(), cmd.c_str()); };
  // bm0 is busy (the plain export has it): the view exports a disabled copy.
  const std::string bm = kind == "overlay" ? "bm1" : "bm2";
  x("block-dirty-bitmap-add", R"({"node": "disk0", "name": ")" + bm + R"(", "granularity": 4096, "disabled": true})");
  x("block-dirty-bitmap-merge", R"({"node": "disk0", "target": ")" + bm + R"(", "bitmaps": ["bm0"]})");
  const std::string bitmaps = R"("bitmaps": [{"node": "disk0", "name": ")" + bm + R"("}])";
  if (kind == "overlay") {
    x("blockdev-add", R"({"driver": "qcow2", "node-name": "ovl", "file": {"driver": "file", "filename": ")" + tmp +
                          R"("}, "backing": "disk0"})");
    x("blockdev-backup", R"({"device": "disk0", "target": "ovl", "sync": "none", "job-id": "fl"})");
    x("block-export-add", R"({"type": "nbd", "id": "e-ovl", "node-name": "ovl", "name": "overlay", "writable": false, )" +
                              bitmaps + "}");
  } else {
    x("blockdev-add", R"({"driver": "qcow2", "node-name": "tgt", "file": {"driver": "file", "filename": ")" + tmp +
                          R"("}})");
    x("blockdev-add", R"({"driver": "copy-before-write", "node-name": "cbw", "file": "disk0", "target": "tgt"})");
    x("blockdev-add", R"({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})");
    x("block-export-add", R"({"type": "nbd", "id": "e-snap", "node-name": "snap", "name": "snapshot", "writable": false, )" +
                              bitmaps + "}");
  }
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

int Main(int argc, char** argv) {
  Flags flags;
  if (!ParseFlags(argc, argv, &flags) || flags.request > (32u << 20) || flags.in_flight < 1 ||
      flags.in_flight > 64) {
    Usage();
    return 2;
  }
  TempDir dir("vmr-bench-nbd-read");
  if (!dir.ok()) {
    std::fprintf(stderr, "cannot create a temp dir\n");
    return 1;
  }
  const std::string image = dir.path() + "/disk.qcow2";
  std::printf(
      "disk %llu MiB qcow2 in %s, changes %.1f%% in 4 KiB-aligned writes of 4 KiB..%llu KiB\n",
      static_cast<unsigned long long>(flags.size >> 20), dir.path().c_str(), flags.change_percent,
      static_cast<unsigned long long>(flags.max_write >> 10));

  // 1. A disk full of data, like a used VM disk (so nbdcopy cannot skip holes).
  Check(CreateQcow2(image, flags.size), "create");
  std::mt19937_64 rng(flags.seed);
  std::vector<char> buf(8 << 20);
  for (size_t i = 0; i < buf.size(); i += 8) {
    uint64_t x = rng();
    std::memcpy(&buf[i], &x, 8);
  }
  auto t0 = Clock::now();
  {
    auto qsd = Qsd::Start(dir.path(), image, std::nullopt);
    Check(qsd.status(), "start qemu-storage-daemon");
    Writer w((*qsd)->uri());
    for (uint64_t off = 0; off < flags.size; off += buf.size()) {
      w.Write(buf.data(), std::min<uint64_t>(buf.size(), flags.size - off), off);
    }
    w.Drain();
    Check((*qsd)->Stop(), "stop");
  }
  std::printf("prefill: %.1f s\n", std::chrono::duration<double>(Clock::now() - t0).count());

  // 2. Bitmap (4 KiB granularity, as the design asks), then the changes.
  Check(
      RunCommand({"qemu-img", "bitmap", "--add", "-g", std::to_string(kGranularity), image, "bm0"})
          .status(),
      "bitmap");
  auto qsd_r = Qsd::Start(dir.path(), image, "bm0");
  Check(qsd_r.status(), "start qemu-storage-daemon");
  Qsd& qsd = **qsd_r;
  const uint64_t granules = flags.size / kGranularity;
  std::vector<bool> dirty(granules);
  uint64_t written = 0, writes = 0;
  const uint64_t target =
      static_cast<uint64_t>(static_cast<double>(flags.size) * flags.change_percent / 100.0);
  {
    Writer w(qsd.uri());
    std::uniform_int_distribution<uint64_t> len_dist(1, flags.max_write / kGranularity);
    std::uniform_int_distribution<uint64_t> off_dist(0, granules - 1);
    while (written < target) {
      uint64_t g = off_dist(rng);
      uint64_t n = std::min(len_dist(rng), granules - g);
      w.Write(buf.data() + (writes % 64) * 4096, n * kGranularity, g * kGranularity);
      for (uint64_t i = g; i < g + n; ++i) dirty[i] = true;
      written += n * kGranularity;
      ++writes;
    }
    w.Drain();
  }
  const uint64_t dirty_bytes =
      static_cast<uint64_t>(std::count(dirty.begin(), dirty.end(), true)) * kGranularity;
  std::printf("changes: %llu writes, %.1f MiB written, %.1f MiB dirty (%.2f%%)\n",
              static_cast<unsigned long long>(writes), static_cast<double>(written) / (1 << 20),
              static_cast<double>(dirty_bytes) / (1 << 20),
              100.0 * static_cast<double>(dirty_bytes) / static_cast<double>(flags.size));

  // 3. Alternating timed runs (page cache warm for all of them).
  struct Mode {
    std::string name;
    std::vector<double> secs;
    uint64_t bytes = 0;
  };
  const std::string n = std::to_string(flags.in_flight);
  std::vector<Mode> modes = {{"(a) reader, bitmap delta, " + n + " in flight", {}},
                             {"(b) nbdcopy whole export -> null:", {}},
                             {"(c) reader, bitmap delta, 1 in flight", {}},
                             {"(d) reader, whole export, " + n + " in flight", {}},
                             {"(e) (a) via fleecing overlay", {}},
                             {"(f) (a) via cbw + snapshot-access", {}}};
  {
    auto qmp = QmpSession::Connect(qsd.qmp_socket());
    Check(qmp.status(), "qmp");
    // bm0 is busy while exp0 exports it: take exp0 away, copy bm0 for the
    // views (AddView), then export bm0 again.
    Check((*qmp)->Execute("block-export-del", R"({"id": "exp0"})").status(), "block-export-del");
    for (int i = 0; i < 500; ++i) {
      auto q = (*qmp)->Execute("query-block-exports");
      Check(q.status(), "query-block-exports");
      if (q->find("exp0") == std::string::npos) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    AddView(**qmp, dir.path(), "overlay", flags.size);
    AddView(**qmp, dir.path(), "snapshot-access", flags.size);
    Check((*qmp)->Execute("block-dirty-bitmap-disable", R"({"node": "disk0", "name": "bm0"})").status(), "disable");
    Check((*qmp)->Execute("block-export-add", R"({"type": "nbd", "id": "exp0", "node-name": "disk0", "name": "disk0", )"
                                              R"("writable": false, "bitmaps": ["bm0"]})")
              .status(),
          "block-export-add exp0");
  }
  for (int run = 0; run < flags.runs; ++run) {
    RunResult r = RunReader(qsd, "qemu:dirty-bitmap:bm0", flags.request, flags.in_flight);
    modes[0].secs.push_back(r.seconds);
    modes[0].bytes = r.bytes;
    r = RunNbdcopy(qsd, flags.size);
    modes[1].secs.push_back(r.seconds);
    modes[1].bytes = r.bytes;
    r = RunReader(qsd, "qemu:dirty-bitmap:bm0", flags.request, 1);
    modes[2].secs.push_back(r.seconds);
    modes[2].bytes = r.bytes;
    r = RunReader(qsd, std::nullopt, flags.request, flags.in_flight);
    modes[3].secs.push_back(r.seconds);
    modes[3].bytes = r.bytes;
    r = RunReader(qsd, "qemu:dirty-bitmap:bm1", flags.request, flags.in_flight, "overlay");
    modes[4].secs.push_back(r.seconds);
    modes[4].bytes = r.bytes;
    r = RunReader(qsd, "qemu:dirty-bitmap:bm2", flags.request, flags.in_flight, "snapshot");
    modes[5].secs.push_back(r.seconds);
    modes[5].bytes = r.bytes;
  }
  for (size_t m : {size_t{0}, size_t{4}, size_t{5}}) {
    if (modes[m].bytes != dirty_bytes)
      std::printf("WARNING: %s moved %llu bytes, expected %llu dirty\n", modes[m].name.c_str(),
                  static_cast<unsigned long long>(modes[m].bytes),
                  static_cast<unsigned long long>(dirty_bytes));
  }

  const double base = Median(modes[1].secs);
  std::printf("\n%-40s %10s %10s %10s %12s\n", "mode (median of runs)", "seconds", "MiB moved",
              "MiB/s", "vs nbdcopy");
  for (const Mode& m : modes) {
    double s = Median(m.secs);
    double mib = static_cast<double>(m.bytes) / (1 << 20);
    std::printf("%-40s %10.3f %10.1f %10.1f %11.2fx\n", m.name.c_str(), s, mib, mib / s, base / s);
  }
  std::printf("(\"vs nbdcopy\" = nbdcopy median time / this mode's median time; >1 is faster)\n");
  Check(qsd.Stop(), "stop");
  return 0;
}

}  // namespace
}  // namespace vmreplica

int main(int argc, char** argv) { return vmreplica::Main(argc, argv); }
