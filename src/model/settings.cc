#include "vmreplica/model/settings.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <set>
#include <string_view>

namespace vmreplica {
namespace {

constexpr std::size_t kMaxConnectionPointLength = 256;
constexpr std::size_t kMaxHostNameLength = 253;
constexpr std::size_t kMaxLabelLength = 63;
constexpr std::size_t kThumbprintLength = 40;
constexpr uint32_t kMaxPort = 65535;
constexpr uint32_t kMaxRecoveryHistory = 24;
constexpr uint32_t kMaxAppConsistentIntervalH = 12;
constexpr uint32_t kMinutesPerDay = 24 * 60;
constexpr std::size_t kMaxDiskNameLength = 64;
constexpr uint32_t kMinMonitoringIntervalS = 3600;
constexpr uint32_t kMaxMonitoringIntervalS = 7 * 86400;
constexpr std::size_t kMaxStorageLocationLength = 4096;
constexpr std::size_t kMaxTrustGroupLength = 256;

// The value as shown in a message: quoted, at most 64 characters, with
// anything not printable replaced by '?'.
std::string Quote(std::string_view v) {
  constexpr std::size_t kShown = 64;
  std::string out = "'";
  for (std::size_t i = 0; i < v.size() && i < kShown; ++i) {
    const char c = v[i];
    out += (c >= 0x20 && c < 0x7f) ? c : '?';
  }
  if (v.size() > kShown) out += "...";
  out += "'";
  return out;
}

std::string Field(const char* field, const std::string& detail) { return std::string(field) + ": " + detail; }

Status CheckRange(const char* field, uint64_t v, uint64_t lo, uint64_t hi) {
  if (v >= lo && v <= hi) return Status::Ok();
  return Status::InvalidArgument(
      Field(field, std::to_string(v) + " is outside " + std::to_string(lo) + ".." + std::to_string(hi)));
}

bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsAlpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool IsHex(char c) { return IsDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }
char Lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

std::string ToLower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = Lower(c);
  return out;
}

enum class HostKind { kDnsName, kIPv4, kIPv6 };

// Looks like an address rather than a name: an IPv6 literal has a colon,
// an IPv4 literal only digits and dots.
HostKind KindOf(std::string_view name) {
  if (name.find(':') != std::string_view::npos) return HostKind::kIPv6;
  if (std::all_of(name.begin(), name.end(), [](char c) { return IsDigit(c) || c == '.'; })) {
    return HostKind::kIPv4;
  }
  return HostKind::kDnsName;
}

// Dotted quad, each part 0..255 without leading zeros (no octal ambiguity).
bool IsIPv4(std::string_view s) {
  int parts = 0;
  std::size_t pos = 0;
  while (true) {
    const std::size_t dot = s.find('.', pos);
    const std::string_view part =
        s.substr(pos, dot == std::string_view::npos ? std::string_view::npos : dot - pos);
    if (part.empty() || part.size() > 3 || (part.size() > 1 && part[0] == '0')) return false;
    int value = 0;
    for (char c : part) {
      if (!IsDigit(c)) return false;
      value = value * 10 + (c - '0');
    }
    if (value > 255) return false;
    ++parts;
    if (dot == std::string_view::npos) break;
    pos = dot + 1;
  }
  return parts == 4;
}

bool IsIPv6(std::string_view s) {
  if (s.size() > 45) return false;  // INET6_ADDRSTRLEN - 1
  const std::string copy(s);        // inet_pton needs a NUL-terminated string
  in6_addr addr;
  return inet_pton(AF_INET6, copy.c_str(), &addr) == 1;
}

// What is wrong with `name` as a host name, or nullopt when it is valid.
std::optional<std::string> HostNameProblem(std::string_view name) {
  if (name.empty()) return "empty";
  switch (KindOf(name)) {
    case HostKind::kIPv6:
      if (!IsIPv6(name)) return "not a valid IPv6 address";
      return std::nullopt;
    case HostKind::kIPv4:
      if (!IsIPv4(name)) return "not a valid IPv4 address";
      return std::nullopt;
    case HostKind::kDnsName:
      break;
  }
  if (name.size() > kMaxHostNameLength) {
    return "longer than " + std::to_string(kMaxHostNameLength) + " characters";
  }
  std::size_t pos = 0;
  while (true) {
    const std::size_t dot = name.find('.', pos);
    const std::string_view label =
        name.substr(pos, dot == std::string_view::npos ? std::string_view::npos : dot - pos);
    if (label.empty()) return "empty label";
    if (label.size() > kMaxLabelLength) {
      return "label " + Quote(label) + " is longer than " + std::to_string(kMaxLabelLength) + " characters";
    }
    for (char c : label) {
      if (!IsAlpha(c) && !IsDigit(c) && c != '-') {
        return "label " + Quote(label) + " has a character other than letters, digits and '-'";
      }
    }
    if (label.front() == '-' || label.back() == '-') {
      return "label " + Quote(label) + " starts or ends with '-'";
    }
    if (dot == std::string_view::npos) break;
    pos = dot + 1;
  }
  return std::nullopt;
}

// What is wrong with `pattern` as a host pattern, or nullopt when valid.
std::optional<std::string> HostPatternProblem(std::string_view pattern) {
  if (pattern == "*") return std::nullopt;
  const bool wildcard = pattern.starts_with("*.");
  const std::string_view rest = wildcard ? pattern.substr(2) : pattern;
  if (rest.find('*') != std::string_view::npos) return "'*' is allowed only as the whole first label";
  if (wildcard && KindOf(rest) != HostKind::kDnsName) return "a wildcard needs a DNS name after '*.'";
  return HostNameProblem(rest);
}

Status CheckThumbprint(const std::string& thumbprint) {
  if (thumbprint.size() != kThumbprintLength || !std::all_of(thumbprint.begin(), thumbprint.end(), IsHex)) {
    return Status::InvalidArgument(
        Field("CertificateThumbPrint",
              Quote(thumbprint) + " is not " + std::to_string(kThumbprintLength) + " hexadecimal digits"));
  }
  return Status::Ok();
}

Status CheckInterval(uint32_t interval_s, bool extended, uint32_t primary_interval_s) {
  constexpr const char* kField = "ReplicationInterval";
  if (!extended) {
    if (interval_s == 30 || interval_s == 300 || interval_s == 900) return Status::Ok();
    return Status::InvalidArgument(Field(kField, std::to_string(interval_s) + " is not one of 30, 300, 900"));
  }
  if (interval_s != 300 && interval_s != 900) {
    return Status::InvalidArgument(
        Field(kField, std::to_string(interval_s) + " is not one of 300, 900 (extended relationship)"));
  }
  if (interval_s < primary_interval_s) {
    return Status::InvalidArgument(Field(kField, std::to_string(interval_s) +
                                                     " is shorter than the primary relationship's " +
                                                     std::to_string(primary_interval_s)));
  }
  return Status::Ok();
}

Status CheckAppConsistentInterval(const RelationshipSettings& s, bool extended) {
  constexpr const char* kField = "ApplicationConsistentSnapshotInterval";
  const uint32_t v = s.application_consistent_snapshot_interval_h;
  VMR_RETURN_IF_ERROR(CheckRange(kField, v, 0, kMaxAppConsistentIntervalH));
  if (v == 0) return Status::Ok();
  if (extended) {
    return Status::InvalidArgument(
        Field(kField, std::to_string(v) + " must be 0 on an extended relationship"));
  }
  if (s.recovery_history == 0) {
    return Status::InvalidArgument(Field(kField, std::to_string(v) + " needs RecoveryHistory > 0"));
  }
  return Status::Ok();
}

Status CheckIncludedDisks(const std::vector<std::string>& disks) {
  constexpr const char* kField = "IncludedDisks";
  std::set<std::string_view> seen;
  for (std::size_t i = 0; i < disks.size(); ++i) {
    const std::string& d = disks[i];
    if (d.empty()) return Status::InvalidArgument(Field(kField, "entry " + std::to_string(i) + " is empty"));
    if (d.size() > kMaxDiskNameLength) {
      return Status::InvalidArgument(
          Field(kField, Quote(d) + " is longer than " + std::to_string(kMaxDiskNameLength) + " characters"));
    }
    for (char c : d) {
      if (!IsAlpha(c) && !IsDigit(c) && c != '.' && c != '_' && c != '-') {
        return Status::InvalidArgument(
            Field(kField, Quote(d) + " has a character other than letters, digits, '.', '_' and '-'"));
      }
    }
    if (d == "." || d == "..") {
      return Status::InvalidArgument(Field(kField, Quote(d) + " is not a disk name"));
    }
    if (!seen.insert(d).second) return Status::InvalidArgument(Field(kField, Quote(d) + " is listed twice"));
  }
  return Status::Ok();
}

Status CheckStorageLocation(const std::string& path) {
  constexpr const char* kField = "ReplicaStorageLocation";
  if (path.empty()) return Status::InvalidArgument(Field(kField, "must not be empty"));
  if (path.size() > kMaxStorageLocationLength) {
    return Status::InvalidArgument(
        Field(kField, "is longer than " + std::to_string(kMaxStorageLocationLength) + " characters"));
  }
  for (char c : path) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      return Status::InvalidArgument(Field(kField, Quote(path) + " has a control character"));
    }
  }
  if (path[0] != '/') return Status::InvalidArgument(Field(kField, Quote(path) + " is not an absolute path"));
  if (path == "/") return Status::Ok();
  if (path.back() == '/') {
    return Status::InvalidArgument(Field(kField, Quote(path) + " is not normalised: trailing '/'"));
  }
  std::size_t pos = 1;
  while (true) {
    const std::size_t slash = path.find('/', pos);
    const std::string_view part =
        std::string_view(path).substr(pos, slash == std::string::npos ? std::string::npos : slash - pos);
    if (part.empty()) return Status::InvalidArgument(Field(kField, Quote(path) + " is not normalised: '//'"));
    if (part == "." || part == "..") {
      return Status::InvalidArgument(
          Field(kField, Quote(path) + " is not normalised: component " + Quote(part)));
    }
    if (slash == std::string::npos) break;
    pos = slash + 1;
  }
  return Status::Ok();
}

Status CheckTrustGroup(const std::string& group) {
  constexpr const char* kField = "TrustGroup";
  if (group.size() > kMaxTrustGroupLength) {
    return Status::InvalidArgument(
        Field(kField, "is longer than " + std::to_string(kMaxTrustGroupLength) + " characters"));
  }
  for (std::size_t i = 0; i < group.size(); ++i) {
    const auto u = static_cast<unsigned char>(group[i]);
    if (u < 0x20 || u >= 0x7f) {
      return Status::InvalidArgument(Field(
          kField, "character " + std::to_string(i) + " of " + Quote(group) + " is not printable ASCII"));
    }
  }
  return Status::Ok();
}

}  // namespace

Status ValidateHostName(const std::string& name, const char* field) {
  if (name.empty()) return Status::InvalidArgument(Field(field, "must not be empty"));
  if (std::optional<std::string> problem = HostNameProblem(name)) {
    return Status::InvalidArgument(Field(field, Quote(name) + " is not a valid host name: " + *problem));
  }
  return Status::Ok();
}

Status ValidateHostPattern(const std::string& pattern, const char* field) {
  if (pattern.empty()) return Status::InvalidArgument(Field(field, "must not be empty"));
  if (std::optional<std::string> problem = HostPatternProblem(pattern)) {
    return Status::InvalidArgument(
        Field(field, Quote(pattern) + " is not a valid host pattern: " + *problem));
  }
  return Status::Ok();
}

bool HostMatchesPattern(const std::string& host, const std::string& pattern) {
  if (HostNameProblem(host) || HostPatternProblem(pattern)) return false;
  if (pattern == "*") return true;
  const std::string h = ToLower(host);
  const std::string p = ToLower(pattern);
  if (p.starts_with("*.")) {
    const std::string_view suffix = std::string_view(p).substr(1);  // ".example.com"
    // At least one whole label before the suffix (a valid host name has no
    // empty label, so anything longer than the suffix has one).
    return h.size() > suffix.size() && h.ends_with(suffix);
  }
  return h == p;
}

Status ValidateRelationshipSettings(const RelationshipSettings& s, bool extended,
                                    uint32_t primary_interval_s) {
  if (s.recovery_connection_point.empty()) {
    return Status::InvalidArgument("RecoveryConnectionPoint: must not be empty");
  }
  if (s.recovery_connection_point.size() > kMaxConnectionPointLength) {
    return Status::InvalidArgument("RecoveryConnectionPoint: is longer than " +
                                   std::to_string(kMaxConnectionPointLength) + " characters");
  }
  VMR_RETURN_IF_ERROR(ValidateHostName(s.recovery_connection_point, "RecoveryConnectionPoint"));
  VMR_RETURN_IF_ERROR(CheckRange("RecoveryServerPortNumber", s.recovery_server_port, 1, kMaxPort));

  switch (s.authentication_type) {
    case AuthenticationType::kKerberos:
      if (!s.certificate_thumbprint.empty()) VMR_RETURN_IF_ERROR(CheckThumbprint(s.certificate_thumbprint));
      break;
    case AuthenticationType::kCertificate:
      if (s.certificate_thumbprint.empty()) {
        return Status::InvalidArgument("CertificateThumbPrint: required for certificate authentication (2)");
      }
      VMR_RETURN_IF_ERROR(CheckThumbprint(s.certificate_thumbprint));
      break;
    default:
      return Status::InvalidArgument("AuthenticationType: " + std::to_string(Number(s.authentication_type)) +
                                     " is not 1 (Kerberos) or 2 (Certificate)");
  }

  VMR_RETURN_IF_ERROR(CheckInterval(s.replication_interval_s, extended, primary_interval_s));
  VMR_RETURN_IF_ERROR(CheckRange("RecoveryHistory", s.recovery_history, 0, kMaxRecoveryHistory));
  VMR_RETURN_IF_ERROR(CheckAppConsistentInterval(s, extended));
  VMR_RETURN_IF_ERROR(CheckIncludedDisks(s.included_disks));
  VMR_RETURN_IF_ERROR(CheckRange("AutoResynchronizeIntervalStart", s.auto_resynchronize_interval_start_min, 0,
                                 kMinutesPerDay - 1));
  VMR_RETURN_IF_ERROR(CheckRange("AutoResynchronizeIntervalEnd", s.auto_resynchronize_interval_end_min, 0,
                                 kMinutesPerDay - 1));
  if (s.auto_resynchronize_interval_start_min == s.auto_resynchronize_interval_end_min) {
    return Status::InvalidArgument(
        "AutoResynchronizeIntervalEnd: " + std::to_string(s.auto_resynchronize_interval_end_min) +
        " equals AutoResynchronizeIntervalStart; the window would be empty");
  }
  if (!s.enable_write_order_preservation_across_disks) {
    return Status::InvalidArgument("EnableWriteOrderPreservationAcrossDisks: must be true");
  }
  return Status::Ok();
}

Status ValidateServerSettings(const ServerSettings& s) {
  VMR_RETURN_IF_ERROR(CheckRange("AllowedAuthenticationType", Number(s.allowed_authentication_type), 0, 3));
  VMR_RETURN_IF_ERROR(CheckRange("HttpPort", s.http_port, 1, kMaxPort));
  VMR_RETURN_IF_ERROR(CheckRange("HttpsPort", s.https_port, 1, kMaxPort));
  VMR_RETURN_IF_ERROR(CheckRange("MonitoringInterval", s.monitoring_interval_s, kMinMonitoringIntervalS,
                                 kMaxMonitoringIntervalS));
  VMR_RETURN_IF_ERROR(CheckRange("MonitoringStartTime", s.monitoring_start_time_min, 0, kMinutesPerDay - 1));
  return Status::Ok();
}

Status ValidateAuthorizationEntry(const AuthorizationEntry& e) {
  VMR_RETURN_IF_ERROR(ValidateHostPattern(e.allowed_primary_host_system, "AllowedPrimaryHostSystem"));
  VMR_RETURN_IF_ERROR(CheckStorageLocation(e.replica_storage_location));
  VMR_RETURN_IF_ERROR(CheckTrustGroup(e.trust_group));
  return Status::Ok();
}

}  // namespace vmreplica
