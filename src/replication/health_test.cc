// EvaluateHealth against the reference's rules (section 5, "Health"), one
// rule a case, each written from the rule's text; and ConcatDeltaSource.
#include <gtest/gtest.h>

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
