#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "logformat/log_format.h"

namespace vmreplica {

using namespace log;

// Where the bytes come from: a file (which may grow while it is read in
// partial mode) or a buffer.
class LogReader::Input {
 public:
  virtual ~Input() = default;
  // Reads up to `n` bytes at `offset`; fewer only at the end of the input.
  virtual Result<size_t> ReadAt(uint64_t offset, char* buf, size_t n) = 0;
  virtual Result<uint64_t> Size() = 0;
};

namespace {

class FileInput : public LogReader::Input {
 public:
  FileInput(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  ~FileInput() override { ::close(fd_); }

  Result<size_t> ReadAt(uint64_t offset, char* buf, size_t n) override {
    size_t done = 0;
    while (done < n) {
      ssize_t r = ::pread(fd_, buf + done, n - done, static_cast<off_t>(offset + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        return Status::IOError("read " + path_ + ": " + std::strerror(errno));
      }
      if (r == 0) break;
      done += static_cast<size_t>(r);
    }
    return done;
  }

  Result<uint64_t> Size() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return Status::IOError("stat " + path_ + ": " + std::strerror(errno));
    return static_cast<uint64_t>(st.st_size);
  }

 private:
  std::string path_;
  int fd_;
};

class BufferInput : public LogReader::Input {
 public:
  explicit BufferInput(std::string bytes) : bytes_(std::move(bytes)) {}
  Result<size_t> ReadAt(uint64_t offset, char* buf, size_t n) override {
    if (offset >= bytes_.size()) return size_t{0};
    size_t count = std::min<uint64_t>(n, bytes_.size() - offset);
    std::memcpy(buf, bytes_.data() + offset, count);
    return count;
  }
  Result<uint64_t> Size() override { return uint64_t{bytes_.size()}; }

 private:
  std::string bytes_;
};

std::string At(uint64_t offset) { return "at offset " + std::to_string(offset) + ": "; }

}  // namespace

Result<std::unique_ptr<LogReader>> LogReader::Open(const std::string& path, LogReadMode mode) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return Status::NotFound("log " + path + " does not exist");
    return Status::IOError("open " + path + ": " + std::strerror(errno));
  }
  std::unique_ptr<LogReader> reader(new LogReader(std::make_unique<FileInput>(path, fd), mode));
  Status s = reader->ReadHeader();
  if (!s.ok()) return s.WithContext(path);
  return reader;
}

Result<std::unique_ptr<LogReader>> LogReader::OpenBuffer(std::string bytes, LogReadMode mode) {
  std::unique_ptr<LogReader> reader(new LogReader(std::make_unique<BufferInput>(std::move(bytes)), mode));
  VMR_RETURN_IF_ERROR(reader->ReadHeader());
  return reader;
}

LogReader::LogReader(std::unique_ptr<Input> input, LogReadMode mode) : input_(std::move(input)), mode_(mode) {}

LogReader::~LogReader() { ZSTD_freeDCtx(static_cast<ZSTD_DCtx*>(dctx_)); }

Status LogReader::Fail(Status status) {
  error_ = std::move(status);
  return error_;
}

Status LogReader::ReadHeader() {
  Status s = ReadHeaderAt0();
  if (s.code() == Code::kCorruption) return Status::Corruption(At(0) + s.message());
  return s;
}

Status LogReader::ReadHeaderAt0() {
  bool partial = mode_ == LogReadMode::kPartial;
  char prefix[kHeaderPrefixSize];
  VMR_ASSIGN_OR_RETURN(size_t got, input_->ReadAt(0, prefix, sizeof(prefix)));
  if (std::memcmp(prefix, kMagic, std::min(got, sizeof(kMagic))) != 0) {
    return Status::Corruption("not a delta log (bad magic)");
  }
  auto short_header = [&](size_t have, size_t need) {
    std::string what = "header incomplete (" + std::to_string(have) + " of " + std::to_string(need) + " bytes)";
    return partial ? Status::Unavailable(what) : Status::Corruption(what);
  };
  if (got < sizeof(prefix)) return short_header(got, sizeof(prefix));
  uint32_t version = GetU32(prefix + 8);
  uint32_t length = GetU32(prefix + 12);
  if (length < kHeaderFixedSize + 8 || length > kMaxHeaderSize) {
    if (version != kVersion1) return Status::NotSupported("log format version " + std::to_string(version));
    return Status::Corruption("header length " + std::to_string(length) + " out of range");
  }
  std::string bytes(length, '\0');
  VMR_ASSIGN_OR_RETURN(got, input_->ReadAt(0, bytes.data(), length));
  if (got < length) return short_header(got, length);
  if (Checksum(std::string_view(bytes).substr(0, length - 8)) != GetU64(bytes.data() + length - 8)) {
    return Status::Corruption("header checksum mismatch");
  }
  VMR_RETURN_IF_ERROR(DecodeHeader(bytes, &header_));
  offset_ = length;
  count_.chain = GetU64(bytes.data() + length - 8);
  return Status::Ok();
}

Result<std::optional<DeltaRecord>> LogReader::Next() {
  VMR_ASSIGN_OR_RETURN(std::optional<LogRecordInfo> info, NextRecord());
  if (!info) return std::optional<DeltaRecord>();
  return std::optional<DeltaRecord>(std::move(info->record));
}

Result<std::optional<LogRecordInfo>> LogReader::NextRecord() {
  using Answer = std::optional<LogRecordInfo>;
  if (!error_.ok()) return error_;
  if (trailer_) return Answer();
  const bool partial = mode_ == LogReadMode::kPartial;
  const uint64_t at = offset_;
  char block[kBlockSize];
  Result<size_t> got = input_->ReadAt(at, block, sizeof(block));
  if (!got.ok()) return Fail(got.status());
  if (*got < sizeof(block)) {
    if (partial) return Answer();
    return Fail(Status::Corruption(At(at) + (*got == 0 ? "missing trailer" : "truncated record header")));
  }
  std::string_view checked(block, kBlockChecksumOffset);
  if (Checksum(checked) != GetU64(block + kBlockChecksumOffset)) {
    if (partial && std::all_of(block, block + sizeof(block), [](char c) { return c == 0; })) return Answer();
    return Fail(Status::Corruption(At(at) + "record header checksum mismatch"));
  }
  const uint8_t type = static_cast<uint8_t>(block[0]);
  if (type == kTypeTrailer) {
    LogTrailer t;
    uint32_t flags = GetU32(block + 4);
    t.record_count = GetU64(block + 8);
    t.data_bytes = GetU64(block + 16);
    t.zero_bytes = GetU64(block + 24);
    t.chain = GetU64(block + 32);
    if (block[1] != 0 || block[2] != 0 || block[3] != 0)
      return Fail(Status::Corruption(At(at) + "trailer reserved bytes not 0"));
    if (flags != kTrailerFlagComplete)
      return Fail(Status::Corruption(At(at) + "trailer flags " + std::to_string(flags)));
    if (t.record_count != count_.record_count || t.data_bytes != count_.data_bytes ||
        t.zero_bytes != count_.zero_bytes) {
      return Fail(Status::Corruption(At(at) + "trailer counts " + std::to_string(t.record_count) + " records, " +
                                     std::to_string(t.data_bytes) + "+" + std::to_string(t.zero_bytes) +
                                     " bytes; read " + std::to_string(count_.record_count) + ", " +
                                     std::to_string(count_.data_bytes) + "+" + std::to_string(count_.zero_bytes)));
    }
    if (t.chain != count_.chain) {
      return Fail(Status::Corruption(At(at) + "trailer chain mismatch (records dropped, reordered or replaced)"));
    }
    char extra;
    Result<size_t> more = input_->ReadAt(at + kBlockSize, &extra, 1);
    if (!more.ok()) return Fail(more.status());
    if (*more != 0) return Fail(Status::Corruption(At(at + kBlockSize) + "bytes after the trailer"));
    offset_ = at + kBlockSize;
    trailer_ = t;
    return Answer();
  }
  if (type != kTypeData && type != kTypeZero) {
    return Fail(Status::Corruption(At(at) + "unknown record type " + std::to_string(type)));
  }
  LogRecordInfo info;
  info.file_offset = at;
  const uint8_t compression = static_cast<uint8_t>(block[1]);
  DeltaRecord& r = info.record;
  r.zero = type == kTypeZero;
  r.disk = GetU32(block + 4);
  r.offset = GetU64(block + 8);
  r.length = GetU64(block + 16);
  info.stored_length = GetU32(block + 24);
  info.checksum = GetU64(block + kRecordChecksumOffset);
  const uint32_t stored = info.stored_length;
  if (GetU16(block + 2) != 0 || GetU32(block + 28) != 0) {
    return Fail(Status::Corruption(At(at) + "record reserved fields not 0"));
  }
  if (r.disk >= header_.disks.size()) {
    return Fail(Status::Corruption(At(at) + "disk index " + std::to_string(r.disk) + " out of range"));
  }
  const LogDisk& disk = header_.disks[r.disk];
  if (r.length == 0) return Fail(Status::Corruption(At(at) + "record length 0"));
  if (r.offset > disk.size_bytes || r.length > disk.size_bytes - r.offset) {
    return Fail(Status::Corruption(At(at) + "extent " + std::to_string(r.offset) + "+" + std::to_string(r.length) +
                                   " beyond the size of disk '" + disk.name + "'"));
  }
  if (r.zero) {
    if (compression != 0 || stored != 0) return Fail(Status::Corruption(At(at) + "zero record with a payload"));
  } else {
    if (r.length > kLogMaxDataRecordLength) {
      return Fail(Status::Corruption(At(at) + "data record length " + std::to_string(r.length) + " over the limit"));
    }
    if (compression == static_cast<uint8_t>(LogCompression::kNone)) {
      if (stored != r.length) return Fail(Status::Corruption(At(at) + "stored length differs from length"));
    } else if (compression == static_cast<uint8_t>(LogCompression::kZstd)) {
      if (stored == 0 || stored >= r.length) {
        return Fail(Status::Corruption(At(at) + "compressed length not smaller than length"));
      }
    } else {
      return Fail(Status::Corruption(At(at) + "unknown compression " + std::to_string(compression)));
    }
  }
  info.compression = static_cast<LogCompression>(compression);
  // All bounds hold: the payload may be read. Check it is there before
  // allocating (a partial file may not have it yet).
  Result<uint64_t> size = input_->Size();
  if (!size.ok()) return Fail(size.status());
  const uint64_t payload_at = at + kBlockSize;
  if (*size < payload_at || *size - payload_at < stored) {
    if (partial) return Answer();
    return Fail(Status::Corruption(At(at) + "truncated record payload"));
  }
  std::string payload(stored, '\0');
  got = input_->ReadAt(payload_at, payload.data(), stored);
  if (!got.ok()) return Fail(got.status());
  if (*got < stored) {
    if (partial) return Answer();
    return Fail(Status::Corruption(At(at) + "truncated record payload"));
  }
  if (Checksum2(std::string_view(block, kRecordChecksumOffset), payload) != info.checksum) {
    return Fail(Status::Corruption(At(at) + "record checksum mismatch"));
  }
  if (info.compression == LogCompression::kZstd) {
    unsigned long long declared = ZSTD_getFrameContentSize(payload.data(), payload.size());
    if (declared != r.length) return Fail(Status::Corruption(At(at) + "zstd frame size differs from length"));
    if (ZSTD_findFrameCompressedSize(payload.data(), payload.size()) != payload.size()) {
      return Fail(Status::Corruption(At(at) + "zstd payload is not exactly one frame"));
    }
    if (dctx_ == nullptr) dctx_ = ZSTD_createDCtx();
    if (dctx_ == nullptr) return Fail(Status::Internal("ZSTD_createDCtx failed"));
    r.data.resize(r.length);
    size_t n = ZSTD_decompressDCtx(static_cast<ZSTD_DCtx*>(dctx_), r.data.data(), r.data.size(), payload.data(),
                                   payload.size());
    if (ZSTD_isError(n) || n != r.length) {
      return Fail(Status::Corruption(At(at) + "zstd payload does not decompress to its length"));
    }
  } else if (!r.zero) {
    r.data = std::move(payload);
  }
  offset_ = payload_at + stored;
  count_.record_count++;
  (r.zero ? count_.zero_bytes : count_.data_bytes) += r.length;
  count_.chain = ChainNext(count_.chain, info.checksum);
  return Answer(std::move(info));
}

Result<LogSummary> VerifyLog(const std::string& path, LogReadMode mode) {
  VMR_ASSIGN_OR_RETURN(std::unique_ptr<LogReader> reader, LogReader::Open(path, mode));
  LogSummary summary;
  summary.header = reader->header();
  while (true) {
    Result<std::optional<LogRecordInfo>> next = reader->NextRecord();
    if (!next.ok()) return next.status().WithContext(path);
    if (!*next) break;
    const LogRecordInfo& info = **next;
    summary.stored_bytes += info.stored_length;
    if (info.record.zero) {
      summary.zero_records++;
    } else {
      summary.data_records++;
      if (info.compression != LogCompression::kNone) summary.compressed_records++;
    }
  }
  summary.complete = reader->trailer().has_value();
  summary.trailer = summary.complete ? *reader->trailer() : reader->read_totals();
  summary.valid_bytes = reader->valid_prefix_bytes();
  return summary;
}

}  // namespace vmreplica
