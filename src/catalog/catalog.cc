#include "vmreplica/catalog.h"

#include <sqlite3.h>

#include <algorithm>
#include <limits>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <utility>

#include "catalog/schema.h"
#include "catalog/sqlite_util.h"

namespace vmreplica {

using catalog_internal::SqliteError;
using catalog_internal::Stmt;
using Json = nlohmann::json;

namespace {

constexpr int kBusyTimeoutMs = 5000;

// ---------------------------------------------------------------------------
// Decoding values read back from the file. Nothing read from disk is trusted:
// a number outside its enum or field range is Corruption.

template <typename E> struct EnumRange;
template <> struct EnumRange<ReplicationMode> {
  static constexpr int64_t kLo = 0, kHi = 4;
  static constexpr const char* kName = "ReplicationMode";
};
template <> struct EnumRange<ReplicationState> {
  static constexpr int64_t kLo = 0, kHi = kReplicationStateCount - 1;
  static constexpr const char* kName = "ReplicationState";
};
template <> struct EnumRange<ReplicationHealth> {
  static constexpr int64_t kLo = 0, kHi = 3;
  static constexpr const char* kName = "ReplicationHealth";
};
template <> struct EnumRange<ReplicationType> {
  static constexpr int64_t kLo = 0, kHi = 3;
  static constexpr const char* kName = "ReplicationType";
};
template <> struct EnumRange<AuthenticationType> {
  static constexpr int64_t kLo = 1, kHi = 2;
  static constexpr const char* kName = "AuthenticationType";
};
template <> struct EnumRange<AllowedAuthenticationType> {
  static constexpr int64_t kLo = 0, kHi = 3;
  static constexpr const char* kName = "AllowedAuthenticationType";
};
template <> struct EnumRange<InitialReplicationType> {
  static constexpr int64_t kLo = 1, kHi = 3;
  static constexpr const char* kName = "InitialReplicationType";
};
template <> struct EnumRange<JobState> {
  static constexpr int64_t kLo = 2, kHi = 11;
  static constexpr const char* kName = "JobState";
};
template <> struct EnumRange<JobType> {
  static constexpr int64_t kLo = 90, kHi = 125;
  static constexpr const char* kName = "JobType";
};

Status BadValue(const char* table, const char* column, int64_t v, const char* expected) {
  return Status::Corruption(std::string("catalog table ") + table + " column " + column + " holds " +
                            std::to_string(v) + ", which is not " + expected);
}

// Decodes into `out`; returns Corruption naming the table and column.
template <typename E>
Status DecodeEnum(int64_t v, const char* table, const char* column, E* out) {
  using R = EnumRange<E>;
  if (v < R::kLo || v > R::kHi) return BadValue(table, column, v, (std::string("a ") + R::kName).c_str());
  *out = static_cast<E>(v);
  return Status::Ok();
}

Status DecodeU32(int64_t v, const char* table, const char* column, uint32_t* out) {
  if (v < 0 || v > std::numeric_limits<uint32_t>::max()) return BadValue(table, column, v, "a 32-bit unsigned number");
  *out = static_cast<uint32_t>(v);
  return Status::Ok();
}

Status DecodeU16(int64_t v, const char* table, const char* column, uint16_t* out) {
  if (v < 0 || v > std::numeric_limits<uint16_t>::max()) return BadValue(table, column, v, "a 16-bit unsigned number");
  *out = static_cast<uint16_t>(v);
  return Status::Ok();
}

Status CheckIndex(int index) {
  if (index != 0 && index != 1) {
    return Status::InvalidArgument("relationship index " + std::to_string(index) +
                                   " is not 0 (primary -> replica) or 1 (replica -> extended replica)");
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// RelationshipSettings <-> JSON. Keys are the field names; a key missing on
// read takes the field's default (so fields added later read back from old
// rows), a key of the wrong type is Corruption.

Json SettingsToJson(const RelationshipSettings& s) {
  return Json{
      {"recovery_connection_point", s.recovery_connection_point},
      {"recovery_server_port", s.recovery_server_port},
      {"authentication_type", Number(s.authentication_type)},
      {"certificate_thumbprint", s.certificate_thumbprint},
      {"compression_enabled", s.compression_enabled},
      {"replication_interval_s", s.replication_interval_s},
      {"recovery_history", s.recovery_history},
      {"application_consistent_snapshot_interval_h", s.application_consistent_snapshot_interval_h},
      {"included_disks", s.included_disks},
      {"auto_resynchronize_enabled", s.auto_resynchronize_enabled},
      {"auto_resynchronize_interval_start_min", s.auto_resynchronize_interval_start_min},
      {"auto_resynchronize_interval_end_min", s.auto_resynchronize_interval_end_min},
      {"enable_write_order_preservation_across_disks", s.enable_write_order_preservation_across_disks},
      {"bypass_proxy_server", s.bypass_proxy_server},
      {"replicate_host_kvp_items", s.replicate_host_kvp_items},
      {"recovery_host_system", s.recovery_host_system},
      {"primary_connection_point", s.primary_connection_point},
      {"primary_host_system", s.primary_host_system},
  };
}

class JsonReader {
 public:
  JsonReader(const Json& j, const char* where) : j_(j), where_(where) {}

  void Str(const char* key, std::string* out) {
    if (const Json* v = Find(key)) {
      if (v->is_string()) *out = v->get<std::string>();
      else Fail(key, "a string");
    }
  }
  void Bool(const char* key, bool* out) {
    if (const Json* v = Find(key)) {
      if (v->is_boolean()) *out = v->get<bool>();
      else Fail(key, "a boolean");
    }
  }
  void U32(const char* key, uint32_t* out) {
    if (const Json* v = Find(key)) {
      if (v->is_number_unsigned() && v->get<uint64_t>() <= std::numeric_limits<uint32_t>::max()) {
        *out = static_cast<uint32_t>(v->get<uint64_t>());
      } else {
        Fail(key, "a 32-bit unsigned number");
      }
    }
  }
  template <typename E>
  void Enum(const char* key, E* out) {
    if (const Json* v = Find(key)) {
      if (!v->is_number_integer()) return Fail(key, "an integer");
      Status s = DecodeEnum(v->get<int64_t>(), where_, key, out);
      if (!s.ok() && status_.ok()) status_ = s;
    }
  }
  void StrList(const char* key, std::vector<std::string>* out) {
    if (const Json* v = Find(key)) {
      if (!v->is_array()) return Fail(key, "an array of strings");
      std::vector<std::string> list;
      for (const Json& e : *v) {
        if (!e.is_string()) return Fail(key, "an array of strings");
        list.push_back(e.get<std::string>());
      }
      *out = std::move(list);
    }
  }
  const Status& status() const { return status_; }

 private:
  const Json* Find(const char* key) const {
    auto it = j_.find(key);
    return it == j_.end() ? nullptr : &*it;
  }
  void Fail(const char* key, const char* expected) {
    if (status_.ok()) {
      status_ = Status::Corruption(std::string(where_) + ": key " + key + " is not " + expected);
    }
  }

  const Json& j_;
  const char* where_;
  Status status_;
};

Result<Json> ParseJson(const std::string& text, const char* where) {
  Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::Corruption(std::string(where) + " is not valid JSON");
  return j;
}

Result<RelationshipSettings> SettingsFromJson(const std::string& text) {
  constexpr const char* kWhere = "catalog table relationships column settings_json";
  VMR_ASSIGN_OR_RETURN(Json j, ParseJson(text, kWhere));
  if (!j.is_object()) return Status::Corruption(std::string(kWhere) + " is not a JSON object");
  RelationshipSettings s;
  JsonReader r(j, kWhere);
  r.Str("recovery_connection_point", &s.recovery_connection_point);
  r.U32("recovery_server_port", &s.recovery_server_port);
  r.Enum("authentication_type", &s.authentication_type);
  r.Str("certificate_thumbprint", &s.certificate_thumbprint);
  r.Bool("compression_enabled", &s.compression_enabled);
  r.U32("replication_interval_s", &s.replication_interval_s);
  r.U32("recovery_history", &s.recovery_history);
  r.U32("application_consistent_snapshot_interval_h", &s.application_consistent_snapshot_interval_h);
  r.StrList("included_disks", &s.included_disks);
  r.Bool("auto_resynchronize_enabled", &s.auto_resynchronize_enabled);
  r.U32("auto_resynchronize_interval_start_min", &s.auto_resynchronize_interval_start_min);
  r.U32("auto_resynchronize_interval_end_min", &s.auto_resynchronize_interval_end_min);
  r.Bool("enable_write_order_preservation_across_disks", &s.enable_write_order_preservation_across_disks);
  r.Bool("bypass_proxy_server", &s.bypass_proxy_server);
  r.Bool("replicate_host_kvp_items", &s.replicate_host_kvp_items);
  r.Str("recovery_host_system", &s.recovery_host_system);
  r.Str("primary_connection_point", &s.primary_connection_point);
  r.Str("primary_host_system", &s.primary_host_system);
  VMR_RETURN_IF_ERROR(r.status());
  return s;
}

Result<std::vector<std::string>> StringListFromJson(const std::string& text, const char* where) {
  VMR_ASSIGN_OR_RETURN(Json j, ParseJson(text, where));
  std::vector<std::string> out;
  if (!j.is_array()) return Status::Corruption(std::string(where) + " is not a JSON array");
  for (const Json& e : j) {
    if (!e.is_string()) return Status::Corruption(std::string(where) + " holds a non-string element");
    out.push_back(e.get<std::string>());
  }
  return out;
}

// ---------------------------------------------------------------------------
// Row readers. Each SELECT lists its columns in the order the reader expects.

constexpr const char* kServerSettingsColumns =
    "recovery_server_enabled, allowed_authentication_type, certificate_thumbprint, http_port, "
    "https_port, monitoring_interval_s, monitoring_start_time_min";

Result<ServerSettings> ReadServerSettings(const Stmt& q) {
  constexpr const char* t = "server_settings";
  ServerSettings s;
  s.recovery_server_enabled = q.Bool(0);
  VMR_RETURN_IF_ERROR(DecodeEnum(q.Int(1), t, "allowed_authentication_type", &s.allowed_authentication_type));
  s.certificate_thumbprint = q.Text(2);
  VMR_RETURN_IF_ERROR(DecodeU32(q.Int(3), t, "http_port", &s.http_port));
  VMR_RETURN_IF_ERROR(DecodeU32(q.Int(4), t, "https_port", &s.https_port));
  VMR_RETURN_IF_ERROR(DecodeU32(q.Int(5), t, "monitoring_interval_s", &s.monitoring_interval_s));
  VMR_RETURN_IF_ERROR(DecodeU32(q.Int(6), t, "monitoring_start_time_min", &s.monitoring_start_time_min));
  return s;
}

constexpr const char* kAuthColumns = "allowed_primary_host_system, replica_storage_location, trust_group";

AuthorizationEntry ReadAuth(const Stmt& q) {
  AuthorizationEntry e;
  e.allowed_primary_host_system = q.Text(0);
  e.replica_storage_location = q.Text(1);
  e.trust_group = q.Text(2);
  return e;
}

constexpr const char* kVmColumns = "id, name, mode, definition_json, created_ms";

Result<VmRecord> ReadVm(const Stmt& q) {
  VmRecord v;
  v.id = q.Text(0);
  v.name = q.Text(1);
  VMR_RETURN_IF_ERROR(DecodeEnum(q.Int(2), "vms", "mode", &v.mode));
  v.definition_json = q.Text(3);
  v.created_ms = q.Int(4);
  return v;
}

constexpr const char* kDiskColumns = "vm_id, name, size_bytes, path, node_name, granularity, included";

Result<DiskRecord> ReadDisk(const Stmt& q) {
  DiskRecord d;
  d.vm_id = q.Text(0);
  d.name = q.Text(1);
  d.size_bytes = q.U64(2);
  d.path = q.Text(3);
  d.node_name = q.Text(4);
  VMR_RETURN_IF_ERROR(DecodeU32(q.Int(5), "disks", "granularity", &d.granularity));
  d.included = q.Bool(6);
  return d;
}

constexpr const char* kRelationshipColumns =
    "vm_id, idx, local_mode, state, health, settings_json, last_replication_ms, last_apply_ms, "
    "last_app_consistent_ms, last_replication_type, failed_over_replication_type, generation_id, sequence, "
    "initial_type";

Result<RelationshipRecord> ReadRelationship(const Stmt& q) {
  constexpr const char* t = "relationships";
  RelationshipRecord r;
  r.vm_id = q.Text(0);
  int64_t idx = q.Int(1);
  if (idx != 0 && idx != 1) return BadValue(t, "idx", idx, "0 or 1");
  r.index = static_cast<int>(idx);
  VMR_RETURN_IF_ERROR(DecodeEnum(q.Int(2), t, "local_mode", &r.local_mode));
  VMR_RETURN_IF_ERROR(DecodeEnum(q.Int(3), t, "state", &r.state));
  VMR_RETURN_IF_ERROR(DecodeEnum(q.Int(4), t, "health", &r.health));
  VMR_ASSIGN_OR_RETURN(r.settings, SettingsFromJson(q.Text(5)));
  r.last_replication_ms = q.Int(6);
  r.last_apply_ms = q.Int(7);
  r.last_app_consistent_ms = q.Int(8);
  VMR_RETURN_IF_ERROR(DecodeEnum(q.Int(9), t, "last_replication_type", &r.last_replication_type));
  VMR_RETURN_IF_ERROR(
      DecodeEnum(q.Int(10), t, "failed_over_replication_type", &r.failed_over_replication_type));
  r.generation_id = q.Text(11);
  r.sequence = q.U64(12);
  VMR_RETURN_IF_ERROR(DecodeEnum(q.Int(13), t, "initial_type", &r.initial_replication_type));
  return r;
}

constexpr const char* kPointColumns = "id, vm_id, time_ms, kind, sequence, generation_id";

Result<RecoveryPointRecord> ReadPoint(const Stmt& q) {
  RecoveryPointRecord p;
  p.id = q.Text(0);
  p.vm_id = q.Text(1);
  p.time_ms = q.Int(2);
  VMR_RETURN_IF_ERROR(DecodeU16(q.Int(3), "recovery_points", "kind", &p.kind));
  p.sequence = q.U64(4);
  p.generation_id = q.Text(5);
  return p;
}

constexpr const char* kStagedLogColumns = "vm_id, sequence, state, file_name, size_bytes, received_ms";

Result<StagedLogRecord> ReadStagedLog(const Stmt& q) {
  StagedLogRecord r;
  r.vm_id = q.Text(0);
  r.sequence = q.U64(1);
  int64_t state = q.Int(2);
  if (state != static_cast<int64_t>(StagedLogState::kStaged) &&
      state != static_cast<int64_t>(StagedLogState::kRejected)) {
    return BadValue("staged_logs", "state", state, "1 (staged) or 2 (rejected)");
  }
  r.state = static_cast<StagedLogState>(state);
  r.file_name = q.Text(3);
  if (q.Int(4) < 0) return BadValue("staged_logs", "size_bytes", q.Int(4), "a size");
  r.size_bytes = q.U64(4);
  r.received_ms = q.Int(5);
  return r;
}

constexpr const char* kFailoverNetworkColumns =
    "vm_id, adapter, ip_addresses_json, subnets_json, default_gateways_json, dns_servers_json, dhcp_enabled";

// A JSON array of strings from failover_network_settings.`column`.
Status DecodeStringList(const std::string& text, const char* column, std::vector<std::string>* out) {
  Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  auto bad = [&] {
    return Status::Corruption(std::string("catalog table failover_network_settings column ") + column +
                              " is not a JSON array of strings");
  };
  if (!j.is_array()) return bad();
  out->clear();
  for (const Json& e : j) {
    if (!e.is_string()) return bad();
    out->push_back(e.get<std::string>());
  }
  return Status::Ok();
}

Result<FailoverNetworkRecord> ReadFailoverNetwork(const Stmt& q) {
  FailoverNetworkRecord r;
  r.vm_id = q.Text(0);
  r.adapter = q.Text(1);
  if (r.adapter.empty()) return Status::Corruption("catalog table failover_network_settings holds an empty adapter");
  VMR_RETURN_IF_ERROR(DecodeStringList(q.Text(2), "ip_addresses_json", &r.ip_addresses));
  VMR_RETURN_IF_ERROR(DecodeStringList(q.Text(3), "subnets_json", &r.subnets));
  VMR_RETURN_IF_ERROR(DecodeStringList(q.Text(4), "default_gateways_json", &r.default_gateways));
  VMR_RETURN_IF_ERROR(DecodeStringList(q.Text(5), "dns_servers_json", &r.dns_servers));
  int64_t dhcp = q.Int(6);
  if (dhcp != 0 && dhcp != 1) return BadValue("failover_network_settings", "dhcp_enabled", dhcp, "0 or 1");
  r.dhcp_enabled = dhcp == 1;
  return r;
}

constexpr const char* kStatisticsColumns =
    "vm_id, idx, start_ms, end_ms, replication_success_count, replication_size_bytes, "
    "max_replication_size_bytes, replication_latency_ms, max_replication_latency_ms, "
    "replication_miss_count, network_failure_count, replication_failure_count, "
    "pending_replication_size_bytes, app_consistent_failure_count, replication_health, "
    "last_test_failover_ms, initial_replication_size_bytes, health_issues_json";

Result<StatisticsRecord> ReadStatistics(const Stmt& q) {
  constexpr const char* t = "statistics";
  StatisticsRecord s;
  s.vm_id = q.Text(0);
  int64_t idx = q.Int(1);
  if (idx != 0 && idx != 1) return BadValue(t, "idx", idx, "0 or 1");
  s.index = static_cast<int>(idx);
  s.start_ms = q.Int(2);
  s.end_ms = q.Int(3);
  s.replication_success_count = q.U64(4);
  s.replication_size_bytes = q.U64(5);
  s.max_replication_size_bytes = q.U64(6);
  s.replication_latency_ms = q.U64(7);
  s.max_replication_latency_ms = q.U64(8);
  s.replication_miss_count = q.U64(9);
  s.network_failure_count = q.U64(10);
  s.replication_failure_count = q.U64(11);
  s.pending_replication_size_bytes = q.U64(12);
  s.application_consistent_snapshot_failure_count = q.U64(13);
  VMR_RETURN_IF_ERROR(DecodeEnum(q.Int(14), t, "replication_health", &s.replication_health));
  s.last_test_failover_ms = q.Int(15);
  s.initial_replication_size_bytes = q.U64(16);
  VMR_ASSIGN_OR_RETURN(s.health_issues,
                       StringListFromJson(q.Text(17), "catalog table statistics column health_issues_json"));
  return s;
}

constexpr const char* kJobColumns =
    "id, type, state, percent_complete, error_code, error_description, cancellable, resumable, target, "
    "parameters_json, result_json, created_ms, started_ms, finished_ms, time_before_removal_s";

Result<JobRecord> ReadJob(const Stmt& q) {
  constexpr const char* t = "jobs";
  JobRecord j;
  j.id = q.Text(0);
  VMR_RETURN_IF_ERROR(DecodeEnum(q.Int(1), t, "type", &j.type));
  VMR_RETURN_IF_ERROR(DecodeEnum(q.Int(2), t, "state", &j.state));
  if (q.Int(3) < 0 || q.Int(3) > 100) return BadValue(t, "percent_complete", q.Int(3), "0..100");
  j.percent_complete = static_cast<uint32_t>(q.Int(3));
  VMR_RETURN_IF_ERROR(DecodeU32(q.Int(4), t, "error_code", &j.error_code));
  j.error_description = q.Text(5);
  j.cancellable = q.Bool(6);
  j.resumable = q.Bool(7);
  j.target = q.Text(8);
  j.parameters_json = q.Text(9);
  j.result_json = q.Text(10);
  j.created_ms = q.Int(11);
  j.started_ms = q.Int(12);
  j.finished_ms = q.Int(13);
  j.time_before_removal_s = q.Int(14);
  return j;
}

// Runs a SELECT whose rows `read` decodes; collects every row.
template <typename T, typename Reader>
Result<std::vector<T>> SelectAll(Stmt& q, Reader read) {
  std::vector<T> out;
  while (true) {
    VMR_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) return out;
    VMR_ASSIGN_OR_RETURN(T v, read(q));
    out.push_back(std::move(v));
  }
}

// Runs a SELECT expected to return at most one row.
template <typename T, typename Reader>
Result<std::optional<T>> SelectOne(Stmt& q, Reader read) {
  VMR_ASSIGN_OR_RETURN(bool row, q.Step());
  if (!row) return std::optional<T>();
  VMR_ASSIGN_OR_RETURN(T v, read(q));
  return std::optional<T>(std::move(v));
}

std::string Sql(std::initializer_list<std::string_view> parts) {
  std::string s;
  for (std::string_view p : parts) s += p;
  return s;
}

// Reads one integer from a single-row PRAGMA or query.
Result<int64_t> QueryInt(sqlite3* db, const char* sql) {
  Stmt q(db, sql);
  VMR_ASSIGN_OR_RETURN(bool row, q.Step());
  if (!row) return Status::Internal(std::string("catalog: ") + sql + " returned no row");
  return q.Int(0);
}

struct SqliteCloser {
  void operator()(sqlite3* db) const { sqlite3_close_v2(db); }
};
using DbHandle = std::unique_ptr<sqlite3, SqliteCloser>;

// Checks that `db` is a healthy vmreplica catalog this binary may open,
// without writing anything. Returns the file's schema version.
Result<int> CheckFile(sqlite3* db, const std::string& path) {
  Result<int64_t> app_id = QueryInt(db, "PRAGMA application_id");
  if (!app_id.ok()) {
    if (app_id.status().code() == Code::kCorruption) {
      return Status::Corruption("catalog " + path + " is not an SQLite database or its header is damaged: " +
                                app_id.status().message());
    }
    return app_id.status().WithContext("catalog " + path);
  }
  VMR_ASSIGN_OR_RETURN(int64_t version, QueryInt(db, "PRAGMA user_version"));
  VMR_ASSIGN_OR_RETURN(int64_t objects, QueryInt(db, "SELECT count(*) FROM sqlite_schema"));

  if (*app_id != 0 && *app_id != kCatalogApplicationId) {
    return Status::FailedPrecondition("catalog " + path + " is an SQLite database of another application (application_id " +
                                      std::to_string(*app_id) + "), not a vmreplica catalog");
  }
  if (version > kCatalogSchemaVersion) {
    return Status::FailedPrecondition("catalog " + path + " has schema version " + std::to_string(version) +
                                      "; this vmreplica understands up to " + std::to_string(kCatalogSchemaVersion) +
                                      "; upgrade vmreplica");
  }
  if (version < 0 || (*app_id == 0 && (version != 0 || objects != 0))) {
    return Status::FailedPrecondition("catalog " + path +
                                      " is an SQLite database but not a vmreplica catalog (no vmreplica "
                                      "application_id; user_version " + std::to_string(version) + ")");
  }

  Stmt check(db, "PRAGMA quick_check(5)");
  std::string problems;
  while (true) {
    Result<bool> row = check.Step();
    if (!row.ok()) return Status::Corruption("catalog " + path + " failed its integrity check: " + row.status().message());
    if (!*row) break;
    std::string line = check.Text(0);
    if (line != "ok") problems += (problems.empty() ? "" : "; ") + line;
  }
  if (!problems.empty()) return Status::Corruption("catalog " + path + " failed its integrity check: " + problems);
  return static_cast<int>(version);
}

}  // namespace

Catalog::Catalog(std::string path, sqlite3* db) : path_(std::move(path)), db_(db) {}

Catalog::~Catalog() {
  int rc = sqlite3_close(db_);
  if (rc != SQLITE_OK) {
    spdlog::error("catalog {}: close failed: {}", path_, sqlite3_errstr(rc));
    sqlite3_close_v2(db_);
  }
}

Result<std::unique_ptr<Catalog>> Catalog::Open(const std::string& path) {
  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                           nullptr);
  DbHandle db(raw);
  if (rc != SQLITE_OK) {
    Status s = SqliteError(raw, rc, "catalog " + path + ": cannot open");
    return s.code() == Code::kCorruption ? s : Status::IOError(s.message());
  }
  sqlite3_extended_result_codes(db.get(), 1);
  sqlite3_busy_timeout(db.get(), kBusyTimeoutMs);

  // Nothing above or in CheckFile writes to the file.
  VMR_ASSIGN_OR_RETURN(int version, CheckFile(db.get(), path));

  auto exec = [&](const std::string& sql) -> Status {
    char* err = nullptr;
    int r = sqlite3_exec(db.get(), sql.c_str(), nullptr, nullptr, &err);
    sqlite3_free(err);
    if (r != SQLITE_OK) return SqliteError(db.get(), r, "catalog " + path + ": " + sql.substr(0, 60));
    return Status::Ok();
  };

  {
    Stmt q(db.get(), "PRAGMA journal_mode=WAL");
    VMR_ASSIGN_OR_RETURN(bool row, q.Step());
    std::string mode = row ? q.Text(0) : "";
    if (mode != "wal") {
      return Status::IOError("catalog " + path + ": cannot switch to WAL journal mode (still '" + mode + "')");
    }
  }
  VMR_RETURN_IF_ERROR(exec("PRAGMA synchronous=FULL"));
  VMR_RETURN_IF_ERROR(exec("PRAGMA foreign_keys=ON"));
  VMR_ASSIGN_OR_RETURN(int64_t fk, QueryInt(db.get(), "PRAGMA foreign_keys"));
  if (fk != 1) return Status::Internal("catalog: this SQLite does not enforce foreign keys");

  auto migrations = catalog_internal::Migrations();
  for (int v = version; v < kCatalogSchemaVersion; ++v) {
    VMR_RETURN_IF_ERROR(exec("BEGIN IMMEDIATE"));
    Status s = [&]() -> Status {
      // Re-read under the write lock: another process may have migrated.
      VMR_ASSIGN_OR_RETURN(int64_t now, QueryInt(db.get(), "PRAGMA user_version"));
      if (now != v) {
        return Status::Busy("catalog " + path + " was migrated by someone else meanwhile (version " +
                            std::to_string(now) + ")");
      }
      VMR_RETURN_IF_ERROR(exec(migrations[static_cast<size_t>(v)]));
      if (v == 0) VMR_RETURN_IF_ERROR(exec("PRAGMA application_id=" + std::to_string(kCatalogApplicationId)));
      VMR_RETURN_IF_ERROR(exec("PRAGMA user_version=" + std::to_string(v + 1)));
      return exec("COMMIT");
    }();
    if (!s.ok()) {
      if (sqlite3_get_autocommit(db.get()) == 0) exec("ROLLBACK").IgnoreError();
      return s.WithContext("migration to schema version " + std::to_string(v + 1));
    }
    spdlog::info("catalog {}: migrated to schema version {}", path, v + 1);
  }
  return std::unique_ptr<Catalog>(new Catalog(path, db.release()));
}

Status Catalog::Exec(const std::string& sql) {
  char* err = nullptr;
  int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err);
  sqlite3_free(err);
  if (rc != SQLITE_OK) return SqliteError(db_, rc, "catalog: " + sql);
  return Status::Ok();
}

Status Catalog::WithTxnLocked(const std::function<Status()>& body) {
  const int depth = txn_depth_;
  const std::string savepoint = "sp" + std::to_string(depth);
  VMR_RETURN_IF_ERROR(Exec(depth == 0 ? "BEGIN IMMEDIATE" : "SAVEPOINT " + savepoint));
  ++txn_depth_;
  Status s = body();
  --txn_depth_;
  if (s.ok()) {
    s = Exec(depth == 0 ? "COMMIT" : "RELEASE " + savepoint);
    if (s.ok()) return s;
  }
  // Roll back. SQLite may already have rolled the whole transaction back by
  // itself (I/O error, disk full); then there is nothing left to undo here.
  if (sqlite3_get_autocommit(db_) == 0) {
    Status r = Exec(depth == 0 ? "ROLLBACK" : "ROLLBACK TO " + savepoint + "; RELEASE " + savepoint);
    if (!r.ok()) spdlog::error("catalog {}: rollback failed: {}", path_, r.ToString());
  }
  return s;
}

Result<int> Catalog::SchemaVersion() {
  std::lock_guard lock(mu_);
  VMR_ASSIGN_OR_RETURN(int64_t v, QueryInt(db_, "PRAGMA user_version"));
  return static_cast<int>(v);
}

Status Catalog::RunInTransaction(const std::function<Status()>& body) {
  std::lock_guard lock(mu_);
  return WithTxnLocked(body);
}

Status Catalog::VmExistsLocked(const std::string& vm_id) {
  Stmt q(db_, "SELECT 1 FROM vms WHERE id = ?1");
  q.Bind(1, vm_id);
  VMR_ASSIGN_OR_RETURN(bool row, q.Step());
  return row ? Status::Ok() : Status::NotFound("VM " + vm_id + " is not in the catalog");
}

Status Catalog::RelationshipExistsLocked(const std::string& vm_id, int index) {
  Stmt q(db_, "SELECT 1 FROM relationships WHERE vm_id = ?1 AND idx = ?2");
  q.Bind(1, vm_id).Bind(2, int64_t{index});
  VMR_ASSIGN_OR_RETURN(bool row, q.Step());
  return row ? Status::Ok()
             : Status::NotFound("VM " + vm_id + " has no replication relationship " + std::to_string(index));
}

// --- Server settings --------------------------------------------------------

Result<ServerSettings> Catalog::GetServerSettings() {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kServerSettingsColumns, " FROM server_settings WHERE id = 1"}).c_str());
  VMR_ASSIGN_OR_RETURN(std::optional<ServerSettings> s, SelectOne<ServerSettings>(q, ReadServerSettings));
  return s.value_or(ServerSettings{});
}

Status Catalog::PutServerSettings(const ServerSettings& s) {
  std::lock_guard lock(mu_);
  Stmt q(db_,
         "INSERT INTO server_settings (id, recovery_server_enabled, allowed_authentication_type, "
         "certificate_thumbprint, http_port, https_port, monitoring_interval_s, monitoring_start_time_min) "
         "VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO UPDATE SET "
         "recovery_server_enabled = excluded.recovery_server_enabled, "
         "allowed_authentication_type = excluded.allowed_authentication_type, "
         "certificate_thumbprint = excluded.certificate_thumbprint, http_port = excluded.http_port, "
         "https_port = excluded.https_port, monitoring_interval_s = excluded.monitoring_interval_s, "
         "monitoring_start_time_min = excluded.monitoring_start_time_min");
  q.BindBool(1, s.recovery_server_enabled)
      .Bind(2, int64_t{Number(s.allowed_authentication_type)})
      .Bind(3, s.certificate_thumbprint)
      .Bind(4, int64_t{s.http_port})
      .Bind(5, int64_t{s.https_port})
      .Bind(6, int64_t{s.monitoring_interval_s})
      .Bind(7, int64_t{s.monitoring_start_time_min});
  return q.Run();
}

// --- Authorization entries --------------------------------------------------

Result<std::vector<AuthorizationEntry>> Catalog::ListAuthorizationEntries() {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kAuthColumns, " FROM authorization_entries ORDER BY allowed_primary_host_system"}).c_str());
  return SelectAll<AuthorizationEntry>(q, [](const Stmt& s) -> Result<AuthorizationEntry> { return ReadAuth(s); });
}

Result<std::optional<AuthorizationEntry>> Catalog::GetAuthorizationEntry(const std::string& host) {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kAuthColumns, " FROM authorization_entries WHERE allowed_primary_host_system = ?1"}).c_str());
  q.Bind(1, host);
  return SelectOne<AuthorizationEntry>(q, [](const Stmt& s) -> Result<AuthorizationEntry> { return ReadAuth(s); });
}

Status Catalog::AddAuthorizationEntry(const AuthorizationEntry& e) {
  std::lock_guard lock(mu_);
  Stmt q(db_,
         "INSERT INTO authorization_entries (allowed_primary_host_system, replica_storage_location, trust_group) "
         "VALUES (?1, ?2, ?3)");
  q.Bind(1, e.allowed_primary_host_system).Bind(2, e.replica_storage_location).Bind(3, e.trust_group);
  Status s = q.Run();
  if (s.code() == Code::kAlreadyExists) {
    return Status::AlreadyExists("an authorization entry for '" + e.allowed_primary_host_system + "' already exists");
  }
  return s;
}

Status Catalog::ModifyAuthorizationEntry(const AuthorizationEntry& e) {
  std::lock_guard lock(mu_);
  Stmt q(db_,
         "UPDATE authorization_entries SET allowed_primary_host_system = ?1, replica_storage_location = ?2, "
         "trust_group = ?3 WHERE allowed_primary_host_system = ?1");
  q.Bind(1, e.allowed_primary_host_system).Bind(2, e.replica_storage_location).Bind(3, e.trust_group);
  VMR_RETURN_IF_ERROR(q.Run());
  if (sqlite3_changes(db_) == 0) {
    return Status::NotFound("no authorization entry for '" + e.allowed_primary_host_system + "'");
  }
  return Status::Ok();
}

Status Catalog::RemoveAuthorizationEntry(const std::string& host) {
  std::lock_guard lock(mu_);
  Stmt q(db_, "DELETE FROM authorization_entries WHERE allowed_primary_host_system = ?1");
  q.Bind(1, host);
  VMR_RETURN_IF_ERROR(q.Run());
  if (sqlite3_changes(db_) == 0) return Status::NotFound("no authorization entry for '" + host + "'");
  return Status::Ok();
}

// --- Virtual machines and disks ---------------------------------------------

Status Catalog::PutVm(const VmRecord& vm) {
  std::lock_guard lock(mu_);
  Stmt q(db_,
         "INSERT INTO vms (id, name, mode, definition_json, created_ms) VALUES (?1, ?2, ?3, ?4, ?5) "
         "ON CONFLICT (id) DO UPDATE SET name = excluded.name, mode = excluded.mode, "
         "definition_json = excluded.definition_json, created_ms = excluded.created_ms");
  q.Bind(1, vm.id).Bind(2, vm.name).Bind(3, int64_t{Number(vm.mode)}).Bind(4, vm.definition_json).Bind(5, vm.created_ms);
  return q.Run();
}

Result<std::optional<VmRecord>> Catalog::GetVm(const std::string& id) {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kVmColumns, " FROM vms WHERE id = ?1"}).c_str());
  q.Bind(1, id);
  return SelectOne<VmRecord>(q, ReadVm);
}

Result<std::optional<VmRecord>> Catalog::FindVmByName(const std::string& name) {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kVmColumns, " FROM vms WHERE name = ?1 ORDER BY id LIMIT 2"}).c_str());
  q.Bind(1, name);
  VMR_ASSIGN_OR_RETURN(std::vector<VmRecord> found, SelectAll<VmRecord>(q, ReadVm));
  if (found.empty()) return std::optional<VmRecord>();
  if (found.size() > 1) {
    return Status::FailedPrecondition("VM name '" + name + "' is ambiguous: VMs " + found[0].id + " and " +
                                      found[1].id + " (at least) have it; name the VM by its id");
  }
  return std::optional<VmRecord>(std::move(found[0]));
}

Result<std::vector<VmRecord>> Catalog::ListVms() {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kVmColumns, " FROM vms ORDER BY name, id"}).c_str());
  return SelectAll<VmRecord>(q, ReadVm);
}

Status Catalog::DeleteVm(const std::string& id) {
  std::lock_guard lock(mu_);
  Stmt q(db_, "DELETE FROM vms WHERE id = ?1");
  q.Bind(1, id);
  VMR_RETURN_IF_ERROR(q.Run());
  if (sqlite3_changes(db_) == 0) return Status::NotFound("VM " + id + " is not in the catalog");
  return Status::Ok();
}

Status Catalog::PutDisks(const std::string& vm_id, const std::vector<DiskRecord>& disks) {
  std::lock_guard lock(mu_);
  return WithTxnLocked([&]() -> Status {
    VMR_RETURN_IF_ERROR(VmExistsLocked(vm_id));
    Stmt del(db_, "DELETE FROM disks WHERE vm_id = ?1");
    del.Bind(1, vm_id);
    VMR_RETURN_IF_ERROR(del.Run());
    int64_t position = 0;
    for (const DiskRecord& d : disks) {
      Stmt q(db_,
             "INSERT INTO disks (vm_id, name, position, size_bytes, path, node_name, granularity, included) "
             "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)");
      q.Bind(1, vm_id)
          .Bind(2, d.name)
          .Bind(3, position++)
          .BindU64(4, d.size_bytes)
          .Bind(5, d.path)
          .Bind(6, d.node_name)
          .Bind(7, int64_t{d.granularity})
          .BindBool(8, d.included);
      Status s = q.Run();
      if (s.code() == Code::kAlreadyExists) {
        return Status::AlreadyExists("VM " + vm_id + ": disk name '" + d.name + "' is given more than once");
      }
      VMR_RETURN_IF_ERROR(s);
    }
    return Status::Ok();
  });
}

Result<std::vector<DiskRecord>> Catalog::ListDisks(const std::string& vm_id) {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kDiskColumns, " FROM disks WHERE vm_id = ?1 ORDER BY position"}).c_str());
  q.Bind(1, vm_id);
  return SelectAll<DiskRecord>(q, ReadDisk);
}

// --- Relationships ----------------------------------------------------------

Status Catalog::PutRelationship(const RelationshipRecord& r) {
  VMR_RETURN_IF_ERROR(CheckIndex(r.index));
  std::lock_guard lock(mu_);
  Stmt q(db_,
         "INSERT INTO relationships (vm_id, idx, local_mode, state, health, settings_json, last_replication_ms, "
         "last_apply_ms, last_app_consistent_ms, last_replication_type, failed_over_replication_type, "
         "generation_id, sequence, initial_type) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) "
         "ON CONFLICT (vm_id, idx) DO UPDATE SET local_mode = excluded.local_mode, state = excluded.state, "
         "health = excluded.health, settings_json = excluded.settings_json, "
         "last_replication_ms = excluded.last_replication_ms, last_apply_ms = excluded.last_apply_ms, "
         "last_app_consistent_ms = excluded.last_app_consistent_ms, "
         "last_replication_type = excluded.last_replication_type, "
         "failed_over_replication_type = excluded.failed_over_replication_type, "
         "generation_id = excluded.generation_id, sequence = excluded.sequence, initial_type = excluded.initial_type");
  q.Bind(1, r.vm_id)
      .Bind(2, int64_t{r.index})
      .Bind(3, int64_t{Number(r.local_mode)})
      .Bind(4, int64_t{Number(r.state)})
      .Bind(5, int64_t{Number(r.health)})
      .Bind(6, SettingsToJson(r.settings).dump())
      .Bind(7, r.last_replication_ms)
      .Bind(8, r.last_apply_ms)
      .Bind(9, r.last_app_consistent_ms)
      .Bind(10, int64_t{Number(r.last_replication_type)})
      .Bind(11, int64_t{Number(r.failed_over_replication_type)})
      .Bind(12, r.generation_id)
      .BindU64(13, r.sequence)
      .Bind(14, int64_t{Number(r.initial_replication_type)});
  Status s = q.Run();
  if (s.code() == Code::kNotFound) return Status::NotFound("VM " + r.vm_id + " is not in the catalog");
  return s;
}

Result<std::optional<RelationshipRecord>> Catalog::GetRelationship(const std::string& vm_id, int index) {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kRelationshipColumns, " FROM relationships WHERE vm_id = ?1 AND idx = ?2"}).c_str());
  q.Bind(1, vm_id).Bind(2, int64_t{index});
  return SelectOne<RelationshipRecord>(q, ReadRelationship);
}

Result<std::vector<RelationshipRecord>> Catalog::ListRelationships() {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kRelationshipColumns, " FROM relationships ORDER BY vm_id, idx"}).c_str());
  return SelectAll<RelationshipRecord>(q, ReadRelationship);
}

Status Catalog::DeleteRelationship(const std::string& vm_id, int index) {
  std::lock_guard lock(mu_);
  Stmt q(db_, "DELETE FROM relationships WHERE vm_id = ?1 AND idx = ?2");
  q.Bind(1, vm_id).Bind(2, int64_t{index});
  VMR_RETURN_IF_ERROR(q.Run());
  if (sqlite3_changes(db_) == 0) {
    return Status::NotFound("VM " + vm_id + " has no replication relationship " + std::to_string(index));
  }
  return Status::Ok();
}

// --- Recovery points --------------------------------------------------------

Status Catalog::AddRecoveryPoint(const RecoveryPointRecord& p) {
  std::lock_guard lock(mu_);
  Stmt q(db_,
         "INSERT INTO recovery_points (id, vm_id, time_ms, kind, sequence, generation_id) "
         "VALUES (?1, ?2, ?3, ?4, ?5, ?6)");
  q.Bind(1, p.id).Bind(2, p.vm_id).Bind(3, p.time_ms).Bind(4, int64_t{p.kind}).BindU64(5, p.sequence).Bind(6, p.generation_id);
  Status s = q.Run();
  if (s.code() == Code::kAlreadyExists) return Status::AlreadyExists("recovery point " + p.id + " already exists");
  if (s.code() == Code::kNotFound) return Status::NotFound("VM " + p.vm_id + " is not in the catalog");
  return s;
}

Result<std::vector<RecoveryPointRecord>> Catalog::ListRecoveryPoints(const std::string& vm_id) {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kPointColumns, " FROM recovery_points WHERE vm_id = ?1 ORDER BY time_ms, sequence, id"}).c_str());
  q.Bind(1, vm_id);
  return SelectAll<RecoveryPointRecord>(q, ReadPoint);
}

Status Catalog::DeleteRecoveryPoint(const std::string& id) {
  return DeleteRecoveryPoints({id});
}

Status Catalog::DeleteRecoveryPoints(const std::vector<std::string>& ids) {
  std::lock_guard lock(mu_);
  return WithTxnLocked([&]() -> Status {
    for (const std::string& id : ids) {
      Stmt q(db_, "DELETE FROM recovery_points WHERE id = ?1");
      q.Bind(1, id);
      VMR_RETURN_IF_ERROR(q.Run());
      if (sqlite3_changes(db_) == 0) return Status::NotFound("recovery point " + id + " does not exist");
    }
    return Status::Ok();
  });
}

// --- Staged logs ------------------------------------------------------------

Status Catalog::PutStagedLog(const StagedLogRecord& log) {
  if (log.state != StagedLogState::kStaged && log.state != StagedLogState::kRejected) {
    return Status::InvalidArgument("staged log state " + std::to_string(static_cast<int>(log.state)) +
                                   " is not staged (1) or rejected (2)");
  }
  if (log.size_bytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return Status::InvalidArgument("staged log size " + std::to_string(log.size_bytes) + " is out of range");
  }
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"INSERT INTO staged_logs (", kStagedLogColumns,
                   ") VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (vm_id, sequence, state) DO UPDATE SET "
                   "file_name = excluded.file_name, size_bytes = excluded.size_bytes, "
                   "received_ms = excluded.received_ms"})
                  .c_str());
  q.Bind(1, log.vm_id)
      .BindU64(2, log.sequence)
      .Bind(3, int64_t{static_cast<int>(log.state)})
      .Bind(4, log.file_name)
      .BindU64(5, log.size_bytes)
      .Bind(6, log.received_ms);
  Status s = q.Run();
  if (s.code() == Code::kNotFound) return Status::NotFound("VM " + log.vm_id + " is not in the catalog");
  return s;
}

Result<std::optional<StagedLogRecord>> Catalog::GetStagedLog(const std::string& vm_id, uint64_t sequence,
                                                             StagedLogState state) {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kStagedLogColumns, " FROM staged_logs WHERE vm_id = ?1 AND sequence = ?2 AND state = ?3"})
                  .c_str());
  q.Bind(1, vm_id).BindU64(2, sequence).Bind(3, int64_t{static_cast<int>(state)});
  return SelectOne<StagedLogRecord>(q, ReadStagedLog);
}

Result<std::vector<StagedLogRecord>> Catalog::ListStagedLogs(const std::string& vm_id) {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kStagedLogColumns, " FROM staged_logs WHERE vm_id = ?1"}).c_str());
  q.Bind(1, vm_id);
  VMR_ASSIGN_OR_RETURN(std::vector<StagedLogRecord> rows, SelectAll<StagedLogRecord>(q, ReadStagedLog));
  // Sorted here: SQLite would order sequences >= 2^63 (stored as negative
  // int64) first.
  std::sort(rows.begin(), rows.end(), [](const StagedLogRecord& a, const StagedLogRecord& b) {
    return std::pair(a.sequence, a.state) < std::pair(b.sequence, b.state);
  });
  return rows;
}

Status Catalog::DeleteStagedLog(const std::string& vm_id, uint64_t sequence, StagedLogState state) {
  std::lock_guard lock(mu_);
  Stmt q(db_, "DELETE FROM staged_logs WHERE vm_id = ?1 AND sequence = ?2 AND state = ?3");
  q.Bind(1, vm_id).BindU64(2, sequence).Bind(3, int64_t{static_cast<int>(state)});
  VMR_RETURN_IF_ERROR(q.Run());
  if (sqlite3_changes(db_) == 0) {
    return Status::NotFound("staged log " + std::to_string(sequence) + " of VM " + vm_id + " is not in the catalog");
  }
  return Status::Ok();
}

// --- Failover network settings ---------------------------------------------

Status Catalog::PutFailoverNetworkSettings(const std::string& vm_id,
                                           const std::vector<FailoverNetworkRecord>& adapters) {
  // Addresses, masks and adapter names are printable ASCII; anything else
  // is refused here rather than stored (and keeps the JSON encoding exact).
  auto printable = [](const std::string& v) {
    return std::all_of(v.begin(), v.end(), [](char c) { return c >= 0x20 && c < 0x7f; });
  };
  for (const FailoverNetworkRecord& a : adapters) {
    if (a.adapter.empty()) return Status::InvalidArgument("failover network settings: the adapter name is empty");
    bool ok = printable(a.adapter);
    for (const auto* list : {&a.ip_addresses, &a.subnets, &a.default_gateways, &a.dns_servers}) {
      for (const std::string& v : *list) ok = ok && printable(v);
    }
    if (!ok) {
      return Status::InvalidArgument("failover network settings of adapter '" + a.adapter +
                                     "': values must be printable ASCII");
    }
  }
  std::lock_guard lock(mu_);
  return WithTxnLocked([&]() -> Status {
    VMR_RETURN_IF_ERROR(VmExistsLocked(vm_id));
    Stmt del(db_, "DELETE FROM failover_network_settings WHERE vm_id = ?1");
    del.Bind(1, vm_id);
    VMR_RETURN_IF_ERROR(del.Run());
    int64_t position = 0;
    for (const FailoverNetworkRecord& a : adapters) {
      Stmt q(db_, Sql({"INSERT INTO failover_network_settings (", kFailoverNetworkColumns,
                       ", position) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"})
                      .c_str());
      q.Bind(1, vm_id)
          .Bind(2, a.adapter)
          .Bind(3, Json(a.ip_addresses).dump())
          .Bind(4, Json(a.subnets).dump())
          .Bind(5, Json(a.default_gateways).dump())
          .Bind(6, Json(a.dns_servers).dump())
          .BindBool(7, a.dhcp_enabled)
          .Bind(8, position++);
      Status s = q.Run();
      if (s.code() == Code::kAlreadyExists) {
        return Status::AlreadyExists("VM " + vm_id + ": adapter '" + a.adapter + "' is given more than once");
      }
      VMR_RETURN_IF_ERROR(s);
    }
    return Status::Ok();
  });
}

Result<std::vector<FailoverNetworkRecord>> Catalog::GetFailoverNetworkSettings(const std::string& vm_id) {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kFailoverNetworkColumns,
                   " FROM failover_network_settings WHERE vm_id = ?1 ORDER BY position, adapter"})
                  .c_str());
  q.Bind(1, vm_id);
  return SelectAll<FailoverNetworkRecord>(q, ReadFailoverNetwork);
}

Status Catalog::DeleteFailoverNetworkSettings(const std::string& vm_id, const std::string& adapter) {
  std::lock_guard lock(mu_);
  Stmt q(db_, "DELETE FROM failover_network_settings WHERE vm_id = ?1 AND adapter = ?2");
  q.Bind(1, vm_id).Bind(2, adapter);
  VMR_RETURN_IF_ERROR(q.Run());
  if (sqlite3_changes(db_) == 0) {
    return Status::NotFound("VM " + vm_id + " has no failover network settings for adapter '" + adapter + "'");
  }
  return Status::Ok();
}

// --- Statistics -------------------------------------------------------------

Result<std::optional<StatisticsRecord>> Catalog::GetStatistics(const std::string& vm_id, int index) {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kStatisticsColumns, " FROM statistics WHERE vm_id = ?1 AND idx = ?2"}).c_str());
  q.Bind(1, vm_id).Bind(2, int64_t{index});
  return SelectOne<StatisticsRecord>(q, ReadStatistics);
}

Status Catalog::PutStatistics(const StatisticsRecord& s) {
  VMR_RETURN_IF_ERROR(CheckIndex(s.index));
  std::lock_guard lock(mu_);
  Stmt q(db_,
         Sql({"INSERT INTO statistics (", kStatisticsColumns,
              ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18) "
              "ON CONFLICT (vm_id, idx) DO UPDATE SET start_ms = excluded.start_ms, end_ms = excluded.end_ms, "
              "replication_success_count = excluded.replication_success_count, "
              "replication_size_bytes = excluded.replication_size_bytes, "
              "max_replication_size_bytes = excluded.max_replication_size_bytes, "
              "replication_latency_ms = excluded.replication_latency_ms, "
              "max_replication_latency_ms = excluded.max_replication_latency_ms, "
              "replication_miss_count = excluded.replication_miss_count, "
              "network_failure_count = excluded.network_failure_count, "
              "replication_failure_count = excluded.replication_failure_count, "
              "pending_replication_size_bytes = excluded.pending_replication_size_bytes, "
              "app_consistent_failure_count = excluded.app_consistent_failure_count, "
              "replication_health = excluded.replication_health, "
              "last_test_failover_ms = excluded.last_test_failover_ms, "
              "initial_replication_size_bytes = excluded.initial_replication_size_bytes, "
              "health_issues_json = excluded.health_issues_json"})
             .c_str());
  q.Bind(1, s.vm_id)
      .Bind(2, int64_t{s.index})
      .Bind(3, s.start_ms)
      .Bind(4, s.end_ms)
      .BindU64(5, s.replication_success_count)
      .BindU64(6, s.replication_size_bytes)
      .BindU64(7, s.max_replication_size_bytes)
      .BindU64(8, s.replication_latency_ms)
      .BindU64(9, s.max_replication_latency_ms)
      .BindU64(10, s.replication_miss_count)
      .BindU64(11, s.network_failure_count)
      .BindU64(12, s.replication_failure_count)
      .BindU64(13, s.pending_replication_size_bytes)
      .BindU64(14, s.application_consistent_snapshot_failure_count)
      .Bind(15, int64_t{Number(s.replication_health)})
      .Bind(16, s.last_test_failover_ms)
      .BindU64(17, s.initial_replication_size_bytes)
      .Bind(18, Json(s.health_issues).dump());
  Status st = q.Run();
  if (st.code() == Code::kNotFound) {
    return Status::NotFound("VM " + s.vm_id + " has no replication relationship " + std::to_string(s.index));
  }
  return st;
}

Status Catalog::ResetStatistics(const std::string& vm_id, int index, int64_t now_ms) {
  VMR_RETURN_IF_ERROR(CheckIndex(index));
  std::lock_guard lock(mu_);
  return WithTxnLocked([&]() -> Status {
    VMR_RETURN_IF_ERROR(RelationshipExistsLocked(vm_id, index));
    VMR_ASSIGN_OR_RETURN(std::optional<StatisticsRecord> old, GetStatistics(vm_id, index));
    StatisticsRecord fresh;
    fresh.vm_id = vm_id;
    fresh.index = index;
    fresh.start_ms = now_ms;
    if (old) {
      fresh.replication_health = old->replication_health;
      fresh.last_test_failover_ms = old->last_test_failover_ms;
      fresh.health_issues = old->health_issues;
    }
    return PutStatistics(fresh);
  });
}

// --- Jobs -------------------------------------------------------------------

Status Catalog::PutJob(const JobRecord& j) {
  std::lock_guard lock(mu_);
  Stmt q(db_,
         Sql({"INSERT INTO jobs (", kJobColumns,
              ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) "
              "ON CONFLICT (id) DO UPDATE SET type = excluded.type, state = excluded.state, "
              "percent_complete = excluded.percent_complete, error_code = excluded.error_code, "
              "error_description = excluded.error_description, cancellable = excluded.cancellable, "
              "resumable = excluded.resumable, target = excluded.target, "
              "parameters_json = excluded.parameters_json, result_json = excluded.result_json, "
              "created_ms = excluded.created_ms, started_ms = excluded.started_ms, "
              "finished_ms = excluded.finished_ms, time_before_removal_s = excluded.time_before_removal_s"})
             .c_str());
  if (j.percent_complete > 100) {
    return Status::InvalidArgument("job " + j.id + ": percent_complete " + std::to_string(j.percent_complete) +
                                   " is over 100");
  }
  q.Bind(1, j.id)
      .Bind(2, int64_t{Number(j.type)})
      .Bind(3, int64_t{Number(j.state)})
      .Bind(4, int64_t{j.percent_complete})
      .Bind(5, int64_t{j.error_code})
      .Bind(6, j.error_description)
      .BindBool(7, j.cancellable)
      .BindBool(8, j.resumable)
      .Bind(9, j.target)
      .Bind(10, j.parameters_json)
      .Bind(11, j.result_json)
      .Bind(12, j.created_ms)
      .Bind(13, j.started_ms)
      .Bind(14, j.finished_ms)
      .Bind(15, j.time_before_removal_s);
  return q.Run();
}

Result<std::optional<JobRecord>> Catalog::GetJob(const std::string& id) {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kJobColumns, " FROM jobs WHERE id = ?1"}).c_str());
  q.Bind(1, id);
  return SelectOne<JobRecord>(q, ReadJob);
}

Result<std::vector<JobRecord>> Catalog::ListJobs() {
  std::lock_guard lock(mu_);
  Stmt q(db_, Sql({"SELECT ", kJobColumns, " FROM jobs ORDER BY created_ms, id"}).c_str());
  return SelectAll<JobRecord>(q, ReadJob);
}

Status Catalog::DeleteJob(const std::string& id) {
  std::lock_guard lock(mu_);
  Stmt q(db_, "DELETE FROM jobs WHERE id = ?1");
  q.Bind(1, id);
  VMR_RETURN_IF_ERROR(q.Run());
  if (sqlite3_changes(db_) == 0) return Status::NotFound("job " + id + " does not exist");
  return Status::Ok();
}

}  // namespace vmreplica
