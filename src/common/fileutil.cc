#include "vmreplica/fileutil.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <vector>

namespace vmreplica {
namespace {

Status Errno(const std::string& what, const std::string& path) {
  return Status::IOError(what + " " + path + ": " + std::strerror(errno));
}

Status ErrnoAt(const std::string& what, uint64_t offset) {
  return Status::IOError(what + " at " + std::to_string(offset) + ": " + std::strerror(errno));
}

constexpr uint64_t kCopyPiece = 64ull << 20;

Status PwriteAll(int fd, const char* p, size_t n, uint64_t offset) {
  for (size_t done = 0; done < n;) {
    const ssize_t w = ::pwrite(fd, p + done, n - done, static_cast<off_t>(offset + done));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return ErrnoAt("write", offset + done);
    done += static_cast<size_t>(w);
  }
  return Status::Ok();
}

// [offset, offset+len) of dst reads as zeros: a hole when the file system
// can punch one, written zeros otherwise.
Status ZeroRange(int dst_fd, uint64_t offset, uint64_t len) {
  if (len == 0) return Status::Ok();
  if (::fallocate(dst_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(len)) == 0) {
    return Status::Ok();
  }
  if (errno != EOPNOTSUPP && errno != ENOSYS) return ErrnoAt("punch hole", offset);
  static const std::vector<char> zeros(1u << 20, 0);
  for (uint64_t done = 0; done < len;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(zeros.size(), len - done));
    VMR_RETURN_IF_ERROR(PwriteAll(dst_fd, zeros.data(), n, offset + done));
    done += n;
  }
  return Status::Ok();
}

// Next data extent at or after pos: [data, hole), or data == size when
// none. Without SEEK_DATA (a block device, an old file system) everything
// from pos is data.
Status NextExtent(int fd, uint64_t pos, uint64_t size, uint64_t* data, uint64_t* hole) {
  const off_t d = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
  if (d < 0) {
    if (errno == ENXIO) {
      *data = *hole = size;
      return Status::Ok();
    }
    if (errno == EINVAL || errno == EOPNOTSUPP) {
      *data = pos;
      *hole = size;
      return Status::Ok();
    }
    return ErrnoAt("seek data", pos);
  }
  *data = std::min<uint64_t>(static_cast<uint64_t>(d), size);
  if (*data >= size) {
    *data = *hole = size;
    return Status::Ok();
  }
  const off_t h = ::lseek(fd, d, SEEK_HOLE);
  if (h < 0) return ErrnoAt("seek hole", *data);
  *hole = std::min<uint64_t>(static_cast<uint64_t>(h), size);
  if (*hole <= *data) *hole = size;  // a file that shrank meanwhile: read errors will tell
  return Status::Ok();
}

}  // namespace

bool IsAllZero(const void* data, size_t n) {
  // Compared in words through memcpy (no alignment needed).
  const auto* p = static_cast<const unsigned char*>(data);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    if (w != 0) return false;
  }
  for (; i < n; ++i)
    if (p[i] != 0) return false;
  return true;
}

Status CopyFileSparse(int src_fd, int dst_fd, uint64_t size, SparseCopyStats* stats,
                      const std::function<void(uint64_t, uint64_t)>& progress,
                      const std::function<bool()>& cancelled) {
  SparseCopyStats local;
  SparseCopyStats& st = stats != nullptr ? *stats : local;
  st = SparseCopyStats{};
  struct stat src_st;
  if (::fstat(src_fd, &src_st) != 0) return ErrnoAt("fstat of the source", 0);
  if (S_ISREG(src_st.st_mode) && static_cast<uint64_t>(src_st.st_size) < size) {
    return Status::InvalidArgument("the source holds " + std::to_string(src_st.st_size) + " bytes, fewer than the " +
                                   std::to_string(size) + " to copy");
  }
  bool kernel = true;  // copy_file_range until the kernel refuses it once
  std::vector<char> buf;
  uint64_t pos = 0;
  while (pos < size) {
    uint64_t data = 0, hole = 0;
    VMR_RETURN_IF_ERROR(NextExtent(src_fd, pos, size, &data, &hole));
    if (data > pos) {
      VMR_RETURN_IF_ERROR(ZeroRange(dst_fd, pos, data - pos));
      st.hole_bytes += data - pos;
      pos = data;
      if (progress) progress(pos, size);
    }
    while (pos < hole) {
      if (cancelled && cancelled()) return Status::Cancelled("the copy was cancelled at " + std::to_string(pos));
      const uint64_t want = std::min(kCopyPiece, hole - pos);
      uint64_t copied = 0;
      if (kernel) {
        while (copied < want) {
          loff_t in = static_cast<loff_t>(pos + copied), out = in;
          const ssize_t n = ::copy_file_range(src_fd, &in, dst_fd, &out, static_cast<size_t>(want - copied), 0);
          if (n < 0 && errno == EINTR) continue;
          if (n < 0 && copied == 0 &&
              (errno == EXDEV || errno == EINVAL || errno == EOPNOTSUPP || errno == ENOSYS || errno == EBADF)) {
            kernel = false;  // read and write from here on
            break;
          }
          if (n < 0) return ErrnoAt("copy_file_range", pos + copied);
          if (n == 0) {
            return Status::IOError("the source ended at " + std::to_string(pos + copied) + " (expected " +
                                   std::to_string(size) + " bytes; shrank while copied?)");
          }
          copied += static_cast<uint64_t>(n);
        }
        st.kernel_bytes += copied;
      }
      if (!kernel && copied < want) {
        if (buf.empty()) buf.resize(1u << 20);
        while (copied < want) {
          const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), want - copied));
          size_t got = 0;
          while (got < n) {
            const ssize_t r = ::pread(src_fd, buf.data() + got, n - got, static_cast<off_t>(pos + copied + got));
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) return ErrnoAt("read", pos + copied + got);
            if (r == 0) {
              return Status::IOError("the source ended at " + std::to_string(pos + copied + got) + " (expected " +
                                     std::to_string(size) + " bytes; shrank while copied?)");
            }
            got += static_cast<size_t>(r);
          }
          if (IsAllZero(buf.data(), n)) {
            VMR_RETURN_IF_ERROR(ZeroRange(dst_fd, pos + copied, n));
            st.hole_bytes += n;
          } else {
            VMR_RETURN_IF_ERROR(PwriteAll(dst_fd, buf.data(), n, pos + copied));
            st.data_bytes += n;
          }
          copied += n;
        }
      } else {
        st.data_bytes += copied;
      }
      pos += copied;
      if (progress) progress(pos, size);
    }
  }
  return Status::Ok();
}

Status FsyncParentDir(const std::string& path) {
  // (Built so, not by assigning "." afterwards: GCC 12 at -O3 reports a
  // false -Wrestrict on that assignment.)
  const std::string parent = std::filesystem::path(path).parent_path().string();
  const std::string dir = parent.empty() ? std::string(".") : parent;
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Errno("open directory", dir);
  int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return Errno("fsync directory", dir);
  return Status::Ok();
}

Status WriteFileAtomic(const std::string& path, const std::string& content, unsigned mode) {
  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) return Errno("create", tmp);
  size_t done = 0;
  while (done < content.size()) {
    ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      Status s = Errno("write", tmp);
      ::close(fd);
      return s;
    }
    done += static_cast<size_t>(n);
  }
  if (::fchmod(fd, mode) != 0 || ::fsync(fd) != 0) {
    Status s = Errno("fsync", tmp);
    ::close(fd);
    return s;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) return Errno("rename to", path);
  return FsyncParentDir(path);
}

Result<std::string> ReadFile(const std::string& path, size_t max_bytes) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return Status::NotFound("no such file: " + path);
    return Errno("open", path);
  }
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      Status s = Errno("read", path);
      ::close(fd);
      return s;
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > max_bytes) {
      ::close(fd);
      return Status::InvalidArgument("file larger than " + std::to_string(max_bytes) + " bytes: " + path);
    }
  }
  ::close(fd);
  return out;
}

Status MakeDirs(const std::string& dir, unsigned mode) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Status::IOError("create directory " + dir + ": " + ec.message());
  if (::chmod(dir.c_str(), mode) != 0) return Errno("chmod", dir);
  return Status::Ok();
}

Result<FileLock> FileLock::Acquire(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return Errno("open lock file", path);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    ::close(fd);
    if (err == EWOULDBLOCK) return Status::Busy("state directory is locked by another process: " + path);
    errno = err;
    return Errno("lock", path);
  }
  return FileLock(fd);
}

FileLock::FileLock(FileLock&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }

FileLock& FileLock::operator=(FileLock&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.fd_;
    other.fd_ = -1;
  }
  return *this;
}

FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);
}

void ResetSignalsForExec() noexcept {
  sigset_t none;
  ::sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGPIPE}) ::signal(sig, SIG_DFL);
}

}  // namespace vmreplica
