// The since list of a replica store (docs/failover.md section 10.3 step 3).
#include <algorithm>
#include <limits>

#include "reverse/range_list.h"

namespace vmreplica {

namespace reverse_internal {

std::vector<RangeEntry> CoarsenEntries(const std::vector<RangeEntry>& in, uint64_t gap) {
  std::vector<RangeEntry> out;
  for (const RangeEntry& e : in) {
    if (!out.empty()) {
      RangeEntry& p = out.back();
      const uint64_t p_end = p.offset + p.length;
      if (p.disk == e.disk && e.offset - p_end < gap) {
        p.length = e.offset + e.length - p.offset;
        p.label = std::max(p.label, e.label);
        continue;
      }
    }
    out.push_back(e);
  }
  return out;
}

}  // namespace reverse_internal

Result<SinceList> LabelChangedSince(const ReplicaStore& store) {
  const std::vector<ReplicaPoint> points = store.ListPoints();
  if (points.empty()) return Status::FailedPrecondition("the replica store lists no point");
  const ReplicaPoint& latest = points.back();
  SinceList out;
  out.replicated_sequence = latest.sequence;
  auto g = ParseGenerationHex(latest.generation_id);
  if (!g.ok())
    return Status::Corruption("latest point " + std::to_string(latest.sequence) + ": " + g.status().message());
  out.generation = *g;
  out.points.push_back(latest.sequence);

  std::vector<ReplicaRange> labelled;  // union of what newer points labelled, sorted, coalesced
  for (size_t i = points.size() - 1; i-- > 0;) {
    const ReplicaPoint& p = points[i];
    if (!p.readable) break;  // a segment it needs is corrupt: so do all points below it
    auto changed = store.ChangedSince(p.sequence);
    if (!changed.ok()) {
      if (changed.status().code() == Code::kCorruption) break;
      if (changed.status().code() == Code::kNotFound) continue;  // dropped by retention meanwhile
      return changed.status();
    }
    for (const ReplicaRange& r : reverse_internal::SubtractRanges(*changed, labelled)) {
      out.entries.push_back({r.disk, r.offset, r.length, p.sequence});
    }
    labelled = UniteRanges(std::move(labelled), *changed);
    out.points.push_back(p.sequence);
  }
  std::reverse(out.points.begin(), out.points.end());
  out.base_sequence = out.points.front();
  std::sort(out.entries.begin(), out.entries.end(), [](const RangeEntry& a, const RangeEntry& b) {
    return a.disk != b.disk ? a.disk < b.disk : a.offset < b.offset;
  });
  // Within the bound of 15.1: merge across ever wider gaps.
  for (uint64_t gap = 64 * 1024; out.entries.size() > kRangeListMaxEntries; gap *= 2) {
    out.entries = reverse_internal::CoarsenEntries(out.entries, gap);
    if (gap > std::numeric_limits<uint64_t>::max() / 2) break;
  }
  return out;
}

}  // namespace vmreplica
