// Parsing of command-line values (times, HH:MM, authentication types, host
// and port) and the mapping of the relationship options of `enable`, `set`,
// `reverse` and `failback` onto RelationshipSettings. Pure functions: every
// error is InvalidArgument with a message meant for the operator, which the
// commands print as a usage error (exit 2).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "vmreplica/model/enums.h"
#include "vmreplica/status.h"
#include "vmreplica/types.pb.h"

namespace vmreplica::cli {

// A start time (`--at`): "now" (-> 0, which the API reads as "now"), Unix
// seconds (decimal digits), or ISO 8601 "YYYY-MM-DD[(T| )HH:MM[:SS[.fff]]]"
// with an optional zone "Z", "+HH:MM", "+HHMM" or "+HH". Without a zone
// the time is local (the time zone of this process), as Hyper-V reads
// StartTime. Fractions of a second are dropped. Returns Unix seconds.
Result<int64_t> ParseTimeArg(std::string_view text);

// "HH:MM" (24-hour, one or two hour digits) -> minutes after midnight, 0..1439.
Result<uint32_t> ParseHhMm(std::string_view text);

// "HH:MM-HH:MM" -> {start, end} minutes; the window may wrap past midnight
// ("18:30-06:00") but may not be empty (start == end).
Result<std::pair<uint32_t, uint32_t>> ParseHhMmRange(std::string_view text);

// Per-relationship authentication: "certificate", "kerberos", their WMI
// names or numbers (1, 2), case-insensitive.
Result<AuthenticationType> ParseVmAuth(std::string_view text);

// Replica-server AllowedAuthenticationType: "none", "kerberos",
// "certificate", "both", a WMI name ("KerberosAndCertificate") or 0..3.
Result<AllowedAuthenticationType> ParseServerAuth(std::string_view text);

// "host:port" or "[ipv6]:port", port 1..65535. `host` comes back without
// brackets.
struct HostPort {
  std::string host;
  uint16_t port = 0;
};
Result<HostPort> ParseHostPort(std::string_view text);

// A decimal number in [min, max] (no sign, no spaces).
Result<uint32_t> ParseUint(std::string_view text, uint32_t min, uint32_t max, std::string_view what);

// A certificate thumbprint as Windows shows it, with spaces or colons
// removed and upper-cased ("a1 b2" -> "A1B2"). Not otherwise checked.
std::string NormalizeThumbprint(std::string_view text);

// The relationship options the operator gave; unset = keep the base value.
struct RelationshipOptions {
  std::optional<std::string> replica_server;      // --replica-server
  std::optional<uint32_t> replica_port;           // --replica-port
  std::optional<std::string> auth;                // --auth
  std::optional<std::string> thumbprint;          // --thumbprint
  std::optional<uint32_t> interval_s;             // --interval
  std::optional<uint32_t> history;                // --history
  std::optional<uint32_t> vss_hours;              // --vss-hours
  std::optional<bool> compression;                // --compression / --no-compression
  std::vector<std::string> disks;                 // --disk (empty = keep)
  std::optional<bool> auto_resync;                // --auto-resync / --no-auto-resync
  std::optional<std::string> auto_resync_window;  // --auto-resync-window HH:MM-HH:MM
  std::optional<bool> bypass_proxy;               // --bypass-proxy
  std::optional<bool> replicate_host_kvp;         // --replicate-host-kvp / --no-replicate-host-kvp
};

// Hyper-V's defaults (vmreplica::RelationshipSettings{}): certificate
// authentication, compression on, 300 s, latest point only, auto-resync off
// with the 18:30-06:00 window, write order preserved, host KVP replicated.
v1::RelationshipSettings DefaultRelationshipSettings();

// Applies `options` on top of `base`. `creating` is true for `enable`: then
// a recovery history without --vss-hours gets the default application-
// consistent interval of 4 hours. Whatever the options, the read-only
// fields are cleared, write order preservation stays on, and a history of
// 0 turns application-consistent snapshots off unless --vss-hours asked
// for them (which is an error). Option values are range-checked here
// (interval 30/300/900, history 0..24, vss 0..12, port 1..65535, auth,
// window); the full rules are the daemon's (ValidateRelationshipSettings).
Result<v1::RelationshipSettings> ApplyRelationshipOptions(const RelationshipOptions& options,
                                                          v1::RelationshipSettings base, bool creating);

}  // namespace vmreplica::cli
