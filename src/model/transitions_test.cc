#include "vmreplica/model/transitions.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <initializer_list>
#include <map>
#include <set>
#include <string>

namespace vmreplica {
namespace {

using O = Operation;
using M = TableMode;

// ---- A second, independent encoding of the rules -----------------------
//
// Written straight from the brief and the reference text, in a different
// style from src/model/transitions.cc (which is a rule table expanded to
// bit masks): one predicate per operation, plain WMI numbers, and if/else.
// The walk below compares both in every cell, so a slip in either shows.

struct Cell {
  int during;
  int after;
};
using Spec = std::function<std::optional<Cell>(M mode, int state)>;

bool In(int s, std::initializer_list<int> states) {
  return std::find(states.begin(), states.end(), s) != states.end();
}
std::optional<Cell> To(int after) { return Cell{after, after}; }
std::optional<Cell> Via(int during, int after) { return Cell{during, after}; }
bool IsPrimary(M m) { return m == M::kPrimary; }
bool IsReceiver(M m) { return m == M::kReplica || m == M::kExtendedReplica; }
bool IsRelationship(M m) { return IsPrimary(m) || IsReceiver(m); }

const std::map<O, Spec>& Specs() {
  static const auto* specs = new std::map<O, Spec>{
      // "Create 0->1" on the primary; "never allowed" on the extended replica.
      {O::kCreateReplicationRelationship,
       [](M m, int s) { return IsPrimary(m) && s == 0 ? To(1) : std::nullopt; }},
      // "StartReplication 1->(during 2)->2".
      {O::kStartReplication, [](M m, int s) { return IsPrimary(m) && s == 1 ? Via(2, 2) : std::nullopt; }},
      // "ImportInitialReplica 2 -> 3" on the replica (and extended replica).
      {O::kImportInitialReplica, [](M m, int s) { return IsReceiver(m) && s == 2 ? To(3) : std::nullopt; }},
      // "InitiateFailover from 3,7,10,15 -> during 12 -> 5".
      {O::kInitiateFailover,
       [](M m, int s) {
         return IsReceiver(m) && In(s, {3, 7, 10, 15}) ? Via(12, 5) : std::nullopt;
       }},
      // Primary: "RevertFailover 4->3"; replica: "RevertFailover 5 -> 3".
      {O::kRevertFailover,
       [](M m, int s) -> std::optional<Cell> {
         if (IsPrimary(m) && s == 4) return To(3);
         if (IsReceiver(m) && s == 5) return To(3);
         return std::nullopt;
       }},
      // "CommitFailover 5 -> 6".
      {O::kCommitFailover, [](M m, int s) { return IsReceiver(m) && s == 5 ? To(6) : std::nullopt; }},
      // "TestReplicaSystem from 3,7,8,9,11,16 -> unchanged".
      {O::kTestReplicaSystem,
       [](M m, int s) {
         return IsReceiver(m) && In(s, {3, 7, 8, 9, 11, 16}) ? To(s) : std::nullopt;
       }},
      // Test VM: "kDestroyTestSystem (any state -> unchanged)".
      {O::kDestroyTestSystem, [](M m, int s) { return m == M::kTestReplica ? To(s) : std::nullopt; }},
      // "ReverseReplicationRelationship from 5,6 -> 1", not on the extended replica.
      {O::kReverseReplicationRelationship,
       [](M m, int s) {
         return m == M::kReplica && In(s, {5, 6}) ? To(1) : std::nullopt;
       }},
      // "InitiateFailback from 5,6 -> during 13 -> 14", not on the extended replica.
      {O::kInitiateFailback,
       [](M m, int s) {
         return m == M::kReplica && In(s, {5, 6}) ? Via(13, 14) : std::nullopt;
       }},
      // "ChangeReplicationModeToPrimary from 6 -> 3", not on the extended replica.
      {O::kChangeReplicationModeToPrimary,
       [](M m, int s) { return m == M::kReplica && s == 6 ? To(3) : std::nullopt; }},
      // "Resynchronize from 7,8,9,11,16 -> during 10 -> 3" (primary).
      {O::kResynchronize,
       [](M m, int s) {
         return IsPrimary(m) && In(s, {7, 8, 9, 11, 16}) ? Via(10, 3) : std::nullopt;
       }},
      // "ModifyReplicationSettings in every state except 0, 12, 13".
      {O::kModifyReplicationSettings,
       [](M m, int s) {
         return IsRelationship(m) && !In(s, {0, 12, 13}) ? To(s) : std::nullopt;
       }},
      // "RemoveReplicationRelationship every state except 0, 12, 13 -> 0".
      {O::kRemoveReplicationRelationship,
       [](M m, int s) {
         return IsRelationship(m) && !In(s, {0, 12, 13}) ? To(0) : std::nullopt;
       }},
      // "Get/ResetReplicationStatistics every state except 0"; the test VM may get them in any state.
      {O::kGetReplicationStatistics,
       [](M m, int s) -> std::optional<Cell> {
         if (m == M::kTestReplica) return To(s);
         if (IsRelationship(m) && s != 0) return To(s);
         return std::nullopt;
       }},
      {O::kResetReplicationStatistics,
       [](M m, int s) { return IsRelationship(m) && s != 0 ? To(s) : std::nullopt; }},
      // "SetFailoverNetworkAdapterSettings every state (unchanged)", every mode.
      {O::kSetFailoverNetworkAdapterSettings, [](M, int s) { return To(s); }},
      // "RequestCancelInitialReplication 2->1".
      {O::kRequestCancelInitialReplication,
       [](M m, int s) { return IsPrimary(m) && s == 2 ? To(1) : std::nullopt; }},
      // "RequestMarkAsReplica 2 -> 2".
      {O::kRequestMarkAsReplica, [](M m, int s) { return IsReceiver(m) && s == 2 ? To(2) : std::nullopt; }},
      // Primary: "7->3, 8->3, 9->10, 11->10, 16->15"; replica: "7 -> 3, 8 -> 3".
      {O::kRequestResume,
       [](M m, int s) -> std::optional<Cell> {
         if (IsRelationship(m) && (s == 7 || s == 8)) return To(3);
         if (IsPrimary(m) && (s == 9 || s == 11)) return To(10);
         if (IsPrimary(m) && s == 16) return To(15);
         return std::nullopt;
       }},
      // "RequestPrepareForPlannedFailover 3->4" (primary).
      {O::kRequestPrepareForPlannedFailover,
       [](M m, int s) { return IsPrimary(m) && s == 3 ? To(4) : std::nullopt; }},
      // "suspend from 2 and 3 -> 7, from 10 -> 11"; replica "2,3 -> 7".
      {O::kRequestSuspend,
       [](M m, int s) -> std::optional<Cell> {
         if (IsRelationship(m) && (s == 2 || s == 3)) return To(7);
         if (IsPrimary(m) && s == 10) return To(11);
         return std::nullopt;
       }},
      // "RequestCancelResynchronization 10,11 -> 9".
      {O::kRequestCancelResynchronization,
       [](M m, int s) {
         return IsPrimary(m) && In(s, {10, 11}) ? To(9) : std::nullopt;
       }},
  };
  return *specs;
}

const M kModes[] = {M::kPrimary, M::kReplica, M::kExtendedReplica, M::kTestReplica};

std::string Describe(M m, int s, O op) {
  return std::string(Name(m)) + " / state " + std::to_string(s) + " / " + std::string(Name(op));
}

TEST(TransitionsTest, EveryCellMatchesTheIndependentEncoding) {
  ASSERT_EQ(Specs().size(), static_cast<std::size_t>(kOperationCount)) << "one spec per operation";
  int cells = 0;
  int allowed = 0;
  for (M m : kModes) {
    const TransitionTable& table = TableFor(m);
    for (int s = 0; s < kReplicationStateCount; ++s) {
      for (O op : AllOperations()) {
        SCOPED_TRACE(Describe(m, s, op));
        ++cells;
        const std::optional<Cell> want = Specs().at(op)(m, s);
        const std::optional<Transition>& got = table[s][static_cast<int>(op)];
        ASSERT_EQ(got.has_value(), want.has_value());
        Result<Transition> checked = CheckTransition(m, static_cast<ReplicationState>(s), op);
        EXPECT_EQ(checked.ok(), want.has_value()) << checked.status().ToString();
        if (!want) {
          EXPECT_EQ(checked.status().code(), Code::kFailedPrecondition);
          continue;
        }
        ++allowed;
        EXPECT_EQ(Number(got->during), want->during);
        EXPECT_EQ(Number(got->after), want->after);
        ASSERT_TRUE(checked.ok());
        EXPECT_EQ(*checked, *got);
      }
    }
  }
  EXPECT_EQ(cells, kTableModeCount * kReplicationStateCount * kOperationCount);
  EXPECT_GT(allowed, 0);
}

TEST(TransitionsTest, IllegalCellsNameOperationStateAndAllowedStates) {
  Result<Transition> r = CheckTransition(M::kReplica, ReplicationState::kDisabled, O::kInitiateFailover);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(r.status().message(),
            "InitiateFailover is not allowed in state Disabled (0) of a Replica relationship; allowed in: "
            "Replicating (3), Suspended (7), Resynchronizing (10), WaitingForUpdateCompletion (15)");

  r = CheckTransition(M::kExtendedReplica, ReplicationState::kDisabled, O::kCreateReplicationRelationship);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(),
            "CreateReplicationRelationship is not allowed in state Disabled (0) of an ExtendedReplica "
            "relationship; allowed in: no state");

  // Every illegal cell names the operation, the state by name and number, and the mode.
  for (M m : kModes) {
    for (ReplicationState s : AllValues<ReplicationState>()) {
      for (O op : AllOperations()) {
        Result<Transition> c = CheckTransition(m, s, op);
        if (c.ok()) continue;
        const std::string msg = c.status().message();  // status() returns a copy
        SCOPED_TRACE(msg);
        EXPECT_EQ(msg.find(std::string(Name(op)) + " is not allowed in state "), 0u);
        EXPECT_NE(msg.find(std::string(Name(s)) + " (" + std::to_string(Number(s)) + ")"), std::string::npos);
        EXPECT_NE(msg.find(" " + std::string(Name(m)) + " relationship"), std::string::npos);
        EXPECT_NE(msg.find("; allowed in: "), std::string::npos);
      }
    }
  }
}

TEST(TransitionsTest, DuringIsTheIntermediateStateOfLongOperations) {
  auto check = [](M m, ReplicationState s, O op) {
    Result<Transition> r = CheckTransition(m, s, op);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : Transition{ReplicationState::kUnknown, ReplicationState::kUnknown};
  };
  using S = ReplicationState;
  EXPECT_EQ(check(M::kReplica, S::kSuspended, O::kInitiateFailover),
            (Transition{S::kRecoveryInProgress, S::kRecovered}));
  EXPECT_EQ(check(M::kExtendedReplica, S::kWaitingForUpdateCompletion, O::kInitiateFailover),
            (Transition{S::kRecoveryInProgress, S::kRecovered}));
  EXPECT_EQ(check(M::kPrimary, S::kCritical, O::kResynchronize),
            (Transition{S::kResynchronizing, S::kReplicating}));
  EXPECT_EQ(check(M::kReplica, S::kCommitted, O::kInitiateFailback),
            (Transition{S::kFailbackInProgress, S::kFailbackComplete}));
  EXPECT_EQ(check(M::kPrimary, S::kReadyForReplication, O::kStartReplication),
            (Transition{S::kWaitingToCompleteInitialReplication, S::kWaitingToCompleteInitialReplication}));
  EXPECT_EQ(check(M::kPrimary, S::kResynchronizing, O::kRequestSuspend),
            (Transition{S::kResynchronizeSuspended, S::kResynchronizeSuspended}));
  EXPECT_EQ(check(M::kPrimary, S::kUpdateCritical, O::kRequestResume),
            (Transition{S::kWaitingForUpdateCompletion, S::kWaitingForUpdateCompletion}));
  EXPECT_EQ(check(M::kReplica, S::kRecovered, O::kReverseReplicationRelationship),
            (Transition{S::kReadyForReplication, S::kReadyForReplication}));
  EXPECT_EQ(check(M::kPrimary, S::kUnknown, O::kRemoveReplicationRelationship),
            (Transition{S::kDisabled, S::kDisabled}));
  EXPECT_EQ(check(M::kTestReplica, S::kFiredrillInProgress, O::kDestroyTestSystem),
            (Transition{S::kFiredrillInProgress, S::kFiredrillInProgress}));
}

TEST(TransitionsTest, OnlyFailoverFailbackAndResyncHaveAnIntermediateState) {
  const std::set<O> long_ops = {O::kInitiateFailover, O::kInitiateFailback, O::kResynchronize};
  for (M m : kModes) {
    for (int s = 0; s < kReplicationStateCount; ++s) {
      for (O op : AllOperations()) {
        const std::optional<Transition>& t = TableFor(m)[s][static_cast<int>(op)];
        if (!t) continue;
        EXPECT_EQ(t->during != t->after, long_ops.count(op) == 1) << Describe(m, s, op);
        EXPECT_LT(Number(t->during), kReplicationStateCount);
        EXPECT_LT(Number(t->after), kReplicationStateCount);
      }
    }
  }
}

TEST(TransitionsTest, ExtendedReplicaCannotReverseFailBackOrBecomePrimary) {
  for (O op : {O::kReverseReplicationRelationship, O::kInitiateFailback, O::kChangeReplicationModeToPrimary,
               O::kCreateReplicationRelationship}) {
    EXPECT_TRUE(AllowedStates(M::kExtendedReplica, op).empty()) << Name(op);
  }
  EXPECT_FALSE(AllowedStates(M::kReplica, O::kInitiateFailback).empty());
}

TEST(TransitionsTest, TestReplicaAllowsOnlyDestroyNetworkSettingsAndStatistics) {
  const std::set<O> allowed = {O::kDestroyTestSystem, O::kSetFailoverNetworkAdapterSettings,
                               O::kGetReplicationStatistics};
  for (O op : AllOperations()) {
    EXPECT_EQ(AllowedStates(M::kTestReplica, op).size(),
              allowed.count(op) ? static_cast<std::size_t>(kReplicationStateCount) : 0u)
        << Name(op);
  }
}

TEST(TransitionsTest, AllowedStatesAreInNumericOrder) {
  using S = ReplicationState;
  EXPECT_EQ(AllowedStates(M::kPrimary, O::kResynchronize),
            (std::vector<S>{S::kSuspended, S::kCritical, S::kWaitingForStartResynchronize,
                            S::kResynchronizeSuspended, S::kUpdateCritical}));
  EXPECT_TRUE(AllowedStates(static_cast<M>(9), O::kResynchronize).empty());
  EXPECT_TRUE(AllowedStates(M::kPrimary, static_cast<O>(99)).empty());
}

TEST(TransitionsTest, UndefinedInputsAreInvalidArguments) {
  EXPECT_EQ(
      CheckTransition(static_cast<M>(4), ReplicationState::kReplicating, O::kResynchronize).status().code(),
      Code::kInvalidArgument);
  EXPECT_EQ(
      CheckTransition(M::kPrimary, static_cast<ReplicationState>(22), O::kResynchronize).status().code(),
      Code::kInvalidArgument);
  EXPECT_EQ(CheckTransition(M::kPrimary, ReplicationState::kSuspended, static_cast<O>(23)).status().code(),
            Code::kInvalidArgument);
}

TEST(TransitionsTest, OperationNamesRoundTrip) {
  const std::vector<O>& ops = AllOperations();
  ASSERT_EQ(ops.size(), static_cast<std::size_t>(kOperationCount));
  std::set<std::string_view> names;
  for (int i = 0; i < kOperationCount; ++i) {
    EXPECT_EQ(static_cast<int>(ops[i]), i);
    EXPECT_NE(Name(ops[i]), "Undefined");
    EXPECT_TRUE(names.insert(Name(ops[i])).second);
    EXPECT_EQ(Parse<Operation>(Name(ops[i])), ops[i]);
  }
  EXPECT_EQ(Name(O::kInitiateFailover), "InitiateFailover");
  EXPECT_EQ(Name(O::kRequestPrepareForPlannedFailover), "RequestPrepareForPlannedFailover");
  EXPECT_EQ(Parse<Operation>("initiatefailover"), O::kInitiateFailover);
  EXPECT_EQ(Parse<Operation>("3"), std::nullopt);
  EXPECT_EQ(Parse<Operation>("Failover"), std::nullopt);
  EXPECT_EQ(Name(static_cast<O>(kOperationCount)), "Undefined");
  EXPECT_EQ(Name(M::kExtendedReplica), "ExtendedReplica");
  EXPECT_EQ(Name(static_cast<M>(kTableModeCount)), "Undefined");
}

TEST(TransitionsTest, EveryRequestedStateHasItsOperation) {
  using R = RequestedReplicationState;
  const std::map<R, O> want = {
      {R::kCancelInitialReplication, O::kRequestCancelInitialReplication},
      {R::kMarkAsReplica, O::kRequestMarkAsReplica},
      {R::kResume, O::kRequestResume},
      {R::kPrepareForPlannedFailover, O::kRequestPrepareForPlannedFailover},
      {R::kSuspend, O::kRequestSuspend},
      {R::kCancelResynchronization, O::kRequestCancelResynchronization},
  };
  ASSERT_EQ(want.size(), AllValues<R>().size());
  for (R r : AllValues<R>()) EXPECT_EQ(OperationForRequestedState(r), want.at(r)) << Name(r);
  EXPECT_EQ(OperationForRequestedState(static_cast<R>(5)), std::nullopt);
}

TEST(TransitionsTest, TableModeFollowsVmModeAndHop) {
  using RM = ReplicationMode;
  auto mode = [](RM vm, int hop) {
    Result<TableMode> r = TableModeFor(vm, hop);
    return r.ok() ? std::optional<TableMode>(*r) : std::nullopt;
  };
  EXPECT_EQ(mode(RM::kNone, 0), M::kPrimary);
  EXPECT_EQ(mode(RM::kPrimary, 0), M::kPrimary);
  EXPECT_EQ(mode(RM::kReplica, 0), M::kReplica);
  EXPECT_EQ(mode(RM::kReplica, 1), M::kPrimary);  // the replica sends hop 1
  EXPECT_EQ(mode(RM::kExtendedReplica, 1), M::kExtendedReplica);
  EXPECT_EQ(mode(RM::kExtendedReplica, 0), M::kExtendedReplica);
  EXPECT_EQ(mode(RM::kTestReplica, 0), M::kTestReplica);
  EXPECT_EQ(TableModeFor(RM::kPrimary, 1).status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(TableModeFor(RM::kNone, 1).status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(TableModeFor(RM::kReplica, 2).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(TableModeFor(RM::kReplica, -1).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(TableModeFor(static_cast<RM>(5), 0).status().code(), Code::kInvalidArgument);
}

TEST(TransitionsTest, FullUnplannedFailoverCycleOnTheReplica) {
  using S = ReplicationState;
  S state = S::kWaitingToCompleteInitialReplication;
  for (O op : {O::kImportInitialReplica, O::kInitiateFailover, O::kRevertFailover, O::kInitiateFailover,
               O::kCommitFailover, O::kReverseReplicationRelationship}) {
    Result<Transition> r = CheckTransition(M::kReplica, state, op);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    state = r->after;
  }
  EXPECT_EQ(state, S::kReadyForReplication);
  // The VM is now the primary of the reversed relationship.
  Result<Transition> r = CheckTransition(M::kPrimary, state, O::kStartReplication);
  ASSERT_TRUE(r.ok());
}

}  // namespace
}  // namespace vmreplica
