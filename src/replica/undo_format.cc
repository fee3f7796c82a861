#include "replica/undo_format.h"

#include <xxhash.h>

#include <cstring>

namespace vmreplica::replica_internal {
namespace {

constexpr char kManifestMagic[8] = {'V', 'M', 'R', 'M', 'A', 'N', 'I', '1'};
constexpr char kSegmentMagic[8] = {'V', 'M', 'R', 'U', 'N', 'D', 'O', '1'};

uint64_t Hash(const char* p, size_t n) { return XXH3_64bits(p, n); }

void PutStr(std::string* out, const std::string& s) {
  PutU32(out, static_cast<uint32_t>(s.size()));
  out->append(s);
}

// Bounds-checked reader over a byte string.
class Reader {
 public:
  explicit Reader(std::string_view b) : b_(b) {}
  bool U32(uint32_t* v) {
    if (b_.size() - pos_ < 4) return false;
    *v = GetU32(b_.data() + pos_);
    pos_ += 4;
    return true;
  }
  bool U64(uint64_t* v) {
    if (b_.size() - pos_ < 8) return false;
    *v = GetU64(b_.data() + pos_);
    pos_ += 8;
    return true;
  }
  bool U16(uint16_t* v) {
    if (b_.size() - pos_ < 2) return false;
    *v = static_cast<uint16_t>(static_cast<uint8_t>(b_[pos_]) | (static_cast<uint8_t>(b_[pos_ + 1]) << 8));
    pos_ += 2;
    return true;
  }
  bool Str(std::string* s) {
    uint32_t n = 0;
    if (!U32(&n) || n > kMaxString || b_.size() - pos_ < n) return false;
    s->assign(b_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  bool Bytes(size_t n, std::string_view* out) {
    if (b_.size() - pos_ < n) return false;
    *out = b_.substr(pos_, n);
    pos_ += n;
    return true;
  }
  size_t pos() const { return pos_; }
  size_t left() const { return b_.size() - pos_; }

 private:
  std::string_view b_;
  size_t pos_ = 0;
};

Status Bad(const std::string& what) { return Status::Corruption("replica MANIFEST: " + what); }

}  // namespace

void PutU32(std::string* out, uint32_t v) {
  char b[4];
  for (int i = 0; i < 4; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  out->append(b, 4);
}
void PutU64(std::string* out, uint64_t v) {
  char b[8];
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  out->append(b, 8);
}
uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
uint64_t GetU64(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

std::string EncodeManifest(const Manifest& m) {
  std::string out(kManifestMagic, 8);
  PutU32(&out, m.carried.empty() ? kFormatVersion : kManifestVersionCarried);
  PutU32(&out, m.block_size);
  PutStr(&out, m.vm_id);
  PutU32(&out, static_cast<uint32_t>(m.disks.size()));
  for (const ReplicaDisk& d : m.disks) {
    PutStr(&out, d.name);
    PutU64(&out, d.size);
  }
  PutU32(&out, static_cast<uint32_t>(m.points.size()));
  for (const ManifestPoint& p : m.points) {
    PutU64(&out, p.sequence);
    PutU64(&out, static_cast<uint64_t>(p.time_ms));
    out.push_back(static_cast<char>(p.kind & 0xff));
    out.push_back(static_cast<char>(p.kind >> 8));
    PutStr(&out, p.generation);
  }
  if (!m.carried.empty()) {
    PutU32(&out, static_cast<uint32_t>(m.carried.size()));
    for (uint64_t c : m.carried) PutU64(&out, c);
  }
  PutU64(&out, Hash(out.data(), out.size()));
  return out;
}

Result<Manifest> DecodeManifest(std::string_view bytes) {
  if (bytes.size() < 8 + 8) return Bad("too short (" + std::to_string(bytes.size()) + " bytes)");
  size_t body = bytes.size() - 8;
  if (GetU64(bytes.data() + body) != Hash(bytes.data(), body)) return Bad("checksum mismatch");
  Reader r(bytes.substr(0, body));
  std::string_view magic;
  if (!r.Bytes(8, &magic) || std::memcmp(magic.data(), kManifestMagic, 8) != 0) return Bad("bad magic");
  uint32_t version = 0;
  Manifest m;
  if (!r.U32(&version)) return Bad("truncated");
  if (version != kFormatVersion && version != kManifestVersionCarried)
    return Bad("unsupported version " + std::to_string(version));
  if (!r.U32(&m.block_size) || m.block_size != kReplicaBlockSize) return Bad("bad block size");
  if (!r.Str(&m.vm_id)) return Bad("bad vm id");
  uint32_t disk_count = 0;
  if (!r.U32(&disk_count) || disk_count == 0 || disk_count > kMaxDisks) return Bad("bad disk count");
  for (uint32_t i = 0; i < disk_count; ++i) {
    ReplicaDisk d;
    if (!r.Str(&d.name) || !r.U64(&d.size)) return Bad("truncated disk list");
    if (d.size == 0 || d.size % m.block_size != 0) return Bad("bad size of disk " + d.name);
    m.disks.push_back(std::move(d));
  }
  uint32_t point_count = 0;
  if (!r.U32(&point_count) || point_count == 0) return Bad("bad point count");
  // Each point takes at least 22 bytes: refuse counts the bytes cannot hold.
  if (point_count > r.left() / 22) return Bad("point count larger than the file");
  for (uint32_t i = 0; i < point_count; ++i) {
    ManifestPoint p;
    uint64_t t = 0;
    if (!r.U64(&p.sequence) || !r.U64(&t) || !r.U16(&p.kind) || !r.Str(&p.generation))
      return Bad("truncated point list");
    p.time_ms = static_cast<int64_t>(t);
    if (p.kind > 3) return Bad("bad point kind " + std::to_string(p.kind));
    if (!m.points.empty() && p.sequence <= m.points.back().sequence) return Bad("point sequences not increasing");
    m.points.push_back(std::move(p));
  }
  if (version == kManifestVersionCarried) {
    uint32_t carried_count = 0;
    if (!r.U32(&carried_count) || carried_count == 0) return Bad("bad carried segment count");
    if (carried_count > r.left() / 8) return Bad("carried segment count larger than the file");
    size_t next_point = 0;
    for (uint32_t i = 0; i < carried_count; ++i) {
      uint64_t c = 0;
      if (!r.U64(&c)) return Bad("truncated carried segment list");
      if (!m.carried.empty() && c <= m.carried.back()) return Bad("carried segments not increasing");
      if (c <= m.points.front().sequence || c >= m.points.back().sequence)
        return Bad("carried segment " + std::to_string(c) + " outside the retained points");
      while (m.points[next_point].sequence < c) ++next_point;
      if (m.points[next_point].sequence == c) return Bad("carried segment " + std::to_string(c) + " is a point");
      m.carried.push_back(c);
    }
  }
  if (r.left() != 0) return Bad("trailing bytes");
  return m;
}

std::string EncodeSegmentHeader(const SegmentHeader& h) {
  std::string out(kSegmentMagic, 8);
  PutU32(&out, kFormatVersion);
  PutU32(&out, h.block_size);
  PutU64(&out, h.point_seq);
  PutU64(&out, h.upper_seq);
  PutU32(&out, h.disk_count);
  PutU32(&out, 0);
  PutU64(&out, 0);
  PutU64(&out, 0);
  PutU64(&out, Hash(out.data(), out.size()));
  return out;
}

Status DecodeSegmentHeader(const char* p, SegmentHeader* out) {
  if (std::memcmp(p, kSegmentMagic, 8) != 0) return Status::Corruption("undo segment: bad magic");
  if (GetU64(p + 56) != Hash(p, 56)) return Status::Corruption("undo segment: header checksum mismatch");
  uint32_t version = GetU32(p + 8);
  if (version != kFormatVersion)
    return Status::Corruption("undo segment: unsupported version " + std::to_string(version));
  out->block_size = GetU32(p + 12);
  out->point_seq = GetU64(p + 16);
  out->upper_seq = GetU64(p + 24);
  out->disk_count = GetU32(p + 32);
  if (out->block_size != kReplicaBlockSize) return Status::Corruption("undo segment: bad block size");
  if (out->upper_seq <= out->point_seq) return Status::Corruption("undo segment: upper sequence not above point");
  return Status::Ok();
}

void AppendEntry(std::string* out, uint32_t disk, uint64_t block, bool zero, const char* payload, uint32_t block_size) {
  AppendRawEntry(out, disk, block, zero ? kEntryFlagZero : 0, payload, zero ? 0 : block_size);
}

void AppendRawEntry(std::string* out, uint32_t disk, uint64_t block, uint32_t flags, const char* payload, uint32_t len) {
  size_t start = out->size();
  PutU32(out, kEntryTag);
  PutU32(out, flags);
  PutU32(out, disk);
  PutU32(out, len);
  PutU64(out, block);
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  XXH3_64bits_update(st, out->data() + start, 24);
  if (len > 0) XXH3_64bits_update(st, payload, len);
  uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  PutU64(out, h);
  if (len > 0) out->append(payload, len);
}

bool EntryShapeOk(uint32_t flags, uint32_t payload_len, uint32_t block_size) {
  switch (flags) {
    case 0:
      return payload_len == block_size;
    case kEntryFlagZero:
      return payload_len == 0;
    case kEntryFlagZstd:
      return payload_len > 0 && payload_len < block_size;
    default:
      return false;
  }
}

void AppendMarker(std::string* out, uint32_t tag, uint64_t offset, uint64_t entry_count) {
  size_t start = out->size();
  PutU32(out, tag);
  PutU32(out, 0);
  PutU64(out, offset);
  PutU64(out, entry_count);
  PutU64(out, Hash(out->data() + start, 24));
}

RecordHeader ParseRecordHeader(const char* p) {
  RecordHeader h;
  h.tag = GetU32(p);
  h.flags = GetU32(p + 4);
  h.disk = GetU32(p + 8);
  h.payload_len = GetU32(p + 12);
  h.block = GetU64(p + 16);
  h.offset = GetU64(p + 8);
  h.entry_count = GetU64(p + 16);
  h.checksum = GetU64(p + 24);
  return h;
}

bool MarkerChecksumOk(const char* p) { return GetU32(p + 4) == 0 && GetU64(p + 24) == Hash(p, 24); }

bool EntryChecksumOk(const char* header, const char* payload, uint32_t payload_len) {
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  XXH3_64bits_update(st, header, 24);
  if (payload_len > 0) XXH3_64bits_update(st, payload, payload_len);
  uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return h == GetU64(header + 24);
}

}  // namespace vmreplica::replica_internal
