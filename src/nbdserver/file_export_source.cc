#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "nbdserver/protocol.h"
#include "vmreplica/nbd_server.h"

namespace vmreplica {
namespace {

Status Errno(const std::string& what, int err) {
  return Status::IOError(what + ": " + std::strerror(err));
}

}  // namespace

Result<std::shared_ptr<FileExportSource>> FileExportSource::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) return Status::NotFound("no such file: " + path);
    return Errno("open " + path, err);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return Errno("fstat " + path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::NotSupported(path + " is not a regular file");
  }
  return std::shared_ptr<FileExportSource>(
      new FileExportSource(fd, static_cast<uint64_t>(st.st_size), path));
}

FileExportSource::~FileExportSource() { ::close(fd_); }

Status FileExportSource::Read(uint64_t offset, uint64_t length, char* out) {
  if (offset > size_ || length > size_ - offset) {
    return Status::InvalidArgument("read beyond the end of " + path_);
  }
  while (length > 0) {
    ssize_t n = ::pread(fd_, out, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("pread " + path_, errno);
    }
    if (n == 0) return Status::IOError(path_ + " shrank below its exported size");
    out += n;
    offset += static_cast<uint64_t>(n);
    length -= static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Result<std::vector<Extent>> FileExportSource::Extents(uint64_t offset, uint64_t length) {
  if (length == 0 || offset > size_ || length > size_ - offset) {
    return Status::InvalidArgument("extent range out of " + path_);
  }
  std::vector<Extent> out;
  const uint64_t end = offset + length;
  uint64_t pos = offset;
  while (pos < end && out.size() < nbd::kMaxExtentsPerReply) {
    off_t data = ::lseek(fd_, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) {  // only a hole up to the end of the file
        out.push_back({end - pos, true, true});
        break;
      }
      if (errno == EINVAL || errno == EOPNOTSUPP) {  // no SEEK_DATA: all data
        out.push_back({end - pos, false, false});
        break;
      }
      return Errno("lseek(SEEK_DATA) " + path_, errno);
    }
    uint64_t d = static_cast<uint64_t>(data);
    if (d > pos) {
      uint64_t hole_end = std::min(d, end);
      out.push_back({hole_end - pos, true, true});
      pos = hole_end;
      continue;
    }
    off_t hole = ::lseek(fd_, static_cast<off_t>(pos), SEEK_HOLE);
    if (hole < 0) return Errno("lseek(SEEK_HOLE) " + path_, errno);
    uint64_t data_end = std::min(std::max(static_cast<uint64_t>(hole), pos + 1), end);
    out.push_back({data_end - pos, false, false});
    pos = data_end;
  }
  return out;
}

}  // namespace vmreplica
