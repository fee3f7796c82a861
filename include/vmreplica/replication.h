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
#include <string>
#include <vector>

#include "vmreplica/catalog.h"
#include "vmreplica/delta.h"
#include "vmreplica/jobs.h"
#include "vmreplica/model/enums.h"
#include "vmreplica/model/settings.h"
#include "vmreplica/status.h"

namespace grpc {
class Channel;
}

namespace vmreplica {

struct ReplicationEngineOptions {
  // Per-VM work directories (fleecing overlays, NBD sockets, the
  // qemu-storage-daemon of a VM that is off) go under <run_dir>/<the first
  // 16 hex digits of the VM's UUID>.
  std::string run_dir;
  // Transfers (initial copies and cycles) running at once, server-wide.
  int max_parallel_transfers = 3;
  // Bytes per second over all transfers; 0 = unlimited.
  uint64_t bandwidth_bytes_per_s = 0;
  // TEST ONLY: when > 0 replaces every ReplicationInterval by this many
  // milliseconds. Set by the config key [testing]
  // replication_interval_override_ms; the daemon logs a warning.
  int64_t test_interval_override_ms = 0;
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
  // Clock (Unix ms); empty = the system clock.
  std::function<int64_t()> now_ms;
};

// What one cycle moved (also the result of the initial copy's job).
struct CycleReport {
  uint64_t sequence = 0;
  bool initial = false;
  uint64_t records = 0;
  uint64_t data_bytes = 0;  // changed bytes read from the cut and sent
  uint64_t zero_bytes = 0;  // bytes sent as zero records (no payload)
  uint64_t wire_bytes = 0;  // bytes on the wire after compression
  uint64_t resumed = 0;     // stream resumes after a broken connection
  int64_t cut_time_ms = 0;
  int64_t duration_ms = 0;
};

// Health and its messages by the reference's rules (section 5, "Health").
struct HealthVerdict {
  ReplicationHealth health = ReplicationHealth::kNotApplicable;
  std::vector<std::string> issues;
};
// Pure: from the relationship, its statistics window and the time now.
HealthVerdict EvaluateHealth(const RelationshipRecord& rel, const StatisticsRecord& stats, int64_t now_ms,
                             int consecutive_failures);

// Streams several sources one after the other (one per disk).
class ConcatDeltaSource : public DeltaSource {
 public:
  explicit ConcatDeltaSource(std::vector<std::unique_ptr<DeltaSource>> parts) : parts_(std::move(parts)) {}
  Result<std::optional<DeltaRecord>> Next() override;
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
  Result<JobRecord> StartReplication(const std::string& vm, int64_t start_unix_s);
  // RequestReplicationStateChange: 7 suspend, 3 resume, 1 cancel initial.
  Status RequestStateChange(const std::string& vm, int index, RequestedReplicationState requested);
  Status ModifySettings(const std::string& vm, const RelationshipSettings& settings);
  // Removes the primary side of the relationship (tracking stopped, its
  // bitmaps dropped when QEMU is reachable); the replica side is told but
  // keeps its VM and disks. The local VM stays in the catalog.
  Status RemoveRelationship(const std::string& vm, int index);
  // Statistics of the open window with health freshly evaluated.
  Result<StatisticsRecord> GetStatistics(const std::string& vm, int index);
  Status ResetStatistics(const std::string& vm, int index);

  // Resolves `vm` (id or unique name) to its record.
  Result<VmRecord> ResolveVm(const std::string& vm);

  // NotSupported unless this host is the primary of `rel`.
  static Status RequirePrimary(const VmRecord& vm, const RelationshipRecord& rel, const char* method);

 private:
  struct Worker;
  Status RunInitial(const std::string& vm_id, JobContext* job);
  Result<CycleReport> RunCycle(const std::string& vm_id, bool initial, JobContext* job);
  void WorkerLoop(Worker* w);
  void StartWorkerLocked(const std::string& vm_id);
  void KickWorker(const std::string& vm_id);
  Status RecordFailure(const std::string& vm_id, const Status& why, bool network);
  Status RecordSuccess(const std::string& vm_id, const CycleReport& report);
  Status UpdateRelationship(const std::string& vm_id, const std::function<Status(RelationshipRecord&)>& change);
  std::chrono::milliseconds IntervalOf(const RelationshipRecord& rel) const;
  int64_t Now() const;
  std::string RunDirOf(const std::string& vm_id) const;
  void AcquireSlot();
  void ReleaseSlot();
  void Throttle(uint64_t bytes);

  Catalog* const catalog_;
  JobEngine* const jobs_;
  const ReplicationEngineOptions options_;

  std::mutex mu_;
  std::map<std::string, std::unique_ptr<Worker>> workers_;  // by vm id; guarded by mu_
  std::map<std::string, int> failures_;                     // consecutive failures; guarded by mu_
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
