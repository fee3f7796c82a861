// Delta log files: one delta of one relationship (the changed extents of
// every disk of a VM between two cuts), as staged on the replica before it
// is applied. The byte format is specified in docs/log_format.md; the
// frozen numbers live in src/logformat/log_format.h.
//
// LogWriter appends records and finishes the file with a trailer that marks
// it complete. LogReader reads a file back as a DeltaSource, checking every
// checksum and bound; it reads a finished file ("complete" mode) or one that
// is still being received ("partial" mode, where a torn tail is the end).
//
// Thread safety: a LogWriter or LogReader is used by one thread at a time.
// Distinct objects are independent. Nothing here throws.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "vmreplica/delta.h"
#include "vmreplica/model/enums.h"
#include "vmreplica/status.h"

namespace vmreplica {

// Bounds of format version 1 (docs/log_format.md, "Field rules").
inline constexpr uint32_t kLogMaxDataRecordLength = 64u << 20;  // bytes
inline constexpr uint32_t kLogMaxDisks = 64;
inline constexpr uint32_t kLogMaxDiskNameLength = 255;
inline constexpr uint32_t kLogMaxRelationshipIdLength = 64;
inline constexpr uint64_t kLogMaxDiskSize = uint64_t{1} << 62;

using GenerationId = std::array<uint8_t, 16>;

struct LogDisk {
  std::string name;         // 1..255 of [A-Za-z0-9._-], not starting with '.'
  uint64_t size_bytes = 0;  // 1..2^62

  bool operator==(const LogDisk&) const = default;
};

struct LogHeader {
  std::string relationship_id;  // the VM's UUID string, 1..64 printable ASCII
  uint32_t relationship_index = 0;
  uint64_t sequence = 0;
  GenerationId base_generation{};
  GenerationId new_generation{};
  uint64_t cut_time_unix_ms = 0;
  ReplicationType kind = ReplicationType::kRegular;  // 1, 2 or 3
  std::vector<LogDisk> disks;                        // 1..64, unique names

  bool operator==(const LogHeader&) const = default;
};

// InvalidArgument (with the reason) when `header` breaks a field rule.
Status ValidateLogHeader(const LogHeader& header);

enum class LogCompression : uint8_t { kNone = 0, kZstd = 1 };

struct LogTrailer {
  uint64_t record_count = 0;
  uint64_t data_bytes = 0;  // sum of length over data records
  uint64_t zero_bytes = 0;  // sum of length over zero records
  uint64_t chain = 0;       // chained record checksums
};

struct LogWriterOptions {
  // zstd-compress each data record, kept only when it shrinks the payload.
  bool compress = true;
  int zstd_level = 3;  // 1..19
  // fsync the file and its directory in Finish(). Off only in tests.
  bool sync = true;
};

// Writes one log file. Create() writes the header; Add() appends records in
// apply order; Finish() writes the trailer and makes the file durable.
// After any error the writer is broken: every later call answers that error.
// Destroying a writer that was not finished closes the file and leaves it
// as it is: a log without a trailer, which only a partial-mode reader
// accepts and Reopen() continues. Abandon() removes it instead.
class LogWriter {
 public:
  // Creates `path` (must not exist: AlreadyExists) and writes `header`
  // (InvalidArgument when it breaks a field rule, IOError from the OS).
  static Result<std::unique_ptr<LogWriter>> Create(const std::string& path, const LogHeader& header,
                                                   const LogWriterOptions& options = {});

  // Continues a log left unfinished (a receiver restarting after a crash or
  // a dropped connection): reads `path` in partial mode, verifying every
  // record, cuts it after the last whole record (valid_prefix_bytes) and
  // appends from there. Reads the whole file once. Unavailable when even the
  // header is incomplete (create the file anew); FailedPrecondition when the
  // log is already complete; Corruption when the prefix fails a check.
  // Abandon() on the result removes the file.
  static Result<std::unique_ptr<LogWriter>> Reopen(const std::string& path, const LogWriterOptions& options = {});

  ~LogWriter();
  LogWriter(const LogWriter&) = delete;
  LogWriter& operator=(const LogWriter&) = delete;

  // Appends one record. InvalidArgument when the record breaks a rule (disk
  // index, zero length, outside the disk, data size != length, data longer
  // than kLogMaxDataRecordLength: split such extents); IOError from the OS.
  Status Add(const DeltaRecord& record);
  // As Add, but a data record is zstd-compressed only when `try_compress`
  // (and options.compress) is set: the receiver of a wire chunk that did not
  // compress knows its records would not either.
  Status Add(const DeltaRecord& record, bool try_compress);

  // Writes the trailer, fsyncs the file and its directory (options.sync)
  // and closes it. FailedPrecondition when already finished or abandoned.
  Status Finish();

  // Closes and removes the file; no effect after a successful Finish().
  // Safe to call at any time, also twice.
  void Abandon();

  const std::string& path() const { return path_; }
  uint64_t bytes_written() const { return offset_; }
  uint64_t record_count() const { return trailer_.record_count; }

 private:
  struct Impl;
  LogWriter(std::string path, int fd, const LogHeader& header, const LogWriterOptions& options);
  Status WriteAll(std::string_view bytes);

  std::string path_;
  int fd_ = -1;
  LogHeader header_;
  LogWriterOptions options_;
  std::unique_ptr<Impl> impl_;  // zstd context
  uint64_t offset_ = 0;
  LogTrailer trailer_;
  Status error_;
  bool finished_ = false;
  bool abandoned_ = false;
};

enum class LogReadMode {
  kComplete,  // a finished log: a missing trailer or torn tail is Corruption
  kPartial,   // still being received: a torn tail is the end of the stream
};

// One record as stored, for tools and diagnostics.
struct LogRecordInfo {
  DeltaRecord record;  // decompressed; data empty for zero records
  LogCompression compression = LogCompression::kNone;
  uint32_t stored_length = 0;
  uint64_t checksum = 0;     // record_checksum (verified)
  uint64_t file_offset = 0;  // where the record starts
};

// Reads one log. Next() answers records in file order, nullopt at the end.
// Complete mode: the end is a valid trailer (then trailer() is set).
// Partial mode: the end is also a torn tail; Next() may be called again
// later and picks up records appended since.
// Errors: Corruption (with "at offset N") for any failed checksum or bound
// on bytes that are present, and for a torn tail in complete mode;
// NotSupported for another format version; IOError from the OS. After an
// error every later call answers the same error.
class LogReader : public DeltaSource {
 public:
  // Opens a file and checks its header. In partial mode a file shorter
  // than its header answers Unavailable (nothing usable yet, resume at 0).
  static Result<std::unique_ptr<LogReader>> Open(const std::string& path, LogReadMode mode);
  // The same over bytes in memory (copied into the reader).
  static Result<std::unique_ptr<LogReader>> OpenBuffer(std::string bytes, LogReadMode mode);

  ~LogReader() override;
  LogReader(const LogReader&) = delete;
  LogReader& operator=(const LogReader&) = delete;

  const LogHeader& header() const { return header_; }
  LogReadMode mode() const { return mode_; }

  Result<std::optional<DeltaRecord>> Next() override;
  Result<std::optional<LogRecordInfo>> NextRecord();

  // The trailer once the end of a complete file was reached, else nullopt.
  const std::optional<LogTrailer>& trailer() const { return trailer_; }
  // Bytes from the start of the file up to the end of the last whole,
  // verified record (or of the header): where a receiver resumes writing.
  uint64_t valid_prefix_bytes() const { return offset_; }
  uint64_t records_read() const { return count_.record_count; }
  // Counts and chain of the records read so far.
  const LogTrailer& read_totals() const { return count_; }

  class Input;  // byte source (file or buffer); an implementation detail

 private:
  LogReader(std::unique_ptr<Input> input, LogReadMode mode);
  Status ReadHeader();
  Status ReadHeaderAt0();
  Status Fail(Status status);

  std::unique_ptr<Input> input_;
  LogReadMode mode_;
  LogHeader header_;
  uint64_t offset_ = 0;
  LogTrailer count_;  // running counts and chain of the records read
  std::optional<LogTrailer> trailer_;
  Status error_;
  void* dctx_ = nullptr;  // ZSTD_DCtx, created on first compressed record
};

struct LogSummary {
  LogHeader header;
  LogTrailer trailer;  // counts read; chain as stored when complete
  uint64_t data_records = 0;
  uint64_t zero_records = 0;
  uint64_t compressed_records = 0;
  uint64_t stored_bytes = 0;  // payload bytes in the file
  uint64_t valid_bytes = 0;   // valid_prefix_bytes at the end
  bool complete = false;      // a valid trailer was read
};

// Reads the whole file, checking everything. Answers the summary, or the
// first error (its message says at which byte offset).
Result<LogSummary> VerifyLog(const std::string& path, LogReadMode mode = LogReadMode::kComplete);

}  // namespace vmreplica
