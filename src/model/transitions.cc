#include "vmreplica/model/transitions.h"

#include <cassert>
#include <cstddef>
#include <initializer_list>
#include <string>
#include <utility>

namespace vmreplica {
namespace {

using enum ReplicationState;
using enum Operation;

constexpr std::string_view kOperationNames[] = {
    "CreateReplicationRelationship",
    "StartReplication",
    "ImportInitialReplica",
    "InitiateFailover",
    "RevertFailover",
    "CommitFailover",
    "TestReplicaSystem",
    "DestroyTestSystem",
    "ReverseReplicationRelationship",
    "InitiateFailback",
    "ChangeReplicationModeToPrimary",
    "Resynchronize",
    "ModifyReplicationSettings",
    "RemoveReplicationRelationship",
    "GetReplicationStatistics",
    "ResetReplicationStatistics",
    "SetFailoverNetworkAdapterSettings",
    "RequestCancelInitialReplication",
    "RequestMarkAsReplica",
    "RequestResume",
    "RequestPrepareForPlannedFailover",
    "RequestSuspend",
    "RequestCancelResynchronization",
};
static_assert(std::size(kOperationNames) == kOperationCount);
static_assert(static_cast<int>(kRequestCancelResynchronization) == kOperationCount - 1);

constexpr std::string_view kTableModeNames[] = {"Primary", "Replica", "ExtendedReplica", "TestReplica"};
static_assert(std::size(kTableModeNames) == kTableModeCount);

// ---- The rules -------------------------------------------------------------

// Sets of states as bit masks (bit n = WMI state n).
using StateSet = uint32_t;
constexpr StateSet kEveryState = (StateSet{1} << kReplicationStateCount) - 1;
constexpr StateSet Of(std::initializer_list<ReplicationState> states) {
  StateSet set = 0;
  for (ReplicationState s : states) set |= StateSet{1} << Number(s);
  return set;
}
constexpr StateSet AllBut(std::initializer_list<ReplicationState> states) {
  return kEveryState & ~Of(states);
}

// Sets of table modes as bit masks (bit n = TableMode n).
using ModeSet = uint8_t;
constexpr ModeSet kOnPrimary = 1 << static_cast<int>(TableMode::kPrimary);
constexpr ModeSet kOnReplica = 1 << static_cast<int>(TableMode::kReplica);
constexpr ModeSet kOnExtended = 1 << static_cast<int>(TableMode::kExtendedReplica);
constexpr ModeSet kOnTest = 1 << static_cast<int>(TableMode::kTestReplica);
constexpr ModeSet kOnReceivers = kOnReplica | kOnExtended;
constexpr ModeSet kOnRelationships = kOnPrimary | kOnReplica | kOnExtended;
constexpr ModeSet kOnAll = kOnRelationships | kOnTest;

// Where a rule leads: a fixed state, the state it started from
// (kUnchanged), or for `during` the same as `after` (kAsAfter).
struct Target {
  int8_t state;
};
constexpr Target kUnchanged{-1};
constexpr Target kAsAfter{-2};
constexpr Target To(ReplicationState s) { return Target{static_cast<int8_t>(s)}; }

struct Rule {
  ModeSet modes;
  Operation op;
  StateSet from;
  Target after;
  Target during = kAsAfter;
};

// Every allowed (mode, state, operation) cell comes from exactly one rule;
// a cell no rule names is not allowed. See the header for the diagrams.
// clang-format off
constexpr Rule kRules[] = {
    // {modes, operation, from states, after[, during (default: = after)]}
    // -- Sending side.
    {kOnPrimary, kCreateReplicationRelationship, Of({kDisabled}), To(kReadyForReplication)},
    {kOnPrimary, kStartReplication, Of({kReadyForReplication}), To(kWaitingToCompleteInitialReplication)},
    {kOnPrimary, kRequestCancelInitialReplication, Of({kWaitingToCompleteInitialReplication}), To(kReadyForReplication)},
    {kOnPrimary, kRequestSuspend, Of({kWaitingToCompleteInitialReplication, kReplicating}), To(kSuspended)},
    {kOnPrimary, kRequestSuspend, Of({kResynchronizing}), To(kResynchronizeSuspended)},
    {kOnPrimary, kRequestResume, Of({kSuspended, kCritical}), To(kReplicating)},
    {kOnPrimary, kRequestResume, Of({kWaitingForStartResynchronize, kResynchronizeSuspended}), To(kResynchronizing)},
    {kOnPrimary, kRequestResume, Of({kUpdateCritical}), To(kWaitingForUpdateCompletion)},
    {kOnPrimary, kRequestPrepareForPlannedFailover, Of({kReplicating}), To(kSyncedReplicationComplete)},
    {kOnPrimary, kRevertFailover, Of({kSyncedReplicationComplete}), To(kReplicating)},
    {kOnPrimary, kResynchronize, Of({kSuspended, kCritical, kWaitingForStartResynchronize, kResynchronizeSuspended, kUpdateCritical}), To(kReplicating), To(kResynchronizing)},
    {kOnPrimary, kRequestCancelResynchronization, Of({kResynchronizing, kResynchronizeSuspended}), To(kWaitingForStartResynchronize)},

    // -- Receiving side (replica of hop 0, extended replica of hop 1).
    {kOnReceivers, kImportInitialReplica, Of({kWaitingToCompleteInitialReplication}), To(kReplicating)},
    {kOnReceivers, kRequestMarkAsReplica, Of({kWaitingToCompleteInitialReplication}), kUnchanged},
    {kOnReceivers, kInitiateFailover, Of({kReplicating, kSuspended, kResynchronizing, kWaitingForUpdateCompletion}), To(kRecovered), To(kRecoveryInProgress)},
    {kOnReceivers, kRevertFailover, Of({kRecovered}), To(kReplicating)},
    {kOnReceivers, kCommitFailover, Of({kRecovered}), To(kCommitted)},
    {kOnReceivers, kTestReplicaSystem, Of({kReplicating, kSuspended, kCritical, kWaitingForStartResynchronize, kResynchronizeSuspended, kUpdateCritical}), kUnchanged},
    {kOnReceivers, kRequestSuspend, Of({kWaitingToCompleteInitialReplication, kReplicating}), To(kSuspended)},
    {kOnReceivers, kRequestResume, Of({kSuspended, kCritical}), To(kReplicating)},
    // Replica of hop 0 only: one hop, no reverse from the extended site.
    {kOnReplica, kReverseReplicationRelationship, Of({kRecovered, kCommitted}), To(kReadyForReplication)},
    {kOnReplica, kInitiateFailback, Of({kRecovered, kCommitted}), To(kFailbackComplete), To(kFailbackInProgress)},
    {kOnReplica, kChangeReplicationModeToPrimary, Of({kCommitted}), To(kReplicating)},

    // -- Both sides of a relationship.
    {kOnRelationships, kModifyReplicationSettings, AllBut({kDisabled, kRecoveryInProgress, kFailbackInProgress}), kUnchanged},
    {kOnRelationships, kRemoveReplicationRelationship, AllBut({kDisabled, kRecoveryInProgress, kFailbackInProgress}), To(kDisabled)},
    {kOnRelationships, kGetReplicationStatistics, AllBut({kDisabled}), kUnchanged},
    {kOnRelationships, kResetReplicationStatistics, AllBut({kDisabled}), kUnchanged},

    // -- The test VM: the state does not matter.
    {kOnTest, kDestroyTestSystem, kEveryState, kUnchanged},
    {kOnTest, kGetReplicationStatistics, kEveryState, kUnchanged},

    // -- Everyone, in every state.
    {kOnAll, kSetFailoverNetworkAdapterSettings, kEveryState, kUnchanged},
};
// clang-format on

// Not constexpr: reaching it during the constant evaluation of BuildTables()
// makes the build fail, so two rules can never claim one cell.
void TwoRulesClaimOneCell() {}

constexpr ReplicationState Resolve(Target t, int from) {
  return static_cast<ReplicationState>(t.state == kUnchanged.state ? from : t.state);
}

constexpr std::array<TransitionTable, kTableModeCount> BuildTables() {
  std::array<TransitionTable, kTableModeCount> tables{};
  for (const Rule& rule : kRules) {
    for (int mode = 0; mode < kTableModeCount; ++mode) {
      if ((rule.modes & (1 << mode)) == 0) continue;
      for (int state = 0; state < kReplicationStateCount; ++state) {
        if ((rule.from & (StateSet{1} << state)) == 0) continue;
        std::optional<Transition>& cell = tables[mode][state][static_cast<int>(rule.op)];
        if (cell.has_value()) TwoRulesClaimOneCell();
        const ReplicationState after = Resolve(rule.after, state);
        const ReplicationState during =
            rule.during.state == kAsAfter.state ? after : Resolve(rule.during, state);
        cell = Transition{during, after};
      }
    }
  }
  return tables;
}

constexpr std::array<TransitionTable, kTableModeCount> kTables = BuildTables();

bool ValidMode(TableMode mode) { return static_cast<int>(mode) < kTableModeCount; }
bool ValidOperation(Operation op) { return static_cast<int>(op) < kOperationCount; }
bool ValidState(ReplicationState s) { return Number(s) < kReplicationStateCount; }

std::string StateLabel(ReplicationState s) {
  return std::string(Name(s)) + " (" + std::to_string(Number(s)) + ")";
}

}  // namespace

std::string_view Name(Operation op) {
  return ValidOperation(op) ? kOperationNames[static_cast<int>(op)] : "Undefined";
}

const std::vector<Operation>& AllOperations() {
  static const std::vector<Operation>& ops = *[] {
    auto* v = new std::vector<Operation>();
    for (int i = 0; i < kOperationCount; ++i) v->push_back(static_cast<Operation>(i));
    return v;
  }();
  return ops;
}

template <>
std::optional<Operation> Parse(std::string_view text) {
  for (Operation op : AllOperations()) {
    std::string_view name = Name(op);
    if (name.size() != text.size()) continue;
    bool equal = true;
    for (std::size_t i = 0; i < name.size() && equal; ++i) {
      auto lower = [](char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; };
      equal = lower(name[i]) == lower(text[i]);
    }
    if (equal) return op;
  }
  return std::nullopt;
}

std::optional<Operation> OperationForRequestedState(RequestedReplicationState s) {
  switch (s) {
    case RequestedReplicationState::kCancelInitialReplication:
      return kRequestCancelInitialReplication;
    case RequestedReplicationState::kMarkAsReplica:
      return kRequestMarkAsReplica;
    case RequestedReplicationState::kResume:
      return kRequestResume;
    case RequestedReplicationState::kPrepareForPlannedFailover:
      return kRequestPrepareForPlannedFailover;
    case RequestedReplicationState::kSuspend:
      return kRequestSuspend;
    case RequestedReplicationState::kCancelResynchronization:
      return kRequestCancelResynchronization;
  }
  return std::nullopt;
}

std::string_view Name(TableMode mode) {
  return ValidMode(mode) ? kTableModeNames[static_cast<int>(mode)] : "Undefined";
}

Result<TableMode> TableModeFor(ReplicationMode vm_mode, int relationship_index) {
  if (relationship_index != 0 && relationship_index != 1) {
    return Status::InvalidArgument("relationship index " + std::to_string(relationship_index) +
                                   " is not 0 or 1");
  }
  const bool extended_hop = relationship_index == 1;
  switch (vm_mode) {
    case ReplicationMode::kNone:
    case ReplicationMode::kPrimary:
      if (extended_hop) {
        return Status::FailedPrecondition(
            "a VM in mode " + std::string(Name(vm_mode)) +
            " has no relationship 1; the extended hop is operated on the replica VM");
      }
      return TableMode::kPrimary;
    case ReplicationMode::kReplica:
      return extended_hop ? TableMode::kPrimary : TableMode::kReplica;
    case ReplicationMode::kExtendedReplica:
      return TableMode::kExtendedReplica;
    case ReplicationMode::kTestReplica:
      return TableMode::kTestReplica;
  }
  return Status::InvalidArgument("undefined replication mode " + std::to_string(Number(vm_mode)));
}

const TransitionTable& TableFor(TableMode mode) {
  assert(ValidMode(mode));
  return kTables[static_cast<int>(mode)];
}

std::vector<ReplicationState> AllowedStates(TableMode mode, Operation op) {
  std::vector<ReplicationState> states;
  if (!ValidMode(mode) || !ValidOperation(op)) return states;
  const TransitionTable& table = TableFor(mode);
  for (int s = 0; s < kReplicationStateCount; ++s) {
    if (table[s][static_cast<int>(op)].has_value()) states.push_back(static_cast<ReplicationState>(s));
  }
  return states;
}

Result<Transition> CheckTransition(TableMode mode, ReplicationState state, Operation op) {
  if (!ValidMode(mode)) {
    return Status::InvalidArgument("undefined table mode " + std::to_string(static_cast<int>(mode)));
  }
  if (!ValidOperation(op)) {
    return Status::InvalidArgument("undefined operation " + std::to_string(static_cast<int>(op)));
  }
  if (!ValidState(state)) {
    return Status::InvalidArgument("undefined replication state " + std::to_string(Number(state)));
  }
  const std::optional<Transition>& cell = TableFor(mode)[Number(state)][static_cast<int>(op)];
  if (cell.has_value()) return *cell;

  const std::string_view mode_name = Name(mode);
  const char* article = (mode == TableMode::kExtendedReplica) ? "an" : "a";
  std::string message = std::string(Name(op)) + " is not allowed in state " + StateLabel(state) + " of " +
                        article + " " + std::string(mode_name) + " relationship; allowed in: ";
  const std::vector<ReplicationState> allowed = AllowedStates(mode, op);
  if (allowed.empty()) message += "no state";
  for (std::size_t i = 0; i < allowed.size(); ++i) {
    if (i > 0) message += ", ";
    message += StateLabel(allowed[i]);
  }
  return Status::FailedPrecondition(std::move(message));
}

}  // namespace vmreplica
