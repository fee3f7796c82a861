// Tests of the security module against real OpenSSL: certificates made by the
// lab PKI, cross-checked with the openssl command line, and ProbeTls against
// an OpenSSL TLS server running in a thread on 127.0.0.1.
#include "vmreplica/security.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <memory>
#include <thread>

#include "security/lab_pki_internal.h"
#include "vmreplica/fileutil.h"

namespace vmreplica::security {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr std::chrono::milliseconds kProbeTimeout{3000};
constexpr std::chrono::milliseconds kShortTimeout{300};

std::string Slurp(const std::string& path) {
  Result<std::string> r = ReadFile(path);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? *r : std::string();
}

// Runs a shell command; returns its stdout, or "<exit N>" on failure.
std::string RunShell(const std::string& command) {
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.c_str(), "r"), &pclose);
  if (!pipe) return "<popen failed>";
  std::string out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe.get())) > 0) out.append(buf.data(), n);
  int rc = pclose(pipe.release());
  if (rc != 0) return out + "<exit " + std::to_string(rc) + ">";
  return out;
}

std::string Quote(const std::string& s) { return "'" + s + "'"; }

// A socket bound to 127.0.0.1 on an ephemeral port.
struct LocalSocket {
  int fd = -1;
  uint16_t port = 0;
  LocalSocket() {
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    socklen_t len = sizeof(addr);
    EXPECT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    port = ntohs(addr.sin_port);
  }
  ~LocalSocket() {
    if (fd >= 0) ::close(fd);
  }
  LocalSocket(const LocalSocket&) = delete;
  LocalSocket& operator=(const LocalSocket&) = delete;
};

// A real OpenSSL TLS server for one connection, as a gRPC server would be
// set up: it requires a client certificate that verifies against `trusted_ca`
// and selects ALPN "h2". Or, with kPlainText, a server that answers in HTTP.
class TestServer {
 public:
  enum class Mode { kTls, kPlainText };

  TestServer(const TlsIdentity& identity, Mode mode = Mode::kTls)
      : identity_(identity), mode_(mode) {
    EXPECT_EQ(::listen(socket_.fd, 4), 0);
    thread_ = std::thread([this] { Serve(); });
  }
  ~TestServer() {
    if (thread_.joinable()) thread_.join();
  }

  uint16_t port() const { return socket_.port; }
  // Waits for the connection to end; true when the TLS handshake succeeded.
  bool Finish() {
    if (thread_.joinable()) thread_.join();
    return handshake_ok_;
  }

 private:
  static int SelectAlpn(SSL*, const unsigned char** out, unsigned char* outlen,
                        const unsigned char* in, unsigned int inlen, void*) {
    static const unsigned char kH2[] = {2, 'h', '2'};
    unsigned char* selected = nullptr;
    if (SSL_select_next_proto(&selected, outlen, kH2, sizeof(kH2), in, inlen) !=
        OPENSSL_NPN_NEGOTIATED) {
      return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    *out = selected;
    return SSL_TLSEXT_ERR_OK;
  }

  void Serve() {
    pollfd p{socket_.fd, POLLIN, 0};
    if (::poll(&p, 1, 5000) != 1) return;
    int fd = ::accept4(socket_.fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) return;
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (mode_ == Mode::kPlainText) {
      char buf[1024];
      (void)!::recv(fd, buf, sizeof(buf), 0);
      static const char kReply[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
      (void)!::send(fd, kReply, sizeof(kReply) - 1, MSG_NOSIGNAL);
      ::close(fd);
      return;
    }
    ServeTls(fd);
    ::close(fd);
    ERR_clear_error();
  }

  void ServeTls(int fd) {
    std::unique_ptr<SSL_CTX, void (*)(SSL_CTX*)> ctx(SSL_CTX_new(TLS_server_method()),
                                                     &SSL_CTX_free);
    ASSERT_TRUE(ctx);
    std::unique_ptr<BIO, void (*)(BIO*)> ca_bio(
        BIO_new_mem_buf(identity_.ca_pem.data(), static_cast<int>(identity_.ca_pem.size())),
        &BIO_free_all);
    std::unique_ptr<BIO, void (*)(BIO*)> cert_bio(
        BIO_new_mem_buf(identity_.cert_pem.data(), static_cast<int>(identity_.cert_pem.size())),
        &BIO_free_all);
    std::unique_ptr<BIO, void (*)(BIO*)> key_bio(
        BIO_new_mem_buf(identity_.key_pem.data(), static_cast<int>(identity_.key_pem.size())),
        &BIO_free_all);
    std::unique_ptr<X509, void (*)(X509*)> ca(
        PEM_read_bio_X509(ca_bio.get(), nullptr, nullptr, nullptr), &X509_free);
    std::unique_ptr<X509, void (*)(X509*)> cert(
        PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr), &X509_free);
    std::unique_ptr<EVP_PKEY, void (*)(EVP_PKEY*)> key(
        PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr), &EVP_PKEY_free);
    ASSERT_TRUE(ca && cert && key);
    ASSERT_EQ(X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx.get()), ca.get()), 1);
    ASSERT_EQ(SSL_CTX_use_certificate(ctx.get(), cert.get()), 1);
    ASSERT_EQ(SSL_CTX_use_PrivateKey(ctx.get(), key.get()), 1);
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
    SSL_CTX_set_alpn_select_cb(ctx.get(), &SelectAlpn, nullptr);

    std::unique_ptr<SSL, void (*)(SSL*)> ssl(SSL_new(ctx.get()), &SSL_free);
    ASSERT_TRUE(ssl);
    SSL_set_fd(ssl.get(), fd);
    if (SSL_accept(ssl.get()) != 1) return;
    handshake_ok_ = true;
    char buf[64];
    SSL_read(ssl.get(), buf, sizeof(buf));  // until the client's close_notify
    SSL_shutdown(ssl.get());
  }

  TlsIdentity identity_;
  Mode mode_;
  LocalSocket socket_;
  bool handshake_ok_ = false;  // written by the thread, read after join
  std::thread thread_;
};

// Two lab CAs (A and B) and host certificates from each, made once.
class SecurityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ::signal(SIGPIPE, SIG_IGN);  // the test server writes with plain write()
    std::string pattern = (std::filesystem::temp_directory_path() / "vmr-sec-XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = new std::string(pattern);
    ASSERT_TRUE(CreateLabCa(P("ca_a.pem"), P("ca_a.key"), "Lab CA A", 30).ok());
    ASSERT_TRUE(CreateLabCa(P("ca_b.pem"), P("ca_b.key"), "Lab CA B", 30).ok());
    Issue("ca_a", "server.test", {"127.0.0.1"}, "server_a");
    Issue("ca_a", "client.test", {}, "client_a");
    Issue("ca_b", "server.test", {"127.0.0.1"}, "server_b");
    Issue("ca_b", "client.test", {}, "client_b");
  }

  static void TearDownTestSuite() {
    std::error_code ec;
    std::filesystem::remove_all(*dir_, ec);
    delete dir_;
    dir_ = nullptr;
  }

  void TearDown() override {
    EXPECT_EQ(ERR_peek_error(), 0u) << "a function left errors on the OpenSSL error queue";
  }

  static std::string P(const std::string& name) { return *dir_ + "/" + name; }

  static void Issue(const std::string& ca, const std::string& cn,
                    const std::vector<std::string>& alt_names, const std::string& out) {
    Status s = IssueHostCertificate(P(ca + ".pem"), P(ca + ".key"), cn, alt_names, P(out + ".pem"),
                                    P(out + ".key"), 30);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  // {ca trusted for peers, our cert, our key}
  static TlsIdentity Identity(const std::string& ca, const std::string& host) {
    return TlsIdentity{Slurp(P(ca + ".pem")), Slurp(P(host + ".pem")), Slurp(P(host + ".key"))};
  }

  static std::string* dir_;
};

std::string* SecurityTest::dir_ = nullptr;

// --- Inspect ----------------------------------------------------------------

TEST_F(SecurityTest, LabCaIsASelfSignedCa) {
  Result<CertificateInfo> ca = InspectCertificatePem(Slurp(P("ca_a.pem")));
  ASSERT_TRUE(ca.ok()) << ca.status().ToString();
  EXPECT_EQ(ca->subject, "CN=Lab CA A");
  EXPECT_EQ(ca->issuer, "CN=Lab CA A");
  EXPECT_EQ(ca->subject_cn, "Lab CA A");
  EXPECT_TRUE(ca->is_ca);
  EXPECT_TRUE(ca->dns_names.empty());
  EXPECT_NEAR(ca->not_after_unix - ca->not_before_unix, 30 * 86400 + 3600, 5);
  std::string text = RunShell("openssl x509 -noout -text -in " + Quote(P("ca_a.pem")));
  EXPECT_THAT(text, HasSubstr("CA:TRUE"));
  EXPECT_THAT(text, HasSubstr("Certificate Sign, CRL Sign"));
  EXPECT_THAT(text, HasSubstr("Subject Key Identifier"));
  EXPECT_THAT(text, HasSubstr("prime256v1"));
}

TEST_F(SecurityTest, HostCertificateShowsNamesUsageAndIssuer) {
  Result<CertificateInfo> info = InspectCertificatePem(Slurp(P("server_a.pem")));
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->subject, "CN=server.test");
  EXPECT_EQ(info->issuer, "CN=Lab CA A");
  EXPECT_THAT(info->dns_names, ElementsAre("server.test"));
  EXPECT_THAT(info->ip_addresses, ElementsAre("127.0.0.1"));
  EXPECT_TRUE(info->server_auth);
  EXPECT_TRUE(info->client_auth);
  EXPECT_FALSE(info->is_ca);
  EXPECT_EQ(info->thumbprint_sha1.size(), 40u);
  EXPECT_EQ(info->sha256_hex.size(), 64u);
  EXPECT_LE(info->serial_hex.size(), 32u);
  EXPECT_GE(info->serial_hex.size(), 16u);
  int64_t now = time(nullptr);
  EXPECT_LT(info->not_before_unix, now);
  EXPECT_GT(info->not_after_unix, now + 29 * 86400);
  std::string text = RunShell("openssl x509 -noout -text -in " + Quote(P("server_a.pem")));
  EXPECT_THAT(text, HasSubstr("CA:FALSE"));
  EXPECT_THAT(text, HasSubstr("TLS Web Server Authentication, TLS Web Client Authentication"));
  EXPECT_THAT(text, HasSubstr("Authority Key Identifier"));
  EXPECT_THAT(text, HasSubstr("Digital Signature"));
  EXPECT_THAT(text, ::testing::Not(HasSubstr("Key Encipherment")));
}

TEST_F(SecurityTest, ThumbprintAndSerialMatchOpensslCli) {
  Result<CertificateInfo> info = InspectCertificatePem(Slurp(P("server_a.pem")));
  ASSERT_TRUE(info.ok());
  auto field = [](std::string out) {
    out = out.substr(out.find('=') + 1);
    std::string hex;
    for (char c : out) {
      if (std::isxdigit(static_cast<unsigned char>(c))) hex += static_cast<char>(std::toupper(c));
    }
    return hex;
  };
  std::string in = " -in " + Quote(P("server_a.pem"));
  EXPECT_EQ(info->thumbprint_sha1, field(RunShell("openssl x509 -noout -fingerprint -sha1" + in)));
  EXPECT_EQ(info->sha256_hex, field(RunShell("openssl x509 -noout -fingerprint -sha256" + in)));
  std::string serial = field(RunShell("openssl x509 -noout -serial" + in));
  EXPECT_EQ(info->serial_hex, serial);
}

TEST_F(SecurityTest, OpensslCliVerifiesIssuedCertificate) {
  std::string out = RunShell("openssl verify -purpose sslserver -CAfile " + Quote(P("ca_a.pem")) +
                             " " + Quote(P("server_a.pem")) + " 2>&1");
  EXPECT_THAT(out, HasSubstr(": OK"));
  out = RunShell("openssl verify -purpose sslclient -CAfile " + Quote(P("ca_a.pem")) + " " +
                 Quote(P("client_a.pem")) + " 2>&1");
  EXPECT_THAT(out, HasSubstr(": OK"));
  out = RunShell("openssl verify -CAfile " + Quote(P("ca_b.pem")) + " " + Quote(P("server_a.pem")) +
                 " 2>&1");
  EXPECT_THAT(out, ::testing::Not(HasSubstr(": OK")));
}

TEST_F(SecurityTest, KeyFilesAreOwnerOnly) {
  for (const char* name : {"ca_a.key", "server_a.key"}) {
    struct stat st {};
    ASSERT_EQ(::stat(P(name).c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u) << name;
  }
  struct stat st {};
  ASSERT_EQ(::stat(P("server_a.pem").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
}

TEST_F(SecurityTest, GarbageIsInvalidArgument) {
  for (const std::string& pem :
       {std::string(), std::string("hello world"),
        std::string(
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!!\n-----END CERTIFICATE-----\n")}) {
    Result<CertificateInfo> info = InspectCertificatePem(pem);
    ASSERT_FALSE(info.ok());
    EXPECT_EQ(info.status().code(), Code::kInvalidArgument) << info.status().ToString();
    EXPECT_THAT(info.status().message(), HasSubstr("certificate"));
  }
  std::string pem = Slurp(P("server_a.pem"));
  std::string truncated = pem.substr(0, pem.size() / 2) + "\n-----END CERTIFICATE-----\n";
  Result<CertificateInfo> info = InspectCertificatePem(truncated);
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.status().code(), Code::kInvalidArgument) << info.status().ToString();
  EXPECT_THAT(info.status().message(), HasSubstr("corrupt"));
}

TEST_F(SecurityTest, ChainInspectionKeepsOrder) {
  Result<std::vector<CertificateInfo>> chain = InspectCertificateChainPem(
      Slurp(P("server_a.pem")) + "some comment\n" + Slurp(P("ca_a.pem")));
  ASSERT_TRUE(chain.ok()) << chain.status().ToString();
  ASSERT_EQ(chain->size(), 2u);
  EXPECT_EQ((*chain)[0].subject_cn, "server.test");
  EXPECT_EQ((*chain)[1].subject_cn, "Lab CA A");
  EXPECT_FALSE(InspectCertificateChainPem("nothing here").ok());
}

// --- CertificateNames ---------------------------------------------------------

TEST(CertificateNamesTest, DnsNamesLowerCasedThenIpsAndCnIgnored) {
  CertificateInfo info;
  info.subject_cn = "cn-is-ignored";
  info.dns_names = {"B.Example", "a.example", "b.example"};
  info.ip_addresses = {"10.0.0.1", "::1"};
  EXPECT_THAT(CertificateNames(info), ElementsAre("b.example", "a.example", "10.0.0.1", "::1"));
}

TEST(CertificateNamesTest, CnStandsInOnlyWithoutDnsNames) {
  CertificateInfo info;
  info.subject_cn = "Host1.Example";
  info.ip_addresses = {"10.0.0.1"};
  EXPECT_THAT(CertificateNames(info), ElementsAre("host1.example", "10.0.0.1"));
  info.ip_addresses.clear();
  info.subject_cn.clear();
  EXPECT_TRUE(CertificateNames(info).empty());
}

// --- Lab PKI -------------------------------------------------------------------

TEST_F(SecurityTest, CommonNameIsAddedToAltNames) {
  ASSERT_TRUE(IssueHostCertificate(P("ca_a.pem"), P("ca_a.key"), "Host1.Example",
                                   {"10.1.2.3", "Alt.Example", "[fd00::1]", "host1.example"},
                                   P("cn.pem"), P("cn.key"), 10)
                  .ok());
  Result<CertificateInfo> info = InspectCertificatePem(Slurp(P("cn.pem")));
  ASSERT_TRUE(info.ok());
  // The CN comes first (a peer is named by its first DNS SAN); the
  // duplicate "host1.example" is not added twice.
  EXPECT_THAT(info->dns_names, ElementsAre("Host1.Example", "Alt.Example"));
  EXPECT_THAT(info->ip_addresses, ElementsAre("10.1.2.3", "fd00::1"));
  EXPECT_THAT(CertificateNames(*info),
              ElementsAre("host1.example", "alt.example", "10.1.2.3", "fd00::1"));
}

TEST_F(SecurityTest, IpCommonNameBecomesIpAltName) {
  ASSERT_TRUE(IssueHostCertificate(P("ca_a.pem"), P("ca_a.key"), "192.0.2.7", {}, P("ip.pem"),
                                   P("ip.key"), 10)
                  .ok());
  Result<CertificateInfo> info = InspectCertificatePem(Slurp(P("ip.pem")));
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->dns_names.empty());
  EXPECT_THAT(info->ip_addresses, ElementsAre("192.0.2.7"));
}

TEST_F(SecurityTest, IssueRefusesBadArguments) {
  auto issue = [](const std::string& ca, const std::string& key, const std::string& cn,
                  std::vector<std::string> alt, int days) {
    return IssueHostCertificate(P(ca), P(key), cn, alt, P("x.pem"), P("x.key"), days);
  };
  EXPECT_EQ(issue("ca_a.pem", "ca_a.key", "My Host", {}, 10).code(), Code::kInvalidArgument);
  EXPECT_EQ(issue("ca_a.pem", "ca_a.key", "h", {"bad name"}, 10).code(), Code::kInvalidArgument);
  EXPECT_EQ(issue("ca_a.pem", "ca_a.key", "h", {"-x.example"}, 10).code(), Code::kInvalidArgument);
  EXPECT_EQ(issue("ca_a.pem", "ca_a.key", "", {"h"}, 10).code(), Code::kInvalidArgument);
  EXPECT_EQ(issue("ca_a.pem", "ca_a.key", "h", {}, 0).code(), Code::kInvalidArgument);
  EXPECT_EQ(issue("missing.pem", "ca_a.key", "h", {}, 10).code(), Code::kNotFound);
  Status wrong_key = issue("ca_a.pem", "ca_b.key", "h", {}, 10);
  EXPECT_EQ(wrong_key.code(), Code::kInvalidArgument);
  EXPECT_THAT(wrong_key.message(), HasSubstr("does not belong"));
  Status not_ca = issue("server_a.pem", "server_a.key", "h", {}, 10);
  EXPECT_EQ(not_ca.code(), Code::kInvalidArgument);
  EXPECT_THAT(not_ca.message(), HasSubstr("not a CA"));
  EXPECT_FALSE(std::filesystem::exists(P("x.pem")));
  EXPECT_EQ(CreateLabCa(P("y.pem"), P("y.key"), "", 10).code(), Code::kInvalidArgument);
  EXPECT_EQ(CreateLabCa(P("y.pem"), P("y.key"), "CA", 0).code(), Code::kInvalidArgument);
  EXPECT_EQ(CreateLabCa(P("nodir/y.pem"), P("nodir/y.key"), "CA", 1).code(), Code::kIOError);
}

TEST_F(SecurityTest, RsaCaIssuesRsaLeafWithKeyEncipherment) {
  std::string out = RunShell(
      "openssl req -x509 -newkey rsa:2048 -nodes -days 5 -subj '/CN=RSA Lab CA' "
      "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign "
      "-keyout " +
      Quote(P("rsa_ca.key")) + " -out " + Quote(P("rsa_ca.pem")) + " 2>/dev/null");
  ASSERT_THAT(out, ::testing::Not(HasSubstr("<exit")));
  Status s = IssueHostCertificate(P("rsa_ca.pem"), P("rsa_ca.key"), "rsa.test", {},
                                  P("rsa_host.pem"), P("rsa_host.key"), 30);
  ASSERT_TRUE(s.ok()) << s.ToString();
  std::string text = RunShell("openssl x509 -noout -text -in " + Quote(P("rsa_host.pem")));
  EXPECT_THAT(text, HasSubstr("rsaEncryption"));
  EXPECT_THAT(text, HasSubstr("Digital Signature, Key Encipherment"));
  Result<CertificateInfo> info = InspectCertificatePem(Slurp(P("rsa_host.pem")));
  ASSERT_TRUE(info.ok());
  // Clamped to the CA's own 5 days.
  EXPECT_LE(info->not_after_unix, time(nullptr) + 5 * 86400 + 60);
  EXPECT_TRUE(CheckIdentity(TlsIdentity{Slurp(P("rsa_ca.pem")), Slurp(P("rsa_host.pem")),
                                        Slurp(P("rsa_host.key"))})
                  .ok());
}

// --- CheckIdentity -------------------------------------------------------------

TEST_F(SecurityTest, CheckIdentityAcceptsGoodIdentity) {
  Status s = CheckIdentity(Identity("ca_a", "server_a"));
  EXPECT_TRUE(s.ok()) << s.ToString();
}

TEST_F(SecurityTest, CheckIdentityRefusesKeyOfAnotherCertificate) {
  TlsIdentity me = Identity("ca_a", "server_a");
  me.key_pem = Slurp(P("client_a.key"));
  Status s = CheckIdentity(me);
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("does not belong to our certificate 'CN=server.test'"));
}

TEST_F(SecurityTest, CheckIdentityRefusesCertificateFromAnotherCa) {
  TlsIdentity me = Identity("ca_a", "server_b");
  Status s = CheckIdentity(me);
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_THAT(s.message(),
              HasSubstr("does not verify against our CA certificate(s) 'CN=Lab CA A'"));
}

TEST_F(SecurityTest, CheckIdentityRefusesExpiredCertificate) {
  internal::LeafOptions options;
  options.not_before_unix = time(nullptr) - 10 * 86400;
  options.not_after_unix = time(nullptr) - 86400;
  ASSERT_TRUE(internal::IssueHostCertificateWithOptions(P("ca_a.pem"), P("ca_a.key"), "old.test",
                                                        {}, P("old.pem"), P("old.key"), options)
                  .ok());
  Status s = CheckIdentity(Identity("ca_a", "old"));
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("our certificate 'CN=old.test' expired on"));
}

TEST_F(SecurityTest, CheckIdentityRefusesServerOnlyCertificate) {
  internal::LeafOptions options;
  options.not_before_unix = time(nullptr) - 60;
  options.not_after_unix = time(nullptr) + 86400;
  options.client_auth = false;
  ASSERT_TRUE(internal::IssueHostCertificateWithOptions(P("ca_a.pem"), P("ca_a.key"), "srv.test",
                                                        {}, P("srv.pem"), P("srv.key"), options)
                  .ok());
  Result<CertificateInfo> info = InspectCertificatePem(Slurp(P("srv.pem")));
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->server_auth);
  EXPECT_FALSE(info->client_auth);
  Status s = CheckIdentity(Identity("ca_a", "srv"));
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("lacks clientAuth"));
}

TEST_F(SecurityTest, CheckIdentityRefusesUnreadablePems) {
  TlsIdentity me = Identity("ca_a", "server_a");
  me.key_pem = "not a key";
  EXPECT_EQ(CheckIdentity(me).code(), Code::kInvalidArgument);
  me = Identity("ca_a", "server_a");
  me.ca_pem.clear();
  Status s = CheckIdentity(me);
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("our CA certificate"));
  // An encrypted key must not make OpenSSL prompt on the terminal.
  std::string encrypted =
      RunShell("openssl pkey -aes256 -passout pass:secret -in " + Quote(P("server_a.key")));
  ASSERT_THAT(encrypted, HasSubstr("ENCRYPTED"));
  me = Identity("ca_a", "server_a");
  me.key_pem = encrypted;
  s = CheckIdentity(me);
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("encrypted"));
}

// --- ProbeTls ----------------------------------------------------------------------

TEST_F(SecurityTest, ProbeSucceedsWithMutualTrust) {
  TestServer server(Identity("ca_a", "server_a"));
  Result<TlsProbeResult> r = ProbeTls("127.0.0.1", server.port(), Identity("ca_a", "client_a"),
                                      "server.test", kProbeTimeout);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->protocol, "TLSv1.2");
  EXPECT_FALSE(r->cipher.empty());
  EXPECT_EQ(r->alpn, "h2");
  EXPECT_EQ(r->server_certificate.subject_cn, "server.test");
  EXPECT_TRUE(server.Finish());
}

TEST_F(SecurityTest, ProbeChecksIpAddressNames) {
  TestServer server(Identity("ca_a", "server_a"));
  Result<TlsProbeResult> r = ProbeTls("127.0.0.1", server.port(), Identity("ca_a", "client_a"),
                                      "127.0.0.1", kProbeTimeout);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(server.Finish());
}

TEST_F(SecurityTest, ProbeReportsUntrustedServerCertificate) {
  TestServer server(Identity("ca_a", "server_b"));  // presents a certificate from CA B
  Result<TlsProbeResult> r = ProbeTls("127.0.0.1", server.port(), Identity("ca_a", "client_a"),
                                      "server.test", kProbeTimeout);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kPermissionDenied) << r.status().ToString();
  EXPECT_THAT(r.status().message(), HasSubstr("is not trusted"));
  EXPECT_THAT(r.status().message(), HasSubstr("issued by 'CN=Lab CA B'"));
  EXPECT_THAT(r.status().message(), HasSubstr("'CN=Lab CA A'"));
  EXPECT_FALSE(server.Finish());
}

TEST_F(SecurityTest, ProbeReportsServerRejectingOurCertificate) {
  TestServer server(Identity("ca_a", "server_a"));  // trusts only CA A
  Result<TlsProbeResult> r = ProbeTls("127.0.0.1", server.port(), Identity("ca_a", "client_b"),
                                      "server.test", kProbeTimeout);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kPermissionDenied) << r.status().ToString();
  EXPECT_THAT(r.status().message(), HasSubstr("rejected our certificate 'CN=client.test'"));
  EXPECT_THAT(r.status().message(), HasSubstr("CN=Lab CA B"));
  EXPECT_FALSE(server.Finish());
}

TEST_F(SecurityTest, ProbeReportsNameMismatch) {
  TestServer server(Identity("ca_a", "server_a"));
  Result<TlsProbeResult> r = ProbeTls("127.0.0.1", server.port(), Identity("ca_a", "client_a"),
                                      "other.test", kProbeTimeout);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kPermissionDenied) << r.status().ToString();
  EXPECT_THAT(r.status().message(),
              HasSubstr("remote certificate is for server.test, 127.0.0.1, not for other.test"));
  EXPECT_FALSE(server.Finish());
}

TEST_F(SecurityTest, ProbeReportsIpAddressMismatch) {
  TestServer server(Identity("ca_a", "server_a"));
  Result<TlsProbeResult> r = ProbeTls("127.0.0.1", server.port(), Identity("ca_a", "client_a"),
                                      "192.0.2.1", kProbeTimeout);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kPermissionDenied) << r.status().ToString();
  EXPECT_THAT(r.status().message(), HasSubstr("not for 192.0.2.1"));
  EXPECT_FALSE(server.Finish());
}

TEST_F(SecurityTest, ProbeReportsExpiredServerCertificate) {
  internal::LeafOptions options;
  options.not_before_unix = time(nullptr) - 10 * 86400;
  options.not_after_unix = time(nullptr) - 86400;
  ASSERT_TRUE(internal::IssueHostCertificateWithOptions(P("ca_a.pem"), P("ca_a.key"), "server.test",
                                                        {}, P("old_srv.pem"), P("old_srv.key"),
                                                        options)
                  .ok());
  TestServer server(Identity("ca_a", "old_srv"));
  Result<TlsProbeResult> r = ProbeTls("127.0.0.1", server.port(), Identity("ca_a", "client_a"),
                                      "server.test", kProbeTimeout);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kPermissionDenied) << r.status().ToString();
  EXPECT_THAT(r.status().message(), HasSubstr("expired on"));
  EXPECT_FALSE(server.Finish());
}

TEST_F(SecurityTest, ProbeReportsConnectionRefused) {
  LocalSocket bound_not_listening;
  Result<TlsProbeResult> r = ProbeTls("127.0.0.1", bound_not_listening.port,
                                      Identity("ca_a", "client_a"), "server.test", kProbeTimeout);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kUnavailable) << r.status().ToString();
  EXPECT_EQ(r.status().message(),
            "cannot reach 127.0.0.1:" + std::to_string(bound_not_listening.port) +
                ": connection refused");
}

TEST_F(SecurityTest, ProbeTimesOutOnSilentListener) {
  LocalSocket silent;  // the kernel completes TCP; nobody ever speaks TLS
  ASSERT_EQ(::listen(silent.fd, 4), 0);
  Result<TlsProbeResult> r = ProbeTls("127.0.0.1", silent.port, Identity("ca_a", "client_a"),
                                      "server.test", kShortTimeout);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kTimeout) << r.status().ToString();
  EXPECT_THAT(r.status().message(), HasSubstr("no TLS answer"));
}

TEST_F(SecurityTest, ProbeTimesOutWhenSynIsNeverAnswered) {
  // A listener whose accept queue is full drops new SYNs (Linux), so the
  // connect itself gets no answer.
  LocalSocket full;
  ASSERT_EQ(::listen(full.fd, 0), 0);
  std::vector<int> fillers;
  for (int i = 0; i < 3; ++i) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(full.port);
    (void)::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    fillers.push_back(fd);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  Result<TlsProbeResult> r =
      ProbeTls("127.0.0.1", full.port, Identity("ca_a", "client_a"), "server.test", kShortTimeout);
  for (int fd : fillers) ::close(fd);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kTimeout) << r.status().ToString();
}

TEST_F(SecurityTest, ProbeReportsNonTlsServer) {
  TestServer server(Identity("ca_a", "server_a"), TestServer::Mode::kPlainText);
  Result<TlsProbeResult> r = ProbeTls("127.0.0.1", server.port(), Identity("ca_a", "client_a"),
                                      "server.test", kProbeTimeout);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kUnavailable) << r.status().ToString();
  EXPECT_THAT(r.status().message(), HasSubstr("TLS handshake with 127.0.0.1:"));
  server.Finish();
}

TEST_F(SecurityTest, ProbeRefusesBrokenIdentityWithoutConnecting) {
  TlsIdentity me = Identity("ca_a", "client_a");
  me.key_pem = Slurp(P("server_a.key"));
  Result<TlsProbeResult> r = ProbeTls("127.0.0.1", 1, me, "server.test", kProbeTimeout);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << r.status().ToString();
  EXPECT_THAT(r.status().message(), HasSubstr("does not belong"));
  r = ProbeTls("127.0.0.1", 1, Identity("ca_a", "client_a"), "", kProbeTimeout);
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
}

}  // namespace
}  // namespace vmreplica::security
