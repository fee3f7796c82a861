// The replication data plane (docs/protocol.md, "Data plane"): the client a
// primary uses to create a replica and stream delta logs to it
// (ReplicaClient), and the replica side that receives, stages and applies
// them (ReplicaManager, called by the PeerService handlers).
//
// Sender, one log:
//
//   start --> [resume_chunk r] --> chunks r.. (window of unacked chunks kept)
//         --> end --> [committed] ==> SendDelta returns OK
//          \__ stream broken: new stream, start again, resend from r
//              (up to max_attempts; r older than the window: Unavailable)
//
// Receiver, one log (per VM, one stream at a time):
//
//   start --> BeginReceive (or continue the partial log) --> chunks:
//   verify (index, bounds, XXH3) + LogWriter::Add --> ack --> end -->
//   Finish + Staging::CommitReceived ==> committed --> applier thread:
//   Staging::ApplyReady --> catalog (sequence, last apply, state 2 -> 3)
//          \__ checksum / bound / record refused: partial log dropped
//
// Thread safety: ReplicaClient methods may be called from any thread, one
// SendDelta per client at a time. ReplicaManager methods may be called
// concurrently from any threads (gRPC handlers); it owns one applier thread
// per open replica, stopped by RemoveReplica and by its destructor.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "vmreplica/block_hash.h"
#include "vmreplica/catalog.h"
#include "vmreplica/delta.h"
#include "vmreplica/logformat.h"
#include "vmreplica/model/enums.h"
#include "vmreplica/model/settings.h"
#include "vmreplica/peer.grpc.pb.h"
#include "vmreplica/replica_store.h"
#include "vmreplica/reverse.h"
#include "vmreplica/staging.h"
#include "vmreplica/status.h"

namespace vmreplica {

// Feature name a replica with a data plane answers in Hello.
inline constexpr const char* kDeltaFeature = "delta-v1";
// Feature name of a host that serves PrepareReverse (docs/failover.md 14).
inline constexpr const char* kReverseFeature = "reverse-v1";

// Limits of protocol version 1 (docs/protocol.md, "Limits").
inline constexpr uint32_t kMaxChunkBodyBytes = (16u << 20) + (64u << 10);
inline constexpr uint32_t kMaxGrpcMessageBytes = 17u << 20;  // set on the server and the channel
inline constexpr uint64_t kMaxRecordsPerLog = uint64_t{1} << 24;
inline constexpr size_t kMaxDefinitionBytes = 1u << 20;
inline constexpr size_t kMaxChunksInFlight = 16;

// ---------------------------------------------------------------------------
// Client (primary side).

struct CreateReplicaParams {
  std::string vm_id;  // UUID (the primary's VM id; the replica VM gets the same id)
  std::string vm_name;
  std::string definition_json;     // stored as the replica VM's definition
  std::vector<ReplicaDisk> disks;  // names + sizes (sizes rounded up to kReplicaBlockSize by the caller)
  RelationshipSettings settings;   // recovery_history etc. drive the replica's retention
};

struct ReplicaStatusInfo {
  uint64_t expected_sequence = 0;
  uint64_t latest_applied = 0;
  ReplicationState state{};
  int64_t last_apply_ms = 0;  // LastApplyTime on the replica (0 = none yet)
  uint64_t partial_sequence = 0;  // a log held in part (0 = none) ...
  uint64_t partial_chunks = 0;    // ... and how many of its chunks
  std::optional<GenerationId> latest_generation;  // of the latest applied point, when it has one
};

// PrepareReverse (docs/failover.md 14.1, docs/protocol.md "PrepareReverse"):
// what the host that failed the VM over (B) asks its old primary (A).
struct PrepareReverseParams {
  std::string vm_id, request_id;   // UUIDs (lower case)
  uint32_t purpose = 1;            // 1 reverse, 2 failback
  std::string vm_name;
  std::vector<ReplicaDisk> disks;  // B's disks in store order (names, rounded sizes)
  RelationshipSettings settings;   // the reversed relationship's settings (RecoveryConnectionPoint = A)
  std::string primary_address;     // "host:port" of B's listener
};

// A's answer: phase 1 (running, `done` false) or phase 2 with the claim.
struct PrepareReverseAnswer {
  bool done = false;               // phase 2
  std::string job_id;
  ReverseClaim claim;              // valid when done
  ReplicaStatusInfo status;        // when done: expected 2, latest 1, state 2
};

struct DeltaInfo {
  std::string vm_id;
  uint32_t relationship_index = 0;
  uint64_t sequence = 0;
  GenerationId base_generation{}, new_generation{};
  uint64_t cut_time_unix_ms = 0;
  ReplicationType kind = ReplicationType::kRegular;  // regular / app-consistent / planned
  bool initial = false;                              // the initial copy: sequence 1 in version 1
};

// Where one chunk of a log ends (a paused resync continues after it).
struct ChunkMark {
  uint64_t index = 0;                                    // the chunk
  uint64_t records = 0, data_bytes = 0, zero_bytes = 0;  // the log's totals up to and including it
  uint32_t last_disk = 0;                                // its last record ends at (last_disk, last_end)
  uint64_t last_end = 0;
};

struct SendOptions {
  // Continues a log the replica holds the first chunks of (a paused resync,
  // docs/protocol.md "Continuing a log"): the replica's partial log of this
  // very start must hold exactly the chunks up to continuation->index; the
  // source's records follow them (numbered from index + 1, totals counted
  // on from the mark's). Otherwise Unavailable ("the replica lost the
  // partial log"): nothing is sent.
  std::optional<ChunkMark> continuation;
  // Called with each chunk's mark when the chunk is made: on SendDelta's
  // chunk-making thread, which reads the source (up to 4 chunks ahead of
  // the writes; a failed send may have made chunks it never wrote). The
  // calls are in chunk order and all happen before SendDelta returns.
  std::function<void(const ChunkMark&)> on_chunk;
  // Called on SendDelta's thread when it gives up (an error, or a commit
  // found at the start) while the chunk-making thread may still be inside
  // the source's Next(): it must make that call return soon (a source that
  // waits or scans long checks a flag this sets; a hash fetch is
  // cancelled). SendDelta waits for that thread before it returns. May be
  // empty (the sources return within one read).
  std::function<void()> abandon;
  bool compress = true;
  uint32_t chunk_bytes = 1 << 20;                     // 4 KiB .. 16 MiB of record data per chunk
  std::function<void(uint64_t bytes_sent)> progress;  // may be empty; total payload bytes so far
  std::function<void(uint64_t bytes)> throttle;       // called before each chunk is sent; may block; may be empty
  std::chrono::milliseconds rpc_timeout{60000};       // per unary call; per wait for progress on the stream
  int max_attempts = 5;                               // stream attempts (the first one included)
};

// records, data_bytes, zero_bytes count the records as sent (data records
// longer than chunk_bytes are split); wire_bytes is the payload bytes
// written, resends included; resumed counts attempts after the first.
struct SendStats {
  uint64_t records = 0, data_bytes = 0, zero_bytes = 0, wire_bytes = 0, chunks = 0, resumed = 0;
  uint64_t compression_skipped = 0;  // chunks sent raw after probes found them incompressible
};

// TEST ONLY fault seams of ReplicaClient::SendDelta. Never set in production.
struct TestOnlySendHooks {
  // Called with each chunk's payload just before it is written (after the
  // checksum was computed): a test may flip a byte.
  std::function<void(uint64_t chunk_index, std::string* payload)> mutate_payload;
  // Called after each chunk was written, with the attempt (from 1) and the
  // chunks the replica acknowledged so far; answering true cancels the
  // stream (ClientContext::TryCancel), as a broken connection would.
  std::function<bool(uint64_t chunk_index, int attempt, uint64_t acked_chunks)> break_after_chunk;
};

// A GetBlockHashes call running on its own thread (ReplicaClient::
// FetchBlockHashes).
class BlockHashFetch {
 public:
  BlockHashFetch(v1::ReplicaPeer::Stub* stub, v1::BlockHashRequest request, std::shared_ptr<HashListFeed> feed);
  // Cancels the call if it still runs, then waits for its thread.
  ~BlockHashFetch();
  BlockHashFetch(const BlockHashFetch&) = delete;
  BlockHashFetch& operator=(const BlockHashFetch&) = delete;
  // Ends the call (its feed then fails with Cancelled or the call's error).
  void Cancel();
  // Waits for the call's end: its outcome, which the feed got too.
  Status Wait();

 private:
  Status Run();

  v1::ReplicaPeer::Stub* const stub_;
  const v1::BlockHashRequest request_;
  const std::shared_ptr<HashListFeed> feed_;
  grpc::ClientContext ctx_;
  std::thread thread_;
  Status outcome_;
};

class ReplicaClient {
 public:
  explicit ReplicaClient(std::shared_ptr<grpc::Channel> channel);  // mTLS channel made by the caller (service/tls.h)

  // Idempotent for the same vm id and disks; AlreadyExists when different.
  Result<ReplicaStatusInfo> CreateReplica(const CreateReplicaParams& params);
  Result<ReplicaStatusInfo> GetReplicaStatus(const std::string& vm_id, uint32_t relationship_index);
  // Streams the records of `source` as log `info.sequence`; returns only
  // after the replica acknowledged the log as durably staged. A broken
  // stream is resumed (up to max_attempts). `source` is read once: chunks
  // not yet acknowledged are kept in memory (at most kMaxChunksInFlight),
  // so a resume never re-reads it. Errors: InvalidArgument (bad info or
  // options), FailedPrecondition (out of sequence), PermissionDenied,
  // Corruption (the replica saw a checksum failure), Unavailable (after
  // all attempts, or the replica lost the partial log: send it again);
  // errors of `source` are returned as they are.
  Result<SendStats> SendDelta(const DeltaInfo& info, DeltaSource& source, const SendOptions& options);
  // The replica side stops; its store and VM are kept.
  Status RemoveReplica(const std::string& vm_id, uint32_t relationship_index);
  // New settings for the replica side (RecoveryHistory).
  Result<ReplicaStatusInfo> ModifyReplica(const std::string& vm_id, uint32_t relationship_index,
                                          const RelationshipSettings& settings);

  // The other direction (replica host -> primary host): whether the primary
  // VM runs there. run_state: 1 running, 2 not running, 0 unknown.
  struct PrimaryVmState {
    int run_state = 0;
    uint32_t replication_state = 0;
    std::string detail;
  };
  Result<PrimaryVmState> GetPrimaryVmState(const std::string& vm_id);
  // Resynchronize and seeded replication (docs/protocol.md
  // "GetBlockHashes"): the replica's hash lists of every disk of its latest
  // image, of feed->block_size() blocks, fetched on a thread of their own
  // into `feed` as the replica hashes them (in windows of `window_blocks`
  // blocks; 0 = one list per disk). Every piece is checked before use
  // (Corruption for a list out of order, malformed, of another block size,
  // or a disk's lists ending before its last block; FailedPrecondition
  // when the replica has other disks than the feed; InvalidArgument for
  // another disk size). The call's outcome finishes the feed. The fetch
  // must not outlive this client.
  std::unique_ptr<BlockHashFetch> FetchBlockHashes(const std::string& vm_id, uint32_t relationship_index,
                                                   uint32_t window_blocks, std::shared_ptr<HashListFeed> feed);
  // StartReplication type 2 (docs/protocol.md "ReserveImport"): log 1 of
  // generation `generation` comes by ImportInitialReplica; with `release`
  // the reservation and the staged logs are given up instead.
  Result<ReplicaStatusInfo> ReserveImport(const std::string& vm_id, uint32_t relationship_index,
                                          const GenerationId& generation, bool release);
  // Reverse sync (docs/protocol.md "GetRangeHashes", docs/failover.md 12
  // step 4): the old primary's hash lists of the candidate runs, per disk
  // (disk_count of them, 1..64; a disk without runs has none), each disk's
  // runs ascending and not overlapping, every list of `block_size` and, per
  // disk, one disk size. `candidates`: the caller's candidate ranges (any
  // order; rounded out to 4 KiB and, when the request would exceed 16 MiB,
  // coarsened), nullptr = every block. Every piece of the answer is checked
  // (Corruption when the old primary breaks a rule, at most 1 GiB of lists);
  // InvalidArgument for a candidate on a disk >= disk_count.
  Result<std::vector<std::vector<BlockHashList>>> GetRangeHashes(const std::string& vm_id,
                                                                 uint32_t relationship_index, uint32_t block_size,
                                                                 const std::vector<ReplicaRange>* candidates,
                                                                 uint32_t disk_count);

  // Reverse (docs/failover.md 14.1): asks the old primary to adopt its
  // disks as the replica store of the reversed relationship. Answers at
  // once: phase 1 (`done` false, the job's id) while A's job runs; call
  // again with the same request_id until `done`. The answer is checked
  // (Corruption: a phase, tracking or generation out of its range).
  // Errors as the peer answers them: PermissionDenied (the caller is not the
  // relationship's replica server, or A is not a replica server accepting
  // us), FailedPrecondition (A's role or state, its VM runs, another
  // request after the switch), InvalidArgument (disks differ), Unavailable
  // (another request_id runs; the host is unreachable).
  Result<PrepareReverseAnswer> PrepareReverse(const PrepareReverseParams& p);

  // TEST ONLY: see TestOnlySendHooks.
  void SetTestOnlySendHooks(TestOnlySendHooks hooks) { test_hooks_ = std::move(hooks); }

 private:
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ReplicaPeer::Stub> stub_;
  std::chrono::milliseconds unary_timeout_{60000};
  TestOnlySendHooks test_hooks_;
};

// gRPC status of a call -> Status, and Status -> gRPC status for a
// handler's answer (the table in docs/protocol.md). Inline: PeerService
// uses them without linking this library.
inline Status StatusFromGrpc(const grpc::Status& s) {
  const std::string& m = s.error_message();
  switch (s.error_code()) {
    case grpc::StatusCode::OK:
      return Status::Ok();
    case grpc::StatusCode::PERMISSION_DENIED:
    case grpc::StatusCode::UNAUTHENTICATED:
      return Status::PermissionDenied(m);
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::OUT_OF_RANGE:
      return Status::InvalidArgument(m);
    case grpc::StatusCode::ALREADY_EXISTS:
      return Status::AlreadyExists(m);
    case grpc::StatusCode::FAILED_PRECONDITION:
      return Status::FailedPrecondition(m);
    case grpc::StatusCode::NOT_FOUND:
      return Status::NotFound(m);
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::ABORTED:
    case grpc::StatusCode::CANCELLED:
      return Status::Unavailable(m);
    case grpc::StatusCode::DATA_LOSS:
      return Status::Corruption(m);
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return Status::Timeout(m);
    case grpc::StatusCode::UNIMPLEMENTED:
      return Status::NotSupported(m);
    default:
      return Status::Internal(m);
  }
}

inline grpc::Status StatusToGrpc(const Status& s) {
  using C = grpc::StatusCode;
  C c = C::INTERNAL;
  switch (s.code()) {
    case Code::kOk:
      return grpc::Status::OK;
    case Code::kPermissionDenied:
      c = C::PERMISSION_DENIED;
      break;
    case Code::kInvalidArgument:
      c = C::INVALID_ARGUMENT;
      break;
    case Code::kAlreadyExists:
      c = C::ALREADY_EXISTS;
      break;
    case Code::kFailedPrecondition:
      c = C::FAILED_PRECONDITION;
      break;
    case Code::kNotFound:
      c = C::NOT_FOUND;
      break;
    case Code::kUnavailable:
    case Code::kBusy:
      c = C::UNAVAILABLE;
      break;
    case Code::kCorruption:
      c = C::DATA_LOSS;
      break;
    case Code::kTimeout:
      c = C::DEADLINE_EXCEEDED;
      break;
    case Code::kNotSupported:
      c = C::UNIMPLEMENTED;
      break;
    default:
      c = C::INTERNAL;
      break;
  }
  return grpc::Status(c, s.message());
}

// ---------------------------------------------------------------------------
// Replica side.

// The authorised caller of a data-plane call, as PeerService found it from
// the verified certificate (never from the request).
struct PrimaryCaller {
  std::vector<std::string> names;  // certificate names
  AuthorizationEntry entry;        // the most specific matching entry
};

// The bidirectional stream of one PushDelta call, as the handler sees it.
class DeltaStream {
 public:
  virtual ~DeltaStream() = default;
  virtual bool Read(v1::DeltaMessage* message) = 0;  // false: the stream ended or broke
  virtual bool Write(const v1::DeltaReply& reply) = 0;
};

// Receives one run's serialised hash list (GetRangeHashes): its disk, its
// index among that disk's runs, whether it is the disk's last run. Answers
// false when the caller went away.
using RangeHashSink =
    std::function<bool(uint32_t disk, uint64_t run, bool last_run_of_disk, const std::string& serialized)>;

// What PeerService calls. An interface so that the service library does not
// link the transfer library: the daemon owns the ReplicaManager.
class ReplicaReceiver {
 public:
  virtual ~ReplicaReceiver() = default;
  virtual Result<ReplicaStatusInfo> CreateReplica(const PrimaryCaller& caller, const CreateReplicaParams& params) = 0;
  virtual Result<ReplicaStatusInfo> GetReplicaStatus(const PrimaryCaller& caller, const std::string& vm_id,
                                                     uint32_t relationship_index) = 0;
  virtual Status RemoveReplica(const PrimaryCaller& caller, const std::string& vm_id, uint32_t relationship_index) = 0;
  virtual Result<ReplicaStatusInfo> ModifyReplica(const PrimaryCaller& caller, const std::string& vm_id,
                                                  uint32_t relationship_index, const RelationshipSettings& settings) = 0;
  // Runs one PushDelta stream to its end (OK once the log is committed).
  virtual Status ReceiveDelta(const PrimaryCaller& caller, DeltaStream& stream) = 0;
  // Hashes every disk of the latest image (staged logs applied first) and
  // hands the serialised lists to `emit` in disk order: one per disk
  // (window_blocks 0) or one per window of `window_blocks` blocks, each as
  // soon as it is hashed, `last` on the disk's last one. `emit` answers
  // false when the caller went away.
  virtual Status HashDisks(
      const PrimaryCaller& caller, const std::string& vm_id, uint32_t relationship_index, uint32_t block_size,
      uint32_t window_blocks,
      const std::function<bool(uint32_t disk, bool last, const std::string& serialized)>& emit) = 0;
  // docs/protocol.md "ReserveImport". `generation_hex`: 32 hex digits.
  virtual Result<ReplicaStatusInfo> ReserveImport(const PrimaryCaller& caller, const std::string& vm_id,
                                                  uint32_t relationship_index, const std::string& generation_hex,
                                                  bool release) = 0;
  // docs/protocol.md "GetRangeHashes": hashes the candidate runs of the
  // replica at its adopted point 1 and hands each run's serialised list to
  // `emit` with its disk, its index among the disk's runs and whether it is
  // the disk's last run, disks and runs ascending; `emit` answers false when
  // the caller went away. `ranges_blob`: range list v1, kind 1 (parsed here).
  virtual Status HashRanges(const PrimaryCaller& caller, const std::string& vm_id, uint32_t relationship_index,
                            uint32_t block_size, std::string_view ranges_blob, bool all_blocks,
                            const RangeHashSink& emit) = 0;
};

// What PeerService calls for PrepareReverse (implemented by
// OldPrimaryReverse, include/vmreplica/reverse_receiver.h). `caller_names`:
// the caller's certificate names; `entry`: the authorization entry
// PeerService matched them with (storage location and trust group of the
// adopted store). The implementation checks the caller's role itself.
class ReverseReceiver {
 public:
  virtual ~ReverseReceiver() = default;
  virtual Result<PrepareReverseAnswer> PrepareReverse(const std::vector<std::string>& caller_names,
                                                      const AuthorizationEntry& entry,
                                                      const PrepareReverseParams& p) = 0;
};

struct ReplicaManagerOptions {
  // Options of each replica's staging; staging.catalog defaults to the
  // manager's catalog (staged logs are mirrored there).
  StagingOptions staging;
  // Every delta is its own recovery point while newer than this (ms).
  int64_t fine_window_ms = 3600 * 1000;
  // A new stream waits this long for the previous stream of the same VM to
  // end (its break not yet noticed) before answering Unavailable.
  std::chrono::milliseconds resume_wait{10000};
  // Apply an ordinary delta while it is received when the store can take
  // it at once, instead of staging it first (docs/protocol.md "Replica
  // side: applying"). Config: [replica] apply_while_receiving.
  bool apply_while_receiving = true;
  // An apply-while-receiving whose stream broke waits this long for the
  // stream to resume before it rolls back.
  std::chrono::milliseconds apply_idle_timeout{120000};
  // The stores' ReplicaStoreOptions::apply_batch_bytes; 0 = the store's
  // default (32 MiB). Tests make it small so that a rollback has data
  // records already written to undo.
  uint64_t apply_batch_bytes = 0;
  // Milliseconds since the Unix epoch; default: the system clock.
  std::function<int64_t()> now_ms;
  // The daemon's state directory: GetRangeHashes unites the caller's
  // candidates with <state_dir>/reverse/<vm id>.acand (docs/failover.md
  // 14.1). "" = no such file is looked for.
  std::string state_dir;
};

// '<storage>/<vm_id>' when it stays inside the resolved storage location
// (docs/protocol.md "Authorisation on every call", step 5), resolved.
// PermissionDenied when it escapes (nothing is created); InvalidArgument
// when vm_id is not a UUID; NotFound when the storage location is missing.
Result<std::string> ConfinedStoreDir(const std::string& storage_location, const std::string& vm_id);

// Writes the ownership record '<store_dir>.primary' (docs/protocol.md
// "Authorisation on every call", step 6) for `caller` as CreateReplica
// does: its entry's trust group, the entry's pattern and the caller's
// names. Atomic, mode 0600. The adoption of a reverse writes it too.
Status WriteStoreOwner(const std::string& store_dir, const PrimaryCaller& caller);

class ReplicaManager final : public ReplicaReceiver {
 public:
  // `catalog` must outlive the manager. Nothing is opened here: stores are
  // opened on first use (a status, a delta) or by OpenAll(). Destroy the
  // manager only after the gRPC server that calls it has shut down.
  ReplicaManager(Catalog* catalog, ReplicaManagerOptions options);
  ~ReplicaManager() override;  // stops and joins the applier threads
  ReplicaManager(const ReplicaManager&) = delete;
  ReplicaManager& operator=(const ReplicaManager&) = delete;

  // Opens every replica relationship of the catalog whose store is found
  // through the authorization entries, and applies staged logs. Errors of
  // single replicas are logged, not returned.
  void OpenAll();

  Result<ReplicaStatusInfo> CreateReplica(const PrimaryCaller& caller, const CreateReplicaParams& params) override;
  Result<ReplicaStatusInfo> GetReplicaStatus(const PrimaryCaller& caller, const std::string& vm_id,
                                             uint32_t relationship_index) override;
  Status RemoveReplica(const PrimaryCaller& caller, const std::string& vm_id, uint32_t relationship_index) override;
  Result<ReplicaStatusInfo> ModifyReplica(const PrimaryCaller& caller, const std::string& vm_id,
                                          uint32_t relationship_index, const RelationshipSettings& settings) override;
  Status ReceiveDelta(const PrimaryCaller& caller, DeltaStream& stream) override;
  Status HashDisks(const PrimaryCaller& caller, const std::string& vm_id, uint32_t relationship_index,
                   uint32_t block_size, uint32_t window_blocks,
                   const std::function<bool(uint32_t disk, bool last, const std::string& serialized)>& emit) override;
  Result<ReplicaStatusInfo> ReserveImport(const PrimaryCaller& caller, const std::string& vm_id,
                                          uint32_t relationship_index, const std::string& generation_hex,
                                          bool release) override;
  // Allowed only in state 2 at latest point 1 with nothing staged, no
  // partial log and no stream running (FailedPrecondition naming what was
  // found); Unavailable during a seed copy; InvalidArgument for a bad block
  // size or blob, or over 1 GiB of lists. Nothing is applied meanwhile
  // only because the caller sends log 2 after this call: a log arriving
  // during it may change the blocks being hashed.
  Status HashRanges(const PrimaryCaller& caller, const std::string& vm_id, uint32_t relationship_index,
                    uint32_t block_size, std::string_view ranges_blob, bool all_blocks,
                    const RangeHashSink& emit) override;

  // Stops the applier of `vm_id`, deletes its staged logs (files and
  // catalog rows), closes its store (the directory and its disk files stay:
  // they are the VM's disks now; the store is closed once a data-plane call
  // still using it ends) and forgets the replica. The catalog's VM and
  // relationship rows are the caller's. OK when the replica is not open.
  // FailedPrecondition while a hold (AcquireLocal) other than the
  // `holds_of_caller` the caller itself has exists, or a seed copy runs;
  // Busy when a delta stream does not end within resume_wait. The caller's
  // holds end with the replica (no ReleaseLocal; the pointer is invalid).
  Status Retire(const std::string& vm_id, int holds_of_caller = 0);

  // Waits until the replica of `vm_id` applied every staged log (or failed).
  // A log being applied while received is not waited for (it is committed
  // before its stream's commit answer, or rolled back). For tests and
  // orderly shutdown. NotFound when it is not open.
  Status WaitApplied(const std::string& vm_id, std::chrono::milliseconds timeout);

  // ---- Local use: this host's own administration of its replicas
  // (failover, src/failover). Never reached from the network.
  //
  // The store of the replica of `vm_id`, opened through the authorization
  // entries when it is not open yet, and held: while held, RemoveReplica
  // answers FailedPrecondition (a failover or test VM reads the store). The
  // pointer stays valid until ReleaseLocal() and the manager's destruction.
  // Holds are counted. NotFound when this host has no replica of `vm_id`.
  Result<ReplicaStore*> AcquireLocal(const std::string& vm_id);
  void ReleaseLocal(const std::string& vm_id);
  // Wakes the applier of `vm_id` (after a failover was reverted, staged
  // logs apply again). No-op when it is not open.
  void KickApply(const std::string& vm_id);
  // No staged log is applied from now on: returns once an apply in
  // progress has ended (Timeout otherwise; the hold stays). A log being
  // applied while received is cancelled and rolled back, unless its end
  // has arrived: then its commit is waited for. ReleaseApply
  // ends the hold and wakes the applier. In memory only: after a restart
  // the relationship's state holds applies (12, 5, 6, 13, 14).
  Status HoldApply(const std::string& vm_id, std::chrono::milliseconds timeout);
  void ReleaseApply(const std::string& vm_id);
  // While set, the replica takes no log and no hash request (a seed copy is
  // written into its disks). Busy when already set.
  Status SetSeeding(const std::string& vm_id, bool seeding);
  // ImportInitialReplica (src/failover; docs/replica_store.md section 17).
  // The generation (32 hex digits) the primary reserved the import for, or
  // nullopt. NotFound when the replica is not open.
  Result<std::optional<std::string>> ImportReservation(const std::string& vm_id);
  // Reserves the import here (the primary could not reach us yet): the same
  // rules as the peer call.
  Status ReserveImportLocal(const std::string& vm_id, const std::string& generation_hex);
  // The import's load (source and tag of `info`) begun or found again,
  // with no log received meanwhile: the reservation must be of the
  // export's generation (made here when the primary could not tell us); a
  // broken network copy of log 1 is given up; a load of another source or
  // export is undone first. Answers the chunk to continue from. Busy while
  // a seed copy is written; FailedPrecondition once the store holds a point.
  Result<uint64_t> BeginImportLoad(const std::string& vm_id, const LoadInfo& info);
  // After ReplicaStore::FinishLoad: the reservation goes, the relationship
  // moves 2 -> 3 with sequence 1, and the staged logs (2, 3, ...) apply.
  Status FinishImport(const std::string& vm_id);

  struct Replica;  // one open replica (src/transfer/replica_manager.cc)

 private:
  Result<std::shared_ptr<Replica>> Get(const PrimaryCaller& caller, const std::string& vm_id, uint32_t index);
  Result<std::shared_ptr<Replica>> OpenLocked(const std::string& dir, const RelationshipRecord& rel);
  Result<ReplicaStatusInfo> StatusOf(Replica& r);
  // ReserveImport's work on an open replica.
  Status ReserveOrRelease(Replica& r, const std::string& generation_hex, bool release);
  std::shared_ptr<Replica> FindOpen(const std::string& vm_id);  // null when not open

  // Constant after construction.
  Catalog* const catalog_;
  const ReplicaManagerOptions options_;

  std::mutex mu_;  // guards replicas_; held while opening / creating / removing
  std::map<std::string, std::shared_ptr<Replica>> replicas_;  // by vm id
};

}  // namespace vmreplica
