#include "service/admin_auth.h"

#include <spdlog/spdlog.h>

#include "service/tls.h"
#include "vmreplica/model/enums.h"
#include "vmreplica/model/settings.h"

namespace vmreplica::service {

bool AuthorizeAdmin(const ServiceEnv& env, bool remote, const grpc::ServerContext& context, const char* method,
                    v1::MethodResult* result) {
  if (!remote) return true;  // the local socket is mode 0600, owned by the daemon's user
  std::vector<std::string> names = PeerNames(context);
  for (const auto& pattern : env.options.remote_admin_principals) {
    for (const auto& n : names) {
      if (HostMatchesPattern(n, pattern)) return true;
    }
  }
  std::string who = names.empty() ? std::string("an unnamed peer") : names.front();
  spdlog::warn("remote {} from {} refused: not in [admin] remote_principals", method, who);
  result->set_return_value(Number(ReturnCode::kAccessDenied));
  result->set_error_description(who + " may not administer " + env.host_name +
                                " remotely (not in [admin] remote_principals)");
  return false;
}

}  // namespace vmreplica::service
