#include "catalog/schema.h"

#include "vmreplica/catalog.h"

namespace vmreplica::catalog_internal {
namespace {

// Conventions: enums are INTEGER WMI numbers; times are INTEGER Unix epoch
// milliseconds (0 = never); uint64 values are stored as their int64 bit
// pattern; booleans are 0/1; text is never NULL.
constexpr const char* kV1 = R"sql(
CREATE TABLE server_settings (
  id                          INTEGER PRIMARY KEY CHECK (id = 1),
  recovery_server_enabled     INTEGER NOT NULL,
  allowed_authentication_type INTEGER NOT NULL,
  certificate_thumbprint      TEXT    NOT NULL,
  http_port                   INTEGER NOT NULL,
  https_port                  INTEGER NOT NULL,
  monitoring_interval_s       INTEGER NOT NULL,
  monitoring_start_time_min   INTEGER NOT NULL
);

CREATE TABLE authorization_entries (
  allowed_primary_host_system TEXT NOT NULL PRIMARY KEY COLLATE NOCASE,
  replica_storage_location    TEXT NOT NULL,
  trust_group                 TEXT NOT NULL
);

CREATE TABLE vms (
  id              TEXT    NOT NULL PRIMARY KEY,
  name            TEXT    NOT NULL,
  mode            INTEGER NOT NULL,
  definition_json TEXT    NOT NULL,
  created_ms      INTEGER NOT NULL
);
CREATE INDEX vms_by_name ON vms (name);

CREATE TABLE disks (
  vm_id       TEXT    NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
  name        TEXT    NOT NULL,
  position    INTEGER NOT NULL,
  size_bytes  INTEGER NOT NULL,
  path        TEXT    NOT NULL,
  node_name   TEXT    NOT NULL,
  granularity INTEGER NOT NULL,
  included    INTEGER NOT NULL,
  PRIMARY KEY (vm_id, name)
);

CREATE TABLE relationships (
  vm_id                        TEXT    NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
  idx                          INTEGER NOT NULL CHECK (idx IN (0, 1)),
  local_mode                   INTEGER NOT NULL,
  state                        INTEGER NOT NULL,
  health                       INTEGER NOT NULL,
  settings_json                TEXT    NOT NULL,
  last_replication_ms          INTEGER NOT NULL,
  last_apply_ms                INTEGER NOT NULL,
  last_app_consistent_ms       INTEGER NOT NULL,
  last_replication_type        INTEGER NOT NULL,
  failed_over_replication_type INTEGER NOT NULL,
  generation_id                TEXT    NOT NULL,
  sequence                     INTEGER NOT NULL,
  PRIMARY KEY (vm_id, idx)
);

CREATE TABLE recovery_points (
  id            TEXT    NOT NULL PRIMARY KEY,
  vm_id         TEXT    NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
  time_ms       INTEGER NOT NULL,
  kind          INTEGER NOT NULL,
  sequence      INTEGER NOT NULL,
  generation_id TEXT    NOT NULL
);
CREATE INDEX recovery_points_by_vm ON recovery_points (vm_id, time_ms, sequence);

CREATE TABLE statistics (
  vm_id                           TEXT    NOT NULL,
  idx                             INTEGER NOT NULL,
  start_ms                        INTEGER NOT NULL,
  end_ms                          INTEGER NOT NULL,
  replication_success_count       INTEGER NOT NULL,
  replication_size_bytes          INTEGER NOT NULL,
  max_replication_size_bytes      INTEGER NOT NULL,
  replication_latency_ms          INTEGER NOT NULL,
  max_replication_latency_ms      INTEGER NOT NULL,
  replication_miss_count          INTEGER NOT NULL,
  network_failure_count           INTEGER NOT NULL,
  replication_failure_count       INTEGER NOT NULL,
  pending_replication_size_bytes  INTEGER NOT NULL,
  app_consistent_failure_count    INTEGER NOT NULL,
  replication_health              INTEGER NOT NULL,
  last_test_failover_ms           INTEGER NOT NULL,
  initial_replication_size_bytes  INTEGER NOT NULL,
  health_issues_json              TEXT    NOT NULL,
  PRIMARY KEY (vm_id, idx),
  FOREIGN KEY (vm_id, idx) REFERENCES relationships (vm_id, idx) ON DELETE CASCADE
);

CREATE TABLE jobs (
  id                    TEXT    NOT NULL PRIMARY KEY,
  type                  INTEGER NOT NULL,
  state                 INTEGER NOT NULL,
  percent_complete      INTEGER NOT NULL,
  error_code            INTEGER NOT NULL,
  error_description     TEXT    NOT NULL,
  cancellable           INTEGER NOT NULL,
  resumable             INTEGER NOT NULL,
  target                TEXT    NOT NULL,
  parameters_json       TEXT    NOT NULL,
  result_json           TEXT    NOT NULL,
  created_ms            INTEGER NOT NULL,
  started_ms            INTEGER NOT NULL,
  finished_ms           INTEGER NOT NULL,
  time_before_removal_s INTEGER NOT NULL
);
CREATE INDEX jobs_by_created ON jobs (created_ms, id);
)sql";

// Version 2: the staging area's delta logs (docs/replica_store.md section
// 14). state: 1 staged, 2 rejected; an applied log's row is deleted.
constexpr const char* kV2 = R"sql(
CREATE TABLE staged_logs (
  vm_id       TEXT    NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
  sequence    INTEGER NOT NULL,
  state       INTEGER NOT NULL,
  file_name   TEXT    NOT NULL,
  size_bytes  INTEGER NOT NULL,
  received_ms INTEGER NOT NULL,
  PRIMARY KEY (vm_id, sequence, state)
);
)sql";

// Version 3: failover IP settings per VM and adapter
// (SetFailoverNetworkAdapterSettings). The four lists are JSON arrays of
// strings; position keeps the order the adapters were given in.
constexpr const char* kV3 = R"sql(
CREATE TABLE failover_network_settings (
  vm_id                 TEXT    NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
  adapter               TEXT    NOT NULL,
  position              INTEGER NOT NULL,
  ip_addresses_json     TEXT    NOT NULL,
  subnets_json          TEXT    NOT NULL,
  default_gateways_json TEXT    NOT NULL,
  dns_servers_json      TEXT    NOT NULL,
  dhcp_enabled          INTEGER NOT NULL,
  PRIMARY KEY (vm_id, adapter)
);
)sql";

// Version 4: how the relationship's initial replication is made (an
// InitialReplicationType number: 1 network, 2 export, 3 seeded network).
// With 2, the primary stays in state 2 after the export until the replica
// imported it (docs/protocol.md "ReserveImport").
constexpr const char* kV4 = R"sql(
ALTER TABLE relationships ADD COLUMN initial_type INTEGER NOT NULL DEFAULT 1;
)sql";

constexpr const char* kMigrations[] = {kV1, kV2, kV3, kV4};
static_assert(std::size(kMigrations) == kCatalogSchemaVersion,
              "each schema version needs exactly one migration");

}  // namespace

std::span<const char* const> Migrations() { return kMigrations; }

}  // namespace vmreplica::catalog_internal
