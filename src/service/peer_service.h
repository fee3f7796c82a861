// The host-to-host service a replica server answers on its mTLS listener.
#pragma once

#include "service/service_env.h"
#include "vmreplica/peer.grpc.pb.h"

namespace vmreplica::service {

class PeerService final : public v1::ReplicaPeer::Service {
 public:
  explicit PeerService(ServiceEnv* env) : env_(env) {}

  // Tells the caller whether this host is a replica server and whether the
  // names of its certificate match an authorization entry. Never fails the
  // RPC for a refusal: the answer says why.
  grpc::Status Hello(grpc::ServerContext* context, const v1::HelloRequest* request,
                     v1::HelloResponse* response) override;

 private:
  ServiceEnv* const env_;
};

}  // namespace vmreplica::service
