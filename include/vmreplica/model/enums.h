// The enumerations of Msvm_ReplicationService with their exact WMI numbers
// (shared/reference/hyperv-replica.md section 3). These numbers are frozen:
// they appear on the wire, in the catalog and in every CLI output.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace vmreplica {

// WMI ReplicationState. Not PowerShell's VMReplicationState, which shifts
// every value from 2 on by one.
enum class ReplicationState : uint16_t {
  kDisabled = 0,
  kReadyForReplication = 1,
  kWaitingToCompleteInitialReplication = 2,
  kReplicating = 3,
  kSyncedReplicationComplete = 4,
  kRecovered = 5,
  kCommitted = 6,
  kSuspended = 7,
  kCritical = 8,
  kWaitingForStartResynchronize = 9,
  kResynchronizing = 10,
  kResynchronizeSuspended = 11,
  kRecoveryInProgress = 12,
  kFailbackInProgress = 13,
  kFailbackComplete = 14,
  kWaitingForUpdateCompletion = 15,
  kUpdateCritical = 16,
  kUnknown = 17,
  kWaitingForRepurposeCompletion = 18,
  kPreparedForSyncReplication = 19,
  kPreparedForGroupReverseReplication = 20,
  kFiredrillInProgress = 21,
};
inline constexpr int kReplicationStateCount = 22;

enum class ReplicationMode : uint16_t {
  kNone = 0,
  kPrimary = 1,
  kReplica = 2,
  kTestReplica = 3,
  kExtendedReplica = 4,
};

enum class ReplicationHealth : uint16_t {
  kNotApplicable = 0,
  kNormal = 1,
  kWarning = 2,
  kCritical = 3,
};

enum class JobState : uint16_t {
  kNew = 2,
  kStarting = 3,
  kRunning = 4,
  kSuspended = 5,
  kShuttingDown = 6,
  kCompleted = 7,
  kTerminated = 8,
  kKilled = 9,
  kException = 10,
  kService = 11,
};

enum class JobType : uint16_t {
  kModifyServerSettings = 90,
  kCreateRelationship = 91,
  kModifySettings = 92,
  kRemoveRelationship = 93,
  kInitialReplicationNetwork = 94,
  kImport = 95,
  kStateChange = 96,
  kFailover = 97,
  kRevertFailover = 98,
  kCommitFailover = 99,
  kInitiateSyncedReplication = 100,
  kCancelSyncedReplication = 101,
  kTestReplica = 102,
  kRemoveTestReplica = 103,
  kReverseReplication = 104,
  kSendingDelta = 105,
  kReceivingDelta = 106,
  kResynchronizing = 107,
  kApplyChangeLog = 108,
  kStopInitialReplication = 109,
  kStopResync = 110,
  kStatistics = 111,
  kTestConnection = 115,
  kSendingInitialReplica = 116,
  kSeededInitialReplication = 117,
  kExportInitialReplication = 118,
  kResetStatistics = 119,
  kApplyRegisteredDeltas = 120,
  kResyncExtended = 121,
  kChangeModeToPrimary = 123,
  kFailback = 124,
  kUpdateDiskSet = 125,
};

// Method return values (ReturnValue of every Msvm_ReplicationService method).
enum class ReturnCode : uint32_t {
  kCompleted = 0,
  kJobStarted = 4096,
  kFailed = 32768,
  kAccessDenied = 32769,
  kNotSupported = 32770,
  kStatusUnknown = 32771,
  kTimeout = 32772,
  kInvalidParameter = 32773,
  kSystemInUse = 32774,
  kInvalidState = 32775,
  kIncorrectDataType = 32776,
  kSystemNotAvailable = 32777,
  kOutOfMemory = 32778,
  kFileNotFound = 32779,
};

enum class InitialReplicationType : uint16_t {
  kNetwork = 1,
  kExport = 2,
  kSeededNetwork = 3,
};

// Per relationship.
enum class AuthenticationType : uint16_t {
  kKerberos = 1,
  kCertificate = 2,
};

// Replica server: which authentication types it accepts.
enum class AllowedAuthenticationType : uint16_t {
  kNone = 0,
  kKerberos = 1,
  kCertificate = 2,
  kKerberosAndCertificate = 3,
};

// FailedOverReplicationType / LastReplicationType.
enum class ReplicationType : uint16_t {
  kNone = 0,
  kRegular = 1,
  kApplicationConsistent = 2,
  kPlanned = 3,
};

// RequestReplicationStateChange(Ex) RequestedState values.
enum class RequestedReplicationState : uint16_t {
  kCancelInitialReplication = 1,
  kMarkAsReplica = 2,  // seeding: an existing VM becomes the replica
  kResume = 3,
  kPrepareForPlannedFailover = 4,
  kSuspend = 7,
  kCancelResynchronization = 9,
};

// Name <-> number, both ways. Names are the WMI names without the `k`
// ("Replicating", "WaitingForStartResynchronize", "JobStarted"...).
// Parsing accepts the name (case-insensitive) or the decimal number; it
// returns nullopt for anything else, including numbers outside the enum.
// Name() of a number outside the enum (a cast of a bad value) is "Undefined".
std::string_view Name(ReplicationState v);
std::string_view Name(ReplicationMode v);
std::string_view Name(ReplicationHealth v);
std::string_view Name(JobState v);
std::string_view Name(JobType v);
std::string_view Name(ReturnCode v);
std::string_view Name(InitialReplicationType v);
std::string_view Name(AuthenticationType v);
std::string_view Name(AllowedAuthenticationType v);
std::string_view Name(ReplicationType v);
std::string_view Name(RequestedReplicationState v);

template <typename E> std::optional<E> Parse(std::string_view text);
template <> std::optional<ReplicationState> Parse(std::string_view);
template <> std::optional<ReplicationMode> Parse(std::string_view);
template <> std::optional<ReplicationHealth> Parse(std::string_view);
template <> std::optional<JobState> Parse(std::string_view);
template <> std::optional<JobType> Parse(std::string_view);
template <> std::optional<ReturnCode> Parse(std::string_view);
template <> std::optional<InitialReplicationType> Parse(std::string_view);
template <> std::optional<AuthenticationType> Parse(std::string_view);
template <> std::optional<AllowedAuthenticationType> Parse(std::string_view);
template <> std::optional<ReplicationType> Parse(std::string_view);
template <> std::optional<RequestedReplicationState> Parse(std::string_view);

// Every defined value of the enum, in numeric order (for tests and tables).
template <typename E> const std::vector<E>& AllValues();
template <> const std::vector<ReplicationState>& AllValues();
template <> const std::vector<ReplicationMode>& AllValues();
template <> const std::vector<ReplicationHealth>& AllValues();
template <> const std::vector<JobState>& AllValues();
template <> const std::vector<JobType>& AllValues();
template <> const std::vector<ReturnCode>& AllValues();
template <> const std::vector<InitialReplicationType>& AllValues();
template <> const std::vector<AuthenticationType>& AllValues();
template <> const std::vector<AllowedAuthenticationType>& AllValues();
template <> const std::vector<ReplicationType>& AllValues();
template <> const std::vector<RequestedReplicationState>& AllValues();

template <typename E> constexpr auto Number(E v) { return static_cast<std::underlying_type_t<E>>(v); }

// True for the job states that end a job (Completed, Terminated, Killed, Exception).
bool IsFinal(JobState s);

}  // namespace vmreplica
