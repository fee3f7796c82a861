#include "vmreplica/model/enums.h"

#include <cstddef>
#include <span>

namespace vmreplica {
namespace {

// One table per enumeration, in numeric order: the single source of the
// names, of Parse() and of AllValues().
template <typename E>
struct Entry {
  E value;
  std::string_view name;
};

constexpr Entry<ReplicationState> kReplicationStates[] = {
    {ReplicationState::kDisabled, "Disabled"},
    {ReplicationState::kReadyForReplication, "ReadyForReplication"},
    {ReplicationState::kWaitingToCompleteInitialReplication, "WaitingToCompleteInitialReplication"},
    {ReplicationState::kReplicating, "Replicating"},
    {ReplicationState::kSyncedReplicationComplete, "SyncedReplicationComplete"},
    {ReplicationState::kRecovered, "Recovered"},
    {ReplicationState::kCommitted, "Committed"},
    {ReplicationState::kSuspended, "Suspended"},
    {ReplicationState::kCritical, "Critical"},
    {ReplicationState::kWaitingForStartResynchronize, "WaitingForStartResynchronize"},
    {ReplicationState::kResynchronizing, "Resynchronizing"},
    {ReplicationState::kResynchronizeSuspended, "ResynchronizeSuspended"},
    {ReplicationState::kRecoveryInProgress, "RecoveryInProgress"},
    {ReplicationState::kFailbackInProgress, "FailbackInProgress"},
    {ReplicationState::kFailbackComplete, "FailbackComplete"},
    {ReplicationState::kWaitingForUpdateCompletion, "WaitingForUpdateCompletion"},
    {ReplicationState::kUpdateCritical, "UpdateCritical"},
    {ReplicationState::kUnknown, "Unknown"},
    {ReplicationState::kWaitingForRepurposeCompletion, "WaitingForRepurposeCompletion"},
    {ReplicationState::kPreparedForSyncReplication, "PreparedForSyncReplication"},
    {ReplicationState::kPreparedForGroupReverseReplication, "PreparedForGroupReverseReplication"},
    {ReplicationState::kFiredrillInProgress, "FiredrillInProgress"},
};
static_assert(std::size(kReplicationStates) == kReplicationStateCount);

constexpr Entry<ReplicationMode> kReplicationModes[] = {
    {ReplicationMode::kNone, "None"},
    {ReplicationMode::kPrimary, "Primary"},
    {ReplicationMode::kReplica, "Replica"},
    {ReplicationMode::kTestReplica, "TestReplica"},
    {ReplicationMode::kExtendedReplica, "ExtendedReplica"},
};

constexpr Entry<ReplicationHealth> kReplicationHealths[] = {
    {ReplicationHealth::kNotApplicable, "NotApplicable"},
    {ReplicationHealth::kNormal, "Normal"},
    {ReplicationHealth::kWarning, "Warning"},
    {ReplicationHealth::kCritical, "Critical"},
};

constexpr Entry<JobState> kJobStates[] = {
    {JobState::kNew, "New"},
    {JobState::kStarting, "Starting"},
    {JobState::kRunning, "Running"},
    {JobState::kSuspended, "Suspended"},
    {JobState::kShuttingDown, "ShuttingDown"},
    {JobState::kCompleted, "Completed"},
    {JobState::kTerminated, "Terminated"},
    {JobState::kKilled, "Killed"},
    {JobState::kException, "Exception"},
    {JobState::kService, "Service"},
};

constexpr Entry<JobType> kJobTypes[] = {
    {JobType::kModifyServerSettings, "ModifyServerSettings"},
    {JobType::kCreateRelationship, "CreateRelationship"},
    {JobType::kModifySettings, "ModifySettings"},
    {JobType::kRemoveRelationship, "RemoveRelationship"},
    {JobType::kInitialReplicationNetwork, "InitialReplicationNetwork"},
    {JobType::kImport, "Import"},
    {JobType::kStateChange, "StateChange"},
    {JobType::kFailover, "Failover"},
    {JobType::kRevertFailover, "RevertFailover"},
    {JobType::kCommitFailover, "CommitFailover"},
    {JobType::kInitiateSyncedReplication, "InitiateSyncedReplication"},
    {JobType::kCancelSyncedReplication, "CancelSyncedReplication"},
    {JobType::kTestReplica, "TestReplica"},
    {JobType::kRemoveTestReplica, "RemoveTestReplica"},
    {JobType::kReverseReplication, "ReverseReplication"},
    {JobType::kSendingDelta, "SendingDelta"},
    {JobType::kReceivingDelta, "ReceivingDelta"},
    {JobType::kResynchronizing, "Resynchronizing"},
    {JobType::kApplyChangeLog, "ApplyChangeLog"},
    {JobType::kStopInitialReplication, "StopInitialReplication"},
    {JobType::kStopResync, "StopResync"},
    {JobType::kStatistics, "Statistics"},
    {JobType::kTestConnection, "TestConnection"},
    {JobType::kSendingInitialReplica, "SendingInitialReplica"},
    {JobType::kSeededInitialReplication, "SeededInitialReplication"},
    {JobType::kExportInitialReplication, "ExportInitialReplication"},
    {JobType::kResetStatistics, "ResetStatistics"},
    {JobType::kApplyRegisteredDeltas, "ApplyRegisteredDeltas"},
    {JobType::kResyncExtended, "ResyncExtended"},
    {JobType::kChangeModeToPrimary, "ChangeModeToPrimary"},
    {JobType::kFailback, "Failback"},
    {JobType::kUpdateDiskSet, "UpdateDiskSet"},
};

constexpr Entry<ReturnCode> kReturnCodes[] = {
    {ReturnCode::kCompleted, "Completed"},
    {ReturnCode::kJobStarted, "JobStarted"},
    {ReturnCode::kFailed, "Failed"},
    {ReturnCode::kAccessDenied, "AccessDenied"},
    {ReturnCode::kNotSupported, "NotSupported"},
    {ReturnCode::kStatusUnknown, "StatusUnknown"},
    {ReturnCode::kTimeout, "Timeout"},
    {ReturnCode::kInvalidParameter, "InvalidParameter"},
    {ReturnCode::kSystemInUse, "SystemInUse"},
    {ReturnCode::kInvalidState, "InvalidState"},
    {ReturnCode::kIncorrectDataType, "IncorrectDataType"},
    {ReturnCode::kSystemNotAvailable, "SystemNotAvailable"},
    {ReturnCode::kOutOfMemory, "OutOfMemory"},
    {ReturnCode::kFileNotFound, "FileNotFound"},
};

constexpr Entry<InitialReplicationType> kInitialReplicationTypes[] = {
    {InitialReplicationType::kNetwork, "Network"},
    {InitialReplicationType::kExport, "Export"},
    {InitialReplicationType::kSeededNetwork, "SeededNetwork"},
};

constexpr Entry<AuthenticationType> kAuthenticationTypes[] = {
    {AuthenticationType::kKerberos, "Kerberos"},
    {AuthenticationType::kCertificate, "Certificate"},
};

constexpr Entry<AllowedAuthenticationType> kAllowedAuthenticationTypes[] = {
    {AllowedAuthenticationType::kNone, "None"},
    {AllowedAuthenticationType::kKerberos, "Kerberos"},
    {AllowedAuthenticationType::kCertificate, "Certificate"},
    {AllowedAuthenticationType::kKerberosAndCertificate, "KerberosAndCertificate"},
};

constexpr Entry<ReplicationType> kReplicationTypes[] = {
    {ReplicationType::kNone, "None"},
    {ReplicationType::kRegular, "Regular"},
    {ReplicationType::kApplicationConsistent, "ApplicationConsistent"},
    {ReplicationType::kPlanned, "Planned"},
};

constexpr Entry<RequestedReplicationState> kRequestedReplicationStates[] = {
    {RequestedReplicationState::kCancelInitialReplication, "CancelInitialReplication"},
    {RequestedReplicationState::kMarkAsReplica, "MarkAsReplica"},
    {RequestedReplicationState::kResume, "Resume"},
    {RequestedReplicationState::kPrepareForPlannedFailover, "PrepareForPlannedFailover"},
    {RequestedReplicationState::kSuspend, "Suspend"},
    {RequestedReplicationState::kCancelResynchronization, "CancelResynchronization"},
};

// Compile-time check that a table is strictly increasing (AllValues()
// promises numeric order, and a duplicate would be a copy-paste slip).
template <typename E, std::size_t N>
constexpr bool StrictlyIncreasing(const Entry<E> (&table)[N]) {
  for (std::size_t i = 1; i < N; ++i) {
    if (Number(table[i - 1].value) >= Number(table[i].value)) return false;
  }
  return true;
}
static_assert(StrictlyIncreasing(kReplicationStates));
static_assert(StrictlyIncreasing(kReplicationModes));
static_assert(StrictlyIncreasing(kReplicationHealths));
static_assert(StrictlyIncreasing(kJobStates));
static_assert(StrictlyIncreasing(kJobTypes));
static_assert(StrictlyIncreasing(kReturnCodes));
static_assert(StrictlyIncreasing(kInitialReplicationTypes));
static_assert(StrictlyIncreasing(kAuthenticationTypes));
static_assert(StrictlyIncreasing(kAllowedAuthenticationTypes));
static_assert(StrictlyIncreasing(kReplicationTypes));
static_assert(StrictlyIncreasing(kRequestedReplicationStates));

constexpr std::string_view kUndefinedName = "Undefined";

template <typename E>
std::string_view NameIn(std::span<const Entry<E>> table, E v) {
  for (const Entry<E>& e : table) {
    if (e.value == v) return e.name;
  }
  return kUndefinedName;
}

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    auto lower = [](char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; };
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

// A plain decimal number: digits only (no sign, no blanks), at most 10
// digits so that it fits in uint64_t without overflow checks.
std::optional<uint64_t> ParseDecimal(std::string_view text) {
  if (text.empty() || text.size() > 10) return std::nullopt;
  uint64_t n = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    n = n * 10 + static_cast<uint64_t>(c - '0');
  }
  return n;
}

template <typename E>
std::optional<E> ParseIn(std::span<const Entry<E>> table, std::string_view text) {
  for (const Entry<E>& e : table) {
    if (EqualsIgnoreCase(e.name, text)) return e.value;
  }
  std::optional<uint64_t> n = ParseDecimal(text);
  if (!n) return std::nullopt;
  for (const Entry<E>& e : table) {
    if (static_cast<uint64_t>(Number(e.value)) == *n) return e.value;
  }
  return std::nullopt;
}

template <typename E>
const std::vector<E>& ValuesIn(std::span<const Entry<E>> table) {
  // Never destroyed: safe to use from other static destructors.
  auto* values = new std::vector<E>();
  for (const Entry<E>& e : table) values->push_back(e.value);
  return *values;
}

}  // namespace

#define VMR_ENUM_FUNCTIONS(E, table)                          \
  std::string_view Name(E v) { return NameIn<E>(table, v); }  \
  template <>                                                 \
  std::optional<E> Parse<E>(std::string_view text) {          \
    return ParseIn<E>(table, text);                           \
  }                                                           \
  template <>                                                 \
  const std::vector<E>& AllValues<E>() {                      \
    static const std::vector<E>& values = ValuesIn<E>(table); \
    return values;                                            \
  }

VMR_ENUM_FUNCTIONS(ReplicationState, kReplicationStates)
VMR_ENUM_FUNCTIONS(ReplicationMode, kReplicationModes)
VMR_ENUM_FUNCTIONS(ReplicationHealth, kReplicationHealths)
VMR_ENUM_FUNCTIONS(JobState, kJobStates)
VMR_ENUM_FUNCTIONS(JobType, kJobTypes)
VMR_ENUM_FUNCTIONS(ReturnCode, kReturnCodes)
VMR_ENUM_FUNCTIONS(InitialReplicationType, kInitialReplicationTypes)
VMR_ENUM_FUNCTIONS(AuthenticationType, kAuthenticationTypes)
VMR_ENUM_FUNCTIONS(AllowedAuthenticationType, kAllowedAuthenticationTypes)
VMR_ENUM_FUNCTIONS(ReplicationType, kReplicationTypes)
VMR_ENUM_FUNCTIONS(RequestedReplicationState, kRequestedReplicationStates)

#undef VMR_ENUM_FUNCTIONS

bool IsFinal(JobState s) {
  switch (s) {
    case JobState::kCompleted:
    case JobState::kTerminated:
    case JobState::kKilled:
    case JobState::kException:
      return true;
    default:
      return false;
  }
}

}  // namespace vmreplica
