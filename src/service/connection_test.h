// TestReplicationConnection: can replication be enabled to that server?
#pragma once

#include <nlohmann/json.hpp>

#include "service/service_env.h"

namespace vmreplica::service {

// Checks, in order, and stops at the first failure:
//   1. TCP reachability            -> Unavailable (32777) / Timeout (32772)
//   2. TLS: the server's chain against our CA, its name against `host`,
//      and that it accepts our certificate    -> PermissionDenied (32769)
//   3. Hello over gRPC: protocol version      -> NotSupported (32770)
//   4. the remote is a replica server         -> Unavailable (32777)
//   5. it accepts certificates and authorises our name -> PermissionDenied
// On success returns what was learnt (remote name, certificate, protocol,
// matching entry) as a JSON object.
Result<nlohmann::json> TestConnection(const ServiceEnv& env, const std::string& host, uint16_t port);

}  // namespace vmreplica::service
