// InspectCertificatePem, InspectCertificateChainPem, CertificateNames.
#include <algorithm>
#include <cctype>

#include "security/openssl_util.h"
#include "vmreplica/security.h"

namespace vmreplica::security {

using internal::ErrorQueueGuard;
using internal::X509Ptr;

Result<CertificateInfo> InspectCertificatePem(const std::string& pem) {
  ErrorQueueGuard guard;
  VMR_ASSIGN_OR_RETURN(std::vector<X509Ptr> certs, internal::ParseCertificates(pem, "certificate"));
  return internal::InspectX509(certs.front().get());
}

Result<std::vector<CertificateInfo>> InspectCertificateChainPem(const std::string& pem) {
  ErrorQueueGuard guard;
  VMR_ASSIGN_OR_RETURN(std::vector<X509Ptr> certs,
                       internal::ParseCertificates(pem, "certificate chain"));
  std::vector<CertificateInfo> infos;
  infos.reserve(certs.size());
  for (const X509Ptr& cert : certs) {
    VMR_ASSIGN_OR_RETURN(CertificateInfo info, internal::InspectX509(cert.get()));
    infos.push_back(std::move(info));
  }
  return infos;
}

std::vector<std::string> CertificateNames(const CertificateInfo& info) {
  auto lower = [](std::string s) {
    std::transform(s.begin(), s.end(), s.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return s;
  };
  std::vector<std::string> names;
  auto add = [&names](std::string name) {
    if (name.empty()) return;
    if (std::find(names.begin(), names.end(), name) == names.end()) {
      names.push_back(std::move(name));
    }
  };
  if (info.dns_names.empty()) {
    add(lower(info.subject_cn));
  } else {
    for (const std::string& dns : info.dns_names) add(lower(dns));
  }
  for (const std::string& ip : info.ip_addresses) add(ip);
  return names;
}

}  // namespace vmreplica::security
