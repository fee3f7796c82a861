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
// Initial load (docs section 17), only from point 0, no undo:
//
//   BeginLoad --> LOAD written (done_chunks 0) --> LoadChunk(0), (1), ...
//   (pwrite / punch straight into disks/) --> every load_sync_bytes and at
//   SyncLoad: [disks fdatasynced] --> LOAD rewritten with done_chunks
//   --> FinishLoad: [disks fsynced] --> MANIFEST with point 1 alone (COMMIT)
//   --> LOAD unlinked --> catalog mirrored
//        \__ AbandonLoad: LOAD says 0 --> holes punched over every disk
//             --> disks fsynced --> LOAD unlinked (back to point 0)
//
// Adoption (docs section 18), files placed by the caller:
//
//   Adopt --> LOCK --> [earlier ADOPT finished] --> checks (no load, files
//   exist with their sizes) --> [disks fsynced] --> ADOPT written -->
//   MANIFEST with point `sequence` alone (COMMIT) --> every undo segment
//   unlinked --> old-only disk images unlinked --> ADOPT unlinked -->
//   catalog mirrored
//
// Errors:
//   InvalidArgument     bad names/sizes/options; a delta record out of the
//                       disk's bounds or with a wrong payload length;
//   FailedPrecondition  out-of-sequence or duplicate Apply; a store that
//                       could not roll back a failed apply or whose
//                       MANIFEST write failed (reopen it); Apply, reads of
//                       point 0, PinPoint(0) and DropAllButLatest while an
//                       initial load is in progress; load calls out of order;
//                       Adopt over a store whose initial load is in progress;
//   AlreadyExists       Create on a directory that holds a store;
//   NotFound            unknown point, disk or store directory; a disk
//                       file Adopt needs is missing;
//   Busy                the store directory is open elsewhere (LOCK);
//   Corruption          MANIFEST, LOAD, ADOPT or an undo segment failed a check; a
//                       point whose segment is corrupt cannot be read;
//   IOError             the OS refused.
//
// Thread safety: all methods may be called from any thread. Apply calls are
// serialised (one at a time) with each other and with the load calls
// (BeginLoad .. AbandonLoad); reads run concurrently with each other and
// with Apply and always see a consistent point (docs section 9).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
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
// Range of ReplicaStoreOptions::load_sync_bytes.
inline constexpr uint64_t kMinLoadSyncBytes = uint64_t{1} << 20;
inline constexpr uint64_t kMaxLoadSyncBytes = uint64_t{16} << 30;

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
  // Initial load (docs section 17): after this many bytes of data records
  // written by LoadChunk since the last sync, the disks are fdatasynced and
  // LOAD records the chunks written so far as durable (the resume point
  // after a crash). Range kMinLoadSyncBytes..kMaxLoadSyncBytes (else
  // InvalidArgument).
  uint64_t load_sync_bytes = uint64_t{256} << 20;
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

// An initial load in progress (docs/replica_store.md section 17).
struct LoadInfo {
  PointInfo point;      // what point 1 will be (time, kind, generation: 32 hex digits)
  std::string source;   // "import" or "network"
  std::string tag;      // opaque to the store, <= 256 bytes printable ASCII (the import's manifest checksum)
};

struct LoadState {
  LoadInfo info;
  uint64_t done_chunks = 0;  // chunks whose data is durable: the caller continues from this chunk
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
  // Opens an existing store and runs recovery (docs section 7; an
  // adoption's ADOPT record first, section 18).
  static Result<std::unique_ptr<ReplicaStore>> Open(const std::string& dir, Catalog* catalog,
                                                    ReplicaStoreOptions options);

  // Makes `dir` a store whose only point is `sequence` (>= 1), described by
  // `info` (time, kind 0..3, generation_id: 32 hex digits), whose content is
  // the disk files the caller already placed at <dir>/disks/<name>.img
  // (raw, each exactly disks[i].size bytes, a multiple of
  // kReplicaBlockSize; they are fsynced here, never written). `dir` may
  // hold nothing yet (the layout is created) or an existing store of the
  // same VM that is not open anywhere (LOCK free): its points and undo
  // segments are discarded, and its disk images whose names are not in
  // `disks` are deleted. The next Apply is sequence + 1. Crash-safe (docs
  // section 18): the MANIFEST rename is the commit; before it, Open sees
  // the old store or none; after it, Open finishes the cleanup (an ADOPT
  // record tells it that the leftover segments are orphans, never an apply
  // to roll back). The catalog mirror (when `catalog` is set, as in
  // Create): the VM's recovery points become this one point. The same call
  // again is idempotent. Errors: InvalidArgument (VM id, names, sizes, a
  // file of another size or not a regular file, sequence 0, bad kind or
  // generation, options, an existing store of another VM), Busy (LOCK
  // held), NotFound (a disk file missing), FailedPrecondition (the
  // existing store has an initial load in progress), Corruption (the
  // existing MANIFEST or an ADOPT record fails its checks), IOError (also
  // a cleanup step after the commit failed: the point is adopted, and Open
  // or the same Adopt again finishes the cleanup).
  static Result<std::unique_ptr<ReplicaStore>> Adopt(const std::string& dir, const std::string& vm_id,
                                                     const std::vector<ReplicaDisk>& disks, uint64_t sequence,
                                                     const PointInfo& info, Catalog* catalog,
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
  // shorter history no longer keeps are dropped), or, when an Apply is in
  // progress (it may wait for its records: an apply while receiving), by
  // that Apply's retention after its commit (or the next one). Never waits
  // for an Apply.
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

  // ---- Initial load (docs section 17) ----
  // Writes point 1 straight into the disks, without undo: point 0 (the
  // empty disks) is never a point anybody fails over to. While a load is in
  // progress (LOAD exists, from BeginLoad or found by Open) Apply, reads of
  // point 0 (ReadPoint, PointExtents, ChangedSince), PinPoint(0) and
  // DropAllButLatest answer FailedPrecondition. A crash leaves either the
  // load in progress at a done_chunks <= the chunks written, with the data
  // of chunks < done_chunks intact, or point 1 committed (Open finishes
  // the unlink of LOAD). Chunks must be deterministic: after a crash the
  // caller sends chunks done_chunks.. again with the same records.

  // Makes the raw image file `path` disk `disk` of the store, in place of
  // its current file (a seed copy the operator placed on this host:
  // RequestReplicationStateChange 2 with move): the file is renamed into
  // <dir>/disks/ (the directories fsynced) and the store's open descriptor
  // of the disk is switched to it, so nothing is copied. FailedPrecondition
  // unless latest_sequence() == 0, no load is in progress, no apply in
  // flight and no point pinned; InvalidArgument for a disk index out of
  // range, a path that is not a regular file of exactly the disk's size,
  // one with other hard links, or one on another file system than the
  // store; NotFound when it does not exist. Its data need not be durable:
  // the first point's commit fsyncs every disk. The file gets mode 0600.
  Status AdoptSeedFile(uint32_t disk, const std::string& path);

  // Starts the initial load of point 1: FailedPrecondition unless
  // latest_sequence() == 0, no load is in progress, no apply in flight and
  // no point pinned; InvalidArgument for bad info. Writes <dir>/LOAD (temp,
  // fsync, rename, fsync dir).
  Status BeginLoad(const LoadInfo& info);
  // The load in progress (after BeginLoad, or found by Open after a crash),
  // or nullopt. done_chunks is what LOAD says is durable.
  std::optional<LoadState> load_state() const;
  // Starts the load in progress over from chunk 0 with new `info`, keeping
  // the disks' content (no holes punched): for a source whose chunks make
  // the disks exact whatever they held (a network initial copy sends its
  // holes as zero records; a seeded one is compared with the disks as they
  // are). LOAD is rewritten (done_chunks 0) before anything else is written.
  // FailedPrecondition without a load in progress.
  Status RestartLoad(const LoadInfo& info);
  // Writes chunk `chunk` of the load: `chunk` must equal the number of
  // chunks written so far in this process (load_state()->done_chunks right
  // after BeginLoad or Open, then +1 per call; else FailedPrecondition).
  // Records are bounds-checked as in Apply (InvalidArgument, nothing of an
  // invalid record written); data records are written with pwrite, zero
  // records as punched holes (zeros written where punching is not
  // supported). Every `load_sync_bytes` of chunk data (and on
  // FinishLoad / SyncLoad) every disk is fdatasynced, then LOAD rewritten
  // with done_chunks. On an error of the source, of a record or of a write
  // the chunk counts as not written (the caller may retry the same index);
  // a failed sync leaves the store refusing calls until it is reopened
  // (the load then continues from what LOAD says).
  Status LoadChunk(uint64_t chunk, DeltaSource& records);
  // Makes what was written so far durable and records done_chunks in LOAD now.
  Status SyncLoad();
  // fsyncs the disks, commits point 1 (MANIFEST rename: the commit, with
  // info.point as its time / kind / generation and no undo segment: point 1
  // is the only point), unlinks LOAD, mirrors the catalog like Apply.
  // After it latest_sequence() == 1. Once the MANIFEST is renamed it
  // answers OK (a failed unlink is logged and finished by Open).
  Status FinishLoad();
  // Gives the load up for good: LOAD rewritten with done_chunks 0, holes
  // punched over every disk (point 0 is all zeros), disks fsynced, then
  // LOAD unlinked. A new BeginLoad may follow.
  Status AbandonLoad();

 private:
  struct Impl;
  explicit ReplicaStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace vmreplica
