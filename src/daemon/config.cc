#include "daemon/config.h"

#include <toml++/toml.h>

#include <filesystem>
#include <set>
#include <sstream>

#include "vmreplica/fileutil.h"
#include "vmreplica/model/settings.h"

namespace vmreplica::daemon {
namespace {

using Table = toml::table;

// Every key the file may hold, per table.
const std::map<std::string, std::set<std::string>>& KnownKeys() {
  static const std::map<std::string, std::set<std::string>> keys = {
      {"daemon", {"state_dir", "admin_socket", "log_level", "log_file"}},
      {"listener", {"address", "port", "start"}},
      {"tls", {"ca", "certificate", "key"}},
      {"admin", {"remote_principals"}},
      {"knobs", {"connect_timeout_ms", "rpc_timeout_ms", "job_workers"}},
      {"failover", {"hypervisor"}},
      {"replica", {"apply_while_receiving"}},
      {"replication", {"max_parallel_transfers", "bandwidth_limit_bytes_per_s", "bandwidth_schedule"}},
      {"testing", {"replication_interval_override_ms", "app_consistent_interval_override_ms", "import_chunk_delay_ms"}},
  };
  return keys;
}

Status CheckKeys(const Table& root) {
  for (const auto& [k, v] : root) {
    std::string key(k.str());
    auto it = KnownKeys().find(key);
    if (it == KnownKeys().end()) return Status::InvalidArgument("unknown table [" + key + "]");
    if (!v.is_table()) return Status::InvalidArgument("[" + key + "] must be a table");
    for (const auto& [k2, v2] : *v.as_table()) {
      (void)v2;
      if (!it->second.count(std::string(k2.str()))) {
        return Status::InvalidArgument("unknown key " + key + "." + std::string(k2.str()));
      }
    }
  }
  return Status::Ok();
}

// [[replication.bandwidth_schedule]]: start = "HH:MM", end = "HH:MM",
// bytes_per_s = N (0 = unlimited), days = ["mon", ...] (optional: every day).
Result<std::vector<BandwidthWindow>> ParseBandwidthSchedule(const toml::node* node) {
  static const char* kDays[] = {"sun", "mon", "tue", "wed", "thu", "fri", "sat"};
  const toml::array* arr = node ? node->as_array() : nullptr;
  if (arr == nullptr) return Status::InvalidArgument("replication.bandwidth_schedule must be an array of tables");
  if (arr->size() > 64) return Status::InvalidArgument("replication.bandwidth_schedule: at most 64 windows");
  std::vector<BandwidthWindow> out;
  for (size_t i = 0; i < arr->size(); ++i) {
    const std::string f = "replication.bandwidth_schedule[" + std::to_string(i) + "]";
    const toml::table* t = (*arr)[i].as_table();
    if (t == nullptr) return Status::InvalidArgument(f + " must be a table");
    for (const auto& [k, v] : *t) {
      (void)v;
      const std::string key(k.str());
      if (key != "start" && key != "end" && key != "bytes_per_s" && key != "days") {
        return Status::InvalidArgument("unknown key " + f + "." + key);
      }
    }
    BandwidthWindow w;
    for (const char* key : {"start", "end"}) {
      auto s = (*t)[key].value<std::string>();
      if (!s) return Status::InvalidArgument(f + "." + key + " must be a time of day \"HH:MM\"");
      auto m = ParseTimeOfDay(*s);
      if (!m.ok()) return Status::InvalidArgument(f + "." + key + ": " + m.status().message());
      (std::string(key) == "start" ? w.start_min : w.end_min) = *m;
    }
    auto rate = (*t)["bytes_per_s"].value<int64_t>();
    if (!rate || !(*t)["bytes_per_s"].is_integer() || *rate < 0 || *rate > (int64_t{1} << 40)) {
      return Status::InvalidArgument(f + ".bytes_per_s must be an integer in 0..2^40 (0 = unlimited)");
    }
    w.bytes_per_s = static_cast<uint64_t>(*rate);
    if (auto days = (*t)["days"]) {
      const toml::array* d = days.as_array();
      if (d == nullptr || d->empty()) return Status::InvalidArgument(f + ".days must be a non-empty array of sun..sat");
      w.days_mask = 0;
      for (const auto& item : *d) {
        auto name = item.value<std::string>();
        int found = -1;
        for (int k = 0; k < 7 && name; ++k) {
          if (*name == kDays[k]) found = k;
        }
        if (found < 0) return Status::InvalidArgument(f + ".days: each day is one of sun mon tue wed thu fri sat");
        w.days_mask = static_cast<uint8_t>(w.days_mask | (1u << found));
      }
    }
    out.push_back(w);
  }
  return out;
}

std::string Resolve(const std::string& p, const std::string& base) {
  if (p.empty() || p.front() == '/' || base.empty()) return p;
  return (std::filesystem::path(base) / p).lexically_normal().string();
}

Status GetString(const Table& t, const char* table, const char* key, const std::string& base, bool is_path,
                 std::string* out) {
  auto node = t[table][key];
  if (!node) return Status::Ok();
  auto v = node.value<std::string>();
  if (!v) return Status::InvalidArgument(std::string(table) + "." + key + " must be a string");
  *out = is_path ? Resolve(*v, base) : *v;
  return Status::Ok();
}

Status GetInt(const Table& t, const char* table, const char* key, int64_t lo, int64_t hi, int64_t* out, bool* found) {
  auto node = t[table][key];
  *found = false;
  if (!node) return Status::Ok();
  auto v = node.value<int64_t>();
  if (!v || !node.is_integer()) return Status::InvalidArgument(std::string(table) + "." + key + " must be an integer");
  if (*v < lo || *v > hi) {
    return Status::InvalidArgument(std::string(table) + "." + key + ": " + std::to_string(*v) + " is not in " +
                                   std::to_string(lo) + ".." + std::to_string(hi));
  }
  *out = *v;
  *found = true;
  return Status::Ok();
}

}  // namespace

Result<DaemonConfig> ParseConfig(const std::string& text, const std::string& base_dir) {
  toml::table root;
  try {
    root = toml::parse(text);
  } catch (const toml::parse_error& e) {
    std::ostringstream msg;
    msg << "TOML syntax error at line " << e.source().begin.line << ", column " << e.source().begin.column << ": "
        << e.description();
    return Status::InvalidArgument(msg.str());
  }
  VMR_RETURN_IF_ERROR(CheckKeys(root));
  DaemonConfig c;
  VMR_RETURN_IF_ERROR(GetString(root, "daemon", "state_dir", base_dir, true, &c.state_dir));
  VMR_RETURN_IF_ERROR(GetString(root, "daemon", "admin_socket", base_dir, true, &c.admin_socket));
  VMR_RETURN_IF_ERROR(GetString(root, "daemon", "log_level", base_dir, false, &c.log_level));
  VMR_RETURN_IF_ERROR(GetString(root, "daemon", "log_file", base_dir, true, &c.log_file));
  VMR_RETURN_IF_ERROR(GetString(root, "listener", "address", base_dir, false, &c.listen_address));
  VMR_RETURN_IF_ERROR(GetString(root, "tls", "ca", base_dir, true, &c.ca_file));
  VMR_RETURN_IF_ERROR(GetString(root, "tls", "certificate", base_dir, true, &c.certificate_file));
  VMR_RETURN_IF_ERROR(GetString(root, "tls", "key", base_dir, true, &c.key_file));
  {
    std::string hv = "same";
    VMR_RETURN_IF_ERROR(GetString(root, "failover", "hypervisor", base_dir, false, &hv));
    if (hv != "same" && hv != "qemu") {
      return Status::InvalidArgument("failover.hypervisor: \"same\" or \"qemu\", not \"" + hv + "\"");
    }
    c.libvirt_vms_through_libvirt = hv == "same";
  }

  static const std::set<std::string> levels = {"trace", "debug", "info", "warn", "error"};
  if (!levels.count(c.log_level)) {
    return Status::InvalidArgument("daemon.log_level: '" + c.log_level + "' is not one of trace, debug, info, warn, error");
  }
  if (c.state_dir.empty() || c.state_dir.front() != '/') {
    return Status::InvalidArgument("daemon.state_dir must be a directory path");
  }
  if (c.admin_socket.empty() || c.admin_socket.size() > 100) {
    // sun_path holds 108 bytes; leave room for the terminator.
    return Status::InvalidArgument("daemon.admin_socket must be a path of 1..100 characters");
  }
  if (c.listen_address.empty() ||
      (c.listen_address != "0.0.0.0" && c.listen_address != "::" &&
       !ValidateHostName(c.listen_address, "listener.address").ok())) {
    return Status::InvalidArgument("listener.address: '" + c.listen_address + "' is not a host name or IP address");
  }

  int64_t v = 0;
  bool found = false;
  VMR_RETURN_IF_ERROR(GetInt(root, "listener", "port", 1, 65535, &v, &found));
  if (found) c.listen_port = static_cast<uint32_t>(v);
  if (auto node = root["listener"]["start"]) {
    auto b = node.value<bool>();
    if (!b || !node.is_boolean()) return Status::InvalidArgument("listener.start must be true or false");
    c.start_listener = *b;
  }
  if (auto node = root["replica"]["apply_while_receiving"]) {
    auto b = node.value<bool>();
    if (!b || !node.is_boolean()) return Status::InvalidArgument("replica.apply_while_receiving must be true or false");
    c.apply_while_receiving = *b;
  }
  VMR_RETURN_IF_ERROR(GetInt(root, "knobs", "connect_timeout_ms", 100, 600000, &v, &found));
  if (found) c.service.connect_timeout = std::chrono::milliseconds(v);
  VMR_RETURN_IF_ERROR(GetInt(root, "knobs", "rpc_timeout_ms", 100, 600000, &v, &found));
  if (found) c.service.rpc_timeout = std::chrono::milliseconds(v);
  VMR_RETURN_IF_ERROR(GetInt(root, "knobs", "job_workers", 1, 64, &v, &found));
  if (found) c.job_workers = static_cast<int>(v);
  VMR_RETURN_IF_ERROR(GetInt(root, "replication", "max_parallel_transfers", 1, 64, &v, &found));
  if (found) c.max_parallel_transfers = static_cast<int>(v);
  VMR_RETURN_IF_ERROR(GetInt(root, "replication", "bandwidth_limit_bytes_per_s", 0, int64_t{1} << 40, &v, &found));
  if (found) c.bandwidth_limit_bytes_per_s = static_cast<uint64_t>(v);
  VMR_RETURN_IF_ERROR(GetInt(root, "testing", "replication_interval_override_ms", 100, 3600000, &v, &found));
  if (found) c.test_replication_interval_override_ms = v;
  VMR_RETURN_IF_ERROR(GetInt(root, "testing", "app_consistent_interval_override_ms", 100, 43200000, &v, &found));
  if (found) c.test_app_consistent_interval_override_ms = v;
  VMR_RETURN_IF_ERROR(GetInt(root, "testing", "import_chunk_delay_ms", 1, 10000, &v, &found));
  if (found) c.test_import_chunk_delay_ms = v;
  if (auto node = root["replication"]["bandwidth_schedule"]) {
    VMR_ASSIGN_OR_RETURN(c.bandwidth_schedule, ParseBandwidthSchedule(node.node()));
  }

  if (auto node = root["admin"]["remote_principals"]) {
    auto* arr = node.as_array();
    if (!arr) return Status::InvalidArgument("admin.remote_principals must be an array of strings");
    for (const auto& item : *arr) {
      auto s = item.value<std::string>();
      if (!s) return Status::InvalidArgument("admin.remote_principals must be an array of strings");
      VMR_RETURN_IF_ERROR(ValidateHostPattern(*s, "admin.remote_principals"));
      c.service.remote_admin_principals.push_back(*s);
    }
  }
  return c;
}

Result<DaemonConfig> LoadConfig(const std::string& path) {
  auto text = ReadFile(path, 1 << 20);
  if (!text.ok()) return text.status().WithContext("config");
  auto base = std::filesystem::absolute(path).parent_path().string();
  auto c = ParseConfig(*text, base);
  if (!c.ok()) return c.status().WithContext(path);
  return c;
}

}  // namespace vmreplica::daemon
