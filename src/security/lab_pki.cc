// CreateLabCa, IssueHostCertificate.
#include <arpa/inet.h>
#include <openssl/rsa.h>

#include <algorithm>
#include <cctype>
#include <ctime>

#include "security/lab_pki_internal.h"
#include "security/openssl_util.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/security.h"

namespace vmreplica::security {
namespace internal {
namespace {

constexpr int kMaxDays = 36500;
// Certificates start one hour in the past so that a peer whose clock is a
// little behind does not see them as "not yet valid".
constexpr int64_t kBackdateSeconds = 3600;
// ub-common-name in RFC 5280.
constexpr size_t kMaxCommonName = 64;

using GeneralNamePtr = std::unique_ptr<GENERAL_NAME, OpenSslFree<&GENERAL_NAME_free>>;

Status CheckCommonName(const std::string& common_name) {
  if (common_name.empty()) return Status::InvalidArgument("common name must not be empty");
  if (common_name.size() > kMaxCommonName) {
    return Status::InvalidArgument("common name '" + common_name + "' is longer than 64 bytes");
  }
  return Status::Ok();
}

Status CheckDays(int days) {
  if (days < 1 || days > kMaxDays) {
    return Status::InvalidArgument("validity of " + std::to_string(days) + " days is outside 1.." +
                                   std::to_string(kMaxDays));
  }
  return Status::Ok();
}

Result<EvpPkeyPtr> GenerateKey(bool rsa) {
  EvpPkeyPtr key(rsa ? EVP_RSA_gen(2048) : EVP_EC_gen("P-256"));
  if (!key) return Status::Internal("key generation failed: " + DrainOpenSslErrors());
  return key;
}

// A new v3 certificate with subject CN=common_name, a random 128-bit serial,
// the given validity and public key. Issuer, extensions and signature are
// left to the caller.
Result<X509Ptr> NewCertificate(const std::string& common_name, EVP_PKEY* key, int64_t not_before,
                               int64_t not_after) {
  X509Ptr cert(X509_new());
  BignumPtr serial(BN_new());
  X509NamePtr name(X509_NAME_new());
  if (!cert || !serial || !name || X509_set_version(cert.get(), X509_VERSION_3) != 1) {
    return Status::Internal("X509_new: " + DrainOpenSslErrors());
  }
  do {
    if (BN_rand(serial.get(), 128, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) != 1) {
      return Status::Internal("BN_rand: " + DrainOpenSslErrors());
    }
  } while (BN_is_zero(serial.get()));
  if (BN_to_ASN1_INTEGER(serial.get(), X509_get_serialNumber(cert.get())) == nullptr) {
    return Status::Internal("BN_to_ASN1_INTEGER: " + DrainOpenSslErrors());
  }
  if (ASN1_TIME_set(X509_getm_notBefore(cert.get()), static_cast<time_t>(not_before)) == nullptr ||
      ASN1_TIME_set(X509_getm_notAfter(cert.get()), static_cast<time_t>(not_after)) == nullptr) {
    return Status::Internal("ASN1_TIME_set: " + DrainOpenSslErrors());
  }
  if (X509_NAME_add_entry_by_NID(name.get(), NID_commonName, MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(common_name.data()),
                                 static_cast<int>(common_name.size()), -1, 0) != 1) {
    return Status::InvalidArgument("common name '" + common_name +
                                   "' is not valid UTF-8: " + DrainOpenSslErrors());
  }
  if (X509_set_subject_name(cert.get(), name.get()) != 1 || X509_set_pubkey(cert.get(), key) != 1) {
    return Status::Internal("X509_set_subject_name: " + DrainOpenSslErrors());
  }
  return cert;
}

Status AddExtension(X509* cert, X509V3_CTX* ctx, int nid, const std::string& value) {
  X509ExtensionPtr ext(X509V3_EXT_nconf_nid(nullptr, ctx, nid, value.c_str()));
  if (!ext || X509_add_ext(cert, ext.get(), -1) != 1) {
    return Status::Internal(std::string("cannot add extension ") + OBJ_nid2sn(nid) + "=" + value +
                            ": " + DrainOpenSslErrors());
  }
  return Status::Ok();
}

Status Sign(X509* cert, EVP_PKEY* key) {
  if (X509_sign(cert, key, EVP_sha256()) <= 0) {
    return Status::Internal("X509_sign: " + DrainOpenSslErrors());
  }
  return Status::Ok();
}

Status WriteKeyAndCertificate(EVP_PKEY* key, X509* cert, const std::string& key_path,
                              const std::string& cert_path) {
  VMR_ASSIGN_OR_RETURN(std::string key_pem, PrivateKeyToPem(key));
  VMR_ASSIGN_OR_RETURN(std::string cert_pem, CertificateToPem(cert));
  VMR_RETURN_IF_ERROR(WriteFileAtomic(key_path, key_pem, 0600));
  return WriteFileAtomic(cert_path, cert_pem, 0644);
}

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// The subjectAltName of a host certificate: `alt_names` in order, then the
// common name when it is a host name or an address not listed yet.
class SanBuilder {
 public:
  SanBuilder() : names_(GENERAL_NAMES_new()) {}

  Status Add(std::string name, bool from_common_name) {
    if (!names_) return Status::Internal("GENERAL_NAMES_new: " + DrainOpenSslErrors());
    if (name.size() > 2 && name.front() == '[' && name.back() == ']') {
      name = name.substr(1, name.size() - 2);  // "[::1]"
    }
    if (IsIpLiteral(name)) {
      Asn1OctetStringPtr ip(a2i_IPADDRESS(name.c_str()));
      if (!ip) return Status::InvalidArgument("bad IP address '" + name + "'");
      std::string bytes(reinterpret_cast<const char*>(ASN1_STRING_get0_data(ip.get())),
                        static_cast<size_t>(ASN1_STRING_length(ip.get())));
      if (std::find(ips_.begin(), ips_.end(), bytes) != ips_.end()) return Status::Ok();
      ips_.push_back(bytes);
      return Push(GEN_IPADD, ip.release());
    }
    if (!IsDnsName(name, /*allow_wildcard=*/true)) {
      if (from_common_name) return Status::Ok();  // "My Host": not a name, fine as a CN
      return Status::InvalidArgument("alt name '" + name +
                                     "' is neither a DNS name nor an IP address");
    }
    std::string key = Lower(name);
    if (std::find(dns_.begin(), dns_.end(), key) != dns_.end()) return Status::Ok();
    dns_.push_back(key);
    ASN1_IA5STRING* s = ASN1_IA5STRING_new();
    if (s == nullptr || ASN1_STRING_set(s, name.data(), static_cast<int>(name.size())) != 1) {
      ASN1_IA5STRING_free(s);
      return Status::Internal("ASN1_STRING_set: " + DrainOpenSslErrors());
    }
    return Push(GEN_DNS, s);
  }

  bool empty() const { return dns_.empty() && ips_.empty(); }
  GENERAL_NAMES* get() const { return names_.get(); }

 private:
  // Takes ownership of `value`.
  Status Push(int type, void* value) {
    GeneralNamePtr gen(GENERAL_NAME_new());
    if (!gen) {
      if (type == GEN_DNS)
        ASN1_IA5STRING_free(static_cast<ASN1_IA5STRING*>(value));
      else
        ASN1_OCTET_STRING_free(static_cast<ASN1_OCTET_STRING*>(value));
      return Status::Internal("GENERAL_NAME_new: " + DrainOpenSslErrors());
    }
    GENERAL_NAME_set0_value(gen.get(), type, value);
    if (sk_GENERAL_NAME_push(names_.get(), gen.get()) <= 0) {
      return Status::Internal("sk_GENERAL_NAME_push: " + DrainOpenSslErrors());
    }
    gen.release();  // now owned by names_
    return Status::Ok();
  }

  GeneralNamesPtr names_;
  std::vector<std::string> dns_;  // lower-cased, for de-duplication
  std::vector<std::string> ips_;  // raw address bytes
};

struct LoadedCa {
  X509Ptr cert;
  EvpPkeyPtr key;
};

Result<LoadedCa> LoadCa(const std::string& ca_cert_path, const std::string& ca_key_path) {
  VMR_ASSIGN_OR_RETURN(std::string cert_pem, ReadFile(ca_cert_path));
  VMR_ASSIGN_OR_RETURN(std::string key_pem, ReadFile(ca_key_path));
  VMR_ASSIGN_OR_RETURN(std::vector<X509Ptr> certs,
                       ParseCertificates(cert_pem, "CA certificate " + ca_cert_path));
  VMR_ASSIGN_OR_RETURN(EvpPkeyPtr key, ParsePrivateKey(key_pem, "CA key " + ca_key_path));
  LoadedCa ca{std::move(certs.front()), std::move(key)};
  std::string subject = NameToString(X509_get_subject_name(ca.cert.get()));
  uint32_t flags = X509_get_extension_flags(ca.cert.get());
  if ((flags & EXFLAG_CA) == 0) {
    return Status::InvalidArgument("certificate '" + subject + "' in " + ca_cert_path +
                                   " is not a CA (basicConstraints CA:TRUE is missing)");
  }
  if ((flags & EXFLAG_KUSAGE) != 0 && (X509_get_key_usage(ca.cert.get()) & KU_KEY_CERT_SIGN) == 0) {
    return Status::InvalidArgument("CA certificate '" + subject +
                                   "' does not allow keyCertSign in its keyUsage");
  }
  if (X509_check_private_key(ca.cert.get(), ca.key.get()) != 1) {
    ERR_clear_error();
    return Status::InvalidArgument("the key in " + ca_key_path +
                                   " does not belong to the CA certificate '" + subject + "'");
  }
  return ca;
}

Status IssueLeaf(const LoadedCa& ca, const std::string& common_name,
                 const std::vector<std::string>& alt_names, const std::string& cert_path,
                 const std::string& key_path, const LeafOptions& options) {
  VMR_RETURN_IF_ERROR(CheckCommonName(common_name));
  if (!options.server_auth && !options.client_auth) {
    return Status::InvalidArgument("a host certificate needs serverAuth or clientAuth");
  }
  SanBuilder san;
  // The CN goes first: peers name a host by its first DNS SAN.
  VMR_RETURN_IF_ERROR(san.Add(common_name, /*from_common_name=*/true));
  for (const std::string& name : alt_names) {
    VMR_RETURN_IF_ERROR(san.Add(name, /*from_common_name=*/false));
  }
  if (san.empty()) {
    return Status::InvalidArgument("the certificate for '" + common_name +
                                   "' would carry no DNS name or IP address: give alt names");
  }

  int64_t ca_not_after = 0;
  {
    struct tm tm {};
    if (ASN1_TIME_to_tm(X509_get0_notAfter(ca.cert.get()), &tm) != 1) {
      return Status::InvalidArgument("CA certificate has an unreadable notAfter");
    }
    ca_not_after = timegm(&tm);
  }
  int64_t not_after = std::min(options.not_after_unix, ca_not_after);

  bool rsa = EVP_PKEY_get_base_id(ca.key.get()) == EVP_PKEY_RSA;
  VMR_ASSIGN_OR_RETURN(EvpPkeyPtr key, GenerateKey(rsa));
  VMR_ASSIGN_OR_RETURN(X509Ptr cert,
                       NewCertificate(common_name, key.get(), options.not_before_unix, not_after));
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(ca.cert.get())) != 1) {
    return Status::Internal("X509_set_issuer_name: " + DrainOpenSslErrors());
  }
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, ca.cert.get(), cert.get(), nullptr, nullptr, 0);
  std::string eku;
  if (options.server_auth) eku = "serverAuth";
  if (options.client_auth) eku += eku.empty() ? "clientAuth" : ",clientAuth";
  VMR_RETURN_IF_ERROR(AddExtension(cert.get(), &ctx, NID_basic_constraints, "critical,CA:FALSE"));
  VMR_RETURN_IF_ERROR(AddExtension(
      cert.get(), &ctx, NID_key_usage,
      rsa ? "critical,digitalSignature,keyEncipherment" : "critical,digitalSignature"));
  VMR_RETURN_IF_ERROR(AddExtension(cert.get(), &ctx, NID_ext_key_usage, eku));
  if (X509_add1_ext_i2d(cert.get(), NID_subject_alt_name, san.get(), 0, X509V3_ADD_DEFAULT) != 1) {
    return Status::Internal("cannot add subjectAltName: " + DrainOpenSslErrors());
  }
  VMR_RETURN_IF_ERROR(AddExtension(cert.get(), &ctx, NID_subject_key_identifier, "hash"));
  // keyid when the CA has one (ours always do), issuer+serial otherwise.
  VMR_RETURN_IF_ERROR(AddExtension(cert.get(), &ctx, NID_authority_key_identifier, "keyid,issuer"));
  VMR_RETURN_IF_ERROR(Sign(cert.get(), ca.key.get()));
  return WriteKeyAndCertificate(key.get(), cert.get(), key_path, cert_path);
}

}  // namespace

Status IssueHostCertificateWithOptions(const std::string& ca_cert_path,
                                       const std::string& ca_key_path,
                                       const std::string& common_name,
                                       const std::vector<std::string>& alt_names,
                                       const std::string& cert_path, const std::string& key_path,
                                       const LeafOptions& options) {
  ErrorQueueGuard guard;
  VMR_ASSIGN_OR_RETURN(LoadedCa ca, LoadCa(ca_cert_path, ca_key_path));
  return IssueLeaf(ca, common_name, alt_names, cert_path, key_path, options);
}

}  // namespace internal

using internal::ErrorQueueGuard;

Status CreateLabCa(const std::string& cert_path, const std::string& key_path,
                   const std::string& common_name, int days) {
  ErrorQueueGuard guard;
  VMR_RETURN_IF_ERROR(internal::CheckCommonName(common_name));
  VMR_RETURN_IF_ERROR(internal::CheckDays(days));
  VMR_ASSIGN_OR_RETURN(internal::EvpPkeyPtr key, internal::GenerateKey(/*rsa=*/false));
  int64_t now = time(nullptr);
  VMR_ASSIGN_OR_RETURN(
      internal::X509Ptr cert,
      internal::NewCertificate(common_name, key.get(), now - internal::kBackdateSeconds,
                               now + int64_t{days} * 86400));
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(cert.get())) != 1) {
    return Status::Internal("X509_set_issuer_name: " + internal::DrainOpenSslErrors());
  }
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, cert.get(), cert.get(), nullptr, nullptr, 0);
  VMR_RETURN_IF_ERROR(
      internal::AddExtension(cert.get(), &ctx, NID_basic_constraints, "critical,CA:TRUE"));
  VMR_RETURN_IF_ERROR(
      internal::AddExtension(cert.get(), &ctx, NID_key_usage, "critical,keyCertSign,cRLSign"));
  VMR_RETURN_IF_ERROR(internal::AddExtension(cert.get(), &ctx, NID_subject_key_identifier, "hash"));
  VMR_RETURN_IF_ERROR(internal::Sign(cert.get(), key.get()));
  return internal::WriteKeyAndCertificate(key.get(), cert.get(), key_path, cert_path);
}

Status IssueHostCertificate(const std::string& ca_cert_path, const std::string& ca_key_path,
                            const std::string& common_name,
                            const std::vector<std::string>& alt_names, const std::string& cert_path,
                            const std::string& key_path, int days) {
  ErrorQueueGuard guard;
  VMR_RETURN_IF_ERROR(internal::CheckDays(days));
  VMR_ASSIGN_OR_RETURN(internal::LoadedCa ca, internal::LoadCa(ca_cert_path, ca_key_path));
  int64_t now = time(nullptr);
  {
    struct tm tm {};
    if (ASN1_TIME_to_tm(X509_get0_notAfter(ca.cert.get()), &tm) == 1 && timegm(&tm) <= now) {
      return Status::InvalidArgument("CA certificate '" +
                                     internal::NameToString(X509_get_subject_name(ca.cert.get())) +
                                     "' expired on " + internal::FormatUtc(timegm(&tm)));
    }
  }
  internal::LeafOptions options;
  options.not_before_unix = now - internal::kBackdateSeconds;
  options.not_after_unix = now + int64_t{days} * 86400;
  return internal::IssueLeaf(ca, common_name, alt_names, cert_path, key_path, options);
}

}  // namespace vmreplica::security
