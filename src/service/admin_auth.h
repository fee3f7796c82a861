// The authority check of the administration services (ControlService,
// VmInventory): a local caller is trusted (the socket is mode 0600); a
// remote one needs a certificate name matching [admin] remote_principals.
#pragma once

#include <grpcpp/grpcpp.h>

#include "service/service_env.h"
#include "vmreplica/types.pb.h"

namespace vmreplica::service {

// True when the caller may administer this host; otherwise `result` is set
// to 32769 with a message naming the caller, and the refusal is logged.
bool AuthorizeAdmin(const ServiceEnv& env, bool remote, const grpc::ServerContext& context, const char* method,
                    v1::MethodResult* result);

}  // namespace vmreplica::service
