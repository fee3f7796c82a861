// vmreplicad's configuration file (TOML). docs/configuration.md lists every
// key; LoadConfig refuses unknown keys and out-of-range values with a
// message naming the key, so a typo never silently falls back to a default.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "service/service_env.h"
#include "vmreplica/replication.h"
#include "vmreplica/status.h"

namespace vmreplica::daemon {

struct DaemonConfig {
  // [daemon]
  std::string state_dir = "/var/lib/vmreplica";       // catalog, lock, staging
  std::string admin_socket = "/run/vmreplica/admin.sock";
  std::string log_level = "info";                     // trace debug info warn error
  std::string log_file;                               // empty: standard error
  // [listener]: the mTLS listener (peer protocol and remote administration).
  std::string listen_address = "0.0.0.0";
  uint32_t listen_port = 0;                           // 0: keep HttpsPort from the catalog
  bool start_listener = true;
  // [tls]
  std::string ca_file = "/etc/vmreplica/ca.crt";
  std::string certificate_file = "/etc/vmreplica/host.crt";
  std::string key_file = "/etc/vmreplica/host.key";
  // [failover] hypervisor = "same" (default: VMs bound through libvirt on
  // the primary run as libvirt domains here) or "qemu" (every failover,
  // test and reversed VM runs under QEMU directly).
  bool libvirt_vms_through_libvirt = true;
  // [replica] apply_while_receiving: an ordinary delta the store can take
  // at once is applied as it arrives instead of staged first
  // (docs/protocol.md "Replica side: applying").
  bool apply_while_receiving = true;
  // [admin] + [knobs]
  service::ServiceOptions service;
  int job_workers = 4;                                // 1..64
  // [replication]: server-wide limits of the primary side.
  int max_parallel_transfers = 3;                     // 1..64
  uint64_t bandwidth_limit_bytes_per_s = 0;           // 0 = unlimited
  // [testing]: never in production. Replaces every ReplicationInterval by
  // this many milliseconds (the daemon logs a warning at start).
  int64_t test_replication_interval_override_ms = 0;  // 0 = off, 100..3600000
  int64_t test_app_consistent_interval_override_ms = 0;  // 0 = off, 100..43200000
  int64_t test_import_chunk_delay_ms = 0;                // 0 = off, 1..10000: ImportInitialReplica sleeps per chunk
  std::vector<BandwidthWindow> bandwidth_schedule;      // [[replication.bandwidth_schedule]]
};

// Parses a config file. Relative paths are resolved against the file's directory.
Result<DaemonConfig> LoadConfig(const std::string& path);
// Parses config text (for tests); `base_dir` resolves relative paths.
Result<DaemonConfig> ParseConfig(const std::string& text, const std::string& base_dir);

}  // namespace vmreplica::daemon
