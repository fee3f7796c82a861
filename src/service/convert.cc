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

Result<RelationshipSettings> FromProto(const v1::RelationshipSettings& p) {
  RelationshipSettings s;
  s.recovery_connection_point = p.recovery_connection_point();
  s.recovery_server_port = p.recovery_server_port_number();
  auto auth = Parse<AuthenticationType>(std::to_string(p.authentication_type()));
  if (!auth) {
    return Status::InvalidArgument("AuthenticationType: " + std::to_string(p.authentication_type()) +
                                   " is not one of 1 (Kerberos), 2 (Certificate)");
  }
  s.authentication_type = *auth;
  s.certificate_thumbprint = p.certificate_thumbprint();
  s.compression_enabled = p.compression_enabled();
  s.replication_interval_s = p.replication_interval();
  s.recovery_history = p.recovery_history();
  s.application_consistent_snapshot_interval_h = p.application_consistent_snapshot_interval();
  s.included_disks.assign(p.included_disks().begin(), p.included_disks().end());
  s.auto_resynchronize_enabled = p.auto_resynchronize_enabled();
  s.auto_resynchronize_interval_start_min = p.auto_resynchronize_interval_start_min();
  s.auto_resynchronize_interval_end_min = p.auto_resynchronize_interval_end_min();
  s.enable_write_order_preservation_across_disks = p.enable_write_order_preservation_across_disks();
  s.bypass_proxy_server = p.bypass_proxy_server();
  s.replicate_host_kvp_items = p.replicate_host_kvp_items();
  return s;
}

void ToProto(const RelationshipSettings& s, v1::RelationshipSettings* p) {
  p->set_recovery_connection_point(s.recovery_connection_point);
  p->set_recovery_server_port_number(s.recovery_server_port);
  p->set_authentication_type(Number(s.authentication_type));
  p->set_certificate_thumbprint(s.certificate_thumbprint);
  p->set_compression_enabled(s.compression_enabled);
  p->set_replication_interval(s.replication_interval_s);
  p->set_recovery_history(s.recovery_history);
  p->set_application_consistent_snapshot_interval(s.application_consistent_snapshot_interval_h);
  for (const auto& d : s.included_disks) p->add_included_disks(d);
  p->set_auto_resynchronize_enabled(s.auto_resynchronize_enabled);
  p->set_auto_resynchronize_interval_start_min(s.auto_resynchronize_interval_start_min);
  p->set_auto_resynchronize_interval_end_min(s.auto_resynchronize_interval_end_min);
  p->set_enable_write_order_preservation_across_disks(s.enable_write_order_preservation_across_disks);
  p->set_bypass_proxy_server(s.bypass_proxy_server);
  p->set_replicate_host_kvp_items(s.replicate_host_kvp_items);
  p->set_recovery_host_system(s.recovery_host_system);
  p->set_primary_connection_point(s.primary_connection_point);
  p->set_primary_host_system(s.primary_host_system);
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
