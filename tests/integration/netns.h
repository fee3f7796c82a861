// Two network namespaces joined by a veth pair: a two-host network for
// multi-process tests (run daemons inside with DaemonSpec::exec_prefix).
//
// Needs root and iproute2's `ip` (/usr/sbin/ip or /sbin/ip). Create()
// answers an error naming the missing piece; tests turn it into a failure.
//
// Layout of one pair made by process P (the k-th pair of that process):
//
//   namespace vmrnt-P-k-a                namespace vmrnt-P-k-b
//     lo     127.0.0.1 (up)                lo     127.0.0.1 (up)
//     veth-a 10.213.N.1/24  <---- veth ---->  veth-b 10.213.N.2/24
//
// N = 1 + P % 250. The namespaces are isolated from each other and from the
// root namespace, so two processes with the same N do not clash; N only
// keeps the addresses of parallel tests apart in logs. The veth ends are
// created directly inside the namespaces: no interface ever appears in the
// root namespace. Only these two addresses are used as traffic targets.
//
// Cleanup: the destructor deletes both namespaces (the veth pair goes with
// them), also when the test failed. Processes still running inside keep
// their namespace alive until they exit, so stop them first. Create() also
// deletes pairs left by an earlier test process of this fixture that died
// (names vmrnt-<pid>-* whose pid no longer exists).
//
// Thread safety: not thread-safe; one owner (the test body or fixture).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "vmreplica/status.h"

namespace vmreplica::testing {

class NetnsPair {
 public:
  enum class Side { kA, kB };

  // Creates both namespaces, the veth pair, the addresses, and brings lo and
  // the veth ends up. PermissionDenied when not root, NotFound when `ip` is
  // missing, Internal with ip's stderr when a step fails (everything made so
  // far is deleted again).
  static Result<std::unique_ptr<NetnsPair>> Create();

  ~NetnsPair();
  NetnsPair(const NetnsPair&) = delete;
  NetnsPair& operator=(const NetnsPair&) = delete;

  // Namespace name and veth address ("10.213.N.1" / "10.213.N.2").
  const std::string& name(Side side) const { return side == Side::kA ? ns_a_ : ns_b_; }
  const std::string& address(Side side) const { return side == Side::kA ? addr_a_ : addr_b_; }

  // {"<ip>", "netns", "exec", "<namespace>"}: an argv prefix that runs a
  // program inside that namespace in the same process (ip execs it).
  std::vector<std::string> ExecPrefix(Side side) const;

  // Sets both veth ends down: from then on neither address can reach the
  // other (connects fail or time out). Internal with ip's stderr on failure.
  Status LinkDown();
  // Sets both veth ends up and waits (up to 10 s) until both report carrier
  // (LOWER_UP). Internal / Timeout on failure.
  Status LinkUp();

 private:
  NetnsPair() = default;
  Status Build();
  // Runs `ip args...`; Internal with the command and its stderr on failure.
  Status Ip(const std::vector<std::string>& args) const;
  Result<bool> HasCarrier(Side side) const;

  // Constant after Create().
  std::string ip_;
  std::string ns_a_;
  std::string ns_b_;
  std::string addr_a_;
  std::string addr_b_;
  bool made_a_ = false;
  bool made_b_ = false;
};

}  // namespace vmreplica::testing
