// Helpers shared by the nbdserver tests: temp dirs, sparse files, a raw
// unix socket client and NBD message builders.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "nbdserver/protocol.h"

namespace vmreplica::nbd::testing {

inline std::string U16(uint16_t v) {
  std::string s;
  PutU16(&s, v);
  return s;
}
inline std::string U32(uint32_t v) {
  std::string s;
  PutU32(&s, v);
  return s;
}
inline std::string U64(uint64_t v) {
  std::string s;
  PutU64(&s, v);
  return s;
}

inline std::string Option(uint32_t option, const std::string& data) {
  return U64(kOptionMagic) + U32(option) + U32(static_cast<uint32_t>(data.size())) + data;
}
// NBD_OPT_GO / INFO payload: name and information requests.
inline std::string GoData(const std::string& name, std::vector<uint16_t> infos = {}) {
  std::string d =
      U32(static_cast<uint32_t>(name.size())) + name + U16(static_cast<uint16_t>(infos.size()));
  for (uint16_t i : infos) d += U16(i);
  return d;
}
inline std::string MetaData(const std::string& name, const std::vector<std::string>& queries) {
  std::string d =
      U32(static_cast<uint32_t>(name.size())) + name + U32(static_cast<uint32_t>(queries.size()));
  for (const auto& q : queries) d += U32(static_cast<uint32_t>(q.size())) + q;
  return d;
}
inline std::string Request(uint16_t flags, uint16_t type, uint64_t cookie, uint64_t offset,
                           uint32_t length) {
  return U32(kRequestMagic) + U16(flags) + U16(type) + U64(cookie) + U64(offset) + U32(length);
}

// A private temporary directory, removed with its contents.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "nbdtest.XXXXXX").string();
    char* p = ::mkdtemp(tmpl.data());
    path_ = p ? p : "";
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string Join(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Writes a sparse file of `size` bytes with random data in `regions`
// (offset, length) and holes elsewhere; returns its full contents.
inline std::string MakeSparseFile(const std::string& path, uint64_t size,
                                  const std::vector<std::pair<uint64_t, uint64_t>>& regions,
                                  uint32_t seed = 1) {
  std::string content(size, '\0');
  std::mt19937 rng(seed);
  int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
  if (fd < 0) return {};
  for (auto [off, len] : regions) {
    for (uint64_t i = 0; i < len; ++i) content[off + i] = static_cast<char>(rng() | 1);
    if (::pwrite(fd, content.data() + off, len, static_cast<off_t>(off)) !=
        static_cast<ssize_t>(len)) {
      ::close(fd);
      return {};
    }
  }
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) content.clear();
  ::close(fd);
  return content;
}

// A blocking unix socket client speaking raw bytes.
class RawClient {
 public:
  explicit RawClient(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ::close(fd_);
      fd_ = -1;
    }
  }
  ~RawClient() { Close(); }
  bool connected() const { return fd_ >= 0; }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  bool Send(const std::string& bytes) {
    size_t sent = 0;
    while (sent < bytes.size()) {
      ssize_t n = ::send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) return false;
      sent += static_cast<size_t>(n);
    }
    return true;
  }
  // Reads exactly n bytes; "" with *eof set when the server closed first.
  std::string Read(size_t n, bool* eof = nullptr, int timeout_ms = 5000) {
    std::string out;
    if (eof) *eof = false;
    while (out.size() < n) {
      pollfd pfd{fd_, POLLIN, 0};
      if (::poll(&pfd, 1, timeout_ms) <= 0) return {};
      char buf[65536];
      ssize_t r = ::recv(fd_, buf, std::min(sizeof(buf), n - out.size()), 0);
      if (r <= 0) {
        if (eof) *eof = true;
        return {};
      }
      out.append(buf, static_cast<size_t>(r));
    }
    return out;
  }
  // True when the server closes the connection within the timeout (any
  // bytes before that are dropped).
  bool WaitClosed(int timeout_ms = 5000) {
    while (true) {
      pollfd pfd{fd_, POLLIN, 0};
      if (::poll(&pfd, 1, timeout_ms) <= 0) return false;
      char buf[4096];
      ssize_t r = ::recv(fd_, buf, sizeof(buf), 0);
      if (r <= 0) return true;
    }
  }

 private:
  int fd_ = -1;
};

}  // namespace vmreplica::nbd::testing
