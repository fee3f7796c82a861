// The job engine: CIM_ConcreteJob semantics for every long method of the
// replication service. A method checks its parameters, calls
// JobEngine::Start() with the work to do and answers 4096 (JobStarted) with
// the returned record; the work then runs on the engine's worker threads.
//
// Job states (WMI JobState numbers) and who moves them:
//
//            Start()          worker picks it up     work begins
//   (none) ----------> New ---------------------> Starting ---> Running
//                       |                                        |  |
//          Cancel()     |          work returns OK               |  | Cancel()
//          while queued |   Completed <--------------------------+  v
//                       v          work returns an error     ShuttingDown
//                  Terminated  Exception <-------------------+      |
//                       ^                                           |
//                       +----- work returns an error after Cancel --+
//
// Completed: error_code 0, percent 100, result_json set by the work.
// Exception: error_code = ToReturnCode(status) number, error_description =
//   the status message ("internal error: ..." when the work threw).
// Terminated: error_code 32768 (Failed), error_description says it was
//   cancelled. A work that returns OK despite a cancel request is Completed.
//
// Persistence: every state change, and every progress change, is written to
// the catalog before the engine reports it to waiters, so a job answered to
// a client is never lost by a crash. A final job stays visible (memory and
// catalog) for time_before_removal_s after finished_ms, then the sweeper
// deletes it from both.
//
// Restart: jobs that a previous daemon left non-final are handled by
// Recover(): resumed (same id) or ended as Exception with the reason.
// Shutdown() cancels cancellable running jobs; a resumable job interrupted
// that way is left non-final in the catalog (as after a crash) so that the
// next daemon's Recover() can resume it.
//
// Thread safety: every JobEngine method may be called from any thread. The
// work functions run on worker threads, never while engine locks are held;
// they may call the engine (Get, Start...) but must not Wait() for a job
// that needs a free worker when all workers are busy.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "vmreplica/catalog.h"
#include "vmreplica/job.h"
#include "vmreplica/status.h"

namespace vmreplica {

class JobEngine;
namespace jobs_internal {
struct JobEntry;
}

// What a running work function sees of its job. Valid only during the call
// of the work function it was passed to; methods are thread-safe.
class JobContext {
 public:
  // Reports progress, 0..100 (larger values are taken as 100). Monotonic: a
  // value below the current percentage is ignored. Persisted.
  void SetProgress(uint32_t percent);
  // True once Cancel() was called on this job, or the engine is shutting
  // down and the job is cancellable. The work should then stop soon and
  // return Status::Cancelled(...).
  bool CancelRequested() const;
  const std::string& id() const;
  const std::string& parameters_json() const;
  // The method's outputs (JSON); stored in result_json when the job ends
  // Completed.
  void SetResult(std::string json);

 private:
  friend class JobEngine;
  JobContext(JobEngine* engine, std::shared_ptr<jobs_internal::JobEntry> entry);

  JobEngine* const engine_;
  const std::shared_ptr<jobs_internal::JobEntry> entry_;
};

// The work of a job. Returns OK on success. Exceptions are caught and end
// the job as Exception ("internal error: ...").
using JobWork = std::function<Status(JobContext&)>;

// Tunables.
struct JobEngineOptions {
  // Jobs that run at the same time; 1..64 (out-of-range values are clamped).
  int worker_threads = 4;
  // How often finished jobs are checked for removal; at least 10 ms.
  std::chrono::milliseconds sweep_interval = std::chrono::seconds(30);
  // TimeBeforeRemoval given to new jobs (CIM default: 5 minutes); >= 0.
  std::chrono::seconds time_before_removal = std::chrono::minutes(5);
  // Wall clock in Unix epoch milliseconds (a seam for tests); null = system clock.
  std::function<int64_t()> clock_ms;
};

class JobEngine {
 public:
  // `catalog` is not owned and must outlive the engine. Starts the worker
  // and sweeper threads at once.
  JobEngine(Catalog* catalog, JobEngineOptions options);
  JobEngine(const JobEngine&) = delete;
  JobEngine& operator=(const JobEngine&) = delete;
  ~JobEngine();  // Shutdown()

  // Called once at daemon start, before the first Start(). Loads every job
  // of the catalog. Each job in a non-final state (New, Starting, Running,
  // Suspended, ShuttingDown, Service) was interrupted by a restart:
  // `resumer(record)` may return a JobWork, and the job then runs again
  // with the same id (its work sees CancelRequested() if it was being
  // cancelled). Otherwise the job ends as Exception, error_code 32768,
  // with a description saying it was interrupted and in which state (a job
  // that was ShuttingDown ends as Terminated instead). The resumer is
  // called without engine locks held; a resumer that throws counts as "not
  // resumed". A second successful call is FailedPrecondition; a catalog
  // read error is returned as is (nothing is loaded; Recover may be retried).
  Status Recover(const std::function<std::optional<JobWork>(const JobRecord&)>& resumer);

  // Creates a job, persists it (state New) and queues it; returns its
  // record. Errors: the catalog write failed (the job does not exist);
  // Unavailable after Shutdown().
  Result<JobRecord> Start(JobType type, std::string target, std::string parameters_json, bool cancellable,
                          bool resumable, JobWork work);

  // NotFound for an id the engine does not know (never created, removed, or
  // from the catalog before Recover()).
  Result<JobRecord> Get(const std::string& id);
  // Every known job, oldest first.
  Result<std::vector<JobRecord>> List();

  // Blocks until the job is final (and persisted) or `timeout` passes, then
  // returns its current record either way. Also returns early when the
  // engine shuts down. NotFound for an unknown id.
  Result<JobRecord> Wait(const std::string& id, std::chrono::milliseconds timeout);

  // Requests cancellation. A queued job ends Terminated at once; a running
  // one goes to ShuttingDown and its work sees CancelRequested(). Errors:
  // NotFound (unknown id), FailedPrecondition (not cancellable, or already
  // final). Cancelling a job twice is OK.
  Status Cancel(const std::string& id);

  // Stops taking jobs, cancels cancellable running jobs, waits for all
  // running work to return, stops the threads. Queued jobs do not start: a
  // resumable one stays New in the catalog (for Recover), the others end
  // Terminated. Idempotent; safe to call from several threads.
  void Shutdown();

 private:
  friend class JobContext;
  using EntryPtr = std::shared_ptr<jobs_internal::JobEntry>;

  int64_t NowMs() const;
  void WorkerLoop();
  void SweeperLoop();
  // Runs one job's work on the calling worker thread and records the outcome.
  void Run(const EntryPtr& e, JobWork work);
  // Writes the entry's current record to the catalog (serialised per job, so
  // the newest snapshot wins). Skips removed entries. Logs failures.
  void Persist(const EntryPtr& e);
  // Marks the entry's final state as persisted and wakes waiters.
  void Publish(const EntryPtr& e);
  // Sets a final state on the record; mu_ held.
  void FinishLocked(jobs_internal::JobEntry& e, JobState state, uint32_t error_code, std::string description);
  void Sweep();
  void SetProgress(const EntryPtr& e, uint32_t percent);

  // Constant after construction.
  Catalog* const catalog_;
  const JobEngineOptions options_;

  std::mutex mu_;
  std::condition_variable work_cv_;   // queue_ changed or stopping_
  std::condition_variable done_cv_;   // a job became final, or shutdown finished
  std::condition_variable sweep_cv_;  // stopping_
  // Guarded by mu_.
  std::map<std::string, EntryPtr> jobs_;  // every known job by id
  std::deque<EntryPtr> queue_;            // New jobs waiting for a worker
  bool stopping_ = false;                 // Shutdown() has begun
  bool stopped_ = false;                  // all threads have ended
  bool recovered_ = false;                // Recover() was called
  uint64_t start_seq_ = 0;                // orders jobs created in the same ms

  // Threads; started by the constructor, joined by the first Shutdown().
  std::mutex shutdown_mu_;  // serialises Shutdown()
  std::vector<std::thread> workers_;
  std::thread sweeper_;
};

}  // namespace vmreplica
