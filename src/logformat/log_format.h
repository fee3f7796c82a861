// Frozen numbers and byte layout of the delta log (docs/log_format.md).
// Private to src/logformat and its tools; the public API is
// include/vmreplica/logformat.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "vmreplica/logformat.h"

namespace vmreplica::log {

// Never reuse or renumber (docs/log_format.md, "Numbers that are frozen").
inline constexpr char kMagic[8] = {'V', 'M', 'R', 'D', 'E', 'L', 'T', 'A'};
inline constexpr uint32_t kVersion1 = 1;

enum RecordType : uint8_t {
  kTypeData = 1,
  kTypeZero = 2,
  kTypeTrailer = 3,
};

inline constexpr uint32_t kTrailerFlagComplete = 1;

// Header: 80 fixed bytes, the relationship id, the disks, a u64 checksum.
inline constexpr size_t kHeaderFixedSize = 80;
inline constexpr size_t kHeaderPrefixSize = 16;  // magic, version, length: same in every version
inline constexpr size_t kDiskEntryFixedSize = 2 + 8;
inline constexpr size_t kMaxHeaderSize =
    kHeaderFixedSize + kLogMaxRelationshipIdLength + kLogMaxDisks * (kDiskEntryFixedSize + kLogMaxDiskNameLength) + 8;

// Record headers and the trailer: 48 bytes, block checksum at 40 over 0..39.
inline constexpr size_t kBlockSize = 48;
inline constexpr size_t kBlockChecksumOffset = 40;
inline constexpr size_t kRecordChecksumOffset = 32;

// Little-endian fixed-width coding.
inline void PutU16(std::string* dst, uint16_t v) {
  char b[2] = {static_cast<char>(v), static_cast<char>(v >> 8)};
  dst->append(b, 2);
}
inline void PutU32(std::string* dst, uint32_t v) {
  char b[4];
  for (int i = 0; i < 4; ++i) b[i] = static_cast<char>(v >> (8 * i));
  dst->append(b, 4);
}
inline void PutU64(std::string* dst, uint64_t v) {
  char b[8];
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>(v >> (8 * i));
  dst->append(b, 8);
}
inline uint16_t GetU16(const char* p) {
  auto u = reinterpret_cast<const unsigned char*>(p);
  return static_cast<uint16_t>(u[0] | (u[1] << 8));
}
inline uint32_t GetU32(const char* p) {
  auto u = reinterpret_cast<const unsigned char*>(p);
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | u[i];
  return v;
}
inline uint64_t GetU64(const char* p) {
  auto u = reinterpret_cast<const unsigned char*>(p);
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | u[i];
  return v;
}

// XXH3-64, seed 0.
uint64_t Checksum(std::string_view bytes);
// XXH3-64 over a ++ b.
uint64_t Checksum2(std::string_view a, std::string_view b);
// chain_i = XXH3_64bits_withSeed(le64(record_checksum), seed = chain_{i-1}).
uint64_t ChainNext(uint64_t chain, uint64_t record_checksum);

// Serialises a header that passed ValidateLogHeader (with its checksum).
std::string EncodeHeader(const LogHeader& header);

// Parses and checks a header of exactly `bytes.size()` bytes (the
// header_length from the prefix; the checksum was already verified).
// Corruption or NotSupported.
Status DecodeHeader(std::string_view bytes, LogHeader* header);

// Disk name rule shared by writer and reader.
bool ValidDiskName(std::string_view name);

}  // namespace vmreplica::log
