// gRPC credentials from a host identity (CA, certificate, key), and the
// names of the peer of a call as its certificate gives them.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "vmreplica/security.h"
#include "vmreplica/status.h"

namespace vmreplica::service {

// Reads the three PEM files of a host identity and checks them
// (security::CheckIdentity): the daemon refuses to start on an error.
Result<security::TlsIdentity> LoadIdentity(const std::string& ca_path, const std::string& cert_path,
                                           const std::string& key_path);

// Server side: requires and verifies a client certificate against our CA.
std::shared_ptr<grpc::ServerCredentials> MakeServerCredentials(const security::TlsIdentity& id);

// Client side: presents our certificate, verifies the server against our CA.
std::shared_ptr<grpc::ChannelCredentials> MakeChannelCredentials(const security::TlsIdentity& id);

// A channel to host:port over mutual TLS; the server certificate must name `host`.
std::shared_ptr<grpc::Channel> MakeSecureChannel(const std::string& host, uint16_t port,
                                                 const security::TlsIdentity& id);

// "host:port", with brackets around an IPv6 literal.
std::string JoinHostPort(const std::string& host, uint16_t port);

// The names of a call's TLS peer: DNS SANs (lower-cased), then IP SANs, the
// subject CN only when the certificate has no DNS SAN. Empty for a call
// that did not come over TLS (the local unix socket).
std::vector<std::string> PeerNames(const grpc::ServerContext& context);

}  // namespace vmreplica::service
