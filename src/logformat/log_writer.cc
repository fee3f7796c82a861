#include <fcntl.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>
#include <cstring>

#include "logformat/log_format.h"
#include "vmreplica/fileutil.h"

namespace vmreplica {

using namespace log;

namespace {

constexpr size_t kSmallPayload = 64 << 10;

Status Errno(const std::string& what, const std::string& path) {
  return Status::IOError(what + " " + path + ": " + std::strerror(errno));
}

}  // namespace

struct LogWriter::Impl {
  ZSTD_CCtx* cctx = nullptr;
  std::string scratch;
  ~Impl() { ZSTD_freeCCtx(cctx); }
};

Result<std::unique_ptr<LogWriter>> LogWriter::Create(const std::string& path, const LogHeader& header,
                                                     const LogWriterOptions& options) {
  VMR_RETURN_IF_ERROR(ValidateLogHeader(header));
  if (options.compress && (options.zstd_level < 1 || options.zstd_level > 19)) {
    return Status::InvalidArgument("zstd level must be 1..19");
  }
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    if (errno == EEXIST) return Status::AlreadyExists("log " + path + " exists");
    return Errno("create", path);
  }
  std::unique_ptr<LogWriter> writer(new LogWriter(path, fd, header, options));
  std::string bytes = EncodeHeader(header);
  writer->trailer_.chain = GetU64(bytes.data() + bytes.size() - 8);
  Status s = writer->WriteAll(bytes);
  if (!s.ok()) {
    writer->Abandon();
    return s;
  }
  return writer;
}

Result<std::unique_ptr<LogWriter>> LogWriter::Reopen(const std::string& path, const LogWriterOptions& options) {
  if (options.compress && (options.zstd_level < 1 || options.zstd_level > 19)) {
    return Status::InvalidArgument("zstd level must be 1..19");
  }
  VMR_ASSIGN_OR_RETURN(std::unique_ptr<LogReader> reader, LogReader::Open(path, LogReadMode::kPartial));
  while (true) {
    VMR_ASSIGN_OR_RETURN(std::optional<LogRecordInfo> next, reader->NextRecord());
    if (!next) break;
  }
  if (reader->trailer()) return Status::FailedPrecondition("log " + path + " is already complete");
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return Errno("open", path);
  const uint64_t prefix = reader->valid_prefix_bytes();
  if (::ftruncate(fd, static_cast<off_t>(prefix)) != 0 || ::lseek(fd, static_cast<off_t>(prefix), SEEK_SET) < 0) {
    Status s = Errno("truncate", path);
    ::close(fd);
    return s;
  }
  std::unique_ptr<LogWriter> writer(new LogWriter(path, fd, reader->header(), options));
  writer->offset_ = prefix;
  writer->trailer_ = reader->read_totals();
  return writer;
}

LogWriter::LogWriter(std::string path, int fd, const LogHeader& header, const LogWriterOptions& options)
    : path_(std::move(path)), fd_(fd), header_(header), options_(options), impl_(std::make_unique<Impl>()) {}

LogWriter::~LogWriter() {
  if (fd_ >= 0) ::close(fd_);
}

Status LogWriter::WriteAll(std::string_view bytes) {
  while (!bytes.empty()) {
    ssize_t n = ::write(fd_, bytes.data(), bytes.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      error_ = Errno("write", path_);
      return error_;
    }
    bytes.remove_prefix(static_cast<size_t>(n));
    offset_ += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status LogWriter::Add(const DeltaRecord& record) { return Add(record, true); }

Status LogWriter::Add(const DeltaRecord& record, bool try_compress) {
  if (!error_.ok()) return error_;
  if (finished_ || fd_ < 0) return Status::FailedPrecondition("log " + path_ + " is finished or abandoned");
  if (record.disk >= header_.disks.size()) {
    return Status::InvalidArgument("disk index " + std::to_string(record.disk) + " not in the log's disk list");
  }
  const LogDisk& disk = header_.disks[record.disk];
  if (record.length == 0) return Status::InvalidArgument("record length 0");
  if (record.offset > disk.size_bytes || record.length > disk.size_bytes - record.offset) {
    return Status::InvalidArgument("record " + std::to_string(record.offset) + "+" + std::to_string(record.length) +
                                   " beyond the size of disk '" + disk.name + "'");
  }
  std::string_view payload;
  LogCompression compression = LogCompression::kNone;
  if (record.zero) {
    if (!record.data.empty()) return Status::InvalidArgument("zero record with data");
  } else {
    if (record.length > kLogMaxDataRecordLength) {
      return Status::InvalidArgument("data record longer than " + std::to_string(kLogMaxDataRecordLength) +
                                     " bytes: split it");
    }
    if (record.data.size() != record.length) return Status::InvalidArgument("data size differs from length");
    payload = record.data;
    if (options_.compress && try_compress) {
      if (impl_->cctx == nullptr) impl_->cctx = ZSTD_createCCtx();
      if (impl_->cctx == nullptr) return Status::Internal("ZSTD_createCCtx failed");
      impl_->scratch.resize(ZSTD_compressBound(record.data.size()));
      size_t n = ZSTD_compressCCtx(impl_->cctx, impl_->scratch.data(), impl_->scratch.size(), record.data.data(),
                                   record.data.size(), options_.zstd_level);
      if (ZSTD_isError(n)) return Status::Internal(std::string("zstd: ") + ZSTD_getErrorName(n));
      if (n < record.data.size()) {
        payload = std::string_view(impl_->scratch.data(), n);
        compression = LogCompression::kZstd;
      }
    }
  }
  std::string head;
  head.reserve(kBlockSize);
  head.push_back(static_cast<char>(record.zero ? kTypeZero : kTypeData));
  head.push_back(static_cast<char>(compression));
  PutU16(&head, 0);
  PutU32(&head, record.disk);
  PutU64(&head, record.offset);
  PutU64(&head, record.length);
  PutU32(&head, static_cast<uint32_t>(payload.size()));
  PutU32(&head, 0);
  uint64_t record_checksum = Checksum2(head, payload);
  PutU64(&head, record_checksum);
  PutU64(&head, Checksum(head));
  if (payload.size() <= kSmallPayload) {
    head.append(payload);  // one write() for small records
    VMR_RETURN_IF_ERROR(WriteAll(head));
  } else {
    VMR_RETURN_IF_ERROR(WriteAll(head));
    VMR_RETURN_IF_ERROR(WriteAll(payload));
  }
  trailer_.record_count++;
  (record.zero ? trailer_.zero_bytes : trailer_.data_bytes) += record.length;
  trailer_.chain = ChainNext(trailer_.chain, record_checksum);
  return Status::Ok();
}

Status LogWriter::Finish() {
  if (!error_.ok()) return error_;
  if (finished_ || fd_ < 0) return Status::FailedPrecondition("log " + path_ + " is finished or abandoned");
  std::string block;
  block.reserve(kBlockSize);
  block.push_back(static_cast<char>(kTypeTrailer));
  block.append(3, '\0');
  PutU32(&block, kTrailerFlagComplete);
  PutU64(&block, trailer_.record_count);
  PutU64(&block, trailer_.data_bytes);
  PutU64(&block, trailer_.zero_bytes);
  PutU64(&block, trailer_.chain);
  PutU64(&block, Checksum(block));
  VMR_RETURN_IF_ERROR(WriteAll(block));
  if (options_.sync && ::fsync(fd_) != 0) {
    error_ = Errno("fsync", path_);
    return error_;
  }
  if (::close(fd_) != 0) {
    fd_ = -1;
    error_ = Errno("close", path_);
    return error_;
  }
  fd_ = -1;
  if (options_.sync) {
    Status s = FsyncParentDir(path_);
    if (!s.ok()) {
      error_ = s;
      return s;
    }
  }
  finished_ = true;
  return Status::Ok();
}

void LogWriter::Abandon() {
  if (finished_ || abandoned_) return;
  abandoned_ = true;
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
  ::unlink(path_.c_str());
  if (error_.ok()) error_ = Status::FailedPrecondition("log " + path_ + " was abandoned");
}

}  // namespace vmreplica
