// Byte formats of the replica store: the MANIFEST and the undo segment
// (.vru). Spec: docs/replica_store.md sections 3 and 4. Every number here
// is frozen; a new record kind gets a new tag, never a reused one.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "vmreplica/replica_store.h"
#include "vmreplica/status.h"

namespace vmreplica::replica_internal {

inline constexpr uint32_t kFormatVersion = 1;  // undo segments; MANIFEST without carried segments
// A MANIFEST that lists carried segments (docs section 3). Written only when
// there are some, so a store without them stays readable by version-1 code.
inline constexpr uint32_t kManifestVersionCarried = 2;
inline constexpr size_t kSegmentHeaderSize = 64;
inline constexpr size_t kRecordHeaderSize = 32;
inline constexpr uint32_t kEntryTag = 0x59544E45;    // "ENTY"
inline constexpr uint32_t kBatchTag = 0x48435442;    // "BTCH"
inline constexpr uint32_t kTrailerTag = 0x4C494154;  // "TAIL"
inline constexpr uint32_t kEntryFlagZero = 1;
// The payload is one zstd frame that decompresses to exactly block_size
// bytes; 0 < payload_len < block_size. Never together with kEntryFlagZero.
inline constexpr uint32_t kEntryFlagZstd = 2;
inline constexpr uint32_t kMaxDisks = 256;
inline constexpr uint32_t kMaxString = 4096;

// ---- Manifest ----

struct ManifestPoint {
  uint64_t sequence = 0;
  int64_t time_ms = 0;
  uint16_t kind = 0;  // ReplicationType number, 0..3
  std::string generation;
};

struct Manifest {
  uint32_t block_size = kReplicaBlockSize;
  std::string vm_id;
  std::vector<ReplicaDisk> disks;
  std::vector<ManifestPoint> points;  // sequences strictly increasing, >= 1 point
  // Carried segments (version 2): undo/<seq>.vru files kept after their
  // point was dropped from the middle, because older points still need
  // their before-images. Strictly increasing, each strictly between the
  // oldest and the latest point and equal to none.
  std::vector<uint64_t> carried;
};

std::string EncodeManifest(const Manifest& m);
// Corruption on any failed check.
Result<Manifest> DecodeManifest(std::string_view bytes);

// ---- Undo segment ----

struct SegmentHeader {
  uint32_t block_size = kReplicaBlockSize;
  uint64_t point_seq = 0;
  uint64_t upper_seq = 0;
  uint32_t disk_count = 0;
};

std::string EncodeSegmentHeader(const SegmentHeader& h);
// `p` holds kSegmentHeaderSize bytes. Corruption on a failed check.
Status DecodeSegmentHeader(const char* p, SegmentHeader* out);

// Appends one entry; `payload` is block_size bytes unless `zero`.
void AppendEntry(std::string* out, uint32_t disk, uint64_t block, bool zero, const char* payload, uint32_t block_size);
// Appends one entry with explicit flags and payload (`len` bytes).
void AppendRawEntry(std::string* out, uint32_t disk, uint64_t block, uint32_t flags, const char* payload, uint32_t len);
// True when an entry's flags and payload_len agree (docs section 4).
bool EntryShapeOk(uint32_t flags, uint32_t payload_len, uint32_t block_size);
// Appends a batch marker or trailer (tag kBatchTag / kTrailerTag) that
// will sit at file offset `offset`.
void AppendMarker(std::string* out, uint32_t tag, uint64_t offset, uint64_t entry_count);

// A decoded 32-byte record header. For entries: flags, disk, payload_len,
// block. For markers: offset, entry_count.
struct RecordHeader {
  uint32_t tag = 0;
  uint32_t flags = 0;
  uint32_t disk = 0;
  uint32_t payload_len = 0;
  uint64_t block = 0;
  uint64_t offset = 0;
  uint64_t entry_count = 0;
  uint64_t checksum = 0;
};
RecordHeader ParseRecordHeader(const char* p);
// Checks a marker's checksum (it covers its first 24 bytes).
bool MarkerChecksumOk(const char* p);
// Checks an entry: checksum over header bytes 0..23 and the payload.
bool EntryChecksumOk(const char* header, const char* payload, uint32_t payload_len);

// Fixed-width little-endian coding.
void PutU32(std::string* out, uint32_t v);
void PutU64(std::string* out, uint64_t v);
uint32_t GetU32(const char* p);
uint64_t GetU64(const char* p);

}  // namespace vmreplica::replica_internal
