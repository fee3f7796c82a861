#include <spdlog/spdlog.h>

#include <algorithm>
#include <exception>

#include "jobs/uuid.h"
#include "vmreplica/jobs.h"
#include "vmreplica/model/return_code.h"

namespace vmreplica {
namespace jobs_internal {

// One job known to the engine.
struct JobEntry {
  JobEntry(JobRecord r, JobWork w, uint64_t s)
      : id(r.id), parameters_json(r.parameters_json), seq(s), record(std::move(r)), work(std::move(w)) {}

  // Constant after construction.
  const std::string id;
  const std::string parameters_json;
  const uint64_t seq;  // creation order, to list jobs created in the same ms

  std::atomic<bool> cancel_requested{false};  // user_cancel || shutdown_cancel
  std::mutex persist_mu;                      // serialises this job's catalog writes

  // Guarded by JobEngine::mu_.
  JobRecord record;
  JobWork work;                 // moved out by the worker that runs it
  std::string pending_result;   // SetResult(); becomes result_json on Completed
  bool running = false;         // a worker has taken it
  bool user_cancel = false;     // Cancel() was called
  bool shutdown_cancel = false; // Shutdown() cancelled it
  bool published = false;       // final state persisted; waiters may return
  bool removed = false;         // swept: never written again
};

}  // namespace jobs_internal

using jobs_internal::JobEntry;

namespace {

constexpr uint32_t kFailed = static_cast<uint32_t>(ReturnCode::kFailed);
constexpr int64_t kMaxKeepS = int64_t{100} * 365 * 86400;  // longer means "keep forever"

bool IsFinalState(JobState s) {
  return s == JobState::kCompleted || s == JobState::kTerminated || s == JobState::kKilled ||
         s == JobState::kException;
}

const char* StateName(JobState s) {
  switch (s) {
    case JobState::kNew: return "New";
    case JobState::kStarting: return "Starting";
    case JobState::kRunning: return "Running";
    case JobState::kSuspended: return "Suspended";
    case JobState::kShuttingDown: return "ShuttingDown";
    case JobState::kCompleted: return "Completed";
    case JobState::kTerminated: return "Terminated";
    case JobState::kKilled: return "Killed";
    case JobState::kException: return "Exception";
    case JobState::kService: return "Service";
  }
  return "Unknown";
}

JobEngineOptions Sanitize(JobEngineOptions o) {
  o.worker_threads = std::clamp(o.worker_threads, 1, 64);
  o.sweep_interval = std::max(o.sweep_interval, std::chrono::milliseconds(10));
  o.time_before_removal = std::max(o.time_before_removal, std::chrono::seconds(0));
  return o;
}

}  // namespace

// --- JobContext --------------------------------------------------------------

JobContext::JobContext(JobEngine* engine, std::shared_ptr<JobEntry> entry)
    : engine_(engine), entry_(std::move(entry)) {}

void JobContext::SetProgress(uint32_t percent) { engine_->SetProgress(entry_, percent); }

bool JobContext::CancelRequested() const { return entry_->cancel_requested.load(); }

const std::string& JobContext::id() const { return entry_->id; }

const std::string& JobContext::parameters_json() const { return entry_->parameters_json; }

void JobContext::SetResult(std::string json) {
  std::lock_guard lock(engine_->mu_);
  entry_->pending_result = std::move(json);
}

// --- JobEngine ---------------------------------------------------------------

JobEngine::JobEngine(Catalog* catalog, JobEngineOptions options)
    : catalog_(catalog), options_(Sanitize(std::move(options))) {
  for (int i = 0; i < options_.worker_threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
  sweeper_ = std::thread([this] { SweeperLoop(); });
}

JobEngine::~JobEngine() { Shutdown(); }

int64_t JobEngine::NowMs() const {
  if (options_.clock_ms) return options_.clock_ms();
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Status JobEngine::Recover(const std::function<std::optional<JobWork>(const JobRecord&)>& resumer) {
  {
    std::lock_guard lock(mu_);
    if (recovered_) return Status::FailedPrecondition("job engine: Recover() was called already");
    if (stopping_) return Status::Unavailable("job engine is shut down");
    recovered_ = true;
  }
  Result<std::vector<JobRecord>> records = catalog_->ListJobs();
  if (!records.ok()) {
    std::lock_guard lock(mu_);
    recovered_ = false;
    return records.status().WithContext("job engine: cannot load jobs");
  }
  int resumed = 0, failed = 0, kept = 0;
  for (JobRecord& r : *records) {
    {
      std::lock_guard lock(mu_);
      if (jobs_.count(r.id) != 0) continue;  // started by this engine already
    }
    if (IsFinalState(r.state)) {
      std::lock_guard lock(mu_);
      auto e = std::make_shared<JobEntry>(std::move(r), nullptr, start_seq_++);
      e->published = true;
      jobs_.emplace(e->id, e);
      ++kept;
      continue;
    }

    const JobState was = r.state;
    std::optional<JobWork> work;
    std::string resumer_error;
    if (resumer) {
      try {
        work = resumer(r);
      } catch (const std::exception& ex) {
        resumer_error = ex.what();
      } catch (...) {
        resumer_error = "unknown exception";
      }
    }
    if (work && *work) {
      std::lock_guard lock(mu_);
      if (stopping_) break;  // left as it is in the catalog for the next start
      r.error_code = 0;
      r.error_description.clear();
      r.finished_ms = 0;
      auto e = std::make_shared<JobEntry>(std::move(r), std::move(*work), start_seq_++);
      if (was == JobState::kShuttingDown) {
        e->user_cancel = true;
        e->cancel_requested = true;
      }
      jobs_.emplace(e->id, e);
      queue_.push_back(e);
      work_cv_.notify_one();
      spdlog::info("job {} (type {}): resumed after a restart (was {})", e->id, Number(e->record.type),
                   StateName(was));
      ++resumed;
      continue;
    }

    std::shared_ptr<JobEntry> e;
    {
      std::lock_guard lock(mu_);
      e = std::make_shared<JobEntry>(std::move(r), nullptr, start_seq_++);
      std::string why = std::string("vmreplicad stopped while this job was ") + StateName(was) + "; it was not resumed";
      if (!resumer_error.empty()) {
        why += " (internal error while resuming: " + resumer_error + ")";
      } else if (!e->record.resumable) {
        why += " (this kind of job cannot be resumed)";
      }
      if (was == JobState::kShuttingDown) {
        FinishLocked(*e, JobState::kTerminated, kFailed, "cancelled: " + why);
      } else {
        FinishLocked(*e, JobState::kException, kFailed, "interrupted: " + why);
      }
      jobs_.emplace(e->id, e);
      spdlog::warn("job {} (type {}): {}", e->id, Number(e->record.type), e->record.error_description);
    }
    Persist(e);
    Publish(e);
    ++failed;
  }
  spdlog::info("job engine: recovered {} jobs ({} resumed, {} interrupted, {} finished)", resumed + failed + kept,
               resumed, failed, kept);
  return Status::Ok();
}

Result<JobRecord> JobEngine::Start(JobType type, std::string target, std::string parameters_json, bool cancellable,
                                   bool resumable, JobWork work) {
  if (!work) return Status::InvalidArgument("job engine: Start() without work");
  {
    std::lock_guard lock(mu_);
    if (stopping_) return Status::Unavailable("vmreplicad is shutting down; no new jobs are accepted");
  }
  VMR_ASSIGN_OR_RETURN(std::string id, jobs_internal::NewUuidV4());
  JobRecord r;
  r.id = std::move(id);
  r.type = type;
  r.state = JobState::kNew;
  r.cancellable = cancellable;
  r.resumable = resumable;
  r.target = std::move(target);
  r.parameters_json = std::move(parameters_json);
  r.created_ms = NowMs();
  r.time_before_removal_s = options_.time_before_removal.count();
  VMR_RETURN_IF_ERROR(catalog_->PutJob(r).WithContext("job engine: cannot record the new job"));

  std::unique_lock lock(mu_);
  if (stopping_) {
    // Shutdown began meanwhile: the job never existed for the caller.
    lock.unlock();
    catalog_->DeleteJob(r.id).IgnoreError();
    return Status::Unavailable("vmreplicad is shutting down; no new jobs are accepted");
  }
  auto e = std::make_shared<JobEntry>(r, std::move(work), start_seq_++);
  jobs_.emplace(e->id, e);
  queue_.push_back(e);
  work_cv_.notify_one();
  spdlog::info("job {} (type {}, {}): queued", r.id, Number(type), r.target);
  return r;
}

Result<JobRecord> JobEngine::Get(const std::string& id) {
  std::lock_guard lock(mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return Status::NotFound("job " + id + " does not exist");
  return it->second->record;
}

Result<std::vector<JobRecord>> JobEngine::List() {
  std::vector<std::shared_ptr<JobEntry>> entries;
  std::vector<JobRecord> out;
  std::lock_guard lock(mu_);
  for (const auto& [id, e] : jobs_) entries.push_back(e);
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) {
    if (a->record.created_ms != b->record.created_ms) return a->record.created_ms < b->record.created_ms;
    return a->seq < b->seq;
  });
  out.reserve(entries.size());
  for (const auto& e : entries) out.push_back(e->record);
  return out;
}

Result<JobRecord> JobEngine::Wait(const std::string& id, std::chrono::milliseconds timeout) {
  // Keeps steady_clock::now() + timeout from overflowing.
  timeout = std::clamp(timeout, std::chrono::milliseconds(0),
                       std::chrono::milliseconds(std::chrono::hours(24 * 365)));
  std::unique_lock lock(mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return Status::NotFound("job " + id + " does not exist");
  std::shared_ptr<JobEntry> e = it->second;
  done_cv_.wait_for(lock, timeout, [&] { return e->published || stopped_; });
  return e->record;
}

Status JobEngine::Cancel(const std::string& id) {
  std::shared_ptr<JobEntry> e;
  bool ended_now = false;
  {
    std::lock_guard lock(mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return Status::NotFound("job " + id + " does not exist");
    e = it->second;
    JobRecord& r = e->record;
    if (IsFinalState(r.state)) {
      return Status::FailedPrecondition("job " + id + " has already ended (" + StateName(r.state) + ")");
    }
    if (!r.cancellable) {
      return Status::FailedPrecondition("job " + id + " (type " + std::to_string(Number(r.type)) +
                                        ") cannot be cancelled");
    }
    e->user_cancel = true;
    e->cancel_requested = true;
    if (!e->running) {
      queue_.erase(std::remove(queue_.begin(), queue_.end(), e), queue_.end());
      FinishLocked(*e, JobState::kTerminated, kFailed, "cancelled on request before it started");
      ended_now = true;
    } else {
      r.state = JobState::kShuttingDown;
    }
  }
  spdlog::info("job {}: cancel requested{}", id, ended_now ? "; ended before it started" : "");
  Persist(e);
  if (ended_now) Publish(e);
  return Status::Ok();
}

void JobEngine::Shutdown() {
  std::lock_guard shutdown_lock(shutdown_mu_);
  std::vector<std::shared_ptr<JobEntry>> ended;
  {
    std::lock_guard lock(mu_);
    if (stopped_) return;
    stopping_ = true;
    for (const auto& e : queue_) {
      if (e->record.resumable) continue;  // stays non-final in the catalog for Recover()
      FinishLocked(*e, JobState::kTerminated, kFailed, "not started: vmreplicad shut down before the job ran");
      ended.push_back(e);
    }
    queue_.clear();
    for (const auto& [id, e] : jobs_) {
      if (e->running && e->record.cancellable) {
        e->shutdown_cancel = true;
        e->cancel_requested = true;
      }
    }
  }
  work_cv_.notify_all();
  sweep_cv_.notify_all();
  for (const auto& e : ended) {
    Persist(e);
    Publish(e);
  }
  for (std::thread& t : workers_) {
    if (t.joinable()) t.join();
  }
  if (sweeper_.joinable()) sweeper_.join();
  {
    std::lock_guard lock(mu_);
    stopped_ = true;
  }
  done_cv_.notify_all();
  spdlog::info("job engine: shut down");
}

void JobEngine::WorkerLoop() {
  while (true) {
    std::shared_ptr<JobEntry> e;
    JobWork work;
    {
      std::unique_lock lock(mu_);
      work_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;  // Shutdown() disposes of the queue
      e = queue_.front();
      queue_.pop_front();
      e->running = true;
      e->record.state = JobState::kStarting;
      work = std::move(e->work);
      e->work = nullptr;
    }
    Persist(e);
    Run(e, std::move(work));
  }
}

void JobEngine::Run(const std::shared_ptr<JobEntry>& e, JobWork work) {
  {
    std::lock_guard lock(mu_);
    e->record.state = e->cancel_requested ? JobState::kShuttingDown : JobState::kRunning;
    e->record.started_ms = NowMs();
  }
  Persist(e);
  spdlog::info("job {} (type {}): running", e->id, Number(e->record.type));

  JobContext ctx(this, e);
  Status st;
  try {
    st = work(ctx);
  } catch (const std::exception& ex) {
    st = Status::Internal(std::string("internal error: ") + ex.what());
  } catch (...) {
    st = Status::Internal("internal error: unknown exception");
  }
  work = nullptr;  // release what the work captured before the job is reported done

  std::string outcome;
  {
    std::lock_guard lock(mu_);
    e->running = false;
    if (st.ok()) {
      e->record.percent_complete = 100;
      e->record.result_json = std::move(e->pending_result);
      FinishLocked(*e, JobState::kCompleted, 0, "");
    } else if (e->cancel_requested && e->shutdown_cancel && !e->user_cancel && e->record.resumable) {
      // Interrupted by Shutdown(): leave the catalog record non-final so the
      // next daemon resumes it, exactly as after a crash.
      spdlog::info("job {}: interrupted by shutdown; left for resumption ({})", e->id, st.ToString());
      return;
    } else if (e->cancel_requested) {
      std::string why = e->user_cancel ? "cancelled on request" : "cancelled: vmreplicad is shutting down";
      if (!st.message().empty()) why += ": " + st.message();
      FinishLocked(*e, JobState::kTerminated, kFailed, std::move(why));
    } else {
      FinishLocked(*e, JobState::kException, static_cast<uint32_t>(ToReturnCode(st)),
                   st.message().empty() ? CodeName(st.code()) : st.message());
    }
    outcome = StateName(e->record.state);
    if (!st.ok()) outcome += " (" + std::to_string(e->record.error_code) + "): " + e->record.error_description;
  }
  if (st.ok()) {
    spdlog::info("job {}: {}", e->id, outcome);
  } else {
    spdlog::warn("job {}: {}", e->id, outcome);
  }
  Persist(e);
  Publish(e);
}

void JobEngine::FinishLocked(JobEntry& e, JobState state, uint32_t error_code, std::string description) {
  e.record.state = state;
  e.record.error_code = error_code;
  e.record.error_description = std::move(description);
  e.record.finished_ms = NowMs();
}

void JobEngine::SetProgress(const std::shared_ptr<JobEntry>& e, uint32_t percent) {
  percent = std::min(percent, 100u);
  {
    std::lock_guard lock(mu_);
    if (IsFinalState(e->record.state) || percent <= e->record.percent_complete) return;
    e->record.percent_complete = percent;
  }
  Persist(e);
}

void JobEngine::Persist(const std::shared_ptr<JobEntry>& e) {
  std::lock_guard persist_lock(e->persist_mu);
  JobRecord snapshot;
  {
    std::lock_guard lock(mu_);
    if (e->removed) return;
    snapshot = e->record;
  }
  Status s = catalog_->PutJob(snapshot);
  if (!s.ok()) spdlog::error("job {}: cannot record state {}: {}", e->id, StateName(snapshot.state), s.ToString());
}

void JobEngine::Publish(const std::shared_ptr<JobEntry>& e) {
  {
    std::lock_guard lock(mu_);
    e->published = true;
  }
  done_cv_.notify_all();
}

void JobEngine::SweeperLoop() {
  std::unique_lock lock(mu_);
  while (!stopping_) {
    sweep_cv_.wait_for(lock, options_.sweep_interval, [&] { return stopping_; });
    if (stopping_) break;
    lock.unlock();
    Sweep();
    lock.lock();
  }
}

void JobEngine::Sweep() {
  const int64_t now = NowMs();
  std::vector<std::shared_ptr<JobEntry>> expired;
  {
    std::lock_guard lock(mu_);
    for (const auto& [id, e] : jobs_) {
      const JobRecord& r = e->record;
      if (!e->published || !IsFinalState(r.state)) continue;
      // now - finished >= keep, written so that no value read back from the
      // catalog can overflow.
      const int64_t keep_ms = r.time_before_removal_s > kMaxKeepS ? kMaxKeepS * 1000 : r.time_before_removal_s * 1000;
      if (r.finished_ms < 0 || (r.finished_ms <= now && now - r.finished_ms >= keep_ms)) {
        expired.push_back(e);
      }
    }
  }
  for (const auto& e : expired) {
    std::lock_guard persist_lock(e->persist_mu);
    {
      std::lock_guard lock(mu_);
      e->removed = true;
      jobs_.erase(e->id);
    }
    Status s = catalog_->DeleteJob(e->id);
    if (!s.ok() && s.code() != Code::kNotFound) {
      spdlog::error("job {}: cannot remove the finished job: {}", e->id, s.ToString());
    } else {
      spdlog::debug("job {}: removed {} s after it ended", e->id, e->record.time_before_removal_s);
    }
  }
}

}  // namespace vmreplica
