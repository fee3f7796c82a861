#include "service/authorization.h"

namespace vmreplica::service {
namespace {

// Higher is more specific: exact names outrank every wildcard.
size_t Specificity(const std::string& pattern) {
  if (pattern == "*") return 0;
  if (pattern.rfind("*.", 0) == 0) return pattern.size();
  return 100000 + pattern.size();
}

}  // namespace

std::optional<AuthorizationEntry> FindAuthorization(const std::vector<AuthorizationEntry>& entries,
                                                    const std::vector<std::string>& peer_names) {
  const AuthorizationEntry* best = nullptr;
  for (const auto& e : entries) {
    for (const auto& name : peer_names) {
      if (!HostMatchesPattern(name, e.allowed_primary_host_system)) continue;
      if (!best || Specificity(e.allowed_primary_host_system) > Specificity(best->allowed_primary_host_system)) {
        best = &e;
      }
    }
  }
  if (!best) return std::nullopt;
  return *best;
}

}  // namespace vmreplica::service
