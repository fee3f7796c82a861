#include <fcntl.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>

#include "vmreplica/fileutil.h"
#include "vmreplica/qmp.h"

namespace vmreplica {
namespace {

using Clock = std::chrono::steady_clock;

bool ValidDiskName(const std::string& name) {
  static const std::regex re("[A-Za-z][A-Za-z0-9_]{0,25}");
  return std::regex_match(name, re);
}

// QEMU's command line splits options at commas; a comma in a value is
// written twice.
std::string EscapeCommas(const std::string& s) {
  std::string out;
  for (char c : s) {
    out += c;
    if (c == ',') out += ',';
  }
  return out;
}

}  // namespace

QsdProcess::QsdProcess(QsdOptions options) : options_(std::move(options)) {}

QsdProcess::~QsdProcess() { Kill().IgnoreError(); }

Status QsdProcess::Start() {
  if (running()) return Status::FailedPrecondition("qemu-storage-daemon already running");
  if (options_.run_dir.empty()) return Status::InvalidArgument("QsdOptions.run_dir is empty");
  if (qmp_socket().size() > 100 || nbd_socket().size() > 100) {
    return Status::InvalidArgument("run_dir too long for unix socket paths: " + options_.run_dir);
  }
  std::vector<std::string> args = {options_.binary};
  for (const auto& d : options_.disks) {
    if (!ValidDiskName(d.name)) return Status::InvalidArgument("bad disk name: " + d.name);
    if (d.format != "qcow2" && d.format != "raw") {
      return Status::InvalidArgument("disk " + d.name + ": format must be qcow2 or raw");
    }
    args.push_back("--blockdev");
    args.push_back("driver=file,node-name=" + FileNodeName(d.name) + ",filename=" + EscapeCommas(d.path));
    args.push_back("--blockdev");
    args.push_back("driver=" + d.format + ",node-name=" + FormatNodeName(d.name) +
                   ",file=" + FileNodeName(d.name));
  }
  ::unlink(qmp_socket().c_str());
  ::unlink(nbd_socket().c_str());
  if (options_.nbd_server) {
    args.push_back("--nbd-server");
    args.push_back("addr.type=unix,addr.path=" + EscapeCommas(nbd_socket()));
  }
  for (const auto& d : options_.disks) {
    if (!d.export_writable) continue;
    if (!options_.nbd_server) return Status::InvalidArgument("export_writable needs nbd_server");
    args.push_back("--export");
    args.push_back("type=nbd,id=" + d.name + "-exp,node-name=" + FormatNodeName(d.name) + ",name=" + d.name +
                   ",writable=on");
  }
  args.push_back("--chardev");
  args.push_back("socket,path=" + EscapeCommas(qmp_socket()) + ",server=on,wait=off,id=vmrqmp");
  args.push_back("--monitor");
  args.push_back("chardev=vmrqmp");

  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int log_fd = ::open(log_path().c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) return Status::IOError("open " + log_path() + ": " + std::strerror(errno));
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    int err = errno;
    ::close(log_fd);
    return Status::IOError(std::string("fork: ") + std::strerror(err));
  }
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec.
    ResetSignalsForExec();
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, 0);
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
    ::setpgid(0, 0);  // terminal signals meant for the test runner do not reach it
    ::execvp(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(log_fd);
  pid_ = pid;
  spdlog::info("qemu-storage-daemon started, pid {}, run dir {}", pid_, options_.run_dir);

  auto deadline = Clock::now() + options_.start_timeout;
  Status last = Status::Timeout("no QMP greeting");
  while (Clock::now() < deadline) {
    int wstatus = 0;
    pid_t r = ::waitpid(pid_, &wstatus, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      return Status::IOError("qemu-storage-daemon exited during start: " + LogTail());
    }
    QmpClientOptions qo;
    qo.connect_timeout = std::chrono::milliseconds(2000);
    auto client = QmpClient::Connect(qmp_socket(), qo);
    if (client.ok()) return Status::Ok();  // the client disconnects here; the monitor accepts the next one
    last = client.status();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  Kill().IgnoreError();
  return Status::Timeout("qemu-storage-daemon did not answer on QMP (" + last.ToString() + "): " + LogTail());
}

Status QsdProcess::Reap(std::chrono::milliseconds wait) {
  auto deadline = Clock::now() + wait;
  for (;;) {
    int wstatus = 0;
    pid_t r = ::waitpid(pid_, &wstatus, WNOHANG);
    if (r == pid_ || (r < 0 && errno == ECHILD)) {
      pid_ = -1;
      return Status::Ok();
    }
    if (Clock::now() >= deadline) return Status::Timeout("process did not exit");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

Status QsdProcess::Stop(std::chrono::milliseconds grace) {
  if (!running()) return Status::Ok();
  ::kill(pid_, SIGTERM);
  if (Reap(grace).ok()) return Status::Ok();
  spdlog::warn("qemu-storage-daemon pid {} ignored SIGTERM; killing", pid_);
  return Kill();
}

Status QsdProcess::Kill() {
  if (!running()) return Status::Ok();
  ::kill(pid_, SIGKILL);
  int wstatus = 0;
  while (::waitpid(pid_, &wstatus, 0) < 0 && errno == EINTR) {
  }
  pid_ = -1;
  return Status::Ok();
}

std::string QsdProcess::LogTail() const {
  std::ifstream in(log_path());
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  if (s.size() > 2000) s = s.substr(s.size() - 2000);
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  return s.empty() ? "(empty log)" : s;
}

}  // namespace vmreplica
