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
// interval, which the extended interval may not be shorter than (0 = not
// known, not checked). Returns OK or InvalidArgument for the first field
// that breaks a rule, checked in this order:
//   RecoveryConnectionPoint      non-empty, <= 256 chars, ValidateHostName
//   RecoveryServerPortNumber     1..65535
//   AuthenticationType           1 or 2
//   CertificateThumbPrint        required for 2; when set (any type), 40 hex digits
//   ReplicationInterval          30, 300, 900; extended: 300, 900 and >= primary_interval_s
//   RecoveryHistory              0..24
//   ApplicationConsistentSnapshotInterval  0..12; non-zero needs
//                                RecoveryHistory > 0; must be 0 when extended
//   IncludedDisks                each 1..64 chars of [A-Za-z0-9._-], not "."
//                                or "..", no duplicates (case-sensitive)
//   AutoResynchronizeIntervalStart / End   0..1439 each, start != end
//                                (checked even when auto-resync is off)
//   EnableWriteOrderPreservationAcrossDisks  true
// The read-only fields are not checked.
Status ValidateRelationshipSettings(const RelationshipSettings& s, bool extended,
                                    uint32_t primary_interval_s = 0);

// AllowedAuthenticationType 0..3, HttpPort and HttpsPort 1..65535,
// MonitoringInterval 3600..604800, MonitoringStartTime 0..1439. The
// thumbprint is informational and not checked.
Status ValidateServerSettings(const ServerSettings& s);

// AllowedPrimaryHostSystem per ValidateHostPattern; ReplicaStorageLocation
// absolute, normalised (no "." or ".." component, no "//", no trailing "/"
// except for "/" itself), no control characters, <= 4096 chars; TrustGroup
// <= 256 chars of printable ASCII (0x20..0x7e), may be empty.
Status ValidateAuthorizationEntry(const AuthorizationEntry& e);

// Host names and patterns. A host name is an RFC 1123 name (labels of
// 1..63 letters, digits, hyphens, not starting or ending with a hyphen,
// total <= 253, no trailing dot) or an IPv4 literal (dotted quad, no
// leading zeros) or a bracket-less IPv6 literal. A name of digits and dots
// only must be a valid IPv4 literal. A pattern is "*", "*." followed by a
// DNS host name (not an address), or a host name; '*' anywhere else
// ("a.*.com", "*foo.com") is refused. Errors are InvalidArgument starting
// with "<field>: ".
Status ValidateHostName(const std::string& name, const char* field);
Status ValidateHostPattern(const std::string& pattern, const char* field);

// True when `host` (case-insensitive) matches `pattern`: "*" matches every
// name; "*.example.com" matches exactly one or more labels before
// ".example.com" but not "example.com" itself; otherwise equality
// (textual: "::1" does not match "0::1"). False when `host` is not a valid
// host name or `pattern` not a valid pattern.
bool HostMatchesPattern(const std::string& host, const std::string& pattern);

}  // namespace vmreplica
