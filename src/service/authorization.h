// Which authorization entry lets a primary replicate here.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "vmreplica/model/settings.h"

namespace vmreplica::service {

// The most specific entry that matches any of the peer's certificate names:
// an exact host name beats a wildcard, a longer wildcard suffix beats a
// shorter one, and "*" comes last. nullopt when nothing matches.
std::optional<AuthorizationEntry> FindAuthorization(const std::vector<AuthorizationEntry>& entries,
                                                    const std::vector<std::string>& peer_names);

}  // namespace vmreplica::service
