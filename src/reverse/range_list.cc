// Range lists v1 (docs/failover.md section 15.1) and the range arithmetic
// of the reverse sync (sections 10.3, 12, 14.1).
#include "reverse/range_list.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "vmreplica/fileutil.h"

namespace vmreplica {

namespace {

constexpr char kMagic[8] = {'V', 'M', 'R', 'R', 'A', 'N', 'G', 'E'};
constexpr size_t kHeaderBody = 64;  // bytes covered by the header checksum
constexpr size_t kPointBytes = 8;
constexpr size_t kEntryBytes = 32;
constexpr size_t kTrailerBytes = 8;

uint64_t Checksum(const char* p, size_t n) { return XXH3_64bits(p, n); }

void Put16(std::string* s, uint16_t v) {
  for (int i = 0; i < 2; ++i) s->push_back(static_cast<char>(v >> (8 * i)));
}
void Put32(std::string* s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>(v >> (8 * i)));
}
void Put64(std::string* s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s->push_back(static_cast<char>(v >> (8 * i)));
}
uint64_t Get(const char* p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

bool IsZero(const GenerationId& g) {
  return std::all_of(g.begin(), g.end(), [](uint8_t b) { return b == 0; });
}

std::string Str(uint64_t v) { return std::to_string(v); }

// The header fields, checked against each other and their bounds.
struct Header {
  uint16_t kind = 0;
  uint32_t disk_count = 0;
  uint64_t base_sequence = 0, replicated_sequence = 0;
  GenerationId generation{};
  uint32_t point_count = 0;
  uint64_t entry_count = 0;
  uint64_t total_bytes = 0;  // the whole list, from the counts
};

// Checks the first kRangeListHeaderBytes of a list: the checksum first,
// then every field. `head` holds at least kRangeListHeaderBytes bytes.
Result<Header> ParseHeader(const char* head, uint16_t expected_kind, uint32_t disk_count) {
  const uint64_t want = Get(head + kHeaderBody, 8);
  const uint64_t got = Checksum(head, kHeaderBody);
  if (want != got) return Status::InvalidArgument("range list header checksum mismatch");
  if (std::memcmp(head, kMagic, sizeof(kMagic)) != 0) return Status::InvalidArgument("range list: bad magic");
  const uint16_t version = static_cast<uint16_t>(Get(head + 8, 2));
  if (version != kRangeListVersion) return Status::InvalidArgument("range list: version " + Str(version) + " is not 1");
  Header h;
  h.kind = static_cast<uint16_t>(Get(head + 10, 2));
  if (h.kind != kRangeListCandidates && h.kind != kRangeListSince) {
    return Status::InvalidArgument("range list: kind " + Str(h.kind) + " is neither 1 nor 2");
  }
  if (h.kind != expected_kind) {
    return Status::InvalidArgument("range list: kind " + Str(h.kind) + ", expected " + Str(expected_kind));
  }
  h.disk_count = static_cast<uint32_t>(Get(head + 12, 4));
  if (h.disk_count < 1 || h.disk_count > kRangeListMaxDisks) {
    return Status::InvalidArgument("range list: disk_count " + Str(h.disk_count) + " outside 1..64");
  }
  if (h.disk_count != disk_count) {
    return Status::InvalidArgument("range list: disk_count " + Str(h.disk_count) + ", expected " + Str(disk_count));
  }
  h.base_sequence = Get(head + 16, 8);
  h.replicated_sequence = Get(head + 24, 8);
  std::memcpy(h.generation.data(), head + 32, h.generation.size());
  h.point_count = static_cast<uint32_t>(Get(head + 48, 4));
  if (Get(head + 52, 4) != 0) return Status::InvalidArgument("range list: reserved header field is not 0");
  h.entry_count = Get(head + 56, 8);
  if (h.point_count > kRangeListMaxPoints) {
    return Status::InvalidArgument("range list: point_count " + Str(h.point_count) + " over 2^20");
  }
  if (h.entry_count > kRangeListMaxEntries) {
    return Status::InvalidArgument("range list: entry_count " + Str(h.entry_count) + " over 2^24");
  }
  if (h.kind == kRangeListCandidates &&
      (h.base_sequence != 0 || h.replicated_sequence != 0 || !IsZero(h.generation) || h.point_count != 0)) {
    return Status::InvalidArgument(
        "range list kind 1: base_sequence, replicated_sequence, generation and point_count must be 0");
  }
  // Bounded above by 72 + 8 * 2^20 + 32 * 2^24 + 8: no overflow.
  h.total_bytes = kRangeListHeaderBytes + kPointBytes * h.point_count + kEntryBytes * h.entry_count + kTrailerBytes;
  return h;
}

}  // namespace

namespace reverse_internal {

Status CheckRangeList(uint16_t kind, uint32_t disk_count, const SinceList& list) {
  if (kind != kRangeListCandidates && kind != kRangeListSince) {
    return Status::InvalidArgument("range list: kind " + Str(kind) + " is neither 1 nor 2");
  }
  if (disk_count < 1 || disk_count > kRangeListMaxDisks) {
    return Status::InvalidArgument("range list: disk_count " + Str(disk_count) + " outside 1..64");
  }
  if (list.points.size() > kRangeListMaxPoints) {
    return Status::InvalidArgument("range list: point_count " + Str(list.points.size()) + " over 2^20");
  }
  if (list.entries.size() > kRangeListMaxEntries) {
    return Status::InvalidArgument("range list: entry_count " + Str(list.entries.size()) + " over 2^24");
  }
  if (kind == kRangeListCandidates &&
      (list.base_sequence != 0 || list.replicated_sequence != 0 || !IsZero(list.generation) || !list.points.empty())) {
    return Status::InvalidArgument(
        "range list kind 1: base_sequence, replicated_sequence, generation and point_count must be 0");
  }
  for (size_t i = 0; i < list.points.size(); ++i) {
    const uint64_t p = list.points[i];
    if (p < list.base_sequence) {
      return Status::InvalidArgument("range list: point " + Str(p) + " (index " + Str(i) + ") is below base_sequence " +
                                     Str(list.base_sequence));
    }
    if (i > 0 && p <= list.points[i - 1]) {
      return Status::InvalidArgument("range list: points not ascending and unique at index " + Str(i) + " (" +
                                     Str(list.points[i - 1]) + " then " + Str(p) + ")");
    }
  }
  for (size_t i = 0; i < list.entries.size(); ++i) {
    const RangeEntry& e = list.entries[i];
    const std::string at = "range list entry " + Str(i) + ": ";
    if (e.disk >= disk_count) {
      return Status::InvalidArgument(at + "disk " + Str(e.disk) + " not below disk_count " + Str(disk_count));
    }
    if (e.offset % kRangeListAlign != 0) {
      return Status::InvalidArgument(at + "offset " + Str(e.offset) + " is not a multiple of 4096");
    }
    if (e.length < kRangeListAlign) {
      return Status::InvalidArgument(at + "length " + Str(e.length) + " is below 4096");
    }
    if (e.length % kRangeListAlign != 0) {
      return Status::InvalidArgument(at + "length " + Str(e.length) + " is not a multiple of 4096");
    }
    if (e.offset > std::numeric_limits<uint64_t>::max() - e.length) {
      return Status::InvalidArgument(at + "offset + length overflows");
    }
    if (i > 0) {
      const RangeEntry& p = list.entries[i - 1];
      if (e.disk < p.disk || (e.disk == p.disk && e.offset < p.offset)) {
        return Status::InvalidArgument(at + "not sorted by (disk, offset)");
      }
      if (e.disk == p.disk && e.offset < p.offset + p.length) {
        return Status::InvalidArgument(at + "overlaps the entry before it");
      }
    }
    if (kind == kRangeListCandidates && e.label != 0) {
      return Status::InvalidArgument(at + "label " + Str(e.label) + " is not 0 in a kind 1 list");
    }
    if (kind == kRangeListSince && !std::binary_search(list.points.begin(), list.points.end(), e.label)) {
      return Status::InvalidArgument(at + "label " + Str(e.label) + " is not a listed point");
    }
  }
  return Status::Ok();
}

std::vector<ReplicaRange> SubtractRanges(const std::vector<ReplicaRange>& a, const std::vector<ReplicaRange>& b) {
  std::vector<ReplicaRange> out;
  size_t j = 0;
  auto before = [](const ReplicaRange& x, uint32_t disk, uint64_t off) {
    return x.disk < disk || (x.disk == disk && x.offset + x.length <= off);
  };
  for (const ReplicaRange& r : a) {
    uint64_t cur = r.offset;
    const uint64_t end = r.offset + r.length;
    // Skip the parts of b that end before r.
    while (j < b.size() && before(b[j], r.disk, cur)) ++j;
    size_t k = j;
    while (cur < end && k < b.size() && b[k].disk == r.disk && b[k].offset < end) {
      if (b[k].offset > cur) out.push_back({r.disk, cur, b[k].offset - cur});
      cur = std::max(cur, b[k].offset + b[k].length);
      ++k;
    }
    if (cur < end) out.push_back({r.disk, cur, end - cur});
  }
  return out;
}

}  // namespace reverse_internal

Result<GenerationId> ParseGenerationHex(const std::string& text) {
  GenerationId g{};
  if (text.empty()) return g;
  if (text.size() != 32) return Status::Corruption("generation '" + text + "' is not 32 hex digits");
  for (size_t i = 0; i < 32; ++i) {
    const char c = text[i];
    int d = -1;
    if (c >= '0' && c <= '9') d = c - '0';
    if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
    if (d < 0) return Status::Corruption("generation '" + text + "' is not 32 hex digits");
    g[i / 2] = static_cast<uint8_t>(g[i / 2] * 16 + d);
  }
  return g;
}

std::string GenerationHex(const GenerationId& g) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (uint8_t b : g) {
    out.push_back(kHex[b >> 4]);
    out.push_back(kHex[b & 15]);
  }
  return out;
}

std::string SerializeRangeList(uint16_t kind, uint32_t disk_count, const SinceList& list) {
  std::string out;
  out.reserve(kRangeListHeaderBytes + kPointBytes * list.points.size() + kEntryBytes * list.entries.size() +
              kTrailerBytes);
  out.append(kMagic, sizeof(kMagic));
  Put16(&out, kRangeListVersion);
  Put16(&out, kind);
  Put32(&out, disk_count);
  Put64(&out, list.base_sequence);
  Put64(&out, list.replicated_sequence);
  out.append(reinterpret_cast<const char*>(list.generation.data()), list.generation.size());
  Put32(&out, static_cast<uint32_t>(list.points.size()));
  Put32(&out, 0);
  Put64(&out, list.entries.size());
  Put64(&out, Checksum(out.data(), kHeaderBody));
  for (uint64_t p : list.points) Put64(&out, p);
  for (const RangeEntry& e : list.entries) {
    Put32(&out, e.disk);
    Put32(&out, 0);
    Put64(&out, e.offset);
    Put64(&out, e.length);
    Put64(&out, e.label);
  }
  Put64(&out, Checksum(out.data() + kRangeListHeaderBytes, out.size() - kRangeListHeaderBytes));
  return out;
}

Result<SinceList> ParseRangeList(std::string_view bytes, uint16_t expected_kind, uint32_t disk_count) {
  if (bytes.size() < kRangeListHeaderBytes) {
    return Status::InvalidArgument("range list truncated: " + Str(bytes.size()) + " bytes, the header needs " +
                                   Str(kRangeListHeaderBytes));
  }
  VMR_ASSIGN_OR_RETURN(Header h, ParseHeader(bytes.data(), expected_kind, disk_count));
  if (bytes.size() != h.total_bytes) {
    return Status::InvalidArgument("range list size mismatch: " + Str(bytes.size()) + " bytes, its header says " +
                                   Str(h.total_bytes));
  }
  const char* body = bytes.data() + kRangeListHeaderBytes;
  const size_t body_len = bytes.size() - kRangeListHeaderBytes - kTrailerBytes;
  if (Checksum(body, body_len) != Get(body + body_len, 8)) {
    return Status::InvalidArgument("range list body checksum mismatch");
  }
  SinceList list;
  list.base_sequence = h.base_sequence;
  list.replicated_sequence = h.replicated_sequence;
  list.generation = h.generation;
  list.points.reserve(h.point_count);
  for (uint32_t i = 0; i < h.point_count; ++i) list.points.push_back(Get(body + kPointBytes * i, 8));
  const char* e = body + kPointBytes * h.point_count;
  list.entries.reserve(h.entry_count);
  for (uint64_t i = 0; i < h.entry_count; ++i, e += kEntryBytes) {
    if (Get(e + 4, 4) != 0) {
      return Status::InvalidArgument("range list entry " + Str(i) + ": reserved field is not 0");
    }
    list.entries.push_back({static_cast<uint32_t>(Get(e, 4)), Get(e + 8, 8), Get(e + 16, 8), Get(e + 24, 8)});
  }
  VMR_RETURN_IF_ERROR(reverse_internal::CheckRangeList(h.kind, disk_count, list));
  return list;
}

Status WriteRangeListFile(const std::string& path, uint16_t kind, uint32_t disk_count, const SinceList& list) {
  Status s = reverse_internal::CheckRangeList(kind, disk_count, list);
  if (!s.ok()) return s.WithContext("not writing " + path);
  return WriteFileAtomic(path, SerializeRangeList(kind, disk_count, list), 0600);
}

Result<SinceList> ReadRangeListFile(const std::string& path, uint16_t kind, uint32_t disk_count) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return Status::NotFound("no such file: " + path);
    return Status::IOError("open " + path + ": " + std::strerror(errno));
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  auto read_at = [&](char* out, size_t n, uint64_t off) -> Status {
    size_t done = 0;
    while (done < n) {
      const ssize_t r = ::pread(fd, out + done, n - done, static_cast<off_t>(off + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        return Status::IOError("read " + path + ": " + std::strerror(errno));
      }
      if (r == 0) return Status::Corruption("range list file " + path + " shrank while being read");
      done += static_cast<size_t>(r);
    }
    return Status::Ok();
  };
  struct stat st {};
  if (::fstat(fd, &st) != 0) return Status::IOError("stat " + path + ": " + std::strerror(errno));
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < kRangeListHeaderBytes) {
    return Status::Corruption("range list file " + path + " truncated: " + Str(size) + " bytes, the header needs " +
                              Str(kRangeListHeaderBytes));
  }
  char head[kRangeListHeaderBytes];
  VMR_RETURN_IF_ERROR(read_at(head, sizeof(head), 0));
  auto h = ParseHeader(head, kind, disk_count);
  if (!h.ok()) return Status::Corruption(path + ": " + h.status().message());
  if (size != h->total_bytes) {
    return Status::Corruption(path + ": range list size mismatch: " + Str(size) + " bytes, its header says " +
                              Str(h->total_bytes));
  }
  std::string bytes(size, '\0');
  VMR_RETURN_IF_ERROR(read_at(bytes.data(), bytes.size(), 0));
  auto list = ParseRangeList(bytes, kind, disk_count);
  if (!list.ok()) return Status::Corruption(path + ": " + list.status().message());
  return list;
}

// ---------------------------------------------------------------- ranges

Result<std::vector<ReplicaRange>> ChangedAfter(const SinceList& since, const GenerationId& generation,
                                               uint64_t common_sequence) {
  const std::string c = Str(common_sequence);
  if (IsZero(since.generation)) {
    return Status::FailedPrecondition("the since list names no generation: B's changes after point " + c +
                                      " are unknown");
  }
  if (since.generation != generation) {
    return Status::FailedPrecondition("the since list is of generation " +
                                      GenerationHex(since.generation) + ", the common point of " +
                                      GenerationHex(generation));
  }
  if (common_sequence > since.replicated_sequence) {
    return Status::FailedPrecondition("common point " + c + " is above the last point received, " +
                                      Str(since.replicated_sequence));
  }
  auto it = std::upper_bound(since.points.begin(), since.points.end(), common_sequence);
  if (it == since.points.begin()) {
    return Status::FailedPrecondition("no listed point is at or below common point " + c +
                                      ": B's changes after it are unknown");
  }
  const uint64_t k = *std::prev(it);
  std::vector<ReplicaRange> picked;
  for (const RangeEntry& e : since.entries) {
    if (e.label >= k) picked.push_back({e.disk, e.offset, e.length});
  }
  return UniteRanges(std::move(picked), {});
}

std::vector<ReplicaRange> UniteRanges(std::vector<ReplicaRange> a, const std::vector<ReplicaRange>& b) {
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  a.insert(a.end(), b.begin(), b.end());
  a.erase(std::remove_if(a.begin(), a.end(), [](const ReplicaRange& r) { return r.length == 0; }), a.end());
  for (ReplicaRange& r : a) r.length = std::min(r.length, kMax - r.offset);
  a.erase(std::remove_if(a.begin(), a.end(), [](const ReplicaRange& r) { return r.length == 0; }), a.end());
  std::sort(a.begin(), a.end(), [](const ReplicaRange& x, const ReplicaRange& y) {
    return x.disk != y.disk ? x.disk < y.disk : x.offset < y.offset;
  });
  std::vector<ReplicaRange> out;
  for (const ReplicaRange& r : a) {
    if (!out.empty() && out.back().disk == r.disk && r.offset <= out.back().offset + out.back().length) {
      const uint64_t end = std::max(out.back().offset + out.back().length, r.offset + r.length);
      out.back().length = end - out.back().offset;
    } else {
      out.push_back(r);
    }
  }
  return out;
}

std::vector<BlockRun> RoundToBlocks(const std::vector<ReplicaRange>& r, uint32_t disk, uint32_t block_size,
                                      uint64_t disk_size, uint64_t merge_gap) {
  std::vector<BlockRun> runs;
  if (block_size == 0) return runs;
  const uint64_t bs = block_size;
  const uint64_t disk_blocks = disk_size / bs + (disk_size % bs != 0 ? 1 : 0);
  for (const ReplicaRange& x : r) {
    if (x.disk != disk || x.length == 0) continue;
    const uint64_t first = x.offset / bs;
    if (first >= disk_blocks) continue;
    // Last byte's block, computed without overflowing offset + length.
    const uint64_t last_byte = x.offset + std::min(x.length - 1, std::numeric_limits<uint64_t>::max() - x.offset);
    const uint64_t last = std::min(last_byte / bs, disk_blocks - 1);
    runs.push_back({first, last - first + 1});
  }
  std::sort(runs.begin(), runs.end(),
            [](const BlockRun& x, const BlockRun& y) { return x.first_block < y.first_block; });
  std::vector<BlockRun> out;
  for (const BlockRun& run : runs) {
    if (!out.empty()) {
      BlockRun& p = out.back();
      const uint64_t p_end = p.first_block + p.block_count;
      // gap_blocks * bs < merge_gap  <=>  gap_blocks < ceil(merge_gap / bs), without overflow.
      const uint64_t gap_blocks = run.first_block > p_end ? run.first_block - p_end : 0;
      const uint64_t gap_limit = merge_gap / bs + (merge_gap % bs != 0 ? 1 : 0);
      const bool close = gap_blocks == 0 || gap_blocks < gap_limit;
      if (close) {
        p.block_count = std::max(p_end, run.first_block + run.block_count) - p.first_block;
        continue;
      }
    }
    out.push_back(run);
  }
  return out;
}

}  // namespace vmreplica
