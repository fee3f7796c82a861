// The replica store: one replicated VM's disks on the replica host, kept at
// the latest applied state, plus undo segments from which every retained
// recovery point is readable. Format, apply order, retention and recovery
// are specified in docs/replica_store.md.
//
// Lifecycle (one apply):
//
//   Apply(s) --> [undo header durable] --> per batch of records (group
//   commit, ReplicaStoreOptions::apply_batch_bytes): [before-images of the
//   whole batch durable: one fdatasync] --> [the batch's data written]
//   --> [disks fsynced] --> [trailer durable] --> MANIFEST renamed (COMMIT)
//   --> catalog mirrored --> retention
//        \__ any error before COMMIT: roll back with the undo entries
//            (a failed MANIFEST write itself: refuse applies until reopened,
//            Open decides from the MANIFEST it reads back)
//
// Errors:
//   InvalidArgument     bad names/sizes/options; a delta record out of the
//                       disk's bounds or with a wrong payload length;
//   FailedPrecondition  out-of-sequence or duplicate Apply; a store that
//                       could not roll back a failed apply or whose
//                       MANIFEST write failed (reopen it);
//   AlreadyExists       Create on a directory that holds a store;
//   NotFound            unknown point, disk or store directory;
//   Busy                the store directory is open elsewhere (LOCK);
//   Corruption          MANIFEST or an undo segment failed a check; a point
//                       whose segment is corrupt cannot be read;
//   IOError             the OS refused.
//
// Thread safety: all methods may be called from any thread. Apply calls are
// serialised (one at a time); reads run concurrently with each other and
// with Apply and always see a consistent point (docs section 9).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "vmreplica/catalog.h"
#include "vmreplica/delta.h"
#include "vmreplica/model/enums.h"
#include "vmreplica/status.h"

namespace vmreplica {

// Undo granularity: bytes per before-image. Frozen in the format.
inline constexpr uint32_t kReplicaBlockSize = 4096;
// Default of ReplicaStoreOptions::apply_batch_bytes (docs section 5).
inline constexpr uint64_t kDefaultApplyBatchBytes = uint64_t{32} << 20;
// Largest accepted ReplicaStoreOptions::apply_batch_bytes.
inline constexpr uint64_t kMaxApplyBatchBytes = uint64_t{1} << 30;

struct ReplicaDisk {
  std::string name;   // 1..64 of [A-Za-z0-9._-], not starting with '.'
  uint64_t size = 0;  // bytes, > 0, multiple of kReplicaBlockSize
};

struct ReplicaStoreOptions {
  // Every delta is its own recovery point while newer than this (ms, >= 0).
  int64_t fine_window_ms = 3600 * 1000;
  // RecoveryHistory: hourly points kept for this many hours (0..24).
  int recovery_history_hours = 0;
  // > 0: hourly points older than the history are kept while all undo
  // segments together stay within this many bytes. 0 = off.
  uint64_t extended_retention_bytes = 0;
  // Store a before-image zstd-compressed (level 1) when that saves at least
  // an eighth of the block (docs section 4, entry flag 2).
  bool compress_undo = true;
  // Group commit: Apply reads records into a batch until the blocks they
  // touch reach this many bytes (a record larger than what is left is split
  // across batches), makes the before-images of the whole batch durable with
  // one fdatasync of the undo segment, then writes the batch's data (docs
  // section 5). Bounds Apply's memory to about this much record data (plus
  // the rest of a record cut at a batch boundary) and 5 MiB of buffers.
  // Range kReplicaBlockSize..kMaxApplyBatchBytes (else InvalidArgument).
  uint64_t apply_batch_bytes = kDefaultApplyBatchBytes;
  // Milliseconds since the Unix epoch; default: the system clock.
  std::function<int64_t()> now_ms;
  // Fault-injection seam (tests): called before and after every write,
  // fsync, rename and unlink with a step name and a call counter (from 1).
  std::function<void(std::string_view step, uint64_t n)> crash_hook;
};

// What the caller knows about a delta's point.
struct PointInfo {
  int64_t time_ms = 0;  // time of the consistent cut on the primary
  ReplicationType kind = ReplicationType::kRegular;
  std::string generation_id;
};

// A retained recovery point.
struct ReplicaPoint {
  uint64_t sequence = 0;  // the point's id
  int64_t time_ms = 0;
  ReplicationType kind = ReplicationType::kNone;
  std::string generation_id;
  bool readable = true;  // false when an undo segment it needs is corrupt
};

// A range of one disk.
struct ReplicaRange {
  uint32_t disk = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
};

struct ReplicaExtent {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool zero = false;  // reads as zeros (a hole or a zero before-image)
};

class ReplicaStore {
 public:
  // Creates a store in `dir` (created when missing) with empty (sparse)
  // disks and point 0. `catalog` may be null; when set it must outlive the
  // store and should hold the VM `vm_id` (its points are mirrored there).
  static Result<std::unique_ptr<ReplicaStore>> Create(const std::string& dir, const std::string& vm_id,
                                                      const std::vector<ReplicaDisk>& disks, Catalog* catalog,
                                                      ReplicaStoreOptions options);
  // Opens an existing store and runs recovery (docs section 7).
  static Result<std::unique_ptr<ReplicaStore>> Open(const std::string& dir, Catalog* catalog,
                                                    ReplicaStoreOptions options);

  ReplicaStore(const ReplicaStore&) = delete;
  ReplicaStore& operator=(const ReplicaStore&) = delete;
  ~ReplicaStore();

  // Applies the delta `sequence` (must be latest_sequence() + 1) read from
  // `source`, making it the latest point, then applies retention. On an
  // error before the commit the store is left at the previous point (the
  // caller may retry the same sequence). Once committed, Apply returns OK:
  // retention or catalog failures after the commit are logged and retried
  // by the next Apply / ApplyRetention / Open. After a crash, Open leaves
  // the store at its last committed point: re-apply from latest_sequence()+1.
  Status Apply(uint64_t sequence, const PointInfo& info, DeltaSource& source);

  uint64_t latest_sequence() const;
  const std::string& vm_id() const;
  const std::vector<ReplicaDisk>& disks() const;
  std::string DiskPath(uint32_t disk) const;  // <dir>/disks/<name>.img; "" for a bad index

  // Retained points, oldest first (the last one is the latest).
  std::vector<ReplicaPoint> ListPoints() const;

  // Reads `length` bytes at `offset` of disk index `disk` as of point
  // `sequence` into `out`. NotFound for an unknown point or disk;
  // InvalidArgument out of bounds; Corruption when an undo entry fails
  // its checks.
  Status ReadPoint(uint64_t sequence, uint32_t disk, uint64_t offset, uint64_t length, char* out) const;

  // Data / zero extents of a disk at a point, sorted, covering the disk,
  // block-granular, adjacent extents of the same kind coalesced.
  Result<std::vector<ReplicaExtent>> PointExtents(uint64_t sequence, uint32_t disk) const;

  // Blocks that differ (or may differ) between point `sequence` and the
  // latest point: the union of the blocks held by every committed undo
  // segment (carried ones included) at or above `sequence`, per disk, sorted
  // by (disk, offset), block-granular, adjacent ranges coalesced. Empty when
  // `sequence` is the latest. Every block outside the answer reads the same
  // at `sequence` as at the latest point. Runs concurrently with Apply like
  // the other reads and answers for the latest committed point (the delta in
  // progress is not part of it). NotFound when `sequence` is not retained;
  // Corruption when one of those segments is corrupt (its blocks are
  // unknown).
  Result<std::vector<ReplicaRange>> ChangedSince(uint64_t sequence) const;

  // Drops every retained point except the latest, whatever the retention
  // settings (a failover commit makes one point final), and deletes their
  // undo segments (carried ones included). Crash-safe as retention is
  // (docs section 6): one MANIFEST rename, then the unlinks; a crash leaves
  // either the old set of points or the latest alone. Later applies make new
  // points as usual. FailedPrecondition while a point other than the latest
  // is pinned, or when a failed apply left the store unsure (reopen it).
  // Waits for an Apply in progress. After the MANIFEST is renamed it returns
  // OK: a failed unlink is logged and finished by the next Open, a failed
  // catalog update by the next Apply / Open.
  Status DropAllButLatest();

  // Re-applies retention now (also done after every Apply).
  Status ApplyRetention();
  // ModifyReplicationSettings on the replica: the new RecoveryHistory
  // (hours, 0..24) applies from now on; retention runs at once (points a
  // shorter history no longer keeps are dropped).
  Status SetRecoveryHistory(int hours);

  // Pins point `sequence` so that retention keeps it (docs section 6) until
  // every pin on it is released (pins are counted). Used by exports: a
  // point being served must not be pruned under its readers. Pins live in
  // memory only: a reopened store has none. May wait for a retention step
  // in progress. NotFound when the point is not retained.
  Status PinPoint(uint64_t sequence);
  // Releases one pin of `sequence`; NotFound when it holds none. Retention
  // catches up at the next Apply / ApplyRetention.
  Status UnpinPoint(uint64_t sequence);

 private:
  struct Impl;
  explicit ReplicaStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace vmreplica
