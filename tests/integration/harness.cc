#include "integration/harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <charconv>
#include <memory>

#include "vmreplica/security.h"

namespace vmreplica::testing {

std::string BuildDir() {
  const char* d = std::getenv("VMREPLICA_BUILD_DIR");
  if (!d) throw std::runtime_error("VMREPLICA_BUILD_DIR is not set (run through ctest)");
  return d;
}
std::string DaemonBinary() { return BuildDir() + "/tools/vmreplicad/vmreplicad"; }
std::string CliBinary() { return BuildDir() + "/tools/vmreplica/vmreplica"; }

TempDir::TempDir() {
  char tmpl[] = "/tmp/vmr-it-XXXXXX";
  if (!::mkdtemp(tmpl)) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string ReadText(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

RunResult RunProgram(const std::vector<std::string>& argv, std::chrono::seconds timeout) {
  RunResult r;
  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0) return r;
  pid_t pid = ::fork();
  if (pid == 0) {
    int devnull = ::open("/dev/null", O_RDONLY);
    ::dup2(devnull, 0);
    ::dup2(out_pipe[1], 1);
    ::dup2(err_pipe[1], 2);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  auto deadline = std::chrono::steady_clock::now() + timeout;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  int open_fds = 2;
  while (open_fds > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      ::kill(pid, SIGKILL);
      break;
    }
    if (::poll(fds, 2, static_cast<int>(left.count())) < 0) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP))) continue;
      char buf[4096];
      ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n <= 0) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      } else {
        (i == 0 ? r.out : r.err).append(buf, static_cast<size_t>(n));
      }
    }
  }
  for (auto& f : fds) {
    if (f.fd >= 0) ::close(f.fd);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

uint16_t FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

void MakeCa(const std::string& dir, const std::string& cn) {
  std::filesystem::create_directories(dir);
  auto s = security::CreateLabCa(dir + "/ca.crt", dir + "/ca.key", cn, 30);
  if (!s.ok()) throw std::runtime_error(s.ToString());
}

void MakeHost(const std::string& ca_dir, const std::string& dir, const std::string& name,
              const std::vector<std::string>& sans) {
  std::filesystem::create_directories(dir);
  auto s = security::IssueHostCertificate(ca_dir + "/ca.crt", ca_dir + "/ca.key", name, sans,
                                          dir + "/" + name + ".crt", dir + "/" + name + ".key", 30);
  if (!s.ok()) throw std::runtime_error(s.ToString());
}

Daemon::Daemon(const TempDir& dir, DaemonSpec spec) : spec_(std::move(spec)) {
  const std::string base = dir / spec_.name;
  std::filesystem::create_directories(base);
  config_ = base + "/vmreplicad.toml";
  socket_ = base + "/admin.sock";
  state_dir_ = base + "/state";
  log_ = base + "/vmreplicad.log";
  std::ofstream f(config_);
  f << "[daemon]\nstate_dir = \"" << state_dir_ << "\"\nadmin_socket = \"" << socket_
    << "\"\nlog_level = \"debug\"\n"
    << "[listener]\naddress = \"" << spec_.listen_address << "\"\nport = " << spec_.port << "\n"
    << "[tls]\nca = \"" << spec_.ca_file << "\"\ncertificate = \"" << spec_.cert_file << "\"\nkey = \""
    << spec_.key_file << "\"\n"
    << spec_.extra_toml << "\n";
}

Daemon::~Daemon() {
  if (pid_ > 0) Kill();
}

bool Daemon::Start(std::string* error) {
  // Built before the fork: DaemonBinary() may throw, the child must not.
  std::vector<std::string> argv = spec_.exec_prefix;
  argv.insert(argv.end(), {DaemonBinary(), "--config", config_});
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(a.data());
  args.push_back(nullptr);
  pid_ = ::fork();
  if (pid_ == 0) {
    int devnull = ::open("/dev/null", O_RDONLY);
    ::dup2(devnull, 0);
    int log = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    ::dup2(log, 1);
    ::dup2(log, 2);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      if (error) *error = ReadText(log_);
      return false;
    }
    if (std::filesystem::exists(socket_) && Cli({"service", "status"}).exit_code == 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (error) *error = "vmreplicad did not answer within 60 s:\n" + ReadText(log_);
  return false;
}

bool Daemon::Stop() {
  if (pid_ <= 0) return false;
  ::kill(pid_, SIGTERM);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

void Daemon::Kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

RunResult Daemon::Cli(const std::vector<std::string>& args) const {
  std::vector<std::string> argv = {CliBinary(), "--socket", socket_};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunProgram(argv);
}

// The last non-empty line of `out` parsed as JSON (--json prints one
// document per line; the final one is the outcome). Discarded when unparsable.
nlohmann::json LastJsonDocument(const std::string& out) {
  std::string last;
  std::istringstream lines(out);
  for (std::string line; std::getline(lines, line);) {
    if (!line.empty()) last = line;
  }
  return nlohmann::json::parse(last, nullptr, /*allow_exceptions=*/false);
}

// SHA-256 (hex) of the first `length` bytes of `path`; bytes past the end of
// a shorter (sparse) file count as zeros, as they read on the replica.
std::string Sha256Padded(const std::string& path, uint64_t length) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  std::ifstream in(path, std::ios::binary);
  uint64_t done = 0;
  while (done < length && in) {
    in.read(buf.data(), static_cast<std::streamsize>(std::min<uint64_t>(buf.size(), length - done)));
    const auto n = static_cast<uint64_t>(in.gcount());
    if (n == 0) break;
    EVP_DigestUpdate(ctx.get(), buf.data(), n);
    done += n;
  }
  std::fill(buf.begin(), buf.end(), 0);
  while (done < length) {
    const uint64_t n = std::min<uint64_t>(buf.size(), length - done);
    EVP_DigestUpdate(ctx.get(), buf.data(), n);
    done += n;
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int md_len = 0;
  EVP_DigestFinal_ex(ctx.get(), md, &md_len);
  static const char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned i = 0; i < md_len; ++i) {
    hex += kHex[md[i] >> 4];
    hex += kHex[md[i] & 15];
  }
  return hex;
}

// A JSON integer; proto3's JSON mapping writes 64-bit fields as strings.
// -1 (with a test failure) for anything else.
int64_t JsonInt(const nlohmann::json& v) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_string()) {
    const std::string& s = v.get_ref<const std::string&>();
    int64_t n = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), n);
    if (ec == std::errc() && end == s.data() + s.size()) return n;
  }
  ADD_FAILURE() << "not an integer: " << v.dump();
  return -1;
}

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace vmreplica::testing
