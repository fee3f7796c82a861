#include "service/tls.h"

#include <arpa/inet.h>

#include <algorithm>

#include "vmreplica/fileutil.h"

namespace vmreplica::service {
namespace {

bool IsIpLiteral(const std::string& s) {
  unsigned char buf[16];
  return ::inet_pton(AF_INET, s.c_str(), buf) == 1 || ::inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

}  // namespace

Result<security::TlsIdentity> LoadIdentity(const std::string& ca_path, const std::string& cert_path,
                                           const std::string& key_path) {
  security::TlsIdentity id;
  auto ca = ReadFile(ca_path, 1 << 20);
  if (!ca.ok()) return ca.status().WithContext("CA certificate");
  auto cert = ReadFile(cert_path, 1 << 20);
  if (!cert.ok()) return cert.status().WithContext("host certificate");
  auto key = ReadFile(key_path, 1 << 20);
  if (!key.ok()) return key.status().WithContext("host key");
  id.ca_pem = std::move(*ca);
  id.cert_pem = std::move(*cert);
  id.key_pem = std::move(*key);
  VMR_RETURN_IF_ERROR(security::CheckIdentity(id));
  return id;
}

std::shared_ptr<grpc::ServerCredentials> MakeServerCredentials(const security::TlsIdentity& id) {
  grpc::SslServerCredentialsOptions opts(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  opts.pem_root_certs = id.ca_pem;
  opts.pem_key_cert_pairs.push_back({id.key_pem, id.cert_pem});
  return grpc::SslServerCredentials(opts);
}

std::shared_ptr<grpc::ChannelCredentials> MakeChannelCredentials(const security::TlsIdentity& id) {
  grpc::SslCredentialsOptions opts;
  opts.pem_root_certs = id.ca_pem;
  opts.pem_private_key = id.key_pem;
  opts.pem_cert_chain = id.cert_pem;
  return grpc::SslCredentials(opts);
}

std::string JoinHostPort(const std::string& host, uint16_t port) {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

std::shared_ptr<grpc::Channel> MakeSecureChannel(const std::string& host, uint16_t port,
                                                 const security::TlsIdentity& id) {
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride(host);
  args.SetMaxReceiveMessageSize(64 << 20);
  return grpc::CreateCustomChannel(JoinHostPort(host, port), MakeChannelCredentials(id), args);
}

std::vector<std::string> PeerNames(const grpc::ServerContext& context) {
  std::vector<std::string> names;
  auto auth = context.auth_context();
  if (!auth || !auth->IsPeerAuthenticated()) return names;
  auto lower = [](std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
    return s;
  };
  // gRPC reports DNS and IP SANs together under one property: DNS names
  // go first, IP literals after them, the CN only without a DNS SAN.
  std::vector<std::string> ips;
  for (const auto& v : auth->FindPropertyValues("x509_subject_alternative_name")) {
    std::string n = lower(std::string(v.data(), v.size()));
    (IsIpLiteral(n) ? ips : names).push_back(n);
  }
  if (names.empty()) {
    for (const auto& v : auth->FindPropertyValues("x509_common_name")) {
      names.push_back(lower(std::string(v.data(), v.size())));
    }
  }
  names.insert(names.end(), ips.begin(), ips.end());
  return names;
}

}  // namespace vmreplica::service
