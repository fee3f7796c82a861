// The unit of change that flows from the primary to the replica: one
// extent of one disk, either data or zeros. Produced by the primary's NBD
// reader (src/blockio), carried in delta log files (src/logformat, spec in
// docs/log_format.md) and applied by the replica store (src/replica).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "vmreplica/status.h"

namespace vmreplica {

struct DeltaRecord {
  uint32_t disk = 0;       // index into the delta's disk list
  uint64_t offset = 0;     // bytes from the start of the disk
  uint64_t length = 0;     // bytes; > 0
  bool zero = false;       // the extent reads as zeros (no payload)
  std::string data;        // exactly `length` bytes when !zero, empty when zero
};

// A stream of records, in the order they must be applied. Next() answers
// nullopt at the end; an error ends the stream (nothing after it is valid).
class DeltaSource {
 public:
  virtual ~DeltaSource() = default;
  virtual Result<std::optional<DeltaRecord>> Next() = 0;
  // Hands back the data buffer of a record this source gave out, once its
  // consumer is done with the bytes (the sender, after serialising a
  // chunk). A source may reuse it for a later record instead of allocating
  // and zero-filling a new one; the default drops it. Called on the thread
  // that calls Next(), never during it. Wrappers pass it to their source.
  virtual void Recycle(std::string buffer) { (void)buffer; }
};

// A data record of `bytes` at `offset` of disk `disk`.
inline DeltaRecord DataRecord(uint32_t disk, uint64_t offset, std::string bytes) {
  DeltaRecord r;
  r.disk = disk;
  r.offset = offset;
  r.length = bytes.size();
  r.data = std::move(bytes);
  return r;
}

// A zero record of `length` bytes at `offset` of disk `disk`.
inline DeltaRecord ZeroRecord(uint32_t disk, uint64_t offset, uint64_t length) {
  DeltaRecord r;
  r.disk = disk;
  r.offset = offset;
  r.length = length;
  r.zero = true;
  return r;
}

// Hands out records held in memory, in order.
class VectorDeltaSource final : public DeltaSource {
 public:
  explicit VectorDeltaSource(std::vector<DeltaRecord> records) : records_(std::move(records)) {}
  Result<std::optional<DeltaRecord>> Next() override {
    if (next_ == records_.size()) return std::optional<DeltaRecord>();
    return std::optional<DeltaRecord>(records_[next_++]);
  }

 private:
  std::vector<DeltaRecord> records_;
  size_t next_ = 0;
};

}  // namespace vmreplica
