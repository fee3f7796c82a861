// Private: a TlsIdentity parsed into OpenSSL objects.
#pragma once

#include <string>
#include <vector>

#include "security/openssl_util.h"
#include "vmreplica/security.h"

namespace vmreplica::security::internal {

struct LoadedIdentity {
  std::vector<X509Ptr> ca_certs;  // trust anchors for peers, at least one
  X509Ptr cert;                   // our certificate
  std::vector<X509Ptr> chain;     // intermediates that followed it in cert_pem
  EvpPkeyPtr key;                 // belongs to `cert`
  std::string subject;            // of `cert`, for messages
  std::string issuer;
};

// Parses the three PEMs and checks that the key belongs to the certificate.
// Anything wrong -> InvalidArgument naming the part ("our private key ...").
Result<LoadedIdentity> LoadIdentity(const TlsIdentity& me);

// "'CN=Lab CA A', 'CN=Lab CA B'": the subjects of `certs`, for messages.
std::string QuotedSubjects(const std::vector<X509Ptr>& certs);

}  // namespace vmreplica::security::internal
