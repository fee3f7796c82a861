#include "blockio/qsd_testing.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

extern char** environ;

namespace vmreplica::blockio_testing {

TempDir::TempDir(const std::string& prefix) {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl =
      std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/" + prefix + "-XXXXXX";
  if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
}

TempDir::~TempDir() {
  if (path_.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

Result<std::string> RunCommand(const std::vector<std::string>& argv) {
  if (argv.empty()) return Status::InvalidArgument("empty command");
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return Status::IOError(std::string("pipe: ") + strerror(errno));
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 2);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  int rc = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    return Status::IOError("spawn " + argv[0] + ": " + strerror(rc));
  }
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = read(fds[0], buf, sizeof buf);
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
    } else if (n == 0 || errno != EINTR) {
      break;
    }
  }
  close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) == -1 && errno == EINTR) {
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::string cmd;
    for (const auto& a : argv) cmd += (cmd.empty() ? "" : " ") + a;
    return Status::IOError(cmd + " failed (status " + std::to_string(status) + "): " + out);
  }
  return out;
}

Status CreateQcow2(const std::string& path, uint64_t size, const std::optional<std::string>& bitmap,
                   uint32_t granularity) {
  VMR_RETURN_IF_ERROR(
      RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", path, std::to_string(size)}).status());
  if (bitmap.has_value()) {
    VMR_RETURN_IF_ERROR(RunCommand({"qemu-img", "bitmap", "--add", "-g",
                                    std::to_string(granularity), path, *bitmap})
                            .status());
  }
  return Status::Ok();
}

Result<std::unique_ptr<Qsd>> Qsd::Start(const std::string& dir, const std::string& image,
                                        const std::optional<std::string>& bitmap) {
  const std::string sock = dir + "/nbd.sock";
  const std::string pidfile = dir + "/qsd.pid";
  const std::string qmp = dir + "/qmp.sock";
  std::string exp = "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on";
  if (bitmap.has_value()) exp += ",bitmaps.0=" + *bitmap;
  // The daemon forks away from qemu-storage-daemon's first process; being a
  // subreaper makes it our child, so it is reaped here instead of lingering
  // as a zombie of init.
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  std::error_code ec;
  std::filesystem::remove(sock, ec);
  std::filesystem::remove(pidfile, ec);
  VMR_RETURN_IF_ERROR(RunCommand({"qemu-storage-daemon", "--blockdev",
                                  "driver=file,node-name=file0,filename=" + image, "--blockdev",
                                  "driver=qcow2,node-name=disk0,file=file0", "--nbd-server",
                                  "addr.type=unix,addr.path=" + sock, "--export", exp, "--chardev",
                                  "socket,path=" + qmp + ",server=on,wait=off,id=qmp0", "--monitor",
                                  "chardev=qmp0", "--daemonize", "--pidfile", pidfile})
                          .status());
  std::ifstream in(pidfile);
  long pid = 0;
  if (!(in >> pid) || pid <= 1) return Status::Internal("no pid in " + pidfile);
  while (waitpid(-1, nullptr, WNOHANG) > 0) {
  }
  return std::unique_ptr<Qsd>(new Qsd(sock, qmp, static_cast<pid_t>(pid)));
}

Qsd::~Qsd() { Stop().IgnoreError(); }

bool Qsd::WaitGone(int timeout_ms) const {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    // qemu-storage-daemon --daemonize forks twice; as subreaper we inherit
    // the intermediate process too. Reap every child that has exited.
    bool reaped = false;
    for (pid_t p; (p = waitpid(-1, nullptr, WNOHANG)) > 0;) reaped = reaped || p == pid_;
    if (reaped) return true;
    // The daemon may not be our child: it is gone when /proc has no live entry
    // for it (a zombie waiting for init counts as gone).
    std::ifstream stat("/proc/" + std::to_string(pid_) + "/stat");
    std::string line;
    if (!stat || !std::getline(stat, line)) return true;
    auto p = line.rfind(')');
    if (p != std::string::npos && p + 2 < line.size() && line[p + 2] == 'Z') {
      waitpid(pid_, nullptr, WNOHANG);  // reap it if it is ours
      return true;
    }
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

Status Qsd::Stop() {
  if (pid_ <= 0) return Status::Ok();
  pid_t pid = pid_;
  if (kill(pid, SIGTERM) == 0 && !WaitGone(10'000)) {
    kill(pid, SIGKILL);
    WaitGone(5'000);
    pid_ = 0;
    return Status::Timeout("qemu-storage-daemon " + std::to_string(pid) + " ignored SIGTERM");
  }
  pid_ = 0;
  return Status::Ok();
}

void Qsd::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  WaitGone(5'000);
  pid_ = 0;
}

Result<std::unique_ptr<QmpSession>> QmpSession::Connect(const std::string& socket_path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::IOError(std::string("socket: ") + strerror(errno));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof addr.sun_path) {
    close(fd);
    return Status::InvalidArgument("QMP socket path too long: " + socket_path);
  }
  std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size() + 1);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return Status::Unavailable("connect " + socket_path + ": " + strerror(errno));
  }
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::unique_ptr<QmpSession> s(new QmpSession(fd));
  VMR_ASSIGN_OR_RETURN(std::string greeting, s->ReadLine());
  if (greeting.find("\"QMP\"") == std::string::npos)
    return Status::Corruption("no QMP greeting: " + greeting);
  VMR_RETURN_IF_ERROR(s->Execute("qmp_capabilities").status());
  return s;
}

QmpSession::~QmpSession() { close(fd_); }

Result<std::string> QmpSession::ReadLine() {
  for (;;) {
    auto nl = pending_.find('\n');
    if (nl != std::string::npos) {
      std::string line = pending_.substr(0, nl);
      pending_.erase(0, nl + 1);
      return line;
    }
    char buf[4096];
    ssize_t n = read(fd_, buf, sizeof buf);
    if (n > 0) {
      pending_.append(buf, static_cast<size_t>(n));
    } else if (n == 0) {
      return Status::Unavailable("QMP connection closed");
    } else if (errno != EINTR) {
      return Status::IOError(std::string("QMP read: ") + strerror(errno));
    }
  }
}

Result<std::string> QmpSession::Execute(const std::string& command,
                                        const std::string& arguments_json) {
  std::string msg = "{\"execute\":\"" + command + "\",\"arguments\":" + arguments_json + "}\n";
  for (size_t off = 0; off < msg.size();) {
    ssize_t n = send(fd_, msg.data() + off, msg.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return Status::IOError(std::string("QMP write: ") + strerror(errno));
    off += static_cast<size_t>(n);
  }
  for (;;) {
    VMR_ASSIGN_OR_RETURN(std::string line, ReadLine());
    // Replies start with their key; anything else (events) is skipped.
    if (line.rfind("{\"return\"", 0) == 0) return line;
    if (line.rfind("{\"error\"", 0) == 0) return Status::FailedPrecondition(command + ": " + line);
  }
}

Status QemuIo(const std::string& uri, const std::vector<std::string>& commands) {
  std::vector<std::string> argv = {"qemu-io", "-f", "raw", uri};
  for (const auto& c : commands) {
    argv.push_back("-c");
    argv.push_back(c);
  }
  return RunCommand(argv).status();
}

}  // namespace vmreplica::blockio_testing
