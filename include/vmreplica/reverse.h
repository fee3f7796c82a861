// Reverse replication helpers (docs/failover.md sections 8, 10.3, 12, 14.1,
// 15): range lists (format v1, section 15.1) for the since file (kind 2)
// and candidate sets (kind 1), the history of changed blocks a replica
// store saves before a failover commit drops it (`LabelChangedSince`), the
// range arithmetic of the reverse sync (`ChangedAfter`, `UniteRanges`,
// `RoundToBlocks`) and the reverse records (section 15.2).
//
// Errors:
//   InvalidArgument     ParseRangeList: the bytes break a rule of 15.1 (the
//                       message names the rule and the field); a list to be
//                       written breaks one;
//   Corruption          a range list or record file fails a check; a point
//                       of the store carries a malformed generation;
//   FailedPrecondition  ChangedAfter cannot answer for that common point
//                       (the caller takes every block);
//   NotFound            a file is missing;
//   IOError             the OS refused.
//
// Thread safety: free functions over values; safe from any thread.
// LabelChangedSince reads the store like its other readers (it should run
// while no Apply does, as in CommitFailover, so that its points stay put).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "vmreplica/logformat.h"  // GenerationId
#include "vmreplica/replica_store.h"
#include "vmreplica/status.h"

namespace vmreplica {

// ---------------------------------------------------------------- range lists

// Frozen numbers of range list version 1 (docs/failover.md section 15.1).
inline constexpr uint16_t kRangeListVersion = 1;
inline constexpr uint16_t kRangeListCandidates = 1;  // kind 1: A's / B's candidates
inline constexpr uint16_t kRangeListSince = 2;       // kind 2: the since file
inline constexpr uint32_t kRangeListMaxDisks = 64;
inline constexpr uint32_t kRangeListMaxPoints = uint32_t{1} << 20;
inline constexpr uint64_t kRangeListMaxEntries = uint64_t{1} << 24;
inline constexpr uint64_t kRangeListAlign = 4096;    // offsets and lengths
inline constexpr size_t kRangeListHeaderBytes = 72;  // header + its checksum

// One range of one disk; `label` is 0 in kind 1 and a listed point in kind 2
// (the range may differ between that point and the latest, and was not
// already labelled by a newer point).
struct RangeEntry {
  uint32_t disk = 0;
  uint64_t offset = 0, length = 0, label = 0;

  bool operator==(const RangeEntry&) const = default;
};

// The content of a range list. Kind 1 uses `entries` only (the other
// members stay 0 / empty).
struct SinceList {
  uint64_t base_sequence = 0, replicated_sequence = 0;
  GenerationId generation{};
  std::vector<uint64_t> points;     // ascending, unique, >= base_sequence
  std::vector<RangeEntry> entries;  // sorted by (disk, offset), not overlapping

  bool operator==(const SinceList&) const = default;
};

// A's answer to PrepareReverse (section 14.1).
struct ReverseClaim {
  GenerationId generation{};
  uint64_t common_sequence = 0;
  bool tracking_intact = false;
  uint64_t candidate_bytes = 0, local_copy_bytes = 0;

  bool operator==(const ReverseClaim&) const = default;
};

// Bytes of `list` in format v1 of `kind` for `disk_count` disks. The list
// must satisfy the rules of 15.1 (WriteRangeListFile checks them; a list
// built by LabelChangedSince or from a parsed one does); the function
// writes what it is given.
std::string SerializeRangeList(uint16_t kind, uint32_t disk_count, const SinceList& list);

// Parses and checks `bytes` (every rule of 15.1, the header checksum first,
// counts and total size before anything is allocated). The header's kind
// must be `expected_kind` and its disk count `disk_count`. InvalidArgument
// with the rule broken.
Result<SinceList> ParseRangeList(std::string_view bytes, uint16_t expected_kind, uint32_t disk_count);

// Checks `list` against 15.1 (InvalidArgument), then writes it atomically
// (temp, fsync, rename, fsync dir; mode 0600).
Status WriteRangeListFile(const std::string& path, uint16_t kind, uint32_t disk_count, const SinceList& list);

// Reads and checks a file written by WriteRangeListFile: the header is read
// and checked first and the file's size compared with it before the rest
// is read. Corruption for content that fails a rule; NotFound; IOError.
Result<SinceList> ReadRangeListFile(const std::string& path, uint16_t kind, uint32_t disk_count);

// ---------------------------------------------------------------- ranges

// A run of whole blocks of one disk.
struct BlockRun {
  uint64_t first_block = 0;
  uint64_t block_count = 0;

  bool operator==(const BlockRun&) const = default;
};

// B's blocks written after the common point `common_sequence` (section 10.3
// step 3): the entries labelled >= k*, the largest listed point <= C,
// sorted by (disk, offset), adjacent ranges coalesced. FailedPrecondition
// (the caller then takes every block) when the list names no generation or
// another one than `generation`, when C is above `replicated_sequence`, or
// when no listed point is <= C.
Result<std::vector<ReplicaRange>> ChangedAfter(const SinceList& since, const GenerationId& generation,
                                               uint64_t common_sequence);

// The union of `a` and `b` (any order, overlaps allowed; empty ranges
// dropped): sorted by (disk, offset), overlapping and adjacent ranges
// merged. An end past 2^64 is clamped there.
std::vector<ReplicaRange> UniteRanges(std::vector<ReplicaRange> a, const std::vector<ReplicaRange>& b);

// The ranges of `r` on disk `disk` rounded out to whole blocks of
// `block_size` (> 0; else the answer is empty), clamped to the disk's
// ceil(disk_size / block_size) blocks, ascending; runs that overlap, touch
// or lie less than `merge_gap` bytes apart are merged into one run.
std::vector<BlockRun> RoundToBlocks(const std::vector<ReplicaRange>& r, uint32_t disk, uint32_t block_size,
                                      uint64_t disk_size, uint64_t merge_gap);

// The since list of `store` (section 10.3 step 3): the latest point and
// every readable retained point k below it, walked newest first, each
// labelling ChangedSince(k) minus what newer points already labelled; an
// unreadable point or a ChangedSince that answers Corruption ends the walk
// (the points below are not listed); a point retention dropped meanwhile
// (NotFound) is skipped. base_sequence = the oldest listed point,
// replicated_sequence = the latest point (a caller that rolled the store
// back sets the last point received from the primary instead), generation
// = the latest point's (32 hex digits; an empty one gives zeros, which
// ChangedAfter never matches; anything else is Corruption). When the
// entries exceed kRangeListMaxEntries, neighbours on one disk are merged
// across the smallest gaps (the merged range keeps the larger label: a
// superset). Other store errors are returned.
Result<SinceList> LabelChangedSince(const ReplicaStore& store);

// ---------------------------------------------------------------- text forms

// 16 bytes -> 32 lower-case hex digits (the catalog's and the records' form).
std::string GenerationHex(const GenerationId& g);
// 32 hex digits (either case) -> 16 bytes; "" -> zeros; else Corruption.
Result<GenerationId> ParseGenerationHex(const std::string& text);
// "host:port" or "[v6 literal]:port" (host of letters, digits, '.', '-', at
// most 253; port 1..65535 without a leading zero): section 15.2's rule.
bool IsHostPort(const std::string& s);

// ---------------------------------------------------------------- records

// Reverse records are at most this many bytes.
inline constexpr size_t kReverseRecordMaxBytes = 64 * 1024;

// <state>/reverse/<vm id>.send.json, .recv.json and .acand.
std::string ReverseSendRecordPath(const std::string& state_dir, const std::string& vm_id);
std::string ReverseRecvRecordPath(const std::string& state_dir, const std::string& vm_id);
std::string ReverseAcandPath(const std::string& state_dir, const std::string& vm_id);

// B's record of a reverse or failback it runs (section 15.2).
struct ReverseSendRecord {
  std::string purpose;                // "reverse" / "failback"
  std::string vm_id;                  // UUID text (lower case)
  std::string request_id;             // UUID text (lower case)
  std::string phase;                  // "started" / "peer" / "switched"
  std::string target;                 // "host:port" (or "[v6]:port") of A
  std::optional<ReverseClaim> claim;  // A's answer; required in "switched"

  bool operator==(const ReverseSendRecord&) const = default;

  nlohmann::json Encode() const;
  // Every member checked (Corruption naming it); `state_dir` is not needed
  // by a sender record's checks (kept for symmetry with the receiver).
  static Result<ReverseSendRecord> Decode(const nlohmann::json& j, const std::string& state_dir);
};

// A's record of a PrepareReverse it serves (section 15.2).
struct ReverseRecvRecord {
  std::string purpose;                    // "reverse" / "failback"
  std::string vm_id;                      // UUID text (lower case)
  std::string request_id;                 // UUID text (lower case)
  std::string phase;                      // "inspecting" / "adopting" / "switched"
  std::vector<std::string> caller_names;  // the caller's certificate names, 1..64
  std::optional<ReverseClaim> claim;      // once known; required in "switched"
  std::string store_dir;                  // absolute, normalised; "" only in "inspecting"
  bool created_dir = false;               // this reverse created store_dir (false while it is "")
  std::string acand_file;                 // exactly ReverseAcandPath(state_dir, vm_id)

  bool operator==(const ReverseRecvRecord&) const = default;

  nlohmann::json Encode() const;
  // Every member checked (Corruption naming it). Whether store_dir lies in
  // the caller's authorization entry's storage location is the user's check.
  static Result<ReverseRecvRecord> Decode(const nlohmann::json& j, const std::string& state_dir);
};

// Writes `record` (dumped, indented) atomically with mode 0600;
// InvalidArgument when it exceeds kReverseRecordMaxBytes.
Status WriteReverseRecord(const std::string& path, const nlohmann::json& record);
// Reads a record file: NotFound when missing; Corruption when larger than
// kReverseRecordMaxBytes or not a JSON object; IOError.
Result<nlohmann::json> ReadReverseRecord(const std::string& path);

}  // namespace vmreplica
