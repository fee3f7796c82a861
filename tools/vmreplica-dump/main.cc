// vmreplica-dump: prints a vmreplica file and verifies every checksum.
// The file's 8-byte magic picks the format (kFormats below): delta logs
// (docs/log_format.md), replica undo segments and MANIFEST files
// (docs/replica_store.md sections 3 and 4). A new format adds one entry there.
//
// Exit codes: 0 the file is valid; 1 it is corrupt (the reason and byte
// offset are printed), of an unsupported version, or has an unknown magic;
// 2 usage error (bad arguments, file missing or unreadable).
#include <fcntl.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <unordered_set>

#include "logformat/log_format.h"
#include "replica/undo_format.h"
#include "vmreplica/logformat.h"

namespace vmreplica {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitCorrupt = 1;
constexpr int kExitUsage = 2;

struct DumpOptions {
  bool json = false;
  bool partial = false;
  bool quiet = false;  // header and summary only, no per-record lines
};

std::string Hex(const GenerationId& id) {
  static const char* kDigits = "0123456789abcdef";
  std::string out;
  for (uint8_t b : id) {
    out.push_back(kDigits[b >> 4]);
    out.push_back(kDigits[b & 15]);
  }
  return out;
}

std::string Hex64(uint64_t v) {
  char buf[19];
  std::snprintf(buf, sizeof(buf), "0x%016llx", static_cast<unsigned long long>(v));
  return buf;
}

int ErrorExit(const Status& s) {
  // Usage-type failures (the file is not there or cannot be read) are 2.
  return (s.code() == Code::kNotFound || s.code() == Code::kIOError || s.code() == Code::kPermissionDenied)
             ? kExitUsage
             : kExitCorrupt;
}

int DumpDeltaLog(const std::string& path, const DumpOptions& options) {
  nlohmann::json out;
  out["file"] = path;
  out["format"] = "delta-log";
  auto fail = [&](const Status& s) {
    if (options.json) {
      out["ok"] = false;
      out["error"] = s.ToString();
      std::cout << out.dump(2) << "\n";
    } else {
      std::cout << "ERROR " << s.ToString() << "\n";
    }
    std::cerr << "vmreplica-dump: " << s.ToString() << "\n";
    return ErrorExit(s);
  };
  Result<std::unique_ptr<LogReader>> opened =
      LogReader::Open(path, options.partial ? LogReadMode::kPartial : LogReadMode::kComplete);
  if (!opened.ok()) return fail(opened.status());
  LogReader& reader = **opened;
  const LogHeader& h = reader.header();
  if (options.json) {
    nlohmann::json header = {{"version", log::kVersion1},
                             {"relationship_id", h.relationship_id},
                             {"relationship_index", h.relationship_index},
                             {"sequence", h.sequence},
                             {"base_generation", Hex(h.base_generation)},
                             {"new_generation", Hex(h.new_generation)},
                             {"cut_time_unix_ms", h.cut_time_unix_ms},
                             {"kind", static_cast<int>(h.kind)},
                             {"kind_name", std::string(Name(h.kind))}};
    header["disks"] = nlohmann::json::array();
    for (const LogDisk& d : h.disks) header["disks"].push_back({{"name", d.name}, {"size_bytes", d.size_bytes}});
    out["header"] = header;
    out["records"] = nlohmann::json::array();
  } else {
    std::cout << "file " << path << "\nformat delta-log version " << log::kVersion1 << "\n"
              << "relationship " << h.relationship_id << " index " << h.relationship_index << "\n"
              << "sequence " << h.sequence << "\n"
              << "kind " << static_cast<int>(h.kind) << " (" << Name(h.kind) << ")\n"
              << "base_generation " << Hex(h.base_generation) << "\n"
              << "new_generation " << Hex(h.new_generation) << "\n"
              << "cut_time_unix_ms " << h.cut_time_unix_ms << "\n"
              << "disks " << h.disks.size() << "\n";
    for (size_t i = 0; i < h.disks.size(); ++i) {
      std::cout << "  disk " << i << " " << h.disks[i].name << " size " << h.disks[i].size_bytes << "\n";
    }
  }
  while (true) {
    Result<std::optional<LogRecordInfo>> next = reader.NextRecord();
    if (!next.ok()) return fail(next.status());
    if (!*next) break;
    const LogRecordInfo& info = **next;
    const DeltaRecord& r = info.record;
    const char* compression = info.compression == LogCompression::kZstd ? "zstd" : "none";
    if (options.quiet) continue;
    if (options.json) {
      out["records"].push_back({{"file_offset", info.file_offset},
                                {"type", r.zero ? "zero" : "data"},
                                {"disk", r.disk},
                                {"offset", r.offset},
                                {"length", r.length},
                                {"compression", compression},
                                {"stored_length", info.stored_length},
                                {"checksum", Hex64(info.checksum)},
                                {"checksum_ok", true}});
    } else {
      std::cout << "record @" << info.file_offset << " " << (r.zero ? "zero" : "data") << " disk " << r.disk
                << " offset " << r.offset << " length " << r.length << " compression " << compression << " stored "
                << info.stored_length << " checksum " << Hex64(info.checksum) << " ok\n";
    }
  }
  const LogTrailer& totals = reader.trailer() ? *reader.trailer() : reader.read_totals();
  bool complete = reader.trailer().has_value();
  if (options.json) {
    out["trailer"] = {{"complete", complete},
                      {"record_count", totals.record_count},
                      {"data_bytes", totals.data_bytes},
                      {"zero_bytes", totals.zero_bytes},
                      {"chain", Hex64(totals.chain)}};
    out["valid_prefix_bytes"] = reader.valid_prefix_bytes();
    out["ok"] = true;
    std::cout << out.dump(2) << "\n";
  } else {
    std::cout << (complete ? "trailer complete" : "no trailer (partial)") << " records " << totals.record_count
              << " data_bytes " << totals.data_bytes << " zero_bytes " << totals.zero_bytes << " chain "
              << Hex64(totals.chain) << (complete ? " ok" : "") << "\n"
              << "valid_prefix_bytes " << reader.valid_prefix_bytes() << "\nOK\n";
  }
  return kExitOk;
}

// Reads exactly `n` bytes at `offset`; answers the count read (short at EOF)
// or -1 with errno set.
ssize_t ReadAt(int fd, char* buf, size_t n, uint64_t offset) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = ::pread(fd, buf + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (r == 0) break;
    done += static_cast<size_t>(r);
  }
  return static_cast<ssize_t>(done);
}

// Prints a failure the way DumpDeltaLog does and answers the exit code.
int Fail(const Status& s, const DumpOptions& options, nlohmann::json* out) {
  if (options.json) {
    (*out)["ok"] = false;
    (*out)["error"] = s.ToString();
    std::cout << out->dump(2) << "\n";
  } else {
    std::cout << "ERROR " << s.ToString() << "\n";
  }
  std::cerr << "vmreplica-dump: " << s.ToString() << "\n";
  return ErrorExit(s);
}

Status UndoCorrupt(uint64_t offset, const std::string& why) {
  return Status::Corruption("undo segment: at offset " + std::to_string(offset) + ": " + why);
}

// Undo segment (.vru), docs/replica_store.md section 4. Every field of a
// record is checked before it is used; a committed segment ends with a
// trailer exactly at end of file. With --partial (a segment of an apply in
// progress) the file may end after any valid batch marker; bytes after the
// last valid marker are a torn tail and are reported, not an error.
int DumpUndoSegment(const std::string& path, const DumpOptions& options) {
  namespace ri = replica_internal;
  nlohmann::json out;
  out["file"] = path;
  out["format"] = "undo-segment";
  auto fail = [&](const Status& s) { return Fail(s, options, &out); };
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail(Status::IOError(path + ": " + std::strerror(errno)));
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  char hdr[ri::kSegmentHeaderSize];
  ssize_t n = ReadAt(fd, hdr, sizeof(hdr), 0);
  if (n < 0) return fail(Status::IOError(path + ": " + std::strerror(errno)));
  if (n < static_cast<ssize_t>(sizeof(hdr))) {
    return fail(UndoCorrupt(static_cast<uint64_t>(n), "truncated header (" + std::to_string(n) + " of 64 bytes)"));
  }
  ri::SegmentHeader h;
  if (Status s = ri::DecodeSegmentHeader(hdr, &h); !s.ok()) return fail(UndoCorrupt(0, s.message()));
  if (h.disk_count == 0 || h.disk_count > ri::kMaxDisks) {
    return fail(UndoCorrupt(32, "bad disk count " + std::to_string(h.disk_count)));
  }
  if (options.json) {
    out["header"] = {{"version", ri::kFormatVersion},
                     {"block_size", h.block_size},
                     {"point_seq", h.point_seq},
                     {"upper_seq", h.upper_seq},
                     {"disk_count", h.disk_count},
                     {"checksum", Hex64(ri::GetU64(hdr + 56))},
                     {"checksum_ok", true}};
    out["records"] = nlohmann::json::array();
  } else {
    std::cout << "file " << path << "\nformat undo-segment version " << ri::kFormatVersion << "\n"
              << "block_size " << h.block_size << "\n"
              << "point_seq " << h.point_seq << "\nupper_seq " << h.upper_seq << "\n"
              << "disk_count " << h.disk_count << "\n"
              << "header checksum " << Hex64(ri::GetU64(hdr + 56)) << " ok\n";
  }
  uint64_t offset = ri::kSegmentHeaderSize;
  uint64_t entries = 0, data_entries = 0, zero_entries = 0, batches = 0;
  uint64_t valid_prefix = offset;  // end of the last valid batch marker / trailer
  uint64_t entries_at_prefix = 0;
  bool complete = false;
  std::unordered_set<uint64_t> seen;  // disk << 52 | block: a block appears at most once
  std::string payload(h.block_size, '\0');
  // A bad record: an error, or with --partial the end of a torn tail.
  Status tail_error;
  while (true) {
    char rec[ri::kRecordHeaderSize];
    n = ReadAt(fd, rec, sizeof(rec), offset);
    if (n < 0) return fail(Status::IOError(path + ": " + std::strerror(errno)));
    if (n == 0) {
      tail_error = UndoCorrupt(offset, "end of file without a trailer");
      break;
    }
    if (n < static_cast<ssize_t>(sizeof(rec))) {
      tail_error = UndoCorrupt(offset, "truncated record header (" + std::to_string(n) + " of 32 bytes)");
      break;
    }
    ri::RecordHeader r = ri::ParseRecordHeader(rec);
    if (r.tag == ri::kEntryTag) {
      if ((r.flags & ~(ri::kEntryFlagZero | ri::kEntryFlagZstd)) != 0) {
        tail_error = UndoCorrupt(offset, "entry has unknown flags " + std::to_string(r.flags));
        break;
      }
      bool zero = (r.flags & ri::kEntryFlagZero) != 0;
      const bool zstd = (r.flags & ri::kEntryFlagZstd) != 0;
      if (!ri::EntryShapeOk(r.flags, r.payload_len, h.block_size)) {
        tail_error = UndoCorrupt(offset, "entry payload_len " + std::to_string(r.payload_len) + " does not fit flags " +
                                             std::to_string(r.flags));
        break;
      }
      if (r.payload_len > 0) {
        n = ReadAt(fd, payload.data(), r.payload_len, offset + sizeof(rec));
        if (n < 0) return fail(Status::IOError(path + ": " + std::strerror(errno)));
        if (n < static_cast<ssize_t>(r.payload_len)) {
          tail_error = UndoCorrupt(offset, "truncated entry payload");
          break;
        }
      }
      if (!ri::EntryChecksumOk(rec, payload.data(), r.payload_len)) {
        tail_error = UndoCorrupt(offset, "entry checksum mismatch");
        break;
      }
      if (r.disk >= h.disk_count) {
        tail_error = UndoCorrupt(offset, "entry disk " + std::to_string(r.disk) + " >= disk_count");
        break;
      }
      if (r.block >= (1ull << 52) / h.block_size) {
        tail_error = UndoCorrupt(offset, "entry block " + std::to_string(r.block) + " out of range");
        break;
      }
      if (!seen.insert((static_cast<uint64_t>(r.disk) << 52) | r.block).second) {
        tail_error = UndoCorrupt(
            offset, "block " + std::to_string(r.block) + " of disk " + std::to_string(r.disk) + " appears twice");
        break;
      }
      ++entries;
      ++(zero ? zero_entries : data_entries);
      if (!options.quiet) {
        if (options.json) {
          out["records"].push_back({{"file_offset", offset},
                                    {"type", "entry"},
                                    {"disk", r.disk},
                                    {"block", r.block},
                                    {"offset", r.block * h.block_size},
                                    {"was_zero", zero},
                                    {"zstd", zstd},
                                    {"payload_len", r.payload_len},
                                    {"checksum", Hex64(r.checksum)},
                                    {"checksum_ok", true}});
        } else {
          std::cout << "entry @" << offset << " disk " << r.disk << " block " << r.block << " offset "
                    << r.block * h.block_size << (zero ? " was-zero" : zstd ? " data zstd" : " data") << " payload " << r.payload_len
                    << " checksum " << Hex64(r.checksum) << " ok\n";
        }
      }
      offset += sizeof(rec) + r.payload_len;
      continue;
    }
    if (r.tag == ri::kBatchTag || r.tag == ri::kTrailerTag) {
      const bool trailer = r.tag == ri::kTrailerTag;
      const char* what = trailer ? "trailer" : "batch marker";
      if (!ri::MarkerChecksumOk(rec)) {
        tail_error = UndoCorrupt(offset, std::string(what) + " checksum mismatch");
        break;
      }
      if (r.offset != offset) {
        tail_error = UndoCorrupt(offset, std::string(what) + " names offset " + std::to_string(r.offset));
        break;
      }
      if (r.entry_count != entries) {
        tail_error = UndoCorrupt(offset, std::string(what) + " counts " + std::to_string(r.entry_count) +
                                             " entries, the file has " + std::to_string(entries));
        break;
      }
      if (!options.quiet) {
        if (options.json) {
          out["records"].push_back({{"file_offset", offset},
                                    {"type", trailer ? "trailer" : "batch"},
                                    {"entry_count", r.entry_count},
                                    {"checksum", Hex64(r.checksum)},
                                    {"checksum_ok", true}});
        } else {
          std::cout << (trailer ? "trailer @" : "batch @") << offset << " entries " << r.entry_count << " checksum "
                    << Hex64(r.checksum) << " ok\n";
        }
      }
      offset += sizeof(rec);
      valid_prefix = offset;
      entries_at_prefix = entries;
      if (!trailer) {
        ++batches;
        continue;
      }
      char extra;
      n = ReadAt(fd, &extra, 1, offset);
      if (n < 0) return fail(Status::IOError(path + ": " + std::strerror(errno)));
      if (n > 0) {
        tail_error = UndoCorrupt(offset, "bytes after the trailer");
        break;
      }
      complete = true;
      break;
    }
    tail_error = UndoCorrupt(offset, "unknown record tag " + Hex64(r.tag));
    break;
  }
  if (!complete && !options.partial) return fail(tail_error);
  if (options.json) {
    out["trailer"] = {{"complete", complete},
                      {"entries", entries_at_prefix},
                      {"data_entries", data_entries},
                      {"zero_entries", zero_entries},
                      {"batches", batches}};
    if (!complete) out["torn_tail"] = tail_error.ToString();
    out["valid_prefix_bytes"] = valid_prefix;
    out["ok"] = true;
    std::cout << out.dump(2) << "\n";
  } else {
    if (!complete) std::cout << "torn tail (ignored, --partial): " << tail_error.ToString() << "\n";
    std::cout << (complete ? "trailer complete" : "no trailer (partial)") << " entries " << entries_at_prefix
              << " data " << data_entries << " was-zero " << zero_entries << " batches " << batches << "\n"
              << "valid_prefix_bytes " << valid_prefix << "\nOK\n";
  }
  return kExitOk;
}

// Replica MANIFEST, docs/replica_store.md section 3. Small: read whole.
int DumpManifest(const std::string& path, const DumpOptions& options) {
  namespace ri = replica_internal;
  nlohmann::json out;
  out["file"] = path;
  out["format"] = "replica-manifest";
  auto fail = [&](const Status& s) { return Fail(s, options, &out); };
  std::string bytes;
  {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fail(Status::IOError(path + ": " + std::strerror(errno)));
    char buf[65536];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof(buf))) != 0) {
      if (n < 0) {
        if (errno == EINTR) continue;
        Status s = Status::IOError(path + ": " + std::strerror(errno));
        ::close(fd);
        return fail(s);
      }
      bytes.append(buf, static_cast<size_t>(n));
    }
    ::close(fd);
  }
  Result<ri::Manifest> m = ri::DecodeManifest(bytes);
  if (!m.ok()) {
    // The checksum (last 8 bytes) is verified first and covers everything
    // before it, so a damaged byte anywhere shows up there.
    uint64_t at = bytes.size() >= 8 ? bytes.size() - 8 : 0;
    if (m.status().message().find("checksum") == std::string::npos) at = 0;
    return fail(Status::Corruption("at offset " + std::to_string(at) + ": " + m.status().message()));
  }
  const uint64_t checksum = ri::GetU64(bytes.data() + bytes.size() - 8);
  const uint32_t version = ri::GetU32(bytes.data() + 8);  // DecodeManifest checked the header
  if (options.json) {
    out["header"] = {{"version", version}, {"block_size", m->block_size}, {"vm_id", m->vm_id}};
    out["carried"] = m->carried;
    out["disks"] = nlohmann::json::array();
    for (const ReplicaDisk& d : m->disks) out["disks"].push_back({{"name", d.name}, {"size_bytes", d.size}});
    out["points"] = nlohmann::json::array();
    for (const ri::ManifestPoint& p : m->points) {
      out["points"].push_back(
          {{"sequence", p.sequence}, {"time_ms", p.time_ms}, {"kind", p.kind}, {"generation", p.generation}});
    }
    out["checksum"] = Hex64(checksum);
    out["ok"] = true;
    std::cout << out.dump(2) << "\n";
  } else {
    std::cout << "file " << path << "\nformat replica-manifest version " << version << "\n"
              << "block_size " << m->block_size << "\nvm_id " << m->vm_id << "\ndisks " << m->disks.size() << "\n";
    for (size_t i = 0; i < m->disks.size(); ++i) {
      std::cout << "  disk " << i << " " << m->disks[i].name << " size " << m->disks[i].size << "\n";
    }
    std::cout << "points " << m->points.size() << "\n";
    if (!options.quiet) {
      for (const ri::ManifestPoint& p : m->points) {
        std::cout << "  point " << p.sequence << " time_ms " << p.time_ms << " kind " << p.kind << " generation "
                  << (p.generation.empty() ? "-" : p.generation) << "\n";
      }
    }
    if (!m->carried.empty()) {
      std::cout << "carried segments";
      for (uint64_t c : m->carried) std::cout << " " << c;
      std::cout << "\n";
    }
    std::cout << "checksum " << Hex64(checksum) << " ok\nOK\n";
  }
  return kExitOk;
}

// One entry per file format, found by the first 8 bytes of the file.
struct Format {
  char magic[8];
  const char* name;
  int (*dump)(const std::string& path, const DumpOptions& options);
};

const Format kFormats[] = {
    {{'V', 'M', 'R', 'D', 'E', 'L', 'T', 'A'}, "delta-log", &DumpDeltaLog},
    {{'V', 'M', 'R', 'U', 'N', 'D', 'O', '1'}, "undo-segment", &DumpUndoSegment},
    {{'V', 'M', 'R', 'M', 'A', 'N', 'I', '1'}, "replica-manifest", &DumpManifest},
};

int Run(int argc, char** argv) {
  CLI::App app{
      "Prints a vmreplica file (delta log, undo segment, replica MANIFEST) and verifies every checksum.\n"
      "Exit 0 valid, 1 corrupt or unsupported (reason and byte offset printed), 2 usage error."};
  std::string path;
  DumpOptions options;
  app.add_option("file", path, "the file to dump")->required();
  app.add_flag("--json", options.json, "print JSON");
  app.add_flag("--partial", options.partial,
               "the file is still being written (delta log being received, undo segment of an apply in "
               "progress): a torn tail is its end");
  app.add_flag("-q,--quiet", options.quiet, "do not list the records");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitUsage;
  }
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    std::cerr << "vmreplica-dump: " << path << ": " << std::strerror(errno) << "\n";
    return kExitUsage;
  }
  char magic[8] = {};
  ssize_t n = ::read(fd, magic, sizeof(magic));
  ::close(fd);
  if (n < 0) {
    std::cerr << "vmreplica-dump: " << path << ": " << std::strerror(errno) << "\n";
    return kExitUsage;
  }
  for (const Format& f : kFormats) {
    if (n == static_cast<ssize_t>(sizeof(magic)) && std::memcmp(magic, f.magic, sizeof(magic)) == 0) {
      return f.dump(path, options);
    }
  }
  // Too short for a magic, or an unknown one. A file that starts like a known
  // format but is cut short goes to that format (partial mode may accept it).
  for (const Format& f : kFormats) {
    if (n >= 0 && n < static_cast<ssize_t>(sizeof(magic)) && std::memcmp(magic, f.magic, static_cast<size_t>(n)) == 0) {
      return f.dump(path, options);
    }
  }
  std::cout << "ERROR Corruption: at offset 0: unknown magic\n";
  std::cerr << "vmreplica-dump: " << path << ": not a known vmreplica file (unknown magic)\n";
  return kExitCorrupt;
}

}  // namespace
}  // namespace vmreplica

int main(int argc, char** argv) { return vmreplica::Run(argc, argv); }
