#include "logformat/log_format.h"

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include <set>

namespace vmreplica {

using namespace log;

Status ValidateLogHeader(const LogHeader& header) {
  const std::string& id = header.relationship_id;
  if (id.empty() || id.size() > kLogMaxRelationshipIdLength) {
    return Status::InvalidArgument("relationship id must be 1.." + std::to_string(kLogMaxRelationshipIdLength) +
                                   " bytes, is " + std::to_string(id.size()));
  }
  for (char c : id) {
    if (c < 0x21 || c > 0x7e) return Status::InvalidArgument("relationship id has a byte outside printable ASCII");
  }
  auto kind = static_cast<uint16_t>(header.kind);
  if (kind < 1 || kind > 3) return Status::InvalidArgument("kind must be 1, 2 or 3, is " + std::to_string(kind));
  if (header.disks.empty() || header.disks.size() > kLogMaxDisks) {
    return Status::InvalidArgument("disk count must be 1.." + std::to_string(kLogMaxDisks) + ", is " +
                                   std::to_string(header.disks.size()));
  }
  std::set<std::string_view> names;
  for (const LogDisk& disk : header.disks) {
    if (!ValidDiskName(disk.name))
      return Status::InvalidArgument("invalid disk name '" + disk.name.substr(0, 300) + "'");
    if (!names.insert(disk.name).second) return Status::InvalidArgument("duplicate disk name '" + disk.name + "'");
    if (disk.size_bytes == 0 || disk.size_bytes > kLogMaxDiskSize) {
      return Status::InvalidArgument("disk '" + disk.name + "' size must be 1..2^62, is " +
                                     std::to_string(disk.size_bytes));
    }
  }
  return Status::Ok();
}

namespace log {

uint64_t Checksum(std::string_view bytes) { return XXH3_64bits(bytes.data(), bytes.size()); }

uint64_t Checksum2(std::string_view a, std::string_view b) {
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, a.data(), a.size());
  XXH3_64bits_update(&state, b.data(), b.size());
  return XXH3_64bits_digest(&state);
}

uint64_t ChainNext(uint64_t chain, uint64_t record_checksum) {
  std::string le;
  PutU64(&le, record_checksum);
  return XXH3_64bits_withSeed(le.data(), le.size(), chain);
}

bool ValidDiskName(std::string_view name) {
  if (name.empty() || name.size() > kLogMaxDiskNameLength || name[0] == '.') return false;
  for (char c : name) {
    bool ok =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::string EncodeHeader(const LogHeader& header) {
  size_t length = kHeaderFixedSize + header.relationship_id.size() + 8;
  for (const LogDisk& disk : header.disks) length += kDiskEntryFixedSize + disk.name.size();
  std::string out;
  out.reserve(length);
  out.append(kMagic, sizeof(kMagic));
  PutU32(&out, kVersion1);
  PutU32(&out, static_cast<uint32_t>(length));
  PutU32(&out, 0);  // flags
  PutU32(&out, header.relationship_index);
  PutU64(&out, header.sequence);
  out.append(reinterpret_cast<const char*>(header.base_generation.data()), 16);
  out.append(reinterpret_cast<const char*>(header.new_generation.data()), 16);
  PutU64(&out, header.cut_time_unix_ms);
  PutU16(&out, static_cast<uint16_t>(header.kind));
  PutU16(&out, static_cast<uint16_t>(header.relationship_id.size()));
  PutU16(&out, static_cast<uint16_t>(header.disks.size()));
  PutU16(&out, 0);  // reserved
  out += header.relationship_id;
  for (const LogDisk& disk : header.disks) {
    PutU16(&out, static_cast<uint16_t>(disk.name.size()));
    out += disk.name;
    PutU64(&out, disk.size_bytes);
  }
  PutU64(&out, Checksum(out));
  return out;
}

Status DecodeHeader(std::string_view bytes, LogHeader* header) {
  // The caller checked magic, length bounds and the checksum.
  if (bytes.size() < kHeaderFixedSize + 8) return Status::Corruption("header too short");
  const char* p = bytes.data();
  uint32_t version = GetU32(p + 8);
  if (version != kVersion1) {
    return Status::NotSupported("log format version " + std::to_string(version) + " (this build reads 1)");
  }
  uint32_t flags = GetU32(p + 16);
  if (flags != 0) return Status::Corruption("unknown header flags " + std::to_string(flags));
  LogHeader h;
  h.relationship_index = GetU32(p + 20);
  h.sequence = GetU64(p + 24);
  std::memcpy(h.base_generation.data(), p + 32, 16);
  std::memcpy(h.new_generation.data(), p + 48, 16);
  h.cut_time_unix_ms = GetU64(p + 64);
  uint16_t kind = GetU16(p + 72);
  if (kind < 1 || kind > 3) return Status::Corruption("unknown kind " + std::to_string(kind));
  h.kind = static_cast<ReplicationType>(kind);
  uint16_t id_length = GetU16(p + 74);
  uint16_t disk_count = GetU16(p + 76);
  if (GetU16(p + 78) != 0) return Status::Corruption("reserved header field not 0");
  if (disk_count == 0 || disk_count > kLogMaxDisks) {
    return Status::Corruption("disk count " + std::to_string(disk_count) + " out of range");
  }
  size_t end = bytes.size() - 8;  // checksum
  size_t pos = kHeaderFixedSize;
  if (id_length > end - pos) return Status::Corruption("relationship id runs past the header");
  h.relationship_id.assign(p + pos, id_length);
  pos += id_length;
  for (uint16_t i = 0; i < disk_count; ++i) {
    if (end - pos < kDiskEntryFixedSize) return Status::Corruption("disk list runs past the header");
    uint16_t name_length = GetU16(p + pos);
    pos += 2;
    if (name_length > end - pos - 8) return Status::Corruption("disk name runs past the header");
    LogDisk disk;
    disk.name.assign(p + pos, name_length);
    pos += name_length;
    disk.size_bytes = GetU64(p + pos);
    pos += 8;
    h.disks.push_back(std::move(disk));
  }
  if (pos != end) return Status::Corruption("header length does not match its fields");
  Status valid = ValidateLogHeader(h);
  if (!valid.ok()) return Status::Corruption(valid.message());
  *header = std::move(h);
  return Status::Ok();
}

}  // namespace log
}  // namespace vmreplica
