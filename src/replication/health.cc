#include <string>

#include "vmreplica/replication.h"

namespace vmreplica {

HealthVerdict EvaluateHealth(const RelationshipRecord& rel, const StatisticsRecord& stats, int64_t now_ms,
                             int consecutive_failures) {
  HealthVerdict v;
  auto critical = [&](std::string why) {
    v.health = ReplicationHealth::kCritical;
    v.issues.push_back(std::move(why));
  };
  auto warning = [&](std::string why) {
    if (v.health != ReplicationHealth::kCritical) v.health = ReplicationHealth::kWarning;
    v.issues.push_back(std::move(why));
  };
  v.health = ReplicationHealth::kNormal;
  switch (rel.state) {
    case ReplicationState::kDisabled:
      v.health = ReplicationHealth::kNotApplicable;
      return v;
    case ReplicationState::kCritical:
      critical("replication is failing: the primary cannot send changes to the replica server");
      break;
    case ReplicationState::kWaitingForStartResynchronize:
      critical("resynchronization required: nothing replicates until it runs");
      break;
    case ReplicationState::kReadyForReplication:
    case ReplicationState::kWaitingToCompleteInitialReplication:
      warning("initial replication has not completed");
      break;
    case ReplicationState::kSuspended:
      warning("replication is suspended on the primary");
      break;
    case ReplicationState::kRecovered:
    case ReplicationState::kCommitted:
      warning("failed over but replication is not reversed");
      break;
    default:
      break;
  }
  if (consecutive_failures > 0 && rel.state != ReplicationState::kCritical) {
    warning(std::to_string(consecutive_failures) + " replication cycle(s) in a row failed; retrying");
  }
  const uint64_t cycles = stats.replication_success_count + stats.replication_miss_count;
  if (cycles > 0 && stats.replication_miss_count * 5 > cycles) {
    warning(std::to_string(stats.replication_miss_count) + " of " + std::to_string(cycles) +
            " replication cycles in this window were missed (more than 20%)");
  }
  const bool replicating =
      rel.state == ReplicationState::kReplicating || rel.state == ReplicationState::kCritical;
  if (replicating && rel.last_replication_ms > 0 && now_ms - rel.last_replication_ms > 3600 * 1000) {
    warning("more than 1 hour since the last replication");
  }
  return v;
}

Result<std::optional<DeltaRecord>> ConcatDeltaSource::Next() {
  while (current_ < parts_.size()) {
    auto r = parts_[current_]->Next();
    if (!r.ok()) return r.status();
    if (r->has_value()) {
      if (observer_) observer_(current_, (*r)->offset + (*r)->length);
      return r;
    }
    parts_[current_].reset();  // done with this disk: free its connection
    ++current_;
  }
  return std::optional<DeltaRecord>();
}

}  // namespace vmreplica
