// The old primary's side of a reverse: the peer call PrepareReverse served
// on A, the host that was the primary of VM X, for B, the host that failed
// X over (docs/failover.md sections 8, 11, 13.4, 14.1, 14.2, 15.2).
//
// Roles A may be in when the call arrives (else FailedPrecondition naming
// what was found):
//   (a) primary of X, relationship 0 in any state but 0, 12, 13, and the
//       caller is its RecoveryConnectionPoint (else PermissionDenied);
//   (c) replica of X in state 2 at its adopted point 1, switched by this
//       caller's request_id: the stored claim is answered.
//   (b) (replica of X in 14, a failback's target) is not built: answered
//       FailedPrecondition.
//
// The job (type 104 for a reverse, 124 for a failback), one per VM at a
// time, with its record <state>/reverse/<vm id>.recv.json:
//
//   handler: checks --> job queued, answer phase 1 (job id)
//   job:  ReleaseForReverse (engine's worker stopped, VM lock passed)
//     --> "inspecting": InspectOldPrimary, <vm id>.acand written, claim (G, C)
//     --> "adopting":   store dir (ConfinedStoreDir of the caller's entry),
//                       .primary record, PlaceAdoptedDisk per disk, staged
//                       leftovers removed, ReplicaStore::Adopt (point 1)
//     --> catalog transaction (13.4: VM mode 2, relationship 0 a replica in
//         state 2 at sequence 1 of generation G, statistics reset)
//     --> "switched" (claim complete) --> best effort: wrappers and failover
//         record removed (A's disks were wrappers) or our bitmaps removed
//         from A's original qcow2 images
//   any failure before the catalog transaction: undone (store dir removed
//   when this reverse created it, acand and record removed, the engine's
//   worker resumed); the same request_id is then answered with the job's
//   error, and B's next request (a new request_id) starts over.
//
// Restart (Start()): a record before "switched" is undone the same way,
// unless the catalog shows the switch was made (then the record is
// completed to "switched"); a "switched" record stays and answers retries.
//
// Thread safety: PrepareReverse may be called from any thread (gRPC
// handlers); one job per VM runs on the JobEngine's threads. Destroy the
// object only after the JobEngine has shut down and the gRPC server that
// calls it has stopped.
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "vmreplica/catalog.h"
#include "vmreplica/jobs.h"
#include "vmreplica/replication.h"
#include "vmreplica/reverse.h"
#include "vmreplica/status.h"
#include "vmreplica/transfer.h"

namespace vmreplica {

struct OldPrimaryReverseOptions {
  // The daemon's state directory: reverse/ (records, acand files),
  // wrappers/<vm id>/ and failover/<vm id>.json live below it.
  std::string state_dir;
  // Work directories of the inspection's qemu-storage-daemon go under
  // <run_dir>/<the first 16 hex digits of the VM's UUID> (as the engine's).
  std::string run_dir;
  std::string qemu_img = "qemu-img";
};

class OldPrimaryReverse final : public ReverseReceiver {
 public:
  // Nothing is owned; every pointer outlives the object. `engine` may be
  // null (no worker to stop), `replicas` must not be.
  OldPrimaryReverse(Catalog* catalog, JobEngine* jobs, ReplicationEngine* engine, ReplicaManager* replicas,
                    OldPrimaryReverseOptions options);
  OldPrimaryReverse(const OldPrimaryReverse&) = delete;
  OldPrimaryReverse& operator=(const OldPrimaryReverse&) = delete;

  // At daemon start, before requests arrive and before the engine starts its
  // workers: resumes or undoes the records (see above). Errors of single
  // records are logged; an unreadable reverse directory is returned.
  Status Start();

  // docs/failover.md 14.1. Errors: InvalidArgument (a field of `p`, disks
  // other than A's included disks by name or rounded size), PermissionDenied
  // (the caller is not the relationship's replica server / not the caller
  // of the switched reverse), NotFound (no VM `p.vm_id` here),
  // FailedPrecondition (role or state, the VM runs, another request after
  // the switch), Unavailable (another request of the VM runs).
  Result<PrepareReverseAnswer> PrepareReverse(const std::vector<std::string>& caller_names,
                                              const AuthorizationEntry& entry,
                                              const PrepareReverseParams& p) override;

 private:
  struct Request {
    std::vector<std::string> caller_names;
    AuthorizationEntry entry;
    PrepareReverseParams params;
  };
  // The job's work; on failure before the catalog switch, undone.
  Status RunJob(const Request& req, JobContext& job);
  Status Adopt(const Request& req, ReverseRecvRecord& record, JobContext& job);
  // A record in "adopting" whose catalog switch was made (the record write
  // after it failed or the daemon stopped): completed to "switched".
  bool CompleteIfSwitched(ReverseRecvRecord& record);
  // Undoes a record not yet switched: store dir (when created), acand,
  // recovery point rows of a VM that is still a primary, the record.
  void Undo(const ReverseRecvRecord& record);
  // Role (c): the stored claim with the replica's status.
  Result<PrepareReverseAnswer> AnswerSwitched(const ReverseRecvRecord& record,
                                              const std::vector<std::string>& caller_names,
                                              const AuthorizationEntry& entry, const PrepareReverseParams& p);
  // Best effort after the switch: wrappers / failover record, or bitmaps.
  void CleanUpOldImages(const std::string& vm_id, const std::string& definition_json);

  // Constant after construction.
  Catalog* const catalog_;
  JobEngine* const jobs_;
  ReplicationEngine* const engine_;
  ReplicaManager* const replicas_;
  const OldPrimaryReverseOptions options_;

  struct Running {
    std::string request_id;
    std::string job_id;
  };
  std::mutex mu_;
  std::map<std::string, Running> running_;  // guarded by mu_: by VM id, the job in progress
  struct Failed {
    std::string request_id;
    Status why;
  };
  // guarded by mu_: by VM id, the last job that failed (undone); its
  // request_id is answered with its error, another request starts over.
  // In memory only: after a restart the same request starts over.
  std::map<std::string, Failed> failed_;
};

}  // namespace vmreplica
