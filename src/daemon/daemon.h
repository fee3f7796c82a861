// vmreplicad: owns the catalog, the job engine, the local admin socket and
// the mTLS listener, and wires the services onto them.
//
//   Create(config)  lock state dir -> load identity -> open catalog
//                   -> recover jobs   (any failure: clear error, nothing started)
//   Start()         admin socket (0600) -> listener (if [listener] start)
//                   -> replication engine (resumes relationships)
//   Stop()          replication engine -> listener -> admin socket -> jobs
//                   (waits for in-flight work)
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <mutex>

#include "daemon/config.h"
#include "service/control_service.h"
#include "service/peer_service.h"
#include "service/vm_service.h"
#include "vmreplica/failover.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/replication.h"
#include "vmreplica/reverse_receiver.h"
#include "vmreplica/transfer.h"

namespace vmreplica::daemon {

class Daemon final : public service::ListenerControl {
 public:
  static Result<std::unique_ptr<Daemon>> Create(DaemonConfig config);
  ~Daemon() override;

  Status Start();
  // Idempotent; waits for the servers and running jobs.
  void Stop();

  // service::ListenerControl
  Status StartListener() override;
  Status StopListener() override;
  bool ListenerRunning() const override;
  std::string ListenAddress() const override;

 private:
  Daemon(DaemonConfig config, FileLock lock);

  // Constant after construction.
  const DaemonConfig config_;
  FileLock lock_;
  std::unique_ptr<Catalog> catalog_;
  std::unique_ptr<JobEngine> jobs_;
  std::unique_ptr<ReplicaManager> replicas_;       // the replica side of replication
  std::unique_ptr<ReplicationEngine> replication_;  // the primary side
  std::unique_ptr<FailoverManager> failover_;       // failover / test VMs on the replica side
  std::unique_ptr<OldPrimaryReverse> reverse_;      // PrepareReverse: the old primary's side of a reverse
  service::ServiceEnv env_;
  std::unique_ptr<service::ControlService> local_control_;
  std::unique_ptr<service::ControlService> remote_control_;
  std::unique_ptr<service::VmService> local_vm_;
  std::unique_ptr<service::VmService> remote_vm_;
  std::unique_ptr<service::PeerService> peer_;

  std::unique_ptr<grpc::Server> admin_server_;  // set by Start, reset by Stop

  mutable std::mutex listener_mu_;
  std::unique_ptr<grpc::Server> listener_;  // guarded by listener_mu_
  std::string listen_address_;              // guarded by listener_mu_
  bool stopped_ = false;                    // guarded by listener_mu_
};

}  // namespace vmreplica::daemon
