// The reverse sync on the new primary B (docs/failover.md section 12): the
// first log (sequence 2) of a reversed relationship, or of a failback, sent
// to the old primary A whose disks were adopted as a replica store at
// point 1. Only the candidate blocks (B's writes after the common point
// united with A's own candidates) are hashed on both sides, and only the
// candidate blocks whose hashes differ are sent.
//
//   A's status (expected 2, latest 1, state 2)
//     --> attach B's VM (its QEMU, or a qemu-storage-daemon on the images)
//     --> Reconcile --> CheckTracking (lost: tracking restarted, every block)
//     --> TakeCut (bitmap g frozen, views exported)
//     --> B's candidates: dirty extents of g  u  ChangedAfter(since, G, C)
//     --> [nothing on either side: no hash call, log 2 has no record]
//         else GetRangeHashes --> per disk OpenRuns on the cut's export
//     --> SendDelta log 2 (base = G; new = G when no record, else fresh)
//     --> Commit(cut)                   any failure after the cut: Abort(cut)
//
// Bitmap names: the tracker of relationship `vm_id` (ChangeTracker names
// bitmap generation N "vmr-<vm id>-g<N>"), so the wrapper bitmap
// "vmr-<vm id>-g1" that MakeDiskWrapper adds is its generation 1; after the
// commit generation 2 records, and the engine's next cycle adopts it.
//
// Thread safety: RunReverseSync blocks the calling thread for the whole
// sync and uses no shared state; `throttle` and the job are called from it.
// Two syncs of the same VM must not run at once (the caller holds the VM).
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "vmreplica/jobs.h"
#include "vmreplica/logformat.h"  // GenerationId
#include "vmreplica/model/enums.h"
#include "vmreplica/reverse.h"
#include "vmreplica/status.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica {

// Hash block size of the reverse sync (docs/protocol.md "GetRangeHashes").
inline constexpr uint32_t kReverseSyncBlockSize = 64u << 10;

struct ReverseSyncParams {
  std::string vm_id;
  // B's VM: its disks are qcow2 wrappers carrying the persistent bitmap
  // vmr-<vm id>-g1 (MakeDiskWrapper). QEMU running (or still holding the
  // images): AttachVm; otherwise AttachVmImages.
  VmDefinition definition;
  std::vector<std::string> disks;          // the relationship's included disk names, store order (= A's store disks)
  std::string run_dir;                     // cut overlays / qemu-storage-daemon of this sync (must exist; short path)
  std::shared_ptr<grpc::Channel> channel;  // to A (mTLS)
  ReverseClaim claim;                      // A's PrepareReverse answer
  std::optional<SinceList> since;          // B's since file; nullopt: B's history is unknown (every block)
  ReplicationType kind = ReplicationType::kRegular;  // kRegular (reverse start) or kPlanned (failback)
  bool compress = true;
  std::function<void(uint64_t)> throttle;  // before each chunk; may block; may be empty
  JobContext* job = nullptr;               // progress and cancel (may be null)
};

struct ReverseSyncReport {
  uint64_t sequence = 0;         // 2
  uint64_t candidate_bytes = 0;  // bytes covered by the runs A returned (hashed once on each side)
  uint64_t records = 0, data_bytes = 0, zero_bytes = 0, wire_bytes = 0;
  bool whole_disks = false;   // either side's candidates were "every block"
  GenerationId generation{};  // of log 2 and of the relationship from now on
  int64_t cut_time_ms = 0;    // Unix epoch ms of B's cut (the time of A's point 2)
};

// Runs the sync once (docs/failover.md section 12). On success A holds log
// 2 durably staged and B's cut is committed (its bitmap dropped; the next
// generation records). Any failure after the cut aborts it (bitmap g merges
// back into the recording one, nothing is lost); the sync then starts over
// next time (A drops a partial log itself).
// Errors: InvalidArgument (params: empty vm id / disks, no channel, a kind
// other than regular or planned, a candidate outside its disk);
// FailedPrecondition (A's replica is not at expected 2 / latest 1 / state 2,
// the message names what it found; a disk of `disks` is not attached; an
// image in use by another process); Cancelled (the job was cancelled);
// errors of A (PermissionDenied, Unavailable, Corruption ...), of QEMU and
// of the NBD reads are returned as they are.
Result<ReverseSyncReport> RunReverseSync(const ReverseSyncParams& p);

// A reverse start or failback whose log 2 already reached the old primary
// before this host recorded it (a crash, a failed catalog write, a timeout
// waiting for the apply: docs/failover.md 13.5): the old primary reports a
// latest point >= 2 in state 3 with a generation. Answers the report to
// finish with (no counters; the old primary's sequence and generation), or
// nullopt when the sync has to run. Errors of GetReplicaStatus pass through.
Result<std::optional<ReverseSyncReport>> ReverseSyncDelivered(const std::shared_ptr<grpc::Channel>& channel,
                                                              const std::string& vm_id);

}  // namespace vmreplica
