// The initial-replica export (StartReplication type 2 / ImportInitialReplica):
// a directory <location>/<vm name>-<vm uuid>/ holding a checksummed manifest
// and the disks' data in chunks (zeros never stored, optionally zstd).
// Format, crash-safety protocol and refusals: docs/export_format.md.
// Code: src/exportimport.
//
//   primary:  WriteInitialExport(location, info, all-disks DeltaSource)
//   replica:  ExportReader::Open(dir, vm id) -> VerifyAll() -> Records(k)
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "vmreplica/block_hash.h"
#include "vmreplica/delta.h"
#include "vmreplica/status.h"

namespace vmreplica {

struct ExportDisk {
  std::string name;   // [A-Za-z0-9._-]{1,255}, not starting with '.', unique
  uint64_t size = 0;  // bytes, 1 .. 2^62
};

// What the manifest says about the VM (docs/export_format.md section 3).
struct ExportInfo {
  std::string vm_id;              // UUID; stored lowercase
  std::string vm_name;            // 1..200 bytes UTF-8, no '/', no control characters
  std::string definition;         // opaque (valid UTF-8), at most 16 MiB
  std::vector<ExportDisk> disks;  // 1..64; disk index = position
  std::string generation_id;      // 32 hex digits; stored lowercase
  int64_t cut_time_unix_ms = 0;   // >= 0
};

struct ExportOptions {
  uint32_t chunk_size = 4u << 20;             // power of two, 64 KiB .. 64 MiB
  bool compress = true;                       // zstd per chunk when it shrinks the chunk
  int zstd_level = 1;                         // 1 .. 19
  uint64_t max_data_file_bytes = 1ull << 30;  // a new data file starts beyond this; >= 1 MiB
  // Zero runs shorter than this between data in one window are stored in the
  // data chunk (bounds the chunk count of fragmented disks). 0 = never store
  // zeros. At most chunk_size.
  uint64_t min_zero_run = 0;
  const std::atomic<bool>* cancel = nullptr;  // when set and true: stop with Cancelled
};

// Sums over the chunks (also stored in the manifest's "totals").
struct ExportTotals {
  uint64_t data_bytes = 0;    // disk bytes held by data chunks (uncompressed)
  uint64_t stored_bytes = 0;  // bytes in the data files
  uint64_t zero_bytes = 0;    // disk bytes described by zero chunks (nothing stored)
  uint64_t data_chunks = 0;
  uint64_t zero_chunks = 0;
};

struct ExportSummary {
  std::string directory;  // <location>/<vm name>-<vm uuid>
  ExportTotals totals;
  uint64_t data_files = 0;
};

// Called with (disk bytes done, total disk bytes of all disks), from the
// calling thread.
using ExportProgress = std::function<void(uint64_t done, uint64_t total)>;

// "<vm name>-<vm uuid lowercase>" (the export directory's name).
std::string ExportDirectoryName(const std::string& vm_name, const std::string& vm_id);

// Writes the export of `info` under `location` (created when missing), from
// `source`: records of all disks, disk by disk in index order, each disk in
// increasing offset order, not overlapping, inside the disk; data and zero
// records; ranges not covered read as zeros. Replaces any export (complete
// or partial) of the same VM there; the new export becomes valid only when
// the call succeeds (manifest written last, see the spec section 7).
// Errors: InvalidArgument (bad info/options/records), Busy (another writer
// holds the export's LOCK), Cancelled, IOError, or the source's error; the
// directory is then left without a manifest (not a valid export).
Result<ExportSummary> WriteInitialExport(const std::string& location, const ExportInfo& info,
                                         DeltaSource& source, const ExportOptions& options = {},
                                         const ExportProgress& progress = {});

// One chunk of an export (docs/export_format.md section 4).
struct ExportChunk {
  uint32_t disk = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  bool zero = false;
  bool zstd = false;
  uint64_t stored_length = 0;
  Hash128 hash;             // of the uncompressed bytes (data chunks)
  uint32_t file_index = 0;  // data-<file_index>.bin (data chunks)
  uint64_t file_offset = 0;
};

// A validated export. Immutable after Open; every method may be called from
// several threads at once, and a DeltaSource from Records() may be used from
// another thread than the reader (each source is used by one thread at a
// time). Sources keep what they need alive: they may outlive the reader.
class ExportReader {
 public:
  // Opens and validates `dir` (an export directory) for VM `expected_vm_id`.
  // NotFound: the directory or its MANIFEST is missing (no export or a
  // partial one). InvalidArgument: anything else wrong, with a message
  // naming it. IOError: the OS failed a read. Reads no chunk data.
  static Result<std::unique_ptr<ExportReader>> Open(const std::string& dir,
                                                    const std::string& expected_vm_id);
  ~ExportReader();
  ExportReader(const ExportReader&) = delete;
  ExportReader& operator=(const ExportReader&) = delete;

  const std::string& directory() const;
  const ExportInfo& info() const;
  uint32_t chunk_size() const;
  const ExportTotals& totals() const;

  size_t chunk_count() const;
  // i < chunk_count(). chunk(i).disk/offset/length is chunk i's address range.
  const ExportChunk& chunk(size_t i) const;
  // "chunk 17 of disk vda" (how messages name chunk i).
  std::string ChunkName(size_t i) const;

  // Reads, decompresses and hashes every data chunk. InvalidArgument naming
  // the first chunk that fails; IOError; Cancelled when *cancel becomes true.
  // Progress: (disk bytes checked, total disk bytes).
  Status VerifyAll(const ExportProgress& progress = {},
                   const std::atomic<bool>* cancel = nullptr) const;

  // The export's content from chunk `first_chunk` on, one record per chunk
  // (record i is chunk first_chunk + i): zero chunks as zero records, data
  // chunks as data records whose hash is checked before they are handed out.
  // A failing chunk ends the stream with InvalidArgument (nothing after it).
  // first_chunk == chunk_count() gives an empty stream; beyond it:
  // InvalidArgument.
  Result<std::unique_ptr<DeltaSource>> Records(size_t first_chunk) const;

  struct State;

 private:
  explicit ExportReader(std::shared_ptr<const State> state);
  std::shared_ptr<const State> state_;
};

}  // namespace vmreplica
