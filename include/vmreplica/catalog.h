// The catalog: vmreplicad's durable record of server settings, authorization
// entries, virtual machines and their disks, replication relationships,
// recovery points, statistics windows, jobs, staged delta logs and failover
// network settings. One SQLite database per daemon (real libsqlite3), in WAL
// mode with synchronous=FULL, so a change that a method reported as done
// survives a power loss.
//
// Schema. Versioned by `PRAGMA user_version`; each migration is one
// transaction. A database written by a newer vmreplica (higher version than
// kCatalogSchemaVersion) is refused untouched, so an old binary never
// damages a newer catalog. Enumerations are stored as their WMI numbers
// (model/enums.h), never as names; numbers read back are range-checked and
// an out-of-range number is Corruption.
//
// Errors. Every method returns a Status/Result:
//   NotFound            the named row does not exist (for Modify/Remove/
//                       Delete, and for a parent VM / relationship that a new
//                       row would belong to). Get*/Find* answer an empty
//                       optional instead.
//   AlreadyExists       an Add* whose key is taken (or a duplicate key inside
//                       one PutDisks set).
//   InvalidArgument     a record that can never be stored (bad index...).
//   FailedPrecondition  the file is a catalog of a newer schema, or not a
//                       vmreplica catalog; or an ambiguous FindVmByName.
//   Corruption          the file is not an SQLite database, fails
//                       quick_check, or holds values that cannot be decoded.
//   Busy / IOError      SQLite could not get its lock / the OS refused.
// A method that fails changes nothing: every multi-row change is one
// transaction.
//
// Thread safety. A Catalog is safe to use from any number of threads: it
// owns one SQLite connection behind a mutex, so calls are serialised (each
// is short; a write costs one fsync of the WAL). RunInTransaction() holds
// the lock for the whole body.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "vmreplica/job.h"
#include "vmreplica/model/enums.h"
#include "vmreplica/model/settings.h"
#include "vmreplica/status.h"

struct sqlite3;

namespace vmreplica {

// The newest schema this binary knows. Bumped by every migration; the
// migration list in src/catalog/schema.cc is append-only.
inline constexpr int kCatalogSchemaVersion = 4;

// PRAGMA application_id of a vmreplica catalog ("vmrc").
inline constexpr int32_t kCatalogApplicationId = 0x766d7263;

// A virtual machine known to this host (primary, replica, test VM...).
struct VmRecord {
  std::string id;                  // UUID string; primary key
  std::string name;                // not unique (two primaries may send the same name)
  ReplicationMode mode = ReplicationMode::kNone;
  std::string definition_json;     // hypervisor-level definition, opaque here
  int64_t created_ms = 0;          // Unix epoch milliseconds
};

// One disk of a VM. Names are unique within a VM. ListDisks returns them in
// the order of the last PutDisks.
struct DiskRecord {
  std::string vm_id;
  std::string name;                // e.g. "vda"
  uint64_t size_bytes = 0;
  std::string path;                // image file or device
  std::string node_name;           // QEMU block node name
  uint32_t granularity = 0;        // dirty-bitmap granularity in bytes
  bool included = true;            // replicated (IncludedDisks)
};

// One replication relationship: a (VM, hop) pair. Index 0 is
// primary -> replica, index 1 replica -> extended replica.
struct RelationshipRecord {
  std::string vm_id;
  int index = 0;                   // 0 or 1
  ReplicationMode local_mode = ReplicationMode::kPrimary;  // this host's role in the hop
  ReplicationState state = ReplicationState::kDisabled;
  ReplicationHealth health = ReplicationHealth::kNotApplicable;
  RelationshipSettings settings;
  int64_t last_replication_ms = 0;       // LastReplicationTime (received)
  int64_t last_apply_ms = 0;             // LastApplyTime
  int64_t last_app_consistent_ms = 0;    // LastApplicationConsistentReplicationTime
  ReplicationType last_replication_type = ReplicationType::kNone;
  ReplicationType failed_over_replication_type = ReplicationType::kNone;
  std::string generation_id;             // history name of the disks (see design 4)
  uint64_t sequence = 0;                 // last delta sequence number
  // How the initial copy is made (primary): with kExport the state stays 2
  // after the export until the replica imported it.
  InitialReplicationType initial_replication_type = InitialReplicationType::kNetwork;
};

struct RecoveryPointRecord {
  std::string id;                  // primary key
  std::string vm_id;
  int64_t time_ms = 0;
  uint16_t kind = 0;               // a ReplicationType number (1 standard, 2 app-consistent, 3 planned)
  uint64_t sequence = 0;           // delta sequence the point was taken at
  std::string generation_id;
};

// State of a staged delta log (docs/replica_store.md section 14). Stored as
// these numbers; never reuse one. An applied log's row is deleted.
enum class StagedLogState : uint8_t {
  kStaged = 1,    // <staging>/<seq>.vrl: verified, durable, waiting to apply
  kRejected = 2,  // <staging>/rejected/<seq>.vrl: failed verification later
};

// One delta log in a VM's staging area (schema version 2). Key: (vm_id,
// sequence, state): a rejected sequence may be staged again beside its
// rejected copy.
struct StagedLogRecord {
  std::string vm_id;
  uint64_t sequence = 0;
  StagedLogState state = StagedLogState::kStaged;
  std::string file_name;    // relative to the staging dir, e.g. "rejected/<20-digit seq>.vrl"
  uint64_t size_bytes = 0;  // file size
  int64_t received_ms = 0;  // Unix epoch ms the log was staged (file mtime when reconciled)
};

// The failover IP settings of one network adapter of a VM (schema version
// 3; SetFailoverNetworkAdapterSettings, docs/api.md). Stored as given: the
// caller validates the values (ValidateFailoverNetworkSettings in
// vmreplica/cloud_init.h) before it stores them. Key: (vm_id, adapter),
// adapter compared exactly; deleted with the VM.
struct FailoverNetworkRecord {
  std::string vm_id;
  std::string adapter;  // which guest NIC: its MAC address (lower case) or an interface name; not empty
  std::vector<std::string> ip_addresses;
  std::vector<std::string> subnets;           // one per IP address
  std::vector<std::string> default_gateways;
  std::vector<std::string> dns_servers;
  bool dhcp_enabled = false;
};

// One statistics window of a relationship (reference section 4.4). Counters
// are totals over the window; averages are derived by the reader
// (size / success count, latency / success count).
struct StatisticsRecord {
  std::string vm_id;
  int index = 0;
  int64_t start_ms = 0;                       // StartStatisticTime
  int64_t end_ms = 0;                         // EndStatisticTime (0 = window open)
  uint64_t replication_success_count = 0;
  uint64_t replication_size_bytes = 0;        // total bytes replicated
  uint64_t max_replication_size_bytes = 0;
  uint64_t replication_latency_ms = 0;        // total; WMI reports seconds
  uint64_t max_replication_latency_ms = 0;
  uint64_t replication_miss_count = 0;
  uint64_t network_failure_count = 0;
  uint64_t replication_failure_count = 0;
  uint64_t pending_replication_size_bytes = 0;
  uint64_t application_consistent_snapshot_failure_count = 0;
  ReplicationHealth replication_health = ReplicationHealth::kNotApplicable;
  int64_t last_test_failover_ms = 0;          // LastTestFailoverTime (0 = never)
  uint64_t initial_replication_size_bytes = 0;
  std::vector<std::string> health_issues;     // messages shown with the health
};

class Catalog {
 public:
  // Opens (creating when missing) the catalog at `path` and applies pending
  // migrations. Refuses, leaving the file unmodified:
  //   Corruption          not an SQLite database / fails PRAGMA quick_check;
  //   FailedPrecondition  schema newer than kCatalogSchemaVersion, or an
  //                       SQLite database that is not a vmreplica catalog;
  //   IOError             cannot open or create the file.
  static Result<std::unique_ptr<Catalog>> Open(const std::string& path);

  Catalog(const Catalog&) = delete;
  Catalog& operator=(const Catalog&) = delete;
  ~Catalog();  // closes the connection (checkpoints the WAL)

  const std::string& path() const { return path_; }

  // The schema version of the open file (== kCatalogSchemaVersion).
  Result<int> SchemaVersion();

  // Runs `body` inside one transaction: the body's catalog calls (made on
  // this thread) commit together when it returns OK and are all rolled back
  // when it returns an error, which is then returned. Nests (savepoints).
  // Other threads' calls wait until the body returns, so the body must not
  // wait for another thread that uses this catalog.
  Status RunInTransaction(const std::function<Status()>& body);

  // --- Replica-server settings (one row). Defaults until first Put.
  Result<ServerSettings> GetServerSettings();
  Status PutServerSettings(const ServerSettings& s);

  // --- Authorization entries, keyed by allowed_primary_host_system
  // compared case-insensitively (ASCII). Listed in key order.
  Result<std::vector<AuthorizationEntry>> ListAuthorizationEntries();
  Result<std::optional<AuthorizationEntry>> GetAuthorizationEntry(const std::string& host);
  Status AddAuthorizationEntry(const AuthorizationEntry& e);     // AlreadyExists
  Status ModifyAuthorizationEntry(const AuthorizationEntry& e);  // NotFound; stores e's spelling
  Status RemoveAuthorizationEntry(const std::string& host);      // NotFound

  // --- Virtual machines and disks.
  Status PutVm(const VmRecord& vm);  // insert or update by id; keeps its disks
  Result<std::optional<VmRecord>> GetVm(const std::string& id);
  // Empty when no VM has that name (exact, case-sensitive); FailedPrecondition
  // when several do (the caller must use the id).
  Result<std::optional<VmRecord>> FindVmByName(const std::string& name);
  Result<std::vector<VmRecord>> ListVms();  // by name, then id
  // Deletes the VM with its disks, relationships, statistics, recovery
  // points, staged-log rows and failover network settings. NotFound when
  // absent.
  Status DeleteVm(const std::string& id);
  // Replaces the VM's disk set (every disk's vm_id is taken to be `vm_id`).
  // NotFound for an unknown VM; AlreadyExists for a name given twice.
  Status PutDisks(const std::string& vm_id, const std::vector<DiskRecord>& disks);
  Result<std::vector<DiskRecord>> ListDisks(const std::string& vm_id);

  // --- Relationships. The VM must exist (NotFound); index 0 or 1
  // (InvalidArgument).
  Status PutRelationship(const RelationshipRecord& r);  // upsert
  Result<std::optional<RelationshipRecord>> GetRelationship(const std::string& vm_id, int index);
  Result<std::vector<RelationshipRecord>> ListRelationships();  // by vm_id, index
  // Also deletes the relationship's statistics. NotFound when absent.
  Status DeleteRelationship(const std::string& vm_id, int index);

  // --- Recovery points.
  Status AddRecoveryPoint(const RecoveryPointRecord& p);  // AlreadyExists; NotFound (VM)
  Result<std::vector<RecoveryPointRecord>> ListRecoveryPoints(const std::string& vm_id);  // by time, sequence
  Status DeleteRecoveryPoint(const std::string& id);      // NotFound
  // Deletes all of `ids` or none (NotFound names the first missing one).
  Status DeleteRecoveryPoints(const std::vector<std::string>& ids);

  // --- Staged delta logs (mirror of the staging directories). The VM must
  // exist (NotFound); deleted with the VM.
  Status PutStagedLog(const StagedLogRecord& log);  // upsert by (vm_id, sequence, state)
  Result<std::optional<StagedLogRecord>> GetStagedLog(const std::string& vm_id, uint64_t sequence,
                                                      StagedLogState state);
  // By sequence, then state.
  Result<std::vector<StagedLogRecord>> ListStagedLogs(const std::string& vm_id);
  Status DeleteStagedLog(const std::string& vm_id, uint64_t sequence, StagedLogState state);  // NotFound

  // --- Failover network settings, one row per (VM, adapter). The VM must
  // exist (NotFound); deleted with the VM.
  // Replaces the VM's whole set with `adapters` (every record's vm_id is
  // taken to be `vm_id`; an empty set removes them all). InvalidArgument for
  // an empty adapter name or a value that is not printable ASCII;
  // AlreadyExists for an adapter given twice.
  Status PutFailoverNetworkSettings(const std::string& vm_id, const std::vector<FailoverNetworkRecord>& adapters);
  // In the order of the last Put; empty when none are stored (or no such VM).
  Result<std::vector<FailoverNetworkRecord>> GetFailoverNetworkSettings(const std::string& vm_id);
  // Removes one adapter's settings. NotFound when that adapter has none.
  Status DeleteFailoverNetworkSettings(const std::string& vm_id, const std::string& adapter);

  // --- Statistics windows, one per relationship (which must exist:
  // NotFound). Deleted with the relationship.
  Result<std::optional<StatisticsRecord>> GetStatistics(const std::string& vm_id, int index);
  Status PutStatistics(const StatisticsRecord& s);  // upsert
  // Starts a new window at `now_ms`: counters, sizes and latencies zeroed,
  // end_ms 0; health, last test failover time and health issues kept.
  Status ResetStatistics(const std::string& vm_id, int index, int64_t now_ms);

  // --- Jobs.
  Status PutJob(const JobRecord& job);  // upsert by id
  Result<std::optional<JobRecord>> GetJob(const std::string& id);
  Result<std::vector<JobRecord>> ListJobs();  // by created_ms, id
  Status DeleteJob(const std::string& id);    // NotFound

 private:
  Catalog(std::string path, sqlite3* db);

  // Helpers for the methods above; mu_ must be held.
  Status Exec(const std::string& sql);
  // Runs `body` in a transaction (a savepoint when one is open already);
  // commits when it returns OK, rolls back otherwise.
  Status WithTxnLocked(const std::function<Status()>& body);
  Status VmExistsLocked(const std::string& vm_id);
  Status RelationshipExistsLocked(const std::string& vm_id, int index);

  // Constant after construction.
  const std::string path_;
  sqlite3* const db_;  // owned; closed by the destructor

  // Serialises every use of db_ (recursive so that RunInTransaction bodies
  // may call the public methods).
  std::recursive_mutex mu_;
  int txn_depth_ = 0;  // guarded by mu_: open transaction + savepoints
};

}  // namespace vmreplica
