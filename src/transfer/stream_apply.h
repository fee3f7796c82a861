// Applying a delta log to the replica store while it is received
// (docs/protocol.md "Replica side: applying"): the receiving stream pushes
// each verified chunk's records; a thread of this object runs
// ReplicaStore::Apply, which pulls them through a bounded queue.
//
//   StreamApply(store, seq, info)  --> thread: store.Apply(seq, info, queue)
//   Push(records) ... Push(records)    (blocks while max_queued_bytes wait)
//   Finish()  --> the queue ends --> Apply commits --> its status
//      \__ Cancel(why), the destructor, or idle_timeout without records
//          while detached (no stream feeds it: Detach .. Attach): the queue
//          answers the error, Apply rolls back (the store stays at its
//          previous point), later Push / Finish answer that error
//
// Thread safety: Push and Finish belong to one caller at a time (the stream
// that owns the log); Cancel, done() and status() may be called from any
// thread. The destructor cancels and joins: it must not run on the
// on_done callback's thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "vmreplica/delta.h"
#include "vmreplica/replica_store.h"
#include "vmreplica/status.h"

namespace vmreplica {

struct StreamApplyOptions {
  // Record bytes (data bytes, plus a fixed cost per record) queued at most;
  // Push waits while more are queued. A single Push larger than this is
  // accepted when the queue is empty.
  uint64_t max_queued_bytes = uint64_t{32} << 20;
  // Apply gives up (Unavailable, rolled back) after waiting this long for
  // records while detached (Detach() without Attach() since). While a
  // stream is attached there is no limit: a slow link is not an idle one.
  std::chrono::milliseconds idle_timeout{120000};
  // Push and Finish call their `waiting` callback every this long while
  // they wait for the store (the receiver repeats its last ack, so that the
  // sender sees the replica alive while a batch is written).
  std::chrono::milliseconds heartbeat{5000};
  // Called on the apply thread once Apply has returned (after status() is
  // set). Must not destroy this object.
  std::function<void()> on_done;
};

class StreamApply {
 public:
  // Starts store.Apply(sequence, info, ...) on a new thread. `store` must
  // outlive this object.
  StreamApply(ReplicaStore& store, uint64_t sequence, PointInfo info, StreamApplyOptions options);
  StreamApply(const StreamApply&) = delete;
  StreamApply& operator=(const StreamApply&) = delete;
  ~StreamApply();  // Cancel(Cancelled) and join

  // Queues one chunk's records, in apply order. Waits while the queue is
  // full, calling `waiting` (when set, without the lock) every heartbeat.
  // Answers the apply's error once it ended without a commit (cancelled,
  // timed out, a record refused by the store, an I/O error);
  // FailedPrecondition after Finish.
  Status Push(std::vector<DeltaRecord> records, const std::function<void()>& waiting = {});
  // No more records: waits until Apply returns and answers its status (OK:
  // the point is committed), calling `waiting` every heartbeat. Idempotent.
  Status Finish(const std::function<void()>& waiting = {});
  // No stream feeds the apply from now on: the idle timeout runs.
  void Detach();
  // A stream feeds it again (a resume): no idle timeout.
  void Attach();
  // Ends the apply with `why` unless its records are complete already
  // (after Finish the commit is not interrupted). Does not wait.
  void Cancel(const Status& why);

  uint64_t sequence() const { return sequence_; }
  bool done() const;
  // The apply's result once done(); nullopt before.
  std::optional<Status> status() const;

 private:
  class QueueSource;
  void Run(PointInfo info);

  ReplicaStore& store_;
  const uint64_t sequence_;
  const StreamApplyOptions options_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::vector<DeltaRecord>> queue_;  // guarded by mu_
  uint64_t queued_bytes_ = 0;                   // guarded by mu_
  bool finished_ = false;                       // guarded by mu_: no more records
  std::optional<Status> cancel_;                // guarded by mu_: why the source fails
  std::optional<Status> result_;                // guarded by mu_: Apply's status once returned
  bool attached_ = true;                        // guarded by mu_: a stream feeds the queue
  std::chrono::steady_clock::time_point detached_at_;  // guarded by mu_
  std::thread thread_;
};

}  // namespace vmreplica
