#include "vmreplica/nbd_server.h"

#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "nbdserver/export_table.h"
#include "nbdserver/session.h"

namespace vmreplica {

struct NbdServer::Connection {
  int fd = -1;
  uint64_t id = 0;
  std::thread thread;
  std::atomic<bool> done{false};
};

namespace {

Status Errno(const std::string& what, int err) {
  return Status::IOError(what + ": " + std::strerror(err));
}

// Sends all of `data`; false when the peer is gone or the socket was shut down.
bool SendAll(int fd, std::string* data) {
  size_t sent = 0;
  while (sent < data->size()) {
    ssize_t n = ::send(fd, data->data() + sent, data->size() - sent, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    sent += static_cast<size_t>(n);
  }
  data->clear();
  return true;
}

}  // namespace

NbdServer::NbdServer(NbdServerOptions options)
    : options_(std::move(options)), exports_(std::make_unique<nbd::ExportTable>()) {}

NbdServer::~NbdServer() { Stop(); }

Status NbdServer::AddExport(const std::string& name, const std::string& description,
                            std::shared_ptr<ExportSource> source) {
  VMR_RETURN_IF_ERROR(exports_->Add({name, description, std::move(source)}));
  spdlog::info("nbd export {} added", name);
  return Status::Ok();
}

Status NbdServer::RemoveExport(const std::string& name) {
  VMR_RETURN_IF_ERROR(exports_->Remove(name));
  spdlog::info("nbd export {} removed", name);
  return Status::Ok();
}

Status NbdServer::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_) return Status::FailedPrecondition("NBD server already started");
  if (options_.max_connections < 1 || options_.max_connections > 4096) {
    return Status::InvalidArgument("max_connections out of 1..4096");
  }
  if (options_.handshake_timeout_ms < 1 || options_.handshake_timeout_ms > 3600000) {
    return Status::InvalidArgument("handshake_timeout_ms out of 1..3600000");
  }
  const std::string& path = options_.socket_path;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument("bad unix socket path: " + path);
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);

  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status::AlreadyExists(path + " exists and is not a socket");
    }
    ::unlink(path.c_str());  // stale socket of an earlier run
  }
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Errno("socket", errno);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int err = errno;
    ::close(fd);
    return Errno("bind " + path, err);
  }
  // Before listen(): nobody can connect while the mode is still wider.
  if (::chmod(path.c_str(), 0600) != 0 || ::listen(fd, 128) != 0) {
    int err = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return Errno("chmod/listen " + path, err);
  }
  int wake = ::eventfd(0, EFD_CLOEXEC);
  if (wake < 0) {
    int err = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return Errno("eventfd", err);
  }
  listen_fd_ = fd;
  wake_fd_ = wake;
  stopping_ = false;
  started_ = true;
  accept_thread_ = std::thread([this] { AcceptLoop(); });
  spdlog::info("nbd server listening on {}", path);
  return Status::Ok();
}

void NbdServer::Stop() {
  std::thread accept_thread;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!started_) return;
    stopping_ = true;
    uint64_t one = 1;
    if (::write(wake_fd_, &one, sizeof(one)) < 0) {
      spdlog::warn("nbd server: eventfd write failed: {}", std::strerror(errno));
    }
    accept_thread = std::move(accept_thread_);
  }
  if (accept_thread.joinable()) accept_thread.join();

  std::vector<std::unique_ptr<Connection>> conns;
  {
    std::lock_guard<std::mutex> lock(mu_);
    conns.swap(conns_);
    for (auto& c : conns) ::shutdown(c->fd, SHUT_RDWR);
  }
  for (auto& c : conns) {
    if (c->thread.joinable()) c->thread.join();
    ::close(c->fd);
  }
  std::lock_guard<std::mutex> lock(mu_);
  ::close(listen_fd_);
  ::close(wake_fd_);
  listen_fd_ = wake_fd_ = -1;
  ::unlink(options_.socket_path.c_str());
  started_ = false;
  spdlog::info("nbd server on {} stopped", options_.socket_path);
}

int NbdServer::active_connections() const {
  std::lock_guard<std::mutex> lock(mu_);
  int n = 0;
  for (const auto& c : conns_) n += c->done ? 0 : 1;
  return n;
}

void NbdServer::ReapFinished() {
  for (auto it = conns_.begin(); it != conns_.end();) {
    if ((*it)->done) {
      (*it)->thread.join();
      ::close((*it)->fd);
      it = conns_.erase(it);
    } else {
      ++it;
    }
  }
}

void NbdServer::AcceptLoop() {
  int listen_fd, wake_fd;
  {
    std::lock_guard<std::mutex> lock(mu_);
    listen_fd = listen_fd_;
    wake_fd = wake_fd_;
  }
  uint64_t next_id = 1;
  while (!stopping_) {
    pollfd fds[2] = {{listen_fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
    int r = ::poll(fds, 2, -1);
    if (r < 0) {
      if (errno == EINTR) continue;
      spdlog::error("nbd server: poll failed: {}", std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0 || stopping_) return;
    if ((fds[0].revents & POLLIN) == 0) continue;
    int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno != EINTR && errno != ECONNABORTED && errno != EAGAIN) {
        spdlog::warn("nbd server: accept failed: {}", std::strerror(errno));
        ::poll(nullptr, 0, 100);  // e.g. EMFILE: do not spin
      }
      continue;
    }
    std::lock_guard<std::mutex> lock(mu_);
    ++accepted_;
    ReapFinished();
    if (stopping_ || static_cast<int>(conns_.size()) >= options_.max_connections) {
      spdlog::warn("nbd server: connection refused ({} connections)", conns_.size());
      ::close(fd);
      continue;
    }
    auto conn = std::make_unique<Connection>();
    conn->fd = fd;
    conn->id = next_id++;
    Connection* raw = conn.get();
    conns_.push_back(std::move(conn));
    raw->thread = std::thread([this, raw] { ServeConnection(raw); });
  }
}

void NbdServer::ServeConnection(Connection* conn) {
  spdlog::info("nbd connection {} opened", conn->id);
  nbd::Session session(exports_.get());
  std::string buf(64 * 1024, '\0');
  std::string reason = "client closed the connection";
  const auto handshake_deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.handshake_timeout_ms);
  while (true) {
    while (session.Step()) {
      if (!SendAll(conn->fd, session.output())) break;
    }
    if (!SendAll(conn->fd, session.output())) {
      reason = "send failed";
      break;
    }
    if (session.closed()) {
      reason = session.close_reason();
      break;
    }
    if (session.phase() != nbd::Session::Phase::kTransmission) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                      handshake_deadline - std::chrono::steady_clock::now())
                      .count();
      pollfd pfd{conn->fd, POLLIN, 0};
      int r = left > 0 ? ::poll(&pfd, 1, static_cast<int>(left)) : 0;
      if (r < 0 && errno == EINTR) continue;
      if (r == 0) {
        reason = "negotiation not finished in time";
        break;
      }
    }
    ssize_t n = ::recv(conn->fd, buf.data(), buf.size(), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (stopping_) reason = "server stopping";
      break;
    }
    session.Feed(buf.data(), static_cast<size_t>(n));
  }
  spdlog::info("nbd connection {} closed (export '{}'): {}", conn->id, session.export_name(),
               reason);
  // The peer sees EOF now; the fd itself is closed by whoever joins this
  // thread, so Stop() never shuts down a reused descriptor.
  ::shutdown(conn->fd, SHUT_RDWR);
  conn->done = true;
}

}  // namespace vmreplica
