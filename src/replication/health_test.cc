// EvaluateHealth against the reference's rules (section 5, "Health"), one
// rule a case, each written from the rule's text; and ConcatDeltaSource.
#include <gtest/gtest.h>

#include <cstdlib>
#include <ctime>
#include <optional>

#include "vmreplica/replication.h"

namespace vmreplica {
namespace {

constexpr int64_t kNow = 1'800'000'000'000;

RelationshipRecord Rel(ReplicationState state, int64_t last_ms = kNow - 60'000) {
  RelationshipRecord r;
  r.vm_id = "vm";
  r.state = state;
  r.last_replication_ms = last_ms;
  return r;
}

bool Mentions(const HealthVerdict& v, const std::string& word) {
  for (const auto& i : v.issues) {
    if (i.find(word) != std::string::npos) return true;
  }
  return false;
}

TEST(HealthTest, ReplicatingRecentlyWithoutMissesIsNormal) {
  StatisticsRecord s;
  s.replication_success_count = 10;
  HealthVerdict v = EvaluateHealth(Rel(ReplicationState::kReplicating), s, kNow, 0);
  EXPECT_EQ(v.health, ReplicationHealth::kNormal);
  EXPECT_TRUE(v.issues.empty());
}

TEST(HealthTest, CriticalWhenThePrimaryCannotSend) {
  HealthVerdict v = EvaluateHealth(Rel(ReplicationState::kCritical), {}, kNow, 5);
  EXPECT_EQ(v.health, ReplicationHealth::kCritical);
  EXPECT_TRUE(Mentions(v, "cannot send"));
}

TEST(HealthTest, CriticalWhenResynchronizationIsRequired) {
  HealthVerdict v = EvaluateHealth(Rel(ReplicationState::kWaitingForStartResynchronize), {}, kNow, 0);
  EXPECT_EQ(v.health, ReplicationHealth::kCritical);
  EXPECT_TRUE(Mentions(v, "resynchronization"));
}

TEST(HealthTest, WarningAboveTwentyPercentMissedButNotAtIt) {
  StatisticsRecord s;
  s.replication_success_count = 8;
  s.replication_miss_count = 2;  // exactly 20%: not more than 20%
  EXPECT_EQ(EvaluateHealth(Rel(ReplicationState::kReplicating), s, kNow, 0).health, ReplicationHealth::kNormal);
  s.replication_miss_count = 3;  // 3 of 11: above 20%
  HealthVerdict v = EvaluateHealth(Rel(ReplicationState::kReplicating), s, kNow, 0);
  EXPECT_EQ(v.health, ReplicationHealth::kWarning);
  EXPECT_TRUE(Mentions(v, "missed"));
}

TEST(HealthTest, WarningMoreThanOneHourSinceTheLastReplication) {
  StatisticsRecord s;
  EXPECT_EQ(EvaluateHealth(Rel(ReplicationState::kReplicating, kNow - 3600 * 1000), s, kNow, 0).health,
            ReplicationHealth::kNormal);
  HealthVerdict v = EvaluateHealth(Rel(ReplicationState::kReplicating, kNow - 3600 * 1000 - 1), s, kNow, 0);
  EXPECT_EQ(v.health, ReplicationHealth::kWarning);
  EXPECT_TRUE(Mentions(v, "1 hour"));
}

TEST(HealthTest, WarningInitialNotDoneSuspendedOrFailedOverNotReversed) {
  for (auto st : {ReplicationState::kReadyForReplication, ReplicationState::kWaitingToCompleteInitialReplication,
                  ReplicationState::kSuspended, ReplicationState::kRecovered, ReplicationState::kCommitted}) {
    HealthVerdict v = EvaluateHealth(Rel(st, 0), {}, kNow, 0);
    EXPECT_EQ(v.health, ReplicationHealth::kWarning) << Name(st);
    EXPECT_FALSE(v.issues.empty()) << Name(st);
  }
}

TEST(HealthTest, DisabledIsNotApplicable) {
  EXPECT_EQ(EvaluateHealth(Rel(ReplicationState::kDisabled), {}, kNow, 0).health,
            ReplicationHealth::kNotApplicable);
}

TEST(HealthTest, FailuresBeforeCriticalWarn) {
  HealthVerdict v = EvaluateHealth(Rel(ReplicationState::kReplicating), {}, kNow, 2);
  EXPECT_EQ(v.health, ReplicationHealth::kWarning);
  EXPECT_TRUE(Mentions(v, "failed"));
}

TEST(ConcatDeltaSourceTest, StreamsPartsInOrderAndReportsProgress) {
  std::vector<std::unique_ptr<DeltaSource>> parts;
  parts.push_back(std::make_unique<VectorDeltaSource>(
      std::vector<DeltaRecord>{DataRecord(0, 0, "abcd"), ZeroRecord(0, 4096, 4096)}));
  parts.push_back(std::make_unique<VectorDeltaSource>(std::vector<DeltaRecord>{}));
  parts.push_back(std::make_unique<VectorDeltaSource>(std::vector<DeltaRecord>{DataRecord(2, 8192, "xy")}));
  ConcatDeltaSource c(std::move(parts));
  std::vector<std::pair<size_t, uint64_t>> seen;
  c.set_observer([&](size_t p, uint64_t end) { seen.emplace_back(p, end); });
  std::vector<DeltaRecord> out;
  while (true) {
    auto r = c.Next();
    ASSERT_TRUE(r.ok());
    if (!r->has_value()) break;
    out.push_back(**r);
  }
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out[0].data, "abcd");
  EXPECT_TRUE(out[1].zero);
  EXPECT_EQ(out[2].disk, 2u);
  EXPECT_EQ(seen, (std::vector<std::pair<size_t, uint64_t>>{{0, 4}, {0, 8192}, {2, 8194}}));
  auto again = c.Next();
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->has_value());
}

}  // namespace
}  // namespace vmreplica

namespace vmreplica {
namespace {

// Local time is UTC in these tests (the rules are local-time rules).
class PolicyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tz = std::getenv("TZ");
    saved_ = tz ? std::optional<std::string>(tz) : std::nullopt;
    setenv("TZ", "UTC", 1);
    tzset();
  }
  void TearDown() override {
    if (saved_) {
      setenv("TZ", saved_->c_str(), 1);
    } else {
      unsetenv("TZ");
    }
    tzset();
  }
  std::optional<std::string> saved_;
};

// 2027-01-15 (a Friday) at hh:mm UTC, in Unix ms.
int64_t At(int hh, int mm, int day_offset = 0) {
  constexpr int64_t kFri20270115 = 1'799'971'200;  // 2027-01-15 00:00:00 UTC
  return (kFri20270115 + int64_t{day_offset} * 86400 + hh * 3600 + mm * 60) * 1000;
}

TEST_F(PolicyTest, TheTestDateIsAFridayAtMidnight) {
  std::time_t t = static_cast<std::time_t>(At(0, 0) / 1000);
  std::tm tm{};
  ASSERT_NE(gmtime_r(&t, &tm), nullptr);
  EXPECT_EQ(tm.tm_wday, 5);
  EXPECT_EQ(tm.tm_hour, 0);
  EXPECT_EQ(tm.tm_mday, 15);
}

TEST_F(PolicyTest, WindowsStartAtMonitoringStartTimePlusMultiplesOfTheInterval) {
  ServerSettings s;  // defaults: 12 h from 09:00
  EXPECT_EQ(StatisticsWindowStart(s, At(10, 0)), At(9, 0));
  EXPECT_EQ(StatisticsWindowStart(s, At(20, 59)), At(9, 0));
  EXPECT_EQ(StatisticsWindowStart(s, At(21, 0)), At(21, 0));
  EXPECT_EQ(StatisticsWindowStart(s, At(8, 59)), At(21, 0, -1));
  s.monitoring_interval_s = 3600;
  s.monitoring_start_time_min = 30;
  EXPECT_EQ(StatisticsWindowStart(s, At(14, 45)), At(14, 30));
  EXPECT_EQ(StatisticsWindowStart(s, At(14, 15)), At(13, 30));
}

// Daylight saving: windows stay at 09:00 and 21:00 local time across the
// change, and no window starts at another hour.
TEST_F(PolicyTest, WindowsFollowLocalTimeAcrossADaylightSavingChange) {
  setenv("TZ", "Europe/Berlin", 1);
  tzset();
  ServerSettings s;  // 12 h from 09:00
  // 2026-10-25: CEST (UTC+2) ends at 03:00 local = 01:00 UTC.
  constexpr int64_t kOct24Utc = 1'792'800'000;  // 2026-10-24 00:00:00 UTC
  auto utc = [&](int day, int hh, int mm) { return (kOct24Utc + day * 86400 + hh * 3600 + mm * 60) * int64_t{1000}; };
  EXPECT_EQ(StatisticsWindowStart(s, utc(0, 20, 0)), utc(0, 19, 0));  // 22:00 CEST -> window from 21:00 CEST
  EXPECT_EQ(StatisticsWindowStart(s, utc(1, 0, 30)), utc(0, 19, 0));  // 02:30 CEST, before the change
  EXPECT_EQ(StatisticsWindowStart(s, utc(1, 1, 30)), utc(0, 19, 0));  // 02:30 CET, after the change
  EXPECT_EQ(StatisticsWindowStart(s, utc(1, 7, 59)), utc(0, 19, 0));  // 08:59 CET
  EXPECT_EQ(StatisticsWindowStart(s, utc(1, 8, 0)), utc(1, 8, 0));    // 09:00 CET
  EXPECT_EQ(StatisticsWindowStart(s, utc(1, 19, 59)), utc(1, 8, 0));
  EXPECT_EQ(StatisticsWindowStart(s, utc(1, 20, 0)), utc(1, 20, 0));  // 21:00 CET
  // A record whose window began at 21:00 CEST does not roll at the change.
  StatisticsRecord r;
  r.start_ms = utc(0, 19, 0);
  r.replication_success_count = 5;
  EXPECT_FALSE(RollStatisticsWindow(r, s, utc(1, 1, 30)));
  EXPECT_EQ(r.replication_success_count, 5u);
  EXPECT_TRUE(RollStatisticsWindow(r, s, utc(1, 8, 1)));
  EXPECT_EQ(r.start_ms, utc(1, 8, 0));
}

TEST_F(PolicyTest, AWindowThatEndedRollsOverKeepingWhatDescribesTheRelationship) {
  ServerSettings server;
  server.monitoring_interval_s = 3600;
  server.monitoring_start_time_min = 0;
  StatisticsRecord s;
  s.vm_id = "vm";
  s.start_ms = At(10, 5);
  s.replication_success_count = 7;
  s.replication_miss_count = 2;
  s.network_failure_count = 1;
  s.application_consistent_snapshot_failure_count = 3;
  s.initial_replication_size_bytes = 4096;
  s.pending_replication_size_bytes = 512;
  s.last_test_failover_ms = At(9, 0);
  EXPECT_FALSE(RollStatisticsWindow(s, server, At(10, 59)));
  EXPECT_EQ(s.replication_success_count, 7u);
  EXPECT_TRUE(RollStatisticsWindow(s, server, At(11, 1)));
  EXPECT_EQ(s.vm_id, "vm");
  EXPECT_EQ(s.start_ms, At(11, 0));
  EXPECT_EQ(s.replication_success_count, 0u);
  EXPECT_EQ(s.replication_miss_count, 0u);
  EXPECT_EQ(s.network_failure_count, 0u);
  EXPECT_EQ(s.application_consistent_snapshot_failure_count, 0u);
  EXPECT_EQ(s.initial_replication_size_bytes, 4096u);
  EXPECT_EQ(s.pending_replication_size_bytes, 512u);
  EXPECT_EQ(s.last_test_failover_ms, At(9, 0));
  StatisticsRecord fresh;
  EXPECT_FALSE(RollStatisticsWindow(fresh, server, At(11, 30)));
  EXPECT_EQ(fresh.start_ms, At(11, 30));
}

TEST_F(PolicyTest, TimesOfDayParseStrictly) {
  EXPECT_EQ(*ParseTimeOfDay("00:00"), 0u);
  EXPECT_EQ(*ParseTimeOfDay("23:59"), 23u * 60 + 59);
  for (const char* bad : {"24:00", "7:00", "07:60", "07-00", "", "07:00 ", "aa:bb"}) {
    auto r = ParseTimeOfDay(bad);
    EXPECT_FALSE(r.ok()) << bad;
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
    }
  }
}

TEST_F(PolicyTest, TheFirstScheduleWindowHoldingTheLocalTimeSetsTheLimit) {
  std::vector<BandwidthWindow> schedule;
  BandwidthWindow office;  // Monday..Friday 08:00-18:00: 1 MB/s
  office.start_min = 8 * 60;
  office.end_min = 18 * 60;
  office.days_mask = 0b0111110;
  office.bytes_per_s = 1'000'000;
  BandwidthWindow night;  // every day 22:00-06:00: unlimited
  night.start_min = 22 * 60;
  night.end_min = 6 * 60;
  night.bytes_per_s = 0;
  schedule = {office, night};
  const uint64_t def = 5'000'000;
  EXPECT_EQ(BandwidthLimitAt({}, def, At(9, 0)), def);
  EXPECT_EQ(BandwidthLimitAt(schedule, def, At(9, 0)), 1'000'000u);       // Friday 09:00
  EXPECT_EQ(BandwidthLimitAt(schedule, def, At(18, 0)), def);             // end is exclusive
  EXPECT_EQ(BandwidthLimitAt(schedule, def, At(7, 59)), def);
  EXPECT_EQ(BandwidthLimitAt(schedule, def, At(9, 0, 1)), def);           // Saturday: office closed
  EXPECT_EQ(BandwidthLimitAt(schedule, def, At(23, 0)), 0u);              // night, before midnight
  EXPECT_EQ(BandwidthLimitAt(schedule, def, At(5, 59, 1)), 0u);           // night, after midnight
  EXPECT_EQ(BandwidthLimitAt(schedule, def, At(6, 0, 1)), def);
  // A night window only on Friday: Saturday 03:00 belongs to Friday's night.
  night.days_mask = 1u << 5;
  EXPECT_EQ(BandwidthLimitAt({night}, def, At(3, 0, 1)), 0u);
  EXPECT_EQ(BandwidthLimitAt({night}, def, At(3, 0)), def);               // Friday 03:00 is Thursday's night
  BandwidthWindow all_day;  // start == end: the whole day
  all_day.start_min = all_day.end_min = 0;
  all_day.days_mask = 1u << 6;
  all_day.bytes_per_s = 7;
  EXPECT_EQ(BandwidthLimitAt({all_day}, def, At(12, 0, 1)), 7u);
  EXPECT_EQ(BandwidthLimitAt({all_day}, def, At(12, 0)), def);
}

TEST(ReplicaSideHealthTest, PausedOrResyncOnTheReplicaIsCritical) {
  HealthVerdict v;
  v.health = ReplicationHealth::kNormal;
  ApplyReplicaSideHealth(v, ReplicationState::kReplicating);
  EXPECT_EQ(v.health, ReplicationHealth::kNormal);
  EXPECT_TRUE(v.issues.empty());
  ApplyReplicaSideHealth(v, ReplicationState::kSuspended);
  EXPECT_EQ(v.health, ReplicationHealth::kCritical);
  ASSERT_EQ(v.issues.size(), 1u);
  EXPECT_NE(v.issues[0].find("paused on the replica"), std::string::npos);
  HealthVerdict w;
  w.health = ReplicationHealth::kWarning;
  ApplyReplicaSideHealth(w, ReplicationState::kWaitingForStartResynchronize);
  EXPECT_EQ(w.health, ReplicationHealth::kCritical);
}

}  // namespace
}  // namespace vmreplica
