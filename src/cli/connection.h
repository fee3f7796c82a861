// How the client reaches vmreplicad: the local admin socket (no TLS; the
// socket's file mode is the access control) or a remote daemon over mutual
// TLS, authenticated by a certificate the daemon's [admin]
// remote_principals names.
#pragma once

#include <grpcpp/channel.h>

#include <memory>
#include <string>

#include "vmreplica/status.h"

namespace vmreplica::cli {

inline constexpr const char* kDefaultSocket = "/run/vmreplica/admin.sock";
inline constexpr const char* kSocketEnv = "VMREPLICA_SOCKET";

struct ConnectionOptions {
  std::string socket;                        // used when `remote` is empty
  std::string remote;                        // HOST:PORT or [IPv6]:PORT
  std::string ca_file, cert_file, key_file;  // PEM files, all three required with `remote`
};

// $VMREPLICA_SOCKET when set and not empty, else kDefaultSocket.
std::string DefaultSocketPath();

// What error messages call the daemon: the socket path or HOST:PORT.
std::string TargetDescription(const ConnectionOptions& options);

// Builds the channel (no connection is made yet: gRPC connects on the first
// call). Errors: a remote address that does not parse, or a missing TLS
// option -> InvalidArgument; an unreadable PEM file -> NotFound / IOError.
Result<std::shared_ptr<grpc::Channel>> OpenChannel(const ConnectionOptions& options);

}  // namespace vmreplica::cli
