// ProbeTls: TCP connect + mutual-TLS handshake with a diagnosis.
//
// The TLS engine runs on memory BIOs and this file moves the bytes between
// them and a non-blocking socket. That keeps every wait under one deadline,
// sends with MSG_NOSIGNAL (no SIGPIPE when the server hangs up on us), and
// lets us read the server's alert even after it closed the connection.
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include "security/identity.h"
#include "security/openssl_util.h"
#include "vmreplica/security.h"

namespace vmreplica::security {
namespace {

using internal::DrainOpenSslErrors;
using internal::X509Ptr;
using Clock = std::chrono::steady_clock;

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) {
      Reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { Reset(); }
  int get() const { return fd_; }

 private:
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int fd_ = -1;
};

// What the callbacks saw during the handshake.
struct ProbeState {
  X509Ptr server_leaf;           // the certificate the server presented
  int verify_error = X509_V_OK;  // the first verification error
  int verify_depth = -1;
  X509Ptr verify_error_cert;    // the certificate it is about
  bool cert_requested = false;  // the server sent CertificateRequest
  bool cert_sent = false;       // we sent our Certificate
  int alert_received = -1;      // description of the server's fatal alert
  bool peer_closed = false;     // EOF or reset from the server
};

std::string StripBrackets(const std::string& s) {
  if (s.size() > 2 && s.front() == '[' && s.back() == ']') return s.substr(1, s.size() - 2);
  return s;
}

std::string Endpoint(const std::string& host, uint16_t port) {
  std::string h = StripBrackets(host);
  if (h.find(':') != std::string::npos) return "[" + h + "]:" + std::to_string(port);
  return h + ":" + std::to_string(port);
}

std::string LowerFirst(std::string s) {
  if (!s.empty() && s[0] >= 'A' && s[0] <= 'Z') s[0] = static_cast<char>(s[0] - 'A' + 'a');
  return s;
}

int RemainingMs(Clock::time_point deadline) {
  auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
  if (left <= 0) return 0;
  return static_cast<int>(std::min<int64_t>(left, INT_MAX));
}

// Waits for `events` on `fd`. 1: ready; 0: deadline passed; -1: error (errno).
int PollUntil(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    int ms = RemainingMs(deadline);
    pollfd p{fd, events, 0};
    int r = ::poll(&p, 1, ms);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r > 0) return 1;
    if (RemainingMs(deadline) == 0) return 0;
  }
}

Result<UniqueFd> Connect(const std::string& host, uint16_t port, const std::string& endpoint,
                         Clock::time_point deadline, std::chrono::milliseconds timeout) {
  std::string name = StripBrackets(host);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  int rc = ::getaddrinfo(name.c_str(), std::to_string(port).c_str(), &hints, &found);
  if (rc != 0) {
    std::string why = rc == EAI_SYSTEM ? std::strerror(errno) : gai_strerror(rc);
    return Status::Unavailable("cannot reach " + endpoint + ": cannot resolve '" + name +
                               "': " + LowerFirst(why));
  }
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> addresses(found, &::freeaddrinfo);
  int last_errno = EHOSTUNREACH;
  for (const addrinfo* ai = addresses.get(); ai != nullptr; ai = ai->ai_next) {
    UniqueFd sock(
        ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
    if (sock.get() < 0) {
      last_errno = errno;
      continue;
    }
    if (::connect(sock.get(), ai->ai_addr, ai->ai_addrlen) == 0) return sock;
    if (errno != EINPROGRESS) {
      last_errno = errno;
      continue;
    }
    int ready = PollUntil(sock.get(), POLLOUT, deadline);
    int so_error = 0;
    socklen_t len = sizeof(so_error);
    if (ready == 0) {
      return Status::Timeout("no answer from " + endpoint + " within " +
                             std::to_string(timeout.count()) + " ms (TCP connect)");
    }
    if (ready < 0) {
      last_errno = errno;
      continue;
    }
    if (::getsockopt(sock.get(), SOL_SOCKET, SO_ERROR, &so_error, &len) != 0) so_error = errno;
    if (so_error == 0) return sock;
    if (so_error == ETIMEDOUT) {
      return Status::Timeout("no answer from " + endpoint + " (TCP connect timed out)");
    }
    last_errno = so_error;
  }
  return Status::Unavailable("cannot reach " + endpoint + ": " +
                             LowerFirst(std::strerror(last_errno)));
}

// Sends all bytes the TLS engine has queued. A send failure (the server hung
// up) is not reported: the reason, an alert, may still be waiting to be read.
Status FlushOutput(int fd, BIO* wbio, Clock::time_point deadline, const std::string& endpoint,
                   std::chrono::milliseconds timeout, bool* send_failed) {
  char buf[16384];
  while (BIO_ctrl_pending(wbio) > 0) {
    int n = BIO_read(wbio, buf, sizeof(buf));
    if (n <= 0) break;
    size_t off = 0;
    while (!*send_failed && off < static_cast<size_t>(n)) {
      ssize_t w = ::send(fd, buf + off, static_cast<size_t>(n) - off, MSG_NOSIGNAL);
      if (w >= 0) {
        off += static_cast<size_t>(w);
      } else if (errno == EINTR) {
        continue;
      } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
        int ready = PollUntil(fd, POLLOUT, deadline);
        if (ready == 0) {
          return Status::Timeout("no TLS answer from " + endpoint + " within " +
                                 std::to_string(timeout.count()) + " ms (sending stalled)");
        }
        if (ready < 0) *send_failed = true;
      } else {
        *send_failed = true;
      }
    }
  }
  return Status::Ok();
}

// Moves what the server sent into the TLS engine, waiting for it.
Status ReadInput(int fd, BIO* rbio, Clock::time_point deadline, const std::string& endpoint,
                 std::chrono::milliseconds timeout, ProbeState* state) {
  int ready = PollUntil(fd, POLLIN, deadline);
  if (ready == 0) {
    return Status::Timeout("no TLS answer from " + endpoint + " within " +
                           std::to_string(timeout.count()) +
                           " ms (TCP connected, but no TLS handshake reply; is this a "
                           "vmreplica server?)");
  }
  char buf[16384];
  ssize_t n;
  do {
    n = ::recv(fd, buf, sizeof(buf), 0);
  } while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return Status::Ok();
  if (n > 0) {
    if (BIO_write(rbio, buf, static_cast<int>(n)) != n) {
      return Status::Internal("BIO_write: " + DrainOpenSslErrors());
    }
    return Status::Ok();
  }
  // EOF or reset: let the TLS engine see the end of the stream.
  state->peer_closed = true;
  BIO_set_mem_eof_return(rbio, 0);
  return Status::Ok();
}

int VerifyCallback(int preverify_ok, X509_STORE_CTX* ctx) {
  auto* ssl =
      static_cast<SSL*>(X509_STORE_CTX_get_ex_data(ctx, SSL_get_ex_data_X509_STORE_CTX_idx()));
  auto* state = ssl != nullptr ? static_cast<ProbeState*>(SSL_get_app_data(ssl)) : nullptr;
  if (state == nullptr) return preverify_ok;
  if (!state->server_leaf) {
    X509* leaf = X509_STORE_CTX_get0_cert(ctx);
    if (leaf != nullptr && X509_up_ref(leaf) == 1) state->server_leaf.reset(leaf);
  }
  if (preverify_ok == 0 && state->verify_error == X509_V_OK) {
    state->verify_error = X509_STORE_CTX_get_error(ctx);
    state->verify_depth = X509_STORE_CTX_get_error_depth(ctx);
    X509* bad = X509_STORE_CTX_get_current_cert(ctx);
    if (bad != nullptr && X509_up_ref(bad) == 1) state->verify_error_cert.reset(bad);
  }
  return preverify_ok;  // stop at the first error: never talk on to an untrusted server
}

void MessageCallback(int write_p, int /*version*/, int content_type, const void* buf, size_t len,
                     SSL* /*ssl*/, void* arg) {
  auto* state = static_cast<ProbeState*>(arg);
  const auto* p = static_cast<const unsigned char*>(buf);
  if (content_type == SSL3_RT_HANDSHAKE && len > 0) {
    if (write_p == 0 && p[0] == SSL3_MT_CERTIFICATE_REQUEST) state->cert_requested = true;
    if (write_p != 0 && p[0] == SSL3_MT_CERTIFICATE) state->cert_sent = true;
  } else if (content_type == SSL3_RT_ALERT && len >= 2 && write_p == 0) {
    if (p[0] == SSL3_AL_FATAL && state->alert_received < 0) state->alert_received = p[1];
  }
}

std::string Join(const std::vector<std::string>& parts) {
  std::string out;
  for (const std::string& p : parts) {
    if (!out.empty()) out += ", ";
    out += p;
  }
  return out;
}

// The server certificate failed our verification.
Status DiagnoseServerCertificate(const ProbeState& state, const internal::LoadedIdentity& me,
                                 const std::string& expected_name, const std::string& endpoint) {
  int err = state.verify_error;
  CertificateInfo leaf;
  if (state.server_leaf) {
    auto info = internal::InspectX509(state.server_leaf.get());
    if (info.ok()) leaf = std::move(info).value();
  }
  CertificateInfo bad = leaf;
  if (state.verify_error_cert && state.verify_depth > 0) {
    auto info = internal::InspectX509(state.verify_error_cert.get());
    if (info.ok()) bad = std::move(info).value();
  }
  const std::string remote = "remote certificate '" + leaf.subject + "' of " + endpoint;
  const std::string who = state.verify_depth > 0
                              ? "the CA certificate '" + bad.subject + "' above the " + remote
                              : remote;
  switch (err) {
    case X509_V_ERR_HOSTNAME_MISMATCH:
    case X509_V_ERR_IP_ADDRESS_MISMATCH:
    case X509_V_ERR_EMAIL_MISMATCH: {
      std::vector<std::string> names = CertificateNames(leaf);
      if (names.empty()) {
        return Status::PermissionDenied(remote + " names no host (no subjectAltName, no CN), " +
                                        "so it is not for " + expected_name);
      }
      return Status::PermissionDenied("remote certificate is for " + Join(names) + ", not for " +
                                      expected_name + " (certificate '" + leaf.subject + "' of " +
                                      endpoint + ")");
    }
    case X509_V_ERR_CERT_HAS_EXPIRED:
      return Status::PermissionDenied(who + " expired on " +
                                      internal::FormatUtc(bad.not_after_unix));
    case X509_V_ERR_CERT_NOT_YET_VALID:
      return Status::PermissionDenied(who + " is not valid before " +
                                      internal::FormatUtc(bad.not_before_unix) +
                                      " (check the clocks of both hosts)");
    case X509_V_ERR_INVALID_PURPOSE:
      return Status::PermissionDenied(
          who + " is not valid for TLS server authentication (extendedKeyUsage lacks serverAuth)");
    default:
      break;
  }
  std::string where = state.verify_depth > 0 ? " at '" + bad.subject + "'" : "";
  return Status::PermissionDenied(remote + " (issued by '" + leaf.issuer +
                                  "') is not trusted: " + X509_verify_cert_error_string(err) +
                                  where + "; it does not verify against our CA certificate(s) " +
                                  internal::QuotedSubjects(me.ca_certs));
}

bool IsCertificateRejection(int alert) {
  switch (alert) {
    case SSL_AD_HANDSHAKE_FAILURE:
    case SSL_AD_BAD_CERTIFICATE:
    case SSL_AD_UNSUPPORTED_CERTIFICATE:
    case SSL_AD_CERTIFICATE_REVOKED:
    case SSL_AD_CERTIFICATE_EXPIRED:
    case SSL_AD_CERTIFICATE_UNKNOWN:
    case SSL_AD_UNKNOWN_CA:
    case SSL_AD_ACCESS_DENIED:
    case SSL_AD_CERTIFICATE_REQUIRED:
      return true;
    default:
      return false;
  }
}

std::string RejectionHint(int alert, const internal::LoadedIdentity& me) {
  switch (alert) {
    case SSL_AD_UNKNOWN_CA:
      return "it does not trust the CA '" + me.issuer + "' that issued our certificate";
    case SSL_AD_CERTIFICATE_EXPIRED:
      return "it considers our certificate expired (check our certificate and both clocks)";
    case SSL_AD_UNSUPPORTED_CERTIFICATE:
      return "our certificate is not acceptable for TLS client authentication (extendedKeyUsage "
             "must allow clientAuth)";
    case SSL_AD_CERTIFICATE_REVOKED:
      return "it considers our certificate revoked";
    case SSL_AD_ACCESS_DENIED:
      return "it does not allow our host";
    case SSL_AD_CERTIFICATE_REQUIRED:
      return "it requires a client certificate";
    default:
      return "it does not accept our certificate or does not trust its CA '" + me.issuer + "'";
  }
}

// The handshake failed and it was not our verification of the server.
Status DiagnoseHandshakeFailure(const ProbeState& state, const internal::LoadedIdentity& me,
                                const std::string& endpoint, const std::string& openssl_errors) {
  if (state.alert_received >= 0) {
    std::string alert = SSL_alert_desc_string_long(state.alert_received);
    if (state.cert_sent && IsCertificateRejection(state.alert_received)) {
      return Status::PermissionDenied("the server at " + endpoint + " rejected our certificate '" +
                                      me.subject + "' (TLS alert: " + alert +
                                      "): " + RejectionHint(state.alert_received, me));
    }
    std::string hint;
    if (state.alert_received == SSL_AD_PROTOCOL_VERSION) {
      hint = " (the probe speaks TLS 1.2; the server may require TLS 1.3)";
    } else if (state.alert_received == SSL_AD_NO_APPLICATION_PROTOCOL) {
      hint = " (the server does not speak HTTP/2; is this a vmreplica server?)";
    }
    return Status::Unavailable("TLS handshake with " + endpoint +
                               " failed: the server sent alert '" + alert + "'" + hint);
  }
  if (state.peer_closed && state.cert_sent) {
    // A server that verified itself to us and hangs up, without an alert,
    // right after our certificate arrived has refused that certificate:
    // gRPC's server does exactly this for a client certificate from a CA it
    // does not trust.
    return Status::PermissionDenied("the server at " + endpoint +
                                    " rejected our certificate: it closed the connection during the TLS "
                                    "handshake after receiving it (does it trust our CA '" +
                                    me.issuer + "'?)");
  }
  if (state.peer_closed) {
    return Status::Unavailable("the server at " + endpoint + " closed the connection during the TLS handshake");
  }
  return Status::Unavailable("TLS handshake with " + endpoint + " failed: " + openssl_errors +
                             " (is this a vmreplica server?)");
}

Result<internal::SslCtxPtr> NewClientContext(const internal::LoadedIdentity& me) {
  internal::SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
  if (!ctx) return Status::Internal("SSL_CTX_new: " + DrainOpenSslErrors());
  if (SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION) != 1 ||
      SSL_CTX_set_max_proto_version(ctx.get(), TLS1_2_VERSION) != 1) {
    return Status::Internal("SSL_CTX_set_max_proto_version: " + DrainOpenSslErrors());
  }
  X509_STORE* store = SSL_CTX_get_cert_store(ctx.get());
  for (const X509Ptr& ca : me.ca_certs) {
    if (X509_STORE_add_cert(store, ca.get()) != 1) {
      return Status::Internal("X509_STORE_add_cert: " + DrainOpenSslErrors());
    }
  }
  if (SSL_CTX_use_certificate(ctx.get(), me.cert.get()) != 1) {
    return Status::InvalidArgument("our certificate '" + me.subject +
                                   "' cannot be used: " + DrainOpenSslErrors());
  }
  for (const X509Ptr& extra : me.chain) {
    if (SSL_CTX_add1_chain_cert(ctx.get(), extra.get()) != 1) {
      return Status::InvalidArgument("our certificate chain cannot be used: " +
                                     DrainOpenSslErrors());
    }
  }
  if (SSL_CTX_use_PrivateKey(ctx.get(), me.key.get()) != 1 ||
      SSL_CTX_check_private_key(ctx.get()) != 1) {
    return Status::InvalidArgument("our private key cannot be used: " + DrainOpenSslErrors());
  }
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, &VerifyCallback);
  return ctx;
}

}  // namespace

Result<TlsProbeResult> ProbeTls(const std::string& host, uint16_t port, const TlsIdentity& me,
                                const std::string& expected_name,
                                std::chrono::milliseconds timeout) {
  internal::ErrorQueueGuard guard;
  const Clock::time_point deadline = Clock::now() + timeout;
  const std::string endpoint = Endpoint(host, port);
  const std::string name = StripBrackets(expected_name);
  if (name.empty()) return Status::InvalidArgument("expected server name must not be empty");
  if (host.empty()) return Status::InvalidArgument("host must not be empty");
  if (timeout.count() <= 0) return Status::InvalidArgument("probe timeout must be positive");
  VMR_ASSIGN_OR_RETURN(internal::LoadedIdentity id, internal::LoadIdentity(me));
  VMR_ASSIGN_OR_RETURN(internal::SslCtxPtr ctx, NewClientContext(id));

  ProbeState state;
  internal::SslPtr ssl(SSL_new(ctx.get()));
  BIO* rbio = BIO_new(BIO_s_mem());
  BIO* wbio = BIO_new(BIO_s_mem());
  if (!ssl || rbio == nullptr || wbio == nullptr) {
    BIO_free(rbio);
    BIO_free(wbio);
    return Status::Internal("SSL_new: " + DrainOpenSslErrors());
  }
  SSL_set_bio(ssl.get(), rbio, wbio);  // ssl owns both from here
  SSL_set_connect_state(ssl.get());
  SSL_set_app_data(ssl.get(), &state);
  SSL_set_msg_callback(ssl.get(), &MessageCallback);
  SSL_set_msg_callback_arg(ssl.get(), &state);

  X509_VERIFY_PARAM* param = SSL_get0_param(ssl.get());
  if (internal::IsIpLiteral(name)) {
    if (X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str()) != 1) {
      return Status::InvalidArgument("bad expected IP address '" + name + "'");
    }
  } else {
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    if (X509_VERIFY_PARAM_set1_host(param, name.c_str(), name.size()) != 1) {
      return Status::InvalidArgument("bad expected server name '" + name + "'");
    }
    if (internal::IsDnsName(name, /*allow_wildcard=*/false) &&
        SSL_set_tlsext_host_name(ssl.get(), name.c_str()) != 1) {
      return Status::Internal("SSL_set_tlsext_host_name: " + DrainOpenSslErrors());
    }
  }
  static const unsigned char kAlpnH2[] = {2, 'h', '2'};
  if (SSL_set_alpn_protos(ssl.get(), kAlpnH2, sizeof(kAlpnH2)) != 0) {  // 0 is success here
    return Status::Internal("SSL_set_alpn_protos: " + DrainOpenSslErrors());
  }

  VMR_ASSIGN_OR_RETURN(UniqueFd sock, Connect(host, port, endpoint, deadline, timeout));

  bool send_failed = false;
  for (;;) {
    ERR_clear_error();
    int rc = SSL_do_handshake(ssl.get());
    int ssl_error = rc == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl.get(), rc);
    std::string openssl_errors = DrainOpenSslErrors("");
    VMR_RETURN_IF_ERROR(FlushOutput(sock.get(), wbio, deadline, endpoint, timeout, &send_failed));
    if (rc == 1) break;
    if (ssl_error == SSL_ERROR_WANT_READ && !state.peer_closed) {
      VMR_RETURN_IF_ERROR(ReadInput(sock.get(), rbio, deadline, endpoint, timeout, &state));
      continue;
    }
    if (state.verify_error != X509_V_OK) {
      return DiagnoseServerCertificate(state, id, name, endpoint);
    }
    long verify_result = SSL_get_verify_result(ssl.get());
    if (verify_result != X509_V_OK) {
      state.verify_error = static_cast<int>(verify_result);
      state.verify_depth = 0;
      return DiagnoseServerCertificate(state, id, name, endpoint);
    }
    if (openssl_errors.empty()) {
      openssl_errors = ssl_error == SSL_ERROR_SYSCALL ? "unexpected end of stream"
                                                      : "SSL error " + std::to_string(ssl_error);
    }
    return DiagnoseHandshakeFailure(state, id, endpoint, openssl_errors);
  }

  TlsProbeResult result;
  X509Ptr peer(SSL_get1_peer_certificate(ssl.get()));
  if (!peer) return Status::Internal("handshake completed without a server certificate");
  VMR_ASSIGN_OR_RETURN(result.server_certificate, internal::InspectX509(peer.get()));
  result.protocol = SSL_get_version(ssl.get());
  const char* cipher = SSL_get_cipher_name(ssl.get());
  if (cipher != nullptr) result.cipher = cipher;
  const unsigned char* alpn = nullptr;
  unsigned int alpn_len = 0;
  SSL_get0_alpn_selected(ssl.get(), &alpn, &alpn_len);
  if (alpn != nullptr) result.alpn.assign(reinterpret_cast<const char*>(alpn), alpn_len);

  // Polite close: send close_notify, do not wait for the answer.
  if (SSL_shutdown(ssl.get()) >= 0) {
    FlushOutput(sock.get(), wbio, deadline, endpoint, timeout, &send_failed).IgnoreError();
  }
  return result;
}

}  // namespace vmreplica::security
