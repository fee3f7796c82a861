#include "service/convert.h"

#include <chrono>

namespace vmreplica::service {

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Result<ServerSettings> FromProto(const v1::ServerSettings& p) {
  ServerSettings s;
  s.recovery_server_enabled = p.recovery_server_enabled();
  auto auth = Parse<AllowedAuthenticationType>(std::to_string(p.allowed_authentication_type()));
  if (!auth) {
    return Status::InvalidArgument("AllowedAuthenticationType: " + std::to_string(p.allowed_authentication_type()) +
                                   " is not one of 0 (none), 1 (Kerberos), 2 (Certificate), 3 (both)");
  }
  s.allowed_authentication_type = *auth;
  s.certificate_thumbprint = p.certificate_thumbprint();
  s.http_port = p.http_port();
  s.https_port = p.https_port();
  s.monitoring_interval_s = p.monitoring_interval();
  s.monitoring_start_time_min = p.monitoring_start_time_min();
  return s;
}

void ToProto(const ServerSettings& s, v1::ServerSettings* p) {
  p->set_recovery_server_enabled(s.recovery_server_enabled);
  p->set_allowed_authentication_type(Number(s.allowed_authentication_type));
  p->set_certificate_thumbprint(s.certificate_thumbprint);
  p->set_http_port(s.http_port);
  p->set_https_port(s.https_port);
  p->set_monitoring_interval(s.monitoring_interval_s);
  p->set_monitoring_start_time_min(s.monitoring_start_time_min);
}

AuthorizationEntry FromProto(const v1::AuthorizationEntry& p) {
  return AuthorizationEntry{p.allowed_primary_host_system(), p.replica_storage_location(), p.trust_group()};
}

void ToProto(const AuthorizationEntry& e, v1::AuthorizationEntry* p) {
  p->set_allowed_primary_host_system(e.allowed_primary_host_system);
  p->set_replica_storage_location(e.replica_storage_location);
  p->set_trust_group(e.trust_group);
}


void ToProto(const JobRecord& j, int64_t now_ms, v1::Job* p) {
  p->set_id(j.id);
  p->set_job_type(Number(j.type));
  p->set_job_state(Number(j.state));
  p->set_percent_complete(j.percent_complete);
  p->set_error_code(j.error_code);
  p->set_error_description(j.error_description);
  p->set_cancellable(j.cancellable);
  p->set_target(j.target);
  p->set_created_unix_ms(j.created_ms);
  p->set_started_unix_ms(j.started_ms);
  p->set_finished_unix_ms(j.finished_ms);
  int64_t end = j.finished_ms ? j.finished_ms : now_ms;
  p->set_elapsed_ms(j.started_ms ? end - j.started_ms : 0);
  p->set_time_before_removal_s(j.time_before_removal_s);
  p->set_result_json(j.result_json);
}

void ToProto(const security::CertificateInfo& c, const std::string& role, v1::Certificate* p) {
  p->set_subject(c.subject);
  p->set_issuer(c.issuer);
  for (const auto& n : c.dns_names) p->add_dns_names(n);
  for (const auto& n : c.ip_addresses) p->add_ip_addresses(n);
  p->set_thumbprint(c.thumbprint_sha1);
  p->set_sha256(c.sha256_hex);
  p->set_not_before_unix(c.not_before_unix);
  p->set_not_after_unix(c.not_after_unix);
  p->set_server_authentication(c.server_auth);
  p->set_client_authentication(c.client_auth);
  p->set_role(role);
}

}  // namespace vmreplica::service
