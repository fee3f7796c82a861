// What the service handlers share: the catalog, the job engine, this host's
// identity and the control of the replica listener. Owned by the daemon;
// every pointer outlives the services.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "vmreplica/catalog.h"
#include "vmreplica/failover.h"
#include "vmreplica/jobs.h"
#include "vmreplica/replication.h"
#include "vmreplica/security.h"
#include "vmreplica/status.h"

namespace vmreplica::service {

// Version of the host-to-host protocol (docs/protocol.md) and the named
// features this build speaks. A feature name is never reused.
inline constexpr uint32_t kProtocolVersion = 1;
inline const std::vector<std::string> kFeatures = {"hello-v1"};

// Tunables of the service layer. Ranges are checked by the config loader.
struct ServiceOptions {
  // TCP connect + TLS handshake with a remote daemon (1 s .. 10 min).
  std::chrono::milliseconds connect_timeout{15000};
  // One control or peer RPC to a remote daemon (1 s .. 10 min).
  std::chrono::milliseconds rpc_timeout{30000};
  // Certificate-name patterns (as authorization entries: "*", "*.x", exact)
  // allowed to call the control API over mutual TLS. Empty: none.
  std::vector<std::string> remote_admin_principals;
};

// The mTLS listener (peer protocol + remote administration), run by the daemon.
class ListenerControl {
 public:
  virtual ~ListenerControl() = default;
  // Both are idempotent and return once the listener is up / down.
  // They must not be called from a handler running on the listener itself.
  virtual Status StartListener() = 0;
  virtual Status StopListener() = 0;
  virtual bool ListenerRunning() const = 0;
  virtual std::string ListenAddress() const = 0;  // "host:port"
};

struct ServiceEnv {
  Catalog* catalog = nullptr;
  JobEngine* jobs = nullptr;
  ListenerControl* listener = nullptr;
  ReplicationEngine* replication = nullptr;  // the primary side of replication; may be null in tests
  FailoverManager* failover = nullptr;       // failover on the replica host; may be null in tests
  security::TlsIdentity identity;
  std::string host_name;  // this host's name, from its certificate
  std::string version;    // vmreplica version string
  ServiceOptions options;
};

}  // namespace vmreplica::service
