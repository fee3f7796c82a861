// Settings objects of the replication service (reference section 4) and
// their validation. Validation answers InvalidArgument (32773 at the API)
// with a message that names the field, e.g.
//   "ReplicationInterval: 60 is not one of 30, 300, 900".
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "vmreplica/model/enums.h"
#include "vmreplica/status.h"

namespace vmreplica {

// Msvm_ReplicationSettingData, one per relationship.
struct RelationshipSettings {
  std::string recovery_connection_point;   // replica server host name, <= 256 chars
  uint32_t recovery_server_port = 0;       // 1..65535, must be set
  AuthenticationType authentication_type = AuthenticationType::kCertificate;
  std::string certificate_thumbprint;      // SHA-1 hex (40 chars); required for kCertificate
  bool compression_enabled = true;
  uint32_t replication_interval_s = 300;   // 30, 300, 900 (extended: 300, 900)
  uint32_t recovery_history = 0;           // additional hourly points, 0..24
  uint32_t application_consistent_snapshot_interval_h = 0;  // 0 = off, 1..12, needs history > 0
  std::vector<std::string> included_disks; // disk names; empty = all disks
  bool auto_resynchronize_enabled = false;
  uint32_t auto_resynchronize_interval_start_min = 18 * 60 + 30;  // minutes after local midnight
  uint32_t auto_resynchronize_interval_end_min = 6 * 60;          // may wrap past midnight
  bool enable_write_order_preservation_across_disks = true;       // must stay true
  bool bypass_proxy_server = false;
  bool replicate_host_kvp_items = true;
  // Read-only, set by the service.
  std::string recovery_host_system;
  std::string primary_connection_point;
  std::string primary_host_system;
};

// Msvm_ReplicationServiceSettingData: the replica-server side of a host.
struct ServerSettings {
  bool recovery_server_enabled = false;
  AllowedAuthenticationType allowed_authentication_type = AllowedAuthenticationType::kCertificate;
  std::string certificate_thumbprint;      // the certificate the listener presents (informational)
  uint32_t http_port = 80;                 // Kerberos over HTTP; reported, not used (Kerberos unsupported)
  uint32_t https_port = 443;               // the mTLS listener's port
  uint32_t monitoring_interval_s = 12 * 3600;   // 3600 .. 7*86400
  uint32_t monitoring_start_time_min = 9 * 60;  // minutes after local midnight, 0..1439
};

// Msvm_ReplicationAuthorizationSettingData.
struct AuthorizationEntry {
  std::string allowed_primary_host_system;  // "*", "*.example.com" or an exact FQDN
  std::string replica_storage_location;     // absolute directory
  std::string trust_group;                  // may be empty
};

// Validates one relationship's settings. `extended` is true for the
// replica -> extended-replica hop; `primary_interval_s` is then the hop-0
// interval, which the extended interval may not be shorter than.
Status ValidateRelationshipSettings(const RelationshipSettings& s, bool extended,
                                    uint32_t primary_interval_s = 0);

Status ValidateServerSettings(const ServerSettings& s);

Status ValidateAuthorizationEntry(const AuthorizationEntry& e);

// Host names and patterns. A host name is an RFC 1123 name (labels of
// 1..63 letters, digits, hyphens, not starting or ending with a hyphen,
// total <= 253) or an IPv4 / bracket-less IPv6 literal. A pattern is "*",
// "*." followed by a host name, or a host name.
Status ValidateHostName(const std::string& name, const char* field);
Status ValidateHostPattern(const std::string& pattern, const char* field);

// True when `host` (case-insensitive) matches `pattern`: "*" matches every
// name; "*.example.com" matches exactly one or more labels before
// ".example.com" but not "example.com" itself; otherwise equality.
bool HostMatchesPattern(const std::string& host, const std::string& pattern);

}  // namespace vmreplica
