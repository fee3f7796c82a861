#include "security/openssl_util.h"

#include <arpa/inet.h>
#include <openssl/pem.h>

#include <climits>
#include <cstring>
#include <ctime>

namespace vmreplica::security::internal {
namespace {

// Far more than any sane certificate chain or key; keeps int casts safe.
constexpr size_t kMaxPemBytes = 16u << 20;

Result<BioPtr> ReadOnlyBio(const std::string& pem, const std::string& what) {
  if (pem.size() > kMaxPemBytes) {
    return Status::InvalidArgument(what + ": PEM text is too large (" + std::to_string(pem.size()) +
                                   " bytes)");
  }
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return Status::Internal("BIO_new_mem_buf: " + DrainOpenSslErrors());
  return bio;
}

std::string BioToString(BIO* bio) {
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  if (len <= 0 || data == nullptr) return {};
  return std::string(data, static_cast<size_t>(len));
}

Result<int64_t> TimeToUnix(const ASN1_TIME* t, const char* what) {
  struct tm tm {};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1) {
    return Status::InvalidArgument(std::string("certificate has an unreadable ") + what);
  }
  return static_cast<int64_t>(timegm(&tm));
}

// The PEM password callback: never prompt on a terminal.
int NoPassphrase(char* /*buf*/, int /*size*/, int /*rwflag*/, void* /*u*/) { return -1; }

}  // namespace

std::string DrainOpenSslErrors(const std::string& fallback) {
  std::string out;
  std::string last;
  const char* data = nullptr;
  int flags = 0;
  unsigned long e;
  while ((e = ERR_get_error_all(nullptr, nullptr, nullptr, &data, &flags)) != 0) {
    const char* lib = ERR_lib_error_string(e);
    const char* reason = ERR_reason_error_string(e);
    std::string one;
    if (lib != nullptr) one = std::string(lib) + ": ";
    if (reason != nullptr) {
      one += reason;
    } else {
      char buf[256];
      ERR_error_string_n(e, buf, sizeof(buf));
      one += buf;
    }
    if ((flags & ERR_TXT_STRING) != 0 && data != nullptr && *data != '\0') {
      one += std::string(" (") + data + ")";
    }
    if (one == last) continue;  // OpenSSL often stacks the same error twice
    if (!out.empty()) out += "; ";
    out += one;
    last = one;
  }
  return out.empty() ? fallback : out;
}

Result<std::vector<X509Ptr>> ParseCertificates(const std::string& pem, const std::string& what) {
  VMR_ASSIGN_OR_RETURN(BioPtr bio, ReadOnlyBio(pem, what));
  std::vector<X509Ptr> certs;
  for (;;) {
    X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
    if (cert == nullptr) {
      unsigned long e = ERR_peek_last_error();
      if (ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE) {
        ERR_clear_error();  // the normal end of the input
        break;
      }
      return Status::InvalidArgument(what + " #" + std::to_string(certs.size() + 1) +
                                     " is corrupt: " + DrainOpenSslErrors());
    }
    certs.emplace_back(cert);
  }
  if (certs.empty()) {
    return Status::InvalidArgument(
        what + ": no PEM certificate found (expected a '-----BEGIN CERTIFICATE-----' block)");
  }
  return certs;
}

Result<EvpPkeyPtr> ParsePrivateKey(const std::string& pem, const std::string& what) {
  VMR_ASSIGN_OR_RETURN(BioPtr bio, ReadOnlyBio(pem, what));
  EvpPkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, &NoPassphrase, nullptr));
  if (!key) {
    std::string err = DrainOpenSslErrors();
    if (pem.find("ENCRYPTED") != std::string::npos) {
      return Status::InvalidArgument(what + " is encrypted; an unencrypted key is required");
    }
    if (pem.find("-----BEGIN") == std::string::npos) {
      return Status::InvalidArgument(what +
                                     ": no PEM private key found (expected a '-----BEGIN PRIVATE "
                                     "KEY-----' block)");
    }
    return Status::InvalidArgument(what + " is not a readable private key: " + err);
  }
  return key;
}

std::string NameToString(const X509_NAME* name) {
  if (name == nullptr) return {};
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio) return {};
  unsigned long flags =
      (XN_FLAG_RFC2253 & ~XN_FLAG_SEP_MASK & ~ASN1_STRFLGS_ESC_MSB) | XN_FLAG_SEP_CPLUS_SPC;
  if (X509_NAME_print_ex(bio.get(), name, 0, flags) < 0) return {};
  return BioToString(bio.get());
}

std::string HexUpper(const unsigned char* data, size_t len) {
  static const char kDigits[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(len * 2);
  for (size_t i = 0; i < len; ++i) {
    out.push_back(kDigits[data[i] >> 4]);
    out.push_back(kDigits[data[i] & 0x0f]);
  }
  return out;
}

std::string FormatUtc(int64_t unix_seconds) {
  time_t t = static_cast<time_t>(unix_seconds);
  struct tm tm {};
  if (gmtime_r(&t, &tm) == nullptr) return std::to_string(unix_seconds);
  char buf[64];
  if (strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S UTC", &tm) == 0) {
    return std::to_string(unix_seconds);
  }
  return buf;
}

Result<CertificateInfo> InspectX509(X509* cert) {
  CertificateInfo info;
  const X509_NAME* subject = X509_get_subject_name(cert);
  info.subject = NameToString(subject);
  info.issuer = NameToString(X509_get_issuer_name(cert));

  int last_cn = -1;
  for (int i = -1; (i = X509_NAME_get_index_by_NID(subject, NID_commonName, i)) >= 0;) {
    last_cn = i;
  }
  if (last_cn >= 0) {
    const ASN1_STRING* cn = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, last_cn));
    unsigned char* utf8 = nullptr;
    int len = ASN1_STRING_to_UTF8(&utf8, cn);
    if (len >= 0 && utf8 != nullptr) {
      info.subject_cn.assign(reinterpret_cast<const char*>(utf8), static_cast<size_t>(len));
    }
    OPENSSL_free(utf8);
  }

  GeneralNamesPtr sans(
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr)));
  if (sans) {
    for (int i = 0; i < sk_GENERAL_NAME_num(sans.get()); ++i) {
      const GENERAL_NAME* gen = sk_GENERAL_NAME_value(sans.get(), i);
      if (gen->type == GEN_DNS) {
        const ASN1_IA5STRING* s = gen->d.dNSName;
        info.dns_names.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                                    static_cast<size_t>(ASN1_STRING_length(s)));
      } else if (gen->type == GEN_IPADD) {
        const ASN1_OCTET_STRING* s = gen->d.iPAddress;
        int len = ASN1_STRING_length(s);
        char buf[INET6_ADDRSTRLEN] = {};
        int family = len == 4 ? AF_INET : len == 16 ? AF_INET6 : 0;
        if (family != 0 && inet_ntop(family, ASN1_STRING_get0_data(s), buf, sizeof(buf))) {
          info.ip_addresses.emplace_back(buf);
        }
      }
    }
  }

  BignumPtr serial(ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), nullptr));
  if (serial) {
    char* hex = BN_bn2hex(serial.get());
    if (hex != nullptr) info.serial_hex = hex;
    OPENSSL_free(hex);
  }

  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int md_len = 0;
  if (X509_digest(cert, EVP_sha1(), md, &md_len) != 1) {
    return Status::Internal("X509_digest(SHA-1): " + DrainOpenSslErrors());
  }
  info.thumbprint_sha1 = HexUpper(md, md_len);
  if (X509_digest(cert, EVP_sha256(), md, &md_len) != 1) {
    return Status::Internal("X509_digest(SHA-256): " + DrainOpenSslErrors());
  }
  info.sha256_hex = HexUpper(md, md_len);

  VMR_ASSIGN_OR_RETURN(info.not_before_unix, TimeToUnix(X509_get0_notBefore(cert), "notBefore"));
  VMR_ASSIGN_OR_RETURN(info.not_after_unix, TimeToUnix(X509_get0_notAfter(cert), "notAfter"));

  uint32_t flags = X509_get_extension_flags(cert);
  info.is_ca = (flags & EXFLAG_CA) != 0;
  if ((flags & EXFLAG_XKUSAGE) != 0) {
    uint32_t xku = X509_get_extended_key_usage(cert);
    info.server_auth = (xku & XKU_SSL_SERVER) != 0;
    info.client_auth = (xku & XKU_SSL_CLIENT) != 0;
  } else {
    info.server_auth = true;
    info.client_auth = true;
  }
  return info;
}

Result<std::string> CertificateToPem(X509* cert) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert) != 1) {
    return Status::Internal("PEM_write_bio_X509: " + DrainOpenSslErrors());
  }
  return BioToString(bio.get());
}

Result<std::string> PrivateKeyToPem(EVP_PKEY* key) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio ||
      PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1) {
    return Status::Internal("PEM_write_bio_PrivateKey: " + DrainOpenSslErrors());
  }
  return BioToString(bio.get());
}

bool IsIpLiteral(const std::string& s) {
  unsigned char buf[16];
  return inet_pton(AF_INET, s.c_str(), buf) == 1 || inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

bool IsDnsName(const std::string& s, bool allow_wildcard) {
  if (s.empty() || s.size() > 253) return false;
  size_t start = 0;
  bool first = true;
  while (start <= s.size()) {
    size_t end = s.find('.', start);
    if (end == std::string::npos) end = s.size();
    std::string_view label(s.data() + start, end - start);
    if (label.empty() || label.size() > 63) return false;
    if (first && allow_wildcard && label == "*" && end != s.size()) {
      // "*.example.com": the wildcard label alone, never "*" by itself.
    } else {
      if (label.front() == '-' || label.back() == '-') return false;
      for (char c : label) {
        bool ok =
            (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
        if (!ok) return false;
      }
    }
    first = false;
    if (end == s.size()) break;
    start = end + 1;
  }
  return true;
}

}  // namespace vmreplica::security::internal
