#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "vmreplica/qmp.h"

namespace vmreplica {
namespace {

using Clock = std::chrono::steady_clock;

Status ErrnoStatus(const std::string& what, int err) {
  return Status::IOError(what + ": " + std::strerror(err));
}

Status MapQemuError(const std::string& command, const nlohmann::json& error) {
  std::string cls = "?";
  std::string desc;
  if (error.is_object()) {
    auto c = error.find("class");
    if (c != error.end() && c->is_string()) cls = c->get<std::string>();
    auto d = error.find("desc");
    if (d != error.end() && d->is_string()) desc = d->get<std::string>();
  }
  std::string msg = "QMP " + command + ": " + cls + ": " + desc;
  if (cls == "CommandNotFound") return Status::NotSupported(msg);
  if (cls == "DeviceNotFound") return Status::NotFound(msg);
  return Status::FailedPrecondition(msg);
}

}  // namespace

Result<std::unique_ptr<QmpClient>> QmpClient::Connect(const std::string& socket_path,
                                                      QmpClientOptions options) {
  options.max_message_bytes = std::clamp<size_t>(options.max_message_bytes, 4096, size_t{1} << 30);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.empty() || socket_path.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument("QMP socket path empty or too long: " + socket_path);
  }
  std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ErrnoStatus("socket", errno);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int err = errno;
    ::close(fd);
    return Status::Unavailable("connect to QMP socket " + socket_path + ": " + std::strerror(err));
  }
  auto deadline = Clock::now() + options.connect_timeout;
  std::unique_ptr<QmpClient> client(new QmpClient(fd, options));
  VMR_RETURN_IF_ERROR(client->ReadGreeting(deadline));
  client->reader_ = std::thread([c = client.get()] { c->ReaderLoop(); });
  auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  auto caps = client->Execute("qmp_capabilities", nullptr, std::max(remaining, std::chrono::milliseconds(1)));
  if (!caps.ok()) return caps.status().WithContext("QMP capabilities negotiation");
  return client;
}

QmpClient::QmpClient(int fd, QmpClientOptions options) : fd_(fd), options_(options) {}

QmpClient::~QmpClient() {
  ::shutdown(fd_, SHUT_RDWR);
  if (reader_.joinable()) reader_.join();
  Fail(Status::Unavailable("QMP client closed"));
  ::close(fd_);
}

Result<std::string> QmpClient::ReadLineBlocking(Clock::time_point deadline) {
  for (;;) {
    auto nl = read_buffer_.find('\n');
    if (nl != std::string::npos) {
      if (nl > options_.max_message_bytes) {
        return Status::Corruption("QMP message longer than " + std::to_string(options_.max_message_bytes) +
                                  " bytes");
      }
      std::string line = read_buffer_.substr(0, nl);
      read_buffer_.erase(0, nl + 1);
      return line;
    }
    if (read_buffer_.size() > options_.max_message_bytes) {
      return Status::Corruption("QMP message longer than " + std::to_string(options_.max_message_bytes) +
                                " bytes");
    }
    int wait_ms = -1;
    if (deadline != Clock::time_point::max()) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return Status::Timeout("no QMP greeting in time");
      wait_ms = static_cast<int>(left.count());
    }
    pollfd p{fd_, POLLIN, 0};
    int r = ::poll(&p, 1, wait_ms);
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("poll on QMP socket", errno);
    }
    if (r == 0) continue;  // deadline re-checked above
    char buf[65536];
    ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return Status::Unavailable(std::string("QMP socket read: ") + std::strerror(errno));
    }
    if (n == 0) return Status::Unavailable("QMP socket closed by peer");
    read_buffer_.append(buf, static_cast<size_t>(n));
  }
}

Status QmpClient::ReadGreeting(Clock::time_point deadline) {
  VMR_ASSIGN_OR_RETURN(std::string line, ReadLineBlocking(deadline));
  try {
    auto j = nlohmann::json::parse(line);
    const auto& v = j.at("QMP").at("version").at("qemu");
    qemu_major_ = v.at("major").get<int>();
    qemu_minor_ = v.at("minor").get<int>();
    int micro = v.at("micro").get<int>();
    qemu_version_ =
        std::to_string(qemu_major_) + "." + std::to_string(qemu_minor_) + "." + std::to_string(micro);
  } catch (const nlohmann::json::exception& e) {
    return Status::Corruption(std::string("malformed QMP greeting: ") + e.what());
  }
  return Status::Ok();
}

void QmpClient::ReaderLoop() {
  for (;;) {
    auto line = ReadLineBlocking(Clock::time_point::max());
    if (!line.ok()) {
      Fail(line.status());
      return;
    }
    std::string l = std::move(line).value();
    if (!l.empty() && l.back() == '\r') l.pop_back();
    if (l.empty()) continue;
    HandleMessage(l);
    if (!status().ok()) {
      ::shutdown(fd_, SHUT_RDWR);
      return;
    }
  }
}

void QmpClient::HandleMessage(const std::string& line) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(line);
  } catch (const nlohmann::json::exception& e) {
    Fail(Status::Corruption(std::string("malformed JSON from QMP: ") + e.what()));
    return;
  }
  if (!j.is_object()) {
    Fail(Status::Corruption("QMP message is not a JSON object"));
    return;
  }
  try {
    if (j.contains("event")) {
      QmpEvent ev;
      ev.name = j.at("event").get<std::string>();
      if (j.contains("data")) ev.data = j["data"];
      if (j.contains("timestamp")) {
        const auto& ts = j["timestamp"];
        ev.timestamp_us = ts.value("seconds", int64_t{0}) * 1000000 + ts.value("microseconds", int64_t{0});
      }
      EventCallback cb;
      {
        std::lock_guard<std::mutex> lock(mu_);
        cb = callback_;
      }
      if (cb) cb(ev);
      std::lock_guard<std::mutex> lock(mu_);
      events_.push_back(std::move(ev));
      while (events_.size() > options_.max_queued_events) events_.pop_front();
      cv_.notify_all();
      return;
    }
    if (!j.contains("id") || !j["id"].is_number_unsigned()) {
      spdlog::warn("QMP: message without a known id ignored");
      return;
    }
    uint64_t id = j["id"].get<uint64_t>();
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pending_.find(id);
    if (it == pending_.end()) return;  // a reply after its caller gave up
    auto& p = *it->second;
    p.done = true;
    if (j.contains("return")) {
      p.value = j["return"];
    } else if (j.contains("error")) {
      p.qemu_error = true;  // mapped by Execute, which knows the command name
      p.value = j["error"];
    } else {
      p.status = Status::Corruption("QMP reply without return or error");
    }
    pending_.erase(it);
    cv_.notify_all();
  } catch (const nlohmann::json::exception& e) {
    Fail(Status::Corruption(std::string("unexpected QMP message shape: ") + e.what()));
  }
}

void QmpClient::Fail(Status status) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!dead_.ok()) return;
  dead_ = std::move(status);
  for (auto& [id, p] : pending_) {
    p->done = true;
    p->status = dead_;
  }
  pending_.clear();
  cv_.notify_all();
}

Status QmpClient::status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return dead_;
}

Status QmpClient::SendAll(const std::string& bytes) {
  std::lock_guard<std::mutex> lock(write_mu_);
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::send(fd_, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::Unavailable(std::string("QMP socket write: ") + std::strerror(errno));
    }
    off += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Result<nlohmann::json> QmpClient::Execute(const std::string& command, const nlohmann::json& arguments,
                                          std::chrono::milliseconds timeout) {
  if (!arguments.is_null() && !arguments.is_object()) {
    return Status::InvalidArgument("QMP " + command + ": arguments must be an object");
  }
  auto pending = std::make_shared<Pending>();
  uint64_t id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!dead_.ok()) return dead_;
    id = next_id_++;
    pending_[id] = pending;
  }
  nlohmann::json msg = {{"execute", command}, {"id", id}};
  if (!arguments.is_null()) msg["arguments"] = arguments;
  std::string bytes;
  try {
    bytes = msg.dump() + "\n";
  } catch (const nlohmann::json::exception& e) {  // invalid UTF-8 in a string
    std::lock_guard<std::mutex> lock(mu_);
    pending_.erase(id);
    return Status::InvalidArgument("QMP " + command + ": " + e.what());
  }
  Status sent = SendAll(bytes);
  if (!sent.ok()) {
    Fail(sent);
    return sent;
  }
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return pending->done; })) {
    pending_.erase(id);
    return Status::Timeout("QMP " + command + ": no reply within " + std::to_string(timeout.count()) + " ms");
  }
  if (pending->qemu_error) return MapQemuError(command, pending->value);
  if (!pending->status.ok()) return pending->status.WithContext("QMP " + command);
  return std::move(pending->value);
}

void QmpClient::SetEventCallback(EventCallback callback) {
  std::lock_guard<std::mutex> lock(mu_);
  callback_ = std::move(callback);
}

Result<QmpEvent> QmpClient::WaitForEvent(const std::function<bool(const QmpEvent&)>& predicate,
                                         std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    for (auto it = events_.begin(); it != events_.end(); ++it) {
      if (predicate(*it)) {
        QmpEvent ev = std::move(*it);
        events_.erase(it);
        return ev;
      }
    }
    if (!dead_.ok()) return dead_;
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) {
      // One last scan happens on the next loop only if something changed;
      // a timeout with nothing new ends the wait.
      bool any = std::any_of(events_.begin(), events_.end(), predicate);
      if (!any) return Status::Timeout("no matching QMP event in time");
    }
  }
}

void QmpClient::ClearEvents() {
  std::lock_guard<std::mutex> lock(mu_);
  events_.clear();
}

}  // namespace vmreplica
