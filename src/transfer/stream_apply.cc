// StreamApply: see stream_apply.h and docs/protocol.md "Replica side:
// applying".
#include "stream_apply.h"

#include <utility>

namespace vmreplica {

namespace {

// What a queued chunk costs against max_queued_bytes: its payloads, the
// records themselves (a zero record has no payload but takes memory) and
// the chunk (an empty one is not free either).
uint64_t Cost(const std::vector<DeltaRecord>& records) {
  uint64_t n = sizeof(std::vector<DeltaRecord>);
  for (const auto& r : records) n += r.data.size() + sizeof(DeltaRecord);
  return n;
}

}  // namespace

// Hands the queued records to Apply, one at a time, in order.
class StreamApply::QueueSource final : public DeltaSource {
 public:
  explicit QueueSource(StreamApply& owner) : owner_(owner) {}

  Result<std::optional<DeltaRecord>> Next() override {
    while (pos_ >= current_.size()) {  // chunks without records are skipped
      current_.clear();
      pos_ = 0;
      StreamApply& o = owner_;
      std::unique_lock<std::mutex> l(o.mu_);
      for (;;) {
        if (o.cancel_) return *o.cancel_;
        if (!o.queue_.empty() || o.finished_) break;
        if (o.attached_) {
          o.cv_.wait(l);
          continue;
        }
        const auto deadline = o.detached_at_ + o.options_.idle_timeout;
        if (std::chrono::steady_clock::now() >= deadline) {
          o.cancel_ = Status::Unavailable("no stream for " + std::to_string(o.options_.idle_timeout.count()) +
                                          " ms: the apply of log " + std::to_string(o.sequence_) + " gave up");
          o.cv_.notify_all();
          return *o.cancel_;
        }
        o.cv_.wait_until(l, deadline);
      }
      if (o.queue_.empty()) return std::optional<DeltaRecord>();  // finished: the log is complete
      current_ = std::move(o.queue_.front());
      o.queue_.pop_front();
      o.queued_bytes_ -= Cost(current_);
      o.cv_.notify_all();  // room for the receiver
    }
    return std::optional<DeltaRecord>(std::move(current_[pos_++]));
  }

 private:
  StreamApply& owner_;
  std::vector<DeltaRecord> current_;  // the chunk being handed out
  size_t pos_ = 0;
};

StreamApply::StreamApply(ReplicaStore& store, uint64_t sequence, PointInfo info, StreamApplyOptions options)
    : store_(store), sequence_(sequence), options_(std::move(options)) {
  thread_ = std::thread([this, info = std::move(info)]() mutable { Run(std::move(info)); });
}

StreamApply::~StreamApply() {
  Cancel(Status::Cancelled("the apply of log " + std::to_string(sequence_) + " was abandoned"));
  if (thread_.joinable()) thread_.join();
}

void StreamApply::Run(PointInfo info) {
  QueueSource source(*this);
  Status s = store_.Apply(sequence_, info, source);
  {
    std::lock_guard<std::mutex> l(mu_);
    result_ = s;
    queue_.clear();  // nobody reads them any more
    queued_bytes_ = 0;
    cv_.notify_all();
  }
  if (options_.on_done) options_.on_done();
}

Status StreamApply::Push(std::vector<DeltaRecord> records, const std::function<void()>& waiting) {
  const uint64_t cost = Cost(records);
  std::unique_lock<std::mutex> l(mu_);
  if (finished_) return Status::FailedPrecondition("log " + std::to_string(sequence_) + " is finished already");
  auto admitted = [&] {
    return cancel_ || result_ || queue_.empty() || queued_bytes_ + cost <= options_.max_queued_bytes;
  };
  while (!cv_.wait_for(l, options_.heartbeat, admitted)) {
    if (waiting) {
      l.unlock();
      waiting();
      l.lock();
    }
  }
  if (result_) {
    if (!result_->ok()) return *result_;
    return Status::FailedPrecondition("log " + std::to_string(sequence_) + " was committed already");
  }
  if (cancel_) return *cancel_;
  queued_bytes_ += cost;
  queue_.push_back(std::move(records));
  cv_.notify_all();
  return Status::Ok();
}

Status StreamApply::Finish(const std::function<void()>& waiting) {
  std::unique_lock<std::mutex> l(mu_);
  finished_ = true;  // a cancel that came first still wins: the source checks it first
  cv_.notify_all();
  while (!cv_.wait_for(l, options_.heartbeat, [&] { return result_.has_value(); })) {
    if (waiting) {
      l.unlock();
      waiting();
      l.lock();
    }
  }
  return *result_;
}

void StreamApply::Detach() {
  std::lock_guard<std::mutex> l(mu_);
  attached_ = false;
  detached_at_ = std::chrono::steady_clock::now();
  cv_.notify_all();
}

void StreamApply::Attach() {
  std::lock_guard<std::mutex> l(mu_);
  attached_ = true;
  cv_.notify_all();
}

void StreamApply::Cancel(const Status& why) {
  std::lock_guard<std::mutex> l(mu_);
  if (result_ || cancel_) return;
  // Once every record is queued the source no longer waits: the commit is
  // not interrupted (Apply answers OK or its own error).
  if (finished_) return;
  cancel_ = why;
  cv_.notify_all();
}

bool StreamApply::done() const {
  std::lock_guard<std::mutex> l(mu_);
  return result_.has_value();
}

std::optional<Status> StreamApply::status() const {
  std::lock_guard<std::mutex> l(mu_);
  return result_;
}

}  // namespace vmreplica
