// Serves one disk of one recovery point of a ReplicaStore as an NBD export
// source: the glue between the replica store and the NBD server, so that a
// failover or test VM (through a qcow2 overlay), qemu-img, nbdcopy or
// nbdinfo can read any retained point without copying it.
#pragma once

#include <memory>

#include "vmreplica/nbd_server.h"
#include "vmreplica/replica_store.h"

namespace vmreplica {

class PointExportSource final : public ExportSource {
 public:
  // `store` is not owned and must outlive the source. Reads of a point that
  // retention has since pruned fail with NotFound (the client sees EIO):
  // the caller keeps a point it exports (see docs/replica_store.md).
  static Result<std::shared_ptr<PointExportSource>> Create(const ReplicaStore* store, uint64_t sequence,
                                                           uint32_t disk);

  uint64_t size() const override { return size_; }
  Status Read(uint64_t offset, uint64_t length, char* out) override;
  Result<std::vector<Extent>> Extents(uint64_t offset, uint64_t length) override;

 private:
  PointExportSource(const ReplicaStore* store, uint64_t sequence, uint32_t disk, uint64_t size)
      : store_(store), sequence_(sequence), disk_(disk), size_(size) {}

  // Constant after construction; the store is thread-safe for reads.
  const ReplicaStore* const store_;
  const uint64_t sequence_;
  const uint32_t disk_;
  const uint64_t size_;
};

}  // namespace vmreplica
