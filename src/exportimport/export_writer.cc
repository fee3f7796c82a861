// WriteInitialExport: source records -> chunks -> data files, manifest last.
// Crash-safety protocol: docs/export_format.md section 7.

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>
#include <cstring>

#include "exportimport/export_format.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/initial_export.h"

namespace vmreplica {
namespace {

using exportimport::DataFileName;
using exportimport::Manifest;

Status Errno(const std::string& what) {
  return Status::IOError(what + ": " + std::strerror(errno));
}

Status ValidateOptions(const ExportOptions& o) {
  if ((o.chunk_size & (o.chunk_size - 1)) != 0 || o.chunk_size < exportimport::kMinChunkSize ||
      o.chunk_size > exportimport::kMaxChunkSize)
    return Status::InvalidArgument("chunk_size " + std::to_string(o.chunk_size) +
                                   " is not a power of two in [64 KiB, 64 MiB]");
  if (o.zstd_level < 1 || o.zstd_level > 19)
    return Status::InvalidArgument("zstd_level " + std::to_string(o.zstd_level) +
                                   " outside [1, 19]");
  if (o.max_data_file_bytes < exportimport::kMinDataFileBytes ||
      o.max_data_file_bytes > exportimport::kMaxDiskSize)
    return Status::InvalidArgument("max_data_file_bytes below 1 MiB or above 2^62");
  if (o.min_zero_run > o.chunk_size)
    return Status::InvalidArgument("min_zero_run larger than chunk_size");
  return Status::Ok();
}

Status WriteAll(int fd, const char* p, size_t n, const std::string& what) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return Errno("write " + what);
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

Status FsyncDir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Errno("open " + dir);
  Status s;
  if (::fsync(fd) != 0) s = Errno("fsync " + dir);
  ::close(fd);
  return s;
}

Status RemoveIfExists(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Errno("remove " + path);
  return Status::Ok();
}

// Removes what an earlier run left (MANIFEST first, made durable, so the old
// export is invalid before anything else changes).
Status ClearExportDir(const std::string& dir) {
  const std::string manifest = dir + "/" + exportimport::kManifestName;
  struct stat st;
  if (::lstat(manifest.c_str(), &st) == 0) {
    VMR_RETURN_IF_ERROR(RemoveIfExists(manifest));
    VMR_RETURN_IF_ERROR(FsyncDir(dir));
  } else if (errno != ENOENT) {
    return Errno("stat " + manifest);
  }
  VMR_RETURN_IF_ERROR(RemoveIfExists(manifest + ".tmp"));
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return Errno("open " + dir);
  std::vector<std::string> victims;
  errno = 0;
  while (dirent* e = ::readdir(d)) {
    if (exportimport::IsDataFileName(e->d_name)) victims.emplace_back(e->d_name);
  }
  const int err = errno;
  ::closedir(d);
  if (err != 0) {
    errno = err;
    return Errno("read directory " + dir);
  }
  for (const auto& v : victims) VMR_RETURN_IF_ERROR(RemoveIfExists(dir + "/" + v));
  return Status::Ok();
}

// Turns the records into chunks (docs/export_format.md section 4) and writes
// the data files. Single-threaded, owned by one WriteInitialExport call.
class ChunkBuilder {
 public:
  ChunkBuilder(std::string dir, const ExportOptions& options, Manifest& manifest)
      : dir_(std::move(dir)), options_(options), m_(manifest) {}
  ~ChunkBuilder() {
    if (fd_ >= 0) ::close(fd_);
    if (zctx_ != nullptr) ZSTD_freeCCtx(zctx_);
  }
  ChunkBuilder(const ChunkBuilder&) = delete;
  ChunkBuilder& operator=(const ChunkBuilder&) = delete;

  // Zeros at [offset, offset+length) of `disk`, directly after what came before.
  Status AddZero(uint32_t disk, uint64_t offset, uint64_t length) {
    if (zero_len_ == 0) {
      zero_disk_ = disk;
      zero_start_ = offset;
    }
    zero_len_ += length;
    return Status::Ok();
  }

  Status AddData(uint32_t disk, uint64_t offset, const char* p, uint64_t length) {
    const uint64_t cs = options_.chunk_size;
    while (length > 0) {
      const uint64_t window = offset / cs;
      const uint64_t take = std::min(length, (window + 1) * cs - offset);
      if (zero_len_ > 0) {
        if (open_ && zero_len_ < options_.min_zero_run && data_start_ / cs == window) {
          // A short zero run between data of one window: stored with the data.
          buf_.append(static_cast<size_t>(zero_len_), '\0');
          zero_len_ = 0;
        } else {
          VMR_RETURN_IF_ERROR(FlushData());
          VMR_RETURN_IF_ERROR(FlushZero());
        }
      }
      if (open_ && data_start_ / cs != window) VMR_RETURN_IF_ERROR(FlushData());
      if (!open_) {
        open_ = true;
        data_disk_ = disk;
        data_start_ = offset;
        buf_.clear();
      }
      buf_.append(p, static_cast<size_t>(take));
      p += take;
      offset += take;
      length -= take;
    }
    return Status::Ok();
  }

  // Ends a disk: everything pending becomes chunks.
  Status EndDisk() {
    VMR_RETURN_IF_ERROR(FlushData());
    return FlushZero();
  }

  // Closes the last data file (fsynced).
  Status Finish() {
    if (fd_ >= 0) {
      if (::fsync(fd_) != 0) return Errno("fsync " + DataFileName(file_index_));
      ::close(fd_);
      fd_ = -1;
    }
    return Status::Ok();
  }

 private:
  Status CheckCount() {
    if (m_.chunks.size() >= exportimport::kMaxChunks)
      return Status::InvalidArgument(
          "the export would need more than 2^20 chunks (disk too fragmented or chunk_size too "
          "small)");
    return Status::Ok();
  }

  Status FlushZero() {
    if (zero_len_ == 0) return Status::Ok();
    VMR_RETURN_IF_ERROR(CheckCount());
    ExportChunk c;
    c.disk = zero_disk_;
    c.offset = zero_start_;
    c.length = zero_len_;
    c.zero = true;
    m_.chunks.push_back(c);
    m_.totals.zero_bytes += c.length;
    ++m_.totals.zero_chunks;
    zero_len_ = 0;
    return Status::Ok();
  }

  Status FlushData() {
    if (!open_) return Status::Ok();
    VMR_RETURN_IF_ERROR(CheckCount());
    open_ = false;
    ExportChunk c;
    c.disk = data_disk_;
    c.offset = data_start_;
    c.length = buf_.size();
    c.hash = HashBytes(buf_.data(), buf_.size());
    const char* stored = buf_.data();
    size_t stored_len = buf_.size();
    if (options_.compress) {
      if (zctx_ == nullptr) {
        zctx_ = ZSTD_createCCtx();
        if (zctx_ == nullptr) return Status::Internal("ZSTD_createCCtx failed");
      }
      zbuf_.resize(ZSTD_compressBound(buf_.size()));
      const size_t n = ZSTD_compressCCtx(zctx_, zbuf_.data(), zbuf_.size(), buf_.data(),
                                         buf_.size(), options_.zstd_level);
      if (ZSTD_isError(n))
        return Status::Internal(std::string("zstd compression: ") + ZSTD_getErrorName(n));
      if (n < buf_.size()) {
        c.zstd = true;
        stored = zbuf_.data();
        stored_len = n;
      }
    }
    c.stored_length = stored_len;
    if (fd_ >= 0 && file_pos_ + stored_len > options_.max_data_file_bytes) {
      VMR_RETURN_IF_ERROR(Finish());
      ++file_index_;
    }
    if (fd_ < 0) {
      if (file_index_ >= exportimport::kMaxFiles)
        return Status::InvalidArgument("the export would need more than 100000 data files");
      const std::string path = dir_ + "/" + DataFileName(file_index_);
      fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd_ < 0) return Errno("create " + path);
      file_pos_ = 0;
      m_.file_sizes.push_back(0);
    }
    VMR_RETURN_IF_ERROR(WriteAll(fd_, stored, stored_len, DataFileName(file_index_)));
    c.file_index = file_index_;
    c.file_offset = file_pos_;
    file_pos_ += stored_len;
    m_.file_sizes.back() = file_pos_;
    m_.chunks.push_back(c);
    m_.totals.data_bytes += c.length;
    m_.totals.stored_bytes += stored_len;
    ++m_.totals.data_chunks;
    return Status::Ok();
  }

  const std::string dir_;
  const ExportOptions options_;
  Manifest& m_;

  bool open_ = false;  // a data chunk is being collected in buf_
  uint32_t data_disk_ = 0;
  uint64_t data_start_ = 0;
  std::string buf_;
  uint32_t zero_disk_ = 0;  // pending zero run (follows the open data chunk, if any)
  uint64_t zero_start_ = 0;
  uint64_t zero_len_ = 0;

  int fd_ = -1;  // current data file
  uint32_t file_index_ = 0;
  uint64_t file_pos_ = 0;
  ZSTD_CCtx* zctx_ = nullptr;
  std::string zbuf_;
};

}  // namespace

std::string ExportDirectoryName(const std::string& vm_name, const std::string& vm_id) {
  auto id = exportimport::NormalizeUuid(vm_id);
  return vm_name + "-" + (id.ok() ? *id : vm_id);
}

Result<ExportSummary> WriteInitialExport(const std::string& location, const ExportInfo& info,
                                         DeltaSource& source, const ExportOptions& options,
                                         const ExportProgress& progress) {
  VMR_RETURN_IF_ERROR(ValidateOptions(options));
  Manifest m;
  VMR_ASSIGN_OR_RETURN(m.info, exportimport::NormalizeInfo(info));
  m.chunk_size = options.chunk_size;
  if (location.empty()) return Status::InvalidArgument("empty export location");

  const std::string dir = location + "/" + ExportDirectoryName(m.info.vm_name, m.info.vm_id);
  // An existing location keeps its mode (MakeDirs would chmod it).
  struct stat lst;
  if (::stat(location.c_str(), &lst) != 0) {
    VMR_RETURN_IF_ERROR(MakeDirs(location));
  } else if (!S_ISDIR(lst.st_mode)) {
    return Status::InvalidArgument("export location " + location + " is not a directory");
  }
  if (::mkdir(dir.c_str(), 0755) == 0) {
    VMR_RETURN_IF_ERROR(FsyncDir(location));
  } else if (errno != EEXIST) {
    return Errno("create " + dir);
  }
  auto lock = FileLock::Acquire(dir + "/" + exportimport::kLockName);
  if (!lock.ok()) {
    if (lock.status().code() == Code::kBusy)
      return Status::Busy("another export of VM " + m.info.vm_id + " is being written in " + dir);
    return lock.status();
  }
  VMR_RETURN_IF_ERROR(ClearExportDir(dir));

  uint64_t total = 0;
  for (const ExportDisk& d : m.info.disks) total += d.size;
  uint64_t done_before = 0;  // bytes of the disks before `disk`
  uint32_t disk = 0;
  uint64_t pos = 0;  // next byte of `disk` not yet described
  ChunkBuilder builder(dir, options, m);
  const auto& disks = m.info.disks;

  auto end_disk = [&]() -> Status {
    if (pos < disks[disk].size)
      VMR_RETURN_IF_ERROR(builder.AddZero(disk, pos, disks[disk].size - pos));
    VMR_RETURN_IF_ERROR(builder.EndDisk());
    done_before += disks[disk].size;
    pos = 0;
    ++disk;
    return Status::Ok();
  };

  for (uint64_t n = 0;; ++n) {
    if (options.cancel != nullptr && options.cancel->load())
      return Status::Cancelled("export of VM " + m.info.vm_id + " cancelled");
    VMR_ASSIGN_OR_RETURN(std::optional<DeltaRecord> rec, source.Next());
    if (!rec.has_value()) break;
    const std::string what = "source record " + std::to_string(n);
    if (rec->disk >= disks.size())
      return Status::InvalidArgument(what + ": disk " + std::to_string(rec->disk) +
                                     " out of range");
    if (rec->disk < disk)
      return Status::InvalidArgument(what + ": disk " + std::to_string(rec->disk) + " after disk " +
                                     std::to_string(disk));
    while (disk < rec->disk) VMR_RETURN_IF_ERROR(end_disk());
    const uint64_t size = disks[disk].size;
    if (rec->length == 0) return Status::InvalidArgument(what + ": length 0");
    if (rec->offset < pos)
      return Status::InvalidArgument(what + ": offset " + std::to_string(rec->offset) +
                                     " overlaps or precedes earlier records (next free " +
                                     std::to_string(pos) + ")");
    if (rec->offset > size || rec->length > size - rec->offset)
      return Status::InvalidArgument(what + ": extent beyond the disk size " +
                                     std::to_string(size));
    if (!rec->zero && rec->data.size() != rec->length)
      return Status::InvalidArgument(what + ": " + std::to_string(rec->data.size()) +
                                     " bytes of data for length " + std::to_string(rec->length));
    if (rec->offset > pos) VMR_RETURN_IF_ERROR(builder.AddZero(disk, pos, rec->offset - pos));
    if (rec->zero) {
      VMR_RETURN_IF_ERROR(builder.AddZero(disk, rec->offset, rec->length));
    } else {
      VMR_RETURN_IF_ERROR(builder.AddData(disk, rec->offset, rec->data.data(), rec->length));
    }
    pos = rec->offset + rec->length;
    if (progress) progress(done_before + pos, total);
  }
  while (disk < disks.size()) VMR_RETURN_IF_ERROR(end_disk());
  VMR_RETURN_IF_ERROR(builder.Finish());
  // Self-check before the export becomes valid: a bug here must not
  // produce an export that readers refuse later.
  VMR_RETURN_IF_ERROR(
      exportimport::ValidateManifest(m).WithContext("export writer produced a bad manifest"));
  VMR_ASSIGN_OR_RETURN(std::string text, exportimport::EncodeManifest(m));
  // Data file entries durable before the manifest can be.
  VMR_RETURN_IF_ERROR(FsyncDir(dir));
  VMR_RETURN_IF_ERROR(WriteFileAtomic(dir + "/" + exportimport::kManifestName, text));
  if (progress) progress(total, total);

  ExportSummary summary;
  summary.directory = dir;
  summary.totals = m.totals;
  summary.data_files = m.file_sizes.size();
  return summary;
}

}  // namespace vmreplica
