// The VM inventory API (proto/vmreplica/vm.proto): binds VMs to the daemon
// (InspectVm) and stores their definitions in the catalog. One instance
// serves the local unix socket (remote = false: the socket's 0600 mode is
// the authority check) and one the mTLS listener (remote = true: the
// caller's certificate names must match [admin] remote_principals, else
// 32769), as ControlService.
//
// Thread safety: handlers run on gRPC threads concurrently; they share only
// the catalog (thread-safe). AddVm talks to QEMU/libvirt before the catalog
// transaction, never inside it.
#pragma once

#include "service/service_env.h"
#include "vmreplica/vm.grpc.pb.h"

namespace vmreplica::service {

class VmService final : public v1::VmInventory::Service {
 public:
  VmService(ServiceEnv* env, bool remote) : env_(env), remote_(remote) {}

  // 0 with the stored VM; 32773 for a bad request or a name/uuid already
  // present; 32777 when QEMU/libvirt cannot be reached; 32779 for a missing
  // block node, domain or image file.
  grpc::Status AddVm(grpc::ServerContext*, const v1::AddVmRequest*, v1::VmResponse*) override;
  // vm: UUID or name. 32779 when absent; 32773 when a name is ambiguous.
  grpc::Status GetVm(grpc::ServerContext*, const v1::VmRequest*, v1::VmResponse*) override;
  grpc::Status ListVms(grpc::ServerContext*, const v1::Empty*, v1::VmsResponse*) override;
  // 32775 while a replication relationship of the VM exists.
  grpc::Status RemoveVm(grpc::ServerContext*, const v1::VmRequest*, v1::MethodResponse*) override;

 private:
  bool Authorize(const grpc::ServerContext& context, const char* method, v1::MethodResult* result) const;

  ServiceEnv* const env_;
  const bool remote_;
};

}  // namespace vmreplica::service
