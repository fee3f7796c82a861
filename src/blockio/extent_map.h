// Internal to blockio: validation of block-status replies and the
// intersection of base:allocation with a dirty bitmap. Pure functions over
// the numbers the server sent, so hostile replies can be unit-tested.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "vmreplica/status.h"

namespace vmreplica::blockio_internal {

// NBD_STATE_ZERO in base:allocation; "dirty" in qemu:dirty-bitmap:*.
constexpr uint32_t kStateZero = 2;
constexpr uint32_t kStateDirty = 1;

// The extents one context reported for one block-status request, checked as
// they arrive: contiguous from the request offset, no zero lengths, no
// 64-bit overflow.
class ContextExtents {
 public:
  struct Extent {
    uint32_t length;
    uint32_t flags;
  };

  // Starts over for a request at `offset`.
  void Reset(uint64_t offset);
  // Adds one libnbd extent callback's worth: `nr_entries` words, pairs of
  // (length, flags), starting at `offset`. Returns an empty string, or what is
  // wrong with the reply (the extents are then unusable).
  std::string Add(const char* context, uint64_t offset, const uint32_t* entries, size_t nr_entries);

  bool seen() const { return !extents_.empty(); }
  uint64_t start() const { return start_; }
  uint64_t end() const { return end_; }
  const std::vector<Extent>& extents() const { return extents_; }

 private:
  uint64_t start_ = 0;
  uint64_t end_ = 0;
  std::vector<Extent> extents_;
};

// Called for each range that must become a record: data (zero=false) or
// zeros (zero=true). Ranges come in increasing offset order.
using PlanFn = std::function<void(uint64_t offset, uint64_t length, bool zero)>;

// Walks `alloc` (and `dirty`, when not null) from their common start up to
// where both have answered, clipped to `size`, and calls `plan` per range:
//   delta mode (dirty != null): dirty ∧ ZERO -> zero; dirty ∧ ¬ZERO -> data.
//   initial copy (dirty == null): ¬ZERO -> data; ZERO is skipped.
// Returns the offset up to which the map is now known (> start), or
// Corruption when a context sent nothing or the reply made no progress.
Result<uint64_t> Intersect(uint64_t size, const ContextExtents& alloc, const char* alloc_name,
                           const ContextExtents* dirty, const char* dirty_name, const PlanFn& plan);

}  // namespace vmreplica::blockio_internal
