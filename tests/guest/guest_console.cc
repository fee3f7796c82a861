#include "guest/guest_console.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <thread>

namespace vmreplica::testing {
namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kMaxCommandBytes = 3500;  // the guest tty reads lines of < 4096 bytes
constexpr size_t kMaxBufferedBytes = 64u << 20;

}  // namespace

std::string GuestKernelAppend(int disks) { return "console=ttyS0 panic=-1 quiet vmr.disks=" + std::to_string(disks); }

GuestConsole::~GuestConsole() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::unique_ptr<GuestConsole>> GuestConsole::Connect(const std::string& serial_socket,
                                                            std::chrono::seconds timeout) {
  sockaddr_un addr{};
  if (serial_socket.empty() || serial_socket.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument("bad serial socket path: " + serial_socket);
  }
  const auto deadline = Clock::now() + timeout;
  int fd = -1;
  for (;;) {
    fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return Status::IOError(std::string("socket: ") + std::strerror(errno));
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, serial_socket.c_str(), serial_socket.size() + 1);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) break;
    ::close(fd);
    if (Clock::now() >= deadline) return Status::Timeout("serial socket " + serial_socket + " never accepted");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::unique_ptr<GuestConsole> c(new GuestConsole(fd));
  // Input sent before /init reads the console may be dropped: probe every
  // second until one probe is answered.
  auto next_probe = Clock::now();
  for (;;) {
    if (Clock::now() >= next_probe) {
      VMR_RETURN_IF_ERROR(c->SendLine("p" + std::to_string(c->next_id_++) + " true\n"));
      next_probe = Clock::now() + std::chrono::seconds(1);
    }
    size_t at = c->buffer_.find("\n@@END p");
    if (at != std::string::npos) {
      size_t eol = c->buffer_.find('\n', at + 1);
      if (eol != std::string::npos) {
        c->buffer_.erase(0, eol + 1);
        return c;
      }
    }
    if (Clock::now() >= deadline) return Status::Timeout("test guest did not answer on " + serial_socket);
    VMR_RETURN_IF_ERROR(c->ReadSome(std::min(next_probe, deadline)));
  }
}

Status GuestConsole::SendLine(const std::string& line) {
  if (fd_ < 0) return Status::Unavailable("console closed");
  size_t off = 0;
  while (off < line.size()) {
    ssize_t n = ::send(fd_, line.data() + off, line.size() - off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::Unavailable(std::string("serial console write: ") + std::strerror(errno));
    }
    off += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status GuestConsole::ReadSome(Clock::time_point until) {
  if (fd_ < 0) return Status::Unavailable("console closed");
  auto now = Clock::now();
  int wait_ms = until > now
                    ? static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(until - now).count()) + 1
                    : 0;
  pollfd p{fd_, POLLIN, 0};
  int r = ::poll(&p, 1, wait_ms);
  if (r < 0 && errno != EINTR) return Status::IOError(std::string("poll: ") + std::strerror(errno));
  if (r <= 0) return Status::Ok();
  char buf[8192];
  ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
  if (n < 0) {
    if (errno == EINTR || errno == EAGAIN) return Status::Ok();
    return Status::Unavailable(std::string("serial console read: ") + std::strerror(errno));
  }
  if (n == 0) {
    ::close(fd_);
    fd_ = -1;
    return Status::Unavailable("qemu closed the serial console");
  }
  buffer_.append(buf, static_cast<size_t>(n));
  if (buffer_.size() > kMaxBufferedBytes) return Status::Corruption("guest console sent more than 64 MiB");
  return Status::Ok();
}

Result<std::pair<int, std::string>> GuestConsole::Run(const std::string& command, std::chrono::seconds timeout) {
  if (command.find_first_of("\r\n") != std::string::npos) {
    return Status::InvalidArgument("guest command must be one line");
  }
  if (command.empty() || command.size() > kMaxCommandBytes) return Status::InvalidArgument("bad guest command size");
  const std::string id = "c" + std::to_string(next_id_++);
  VMR_RETURN_IF_ERROR(SendLine(id + " " + command + "\n"));
  const std::string begin_marker = "@@BEGIN " + id + "\n";
  const std::string end_marker = "\n@@END " + id + " ";
  const auto deadline = Clock::now() + timeout;
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
    VMR_RETURN_IF_ERROR(ReadSome(deadline));
  }
}

Status GuestConsole::PowerOff() { return SendLine("x" + std::to_string(next_id_++) + " @@POWEROFF\n"); }

}  // namespace vmreplica::testing
