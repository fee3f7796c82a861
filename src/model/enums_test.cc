#include "vmreplica/model/enums.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <set>
#include <string>

namespace vmreplica {
namespace {

// The number of defined values per enum, counted from the reference
// (shared/reference/hyperv-replica.md section 3).
template <typename E>
constexpr std::size_t kExpectedCount = 0;
template <>
constexpr std::size_t kExpectedCount<ReplicationState> = 22;
template <>
constexpr std::size_t kExpectedCount<ReplicationMode> = 5;
template <>
constexpr std::size_t kExpectedCount<ReplicationHealth> = 4;
template <>
constexpr std::size_t kExpectedCount<JobState> = 10;
template <>
constexpr std::size_t kExpectedCount<JobType> = 32;
template <>
constexpr std::size_t kExpectedCount<ReturnCode> = 14;
template <>
constexpr std::size_t kExpectedCount<InitialReplicationType> = 3;
template <>
constexpr std::size_t kExpectedCount<AuthenticationType> = 2;
template <>
constexpr std::size_t kExpectedCount<AllowedAuthenticationType> = 4;
template <>
constexpr std::size_t kExpectedCount<ReplicationType> = 4;
template <>
constexpr std::size_t kExpectedCount<RequestedReplicationState> = 6;

template <typename E>
class EnumTest : public ::testing::Test {};

using AllEnums = ::testing::Types<ReplicationState, ReplicationMode, ReplicationHealth, JobState, JobType,
                                  ReturnCode, InitialReplicationType, AuthenticationType,
                                  AllowedAuthenticationType, ReplicationType, RequestedReplicationState>;
TYPED_TEST_SUITE(EnumTest, AllEnums);

std::string Upper(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return out;
}

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

TYPED_TEST(EnumTest, AllValuesAreInNumericOrderAndComplete) {
  const auto& values = AllValues<TypeParam>();
  EXPECT_EQ(values.size(), kExpectedCount<TypeParam>);
  for (std::size_t i = 1; i < values.size(); ++i) EXPECT_LT(Number(values[i - 1]), Number(values[i]));
}

TYPED_TEST(EnumTest, EveryValueRoundTripsThroughNameAndNumber) {
  std::set<std::string> lowered_names;
  for (TypeParam v : AllValues<TypeParam>()) {
    const std::string name(Name(v));
    SCOPED_TRACE(name);
    EXPECT_NE(name, "Undefined");
    EXPECT_FALSE(name.empty());
    EXPECT_NE(name[0], 'k');
    EXPECT_TRUE(lowered_names.insert(Lower(name)).second) << "duplicate name";
    EXPECT_EQ(Parse<TypeParam>(name), v);
    EXPECT_EQ(Parse<TypeParam>(Lower(name)), v);
    EXPECT_EQ(Parse<TypeParam>(Upper(name)), v);
    EXPECT_EQ(Parse<TypeParam>(std::to_string(Number(v))), v);
  }
}

TYPED_TEST(EnumTest, UnknownNamesAndNumbersAreRefused) {
  const auto& values = AllValues<TypeParam>();
  const auto last = static_cast<uint64_t>(Number(values.back()));
  EXPECT_EQ(Parse<TypeParam>(std::to_string(last + 1)), std::nullopt);
  EXPECT_EQ(Parse<TypeParam>(""), std::nullopt);
  EXPECT_EQ(Parse<TypeParam>("-1"), std::nullopt);
  EXPECT_EQ(Parse<TypeParam>("NoSuchValue"), std::nullopt);
  // A number that wraps onto a defined value when cast to 16 or 32 bits.
  const uint64_t first = Number(values.front());
  EXPECT_EQ(Parse<TypeParam>(std::to_string(first + 65536)), std::nullopt);
  EXPECT_EQ(Parse<TypeParam>(std::to_string(first + 4294967296ULL)), std::nullopt);
  EXPECT_EQ(Parse<TypeParam>("99999999999999999999999"), std::nullopt);
  for (TypeParam v : values) {
    const std::string name(Name(v));
    const std::string number = std::to_string(Number(v));
    EXPECT_EQ(Parse<TypeParam>(" " + name), std::nullopt);
    EXPECT_EQ(Parse<TypeParam>(name + " "), std::nullopt);
    EXPECT_EQ(Parse<TypeParam>(name.substr(0, name.size() - 1)), std::nullopt);
    EXPECT_EQ(Parse<TypeParam>("k" + name), std::nullopt);
    EXPECT_EQ(Parse<TypeParam>("+" + number), std::nullopt);
    EXPECT_EQ(Parse<TypeParam>(number + ".0"), std::nullopt);
    EXPECT_EQ(Parse<TypeParam>(" " + number), std::nullopt);
  }
}

TYPED_TEST(EnumTest, NameOfAnUndefinedValueIsUndefined) {
  const auto past_end =
      static_cast<std::underlying_type_t<TypeParam>>(Number(AllValues<TypeParam>().back()) + 1);
  EXPECT_EQ(Name(static_cast<TypeParam>(past_end)), "Undefined");
}

TEST(EnumsTest, ReplicationStatesUseWmiNumbersNotPowerShells) {
  EXPECT_EQ(Number(ReplicationState::kReplicating), 3);
  EXPECT_EQ(Parse<ReplicationState>("Replicating"), ReplicationState::kReplicating);
  EXPECT_EQ(Parse<ReplicationState>("3"), ReplicationState::kReplicating);
  EXPECT_EQ(Parse<ReplicationState>("4"), ReplicationState::kSyncedReplicationComplete);
  EXPECT_EQ(Parse<ReplicationState>("InitialReplicationInProgress"), std::nullopt);  // PowerShell only
  EXPECT_EQ(Name(ReplicationState::kDisabled), "Disabled");
  EXPECT_EQ(Name(ReplicationState::kWaitingToCompleteInitialReplication),
            "WaitingToCompleteInitialReplication");
  EXPECT_EQ(Name(ReplicationState::kRecovered), "Recovered");
  EXPECT_EQ(Number(ReplicationState::kCommitted), 6);
  EXPECT_EQ(Name(ReplicationState::kWaitingForStartResynchronize), "WaitingForStartResynchronize");
  EXPECT_EQ(Number(ReplicationState::kWaitingForStartResynchronize), 9);
  EXPECT_EQ(Number(ReplicationState::kRecoveryInProgress), 12);
  EXPECT_EQ(Number(ReplicationState::kFailbackComplete), 14);
  EXPECT_EQ(Number(ReplicationState::kUpdateCritical), 16);
  EXPECT_EQ(Name(ReplicationState::kFiredrillInProgress), "FiredrillInProgress");
  EXPECT_EQ(Number(ReplicationState::kFiredrillInProgress), 21);
  EXPECT_EQ(Parse<ReplicationState>("22"), std::nullopt);
}

TEST(EnumsTest, OtherWmiNumbersMatchTheReference) {
  EXPECT_EQ(Parse<ReplicationMode>("4"), ReplicationMode::kExtendedReplica);
  EXPECT_EQ(Parse<ReplicationMode>("testreplica"), ReplicationMode::kTestReplica);
  EXPECT_EQ(Parse<ReplicationHealth>("3"), ReplicationHealth::kCritical);
  EXPECT_EQ(Parse<JobState>("7"), JobState::kCompleted);
  EXPECT_EQ(Parse<JobState>("1"), std::nullopt);  // JobState starts at 2
  EXPECT_EQ(Parse<JobType>("97"), JobType::kFailover);
  EXPECT_EQ(Parse<JobType>("122"), std::nullopt);  // a gap in the job types
  EXPECT_EQ(Parse<JobType>("124"), JobType::kFailback);
  EXPECT_EQ(Name(JobType::kResyncExtended), "ResyncExtended");
  EXPECT_EQ(Parse<ReturnCode>("4096"), ReturnCode::kJobStarted);
  EXPECT_EQ(Name(ReturnCode::kJobStarted), "JobStarted");
  EXPECT_EQ(Name(ReturnCode::kInvalidParameter), "InvalidParameter");
  EXPECT_EQ(Parse<ReturnCode>("32775"), ReturnCode::kInvalidState);
  EXPECT_EQ(Parse<ReturnCode>("1"), std::nullopt);
  EXPECT_EQ(Name(InitialReplicationType::kSeededNetwork), "SeededNetwork");
  EXPECT_EQ(Number(InitialReplicationType::kSeededNetwork), 3);
  EXPECT_EQ(Parse<AuthenticationType>("2"), AuthenticationType::kCertificate);
  EXPECT_EQ(Parse<AuthenticationType>("0"), std::nullopt);
  EXPECT_EQ(Parse<AllowedAuthenticationType>("KERBEROSANDCERTIFICATE"),
            AllowedAuthenticationType::kKerberosAndCertificate);
  EXPECT_EQ(Name(ReplicationType::kApplicationConsistent), "ApplicationConsistent");
  EXPECT_EQ(Name(RequestedReplicationState::kPrepareForPlannedFailover), "PrepareForPlannedFailover");
  EXPECT_EQ(Parse<RequestedReplicationState>("7"), RequestedReplicationState::kSuspend);
  EXPECT_EQ(Parse<RequestedReplicationState>("5"), std::nullopt);
  EXPECT_EQ(Parse<RequestedReplicationState>("9"), RequestedReplicationState::kCancelResynchronization);
}

TEST(EnumsTest, LeadingZerosAreStillTheDecimalNumber) {
  EXPECT_EQ(Parse<ReplicationState>("03"), ReplicationState::kReplicating);
  EXPECT_EQ(Parse<ReplicationState>("0"), ReplicationState::kDisabled);
}

TEST(EnumsTest, OnlyCompletedTerminatedKilledAndExceptionAreFinal) {
  const std::set<JobState> final_states = {JobState::kCompleted, JobState::kTerminated, JobState::kKilled,
                                           JobState::kException};
  for (JobState s : AllValues<JobState>()) {
    EXPECT_EQ(IsFinal(s), final_states.count(s) == 1) << Name(s);
  }
}

}  // namespace
}  // namespace vmreplica
