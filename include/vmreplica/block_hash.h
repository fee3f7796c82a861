// Block hashing for seeded initial replication and resynchronisation: both
// sides hash a disk in fixed blocks with XXH3-128, reading every byte once,
// exchange the compact hash lists and send only the blocks that differ.
// Serialised format: docs/export_format.md section 9. Code: src/exportimport.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "vmreplica/delta.h"
#include "vmreplica/status.h"

namespace vmreplica {

// One XXH3-128 value.
struct Hash128 {
  uint64_t high = 0;
  uint64_t low = 0;
  friend bool operator==(const Hash128&, const Hash128&) = default;
};

// XXH3-128 (seed 0) of `length` bytes.
Hash128 HashBytes(const void* data, size_t length);
// XXH3-128 of `length` zero bytes (what an all-zero block hashes to).
Hash128 HashOfZeros(uint64_t length);
// 32 lowercase hex digits, high half first (the canonical form).
std::string HashToHex(const Hash128& h);
// Parses HashToHex's form (exactly 32 lowercase hex digits).
Result<Hash128> HashFromHex(std::string_view hex);

// The hashes of one disk, or of a run of its blocks (so that a paused resync
// can continue without hashing again what it did). Block i covers
// [i*block_size, min((i+1)*block_size, disk_size)); hashes[k] is block
// first_block + k; 1 <= hashes.size() and first_block + hashes.size() <=
// TotalBlocks().
struct BlockHashList {
  uint32_t block_size = 0;
  uint64_t disk_size = 0;
  uint64_t first_block = 0;
  std::vector<Hash128> hashes;

  // ceil(disk_size / block_size): the blocks of the whole disk.
  uint64_t TotalBlocks() const;
};

constexpr uint32_t kMinHashBlockSize = 4096;
constexpr uint32_t kMaxHashBlockSize = 64u << 20;
constexpr uint64_t kMaxHashBlocks = 1ull << 28;

// Checks block_size, disk_size, first_block and the count (InvalidArgument
// otherwise).
Status ValidateBlockHashList(const BlockHashList& list);
// The serialised form (docs/export_format.md section 9). `list` must be valid.
std::string SerializeBlockHashes(const BlockHashList& list);
// Parses and checks a serialised list; anything malformed is InvalidArgument.
Result<BlockHashList> ParseBlockHashes(std::string_view bytes);

// A maximal run of differing blocks.
struct BlockRange {
  uint64_t first_block = 0;
  uint64_t block_count = 0;
  uint64_t offset = 0;  // first_block * block_size
  uint64_t length = 0;  // bytes covered, clamped at the disk end
  friend bool operator==(const BlockRange&, const BlockRange&) = default;
};

// The runs of blocks whose hashes differ, merged, in increasing order (block
// numbers of the disk, not of the list). InvalidArgument when the lists differ
// in block size or disk size (a copy of another size) or cover other blocks,
// or either list is invalid.
Result<std::vector<BlockRange>> DiffBlocks(const BlockHashList& a, const BlockHashList& b);

// Tunables of the hashers. Ranges are checked (InvalidArgument).
struct BlockHashOptions {
  uint32_t block_size = 64u << 10;    // power of two, 4 KiB .. 64 MiB
  uint32_t request_bytes = 1u << 20;  // bytes per read request, 64 KiB .. 32 MiB;
                                      // rounded down to a multiple of block_size
                                      // (at least one block)
  uint32_t parallelism = 4;           // file: reader threads; NBD: requests in flight; 1..64
  std::chrono::milliseconds io_timeout{30'000};  // NBD: no progress for this long fails
  const std::atomic<bool>* cancel = nullptr;     // when set and true: stop with Cancelled
  // The blocks to hash: from first_block, block_count of them (0 = up to the
  // end of the disk). first_block must lie inside the disk; a count reaching
  // past the end is cut at the end.
  uint64_t first_block = 0;
  uint64_t block_count = 0;
};

// What a hasher did.
struct BlockHashStats {
  uint64_t bytes_read = 0;   // bytes read (every byte of the hashed blocks at most once)
  uint64_t hole_bytes = 0;   // bytes hashed as zeros without reading: a file's holes
                             // (SEEK_DATA), an export's extents the server reports as
                             // reading zeros (NBD base:allocation, NBD_STATE_ZERO)
  uint64_t zero_blocks = 0;  // blocks found to be all zeros (their hash is HashOfZeros)
  uint64_t read_requests = 0;
};

// Called with (bytes hashed so far, bytes of the blocks to hash), from the calling thread for
// NBD and from any reader thread for files (serialised by the hasher).
using HashProgress = std::function<void(uint64_t done, uint64_t total)>;

// Hashes a local file or block device (its size is the disk size) with pread from
// `options.parallelism` threads, each taking the next request-sized range
// (every byte read at most once: a range inside a hole of a regular file is
// hashed as zeros without reading). The threads live only during the call.
Result<BlockHashList> HashFileBlocks(const std::string& path, const BlockHashOptions& options,
                                     BlockHashStats* stats = nullptr,
                                     const HashProgress& progress = {});

// Hashes an NBD export (unix socket, export name) through libnbd with up to
// `options.parallelism` read requests in flight on one connection, all from
// the calling thread. A server that stops answering for io_timeout is Timeout;
// a lost connection is Unavailable.
Result<BlockHashList> HashNbdBlocks(const std::string& socket_path, const std::string& export_name,
                                    const BlockHashOptions& options,
                                    BlockHashStats* stats = nullptr,
                                    const HashProgress& progress = {});

// The other side's hash lists of a set of disks while they arrive
// (GetBlockHashes answered in windows, docs/protocol.md): one thread
// appends the lists in order, readers wait for the blocks they need. So
// both sides hash at the same time and each reads its disks once.
// Thread-safe.
class HashListFeed {
 public:
  // `disk_sizes`: this side's size of each disk, in order; every list must
  // have `block_size`.
  HashListFeed(uint32_t block_size, std::vector<uint64_t> disk_sizes);

  // The next list: disks in order, each disk's lists consecutive from block
  // 0 (a disk may come in one list). Corruption when a list breaks that
  // order or has another block size; FailedPrecondition for a disk this
  // side does not have; InvalidArgument when its disk size
  // differs from this side's (a copy of another size). A refused list fails
  // the feed with that error.
  Status Append(uint32_t disk, BlockHashList list);
  // Ends the feed. With OK: Corruption unless every disk is complete. With
  // an error: every waiting and later Await answers it. Only the first
  // call counts.
  void Finish(Status status);
  // Waits until blocks [0, end_block) of `disk` arrived and answers the
  // disk's hashes from block 0 (entries below end_block never change and
  // stay valid while the feed lives); once the feed failed, its failure
  // (even for blocks that had arrived); Cancelled when
  // `cancelled` answers true (asked every 100 ms while waiting).
  // InvalidArgument for a disk or block out of range.
  Result<const Hash128*> Await(uint32_t disk, uint64_t end_block, const std::function<bool()>& cancelled = {});

  uint32_t block_size() const { return block_size_; }
  uint32_t disk_count() const { return static_cast<uint32_t>(lists_.size()); }
  uint64_t disk_size(uint32_t disk) const { return lists_.at(disk).disk_size; }
  // True once every disk's list is complete (Finish(OK) may not have come yet).
  bool Complete() const;
  // The whole lists, one per disk; FailedPrecondition unless Complete().
  Result<std::vector<BlockHashList>> Lists() const;

 private:
  const uint32_t block_size_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<BlockHashList> lists_;  // hashes sized at the disk's first list
  std::vector<uint64_t> filled_;      // blocks arrived, per disk
  uint32_t current_ = 0;              // disk being appended
  bool finished_ = false;
  Status failure_;
};

class NbdBlockReader;  // internal to src/exportimport

// The sending side of a seeded replication or resync in one pass over its
// disk: given the other side's hash list, reads the same blocks of an NBD
// export once (up to options.parallelism requests in flight), hashes them and
// yields a record (disk `disk_index`) for every maximal run of blocks whose
// hash differs, in increasing offset order: a zero record when the run's
// blocks are all zeros, a data record otherwise (at most request_bytes per
// record). Blocks with equal hashes are not sent. Used by one thread at a
// time.
//
// A source may cover several runs of blocks (OpenRuns: the reverse sync,
// docs/failover.md section 12 step 4): one connection, the runs read in
// order, each in request-sized pieces counted from the run's own first
// block, so the records are exactly those one Open per run would give, in
// the same order.
class NbdBlockDiffSource final : public DeltaSource {
 public:
  // `remote`: the other side's list; its block size must equal
  // options.block_size and its range (first_block, count) is the range read
  // here (options.first_block / block_count are ignored). InvalidArgument when
  // the export's size differs from remote.disk_size (a copy of another size).
  static Result<std::unique_ptr<NbdBlockDiffSource>> Open(const std::string& socket_path,
                                                          const std::string& export_name,
                                                          uint32_t disk_index, BlockHashList remote,
                                                          const BlockHashOptions& options);

  // Several runs of one disk over one connection. `remote_runs`: the other
  // side's lists, each valid, all with block size options.block_size and the
  // same disk size (the export's), in ascending block order and not
  // overlapping (a run may start where the previous one ends); each is read
  // as Open reads its one list. An empty vector is allowed: the export is
  // still opened and its size is not checked; Next() answers nullopt at
  // once. InvalidArgument for a list that breaks these rules (naming its
  // index) or an export of another size; connection errors as Open.
  static Result<std::unique_ptr<NbdBlockDiffSource>> OpenRuns(
      const std::string& socket_path, const std::string& export_name, uint32_t disk_index,
      std::vector<BlockHashList> remote_runs, const BlockHashOptions& options);

  // One disk compared with the other side's list of it while that list
  // arrives: every block of the export is read once, in order, and each
  // piece waits in `feed` for the other side's hashes of its blocks
  // (`cancelled` ends the wait: Cancelled). The feed's failure ends Next()
  // with it. InvalidArgument when the export's size differs from the
  // feed's size of `disk_index` or the block sizes differ.
  static Result<std::unique_ptr<NbdBlockDiffSource>> OpenFed(const std::string& socket_path,
                                                             const std::string& export_name, uint32_t disk_index,
                                                             std::shared_ptr<HashListFeed> feed,
                                                             const BlockHashOptions& options,
                                                             std::function<bool()> cancelled = {});

  ~NbdBlockDiffSource() override;
  NbdBlockDiffSource(const NbdBlockDiffSource&) = delete;
  NbdBlockDiffSource& operator=(const NbdBlockDiffSource&) = delete;

  Result<std::optional<DeltaRecord>> Next() override;

  // This side's hashes of the first run (for Open: its only run): complete
  // once Next() answered nullopt (a resync can verify the result against
  // them). For a source with several runs use local_runs(); for one with
  // none this is an empty list (block_size 0).
  const BlockHashList& local() const;
  // This side's hashes, one list per run, in the order of the runs (same
  // first_block and count as the other side's); complete once Next()
  // answered nullopt.
  const std::vector<BlockHashList>& local_runs() const { return local_; }
  // Bytes read from the export so far (all runs), zero blocks seen, requests.
  const BlockHashStats& stats() const;
  // Sum of the lengths of the records handed out so far.
  uint64_t sent_bytes() const { return sent_bytes_; }

 private:
  NbdBlockDiffSource(std::unique_ptr<NbdBlockReader> reader, uint32_t disk_index,
                     std::vector<BlockHashList> remote, std::vector<BlockHashList> local,
                     uint32_t block_size);

  std::unique_ptr<NbdBlockReader> reader_;
  const uint32_t disk_index_;
  const uint32_t block_size_;
  const std::vector<BlockHashList> remote_;  // one per run (none when fed)
  std::shared_ptr<HashListFeed> feed_;       // OpenFed: the other side's list of disk disk_index_
  std::function<bool()> cancelled_;
  std::vector<BlockHashList> local_;         // one per run, filled as pieces arrive
  const Hash128 zero_full_;
  size_t run_ = 0;                   // run of the last piece read
  std::deque<DeltaRecord> pending_;  // runs of the current piece not yet handed out
  bool done_ = false;
  uint64_t sent_bytes_ = 0;
};

}  // namespace vmreplica
