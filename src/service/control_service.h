// The control API (proto/vmreplica/control.proto): the methods of
// Msvm_ReplicationService. One instance serves the local unix socket
// (remote = false: the socket's 0600 mode is the authority check) and one
// the mTLS listener (remote = true: the caller's certificate names must
// match [admin] remote_principals, else 32769).
//
// Methods whose capability has not landed yet answer 32770 (not supported)
// and say so; they are never reported as done.
#pragma once

#include "service/service_env.h"
#include "vmreplica/control.grpc.pb.h"

namespace vmreplica::service {

class ControlService final : public v1::ReplicationService::Service {
 public:
  ControlService(ServiceEnv* env, bool remote) : env_(env), remote_(remote) {}

  // Replica server.
  grpc::Status TestReplicationConnection(grpc::ServerContext*, const v1::TestReplicationConnectionRequest*,
                                         v1::MethodResponse*) override;
  grpc::Status AddAuthorizationEntry(grpc::ServerContext*, const v1::AuthorizationEntryRequest*,
                                     v1::MethodResponse*) override;
  grpc::Status ModifyAuthorizationEntry(grpc::ServerContext*, const v1::AuthorizationEntryRequest*,
                                        v1::MethodResponse*) override;
  grpc::Status RemoveAuthorizationEntry(grpc::ServerContext*, const v1::RemoveAuthorizationEntryRequest*,
                                        v1::MethodResponse*) override;
  grpc::Status SetAuthorizationEntry(grpc::ServerContext*, const v1::SetAuthorizationEntryRequest*,
                                     v1::MethodResponse*) override;
  grpc::Status ModifyServiceSettings(grpc::ServerContext*, const v1::ServiceSettingsRequest*,
                                     v1::MethodResponse*) override;
  grpc::Status GetSystemCertificates(grpc::ServerContext*, const v1::Empty*, v1::CertificatesResponse*) override;
  grpc::Status RequestStateChange(grpc::ServerContext*, const v1::ServiceStateRequest*, v1::MethodResponse*) override;
  grpc::Status StartService(grpc::ServerContext*, const v1::Empty*, v1::MethodResponse*) override;
  grpc::Status StopService(grpc::ServerContext*, const v1::Empty*, v1::MethodResponse*) override;

  // Reads.
  grpc::Status GetServiceSettings(grpc::ServerContext*, const v1::Empty*, v1::ServiceSettingsResponse*) override;
  grpc::Status ListAuthorizationEntries(grpc::ServerContext*, const v1::Empty*,
                                        v1::AuthorizationEntriesResponse*) override;
  grpc::Status GetServiceStatus(grpc::ServerContext*, const v1::Empty*, v1::ServiceStatusResponse*) override;
  grpc::Status ListReplications(grpc::ServerContext*, const v1::Empty*, v1::ReplicationsResponse*) override;
  grpc::Status ListRecoveryPoints(grpc::ServerContext*, const v1::VmRequest*, v1::RecoveryPointsResponse*) override;
  grpc::Status GetFailoverNetworkAdapterSettings(grpc::ServerContext*, const v1::VmRequest*,
                                                 v1::FailoverNetworkResponse*) override;

  // Jobs.
  grpc::Status GetJob(grpc::ServerContext*, const v1::JobRequest*, v1::JobResponse*) override;
  grpc::Status ListJobs(grpc::ServerContext*, const v1::Empty*, v1::JobsResponse*) override;
  grpc::Status WaitJob(grpc::ServerContext*, const v1::WaitJobRequest*, v1::JobResponse*) override;
  grpc::Status CancelJob(grpc::ServerContext*, const v1::JobRequest*, v1::MethodResponse*) override;

  // Relationship methods (replication; the failover family answers 32770 until it lands).
  grpc::Status CreateReplicationRelationship(grpc::ServerContext*, const v1::VmSettingsRequest*,
                                             v1::MethodResponse*) override;
  grpc::Status StartReplication(grpc::ServerContext*, const v1::StartReplicationRequest*,
                                v1::MethodResponse*) override;
  grpc::Status ImportInitialReplica(grpc::ServerContext*, const v1::ImportInitialReplicaRequest*,
                                    v1::MethodResponse*) override;
  grpc::Status InitiateFailover(grpc::ServerContext*, const v1::FailoverRequest*, v1::MethodResponse*) override;
  grpc::Status RevertFailover(grpc::ServerContext*, const v1::VmRequest*, v1::MethodResponse*) override;
  grpc::Status CommitFailover(grpc::ServerContext*, const v1::VmRequest*, v1::MethodResponse*) override;
  grpc::Status StartVm(grpc::ServerContext*, const v1::VmRequest*, v1::MethodResponse*) override;
  grpc::Status TestReplicaSystem(grpc::ServerContext*, const v1::FailoverRequest*, v1::MethodResponse*) override;
  grpc::Status DestroySystem(grpc::ServerContext*, const v1::VmRequest*, v1::MethodResponse*) override;
  grpc::Status ReverseReplicationRelationship(grpc::ServerContext*, const v1::VmSettingsRequest*,
                                              v1::MethodResponse*) override;
  grpc::Status InitiateFailback(grpc::ServerContext*, const v1::FailbackRequest*, v1::MethodResponse*) override;
  grpc::Status ChangeReplicationModeToPrimary(grpc::ServerContext*, const v1::VmRelationshipRequest*,
                                              v1::MethodResponse*) override;
  grpc::Status Resynchronize(grpc::ServerContext*, const v1::ResynchronizeRequest*, v1::MethodResponse*) override;
  grpc::Status ModifyReplicationSettings(grpc::ServerContext*, const v1::VmSettingsRequest*,
                                         v1::MethodResponse*) override;
  grpc::Status RemoveReplicationRelationship(grpc::ServerContext*, const v1::VmRequest*,
                                             v1::MethodResponse*) override;
  grpc::Status RemoveReplicationRelationshipEx(grpc::ServerContext*, const v1::VmRelationshipRequest*,
                                               v1::MethodResponse*) override;
  grpc::Status GetReplicationStatistics(grpc::ServerContext*, const v1::VmRequest*,
                                        v1::StatisticsResponse*) override;
  grpc::Status GetReplicationStatisticsEx(grpc::ServerContext*, const v1::VmRelationshipRequest*,
                                          v1::StatisticsResponse*) override;
  grpc::Status ResetReplicationStatistics(grpc::ServerContext*, const v1::VmRequest*,
                                          v1::MethodResponse*) override;
  grpc::Status ResetReplicationStatisticsEx(grpc::ServerContext*, const v1::VmRelationshipRequest*,
                                            v1::MethodResponse*) override;
  grpc::Status RequestReplicationStateChange(grpc::ServerContext*, const v1::StateChangeRequest*,
                                             v1::MethodResponse*) override;
  grpc::Status RequestReplicationStateChangeEx(grpc::ServerContext*, const v1::StateChangeRequest*,
                                               v1::MethodResponse*) override;
  grpc::Status SetFailoverNetworkAdapterSettings(grpc::ServerContext*, const v1::FailoverNetworkRequest*,
                                                 v1::MethodResponse*) override;

 private:
  // False (and `result` filled with 32769) when the caller may not administer this host.
  bool Authorize(const grpc::ServerContext& context, const char* method, v1::MethodResult* result) const;
  // The listener cannot stop itself from one of its own handlers.
  bool RefuseOverOwnListener(const char* what, v1::MethodResult* result) const;
  Status SetListenerRunning(bool running);
  grpc::Status ChangeState(const std::string& vm, int index, uint32_t requested, v1::MethodResult* r);

  ServiceEnv* const env_;
  const bool remote_;
};

}  // namespace vmreplica::service
