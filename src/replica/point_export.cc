#include "vmreplica/point_export.h"

#include <algorithm>

namespace vmreplica {

Result<std::shared_ptr<PointExportSource>> PointExportSource::Create(const ReplicaStore* store, uint64_t sequence,
                                                                     uint32_t disk) {
  if (store == nullptr) return Status::InvalidArgument("no store");
  if (disk >= store->disks().size()) {
    return Status::NotFound("no disk " + std::to_string(disk) + " in the replica of " + store->vm_id());
  }
  const auto points = store->ListPoints();
  auto it = std::find_if(points.begin(), points.end(), [&](const ReplicaPoint& p) { return p.sequence == sequence; });
  if (it == points.end()) return Status::NotFound("no recovery point " + std::to_string(sequence));
  if (!it->readable) return Status::Corruption("recovery point " + std::to_string(sequence) + " is not readable");
  return std::shared_ptr<PointExportSource>(
      new PointExportSource(store, sequence, disk, store->disks()[disk].size));
}

Status PointExportSource::Read(uint64_t offset, uint64_t length, char* out) {
  return store_->ReadPoint(sequence_, disk_, offset, length, out);
}

Result<std::vector<Extent>> PointExportSource::Extents(uint64_t offset, uint64_t length) {
  VMR_ASSIGN_OR_RETURN(std::vector<ReplicaExtent> all, store_->PointExtents(sequence_, disk_));
  std::vector<Extent> out;
  const uint64_t end = offset + length;
  for (const auto& e : all) {
    const uint64_t e_end = e.offset + e.length;
    if (e_end <= offset || e.offset >= end) continue;
    const uint64_t from = std::max(offset, e.offset);
    const uint64_t to = std::min(end, e_end);
    // A zero extent of the store may be a hole of the sparse base or a
    // zero before-image: both read as zeros; report it as zero, not a hole.
    out.push_back(Extent{to - from, /*hole=*/false, /*zero=*/e.zero});
  }
  if (out.empty()) return Status::Internal("the store described no extent of the requested range");
  return out;
}

}  // namespace vmreplica
