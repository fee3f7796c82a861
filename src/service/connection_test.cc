#include "service/connection_test.h"

#include <spdlog/spdlog.h>

#include "service/tls.h"
#include "vmreplica/peer.grpc.pb.h"

namespace vmreplica::service {

Result<nlohmann::json> TestConnection(const ServiceEnv& env, const std::string& host, uint16_t port) {
  const std::string where = JoinHostPort(host, port);
  auto probe = security::ProbeTls(host, port, env.identity, host, env.options.connect_timeout);
  if (!probe.ok()) return probe.status().WithContext(where);

  auto channel = MakeSecureChannel(host, port, env.identity);
  auto stub = v1::ReplicaPeer::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + env.options.rpc_timeout);
  v1::HelloRequest req;
  req.set_protocol_version(kProtocolVersion);
  for (const auto& f : kFeatures) req.add_features(f);
  req.set_host_name(env.host_name);
  v1::HelloResponse resp;
  grpc::Status rpc = stub->Hello(&ctx, req, &resp);
  if (!rpc.ok()) {
    if (rpc.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
      return Status::Timeout(where + ": no answer to Hello: " + rpc.error_message());
    }
    if (rpc.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
      return Status::NotSupported(where + " does not speak the vmreplica peer protocol");
    }
    return Status::Unavailable(where + ": Hello failed: " + rpc.error_message());
  }
  if (resp.protocol_version() == 0 || resp.protocol_version() > kProtocolVersion) {
    return Status::NotSupported(where + ": no common protocol version (" + resp.message() + ")");
  }
  if (!resp.recovery_server_enabled()) {
    return Status::Unavailable(where + ": " + resp.message());
  }
  if (!resp.authorized()) {
    return Status::PermissionDenied(where + ": " + resp.message());
  }
  const auto& cert = probe->server_certificate;
  nlohmann::json out = {
      {"recovery_connection_point", host},
      {"recovery_server_port_number", port},
      {"remote_host_name", resp.host_name()},
      {"remote_certificate", {{"subject", cert.subject},
                              {"issuer", cert.issuer},
                              {"thumbprint", cert.thumbprint_sha1},
                              {"not_after_unix", cert.not_after_unix}}},
      {"tls_probe_protocol", probe->protocol},
      {"tls_probe_cipher", probe->cipher},
      {"protocol_version", resp.protocol_version()},
      {"features", std::vector<std::string>(resp.features().begin(), resp.features().end())},
      {"names_seen_by_remote", std::vector<std::string>(resp.peer_names().begin(), resp.peer_names().end())},
      {"authorized_by", resp.authorized_by()},
      {"trust_group", resp.trust_group()},
  };
  spdlog::info("connection test to {} succeeded: {} authorises us by '{}'", where, resp.host_name(),
               resp.authorized_by());
  return out;
}

}  // namespace vmreplica::service
