#include "service/peer_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "service/authorization.h"
#include "service/tls.h"

namespace vmreplica::service {

grpc::Status PeerService::Hello(grpc::ServerContext* context, const v1::HelloRequest* request,
                                v1::HelloResponse* response) {
  std::vector<std::string> names = PeerNames(*context);
  response->set_host_name(env_->host_name);
  for (const auto& n : names) response->add_peer_names(n);
  if (request->protocol_version() == 0) {
    response->set_message("protocol version 0 is not a version");
    return grpc::Status::OK;
  }
  response->set_protocol_version(std::min(request->protocol_version(), kProtocolVersion));
  for (const auto& f : request->features()) {
    if (std::find(kFeatures.begin(), kFeatures.end(), f) != kFeatures.end()) response->add_features(f);
  }

  auto settings = env_->catalog->GetServerSettings();
  auto entries = env_->catalog->ListAuthorizationEntries();
  if (!settings.ok() || !entries.ok()) {
    Status s = settings.ok() ? entries.status() : settings.status();
    spdlog::error("hello from {}: catalog: {}", fmt::join(names, ","), s.ToString());
    return grpc::Status(grpc::StatusCode::INTERNAL, "replica catalog unavailable");
  }
  response->set_recovery_server_enabled(settings->recovery_server_enabled);
  response->set_allowed_authentication_type(Number(settings->allowed_authentication_type));

  const auto allowed = settings->allowed_authentication_type;
  const bool certificates_allowed = allowed == AllowedAuthenticationType::kCertificate ||
                                    allowed == AllowedAuthenticationType::kKerberosAndCertificate;
  auto match = FindAuthorization(*entries, names);
  if (!settings->recovery_server_enabled) {
    response->set_message(env_->host_name + " is not configured as a replica server (RecoveryServerEnabled is off)");
  } else if (!certificates_allowed) {
    response->set_message(env_->host_name + " does not accept certificate authentication (AllowedAuthenticationType " +
                          std::string(Name(allowed)) + ")");
  } else if (!match) {
    response->set_message("no authorization entry on " + env_->host_name + " matches " +
                          (names.empty() ? std::string("(no certificate names)") : fmt::format("{}", fmt::join(names, ", "))));
  } else {
    response->set_authorized(true);
    response->set_authorized_by(match->allowed_primary_host_system);
    response->set_trust_group(match->trust_group);
  }
  spdlog::info("hello from {}: authorized={} {}", fmt::join(names, ","), response->authorized(),
               response->authorized() ? "by " + response->authorized_by() : response->message());
  return grpc::Status::OK;
}

}  // namespace vmreplica::service
