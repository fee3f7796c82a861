// Which operation may run in which ReplicationState, and where it leads.
// The rules are data: one table per TableMode, [state][operation], built at
// compile time from the rule list in src/model/transitions.cc. Sources:
// shared/reference/hyperv-replica.md sections 2 and 3; where the reference
// is silent, the decisions are ours and listed under "Decisions" below.
//
// Which table applies (TableMode = the role of the local side in the
// relationship being operated):
//
//   VM mode           relationship 0 (primary -> replica)   relationship 1 (replica -> extended)
//   None              kPrimary (state is Disabled)          -
//   Primary           kPrimary                               -
//   Replica           kReplica                               kPrimary (the replica sends hop 1)
//   ExtendedReplica   kExtendedReplica                       kExtendedReplica
//   TestReplica       kTestReplica                           kTestReplica
//
// So an operation called on a replica VM that targets its extended
// relationship (create, start, resynchronize, modify, remove, statistics of
// hop 1) is checked against kPrimary with hop 1's state. TableModeFor()
// encodes this.
//
// Main states per mode (WMI numbers; "event" marks a change the service
// makes by itself, which is not an Operation and not in these tables):
//
// kPrimary, the sending side:
//
//                 Create                       StartReplication
//   Disabled 0 ----------> ReadyForReplication 1 ------------> WaitingToCompleteInitialReplication 2
//                                   ^                              |      |
//                                   +--RequestCancelInitialRepl.---+      | event: initial
//                                                                         v copy confirmed
//   SyncedReplicationComplete 4 <--RequestPrepareForPlannedFailover-- Replicating 3
//                               ------------RevertFailover----------->  |   ^   ^
//                                                       RequestSuspend  |   |   |
//                                                       (also from 2)   v   |   |
//                                               Suspended 7 <-----------+   |   |
//                                  Suspended 7, Critical 8 --RequestResume--+   |
//                                                                               | done
//   7, 8, 9, 11, 16 --Resynchronize--> Resynchronizing 10 (during) -------------+
//                                            |  ^
//                             RequestSuspend |  | RequestResume
//                                            v  |
//                                 ResynchronizeSuspended 11
//
//   10, 11 --RequestCancelResynchronization--> WaitingForStartResynchronize 9
//   WaitingForStartResynchronize 9 --RequestResume--> Resynchronizing 10
//   UpdateCritical 16 --RequestResume--> WaitingForUpdateCompletion 15
//   any state but 0, 12, 13 --RemoveReplicationRelationship--> Disabled 0
//
// kReplica, the receiving side of hop 0 (kExtendedReplica: the same without
// the three operations marked [R]):
//
//   WaitingToCompleteInitialReplication 2 --ImportInitialReplica--> Replicating 3
//         (RequestMarkAsReplica: stays 2; network copy received: event -> 3)
//   Replicating 3, Suspended 7, Resynchronizing 10, WaitingForUpdateCompletion 15
//         --InitiateFailover (during RecoveryInProgress 12)--> Recovered 5
//   Recovered 5 --RevertFailover--> Replicating 3
//   Recovered 5 --CommitFailover--> Committed 6
//   Committed 6 --ChangeReplicationModeToPrimary--> Replicating 3          [R]
//   5, 6 --ReverseReplicationRelationship--> ReadyForReplication 1        [R]
//   5, 6 --InitiateFailback (during FailbackInProgress 13)--> FailbackComplete 14   [R]
//   2, 3 --RequestSuspend--> Suspended 7 --RequestResume--> Replicating 3
//   Critical 8 --RequestResume--> Replicating 3
//   TestReplicaSystem in 3, 7, 8, 9, 11, 16 (state unchanged)
//
// kTestReplica, the test VM: DestroyTestSystem, SetFailoverNetworkAdapter-
// Settings and GetReplicationStatistics, in any state, state unchanged.
//
// Common to kPrimary, kReplica and kExtendedReplica (state unchanged unless
// noted): ModifyReplicationSettings in every state but 0, 12, 13;
// RemoveReplicationRelationship in every state but 0, 12, 13 (-> Disabled 0);
// Get/ResetReplicationStatistics in every state but 0;
// SetFailoverNetworkAdapterSettings in every state.
//
// Decisions (where the reference is silent):
//  - The tables cover operations a caller requests. Changes the service
//    makes on events (initial copy complete 2 -> 3, errors -> 8, 9 or 16,
//    disk update -> 15) are not checked here. When a job with an
//    intermediate `during` state fails, the job decides the state it leaves
//    (usually the one it started from); the table does not say.
//  - Nothing but the "every state" operations applies in Unknown (17) and in
//    the newer states 18..21; nothing may be modified or removed during a
//    failover (12) or failback (13): that job owns the relationship.
//  - RequestSuspend goes from 2 and 3 to Suspended (7) and from 10 to
//    ResynchronizeSuspended (11); RequestResume goes from 7 and 8 to 3, from
//    9 and 11 to Resynchronizing (10), from 16 to 15. On the replica side
//    only 2, 3 -> 7 and 7, 8 -> 3 exist (a replica-side pause).
//  - ReverseReplicationRelationship leaves the relationship in 1
//    (ReadyForReplication): the VM becomes the primary of the reversed
//    relationship and the caller changes its ReplicationMode.
//  - The extended replica cannot reverse, fail back or become primary
//    (one hop only); CreateReplicationRelationship is never allowed on it.
//  - A test VM's table ignores the state.
//
// Thread safety: everything here is immutable data; safe from any thread.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "vmreplica/model/enums.h"
#include "vmreplica/status.h"

namespace vmreplica {

// The methods of the replication service that depend on a relationship's
// state, plus the RequestReplicationStateChange requests (kRequest*).
// The numbering is internal (not WMI) and is not persisted.
enum class Operation : uint8_t {
  kCreateReplicationRelationship,
  kStartReplication,
  kImportInitialReplica,
  kInitiateFailover,
  kRevertFailover,
  kCommitFailover,
  kTestReplicaSystem,
  kDestroyTestSystem,
  kReverseReplicationRelationship,
  kInitiateFailback,
  kChangeReplicationModeToPrimary,
  kResynchronize,
  kModifyReplicationSettings,
  kRemoveReplicationRelationship,
  kGetReplicationStatistics,
  kResetReplicationStatistics,
  kSetFailoverNetworkAdapterSettings,
  kRequestCancelInitialReplication,
  kRequestMarkAsReplica,
  kRequestResume,
  kRequestPrepareForPlannedFailover,
  kRequestSuspend,
  kRequestCancelResynchronization,
};
inline constexpr int kOperationCount = 23;

// The operation's name without the k ("InitiateFailover",
// "RequestSuspend"); "Undefined" for a value outside the enum.
std::string_view Name(Operation op);
// Every operation, in enum order.
const std::vector<Operation>& AllOperations();
// The name (case-insensitive) -> operation; nullopt for anything else.
template <>
std::optional<Operation> Parse(std::string_view text);

// RequestReplicationStateChange's RequestedState -> its kRequest*
// operation; nullopt for a value outside the enum.
std::optional<Operation> OperationForRequestedState(RequestedReplicationState s);

// The role of the local side in the relationship being operated (see the
// table at the top of this file).
enum class TableMode : uint8_t { kPrimary, kReplica, kExtendedReplica, kTestReplica };
inline constexpr int kTableModeCount = 4;

// "Primary", "Replica", "ExtendedReplica", "TestReplica"; "Undefined" for a
// value outside the enum.
std::string_view Name(TableMode mode);

// Picks the table for an operation on relationship `relationship_index`
// (0 or 1) of a VM in mode `vm_mode`. InvalidArgument for an index other
// than 0 and 1 or an undefined mode; FailedPrecondition for relationship 1
// of a VM in mode None or Primary (the extended hop is operated on the
// replica VM).
Result<TableMode> TableModeFor(ReplicationMode vm_mode, int relationship_index);

// An allowed cell. `during` is the state while the operation's job runs
// (RecoveryInProgress 12 for a failover, Resynchronizing 10 for a resync,
// FailbackInProgress 13 for a failback, WaitingToCompleteInitialReplication
// 2 for StartReplication); it equals `after` when there is no intermediate
// state. `after` is the state once the job succeeded.
struct Transition {
  ReplicationState during;
  ReplicationState after;
  bool operator==(const Transition&) const = default;
};

// One table: [WMI state number][operation]; nullopt = not allowed.
using TransitionRow = std::array<std::optional<Transition>, kOperationCount>;
using TransitionTable = std::array<TransitionRow, kReplicationStateCount>;

// The table of `mode`. `mode` must be one of the four (asserted).
const TransitionTable& TableFor(TableMode mode);

// Checks `op` in `state` under `mode`. OK: the transition. Not allowed:
// FailedPrecondition (32775 InvalidState) naming the operation, the state
// (name and number), the mode and the states where it is allowed, e.g.
//   "InitiateFailover is not allowed in state Disabled (0) of a Replica
//    relationship; allowed in: Replicating (3), Suspended (7),
//    Resynchronizing (10), WaitingForUpdateCompletion (15)".
// A mode, state or operation outside its enum: InvalidArgument.
Result<Transition> CheckTransition(TableMode mode, ReplicationState state, Operation op);

// The states in which `op` is allowed under `mode`, in numeric order
// (empty for an undefined mode or operation).
std::vector<ReplicationState> AllowedStates(TableMode mode, Operation op);

}  // namespace vmreplica
