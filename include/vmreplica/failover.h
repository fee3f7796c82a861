// Failover on the replica host: InitiateFailover, RevertFailover,
// TestReplicaSystem and DestroySystem (docs/failover.md). A failover or test
// VM runs from a recovery point's NBD view under a qcow2 overlay: nothing is
// copied, and every retained point is as fast to fail over to as the latest.
//
//   InitiateFailover:  [primary asked: refused while its VM runs, unless force]
//                      3/7/10/15 --job 97--> 12 (apply held, point exported,
//                      record "preparing", seed, VM started) --> 5
//                       \__ any error: everything undone, state restored
//   RevertFailover:    5 --job 98--> VM stopped, files/exports/record removed --> 3
//   CommitFailover:    5 --job 99--> record "committing" --> rollback applied as a new
//                      point --> overlay writes merged (live mirror or offline apply)
//                      --> other points dropped --> record "committed" --> 6
//   TestReplicaSystem: state unchanged; "<name> - Test" (mode 3) from the point
//   DestroySystem:     the test VM stopped, everything of it removed
//
// Errors (WMI codes through ToReturnCode): InvalidArgument (32773) for a
// point that is not a retained point of the VM; FailedPrecondition (32775)
// for a state the transition table does not allow, or a VM that is not a
// replica; NotFound (32779) for an unknown VM; Busy (32774) for a second test
// VM of the same replica.
//
// Thread safety: every method may be called from any thread; the methods
// of one VM are serialised by the manager. Jobs run on the JobEngine's
// workers.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "vmreplica/catalog.h"
#include "vmreplica/jobs.h"
#include "vmreplica/model/transitions.h"
#include "vmreplica/point_exports.h"
#include "vmreplica/reverse.h"
#include "vmreplica/status.h"
#include "vmreplica/transfer.h"
#include "vmreplica/vm_launcher.h"

namespace vmreplica {

struct FailoverOptions {
  // The daemon's state directory: records in <state>/failover, run
  // directories and the points socket in <state>/run (short paths: unix
  // socket names are limited, see VmLaunchSpec::run_dir).
  std::string state_dir;
  VmAccel accel = VmAccel::kAuto;
  // VMs bound through libvirt on the primary run here as transient libvirt
  // domains (VmHypervisor::kLibvirt, the definition's libvirt_uri) when
  // true ([failover] hypervisor = "same"); false ("qemu"): every VM runs
  // under QEMU directly. VMs of the other kinds always run under QEMU.
  bool libvirt_vms_through_libvirt = true;
  // QEMU's NBD client of a failover VM reconnects for this long when the
  // daemon restarts (VmLaunchDisk::nbd_reconnect_delay_s).
  uint32_t nbd_reconnect_delay_s = 60;
  std::chrono::milliseconds vm_start_timeout{120'000};
  // A graceful stop (ACPI power-down) waits this long before quit / kill.
  std::chrono::milliseconds vm_stop_grace{30'000};
  std::function<int64_t()> now_ms;  // Unix ms; default: the system clock
  // TEST ONLY ([testing] import_chunk_delay_ms): ImportInitialReplica waits
  // this long after each chunk, so that a test can stop the daemon mid-way.
  std::chrono::milliseconds test_import_chunk_delay{0};
  // Asks the primary host at `address` ("host:port", the relationship's
  // PrimaryConnectionPoint) whether VM `vm_id` runs there. Unset: never asked.
  std::function<Result<ReplicaClient::PrimaryVmState>(const std::string& address, const std::string& vm_id)>
      ask_primary;
  // Opens the mutual-TLS channel to a peer (the old primary, for
  // ReverseReplicationRelationship; the daemon passes the engine's). Unset:
  // reverse replication answers 32770.
  std::function<Result<std::shared_ptr<grpc::Channel>>(const std::string& host, uint16_t port)> open_channel;
  // "host:port" where this host's daemon listens for peers (sent to the old
  // primary as its new PrimaryConnectionPoint). May be empty / return "".
  std::function<std::string()> advertised_address;
  // ReverseReplicationRelationship waits this long for the old primary's
  // PrepareReverse to finish (it copies A's images locally when they are not
  // ours already).
  std::chrono::milliseconds reverse_prepare_timeout{6 * 3600 * 1000};
  // Creates the primary side of a relationship for a VM of this host and
  // its replica side on the server the settings name (the engine's
  // CreateRelationship). Used by a reverse to a server other than the old
  // primary. Unset: that reverse answers 32770.
  std::function<Status(const std::string& vm_id, const RelationshipSettings& settings)> create_relationship;
};

struct FailoverRequestParams {
  std::string vm;        // id or unique name
  std::string point_id;  // a recovery point id of ListRecoveryPoints; "" = the latest
  bool force = false;    // the operator accepts that the primary may still run
  bool start_vm = false;
};

enum class TestNetwork { kNone = 1, kIsolated = 2 };

struct TestFailoverParams {
  std::string vm;
  std::string point_id;
  bool start_vm = true;
  TestNetwork network = TestNetwork::kIsolated;
  bool apply_network_settings = false;  // attach the failover IP seed to the test VM too
};

class FailoverManager {
 public:
  // Every pointer must outlive the manager.
  FailoverManager(Catalog* catalog, JobEngine* jobs, ReplicaManager* replicas, FailoverOptions options);
  ~FailoverManager();  // Stop()
  FailoverManager(const FailoverManager&) = delete;
  FailoverManager& operator=(const FailoverManager&) = delete;

  // Starts the points NBD server and takes up the recorded failovers
  // (docs/failover.md section 3).
  Status Start();
  // Ends the exports and stops the NBD server; failover and test VMs keep
  // running (their NBD clients reconnect to the next daemon). Idempotent.
  void Stop();

  // Each answers the started job (4096) or the reason it did not start.
  Result<JobRecord> InitiateFailover(const FailoverRequestParams& params);
  Result<JobRecord> RevertFailover(const std::string& vm);
  // State 5 -> 6: the base rolls back to the failover point, the failover
  // VM's writes merge into it (live, while it runs), every other point is
  // deleted. Irreversible; resumed after a crash (docs/failover.md).
  Result<JobRecord> CommitFailover(const std::string& vm);
  // Starts a committed failover VM (state 6) again, directly on its disk
  // wrappers (no overlay, no point view): its writes go to the store's
  // files and the wrappers' bitmaps record them. 32775 when the VM has no
  // committed failover with wrappers, or already runs. No job.
  Status StartVm(const std::string& vm);
  // ReverseReplicationRelationship (docs/failover.md section 13.1) on the
  // host that failed VM X over (state 5 or 6): job 104 commits a failover in
  // 5 first, asks the old primary to adopt its disks as X's replica
  // (PrepareReverse), then makes X a primary here (mode 1, its disks the
  // commit's wrappers, relationship state 1, RecoveryConnectionPoint the old
  // primary). StartReplication then runs the reverse sync (only differing
  // candidate blocks travel). `settings`: an empty RecoveryConnectionPoint
  // with port 0 means the old primary; another server answers 32770.
  Result<JobRecord> ReverseReplicationRelationship(const std::string& vm, const RelationshipSettings& settings);
  // InitiateFailback (docs/failover.md section 13.2) on the host that failed
  // VM X over (5 or 6, the failover VM stopped): job 124, state 13 during.
  // The chosen point (5: `point_id`, "" = the current data with the failover
  // VM's writes; 6: must be "") is committed, the old primary adopts its own
  // disks (PrepareReverse, purpose failback) and only the blocks that differ
  // are sent to it as a PlannedFailover log; then 14. This host stays the
  // replica side; the old primary runs X again by a planned failover.
  Result<JobRecord> InitiateFailback(const std::string& vm, const RelationshipSettings& settings,
                                     const std::string& point_id);
  Result<JobRecord> TestReplicaSystem(const TestFailoverParams& params);
  // `vm`: the test VM (id or name) or the replica VM that has one.
  Result<JobRecord> DestroySystem(const std::string& vm);

  // RequestReplicationStateChange(2) on the replica host, before a seeded
  // initial replication (StartReplication type 3 on the primary): the copy
  // at each path (raw bytes of a regular file or block device, so that no
  // backing or data file a format might name is opened; the same size as
  // the replica disk) becomes the replica's disk: copied into it sparsely
  // (CopyFileSparse: a reflink or in-kernel copy where the file system
  // allows), or with `move` renamed into the store in place of its disk
  // file (ReplicaStore::AdoptSeedFile: a regular file on the store's file
  // system with no other hard link; nothing is copied and the path is gone
  // afterwards). Every disk must be named. Refused (32775) unless the
  // replica VM is in state 2 with nothing applied; 32773 for a missing,
  // unknown or differently sized disk, or a copy `move` cannot take.
  // A job (96); the state stays 2.
  Result<JobRecord> MarkAsReplica(const std::string& vm, const std::vector<std::string>& seed_disks,
                                  bool move = false);

  // ImportInitialReplica (job 95; docs/replica_store.md section 17): loads
  // the export <location>/<vm name>-<vm uuid>/ that the primary wrote with
  // StartReplication type 2 into the replica store as point 1, checking
  // every chunk's hash as it reads it, then applies the logs staged while
  // the replica waited, in order; state 2 -> 3. At the call: 32775 outside
  // state 2, 32773 for a location that is not absolute, 32774 while an
  // import of the VM runs. The job's error: 32775 when the replica holds a
  // point, 32779 when the directory or its export is missing, 32773 for a
  // bad manifest, another VM's or generation's export, other disks, or a
  // chunk that fails its hash (the load is undone: nothing imported).
  // Cancelled or interrupted by a crash, it continues from the last durable
  // chunk (after a restart by itself).
  Result<JobRecord> ImportInitialReplica(const std::string& vm, const std::string& location);

  // Where the points are served (nbd+unix URIs use it).
  std::string points_socket() const;

  // What a failover or test VM of a replica runs now (for `vmreplica get`
  // and tests). NotFound when there is none.
  struct Running {
    std::string kind;  // "failover" or "test"
    std::string vm_id;
    std::string test_vm_id;
    uint64_t sequence = 0;
    std::string run_dir;
    std::vector<std::string> exports;
    bool vm_running = false;
  };
  Result<Running> Describe(const std::string& vm_id, bool test);

 private:
  struct Record;
  struct Active;

  Result<VmRecord> ResolveReplicaVm(const std::string& vm);
  // The checks every method on a replica VM starts with: a replica here,
  // with a relationship in a state the table allows for `op`, and
  // `point_id` ("" = latest) a retained point.
  Result<VmRecord> CheckReplicaMethod(const std::string& vm, Operation op, const std::string& point_id);
  // A launch of the VM over `a`'s exports (disk order), per the options.
  VmLaunchSpec LaunchSpec(const VmDefinition& def, const Active& a, VmNetworkMode network) const;
  // The failover IP seed (docs/failover.md section 5) as the next drive of
  // `spec`, when settings are stored for `vm`; nothing otherwise.
  Status AttachSeed(VmLaunchSpec* spec, const VmRecord& vm, const std::string& instance_id);
  // Sets spec->hypervisor (and libvirt_uri) from the definition's kind and
  // the options.
  void ChooseHypervisor(VmLaunchSpec* spec) const;
  bool RunsUnderLibvirt(const VmDefinition& def) const;
  Status DoFailover(JobContext& job, const std::string& vm_id, const std::string& point_id, bool start_vm);
  Status DoRevert(JobContext& job, const std::string& vm_id);
  Status DoCommit(JobContext& job, const std::string& vm_id);
  Status DoReverse(JobContext& job, const std::string& vm_id, const RelationshipSettings& settings);
  Status DoReverseToNewServer(JobContext& job, const std::string& vm_id, const RelationshipSettings& settings);
  // A failover still in 5 is committed (job 99's steps) before a reverse.
  Status CommitBeforeReverse(JobContext& job, const VmRecord& vm);
  // `committed`: in, the failover was committed before; out, it is now.
  Status DoFailback(JobContext& job, const std::string& vm_id, const RelationshipSettings& settings,
                    const std::string& point_id, bool* committed);
  // Shared by the reverse and the failback (docs/failover.md section 13).
  Result<std::pair<VmRecord, RelationshipRecord>> CheckWayBack(const std::string& vm, Operation op);
  // `other_server`: set when the settings name a server other than the
  // old primary (allowed only when it is not null: a reverse; a failback
  // goes to the old primary only).
  Result<RelationshipSettings> ReverseTarget(const VmRecord& vm, const RelationshipRecord& rel,
                                             const RelationshipSettings& requested, bool* other_server = nullptr);
  // A reverse to another server: this host becomes the primary (the
  // wrappers), a new relationship to that server is created (its replica
  // side made there); StartReplication then makes a full initial copy.
  Status SwitchToNewRelationship(const std::string& vm_id, const RelationshipSettings& settings);
  Result<ReverseSendRecord> BeginSendRecord(const std::string& vm_id, const std::string& purpose,
                                            const RelationshipSettings& settings);
  // PrepareReverse on the old primary, repeated until it is done; the
  // record moves to phase "peer" with the claim.
  Result<PrepareReverseAnswer> AskOldPrimary(ReverseSendRecord& record, const VmRecord& vm,
                                             const std::vector<ReplicaDisk>& disks,
                                             const RelationshipSettings& settings, uint32_t purpose);
  Result<std::shared_ptr<Active>> CommittedEntry(const std::string& vm_id, const std::string& vm_name);
  // The VM's definition on its disk wrappers: kind qmp under our launcher,
  // or kind libvirt (the domain named after the VM) when it runs under
  // libvirt here.
  Result<VmDefinition> WrapperDefinition(const VmRecord& vm, const Active& a);
  // The reversed VM's switch to a primary (section 13.1 step 3).
  Status SwitchToPrimary(const std::string& vm_id, const RelationshipSettings& settings);
  // The catalog part of both: the VM on its wrappers, its points gone, the
  // relationship kept as the primary side in state 1 or deleted.
  Status SwitchVm(const std::string& vm_id, const RelationshipSettings& settings, bool keep_relationship);
  // Forgets a reversed VM's entry when this host is no longer its primary
  // (its wrappers were adopted back by a later reverse). Call with mu_ held.
  void DropStaleReversedLocked(const std::string& vm_id);
  // StartVm of a reversed VM: its definition's disks are the wrappers.
  Status StartReversedVm(const VmRecord& vm);
  Result<JobRecord> StartCommitJob(const std::string& vm_id, bool resumed);
  // Merges the running failover VM's overlays into the store's disk files
  // with QEMU block mirrors (sync "top"), then pivots the VM onto them.
  Status MergeLive(JobContext& job, Active& a);
  // CommitFailover step 4: <state>/failover/<vm id>.since from the store's
  // history (docs/failover.md section 10.3), recorded in the record.
  Status WriteSinceFile(Active& a, const ReplicaStore& store);
  // <state>/wrappers/<vm id>/<disk>.qcow2 over the store's disk file, made
  // when missing (MakeDiskWrapper, section 10.2); answers its path.
  Result<std::string> EnsureWrapper(const std::string& vm_id, const ReplicaStore& store, uint32_t disk);
  Status DoTest(JobContext& job, const std::string& vm_id, const TestFailoverParams& p, const std::string& test_id);
  Status DoDestroy(JobContext& job, const std::string& vm_id);
  Status DoImport(JobContext& job, const std::string& vm_id, const std::string& location);
  void ResumeImports();
  // Stops the VM, removes its files, ends its exports, releases the store.
  Status TearDown(Active& a);
  Status SetState(const std::string& vm_id, ReplicationState state,
                  std::optional<ReplicationType> failed_over_type = std::nullopt);
  std::string RecordPath(const std::string& vm_id, bool test) const;
  std::string RunDir(const std::string& vm_id, bool test) const;
  void Resume(const std::string& path);

  Catalog* const catalog_;
  JobEngine* const jobs_;
  ReplicaManager* const replicas_;
  const FailoverOptions options_;
  PointExports exports_;

  std::mutex mu_;                           // guards busy_ and active_
  std::set<std::string> busy_;              // "<vm id>" / "<vm id>.test": a job runs for it
  std::map<std::string, std::shared_ptr<Active>> active_;  // same keys
  bool started_ = false;
};

}  // namespace vmreplica
