// bench_replica_apply: how fast does the replica store apply deltas, how
// many bytes does it write per changed byte with recovery history off and
// on, and how fast does it read an old point next to the latest?
// See README.md for what it does and how to read the table.
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "vmreplica/delta.h"
#include "vmreplica/replica_store.h"
#include "common/bench_util.h"

namespace vmreplica {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kBlock = kReplicaBlockSize;
constexpr int64_t kMinuteMs = 60 * 1000;
constexpr uint64_t kReadChunk = 1 << 20;

struct Flags {
  uint64_t size = 1ull << 30;
  int deltas = 20;
  double change_percent = 1.0;    // of the disk, per delta
  uint64_t max_write = 64 << 10;  // writes are 4 KiB .. max_write, 4 KiB aligned
  int64_t interval_min = 5;       // simulated time between deltas
  int runs = 3;
  uint64_t seed = 1;
  std::string dir;          // parent of the temp stores; default $TMPDIR or /tmp
  bool drop_cache = false;  // after the prefill, drop the image from the page cache
  bool text = false;        // --data text: compressible bytes instead of random ones
  bool compress_undo = false;  // ReplicaStoreOptions::compress_undo
};

using vmreplica::bench::ParseSize;

void Usage() {
  std::fprintf(stderr,
               "usage: bench_replica_apply [--size N[KMG]] [--deltas N] [--change PERCENT] [--max-write N[KMG]]\n"
               "                           [--interval-min N] [--runs N] [--seed N] [--dir PATH] [--drop-cache]\n"
               "                           [--data random|text] [--compress-undo]\n"
               "defaults: --size 1G --deltas 20 --change 1 --max-write 64K --interval-min 5 --runs 3 --data random\n");
}

bool ParseFlags(int argc, char** argv, Flags* f) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--size" && v) {
      if (!ParseSize(v, &f->size)) return false;
      ++i;
    } else if (a == "--deltas" && v) {
      f->deltas = std::atoi(v);
      ++i;
    } else if (a == "--change" && v) {
      f->change_percent = std::strtod(v, nullptr);
      ++i;
    } else if (a == "--max-write" && v) {
      if (!ParseSize(v, &f->max_write)) return false;
      ++i;
    } else if (a == "--interval-min" && v) {
      f->interval_min = std::atoll(v);
      ++i;
    } else if (a == "--runs" && v) {
      f->runs = std::atoi(v);
      ++i;
    } else if (a == "--seed" && v) {
      f->seed = std::strtoull(v, nullptr, 10);
      ++i;
    } else if (a == "--data" && v) {
      if (std::string(v) != "random" && std::string(v) != "text") return false;
      f->text = std::string(v) == "text";
      ++i;
    } else if (a == "--compress-undo") {
      f->compress_undo = true;
    } else if (a == "--drop-cache") {
      f->drop_cache = true;
    } else if (a == "--dir" && v) {
      f->dir = v;
      ++i;
    } else {
      return false;
    }
  }
  f->size -= f->size % (1 << 20);
  f->max_write = std::max<uint64_t>(kBlock, f->max_write - f->max_write % kBlock);
  return f->size >= (16u << 20) && f->deltas >= 1 && f->change_percent > 0 && f->change_percent <= 100 &&
         f->runs >= 1 && f->interval_min >= 0;
}

// Bytes this process has caused to be sent to the storage layer
// (write_bytes: counted when a page is dirtied, so buffered writes count
// even before writeback) and bytes passed to write-type syscalls (wchar).
struct IoCounters {
  uint64_t write_bytes = 0;
  uint64_t wchar = 0;
};

IoCounters ReadIo() {
  IoCounters c;
  std::ifstream in("/proc/self/io");
  std::string key;
  uint64_t v = 0;
  while (in >> key >> v) {
    if (key == "write_bytes:") c.write_bytes = v;
    if (key == "wchar:") c.wchar = v;
  }
  return c;
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void Check(const Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

// Fills `out` with `n` pseudo-random bytes (never a whole zero block in
// practice, so before-images are data).
void FillRandom(std::mt19937_64& rng, std::string* out, size_t n) {
  out->resize(n);
  for (size_t i = 0; i + 8 <= n; i += 8) {
    uint64_t v = rng();
    std::memcpy(out->data() + i, &v, 8);
  }
}

// Compressible bytes ("--data text"): random letters of a 16-letter
// alphabet, 4 bits of entropy per byte (zstd level 1 keeps about half).
void FillText(std::mt19937_64& rng, std::string* out, size_t n) {
  static const char kAlphabet[] = "etaoinshrdlucmf ";
  out->resize(n);
  for (size_t i = 0; i + 16 <= n; i += 16) {
    uint64_t v = rng();
    for (size_t k = 0; k < 16; ++k) (*out)[i + k] = kAlphabet[(v >> (4 * k)) & 15];
  }
}

void FillData(const Flags& f, std::mt19937_64& rng, std::string* out, size_t n) {
  if (f.text) {
    FillText(rng, out, n);
  } else {
    FillRandom(rng, out, n);
  }
}

// One delta: random 4 KiB-aligned writes of 4 KiB..max_write, no two
// overlapping (a dirty bitmap never reports a block twice), sorted by
// offset, until `change_percent` of the disk is covered.
std::vector<DeltaRecord> MakeDelta(const Flags& f, std::mt19937_64& rng, uint64_t* changed) {
  const uint64_t blocks = f.size / kBlock;
  const uint64_t target = static_cast<uint64_t>(static_cast<double>(blocks) * f.change_percent / 100.0);
  const uint64_t max_blocks = f.max_write / kBlock;
  std::vector<bool> used(blocks, false);
  std::vector<std::pair<uint64_t, uint64_t>> extents;  // first block, count
  uint64_t got = 0;
  while (got < std::max<uint64_t>(target, 1)) {
    uint64_t len = 1 + rng() % max_blocks;
    uint64_t start = rng() % (blocks - len + 1);
    bool free = true;
    for (uint64_t b = start; b < start + len && free; ++b) free = !used[b];
    if (!free) continue;
    for (uint64_t b = start; b < start + len; ++b) used[b] = true;
    extents.emplace_back(start, len);
    got += len;
  }
  std::sort(extents.begin(), extents.end());
  std::vector<DeltaRecord> records;
  records.reserve(extents.size());
  for (const auto& [start, len] : extents) {
    std::string data;
    FillData(f, rng, &data, len * kBlock);
    records.push_back(DataRecord(0, start * kBlock, std::move(data)));
  }
  *changed = got * kBlock;
  return records;
}

uint64_t DirBytes(const std::string& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.is_regular_file()) total += e.file_size();
  }
  return total;
}

// Reads the whole disk at `sequence` in 1 MiB chunks; answers MiB/s.
double ReadSpeed(const ReplicaStore& store, uint64_t sequence, uint64_t size) {
  std::string buf(kReadChunk, '\0');
  auto t0 = Clock::now();
  for (uint64_t off = 0; off < size; off += kReadChunk) {
    Check(store.ReadPoint(sequence, 0, off, std::min(kReadChunk, size - off), buf.data()), "ReadPoint");
  }
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  return static_cast<double>(size) / (1 << 20) / secs;
}

struct Mode {
  const char* name;
  int64_t fine_window_ms;
  int history_hours;
};

struct RunStats {
  double apply_mib_s = 0;
  double write_bytes_ratio = 0;
  double wchar_ratio = 0;
  double undo_mib = 0;
  double read_latest_mib_s = 0;
  double read_oldest_mib_s = 0;  // 0: no older point retained
  uint64_t oldest_seq = 0;
  uint64_t points = 0;
  double changed_mib = 0;
};

RunStats RunOnce(const Flags& f, const Mode& mode, const std::string& parent, uint64_t seed) {
  std::string tmpl = parent + "/bench_replica_apply.XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) {
    std::fprintf(stderr, "cannot create a temp dir under %s\n", parent.c_str());
    std::exit(1);
  }
  const std::string dir = tmpl;
  int64_t now = 1'700'000'000'000;  // simulated clock, advanced per delta
  ReplicaStoreOptions options;
  options.fine_window_ms = mode.fine_window_ms;
  options.recovery_history_hours = mode.history_hours;
  options.now_ms = [&now] { return now; };
  options.compress_undo = f.compress_undo;
  auto created = ReplicaStore::Create(dir + "/store", "bench-vm", {{"disk0", f.size}}, nullptr, options);
  Check(created.status(), "Create");
  ReplicaStore& store = **created;

  // Prefill (not measured): every block holds data, as on a used VM disk,
  // so the measured deltas save data before-images, not zero ones.
  std::mt19937_64 rng(seed);
  {
    std::vector<DeltaRecord> fill;
    for (uint64_t off = 0; off < f.size; off += kReadChunk) {
      std::string data;
      FillData(f, rng, &data, kReadChunk);
      fill.push_back(DataRecord(0, off, std::move(data)));
    }
    VectorDeltaSource src(std::move(fill));
    Check(store.Apply(1, {now, ReplicationType::kRegular, "prefill"}, src), "Apply prefill");
  }
  if (f.drop_cache) {
    int fd = ::open(store.DiskPath(0).c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
      ::close(fd);
    }
  }

  RunStats st;
  double apply_secs = 0;
  uint64_t changed = 0;
  uint64_t write_bytes = 0, wchar = 0;
  for (int i = 0; i < f.deltas; ++i) {
    now += f.interval_min * kMinuteMs;
    uint64_t delta_changed = 0;
    VectorDeltaSource src(MakeDelta(f, rng, &delta_changed));
    IoCounters before = ReadIo();
    auto t0 = Clock::now();
    Check(store.Apply(static_cast<uint64_t>(i) + 2, {now, ReplicationType::kRegular, "g"}, src), "Apply");
    apply_secs += std::chrono::duration<double>(Clock::now() - t0).count();
    IoCounters after = ReadIo();
    write_bytes += after.write_bytes - before.write_bytes;
    wchar += after.wchar - before.wchar;
    changed += delta_changed;
  }
  st.changed_mib = static_cast<double>(changed) / (1 << 20);
  st.apply_mib_s = st.changed_mib / apply_secs;
  st.write_bytes_ratio = static_cast<double>(write_bytes) / static_cast<double>(changed);
  st.wchar_ratio = static_cast<double>(wchar) / static_cast<double>(changed);
  st.undo_mib = static_cast<double>(DirBytes(dir + "/store/undo")) / (1 << 20);

  std::vector<ReplicaPoint> points = store.ListPoints();
  st.points = points.size();
  // One untimed pass first, so both timed reads find the image in the page
  // cache (the undo segments were just written and are cached anyway).
  (void)ReadSpeed(store, store.latest_sequence(), f.size);
  st.read_latest_mib_s = ReadSpeed(store, store.latest_sequence(), f.size);
  // The oldest point after the prefill (point 0 is the empty disk: its
  // before-images are all zero entries, not a fair read).
  auto oldest = std::find_if(points.begin(), points.end(), [](const ReplicaPoint& p) { return p.sequence >= 1; });
  if (oldest != points.end() && oldest->sequence != store.latest_sequence()) {
    st.oldest_seq = oldest->sequence;
    st.read_oldest_mib_s = ReadSpeed(store, st.oldest_seq, f.size);
  }
  created->reset();
  std::error_code ec;
  fs::remove_all(dir, ec);
  return st;
}

int Main(int argc, char** argv) {
  Flags f;
  if (!ParseFlags(argc, argv, &f)) {
    Usage();
    return 2;
  }
  spdlog::set_level(spdlog::level::warn);  // the store logs every apply at info
  if (f.dir.empty()) {
    const char* t = std::getenv("TMPDIR");
    f.dir = t != nullptr && *t != '\0' ? t : "/tmp";
  }
  std::printf("disk %.0f MiB, %d deltas of %.2f%% (writes 4 KiB..%llu KiB), %lld min apart, %d runs, in %s%s\n"
              "data %s, undo compression %s\n",
              static_cast<double>(f.size) / (1 << 20), f.deltas, f.change_percent,
              static_cast<unsigned long long>(f.max_write >> 10), static_cast<long long>(f.interval_min), f.runs,
              f.dir.c_str(), f.drop_cache ? ", image dropped from the page cache after the prefill" : "",
              f.text ? "text (compressible)" : "random", f.compress_undo ? "on" : "off");
  const Mode modes[] = {
      {"history off (fine 0, history 0 h)", 0, 0},
      {"history on (fine 1 h, history 24 h)", 3600 * 1000, 24},
  };
  std::printf("\n%-37s %9s %9s %9s %9s %8s %10s %10s %s\n", "mode (median of runs)", "changed", "apply", "wr/chg",
              "wchar/chg", "undo", "read last", "read old", "old point");
  std::printf("%-37s %9s %9s %9s %9s %8s %10s %10s\n", "", "MiB", "MiB/s", "(io)", "", "MiB", "MiB/s", "MiB/s");
  for (const Mode& m : modes) {
    std::vector<double> apply, wr, wc, undo, rl, ro, changed;
    RunStats last;
    for (int r = 0; r < f.runs; ++r) {
      last = RunOnce(f, m, f.dir, f.seed + static_cast<uint64_t>(r));
      apply.push_back(last.apply_mib_s);
      wr.push_back(last.write_bytes_ratio);
      wc.push_back(last.wchar_ratio);
      undo.push_back(last.undo_mib);
      rl.push_back(last.read_latest_mib_s);
      ro.push_back(last.read_oldest_mib_s);
      changed.push_back(last.changed_mib);
    }
    char old_point[64] = "-";
    if (last.oldest_seq != 0) {
      std::snprintf(old_point, sizeof(old_point), "seq %llu of %llu kept",
                    static_cast<unsigned long long>(last.oldest_seq), static_cast<unsigned long long>(last.points));
    }
    char read_old[16] = "-";
    if (Median(ro) > 0) std::snprintf(read_old, sizeof(read_old), "%.1f", Median(ro));
    std::printf("%-37s %9.1f %9.1f %9.3f %9.3f %8.1f %10.1f %10s %s\n", m.name, Median(changed), Median(apply),
                Median(wr), Median(wc), Median(undo), Median(rl), read_old, old_point);
  }
  std::printf(
      "(wr/chg = /proc/self/io write_bytes during Apply / changed bytes; wchar/chg = bytes passed to write\n"
      " syscalls / changed bytes; undo = undo segment bytes on disk at the end; reads are whole-disk\n"
      " ReadPoint calls of 1 MiB, page cache warm; goal: wr/chg <= 2.0 with history on)\n");
  return 0;
}

}  // namespace
}  // namespace vmreplica

int main(int argc, char** argv) { return vmreplica::Main(argc, argv); }
