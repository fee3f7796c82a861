#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <future>
#include <regex>
#include <set>
#include <stdexcept>
#include <thread>

#include "vmreplica/jobs.h"

namespace vmreplica {
namespace {

using namespace std::chrono_literals;

constexpr auto kLongWait = 10s;  // generous bound for things that should be quick

// A gate that work functions block on until the test opens it.
class Gate {
 public:
  Gate() : future_(promise_.get_future().share()) {}
  void Open() { promise_.set_value(); }
  void WaitOpen() const { future_.wait(); }

 private:
  std::promise<void> promise_;
  std::shared_future<void> future_;
};

JobEngineOptions Workers(int n) {
  JobEngineOptions o;
  o.worker_threads = n;
  return o;
}

class JobEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmr-jobs-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    OpenCatalog();
  }
  void TearDown() override {
    engine_.reset();
    catalog_.reset();
    std::filesystem::remove_all(dir_);
  }
  void OpenCatalog() {
    auto c = Catalog::Open(dir_ + "/catalog.db");
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    catalog_ = std::move(c).value();
  }
  void NewEngine(JobEngineOptions o = {}) {
    engine_.reset();
    engine_ = std::make_unique<JobEngine>(catalog_.get(), std::move(o));
  }
  JobRecord StartOk(JobWork work, bool cancellable = true, bool resumable = false,
                    JobType type = JobType::kStateChange) {
    auto r = engine_->Start(type, "vm-under-test", R"({"p":1})", cancellable, resumable, std::move(work));
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : JobRecord{};
  }
  JobRecord WaitFinal(const std::string& id) {
    auto r = engine_->Wait(id, kLongWait);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : JobRecord{};
  }
  // Polls until the engine reports `state` for the job.
  bool WaitForState(const std::string& id, JobState state) {
    auto deadline = std::chrono::steady_clock::now() + kLongWait;
    while (std::chrono::steady_clock::now() < deadline) {
      auto r = engine_->Get(id);
      if (r.ok() && r->state == state) return true;
      std::this_thread::sleep_for(2ms);
    }
    return false;
  }
  JobRecord Stored(const std::string& id) {
    auto r = catalog_->GetJob(id);
    EXPECT_TRUE(r.ok() && r->has_value()) << "job " << id << " not in the catalog";
    return (r.ok() && r->has_value()) ? **r : JobRecord{};
  }
  // A non-final job as a previous daemon would have left it.
  JobRecord PutInterrupted(const std::string& id, JobState state, bool resumable) {
    JobRecord j;
    j.id = id;
    j.type = JobType::kResynchronizing;
    j.state = state;
    j.percent_complete = 37;
    j.cancellable = true;
    j.resumable = resumable;
    j.target = "vm1";
    j.parameters_json = R"({"from":"restart"})";
    j.created_ms = 1000;
    j.started_ms = 1001;
    EXPECT_TRUE(catalog_->PutJob(j).ok());
    return j;
  }

  std::string dir_;
  std::unique_ptr<Catalog> catalog_;
  std::unique_ptr<JobEngine> engine_;
};

TEST_F(JobEngineTest, CompletedJobHasCodeZeroFullProgressAndResult) {
  NewEngine();
  std::string seen_params, seen_id;
  JobRecord started = StartOk([&](JobContext& ctx) {
    seen_params = ctx.parameters_json();
    seen_id = ctx.id();
    ctx.SetProgress(50);
    ctx.SetResult(R"({"out":"ok"})");
    return Status::Ok();
  });
  EXPECT_EQ(started.state, JobState::kNew);
  EXPECT_EQ(started.time_before_removal_s, 300);
  EXPECT_GT(started.created_ms, 0);
  // Persisted as New before Start() returned (or already further along).
  EXPECT_TRUE(catalog_->GetJob(started.id)->has_value());

  JobRecord done = WaitFinal(started.id);
  EXPECT_EQ(done.state, JobState::kCompleted);
  EXPECT_EQ(done.error_code, 0u);
  EXPECT_EQ(done.percent_complete, 100u);
  EXPECT_EQ(done.result_json, R"({"out":"ok"})");
  EXPECT_GE(done.finished_ms, done.started_ms);
  EXPECT_GT(done.started_ms, 0);
  EXPECT_EQ(seen_params, R"({"p":1})");
  EXPECT_EQ(seen_id, started.id);
  JobRecord stored = Stored(started.id);
  EXPECT_EQ(stored.state, JobState::kCompleted);
  EXPECT_EQ(stored.result_json, done.result_json);
}

TEST_F(JobEngineTest, FailedJobIsExceptionWithTheReturnCodeAndMessage) {
  NewEngine();
  JobRecord j = StartOk([](JobContext&) { return Status::FailedPrecondition("VM is in state Suspended"); });
  JobRecord done = WaitFinal(j.id);
  EXPECT_EQ(done.state, JobState::kException);
  EXPECT_EQ(done.error_code, 32775u);
  EXPECT_EQ(done.error_description, "VM is in state Suspended");
  EXPECT_EQ(done.result_json, "");
  EXPECT_EQ(Stored(j.id).state, JobState::kException);
  EXPECT_EQ(Stored(j.id).error_code, 32775u);
}

TEST_F(JobEngineTest, ThrowingWorkEndsAsExceptionAndTheEngineKeepsWorking) {
  NewEngine(Workers(1));
  JobRecord j = StartOk([](JobContext&) -> Status { throw std::runtime_error("boom"); });
  JobRecord done = WaitFinal(j.id);
  EXPECT_EQ(done.state, JobState::kException);
  EXPECT_EQ(done.error_code, 32768u);
  EXPECT_EQ(done.error_description, "internal error: boom");
  JobRecord k = StartOk([](JobContext&) -> Status { throw 42; });
  EXPECT_EQ(WaitFinal(k.id).error_description, "internal error: unknown exception");
  JobRecord ok = StartOk([](JobContext&) { return Status::Ok(); });
  EXPECT_EQ(WaitFinal(ok.id).state, JobState::kCompleted);
}

TEST_F(JobEngineTest, CancelledRunningJobIsTerminated) {
  NewEngine();
  JobRecord j = StartOk([](JobContext& ctx) {
    while (!ctx.CancelRequested()) std::this_thread::sleep_for(1ms);
    return Status::Cancelled("stopped at block 12");
  });
  ASSERT_TRUE(WaitForState(j.id, JobState::kRunning));
  ASSERT_TRUE(engine_->Cancel(j.id).ok());
  EXPECT_TRUE(engine_->Cancel(j.id).ok() || engine_->Get(j.id)->state == JobState::kTerminated);
  JobRecord done = WaitFinal(j.id);
  EXPECT_EQ(done.state, JobState::kTerminated);
  EXPECT_EQ(done.error_code, 32768u);
  EXPECT_NE(done.error_description.find("cancelled on request"), std::string::npos) << done.error_description;
  EXPECT_EQ(Stored(j.id).state, JobState::kTerminated);
  EXPECT_EQ(engine_->Cancel(j.id).code(), Code::kFailedPrecondition);
}

TEST_F(JobEngineTest, CancelledJobThatFinishesAnywayIsCompleted) {
  NewEngine();
  Gate gate;
  JobRecord j = StartOk([&](JobContext&) {
    gate.WaitOpen();
    return Status::Ok();
  });
  ASSERT_TRUE(WaitForState(j.id, JobState::kRunning));
  ASSERT_TRUE(engine_->Cancel(j.id).ok());
  EXPECT_EQ(engine_->Get(j.id)->state, JobState::kShuttingDown);
  EXPECT_EQ(Stored(j.id).state, JobState::kShuttingDown);
  gate.Open();
  EXPECT_EQ(WaitFinal(j.id).state, JobState::kCompleted);
}

TEST_F(JobEngineTest, CancelOfAQueuedJobEndsItBeforeItRuns) {
  NewEngine(Workers(1));
  Gate gate;
  JobRecord blocker = StartOk([&](JobContext&) {
    gate.WaitOpen();
    return Status::Ok();
  });
  std::atomic<bool> ran{false};
  JobRecord queued = StartOk([&](JobContext&) {
    ran = true;
    return Status::Ok();
  });
  ASSERT_TRUE(WaitForState(blocker.id, JobState::kRunning));
  ASSERT_TRUE(engine_->Cancel(queued.id).ok());
  JobRecord done = WaitFinal(queued.id);
  EXPECT_EQ(done.state, JobState::kTerminated);
  gate.Open();
  EXPECT_EQ(WaitFinal(blocker.id).state, JobState::kCompleted);
  EXPECT_FALSE(ran.load());
}

TEST_F(JobEngineTest, CancelIsRefusedForNonCancellableFinishedAndUnknownJobs) {
  NewEngine();
  Gate gate;
  JobRecord j = StartOk(
      [&](JobContext& ctx) {
        gate.WaitOpen();
        return ctx.CancelRequested() ? Status::Internal("saw a cancel") : Status::Ok();
      },
      /*cancellable=*/false);
  Status s = engine_->Cancel(j.id);
  EXPECT_EQ(s.code(), Code::kFailedPrecondition);
  EXPECT_NE(s.message().find("cannot be cancelled"), std::string::npos) << s.message();
  gate.Open();
  EXPECT_EQ(WaitFinal(j.id).state, JobState::kCompleted);
  EXPECT_EQ(engine_->Cancel(j.id).code(), Code::kFailedPrecondition);
  EXPECT_EQ(engine_->Cancel("no-such-job").code(), Code::kNotFound);
  EXPECT_EQ(engine_->Get("no-such-job").status().code(), Code::kNotFound);
  EXPECT_EQ(engine_->Wait("no-such-job", 1ms).status().code(), Code::kNotFound);
}

TEST_F(JobEngineTest, WaitReturnsTheCurrentRecordWhenTheTimeoutPasses) {
  NewEngine();
  Gate gate;
  JobRecord j = StartOk([&](JobContext&) {
    gate.WaitOpen();
    return Status::Ok();
  });
  ASSERT_TRUE(WaitForState(j.id, JobState::kRunning));
  auto t0 = std::chrono::steady_clock::now();
  auto r = engine_->Wait(j.id, 50ms);
  auto waited = std::chrono::steady_clock::now() - t0;
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state, JobState::kRunning);
  EXPECT_GE(waited, 45ms);
  gate.Open();
  EXPECT_EQ(WaitFinal(j.id).state, JobState::kCompleted);
  // An enormous timeout on a finished job returns at once.
  EXPECT_EQ(engine_->Wait(j.id, std::chrono::milliseconds::max())->state, JobState::kCompleted);
}

TEST_F(JobEngineTest, ProgressIsPersistedAndMonotonic) {
  NewEngine();
  Gate reported, finish;
  JobRecord j = StartOk([&](JobContext& ctx) {
    ctx.SetProgress(40);
    ctx.SetProgress(30);  // ignored: progress never goes back
    reported.Open();
    finish.WaitOpen();
    ctx.SetProgress(250);  // clamped to 100
    return Status::Ok();
  });
  reported.WaitOpen();
  EXPECT_EQ(engine_->Get(j.id)->percent_complete, 40u);
  JobRecord stored = Stored(j.id);
  EXPECT_EQ(stored.percent_complete, 40u);
  EXPECT_EQ(stored.state, JobState::kRunning);
  EXPECT_GT(stored.started_ms, 0);
  finish.Open();
  EXPECT_EQ(WaitFinal(j.id).percent_complete, 100u);
}

TEST_F(JobEngineTest, RecoverEndsAnInterruptedJobAsExceptionWithTheReason) {
  PutInterrupted("job-running", JobState::kRunning, /*resumable=*/false);
  PutInterrupted("job-new", JobState::kNew, /*resumable=*/true);
  PutInterrupted("job-stopping", JobState::kShuttingDown, /*resumable=*/true);
  NewEngine();
  std::vector<std::string> offered;
  ASSERT_TRUE(engine_
                  ->Recover([&](const JobRecord& r) -> std::optional<JobWork> {
                    offered.push_back(r.id);
                    return std::nullopt;
                  })
                  .ok());
  EXPECT_EQ(offered.size(), 3u);

  JobRecord running = *engine_->Get("job-running");
  EXPECT_EQ(running.state, JobState::kException);
  EXPECT_EQ(running.error_code, 32768u);
  EXPECT_NE(running.error_description.find("interrupted"), std::string::npos) << running.error_description;
  EXPECT_NE(running.error_description.find("Running"), std::string::npos) << running.error_description;
  EXPECT_NE(running.error_description.find("cannot be resumed"), std::string::npos) << running.error_description;
  EXPECT_GT(running.finished_ms, 0);
  EXPECT_EQ(Stored("job-running").state, JobState::kException);
  EXPECT_EQ(Stored("job-running").error_description, running.error_description);

  JobRecord fresh = *engine_->Get("job-new");
  EXPECT_EQ(fresh.state, JobState::kException);
  EXPECT_NE(fresh.error_description.find("New"), std::string::npos) << fresh.error_description;

  JobRecord stopping = *engine_->Get("job-stopping");
  EXPECT_EQ(stopping.state, JobState::kTerminated);

  EXPECT_EQ(engine_->Recover(nullptr).code(), Code::kFailedPrecondition);
}

TEST_F(JobEngineTest, RecoverResumesAJobWhenTheResumerGivesWork) {
  JobRecord old = PutInterrupted("job-resume", JobState::kRunning, /*resumable=*/true);
  NewEngine();
  std::string resumed_params;
  ASSERT_TRUE(engine_
                  ->Recover([&](const JobRecord& r) -> std::optional<JobWork> {
                    EXPECT_EQ(r.state, JobState::kRunning);
                    EXPECT_EQ(r.percent_complete, 37u);
                    return JobWork([&](JobContext& ctx) {
                      resumed_params = ctx.parameters_json();
                      ctx.SetProgress(90);
                      return Status::Ok();
                    });
                  })
                  .ok());
  JobRecord done = WaitFinal("job-resume");
  EXPECT_EQ(done.state, JobState::kCompleted);
  EXPECT_EQ(done.error_code, 0u);
  EXPECT_EQ(done.created_ms, old.created_ms);
  EXPECT_EQ(done.type, JobType::kResynchronizing);
  EXPECT_EQ(resumed_params, old.parameters_json);
  EXPECT_EQ(Stored("job-resume").state, JobState::kCompleted);
}

TEST_F(JobEngineTest, RecoverLoadsFinishedJobsAndAResumerThatThrowsDoesNotResume) {
  JobRecord finished;
  finished.id = "job-finished";
  finished.state = JobState::kCompleted;
  finished.finished_ms = 1;
  finished.time_before_removal_s = 1000000000;
  ASSERT_TRUE(catalog_->PutJob(finished).ok());
  PutInterrupted("job-throws", JobState::kStarting, /*resumable=*/true);
  NewEngine();
  ASSERT_TRUE(engine_
                  ->Recover([&](const JobRecord&) -> std::optional<JobWork> {
                    throw std::runtime_error("resumer bug");
                  })
                  .ok());
  EXPECT_EQ(engine_->Get("job-finished")->state, JobState::kCompleted);
  JobRecord t = *engine_->Get("job-throws");
  EXPECT_EQ(t.state, JobState::kException);
  EXPECT_NE(t.error_description.find("resumer bug"), std::string::npos) << t.error_description;
  EXPECT_EQ(engine_->List()->size(), 2u);
}

TEST_F(JobEngineTest, FinishedJobsAreRemovedAfterTimeBeforeRemoval) {
  std::atomic<int64_t> now{1'700'000'000'000};
  JobEngineOptions o;
  o.sweep_interval = 10ms;
  o.time_before_removal = 2s;
  o.clock_ms = [&] { return now.load(); };
  NewEngine(std::move(o));
  JobRecord j = StartOk([](JobContext&) { return Status::Ok(); });
  EXPECT_EQ(j.time_before_removal_s, 2);
  JobRecord done = WaitFinal(j.id);
  ASSERT_EQ(done.state, JobState::kCompleted);
  std::this_thread::sleep_for(50ms);  // several sweeps
  EXPECT_TRUE(engine_->Get(j.id).ok());
  now += 1999;
  std::this_thread::sleep_for(50ms);
  EXPECT_TRUE(engine_->Get(j.id).ok());
  now += 1;
  auto deadline = std::chrono::steady_clock::now() + kLongWait;
  while (engine_->Get(j.id).ok() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(2ms);
  EXPECT_EQ(engine_->Get(j.id).status().code(), Code::kNotFound);
  EXPECT_FALSE(catalog_->GetJob(j.id)->has_value());
  EXPECT_TRUE(engine_->List()->empty());
}

TEST_F(JobEngineTest, ShutdownWaitsForInFlightWork) {
  NewEngine();
  std::atomic<bool> finished{false};
  Gate started;
  JobRecord j = StartOk(
      [&](JobContext&) {
        started.Open();
        std::this_thread::sleep_for(200ms);
        finished = true;
        return Status::Ok();
      },
      /*cancellable=*/false);
  started.WaitOpen();
  engine_->Shutdown();
  EXPECT_TRUE(finished.load());
  EXPECT_EQ(Stored(j.id).state, JobState::kCompleted);
  engine_->Shutdown();  // idempotent
  auto late = engine_->Start(JobType::kStateChange, "x", "{}", true, false, [](JobContext&) { return Status::Ok(); });
  EXPECT_EQ(late.status().code(), Code::kUnavailable);
}

TEST_F(JobEngineTest, ShutdownCancelsCancellableJobsAndLeavesResumableOnesForRecover) {
  NewEngine(Workers(2));
  auto until_cancelled = [](JobContext& ctx) {
    while (!ctx.CancelRequested()) std::this_thread::sleep_for(1ms);
    return Status::Cancelled("stopped");
  };
  JobRecord plain = StartOk(until_cancelled, /*cancellable=*/true, /*resumable=*/false);
  JobRecord resumable = StartOk(until_cancelled, /*cancellable=*/true, /*resumable=*/true);
  JobRecord queued = StartOk([](JobContext&) { return Status::Ok(); }, true, /*resumable=*/false);
  ASSERT_TRUE(WaitForState(plain.id, JobState::kRunning));
  ASSERT_TRUE(WaitForState(resumable.id, JobState::kRunning));
  engine_->Shutdown();

  JobRecord p = Stored(plain.id);
  EXPECT_EQ(p.state, JobState::kTerminated);
  EXPECT_NE(p.error_description.find("shutting down"), std::string::npos) << p.error_description;
  EXPECT_EQ(Stored(resumable.id).state, JobState::kRunning);
  EXPECT_EQ(Stored(queued.id).state, JobState::kTerminated);

  // The next daemon resumes the interrupted job under the same id.
  NewEngine();
  std::vector<std::string> offered;
  ASSERT_TRUE(engine_
                  ->Recover([&](const JobRecord& r) -> std::optional<JobWork> {
                    offered.push_back(r.id);
                    return JobWork([](JobContext&) { return Status::Ok(); });
                  })
                  .ok());
  EXPECT_EQ(offered, std::vector<std::string>{resumable.id});
  EXPECT_EQ(WaitFinal(resumable.id).state, JobState::kCompleted);
}

TEST_F(JobEngineTest, JobRecordSurvivesReopeningTheCatalog) {
  NewEngine();
  JobRecord j = StartOk([](JobContext& ctx) {
    ctx.SetResult("[1,2,3]");
    return Status::Ok();
  }, false, false, JobType::kFailover);
  ASSERT_EQ(WaitFinal(j.id).state, JobState::kCompleted);
  engine_.reset();
  catalog_.reset();
  OpenCatalog();
  JobRecord stored = Stored(j.id);
  EXPECT_EQ(stored.state, JobState::kCompleted);
  EXPECT_EQ(stored.type, JobType::kFailover);
  EXPECT_EQ(stored.result_json, "[1,2,3]");
  EXPECT_EQ(stored.target, "vm-under-test");
  NewEngine();
  EXPECT_EQ(engine_->Get(j.id).status().code(), Code::kNotFound);  // not loaded before Recover
  ASSERT_TRUE(engine_->Recover(nullptr).ok());
  EXPECT_EQ(engine_->Get(j.id)->state, JobState::kCompleted);
}

TEST_F(JobEngineTest, IdsAreUniqueRandomUuidsAndManyJobsAllComplete) {
  NewEngine(Workers(4));
  const std::regex uuid_v4("^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$");
  std::set<std::string> ids;
  std::atomic<int> ran{0};
  for (int i = 0; i < 40; ++i) {
    JobRecord j = StartOk([&](JobContext& ctx) {
      ctx.SetProgress(50);
      ++ran;
      return Status::Ok();
    });
    EXPECT_TRUE(std::regex_match(j.id, uuid_v4)) << j.id;
    ids.insert(j.id);
  }
  EXPECT_EQ(ids.size(), 40u);
  for (const std::string& id : ids) EXPECT_EQ(WaitFinal(id).state, JobState::kCompleted);
  EXPECT_EQ(ran.load(), 40);
  auto list = engine_->List();
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->size(), 40u);
  EXPECT_EQ(catalog_->ListJobs()->size(), 40u);
}

}  // namespace
}  // namespace vmreplica
