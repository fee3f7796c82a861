#include "protoconv/settings_convert.h"

#include <string>

namespace vmreplica {

Result<RelationshipSettings> RelationshipSettingsFromProto(const v1::RelationshipSettings& p) {
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

void RelationshipSettingsToProto(const RelationshipSettings& s, v1::RelationshipSettings* p) {
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

}  // namespace vmreplica
