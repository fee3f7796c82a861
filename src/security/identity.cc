// LoadIdentity, CheckIdentity.
#include "security/identity.h"

#include <ctime>

namespace vmreplica::security {
namespace internal {

Result<LoadedIdentity> LoadIdentity(const TlsIdentity& me) {
  LoadedIdentity id;
  VMR_ASSIGN_OR_RETURN(id.ca_certs, ParseCertificates(me.ca_pem, "our CA certificate"));
  VMR_ASSIGN_OR_RETURN(std::vector<X509Ptr> certs,
                       ParseCertificates(me.cert_pem, "our certificate"));
  VMR_ASSIGN_OR_RETURN(id.key, ParsePrivateKey(me.key_pem, "our private key"));
  id.cert = std::move(certs.front());
  for (size_t i = 1; i < certs.size(); ++i) id.chain.push_back(std::move(certs[i]));
  id.subject = NameToString(X509_get_subject_name(id.cert.get()));
  id.issuer = NameToString(X509_get_issuer_name(id.cert.get()));
  if (X509_check_private_key(id.cert.get(), id.key.get()) != 1) {
    ERR_clear_error();
    return Status::InvalidArgument("our private key does not belong to our certificate '" +
                                   id.subject + "'");
  }
  return id;
}

std::string QuotedSubjects(const std::vector<X509Ptr>& certs) {
  std::string out;
  for (const X509Ptr& cert : certs) {
    if (!out.empty()) out += ", ";
    out += "'" + NameToString(X509_get_subject_name(cert.get())) + "'";
  }
  return out;
}

}  // namespace internal

using internal::ErrorQueueGuard;
using internal::X509Ptr;

Status CheckIdentity(const TlsIdentity& me) {
  ErrorQueueGuard guard;
  VMR_ASSIGN_OR_RETURN(internal::LoadedIdentity id, internal::LoadIdentity(me));
  VMR_ASSIGN_OR_RETURN(CertificateInfo info, internal::InspectX509(id.cert.get()));
  const std::string ours = "our certificate '" + id.subject + "'";

  internal::X509StorePtr store(X509_STORE_new());
  internal::X509StackPtr untrusted(sk_X509_new_null());
  internal::X509StoreCtxPtr ctx(X509_STORE_CTX_new());
  if (!store || !untrusted || !ctx) {
    return Status::Internal("X509_STORE_new: " + internal::DrainOpenSslErrors());
  }
  for (const X509Ptr& ca : id.ca_certs) {
    if (X509_STORE_add_cert(store.get(), ca.get()) != 1) {
      return Status::Internal("X509_STORE_add_cert: " + internal::DrainOpenSslErrors());
    }
  }
  for (const X509Ptr& cert : id.chain) {
    if (X509_up_ref(cert.get()) != 1) return Status::Internal("X509_up_ref failed");
    if (sk_X509_push(untrusted.get(), cert.get()) <= 0) {
      X509_free(cert.get());
      return Status::Internal("sk_X509_push: " + internal::DrainOpenSslErrors());
    }
  }
  if (X509_STORE_CTX_init(ctx.get(), store.get(), id.cert.get(), untrusted.get()) != 1) {
    return Status::Internal("X509_STORE_CTX_init: " + internal::DrainOpenSslErrors());
  }
  if (X509_verify_cert(ctx.get()) != 1) {
    int err = X509_STORE_CTX_get_error(ctx.get());
    int depth = X509_STORE_CTX_get_error_depth(ctx.get());
    X509* bad = X509_STORE_CTX_get_current_cert(ctx.get());
    std::string bad_subject =
        bad != nullptr ? internal::NameToString(X509_get_subject_name(bad)) : id.subject;
    std::string who = depth <= 0 ? ours : "the CA certificate '" + bad_subject + "' above " + ours;
    if (err == X509_V_ERR_CERT_HAS_EXPIRED && bad != nullptr) {
      int64_t not_after = info.not_after_unix;
      if (depth > 0) {
        auto bad_info = internal::InspectX509(bad);
        if (bad_info.ok()) not_after = bad_info->not_after_unix;
      }
      return Status::InvalidArgument(who + " expired on " + internal::FormatUtc(not_after));
    }
    if (err == X509_V_ERR_CERT_NOT_YET_VALID && bad != nullptr) {
      int64_t not_before = info.not_before_unix;
      if (depth > 0) {
        auto bad_info = internal::InspectX509(bad);
        if (bad_info.ok()) not_before = bad_info->not_before_unix;
      }
      return Status::InvalidArgument(who + " is not valid before " +
                                     internal::FormatUtc(not_before));
    }
    return Status::InvalidArgument(
        ours + " (issued by '" + id.issuer + "') does not verify against our CA certificate(s) " +
        internal::QuotedSubjects(id.ca_certs) + ": " + X509_verify_cert_error_string(err));
  }
  if (!info.server_auth || !info.client_auth) {
    std::string missing = !info.server_auth && !info.client_auth ? "serverAuth and clientAuth"
                          : !info.server_auth                    ? "serverAuth"
                                                                 : "clientAuth";
    return Status::InvalidArgument(
        ours + " lacks " + missing +
        " in its extendedKeyUsage; a replication host needs both serverAuth and clientAuth");
  }
  return Status::Ok();
}

}  // namespace vmreplica::security
