#include "guest/test_guest.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <thread>

namespace vmreplica::testing {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kMaxCommandBytes = 3500;  // the guest tty reads lines of < 4096 bytes
constexpr size_t kMaxBufferedBytes = 64u << 20;

bool FileExists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

std::string Tail(const std::string& path, size_t bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "(no " + path + ")";
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  if (s.size() > bytes) s = "..." + s.substr(s.size() - bytes);
  return s;
}

bool ValidNodeName(const std::string& name) {
  static const std::regex re("[A-Za-z][A-Za-z0-9_-]{0,30}");
  return std::regex_match(name, re);
}

}  // namespace

std::string GuestArtifactsDir() {
  const char* env = std::getenv("VMREPLICA_GUEST_DIR");
  if (env != nullptr && *env != '\0') return env;
  return "/var/cache/vmreplica/test-guest";
}

Status CheckGuestArtifacts() {
  const std::string dir = GuestArtifactsDir();
  for (const char* name : {"vmlinuz", "initramfs.cpio.gz"}) {
    std::string path = dir + "/" + name;
    if (!FileExists(path)) {
      return Status::FailedPrecondition("test guest artifact missing: " + path +
                                        "; build it with `sudo scripts/build-test-guest.sh " + dir + "`");
    }
  }
  return Status::Ok();
}

TestGuest::TestGuest(std::string run_dir, bool guest_agent, pid_t pid)
    : run_dir_(std::move(run_dir)), guest_agent_(guest_agent), pid_(pid) {}

TestGuest::~TestGuest() { Kill(); }

Result<std::unique_ptr<TestGuest>> TestGuest::Launch(const GuestOptions& options) {
  VMR_RETURN_IF_ERROR(CheckGuestArtifacts());
  if (options.run_dir.empty()) return Status::InvalidArgument("GuestOptions.run_dir is empty");
  if (options.run_dir.find(',') != std::string::npos) {
    return Status::InvalidArgument("GuestOptions.run_dir must not contain ',': " + options.run_dir);
  }
  if (options.run_dir.size() > 90) {
    return Status::InvalidArgument("run_dir too long for unix socket paths: " + options.run_dir);
  }
  if (options.memory_mib < 128 || options.memory_mib > 4096) {
    return Status::InvalidArgument("memory_mib must be in 128..4096");
  }
  const std::string dir = GuestArtifactsDir();
  const std::string serial_sock = options.run_dir + "/serial.sock";
  std::vector<std::string> args = {options.qemu_binary,
                                   "-accel",
                                   "tcg",
                                   "-m",
                                   std::to_string(options.memory_mib),
                                   "-nographic",
                                   "-nodefaults",
                                   "-no-reboot",
                                   "-kernel",
                                   dir + "/vmlinuz",
                                   "-initrd",
                                   dir + "/initramfs.cpio.gz"};
  std::string append = "console=ttyS0 panic=-1 quiet vmr.disks=" + std::to_string(options.disks.size());
  if (options.guest_agent) append += " vmr.qga=1";
  args.insert(args.end(), {"-append", append});
  args.insert(args.end(),
              {"-chardev",
               "socket,id=ser0,path=" + serial_sock + ",server=on,wait=off,logfile=" + options.run_dir + "/serial.log",
               "-serial", "chardev:ser0"});
  args.insert(args.end(), {"-qmp", "unix:" + options.run_dir + "/qmp.sock,server=on,wait=off"});

  for (size_t i = 0; i < options.disks.size(); ++i) {
    const GuestDisk& d = options.disks[i];
    std::string node = d.node_name.empty() ? "disk" + std::to_string(i) : d.node_name;
    nlohmann::json format_node;
    if (!d.blockdev_json.empty()) {
      format_node = nlohmann::json::parse(d.blockdev_json, nullptr, /*allow_exceptions=*/false);
      if (!format_node.is_object()) {
        return Status::InvalidArgument("disk " + std::to_string(i) + ": blockdev_json is not a JSON object");
      }
      if (format_node.contains("node-name")) {
        if (!format_node["node-name"].is_string()) {
          return Status::InvalidArgument("disk " + std::to_string(i) + ": node-name is not a string");
        }
        node = format_node["node-name"].get<std::string>();
      } else {
        format_node["node-name"] = node;
      }
      if (d.read_only) format_node["read-only"] = true;
    } else {
      if (d.path.empty()) return Status::InvalidArgument("disk " + std::to_string(i) + ": no path");
      if (d.format != "qcow2" && d.format != "raw") {
        return Status::InvalidArgument("disk " + std::to_string(i) + ": format must be qcow2 or raw");
      }
      nlohmann::json file_node = {{"driver", "file"}, {"node-name", node + "-file"}, {"filename", d.path}};
      format_node = {{"driver", d.format}, {"node-name", node}, {"file", node + "-file"}};
      if (d.read_only) {
        file_node["read-only"] = true;
        format_node["read-only"] = true;
      }
      args.insert(args.end(), {"-blockdev", file_node.dump()});
    }
    if (!ValidNodeName(node)) return Status::InvalidArgument("bad node name: " + node);
    args.insert(args.end(), {"-blockdev", format_node.dump()});
    args.insert(args.end(), {"-device", "virtio-blk-pci,drive=" + node});
  }
  if (options.guest_agent) {
    args.insert(args.end(), {"-device", "virtio-serial", "-chardev",
                             "socket,id=qga0,path=" + options.run_dir + "/qga.sock,server=on,wait=off", "-device",
                             "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"});
  }
  args.insert(args.end(), options.extra_args.begin(), options.extra_args.end());

  for (const char* s : {"/serial.sock", "/qmp.sock", "/qga.sock"}) ::unlink((options.run_dir + s).c_str());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string log_path = options.run_dir + "/qemu.log";
  int log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) return Status::IOError("open " + log_path + ": " + std::strerror(errno));
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    int err = errno;
    ::close(log_fd);
    return Status::IOError(std::string("fork: ") + std::strerror(err));
  }
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, 0);
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
    ::setpgid(0, 0);
    ::execvp(argv[0], argv.data());
    static const char kMsg[] = "exec of qemu failed\n";
    ssize_t ignored = ::write(2, kMsg, sizeof(kMsg) - 1);
    (void)ignored;
    ::_exit(127);
  }
  ::close(log_fd);
  std::unique_ptr<TestGuest> guest(new TestGuest(options.run_dir, options.guest_agent, pid));

  auto deadline = Clock::now() + options.boot_timeout;
  VMR_RETURN_IF_ERROR(guest->ConnectSerial(deadline));
  // The console may drop input sent before /init reads it: send a fresh
  // probe every second until one is answered.
  auto next_probe = Clock::now();
  for (;;) {
    if (Clock::now() >= next_probe) {
      VMR_RETURN_IF_ERROR(guest->SendLine("p" + std::to_string(guest->next_id_++) + " true\n"));
      next_probe = Clock::now() + std::chrono::seconds(1);
    }
    size_t at = guest->buffer_.find("\n@@END p");
    if (at != std::string::npos) {
      size_t eol = guest->buffer_.find('\n', at + 1);
      if (eol != std::string::npos) {
        guest->buffer_.erase(0, eol + 1);
        return guest;
      }
    }
    if (Clock::now() >= deadline) {
      return Status::Timeout("test guest did not answer on its console: " + guest->Diagnostics());
    }
    Status s = guest->ReadSome(std::min(next_probe, deadline));
    if (!s.ok()) return s;
  }
}

Status TestGuest::ConnectSerial(Clock::time_point deadline) {
  const std::string path = run_dir_ + "/serial.sock";
  for (;;) {
    if (Exited()) return Status::IOError("qemu exited during start: " + Diagnostics());
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return Status::IOError(std::string("socket: ") + std::strerror(errno));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      serial_fd_ = fd;
      return Status::Ok();
    }
    ::close(fd);
    if (Clock::now() >= deadline) {
      return Status::Timeout("qemu serial socket " + path + " never accepted: " + Diagnostics());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Status TestGuest::SendLine(const std::string& line) {
  if (serial_fd_ < 0) return Status::Unavailable("test guest is not running");
  size_t off = 0;
  while (off < line.size()) {
    ssize_t n = ::send(serial_fd_, line.data() + off, line.size() - off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::Unavailable(std::string("serial console write: ") + std::strerror(errno));
    }
    off += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status TestGuest::ReadSome(Clock::time_point until) {
  if (serial_fd_ < 0) return Status::Unavailable("test guest is not running");
  auto now = Clock::now();
  int wait_ms = until > now
                    ? static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(until - now).count()) + 1
                    : 0;
  pollfd p{serial_fd_, POLLIN, 0};
  int r = ::poll(&p, 1, wait_ms);
  if (r < 0 && errno != EINTR) return Status::IOError(std::string("poll: ") + std::strerror(errno));
  if (r <= 0) return Status::Ok();
  char buf[8192];
  ssize_t n = ::recv(serial_fd_, buf, sizeof(buf), 0);
  if (n < 0) {
    if (errno == EINTR || errno == EAGAIN) return Status::Ok();
    return Status::Unavailable(std::string("serial console read: ") + std::strerror(errno));
  }
  if (n == 0) {
    ::close(serial_fd_);
    serial_fd_ = -1;
    return Status::Unavailable("qemu closed the serial console: " + Diagnostics());
  }
  buffer_.append(buf, static_cast<size_t>(n));
  if (buffer_.size() > kMaxBufferedBytes) return Status::Corruption("guest console sent more than 64 MiB");
  return Status::Ok();
}

Result<std::pair<int, std::string>> TestGuest::Run(const std::string& command, std::chrono::seconds timeout) {
  if (command.find_first_of("\r\n") != std::string::npos) {
    return Status::InvalidArgument("guest command must be one line");
  }
  if (command.size() > kMaxCommandBytes) return Status::InvalidArgument("guest command too long");
  if (command.empty()) return Status::InvalidArgument("empty guest command");
  const std::string id = "c" + std::to_string(next_id_++);
  VMR_RETURN_IF_ERROR(SendLine(id + " " + command + "\n"));
  const std::string begin_marker = "@@BEGIN " + id + "\n";
  const std::string end_marker = "\n@@END " + id + " ";
  auto deadline = Clock::now() + timeout;
  for (;;) {
    size_t begin = buffer_.find(begin_marker);
    while (begin != std::string::npos && begin != 0 && buffer_[begin - 1] != '\n') {
      begin = buffer_.find(begin_marker, begin + 1);
    }
    if (begin != std::string::npos) {
      size_t body = begin + begin_marker.size();
      size_t end = buffer_.find(end_marker, body);
      if (end != std::string::npos) {
        size_t code_at = end + end_marker.size();
        size_t eol = buffer_.find('\n', code_at);
        if (eol != std::string::npos) {
          int code = -1;
          auto [ptr, ec] = std::from_chars(buffer_.data() + code_at, buffer_.data() + eol, code);
          if (ec != std::errc() || ptr != buffer_.data() + eol) {
            return Status::Corruption("bad exit code line from the guest: " + buffer_.substr(end, eol - end));
          }
          // The guest always writes one '\n' before @@END: it is not output.
          std::string output = buffer_.substr(body, end - body);
          buffer_.erase(0, eol + 1);
          return std::make_pair(code, std::move(output));
        }
      }
    }
    if (Clock::now() >= deadline) {
      return Status::Timeout("guest command " + id + " did not finish in " + std::to_string(timeout.count()) +
                             " s: " + command);
    }
    // EOF (QEMU ended) comes after every byte it wrote: parsed above.
    VMR_RETURN_IF_ERROR(ReadSome(deadline).WithContext("running '" + command + "'"));
  }
}

bool TestGuest::Exited() {
  if (pid_ <= 0) return true;
  int wstatus = 0;
  pid_t r = ::waitpid(pid_, &wstatus, WNOHANG);
  if (r == pid_ || (r < 0 && errno == ECHILD)) {
    pid_ = -1;
    return true;
  }
  return false;
}

Status TestGuest::Shutdown(std::chrono::seconds timeout) {
  if (Exited()) return Status::Ok();
  auto deadline = Clock::now() + timeout;
  Status sent = SendLine("x" + std::to_string(next_id_++) + " @@POWEROFF\n");
  if (!sent.ok()) {
    Kill();
    return sent;
  }
  for (;;) {
    int wstatus = 0;
    pid_t r = ::waitpid(pid_, &wstatus, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      if (serial_fd_ >= 0) ::close(serial_fd_);
      serial_fd_ = -1;
      if (WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0) return Status::Ok();
      return Status::IOError("qemu ended with wait status " + std::to_string(wstatus) + ": " + Diagnostics());
    }
    if (Clock::now() >= deadline) {
      Kill();
      return Status::Timeout("test guest did not power off in time: " + Diagnostics());
    }
    // Keep the console drained so the guest never blocks writing to it.
    if (serial_fd_ >= 0) {
      ReadSome(std::min(deadline, Clock::now() + std::chrono::milliseconds(50))).IgnoreError();
      if (buffer_.size() > (1u << 20)) buffer_.clear();
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
}

void TestGuest::Kill() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    int wstatus = 0;
    while (::waitpid(pid_, &wstatus, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
  }
  if (serial_fd_ >= 0) ::close(serial_fd_);
  serial_fd_ = -1;
}

std::string TestGuest::Diagnostics() const {
  return "qemu.log: [" + Tail(run_dir_ + "/qemu.log", 1500) + "] serial.log tail: [" +
         Tail(run_dir_ + "/serial.log", 1500) + "]";
}

}  // namespace vmreplica::testing
