// Private helpers of the security module: owning pointers for OpenSSL
// objects, error-queue handling, PEM parsing and X509 -> CertificateInfo.
#pragma once

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "vmreplica/security.h"
#include "vmreplica/status.h"

namespace vmreplica::security::internal {

// unique_ptr deleter calling an OpenSSL free function.
template <auto kFree>
struct OpenSslFree {
  template <typename T>
  void operator()(T* p) const {
    kFree(p);
  }
};

using BioPtr = std::unique_ptr<BIO, OpenSslFree<&BIO_free_all>>;
using X509Ptr = std::unique_ptr<X509, OpenSslFree<&X509_free>>;
using X509NamePtr = std::unique_ptr<X509_NAME, OpenSslFree<&X509_NAME_free>>;
using X509StorePtr = std::unique_ptr<X509_STORE, OpenSslFree<&X509_STORE_free>>;
using X509StoreCtxPtr = std::unique_ptr<X509_STORE_CTX, OpenSslFree<&X509_STORE_CTX_free>>;
using X509ExtensionPtr = std::unique_ptr<X509_EXTENSION, OpenSslFree<&X509_EXTENSION_free>>;
using EvpPkeyPtr = std::unique_ptr<EVP_PKEY, OpenSslFree<&EVP_PKEY_free>>;
using BignumPtr = std::unique_ptr<BIGNUM, OpenSslFree<&BN_free>>;
using GeneralNamesPtr = std::unique_ptr<GENERAL_NAMES, OpenSslFree<&GENERAL_NAMES_free>>;
using Asn1OctetStringPtr = std::unique_ptr<ASN1_OCTET_STRING, OpenSslFree<&ASN1_OCTET_STRING_free>>;
using SslCtxPtr = std::unique_ptr<SSL_CTX, OpenSslFree<&SSL_CTX_free>>;
using SslPtr = std::unique_ptr<SSL, OpenSslFree<&SSL_free>>;

// Owns a STACK_OF(X509) and the certificates in it.
struct X509StackFree {
  void operator()(STACK_OF(X509) * s) const { sk_X509_pop_free(s, X509_free); }
};
using X509StackPtr = std::unique_ptr<STACK_OF(X509), X509StackFree>;

// Clears the thread's OpenSSL error queue when built and when destroyed, so
// that a function neither sees stale errors nor leaves its own behind.
class ErrorQueueGuard {
 public:
  ErrorQueueGuard() { ERR_clear_error(); }
  ~ErrorQueueGuard() { ERR_clear_error(); }
  ErrorQueueGuard(const ErrorQueueGuard&) = delete;
  ErrorQueueGuard& operator=(const ErrorQueueGuard&) = delete;
};

// Drains the thread's OpenSSL error queue into "lib: reason; lib: reason".
// Returns `fallback` when the queue is empty.
std::string DrainOpenSslErrors(const std::string& fallback = "unknown OpenSSL error");

// Parses every certificate in `pem`. `what` names the input in messages
// ("CA certificate"). No certificate or a corrupt one -> InvalidArgument.
Result<std::vector<X509Ptr>> ParseCertificates(const std::string& pem, const std::string& what);

// Parses an unencrypted private key (PKCS#8, or traditional RSA/EC PEM).
// Never prompts for a passphrase: an encrypted key -> InvalidArgument.
Result<EvpPkeyPtr> ParsePrivateKey(const std::string& pem, const std::string& what);

// Reads the certificate's fields. Fails only on an internal OpenSSL error.
Result<CertificateInfo> InspectX509(X509* cert);

// "CN=host1, O=Lab" (see CertificateInfo::subject).
std::string NameToString(const X509_NAME* name);

// "2025-06-01 12:00:00 UTC".
std::string FormatUtc(int64_t unix_seconds);

// Upper-case hex of `len` bytes.
std::string HexUpper(const unsigned char* data, size_t len);

// PEM text of a certificate / of a private key (PKCS#8, unencrypted).
Result<std::string> CertificateToPem(X509* cert);
Result<std::string> PrivateKeyToPem(EVP_PKEY* key);

// True when `s` is an IPv4 or IPv6 literal (no brackets).
bool IsIpLiteral(const std::string& s);

// True when `s` is a syntactically valid DNS host name: labels of letters,
// digits and hyphens (not at either end), 1..63 bytes each, 253 in all, no
// trailing dot. With `allow_wildcard`, the first label may be "*".
bool IsDnsName(const std::string& s, bool allow_wildcard);

}  // namespace vmreplica::security::internal
