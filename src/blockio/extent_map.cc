#include "blockio/extent_map.h"

#include <algorithm>
#include <limits>

namespace vmreplica::blockio_internal {

void ContextExtents::Reset(uint64_t offset) {
  start_ = offset;
  end_ = offset;
  extents_.clear();
}

std::string ContextExtents::Add(const char* context, uint64_t offset, const uint32_t* entries,
                                size_t nr_entries) {
  if (nr_entries == 0 || nr_entries % 2 != 0)
    return "server sent " + std::to_string(nr_entries) + " extent words for " + context;
  if (offset != end_)
    return std::string("server sent extents of ") + context + " at offset " +
           std::to_string(offset) + ", expected " + std::to_string(end_);
  for (size_t i = 0; i < nr_entries; i += 2) {
    const uint32_t len = entries[i];
    if (len == 0)
      return std::string("server sent a zero-length extent for ") + context + " at offset " +
             std::to_string(end_);
    if (end_ > std::numeric_limits<uint64_t>::max() - len)
      return std::string("extent of ") + context + " overflows 64 bits";
    end_ += len;
    extents_.push_back({len, entries[i + 1]});
  }
  return {};
}

Result<uint64_t> Intersect(uint64_t size, const ContextExtents& alloc, const char* alloc_name,
                           const ContextExtents* dirty, const char* dirty_name,
                           const PlanFn& plan) {
  const uint64_t start = alloc.start();
  if (!alloc.seen())
    return Status::Corruption(std::string("server sent no extents for ") + alloc_name +
                              " at offset " + std::to_string(start));
  uint64_t end = std::min(size, alloc.end());
  if (dirty != nullptr) {
    if (dirty->start() != start) return Status::Internal("contexts start at different offsets");
    if (!dirty->seen())
      return Status::Corruption(std::string("server sent no extents for ") + dirty_name +
                                " at offset " + std::to_string(start));
    end = std::min(end, dirty->end());
  }
  if (end <= start)
    return Status::Corruption("block status at " + std::to_string(start) + " made no progress");

  // Walk both lists in step; a segment ends where either context's extent
  // ends. Both lists reach at least `end`, so the indices stay in range.
  const auto& a = alloc.extents();
  size_t ai = 0, di = 0;
  uint64_t a_end = start + a[0].length;
  uint64_t d_end = dirty != nullptr ? start + dirty->extents()[0].length : end;
  uint64_t pos = start;
  while (pos < end) {
    const uint64_t seg_end = std::min({a_end, d_end, end});
    const bool zero = (a[ai].flags & kStateZero) != 0;
    const bool is_dirty = dirty == nullptr || (dirty->extents()[di].flags & kStateDirty) != 0;
    if (is_dirty) {
      if (!zero) {
        plan(pos, seg_end - pos, false);
      } else if (dirty != nullptr) {
        plan(pos, seg_end - pos, true);
      }
    }
    pos = seg_end;
    if (pos == a_end && ai + 1 < a.size()) a_end += a[++ai].length;
    if (dirty != nullptr && pos == d_end && di + 1 < dirty->extents().size())
      d_end += dirty->extents()[++di].length;
  }
  return end;
}

}  // namespace vmreplica::blockio_internal
