// vmreplica-dump: prints a vmreplica file and verifies every checksum.
// The file's 8-byte magic picks the format (kFormats below); a new format
// (e.g. the replica's undo segments) adds one entry there.
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

#include "logformat/log_format.h"
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

// One entry per file format, found by the first 8 bytes of the file.
struct Format {
  char magic[8];
  const char* name;
  int (*dump)(const std::string& path, const DumpOptions& options);
};

const Format kFormats[] = {
    {{'V', 'M', 'R', 'D', 'E', 'L', 'T', 'A'}, "delta-log", &DumpDeltaLog},
};

int Run(int argc, char** argv) {
  CLI::App app{
      "Prints a vmreplica file (delta log) and verifies every checksum.\n"
      "Exit 0 valid, 1 corrupt or unsupported (reason and byte offset printed), 2 usage error."};
  std::string path;
  DumpOptions options;
  app.add_option("file", path, "the file to dump")->required();
  app.add_flag("--json", options.json, "print JSON");
  app.add_flag("--partial", options.partial, "the file is still being received: a torn tail is its end");
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
