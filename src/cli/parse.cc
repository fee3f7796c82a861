#include "cli/parse.h"

#include <algorithm>
#include <cctype>
#include <ctime>

#include "vmreplica/model/settings.h"

namespace vmreplica::cli {
namespace {

bool IsDigit(char c) { return c >= '0' && c <= '9'; }

std::string Lower(std::string_view text) {
  std::string s(text);
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// A cursor over the text of a time argument.
class Scanner {
 public:
  explicit Scanner(std::string_view text) : text_(text) {}
  bool done() const { return pos_ == text_.size(); }
  bool Peek(char c) const { return pos_ < text_.size() && text_[pos_] == c; }
  bool Take(char c) {
    if (!Peek(c)) return false;
    ++pos_;
    return true;
  }
  // Exactly `n` digits.
  bool Digits(int n, int* value) {
    if (text_.size() - pos_ < static_cast<size_t>(n)) return false;
    int v = 0;
    for (int i = 0; i < n; ++i) {
      char c = text_[pos_ + static_cast<size_t>(i)];
      if (!IsDigit(c)) return false;
      v = v * 10 + (c - '0');
    }
    pos_ += static_cast<size_t>(n);
    *value = v;
    return true;
  }
  void SkipDigits() {
    while (pos_ < text_.size() && IsDigit(text_[pos_])) ++pos_;
  }

 private:
  std::string_view text_;
  size_t pos_ = 0;
};

bool IsLeap(int y) { return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0; }

int DaysInMonth(int y, int m) {
  static constexpr int kDays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  return m == 2 && IsLeap(y) ? 29 : kDays[m - 1];
}

// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
int64_t DaysFromCivil(int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  const int64_t era = (y >= 0 ? y : y - 399) / 400;
  const unsigned yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<int64_t>(doe) - 719468;
}

Status BadTime(std::string_view text) {
  return Status::InvalidArgument("'" + std::string(text) +
                                 "' is not a time: use ISO 8601 (2025-06-01T18:30, 2025-06-01T18:30:00Z, "
                                 "2025-06-01 18:30+02:00), Unix seconds, or 'now'");
}

}  // namespace

Result<int64_t> ParseTimeArg(std::string_view text) {
  if (text == "now") return int64_t{0};
  if (!text.empty() && std::all_of(text.begin(), text.end(), IsDigit)) {
    if (text.size() > 12) return BadTime(text);  // beyond year 33000
    return static_cast<int64_t>(std::stoll(std::string(text)));
  }
  Scanner s(text);
  int year = 0, month = 0, day = 0, hour = 0, minute = 0, second = 0;
  if (!s.Digits(4, &year) || !s.Take('-') || !s.Digits(2, &month) || !s.Take('-') || !s.Digits(2, &day)) {
    return BadTime(text);
  }
  if (month < 1 || month > 12 || day < 1 || day > DaysInMonth(year, month)) return BadTime(text);
  if (s.Take('T') || s.Take(' ')) {
    if (!s.Digits(2, &hour) || !s.Take(':') || !s.Digits(2, &minute)) return BadTime(text);
    if (s.Take(':')) {
      if (!s.Digits(2, &second)) return BadTime(text);
      if (s.Take('.')) s.SkipDigits();
    }
  }
  if (hour > 23 || minute > 59 || second > 59) return BadTime(text);

  const int64_t wall = DaysFromCivil(year, static_cast<unsigned>(month), static_cast<unsigned>(day)) * 86400 +
                       hour * 3600 + minute * 60 + second;
  if (s.done()) {
    // Local time: let the C library apply the zone rules (and DST).
    std::tm tm{};
    tm.tm_year = year - 1900;
    tm.tm_mon = month - 1;
    tm.tm_mday = day;
    tm.tm_hour = hour;
    tm.tm_min = minute;
    tm.tm_sec = second;
    tm.tm_isdst = -1;
    std::time_t t = std::mktime(&tm);
    if (t == static_cast<std::time_t>(-1)) return BadTime(text);
    return static_cast<int64_t>(t);
  }
  if (s.Take('Z') || s.Take('z')) {
    if (!s.done()) return BadTime(text);
    return wall;
  }
  int sign = 0;
  if (s.Take('+')) {
    sign = 1;
  } else if (s.Take('-')) {
    sign = -1;
  } else {
    return BadTime(text);
  }
  int oh = 0, om = 0;
  if (!s.Digits(2, &oh)) return BadTime(text);
  if (s.Take(':')) {
    if (!s.Digits(2, &om)) return BadTime(text);
  } else if (!s.done() && !s.Digits(2, &om)) {
    return BadTime(text);
  }
  if (!s.done() || oh > 23 || om > 59) return BadTime(text);
  return wall - sign * (oh * 3600 + om * 60);
}

Result<uint32_t> ParseHhMm(std::string_view text) {
  auto bad = [&] {
    return Status::InvalidArgument("'" + std::string(text) + "' is not a time of day HH:MM (00:00..23:59)");
  };
  const size_t colon = text.find(':');
  if (colon == std::string_view::npos || colon == 0 || colon > 2 || text.size() - colon != 3) return bad();
  std::string_view h = text.substr(0, colon), m = text.substr(colon + 1);
  if (!std::all_of(h.begin(), h.end(), IsDigit) || !std::all_of(m.begin(), m.end(), IsDigit)) return bad();
  const uint32_t hours = static_cast<uint32_t>(std::stoul(std::string(h)));
  const uint32_t minutes = static_cast<uint32_t>(std::stoul(std::string(m)));
  if (hours > 23 || minutes > 59) return bad();
  return hours * 60 + minutes;
}

Result<std::pair<uint32_t, uint32_t>> ParseHhMmRange(std::string_view text) {
  const size_t dash = text.find('-');
  if (dash == std::string_view::npos) {
    return Status::InvalidArgument("'" + std::string(text) + "' is not a window HH:MM-HH:MM (e.g. 18:30-06:00)");
  }
  VMR_ASSIGN_OR_RETURN(uint32_t start, ParseHhMm(text.substr(0, dash)));
  VMR_ASSIGN_OR_RETURN(uint32_t end, ParseHhMm(text.substr(dash + 1)));
  if (start == end) return Status::InvalidArgument("'" + std::string(text) + "': the window is empty");
  return std::make_pair(start, end);
}

Result<AuthenticationType> ParseVmAuth(std::string_view text) {
  if (auto v = Parse<AuthenticationType>(text)) return *v;
  return Status::InvalidArgument("'" + std::string(text) +
                                 "' is not an authentication type: certificate (2) or kerberos (1)");
}

Result<AllowedAuthenticationType> ParseServerAuth(std::string_view text) {
  const std::string s = Lower(text);
  if (s == "both") return AllowedAuthenticationType::kKerberosAndCertificate;
  if (auto v = Parse<AllowedAuthenticationType>(s)) return *v;
  return Status::InvalidArgument("'" + std::string(text) +
                                 "' is not an allowed authentication type: none (0), kerberos (1), "
                                 "certificate (2) or both (3)");
}

Result<uint32_t> ParseUint(std::string_view text, uint32_t min, uint32_t max, std::string_view what) {
  auto bad = [&] {
    return Status::InvalidArgument(std::string(what) + ": '" + std::string(text) + "' is not a number in " +
                                   std::to_string(min) + ".." + std::to_string(max));
  };
  if (text.empty() || text.size() > 10 || !std::all_of(text.begin(), text.end(), IsDigit)) return bad();
  const uint64_t v = std::stoull(std::string(text));
  if (v < min || v > max) return bad();
  return static_cast<uint32_t>(v);
}

Result<HostPort> ParseHostPort(std::string_view text) {
  auto bad = [&] { return Status::InvalidArgument("'" + std::string(text) + "' is not HOST:PORT (or [IPv6]:PORT)"); };
  HostPort hp;
  std::string_view port;
  if (!text.empty() && text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') return bad();
    hp.host = std::string(text.substr(1, close - 1));
    port = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos || text.find(':') != colon) return bad();
    hp.host = std::string(text.substr(0, colon));
    port = text.substr(colon + 1);
  }
  if (hp.host.empty()) return bad();
  VMR_ASSIGN_OR_RETURN(uint32_t p, ParseUint(port, 1, 65535, "port"));
  hp.port = static_cast<uint16_t>(p);
  return hp;
}

std::string NormalizeThumbprint(std::string_view text) {
  std::string out;
  for (char c : text) {
    if (c == ' ' || c == ':') continue;
    out += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  }
  return out;
}

v1::RelationshipSettings DefaultRelationshipSettings() {
  const RelationshipSettings d;
  v1::RelationshipSettings p;
  p.set_authentication_type(Number(d.authentication_type));
  p.set_compression_enabled(d.compression_enabled);
  p.set_replication_interval(d.replication_interval_s);
  p.set_recovery_history(d.recovery_history);
  p.set_application_consistent_snapshot_interval(d.application_consistent_snapshot_interval_h);
  p.set_auto_resynchronize_enabled(d.auto_resynchronize_enabled);
  p.set_auto_resynchronize_interval_start_min(d.auto_resynchronize_interval_start_min);
  p.set_auto_resynchronize_interval_end_min(d.auto_resynchronize_interval_end_min);
  p.set_enable_write_order_preservation_across_disks(d.enable_write_order_preservation_across_disks);
  p.set_bypass_proxy_server(d.bypass_proxy_server);
  p.set_replicate_host_kvp_items(d.replicate_host_kvp_items);
  return p;
}

Result<v1::RelationshipSettings> ApplyRelationshipOptions(const RelationshipOptions& o, v1::RelationshipSettings s,
                                                          bool creating) {
  if (o.replica_server) {
    if (o.replica_server->empty()) return Status::InvalidArgument("--replica-server: empty host name");
    s.set_recovery_connection_point(*o.replica_server);
  }
  if (o.replica_port) {
    if (*o.replica_port < 1 || *o.replica_port > 65535) {
      return Status::InvalidArgument("--replica-port: " + std::to_string(*o.replica_port) + " is not in 1..65535");
    }
    s.set_recovery_server_port_number(*o.replica_port);
  }
  if (o.auth) {
    VMR_ASSIGN_OR_RETURN(AuthenticationType auth, ParseVmAuth(*o.auth));
    s.set_authentication_type(Number(auth));
  }
  if (o.thumbprint) s.set_certificate_thumbprint(NormalizeThumbprint(*o.thumbprint));
  if (o.interval_s) {
    if (*o.interval_s != 30 && *o.interval_s != 300 && *o.interval_s != 900) {
      return Status::InvalidArgument("--interval: " + std::to_string(*o.interval_s) +
                                     " is not one of 30, 300, 900 (seconds)");
    }
    s.set_replication_interval(*o.interval_s);
  }
  if (o.history) {
    if (*o.history > 24) {
      return Status::InvalidArgument("--history: " + std::to_string(*o.history) + " is not in 0..24");
    }
    s.set_recovery_history(*o.history);
  }
  if (o.vss_hours) {
    if (*o.vss_hours > 12) {
      return Status::InvalidArgument("--vss-hours: " + std::to_string(*o.vss_hours) + " is not in 0..12");
    }
    if (*o.vss_hours > 0 && s.recovery_history() == 0) {
      return Status::InvalidArgument("--vss-hours needs a recovery history: add --history N (1..24)");
    }
    s.set_application_consistent_snapshot_interval(*o.vss_hours);
  } else if (s.recovery_history() == 0) {
    s.set_application_consistent_snapshot_interval(0);
  } else if (creating && s.application_consistent_snapshot_interval() == 0) {
    s.set_application_consistent_snapshot_interval(4);
  }
  if (o.compression) s.set_compression_enabled(*o.compression);
  if (!o.disks.empty()) {
    s.clear_included_disks();
    for (const auto& d : o.disks) s.add_included_disks(d);
  }
  if (o.auto_resync) s.set_auto_resynchronize_enabled(*o.auto_resync);
  if (o.auto_resync_window) {
    VMR_ASSIGN_OR_RETURN(auto window, ParseHhMmRange(*o.auto_resync_window));
    s.set_auto_resynchronize_interval_start_min(window.first);
    s.set_auto_resynchronize_interval_end_min(window.second);
  }
  if (o.bypass_proxy) s.set_bypass_proxy_server(*o.bypass_proxy);
  if (o.replicate_host_kvp) s.set_replicate_host_kvp_items(*o.replicate_host_kvp);
  s.set_enable_write_order_preservation_across_disks(true);
  s.clear_recovery_host_system();
  s.clear_primary_connection_point();
  s.clear_primary_host_system();
  return s;
}

}  // namespace vmreplica::cli
