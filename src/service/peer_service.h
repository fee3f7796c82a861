// The host-to-host service a replica server answers on its mTLS listener:
// Hello and the data plane (docs/protocol.md). The data-plane handlers
// authorise every call from the caller's certificate and hand it to the
// ReplicaReceiver (the daemon's ReplicaManager, include/vmreplica/transfer.h).
#pragma once

#include "service/service_env.h"
#include "vmreplica/peer.grpc.pb.h"
#include "vmreplica/transfer.h"

namespace vmreplica::service {

class PeerService final : public v1::ReplicaPeer::Service {
 public:
  // `replicas` may be null: the data-plane methods then answer UNIMPLEMENTED
  // and Hello does not offer "delta-v1". `reverse` may be null: PrepareReverse
  // then answers UNIMPLEMENTED and Hello does not offer "reverse-v1". Every
  // pointer outlives the service.
  explicit PeerService(ServiceEnv* env, ReplicaReceiver* replicas = nullptr, ReverseReceiver* reverse = nullptr)
      : env_(env), replicas_(replicas), reverse_(reverse) {}

  // Tells the caller whether this host is a replica server and whether the
  // names of its certificate match an authorization entry. Never fails the
  // RPC for a refusal: the answer says why.
  grpc::Status Hello(grpc::ServerContext* context, const v1::HelloRequest* request,
                     v1::HelloResponse* response) override;

  grpc::Status CreateReplica(grpc::ServerContext* context, const v1::CreateReplicaRequest* request,
                             v1::ReplicaStatus* response) override;
  grpc::Status GetReplicaStatus(grpc::ServerContext* context, const v1::ReplicaRef* request,
                                v1::ReplicaStatus* response) override;
  grpc::Status RemoveReplica(grpc::ServerContext* context, const v1::ReplicaRef* request,
                             v1::RemoveReplicaResponse* response) override;
  grpc::Status ModifyReplica(grpc::ServerContext* context, const v1::ModifyReplicaRequest* request,
                             v1::ReplicaStatus* response) override;
  // The replica host asks whether a primary VM of this host runs (before a
  // failover there). Answered from the replication engine.
  grpc::Status GetPrimaryVmState(grpc::ServerContext* context, const v1::PrimaryVmQuery* request,
                                 v1::PrimaryVmState* response) override;
  grpc::Status ReserveImport(grpc::ServerContext* context, const v1::ReserveImportRequest* request,
                             v1::ReplicaStatus* response) override;
  grpc::Status GetBlockHashes(grpc::ServerContext* context, const v1::BlockHashRequest* request,
                              grpc::ServerWriter<v1::BlockHashPiece>* writer) override;
  // Reverse sync (docs/protocol.md "GetRangeHashes"): authorised as
  // GetBlockHashes; each run's list in pieces of at most 4 MiB, end_of_run
  // on its last piece, end_of_disk also on the last piece of a disk's last run.
  grpc::Status GetRangeHashes(grpc::ServerContext* context, const v1::RangeHashRequest* request,
                              grpc::ServerWriter<v1::BlockHashPiece>* writer) override;
  grpc::Status PushDelta(grpc::ServerContext* context,
                         grpc::ServerReaderWriter<v1::DeltaReply, v1::DeltaMessage>* stream) override;
  // Reverse (docs/failover.md 14.1, 14.2): the caller must pass the
  // data-plane authorisation (replica server enabled, certificates, a
  // matching entry: its storage location and trust group are the adopted
  // store's); the ReverseReceiver checks the caller's role.
  grpc::Status PrepareReverse(grpc::ServerContext* context, const v1::PrepareReverseRequest* request,
                              v1::PrepareReverseResponse* response) override;

 private:
  // The caller's entry, or PermissionDenied (docs/protocol.md "Authorisation
  // on every call", steps 1-3).
  Result<PrimaryCaller> Authorize(const grpc::ServerContext& context);

  ServiceEnv* const env_;
  ReplicaReceiver* const replicas_;
  ReverseReceiver* const reverse_;
};

}  // namespace vmreplica::service
