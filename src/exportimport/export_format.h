// Internal to src/exportimport: the manifest of an initial-replica export,
// its encoding and its validation. Spec: docs/export_format.md (sections 2-4);
// the constants here are the spec's frozen numbers and bounds.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "vmreplica/initial_export.h"
#include "vmreplica/status.h"

namespace vmreplica::exportimport {

constexpr uint32_t kFormatVersion = 1;
constexpr std::string_view kMagicWord = "vmreplica-export";
constexpr std::string_view kFormatName = "vmreplica-initial-export";
constexpr std::string_view kChecksumWord = "xxh3-128";
constexpr const char* kManifestName = "MANIFEST";
constexpr const char* kLockName = "LOCK";

constexpr uint64_t kMaxManifestBytes = 512ull << 20;
constexpr uint64_t kMaxDefinitionBytes = 16ull << 20;
constexpr size_t kMaxVmNameBytes = 200;
constexpr size_t kMaxDisks = 64;
constexpr size_t kMaxDiskNameBytes = 255;
constexpr uint64_t kMaxDiskSize = 1ull << 62;
constexpr uint64_t kMaxChunks = 1ull << 20;
constexpr uint64_t kMaxFiles = 100000;
constexpr uint32_t kMinChunkSize = 64u << 10;
constexpr uint32_t kMaxChunkSize = 64u << 20;
constexpr uint64_t kMinDataFileBytes = 1ull << 20;

// The manifest, decoded.
struct Manifest {
  ExportInfo info;
  uint32_t chunk_size = 0;
  std::vector<uint64_t> file_sizes;  // file i is DataFileName(i)
  std::vector<ExportChunk> chunks;
  ExportTotals totals;
};

// "data-000042.bin".
std::string DataFileName(uint32_t index);
// True for names DataFileName can produce (data-NNNNNN.bin).
bool IsDataFileName(std::string_view name);

// Checks the VM fields and answers them normalised (lowercase id and
// generation). InvalidArgument naming the field otherwise.
Result<ExportInfo> NormalizeInfo(const ExportInfo& info);
// Canonical lowercase UUID, or InvalidArgument.
Result<std::string> NormalizeUuid(std::string_view id);

// "chunk 17 of disk vda".
std::string ChunkName(const Manifest& m, size_t i);

// Every rule of docs/export_format.md sections 3-4 that does not need the
// data files: chunk order, coverage, windows, storage layout, totals.
Status ValidateManifest(const Manifest& m);

// The whole manifest file (magic line, body, checksum line). InvalidArgument
// when a string is not valid UTF-8.
Result<std::string> EncodeManifest(const Manifest& m);

// Parses and validates a manifest file's bytes (all checks of the spec's
// section 8 except the VM id and the data files).
Result<Manifest> DecodeManifest(std::string_view bytes);

}  // namespace vmreplica::exportimport
