// bench_workload: makes the benchmark image and the write load that
// bench/run.sh uses, the same bytes for vmreplica and for the tools it is
// compared with.
//
//   bench_workload image --out FILE --size N [--chunk N] [--seed S]
//       A sparse raw image: chunks 0, 2, 4, ... hold pseudo-random
//       (incompressible) bytes, chunks 1, 3, 5, ... are holes (zeros).
//   bench_workload write --target FILE|NBD-URI --size N [--block N]
//                        (--fraction F | --bytes N) [--seed S] [--changed-out FILE]
//       Writes pseudo-random blocks at block-aligned offsets. With --fraction
//       the offsets are distinct (F of the disk changes, e.g. 0.01 for 1%);
//       with --bytes they may repeat (a write load). Offsets and contents
//       depend only on the seed, so a raw file and an NBD export written with
//       the same arguments end up equal. --changed-out appends every written
//       block to FILE (to measure what the changed blocks compress to).
//       Ends with a flush (fdatasync / NBD_CMD_FLUSH) and prints one JSON
//       line: {"writes":..,"bytes":..,"seconds":..,"mib_per_s":..}.
//
// Single-threaded; one synchronous request at a time (queue depth 1).
#include <fcntl.h>
#include <libnbd.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_set>
#include <vector>

#include "common/bench_util.h"

namespace vmreplica {
namespace {

using bench::ParseSize;
using Clock = std::chrono::steady_clock;

// xoshiro256** seeded through splitmix64: fast, deterministic, good enough
// to make data no compressor can shrink.
class Prng {
 public:
  explicit Prng(uint64_t seed) {
    for (uint64_t& w : s_) {
      seed += 0x9e3779b97f4a7c15ull;
      uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      w = z ^ (z >> 31);
    }
  }
  uint64_t Next() {
    const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = Rotl(s_[3], 45);
    return result;
  }
  void Fill(std::vector<char>* buf) {
    size_t i = 0;
    for (; i + 8 <= buf->size(); i += 8) {
      const uint64_t v = Next();
      std::memcpy(buf->data() + i, &v, 8);
    }
    for (; i < buf->size(); ++i) (*buf)[i] = static_cast<char>(Next());
  }

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

struct Flags {
  std::string out;
  std::string target;
  std::string changed_out;
  uint64_t size = 0;
  uint64_t chunk = 4ull << 20;
  uint64_t block = 4096;
  uint64_t bytes = 0;
  double fraction = 0;
  uint64_t seed = 1;
};

void Usage() {
  std::fprintf(stderr,
               "usage: bench_workload image --out FILE --size N [--chunk N] [--seed S]\n"
               "       bench_workload write --target FILE|NBD-URI --size N [--block N]\n"
               "                            (--fraction F | --bytes N) [--seed S] [--changed-out FILE]\n");
}

bool ParseFlags(int argc, char** argv, Flags* f) {
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    if (v == nullptr) return false;
    bool ok = true;
    if (a == "--out") {
      f->out = v;
    } else if (a == "--target") {
      f->target = v;
    } else if (a == "--changed-out") {
      f->changed_out = v;
    } else if (a == "--size") {
      ok = ParseSize(v, &f->size);
    } else if (a == "--chunk") {
      ok = ParseSize(v, &f->chunk);
    } else if (a == "--block") {
      ok = ParseSize(v, &f->block);
    } else if (a == "--bytes") {
      ok = ParseSize(v, &f->bytes);
    } else if (a == "--fraction") {
      char* end = nullptr;
      f->fraction = std::strtod(v, &end);
      ok = end != v && *end == '\0' && f->fraction > 0 && f->fraction <= 1;
    } else if (a == "--seed") {
      char* end = nullptr;
      f->seed = std::strtoull(v, &end, 10);
      ok = end != v && *end == '\0';
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "bad option %s %s\n", a.c_str(), v);
      return false;
    }
    ++i;
  }
  return true;
}

bool WriteAll(int fd, const char* p, size_t n, uint64_t off) {
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(off));
    if (w < 0) {
      std::perror("pwrite");
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
    off += static_cast<uint64_t>(w);
  }
  return true;
}

int MakeImage(const Flags& f) {
  if (f.out.empty() || f.size == 0 || f.chunk == 0 || f.chunk % 4096 != 0) {
    Usage();
    return 2;
  }
  const int fd = ::open(f.out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) {
    std::perror(f.out.c_str());
    return 1;
  }
  if (::ftruncate(fd, static_cast<off_t>(f.size)) != 0) {
    std::perror("ftruncate");
    ::close(fd);
    return 1;
  }
  Prng rng(f.seed);
  std::vector<char> buf(f.chunk);
  uint64_t data = 0;
  for (uint64_t off = 0, i = 0; off < f.size; off += f.chunk, ++i) {
    if (i % 2 != 0) continue;
    const size_t n = static_cast<size_t>(std::min<uint64_t>(f.chunk, f.size - off));
    buf.resize(n);
    rng.Fill(&buf);
    if (!WriteAll(fd, buf.data(), n, off)) {
      ::close(fd);
      return 1;
    }
    data += n;
  }
  if (::fdatasync(fd) != 0 || ::close(fd) != 0) {
    std::perror("fdatasync/close");
    return 1;
  }
  std::printf("{\"size\":%llu,\"data_bytes\":%llu}\n", static_cast<unsigned long long>(f.size),
              static_cast<unsigned long long>(data));
  return 0;
}

// One open target: a local file or an NBD export.
class Target {
 public:
  ~Target() {
    if (nbd_ != nullptr) {
      nbd_shutdown(nbd_, 0);
      nbd_close(nbd_);
    }
    if (fd_ >= 0) ::close(fd_);
  }
  bool Open(const std::string& t) {
    if (t.rfind("nbd", 0) == 0) {
      nbd_ = nbd_create();
      if (nbd_ == nullptr || nbd_connect_uri(nbd_, t.c_str()) != 0) {
        std::fprintf(stderr, "nbd connect %s: %s\n", t.c_str(), nbd_get_error());
        return false;
      }
      return true;
    }
    fd_ = ::open(t.c_str(), O_WRONLY);
    if (fd_ < 0) std::perror(t.c_str());
    return fd_ >= 0;
  }
  bool Write(const std::vector<char>& buf, uint64_t off) {
    if (nbd_ != nullptr) {
      if (nbd_pwrite(nbd_, buf.data(), buf.size(), off, 0) != 0) {
        std::fprintf(stderr, "nbd_pwrite at %llu: %s\n", static_cast<unsigned long long>(off), nbd_get_error());
        return false;
      }
      return true;
    }
    return WriteAll(fd_, buf.data(), buf.size(), off);
  }
  bool Flush() {
    if (nbd_ != nullptr) {
      if (nbd_flush(nbd_, 0) != 0) {
        std::fprintf(stderr, "nbd_flush: %s\n", nbd_get_error());
        return false;
      }
      return true;
    }
    if (::fdatasync(fd_) != 0) {
      std::perror("fdatasync");
      return false;
    }
    return true;
  }

 private:
  struct nbd_handle* nbd_ = nullptr;
  int fd_ = -1;
};

int WriteLoad(const Flags& f) {
  if (f.target.empty() || f.size == 0 || f.block == 0 || f.block > (64ull << 20) || f.size < f.block ||
      (f.fraction == 0) == (f.bytes == 0)) {
    Usage();
    return 2;
  }
  const uint64_t blocks = f.size / f.block;
  const bool distinct = f.fraction > 0;
  const uint64_t count = distinct ? static_cast<uint64_t>(static_cast<double>(blocks) * f.fraction)
                                  : (f.bytes + f.block - 1) / f.block;
  if (count == 0 || (distinct && count > blocks)) {
    std::fprintf(stderr, "nothing to write (%llu blocks)\n", static_cast<unsigned long long>(count));
    return 2;
  }
  Target target;
  if (!target.Open(f.target)) return 1;
  FILE* changed = nullptr;
  if (!f.changed_out.empty()) {
    changed = std::fopen(f.changed_out.c_str(), "wb");
    if (changed == nullptr) {
      std::perror(f.changed_out.c_str());
      return 1;
    }
  }
  Prng rng(f.seed);
  std::unordered_set<uint64_t> used;
  std::vector<char> buf(f.block);
  int rc = 0;
  const auto start = Clock::now();
  for (uint64_t i = 0; i < count && rc == 0; ++i) {
    uint64_t b = rng.Next() % blocks;
    if (distinct) {
      while (!used.insert(b).second) b = rng.Next() % blocks;
    }
    rng.Fill(&buf);
    if (!target.Write(buf, b * f.block)) rc = 1;
    if (changed != nullptr && std::fwrite(buf.data(), 1, buf.size(), changed) != buf.size()) {
      std::perror("fwrite");
      rc = 1;
    }
  }
  if (rc == 0 && !target.Flush()) rc = 1;
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (changed != nullptr && std::fclose(changed) != 0) rc = 1;
  if (rc != 0) return rc;
  const uint64_t bytes = count * f.block;
  std::printf("{\"writes\":%llu,\"bytes\":%llu,\"seconds\":%.6f,\"mib_per_s\":%.3f}\n",
              static_cast<unsigned long long>(count), static_cast<unsigned long long>(bytes), seconds,
              seconds > 0 ? static_cast<double>(bytes) / (1 << 20) / seconds : 0.0);
  return 0;
}

}  // namespace
}  // namespace vmreplica

int main(int argc, char** argv) {
  using namespace vmreplica;
  Flags f;
  if (argc < 2 || !ParseFlags(argc, argv, &f)) {
    Usage();
    return 2;
  }
  const std::string cmd = argv[1];
  if (cmd == "image") return MakeImage(f);
  if (cmd == "write") return WriteLoad(f);
  Usage();
  return 2;
}
