// Time-of-day rules of the replication engine: the statistics window
// (MonitoringInterval / MonitoringStartTime) and the bandwidth schedule.
// Both read local time, as the reference's settings are local times.
#include <algorithm>
#include <ctime>
#include <string>

#include "vmreplica/replication.h"

namespace vmreplica {
namespace {

int64_t FloorDiv(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

}  // namespace

int64_t StatisticsWindowStart(const ServerSettings& server, int64_t now_ms) {
  const int64_t interval_s = int64_t{std::max<uint32_t>(server.monitoring_interval_s, 60)};
  const int64_t anchor_s = int64_t{server.monitoring_start_time_min % 1440} * 60;
  // Work on the wall clock: the local date and time of now read as if they
  // were UTC (a timeline without daylight-saving jumps). Boundaries are the
  // wall times with (t - anchor) a multiple of the interval: 12 h from 09:00
  // gives 09:00 and 21:00 every day, whatever the season; 7 days one fixed
  // weekday. The boundary's wall time is then turned back into UTC by
  // mktime, which knows the offset in force at that time.
  const std::time_t now_s = static_cast<std::time_t>(FloorDiv(now_ms, 1000));
  std::tm local{};
  if (localtime_r(&now_s, &local) == nullptr) return now_ms;
  const int64_t wall_s = static_cast<int64_t>(timegm(&local));
  const int64_t boundary_wall = FloorDiv(wall_s - anchor_s, interval_s) * interval_s + anchor_s;
  std::time_t bw = static_cast<std::time_t>(boundary_wall);
  std::tm b{};
  if (gmtime_r(&bw, &b) == nullptr) return now_ms;
  b.tm_isdst = -1;  // whichever offset is in force then
  int64_t boundary_ms = static_cast<int64_t>(mktime(&b)) * 1000;
  if (boundary_ms > now_ms) boundary_ms = now_ms;  // a wall time skipped by a change: start now
  return boundary_ms;
}

bool RollStatisticsWindow(StatisticsRecord& s, const ServerSettings& server, int64_t now_ms) {
  const int64_t boundary = StatisticsWindowStart(server, now_ms);
  if (s.start_ms == 0) {
    s.start_ms = now_ms;
    return false;
  }
  if (s.start_ms >= boundary) return false;
  // The window ended at `boundary`: a new one starts there. What describes
  // the relationship rather than the window stays.
  StatisticsRecord fresh;
  fresh.vm_id = s.vm_id;
  fresh.index = s.index;
  fresh.start_ms = boundary;
  fresh.replication_health = s.replication_health;
  fresh.health_issues = s.health_issues;
  fresh.last_test_failover_ms = s.last_test_failover_ms;
  fresh.initial_replication_size_bytes = s.initial_replication_size_bytes;
  fresh.pending_replication_size_bytes = s.pending_replication_size_bytes;
  s = std::move(fresh);
  return true;
}

Result<uint32_t> ParseTimeOfDay(const std::string& text) {
  auto bad = [&] { return Status::InvalidArgument("\"" + text + "\" is not a time of day HH:MM (00:00 .. 23:59)"); };
  if (text.size() != 5 || text[2] != ':') return bad();
  for (int i : {0, 1, 3, 4}) {
    if (text[i] < '0' || text[i] > '9') return bad();
  }
  const uint32_t h = (text[0] - '0') * 10 + (text[1] - '0');
  const uint32_t m = (text[3] - '0') * 10 + (text[4] - '0');
  if (h > 23 || m > 59) return bad();
  return h * 60 + m;
}

bool InTimeWindow(uint32_t start_min, uint32_t end_min, uint8_t days_mask, int64_t now_ms) {
  std::time_t t = static_cast<std::time_t>(FloorDiv(now_ms, 1000));
  std::tm tm{};
  if (localtime_r(&t, &tm) == nullptr) return false;
  const uint32_t minute = static_cast<uint32_t>(tm.tm_hour * 60 + tm.tm_min);
  const int today = tm.tm_wday;  // 0 = Sunday
  const int yesterday = (today + 6) % 7;
  if (start_min == end_min) return (days_mask >> today) & 1;  // the whole day
  if (start_min < end_min) return ((days_mask >> today) & 1) && minute >= start_min && minute < end_min;
  // Wraps past midnight: the part after midnight belongs to the day it started.
  return (((days_mask >> today) & 1) && minute >= start_min) || (((days_mask >> yesterday) & 1) && minute < end_min);
}

uint64_t BandwidthLimitAt(const std::vector<BandwidthWindow>& schedule, uint64_t default_bytes_per_s,
                          int64_t now_ms) {
  for (const auto& w : schedule) {
    if (InTimeWindow(w.start_min, w.end_min, w.days_mask, now_ms)) return w.bytes_per_s;
  }
  return default_bytes_per_s;
}

void ApplyReplicaSideHealth(HealthVerdict& v, ReplicationState replica_state) {
  switch (replica_state) {
    case ReplicationState::kSuspended:
      v.health = ReplicationHealth::kCritical;
      v.issues.push_back("replication is paused on the replica server");
      break;
    case ReplicationState::kWaitingForStartResynchronize:
      v.health = ReplicationHealth::kCritical;
      v.issues.push_back("the replica server requires a resynchronization");
      break;
    default:
      break;
  }
}

}  // namespace vmreplica
