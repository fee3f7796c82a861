// Internal helpers of the reverse module. The range list format v1 is
// specified in docs/failover.md section 15.1; its frozen numbers are in
// include/vmreplica/reverse.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "vmreplica/reverse.h"

namespace vmreplica::reverse_internal {

// Every rule of 15.1 that the decoded content must satisfy (counts, kind-1
// zeros, points, entries, labels). InvalidArgument naming the rule.
Status CheckRangeList(uint16_t kind, uint32_t disk_count, const SinceList& list);

// `a` minus `b`; both sorted by (disk, offset) with no overlaps inside
// either. The answer is sorted and block-exact (no rounding).
std::vector<ReplicaRange> SubtractRanges(const std::vector<ReplicaRange>& a, const std::vector<ReplicaRange>& b);

// Merges neighbours of `in` (sorted by (disk, offset), not overlapping) on
// one disk whose gap is below `gap` bytes (touching ones when gap > 0); a merged
// entry takes the larger label, so the entries labelled >= k of the answer
// cover those of `in` for every k (a superset).
std::vector<RangeEntry> CoarsenEntries(const std::vector<RangeEntry>& in, uint64_t gap);

}  // namespace vmreplica::reverse_internal
