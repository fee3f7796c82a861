// The primary side of replication: one engine per daemon that owns the
// relationships where this host is the primary (index 0), runs their initial
// copy and their delta cycles, and keeps their state, health and statistics
// in the catalog. See docs/architecture.md, "Replication cycle".
//
// One cycle, for a VM with relationship R:
//
//   AttachVm ─> ChangeTracker.Reconcile + CheckTracking ─> replica's expected
//   sequence ─> TakeCut (one QMP transaction, fleecing views over NBD)
//   ─> NbdDeltaReader per disk ─> ReplicaClient::SendDelta (acknowledged only
//   once staged durably on the replica) ─> Commit (drop bitmap g)
//                                      └─ on any failure: Abort (merge g into g+1)
//
// The sequence number always comes from the replica (the log it expects
// next), so a primary that crashed after the replica acknowledged a log but
// before it committed its cut resends those changes (a superset, merged
// back by Reconcile) under the next number: nothing is lost or applied twice.
//
// Thread safety: every public method may be called from any thread. One
// worker thread per relationship runs its cycles; the initial copy runs in a
// job (type 94) and excludes the worker's cycles for that VM.
#pragma once

#include <chrono>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "vmreplica/catalog.h"
#include "vmreplica/delta.h"
#include "vmreplica/jobs.h"
#include "vmreplica/model/enums.h"
#include "vmreplica/model/settings.h"
#include "vmreplica/model/transitions.h"
#include "vmreplica/status.h"

namespace grpc {
class Channel;
}

namespace vmreplica {

class AttachedVm;

// One window of the bandwidth schedule, in local time.
struct BandwidthWindow {
  uint32_t start_min = 0;      // minutes after local midnight, 0..1439
  uint32_t end_min = 0;        // exclusive; before start_min = wraps past midnight; == start_min = the whole day
  uint8_t days_mask = 0x7f;    // bit 0 Sunday .. bit 6 Saturday (the day the window starts)
  uint64_t bytes_per_s = 0;    // the limit inside the window; 0 = unlimited
};

struct ReplicationEngineOptions {
  // Per-VM work directories (fleecing overlays, NBD sockets, the
  // qemu-storage-daemon of a VM that is off) go under <run_dir>/<the first
  // 16 hex digits of the VM's UUID>.
  std::string run_dir;
  // Transfers (initial copies and cycles) running at once, server-wide.
  int max_parallel_transfers = 3;
  // Bytes per second over all transfers; 0 = unlimited. The first window
  // of `bandwidth_schedule` that holds the local time overrides it.
  uint64_t bandwidth_bytes_per_s = 0;
  std::vector<BandwidthWindow> bandwidth_schedule;
  // TEST ONLY: when > 0 replaces every ReplicationInterval by this many
  // milliseconds. Set by the config key [testing]
  // replication_interval_override_ms; the daemon logs a warning.
  int64_t test_interval_override_ms = 0;
  // TEST ONLY: when > 0 replaces every ApplicationConsistentSnapshotInterval
  // by this many milliseconds ([testing] app_consistent_interval_override_ms).
  int64_t test_app_consistent_interval_override_ms = 0;
  // Each guest-agent call (freeze, thaw) around an application-consistent cut.
  std::chrono::milliseconds guest_agent_timeout{10000};
  // Retry backoff after a failed cycle: first wait, doubled up to the max.
  std::chrono::milliseconds retry_initial{2000};
  std::chrono::milliseconds retry_max{60000};
  // Consecutive failed cycles after which the relationship turns Critical (8).
  int failures_before_critical = 3;
  // Opens the mutual-TLS channel to a replica server (the daemon passes one
  // built from its identity, after a TLS probe that tells a refused
  // certificate (PermissionDenied) from an unreachable host (Unavailable)).
  // Must not be empty.
  std::function<Result<std::shared_ptr<grpc::Channel>>(const std::string& host, uint16_t port)> open_channel;
  // "host:port" where this host's daemon listens for peers, sent to the
  // replica as PrimaryConnectionPoint (it asks the primary before a
  // failover). May be empty / return "".
  std::function<std::string()> advertised_address;
  // Clock (Unix ms); empty = the system clock.
  std::function<int64_t()> now_ms;
  // The daemon's state directory: a reversed relationship's records
  // (<state>/reverse/<vm id>.send.json, <state>/failover/<vm id>.since) tell
  // StartReplication to run the reverse sync instead of a full copy
  // (docs/failover.md section 13.1). "" = no reverse.
  std::string state_dir;
};

// What one cycle moved (also the result of the initial copy's job).
struct CycleReport {
  uint64_t sequence = 0;
  bool initial = false;
  ReplicationType kind = ReplicationType::kRegular;  // kApplicationConsistent when the guest was frozen
  std::string app_consistent_failure;  // an app-consistent point was due but the guest was not frozen: why
  uint64_t records = 0;
  uint64_t data_bytes = 0;  // changed bytes read from the cut and sent
  uint64_t zero_bytes = 0;  // bytes sent as zero records (no payload)
  uint64_t wire_bytes = 0;  // bytes on the wire after compression
  uint64_t resumed = 0;     // stream resumes after a broken connection
  int64_t cut_time_ms = 0;
  int64_t duration_ms = 0;
  uint64_t pending_bytes = 0;  // still dirty on the primary after the cycle (PendingReplicationSize)
  // Resync: bytes read from this side's disks by every attempt of the
  // resync, bytes compared without reading (extents that read as zeros),
  // and the chunk a paused one continued at (0: not continued).
  uint64_t read_bytes = 0;
  uint64_t hole_bytes = 0;
  uint64_t continued_from_chunk = 0;
  uint32_t continued_at_disk = 0;      // where the part the replica held ended
  uint64_t continued_at_offset = 0;
  uint64_t read_bytes_before = 0;      // read by the earlier attempts
  uint64_t hole_bytes_before = 0;      // compared without reading by the earlier attempts
  // A planned failover's final log (kind kPlanned): recording it moves the
  // relationship from 3 to 4 (docs/failover.md section 9.2).
  bool planned = false;
};

// Health and its messages by the reference's rules (section 5, "Health").
struct HealthVerdict {
  ReplicationHealth health = ReplicationHealth::kNotApplicable;
  std::vector<std::string> issues;
};
// Pure: from the relationship, its statistics window and the time now.
HealthVerdict EvaluateHealth(const RelationshipRecord& rel, const StatisticsRecord& stats, int64_t now_ms,
                             int consecutive_failures);

// The replica's own state folded into the primary's health: paused or
// needing a resync on the replica is Critical (reference section 5).
void ApplyReplicaSideHealth(HealthVerdict& v, ReplicationState replica_state);

// Statistics windows (reference 4.2 MonitoringInterval / MonitoringStartTime):
// windows start at the local times that are MonitoringStartTime plus a
// multiple of MonitoringInterval. The start of the window holding `now_ms`.
int64_t StatisticsWindowStart(const ServerSettings& server, int64_t now_ms);
// Starts a new window when `s`'s began before the current one (counters to
// zero; health, initial size, pending size and last test failover stay).
// A record with no start gets `now_ms`. Answers whether it rolled.
bool RollStatisticsWindow(StatisticsRecord& s, const ServerSettings& server, int64_t now_ms);

// "HH:MM" -> minutes after midnight; InvalidArgument otherwise.
Result<uint32_t> ParseTimeOfDay(const std::string& text);
// Whether local time `now_ms` lies in [start_min, end_min) (minutes after
// midnight; start > end wraps past midnight and belongs to the day it
// started; start == end is the whole day) on a day of `days_mask` (bit 0 =
// Sunday).
bool InTimeWindow(uint32_t start_min, uint32_t end_min, uint8_t days_mask, int64_t now_ms);
// The bandwidth limit at `now_ms` (local time): the first window holding
// it, else the default. 0 = unlimited.
uint64_t BandwidthLimitAt(const std::vector<BandwidthWindow>& schedule, uint64_t default_bytes_per_s,
                          int64_t now_ms);

// Streams several sources one after the other (one per disk).
class ConcatDeltaSource : public DeltaSource {
 public:
  explicit ConcatDeltaSource(std::vector<std::unique_ptr<DeltaSource>> parts) : parts_(std::move(parts)) {}
  Result<std::optional<DeltaRecord>> Next() override;
  void Recycle(std::string buffer) override {
    if (current_ < parts_.size()) parts_[current_]->Recycle(std::move(buffer));
  }
  // Calls `f` with (part index, end offset of the last record) as records pass.
  void set_observer(std::function<void(size_t, uint64_t)> f) { observer_ = std::move(f); }

 private:
  std::vector<std::unique_ptr<DeltaSource>> parts_;
  size_t current_ = 0;
  std::function<void(size_t, uint64_t)> observer_;
};

class ReplicationEngine {
 public:
  // `catalog` and `jobs` are not owned and must outlive the engine.
  ReplicationEngine(Catalog* catalog, JobEngine* jobs, ReplicationEngineOptions options);
  ~ReplicationEngine();  // Stop()
  ReplicationEngine(const ReplicationEngine&) = delete;
  ReplicationEngine& operator=(const ReplicationEngine&) = delete;

  // Starts a worker for every primary relationship in the catalog that had
  // finished its initial copy (so replication paused by a host shutdown
  // resumes by itself); one that was suspended stays suspended.
  Status Start();
  // Stops the workers (a cycle in flight is aborted: its changes merge back).
  void Stop();

  // `vm` is a VM id or a unique VM name. Errors: NotFound (VM),
  // InvalidArgument (settings; the message names the field),
  // FailedPrecondition (wrong state: 32775), PermissionDenied (the replica
  // refused us: 32769), Unavailable (the replica cannot be reached: 32777).
  Status CreateRelationship(const std::string& vm, const RelationshipSettings& settings);
  // StartReplication type 1 (network), now (start_unix_s = 0) or at a time
  // at most 7 days ahead. Answers the job (type 94) doing the initial copy.
  // `seeded` (InitialReplicationType 3): the replica already holds a copy
  // (marked with state change 2 on the replica); the initial log carries
  // only the blocks whose hashes differ (job type 117).
  Result<JobRecord> StartReplication(const std::string& vm, int64_t start_unix_s, bool seeded = false);
  // StartReplication type 2 (export, job type 118): the initial copy of a
  // consistent cut is written under `location` as an initial-replica export
  // (docs/export_format.md) and the replica is told to wait for its import
  // (peer ReserveImport). The state stays 2 while delta cycles run (the
  // replica stages them) until a cycle finds the import done: then 3.
  // `location`: an absolute directory (created when missing); InvalidArgument
  // otherwise. There is no StartTime (ignored, as in the reference).
  Result<JobRecord> StartExportReplication(const std::string& vm, const std::string& location);
  // Resynchronize (from 7, 8, 9, 11, 16; StartTime 0 = now, at most 7 days
  // ahead): state 10, tracking restarted at a new cut, the replica's block
  // hashes compared with the cut's and only differing blocks sent as one
  // ordinary log (the replica keeps its earlier points); then 3. A failure
  // or cancel leaves 9. Job type 107, result: resynchronized_bytes, ...
  Result<JobRecord> Resynchronize(const std::string& vm, int64_t start_unix_s);
  // RequestReplicationStateChange 4 on the primary (docs/failover.md section
  // 9): with the VM off and the replica replicating, job 96 sends the final
  // changes as a PlannedFailover log and the state becomes 4. 32775 when the
  // VM runs, an image is held by another process, the state is not 3, or the
  // replica is not in 3; 32777 when the replica cannot be reached.
  Result<JobRecord> PrepareForPlannedFailover(const std::string& vm);
  // RevertFailover on a primary in 4 (section 9.5): back to 3, unless the
  // replica reports that it failed over (32775). Job 98.
  Result<JobRecord> RevertPlannedFailover(const std::string& vm);
  // RequestReplicationStateChange: 7 suspend, 3 resume, 1 cancel initial.
  Status RequestStateChange(const std::string& vm, int index, RequestedReplicationState requested);
  Status ModifySettings(const std::string& vm, const RelationshipSettings& settings);
  // Removes the primary side of the relationship (tracking stopped, its
  // bitmaps dropped when QEMU is reachable); the replica side is told but
  // keeps its VM and disks. The local VM stays in the catalog.
  Status RemoveRelationship(const std::string& vm, int index);
  // The old primary's side of a reverse (docs/failover.md 14.1 step 1):
  // stops and removes the worker of `vm_id` as RemoveRelationship does
  // (nothing is told to the replica, no bitmap is touched, the catalog is
  // not changed), clears its per-VM state, then takes and releases the VM's
  // lock, so that a cycle or job of the VM that was running has ended when
  // it returns. The caller then owns the VM's images (a later KickWorker,
  // e.g. by a state change request, would start a worker again).
  Status ReleaseForReverse(const std::string& vm_id);
  // Undoes ReleaseForReverse when the reverse failed before its catalog
  // switch: starts the VM's worker again when it is still the primary of
  // relationship 0 in a state that runs cycles. No-op otherwise.
  void ResumeAfterReverse(const std::string& vm_id);
  // Statistics of the open window with health freshly evaluated.
  Result<StatisticsRecord> GetStatistics(const std::string& vm, int index);
  Status ResetStatistics(const std::string& vm, int index);

  // Resolves `vm` (id or unique name) to its record.
  Result<VmRecord> ResolveVm(const std::string& vm);

  // The last cycle this engine completed for `vm_id` (initial copy, delta,
  // resync or planned failover log: what it recorded as a success) and when
  // (Unix ms, the engine's clock). In memory only: nullopt after the daemon
  // started until a cycle completes, and after the relationship was removed
  // or released for a reverse. For measuring (ListReplications' last_cycle).
  struct LastCycleInfo {
    CycleReport report;
    int64_t finished_ms = 0;
  };
  std::optional<LastCycleInfo> LastCycle(const std::string& vm_id);

  // For the replica host's InitiateFailover (peer call GetPrimaryVmState):
  // whether primary VM `vm_id` runs here. `caller_names` are the calling
  // host's certificate names; one must be the relationship's replica server
  // (RecoveryConnectionPoint), else PermissionDenied. NotFound when this
  // host is not the primary of `vm_id`. A replica VM in 14 (failback
  // complete) answers its failback target (the RecoveryConnectionPoint
  // InitiateFailback recorded): not running (docs/failover.md 13.2).
  struct PrimaryRunState {
    int run_state = 0;  // 1 running, 2 not running, 0 unknown
    ReplicationState state = ReplicationState::kDisabled;
    std::string detail;
  };
  Result<PrimaryRunState> QueryPrimaryRunState(const std::vector<std::string>& caller_names, const std::string& vm_id);

  // NotSupported unless this host is the primary of `rel`.
  // OK on the primary side. Elsewhere: 32775 when the VM's own table forbids
  // `op` in its state (the message names the state), else 32770 (the method
  // is allowed there but not built for that side).
  static Status RequirePrimary(const VmRecord& vm, const RelationshipRecord& rel, const char* method,
                               std::optional<Operation> op = std::nullopt);

 private:
  struct Worker;
  // `epoch` numbers the StartReplication calls of a VM: a copy that failed
  // or was cancelled resets the state only while no newer one started.
  Status RunInitial(const std::string& vm_id, JobContext* job, uint64_t epoch, bool seeded = false);
  // The reverse start (docs/failover.md section 13.1): when `vm_id` holds a
  // switched reverse record, RunReverseSync as log 2 instead of a full copy.
  // nullopt when there is no such record.
  std::optional<Result<CycleReport>> RunReverseStart(const std::string& vm_id, JobContext* job,
                                                     nlohmann::json* extra_result);
  // The export job's body (StartExportReplication).
  Status RunExport(const std::string& vm_id, const std::string& location, JobContext* job, uint64_t epoch);
  // Peer ReserveImport for the relationship's exported generation.
  Status ReserveImportOnReplica(const std::string& vm_id);
  Result<JobRecord> StartExportJob(const std::string& vm_id, const std::string& vm_name, const std::string& location,
                                   uint64_t epoch);
  bool IsCurrentInitial(const std::string& vm_id, uint64_t epoch);
  // `resync`: with `initial`, the cut's blocks are compared with the
  // replica's hash lists and only differing ones are sent.
  // A planned failover's cycle: the attach to use (the VM is off) and the
  // log's kind.
  struct PlannedCycle {
    AttachedVm* attached = nullptr;
  };
  Result<CycleReport> RunCycle(const std::string& vm_id, bool initial, JobContext* job, bool resync = false,
                               const PlannedCycle* planned = nullptr);
  void WorkerLoop(Worker* w);
  void StartWorkerLocked(const std::string& vm_id);
  void KickWorker(const std::string& vm_id);
  Status RecordFailure(const std::string& vm_id, const Status& why, bool network);
  Status RecordSuccess(const std::string& vm_id, const CycleReport& report);
  Status UpdateRelationship(const std::string& vm_id, const std::function<Status(RelationshipRecord&)>& change);
  std::chrono::milliseconds IntervalOf(const RelationshipRecord& rel) const;
  int64_t Now() const;
  std::string RunDirOf(const std::string& vm_id) const;
  // Holds one of the server-wide transfer slots while it lives.
  class Slot {
   public:
    explicit Slot(ReplicationEngine* e) : e_(e) { e_->AcquireSlot(); }
    ~Slot() { e_->ReleaseSlot(); }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;

   private:
    ReplicationEngine* e_;
  };
  void AcquireSlot();
  void ReleaseSlot();
  void Throttle(uint64_t bytes);
  Result<JobRecord> StartInitialJob(const std::string& vm_id, const std::string& vm_name, int64_t start_unix_s,
                                    ReplicationState state_before, uint64_t epoch, bool seeded = false);
  uint64_t NextInitialEpoch(const std::string& vm_id);
  Status UndoInitialState(const std::string& vm_id, uint64_t epoch, ReplicationState state_before);
  // The statistics row of `vm_id` (created when missing), its window rolled
  // to now. Call inside a catalog transaction.
  Result<StatisticsRecord> LoadStatistics(const std::string& vm_id);
  bool AppConsistentDue(const RelationshipRecord& rel);
  std::chrono::milliseconds AppConsistentInterval(const RelationshipRecord& rel) const;
  std::chrono::milliseconds AppConsistentRetryDelay(const RelationshipRecord& rel) const;
  // EvaluateHealth plus what only the engine knows: the replica's reported
  // state and the last failure's reason.
  HealthVerdict FullHealth(const RelationshipRecord& rel, const StatisticsRecord& s, int failures);

  Catalog* const catalog_;
  JobEngine* const jobs_;
  const ReplicationEngineOptions options_;

  std::mutex mu_;
  std::map<std::string, std::unique_ptr<Worker>> workers_;  // by vm id; guarded by mu_
  std::map<std::string, int> failures_;                     // consecutive failures; guarded by mu_
  std::map<std::string, std::string> last_failure_;         // why the last cycle failed; guarded by mu_
  std::map<std::string, ReplicationState> replica_state_;   // as the replica last reported it; guarded by mu_
  std::map<std::string, uint64_t> pending_;                 // dirty bytes not yet sent; guarded by mu_
  std::map<std::string, LastCycleInfo> last_cycle_;         // the last completed cycle; guarded by mu_
  std::set<std::string> replica_settings_synced_;           // the replica has our settings; guarded by mu_
  std::map<std::string, uint64_t> initial_epoch_;           // StartReplication calls per VM; guarded by mu_
  // A resync whose log the replica holds in part (paused or broken): what
  // continuing it needs (docs/protocol.md "Continuing a log"). In memory
  // only: after a restart of either daemon the resync starts over.
  struct ResyncProgress;  // src/replication/engine.cc
  std::map<std::string, std::unique_ptr<ResyncProgress>> resync_progress_;  // guarded by mu_
  void DropResyncProgress(const std::string& vm_id);
  std::map<std::string, std::chrono::steady_clock::time_point> app_retry_at_;  // no app-consistent try before; mu_
  bool stopping_ = false;                                   // guarded by mu_
  std::atomic<bool> stop_flag_{false};                      // Stop() called: transfers end early

  // One mutex per VM serialises its cycles and its initial copy.
  std::mutex vm_locks_mu_;
  std::map<std::string, std::shared_ptr<std::mutex>> vm_locks_;
  std::shared_ptr<std::mutex> VmLock(const std::string& vm_id);

  // Transfer slots and the bandwidth bucket.
  std::mutex slots_mu_;
  std::condition_variable slots_cv_;
  int slots_used_ = 0;
  std::mutex bucket_mu_;
  double bucket_tokens_ = 0;
  std::chrono::steady_clock::time_point bucket_time_{};
};

}  // namespace vmreplica
