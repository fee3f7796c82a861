// Primary-side delta reader: pulls the changed extents of one disk out of a
// QEMU NBD export (normally the fleecing export of a consistent cut, see
// docs/architecture step 3) with libnbd, and hands them out as DeltaRecords.
//
//   Open ──► connect (unix socket, meta contexts negotiated)
//        ──► Next() ... Next() ──► nullopt (end) or an error (reader dead)
//
// Inside Next():
//
//   block status (base:allocation [+ qemu:dirty-bitmap:NAME]) one chunk at a
//   time ─► intersect ─► plan of ranges (zero | data, coalesced)
//   ─► up to requests_in_flight aio preads ─► records in offset order
//
// Which extents become records:
//   - delta mode (a dirty-bitmap context is given): every byte that the
//     bitmap marks dirty is covered by exactly one record; nothing outside it
//     is. Dirty bytes that base:allocation reports NBD_STATE_ZERO become zero
//     records; all other dirty bytes are read and sent as data.
//   - initial-copy mode (no bitmap): every byte NOT reported NBD_STATE_ZERO is
//     read and sent as data; zero extents are skipped, so the caller must
//     apply the records to a target that reads as zeros.
//   NBD_STATE_HOLE without NBD_STATE_ZERO is read as data: the NBD spec only
//   promises zeros for the ZERO bit (a hole may show a backing file's bytes).
//
// Thread safety: none; one thread uses a reader at a time. The reader owns its
// libnbd handle; destroying it closes the connection and abandons reads still
// in flight.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "vmreplica/delta.h"
#include "vmreplica/replica_store.h"
#include "vmreplica/status.h"

struct nbd_handle;

namespace vmreplica {

// Tunables of the reader; Open() rejects values outside the ranges below with
// InvalidArgument.
struct NbdReaderOptions {
  // Largest single NBD read, and the largest data record. [4 KiB, 32 MiB];
  // lowered to the server's advertised maximum block size when smaller.
  // 256 KiB: against qemu-storage-daemon here, 256 KiB reads moved a full
  // export about 2x faster than 4 MiB reads (bench/nbd_read/README.md).
  uint32_t max_request_bytes = 256u << 10;
  // Reads outstanding at once. [1, 64]. Data buffered by the reader never
  // exceeds requests_in_flight * max_request_bytes (4 MiB by default); the
  // buffers given back by Recycle and kept for later reads hold at most as
  // much again.
  uint32_t requests_in_flight = 16;
  // Bytes asked for in one block-status request (the server may answer for
  // less). [4 KiB, 2 GiB]: 32-bit NBD requests cannot ask for 4 GiB.
  uint64_t status_chunk = 1ull << 30;
  // Coalesce adjacent zero extents into records of at most this size.
  // [4 KiB, 2^62].
  uint64_t max_zero_record_bytes = 1ull << 30;
  // Longest time the connection may make no progress while the reader waits
  // (connect, block status, a read) before it gives up with Timeout.
  // [1 ms, 1 h].
  std::chrono::milliseconds io_timeout{60'000};
};

// Counters since Open(); they only grow.
struct NbdReaderStats {
  uint64_t data_bytes = 0;  // bytes returned in data records
  uint64_t zero_bytes = 0;  // bytes returned in zero records
  uint64_t data_records = 0;
  uint64_t zero_records = 0;
  uint64_t read_requests = 0;    // NBD reads issued (one per data record)
  uint64_t status_requests = 0;  // NBD block-status requests issued
  uint64_t extents = 0;          // extents received, all contexts
  uint64_t scanned_bytes = 0;    // export bytes covered by block status
};

class NbdDeltaReader : public DeltaSource {
 public:
  // Connects to `socket_path` (an NBD unix socket) and opens `export_name`.
  // Records carry `disk_index` in DeltaRecord::disk.
  // `dirty_bitmap_context`: the full NBD meta context name, e.g.
  // "qemu:dirty-bitmap:vmr-x-g1"; nullopt selects initial-copy mode.
  // Errors: InvalidArgument (options, names), Unavailable (cannot connect or
  // the server rejects the export), FailedPrecondition (the server does not
  // offer base:allocation or the bitmap context; the message names the
  // context; for a bitmap this means tracking is lost and a resynchronisation
  // is required), Timeout.
  static Result<std::unique_ptr<NbdDeltaReader>> Open(
      const std::string& socket_path, const std::string& export_name, uint32_t disk_index,
      std::optional<std::string> dirty_bitmap_context, const NbdReaderOptions& options = {});

  ~NbdDeltaReader() override;
  NbdDeltaReader(const NbdDeltaReader&) = delete;
  NbdDeltaReader& operator=(const NbdDeltaReader&) = delete;

  // Next record in strictly increasing offset order, records never overlap;
  // nullopt at the end of the export. After any error the reader is dead and
  // every later call answers the same error. Errors: Unavailable (connection
  // lost), IOError (the server failed a read), Corruption (the server's
  // answers break the protocol: bad extent lengths, missing contexts, no
  // progress), Timeout.
  Result<std::optional<DeltaRecord>> Next() override;
  // Keeps up to kMaxSpareBuffers buffers of at most max_request_bytes()
  // capacity, requests_in_flight * max_request_bytes() bytes in all, for
  // later reads: a read takes one big enough for it, which is neither
  // allocated nor zero-filled again.
  void Recycle(std::string buffer) override;

  // Export size in bytes, as the server announced it.
  uint64_t size() const { return size_; }
  // The read size actually used (options clamped to the server's limit).
  uint32_t max_request_bytes() const { return max_request_bytes_; }
  const NbdReaderStats& stats() const { return stats_; }

 private:
  // One planned range; data ranges own a read buffer once issued.
  struct Range {
    uint64_t offset = 0;
    uint64_t length = 0;
    bool zero = false;
    bool issued = false;
    int64_t cookie = 0;
    std::string data;
  };

  static constexpr size_t kMaxSpareBuffers = 64;
  std::vector<std::string> spare_;  // recycled read buffers
  uint64_t spare_bytes_ = 0;        // their capacity in all

  NbdDeltaReader(nbd_handle* h, uint32_t disk_index, std::optional<std::string> bitmap,
                 const NbdReaderOptions& options, uint64_t size, uint32_t max_request_bytes);

  // Walks one block-status chunk at scan_pos_ and appends to plan_.
  Status ScanChunk();
  // Appends [offset, offset+length) of one kind, coalescing with the tail.
  void Plan(uint64_t offset, uint64_t length, bool zero);
  // Issues reads for planned data ranges while fewer than the limit are out.
  Status IssueReads();
  // Waits until command `cookie` completes (1), fails (error) or times out.
  Status WaitFor(int64_t cookie);
  // Marks the reader dead with `s` and returns it.
  Status Fail(const Status& s);

  // Receives block-status extents; defined in the .cc. Lives as long as the
  // handle, because a command abandoned on timeout may still point at it.
  struct ExtentCollector;

  // Constant after construction.
  nbd_handle* h_;
  const uint32_t disk_index_;
  const std::optional<std::string> bitmap_;
  const NbdReaderOptions options_;
  const uint64_t size_;
  const uint32_t max_request_bytes_;
  const std::unique_ptr<ExtentCollector> collector_;

  // Progress.
  uint64_t scan_pos_ = 0;                    // block status known below this offset
  std::deque<std::unique_ptr<Range>> plan_;  // in offset order
  size_t next_issue_ = 0;                    // index in plan_ of the first range not yet issued
  uint32_t in_flight_ = 0;                   // issued ranges not yet returned
  Status failed_;                            // not OK once dead
  NbdReaderStats stats_;
};

// The ranges a dirty bitmap marks in an NBD export, without reading data
// (the reverse sync's candidates, docs/failover.md section 12 step 2):
// block status for `bitmap_context` only (e.g. "qemu:dirty-bitmap:vmr-x-g2")
// over the whole export, one request per chunk of at most 1 GiB, every reply
// checked (contiguous from the request's offset, no zero lengths, progress).
// Each dirty extent is rounded out to 4096-byte boundaries; the result is
// sorted, coalesced (no two ranges touch or overlap) and clipped to the
// export's size (so a range that reaches the end of an export whose size is
// not a multiple of 4096 ends there); every range has `disk` = disk_index.
// Errors: InvalidArgument (empty names, base:allocation as the context),
// Unavailable (cannot connect, no such export, connection lost),
// FailedPrecondition (the server does not offer the context: the bitmap is
// missing or not exported, i.e. tracking is lost), Corruption (replies that
// break the protocol), Timeout (no progress for 60 s).
// Blocking; one connection, closed before returning. Thread-safe (no shared
// state).
Result<std::vector<ReplicaRange>> NbdDirtyExtents(const std::string& socket_path,
                                                  const std::string& export_name,
                                                  const std::string& bitmap_context,
                                                  uint32_t disk_index);

}  // namespace vmreplica
