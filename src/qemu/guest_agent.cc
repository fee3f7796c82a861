#include "vmreplica/guest_agent.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <random>
#include <thread>

namespace vmreplica {
namespace {

constexpr size_t kMaxReplyBytes = 1u << 20;

int MsLeft(std::chrono::steady_clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
  return left.count() <= 0 ? 0 : static_cast<int>(std::min<int64_t>(left.count(), 1 << 30));
}

Status ErrorFromAgent(const std::string& command, const nlohmann::json& error) {
  std::string cls = "?";
  std::string desc;
  if (error.is_object()) {
    if (error.contains("class") && error["class"].is_string()) cls = error["class"].get<std::string>();
    if (error.contains("desc") && error["desc"].is_string()) desc = error["desc"].get<std::string>();
  }
  std::string message = "qga " + command + ": " + cls + ": " + desc;
  if (cls == "CommandNotFound") return Status::NotSupported(message);
  return Status::FailedPrecondition(message);
}

}  // namespace

GuestAgentClient::GuestAgentClient(int fd) : fd_(fd) {}

GuestAgentClient::~GuestAgentClient() { ::close(fd_); }

Result<std::unique_ptr<GuestAgentClient>> GuestAgentClient::Connect(const std::string& socket,
                                                                    std::chrono::milliseconds timeout) {
  sockaddr_un addr{};
  if (socket.empty() || socket.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument("bad guest agent socket path: '" + socket + "'");
  }
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, socket.c_str(), socket.size() + 1);
  auto deadline = Clock::now() + timeout;
  for (;;) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return Status::IOError(std::string("socket: ") + std::strerror(errno));
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      return std::unique_ptr<GuestAgentClient>(new GuestAgentClient(fd));
    }
    int err = errno;
    ::close(fd);
    if (Clock::now() >= deadline) {
      return Status::Unavailable("guest agent socket " + socket + ": " + std::strerror(err));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Status GuestAgentClient::Send(const std::string& bytes, Clock::time_point deadline) {
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::send(fd_, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) {
      off += static_cast<size_t>(n);
      continue;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      return Status::Unavailable(std::string("guest agent write: ") + std::strerror(errno));
    }
    pollfd p{fd_, POLLOUT, 0};
    int r = ::poll(&p, 1, MsLeft(deadline));
    if (r == 0) return Status::Unavailable("guest agent did not take the request in time");
    if (r < 0 && errno != EINTR) return Status::IOError(std::string("poll: ") + std::strerror(errno));
  }
  return Status::Ok();
}

Status GuestAgentClient::Fill(Clock::time_point deadline) {
  for (;;) {
    pollfd p{fd_, POLLIN, 0};
    int r = ::poll(&p, 1, MsLeft(deadline));
    if (r < 0) {
      if (errno == EINTR) continue;
      return Status::IOError(std::string("poll: ") + std::strerror(errno));
    }
    if (r == 0) return Status::Unavailable("guest agent did not answer in time");
    char buf[4096];
    ssize_t n = ::recv(fd_, buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      return Status::Unavailable(std::string("guest agent read: ") + std::strerror(errno));
    }
    if (n == 0) return Status::Unavailable("guest agent socket closed");
    buffer_.append(buf, static_cast<size_t>(n));
    return Status::Ok();
  }
}

Result<std::string> GuestAgentClient::ReadLine(Clock::time_point deadline) {
  for (;;) {
    size_t eol = buffer_.find('\n');
    if (eol != std::string::npos) {
      std::string line = buffer_.substr(0, eol);
      buffer_.erase(0, eol + 1);
      return line;
    }
    if (buffer_.size() > kMaxReplyBytes) return Status::Corruption("guest agent reply longer than 1 MiB");
    VMR_RETURN_IF_ERROR(Fill(deadline));
  }
}

Status GuestAgentClient::Sync(Clock::time_point deadline) {
  synced_ = false;
  static thread_local std::mt19937 rng{std::random_device{}()};
  const int64_t id = std::uniform_int_distribution<int64_t>(1, (int64_t{1} << 31) - 1)(rng);
  nlohmann::json request = {{"execute", "guest-sync-delimited"}, {"arguments", {{"id", id}}}};
  // 0xFF first: the agent drops any half-parsed request it holds.
  VMR_RETURN_IF_ERROR(Send(std::string(1, '\xff') + request.dump() + "\n", deadline));
  for (;;) {
    // Skip everything up to the agent's 0xFF delimiter.
    size_t ff = buffer_.find('\xff');
    while (ff == std::string::npos) {
      buffer_.clear();
      VMR_RETURN_IF_ERROR(Fill(deadline));
      ff = buffer_.find('\xff');
    }
    buffer_.erase(0, ff + 1);
    VMR_ASSIGN_OR_RETURN(std::string line, ReadLine(deadline));
    if (line.find('\xff') != std::string::npos) {
      // Another delimiter before the end of the line: a stale partial reply.
      buffer_.insert(0, line.substr(line.rfind('\xff')) + "\n");
      continue;
    }
    nlohmann::json reply = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (reply.is_discarded() || !reply.is_object()) continue;  // stale garbage before our reply
    if (reply.contains("return") && reply["return"].is_number_integer() && reply["return"].get<int64_t>() == id) {
      synced_ = true;
      return Status::Ok();
    }
    // A reply to an earlier sync (older id): keep looking.
  }
}

Result<nlohmann::json> GuestAgentClient::Execute(const std::string& command, const nlohmann::json& arguments,
                                                 std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  if (!synced_) VMR_RETURN_IF_ERROR(Sync(deadline).WithContext("qga sync"));
  nlohmann::json request = {{"execute", command}};
  if (!arguments.is_null()) request["arguments"] = arguments;
  // Until the reply is read the channel is in an unknown state.
  synced_ = false;
  VMR_RETURN_IF_ERROR(Send(request.dump() + "\n", deadline).WithContext("qga " + command));
  for (;;) {
    VMR_ASSIGN_OR_RETURN(std::string line, ReadLine(deadline));
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json reply = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (reply.is_discarded() || !reply.is_object()) {
      return Status::Corruption("qga " + command + ": malformed reply: " + line.substr(0, 200));
    }
    if (reply.contains("return")) {
      synced_ = true;
      return reply["return"];
    }
    if (reply.contains("error")) {
      synced_ = true;
      return ErrorFromAgent(command, reply["error"]);
    }
    return Status::Corruption("qga " + command + ": reply without return or error: " + line.substr(0, 200));
  }
}

Status GuestAgentClient::Ping(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  VMR_RETURN_IF_ERROR(Sync(deadline).WithContext("qga sync"));
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  VMR_ASSIGN_OR_RETURN(nlohmann::json r, Execute("guest-ping", nullptr, std::max(left, std::chrono::milliseconds(1))));
  (void)r;
  return Status::Ok();
}

Result<int> GuestAgentClient::FreezeFileSystems(std::chrono::milliseconds timeout) {
  VMR_ASSIGN_OR_RETURN(nlohmann::json r, Execute("guest-fsfreeze-freeze", nullptr, timeout));
  if (!r.is_number_integer() || r.get<int64_t>() < 0 || r.get<int64_t>() > 1000000) {
    return Status::Corruption("qga guest-fsfreeze-freeze: return is not a file system count: " + r.dump());
  }
  return static_cast<int>(r.get<int64_t>());
}

Result<int> GuestAgentClient::ThawFileSystems(std::chrono::milliseconds timeout) {
  VMR_ASSIGN_OR_RETURN(nlohmann::json r, Execute("guest-fsfreeze-thaw", nullptr, timeout));
  if (!r.is_number_integer() || r.get<int64_t>() < 0 || r.get<int64_t>() > 1000000) {
    return Status::Corruption("qga guest-fsfreeze-thaw: return is not a file system count: " + r.dump());
  }
  return static_cast<int>(r.get<int64_t>());
}

Result<std::string> GuestAgentClient::FreezeStatus(std::chrono::milliseconds timeout) {
  VMR_ASSIGN_OR_RETURN(nlohmann::json r, Execute("guest-fsfreeze-status", nullptr, timeout));
  if (!r.is_string()) return Status::Corruption("qga guest-fsfreeze-status: return is not a string");
  std::string s = r.get<std::string>();
  if (s != "thawed" && s != "frozen") return Status::Corruption("qga guest-fsfreeze-status: unknown state " + s);
  return s;
}

}  // namespace vmreplica
