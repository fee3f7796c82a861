// Host identity for replication: X.509 certificates, a lab PKI, and a TLS
// probe that tells an operator exactly why two hosts do not trust each other.
//
// Hosts authenticate each other with mutual TLS. Each host has a TlsIdentity:
// the CA certificate(s) it trusts for its peers, its own certificate and its
// private key, all PEM. The replication wire itself is gRPC over mTLS (see the
// service module); this module only inspects certificates, creates lab ones,
// and probes a peer before the gRPC call so that a failure gets a precise
// diagnosis instead of gRPC's "failed to connect to all addresses".
//
// Thread safety: every function here is reentrant and may be called from any
// thread concurrently. Each one clears the calling thread's OpenSSL error
// queue on entry and on return, so it leaves no stale errors behind for other
// OpenSSL users (gRPC) on the same thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "vmreplica/status.h"

namespace vmreplica::security {

// What a certificate says, in the forms an operator sees elsewhere.
struct CertificateInfo {
  // RFC 2253 order, most specific first, ", " separated: "CN=host1, O=Lab".
  std::string subject;
  // The (last) commonName of the subject, UTF-8; empty when there is none.
  std::string subject_cn;
  std::string issuer;  // same format as subject
  // subjectAltName entries, in certificate order, as written in the
  // certificate (not lower-cased). IP addresses in inet_ntop form.
  std::vector<std::string> dns_names;
  std::vector<std::string> ip_addresses;
  std::string serial_hex;       // upper-case hex, whole bytes (as `openssl x509 -serial`)
  std::string thumbprint_sha1;  // 40 upper-case hex digits, as Windows shows it
  std::string sha256_hex;       // 64 upper-case hex digits (SHA-256 of the DER)
  int64_t not_before_unix = 0;  // seconds since the Unix epoch, UTC
  int64_t not_after_unix = 0;
  // From extendedKeyUsage; both true when the certificate has no EKU
  // extension. anyExtendedKeyUsage does not count (OpenSSL's TLS
  // verification does not accept it either).
  bool server_auth = false;
  bool client_auth = false;
  bool is_ca = false;  // basicConstraints CA:TRUE
};

// Parses the first certificate of `pem` (text before it is skipped).
// Garbage, an empty string or a corrupt certificate -> InvalidArgument.
Result<CertificateInfo> InspectCertificatePem(const std::string& pem);

// Parses every certificate of `pem`, in order (leaf first for a chain file).
// No certificate at all, or any corrupt one -> InvalidArgument.
Result<std::vector<CertificateInfo>> InspectCertificateChainPem(const std::string& pem);

// The names a peer is known by, as used for name checks: its DNS SANs
// (lower-cased) in certificate order, then its IP SANs. The subject CN
// (lower-cased) takes the place of the DNS SANs, first in the list, only
// when the certificate has no DNS SAN at all (the OpenSSL / RFC 6125
// fallback). Duplicates are dropped.
std::vector<std::string> CertificateNames(const CertificateInfo& info);

// ---------------------------------------------------------------------------
// Lab PKI, for `vmreplica cert`, the demo and the tests. Production users
// bring their own certificates. Keys are unencrypted PEM (PKCS#8), written
// with mode 0600; certificates are PEM, mode 0644. Every file is written
// atomically (temp + fsync + rename) and an existing file is replaced: the
// caller decides whether overwriting is acceptable. The key file is written
// before the certificate file.
//
// Errors: bad arguments (empty or over-long common name, days outside
// 1..36500, an alt name that is neither a DNS name nor an IP literal, a CA
// that is not a CA or whose key does not match) -> InvalidArgument; a missing
// input file -> NotFound; a file system failure -> IOError.

// Creates a self-signed CA: EC P-256 key, subject CN=`common_name`,
// basicConstraints CA:TRUE (critical), keyUsage keyCertSign+cRLSign
// (critical), subjectKeyIdentifier, a random 128-bit serial, valid from one
// hour ago (clock skew between hosts) for `days` days.
Status CreateLabCa(const std::string& cert_path, const std::string& key_path,
                   const std::string& common_name, int days);

// Issues a host (leaf) certificate signed by the CA in `ca_cert_path` /
// `ca_key_path`. The leaf key is EC P-256, or RSA-2048 when the CA key is
// RSA. Extensions: basicConstraints CA:FALSE (critical), keyUsage
// digitalSignature (+keyEncipherment for RSA) (critical), extendedKeyUsage
// serverAuth+clientAuth, subjectAltName, subjectKeyIdentifier,
// authorityKeyIdentifier. Each alt name is an IP literal (IPv4 or IPv6) or a
// DNS name (an optional leading "*." wildcard label allowed); the common name
// is added as well when it is a DNS name or an IP literal not already listed.
// A certificate that would end up with no name at all is refused
// (InvalidArgument). Validity: from one hour ago for `days` days, clamped to
// the CA's own notAfter. `cert_path` receives the leaf only (no chain).
Status IssueHostCertificate(const std::string& ca_cert_path, const std::string& ca_key_path,
                            const std::string& common_name,
                            const std::vector<std::string>& alt_names, const std::string& cert_path,
                            const std::string& key_path, int days);

// ---------------------------------------------------------------------------
// Identity check and TLS probe.

// A host's TLS material, all PEM text.
struct TlsIdentity {
  std::string ca_pem;    // the CA certificate(s) trusted for peers
  std::string cert_pem;  // our certificate, optionally followed by intermediates
  std::string key_pem;   // our private key, unencrypted
};

// Checks our own identity before it is used, so that the daemon refuses a
// bad configuration at start with a clear message: the three PEMs parse, the
// key belongs to the certificate, the certificate chains to a CA of
// `ca_pem` (intermediates from cert_pem are used), it allows both
// serverAuth and clientAuth (or has no EKU), and it is valid now.
// Every failure is InvalidArgument with a message naming the certificate.
Status CheckIdentity(const TlsIdentity& me);

struct TlsProbeResult {
  CertificateInfo server_certificate;
  std::string protocol;  // "TLSv1.2"
  std::string cipher;    // OpenSSL cipher name, "ECDHE-ECDSA-AES256-GCM-SHA384"
  std::string alpn;      // the protocol the server selected; "h2" for a gRPC server
};

// Connects to `host`:`port` and runs a mutual-TLS handshake as a client, to
// diagnose a replication connection before the gRPC call. `host` is a DNS
// name or an IP literal (IPv6 with or without brackets); only the addresses
// it resolves to are contacted. The server certificate is verified against
// me.ca_pem and its name against `expected_name` (a DNS name, checked
// against DNS SANs or the CN fallback, or an IP literal, checked against IP
// SANs). The probe offers ALPN "h2" and SNI (for DNS names), presents our
// certificate, and caps the protocol at TLS 1.2 so that the server's
// rejection of our certificate arrives during the handshake (TLS 1.3
// reports it only after the client considers the handshake done). A gRPC
// server accepts TLS 1.2 by default.
//
// `timeout` bounds TCP connect plus TLS handshake together; name resolution
// (getaddrinfo) is outside it. Blocks the calling thread.
//
// Errors:
//   InvalidArgument   our identity does not parse or the key does not match
//                     our certificate; empty expected_name; timeout <= 0.
//   Unavailable       "cannot reach HOST:PORT: connection refused" (or no
//                     route, or name resolution failed); the server closed
//                     the connection or the handshake failed for another
//                     reason (the OpenSSL error string is included).
//   Timeout           no TCP answer, or no TLS answer, within `timeout`.
//   PermissionDenied  one of, with distinct messages:
//                     - "remote certificate ... is not trusted: <reason>"
//                       (its chain does not verify against me.ca_pem);
//                     - "remote certificate is for X, Y, not for NAME";
//                     - "remote certificate ... expired on DATE" /
//                       "... is not valid before DATE";
//                     - "remote certificate ... is not valid for TLS server
//                       authentication" (extendedKeyUsage);
//                     - "the server at HOST:PORT rejected our certificate
//                       ... (TLS alert: unknown CA)": an alert after we sent
//                       our certificate (unknown CA, bad / unsupported /
//                       expired / revoked / unknown certificate, access
//                       denied, certificate required, handshake failure).
// On success the connection is closed politely (close_notify).
Result<TlsProbeResult> ProbeTls(const std::string& host, uint16_t port, const TlsIdentity& me,
                                const std::string& expected_name,
                                std::chrono::milliseconds timeout);

}  // namespace vmreplica::security
