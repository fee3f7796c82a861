// Client for the QEMU guest agent (qemu-ga) over the host end of its
// virtio-serial channel, a unix socket served by QEMU
// (-chardev socket,path=...,server=on,wait=off + virtserialport
// name=org.qemu.guest_agent.0).
//
// The agent speaks QMP-style JSON ({"execute": ...} -> {"return": ...} or
// {"error": {"class", "desc"}}, one object per line) but sends no greeting,
// and the channel may hold stale bytes: a reply to an earlier client, or a
// half-sent request. Before the first command, and after any failure, the
// client resynchronises: it sends 0xFF (the agent's parser drops what it
// holds) and guest-sync-delimited with a random id; the agent answers 0xFF
// followed by {"return": id}; everything before it is discarded.
//
// Used to freeze guest file systems around a cut (application-consistent
// point). When the agent does not answer in time the caller takes a
// crash-consistent point instead: every call then returns Unavailable.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "vmreplica/status.h"

namespace vmreplica {

// One connection to a guest agent socket. QEMU serves one client at a time
// on it: hold one client per guest.
//
// Thread safety: not thread-safe; one owner.
//
// Errors of every call:
//   agent silent until the timeout, socket closed  -> Unavailable
//   malformed or oversized reply (> 1 MiB)          -> Corruption
//   agent error reply -> NotSupported for CommandNotFound, FailedPrecondition
//                        otherwise; the message holds "qga <command>:
//                        <class>: <desc>".
class GuestAgentClient {
 public:
  // Connects to the unix socket. Unavailable when nobody listens within
  // `timeout` (does not talk to the agent yet).
  static Result<std::unique_ptr<GuestAgentClient>> Connect(const std::string& socket,
                                                           std::chrono::milliseconds timeout);
  ~GuestAgentClient();
  GuestAgentClient(const GuestAgentClient&) = delete;
  GuestAgentClient& operator=(const GuestAgentClient&) = delete;

  // Resynchronises (guest-sync-delimited with a random id), then guest-ping.
  Status Ping(std::chrono::milliseconds timeout);
  // guest-fsfreeze-freeze: the number of file systems frozen. If this fails
  // with Unavailable the guest may still end up frozen: call
  // ThawFileSystems (the agent has no freeze time limit of its own).
  Result<int> FreezeFileSystems(std::chrono::milliseconds timeout);
  // guest-fsfreeze-thaw: the number of file systems thawed.
  Result<int> ThawFileSystems(std::chrono::milliseconds timeout);
  // guest-fsfreeze-status: "thawed" or "frozen".
  Result<std::string> FreezeStatus(std::chrono::milliseconds timeout);

  // Runs any agent command (resynchronising first when needed) and returns
  // its "return" member.
  Result<nlohmann::json> Execute(const std::string& command, const nlohmann::json& arguments,
                                 std::chrono::milliseconds timeout);

 private:
  using Clock = std::chrono::steady_clock;
  explicit GuestAgentClient(int fd);
  Status Sync(Clock::time_point deadline);
  Status Send(const std::string& bytes, Clock::time_point deadline);
  // Reads one '\n'-terminated line from the channel.
  Result<std::string> ReadLine(Clock::time_point deadline);
  Status Fill(Clock::time_point deadline);

  const int fd_;
  std::string buffer_;  // received, not yet consumed
  bool synced_ = false;
};

}  // namespace vmreplica
