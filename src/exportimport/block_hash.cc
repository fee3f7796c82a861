#include "vmreplica/block_hash.h"

#include <fcntl.h>
#include <libnbd.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <thread>

#include "vmreplica/fileutil.h"

namespace vmreplica {
namespace {

constexpr char kMagic[8] = {'V', 'M', 'R', 'B', 'H', 'A', 'S', 'H'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 40;
constexpr size_t kHashBytes = 16;
constexpr size_t kChecksumBytes = 8;
constexpr uint64_t kMaxDiskSize = 1ull << 62;
constexpr uint32_t kMinRequestBytes = 64u << 10;
constexpr uint32_t kMaxRequestBytes = 32u << 20;
// Holes shorter than this are read rather than skipped: a read of a few
// pages costs less than the calls that find and skip them.
constexpr uint64_t kMinHoleSkip = 64u << 10;

void PutLe32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutLe64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint32_t GetLe32(const unsigned char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
uint64_t GetLe64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

Status ValidateShape(uint32_t block_size, uint64_t disk_size) {
  if (!IsPowerOfTwo(block_size) || block_size < kMinHashBlockSize || block_size > kMaxHashBlockSize)
    return Status::InvalidArgument("block size " + std::to_string(block_size) +
                                   " is not a power of two in [4 KiB, 64 MiB]");
  if (disk_size == 0 || disk_size > kMaxDiskSize)
    return Status::InvalidArgument("disk size " + std::to_string(disk_size) + " outside [1, 2^62]");
  const uint64_t count = (disk_size + block_size - 1) / block_size;
  if (count > kMaxHashBlocks)
    return Status::InvalidArgument("disk of " + std::to_string(disk_size) + " bytes has " +
                                   std::to_string(count) + " blocks of " +
                                   std::to_string(block_size) + " (more than 2^28)");
  return Status::Ok();
}

Status ValidateOptions(const BlockHashOptions& o) {
  if (!IsPowerOfTwo(o.block_size) || o.block_size < kMinHashBlockSize ||
      o.block_size > kMaxHashBlockSize)
    return Status::InvalidArgument("block_size " + std::to_string(o.block_size) +
                                   " is not a power of two in [4 KiB, 64 MiB]");
  if (o.request_bytes < kMinRequestBytes || o.request_bytes > kMaxRequestBytes)
    return Status::InvalidArgument("request_bytes " + std::to_string(o.request_bytes) +
                                   " outside [64 KiB, 32 MiB]");
  if (o.parallelism < 1 || o.parallelism > 64)
    return Status::InvalidArgument("parallelism " + std::to_string(o.parallelism) +
                                   " outside [1, 64]");
  if (o.io_timeout < std::chrono::milliseconds(1) || o.io_timeout > std::chrono::hours(1))
    return Status::InvalidArgument("io_timeout outside [1 ms, 1 h]");
  return Status::Ok();
}

// Bytes per request: a multiple of the block size, at least one block.
uint64_t RequestSpan(const BlockHashOptions& o) {
  return std::max<uint64_t>(o.block_size, o.request_bytes - o.request_bytes % o.block_size);
}


// Hashes the blocks of one request buffer that starts at block `first`.
// Returns the number of all-zero blocks. `zero_full` is HashOfZeros(block
// size); short (tail) blocks are hashed normally.
uint64_t HashRequest(const unsigned char* buf, uint64_t bytes, uint64_t first, uint32_t block_size,
                     const Hash128& zero_full, std::vector<Hash128>& out) {
  uint64_t zeros = 0;
  for (uint64_t off = 0, i = first; off < bytes; off += block_size, ++i) {
    const uint64_t n = std::min<uint64_t>(block_size, bytes - off);
    if (IsAllZero(buf + off, n)) {
      ++zeros;
      out[i] = n == block_size ? zero_full : HashOfZeros(n);
    } else {
      out[i] = HashBytes(buf + off, n);
    }
  }
  return zeros;
}

Status Errno(const std::string& what) {
  return Status::IOError(what + ": " + std::strerror(errno));
}

struct ByteRange {
  uint64_t begin;
  uint64_t end;
};

// Sets list.first_block and sizes list.hashes for the blocks `o` asks for
// (list.block_size and disk_size set); answers their bytes.
Result<ByteRange> PlanRange(const BlockHashOptions& o, BlockHashList& list) {
  VMR_RETURN_IF_ERROR(ValidateShape(list.block_size, list.disk_size));
  const uint64_t total = list.TotalBlocks();
  if (o.first_block >= total)
    return Status::InvalidArgument("first block " + std::to_string(o.first_block) +
                                   " beyond the disk's " + std::to_string(total) + " blocks");
  const uint64_t left = total - o.first_block;
  const uint64_t count = o.block_count == 0 ? left : std::min(o.block_count, left);
  list.first_block = o.first_block;
  list.hashes.resize(count);
  return ByteRange{o.first_block * list.block_size,
                   std::min((o.first_block + count) * list.block_size, list.disk_size)};
}

}  // namespace

Hash128 HashBytes(const void* data, size_t length) {
  XXH128_hash_t h = XXH3_128bits(data, length);
  return Hash128{h.high64, h.low64};
}

Hash128 HashOfZeros(uint64_t length) {
  // Stream zeros through the hasher: no buffer of `length` bytes needed.
  static const std::vector<unsigned char> zeros(1u << 20, 0);
  XXH3_state_t* st = XXH3_createState();
  XXH3_128bits_reset(st);
  for (uint64_t left = length; left > 0;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(left, zeros.size()));
    XXH3_128bits_update(st, zeros.data(), n);
    left -= n;
  }
  XXH128_hash_t h = XXH3_128bits_digest(st);
  XXH3_freeState(st);
  return Hash128{h.high64, h.low64};
}

std::string HashToHex(const Hash128& h) {
  static const char* kDigits = "0123456789abcdef";
  std::string s(32, '0');
  for (int i = 0; i < 16; ++i) {
    s[15 - i] = kDigits[(h.high >> (4 * i)) & 0xf];
    s[31 - i] = kDigits[(h.low >> (4 * i)) & 0xf];
  }
  return s;
}

Result<Hash128> HashFromHex(std::string_view hex) {
  if (hex.size() != 32) return Status::InvalidArgument("hash is not 32 hex digits");
  Hash128 h;
  for (size_t i = 0; i < 32; ++i) {
    const char c = hex[i];
    uint64_t d = 0;
    if (c >= '0' && c <= '9') {
      d = static_cast<uint64_t>(c - '0');
    } else if (c >= 'a' && c <= 'f') {
      d = static_cast<uint64_t>(c - 'a' + 10);
    } else {
      return Status::InvalidArgument("hash is not 32 lowercase hex digits");
    }
    uint64_t& half = i < 16 ? h.high : h.low;
    half = (half << 4) | d;
  }
  return h;
}

uint64_t BlockHashList::TotalBlocks() const {
  if (block_size == 0) return 0;
  return disk_size / block_size + (disk_size % block_size != 0 ? 1 : 0);
}

namespace {

Status ValidateRange(const BlockHashList& list, uint64_t count) {
  const uint64_t total = list.TotalBlocks();
  if (count == 0 || list.first_block >= total || count > total - list.first_block)
    return Status::InvalidArgument("hash list of blocks [" + std::to_string(list.first_block) +
                                   ", +" + std::to_string(count) + ") does not fit a disk of " +
                                   std::to_string(list.disk_size) + " bytes (" +
                                   std::to_string(total) + " blocks)");
  return Status::Ok();
}

}  // namespace

Status ValidateBlockHashList(const BlockHashList& list) {
  VMR_RETURN_IF_ERROR(ValidateShape(list.block_size, list.disk_size));
  return ValidateRange(list, list.hashes.size());
}

std::string SerializeBlockHashes(const BlockHashList& list) {
  std::string out;
  out.reserve(kHeaderBytes + kHashBytes * list.hashes.size() + kChecksumBytes);
  out.append(kMagic, sizeof kMagic);
  PutLe32(out, kVersion);
  PutLe32(out, list.block_size);
  PutLe64(out, list.disk_size);
  PutLe64(out, list.first_block);
  PutLe64(out, list.hashes.size());
  for (const Hash128& h : list.hashes) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH128_hash_t{h.low, h.high});
    out.append(reinterpret_cast<const char*>(c.digest), sizeof c.digest);
  }
  PutLe64(out, XXH3_64bits(out.data(), out.size()));
  return out;
}

Result<BlockHashList> ParseBlockHashes(std::string_view bytes) {
  if (bytes.size() < kHeaderBytes + kChecksumBytes)
    return Status::InvalidArgument("hash list of " + std::to_string(bytes.size()) +
                                   " bytes is shorter than its header");
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  if (std::memcmp(p, kMagic, sizeof kMagic) != 0)
    return Status::InvalidArgument("not a block hash list (bad magic)");
  const uint64_t count = GetLe64(p + 32);
  // Check the length against count before trusting count for anything.
  if (count > kMaxHashBlocks || bytes.size() != kHeaderBytes + kHashBytes * count + kChecksumBytes)
    return Status::InvalidArgument("hash list length " + std::to_string(bytes.size()) +
                                   " does not match its count " + std::to_string(count));
  const size_t body = bytes.size() - kChecksumBytes;
  if (XXH3_64bits(p, body) != GetLe64(p + body))
    return Status::InvalidArgument("hash list checksum does not match");
  const uint32_t version = GetLe32(p + 8);
  if (version != kVersion)
    return Status::InvalidArgument("unknown hash list version " + std::to_string(version));
  BlockHashList list;
  list.block_size = GetLe32(p + 12);
  list.disk_size = GetLe64(p + 16);
  list.first_block = GetLe64(p + 24);
  VMR_RETURN_IF_ERROR(ValidateShape(list.block_size, list.disk_size));
  VMR_RETURN_IF_ERROR(ValidateRange(list, count));
  list.hashes.resize(count);
  for (uint64_t i = 0; i < count; ++i) {
    XXH128_canonical_t c;
    std::memcpy(c.digest, p + kHeaderBytes + kHashBytes * i, kHashBytes);
    XXH128_hash_t h = XXH128_hashFromCanonical(&c);
    list.hashes[i] = Hash128{h.high64, h.low64};
  }
  return list;
}

Result<std::vector<BlockRange>> DiffBlocks(const BlockHashList& a, const BlockHashList& b) {
  VMR_RETURN_IF_ERROR(ValidateBlockHashList(a));
  VMR_RETURN_IF_ERROR(ValidateBlockHashList(b));
  if (a.block_size != b.block_size)
    return Status::InvalidArgument("block sizes differ: " + std::to_string(a.block_size) + " and " +
                                   std::to_string(b.block_size));
  if (a.disk_size != b.disk_size)
    return Status::InvalidArgument("disk sizes differ: " + std::to_string(a.disk_size) + " and " +
                                   std::to_string(b.disk_size) + " bytes");
  if (a.first_block != b.first_block || a.hashes.size() != b.hashes.size())
    return Status::InvalidArgument("the hash lists cover different blocks");
  std::vector<BlockRange> out;
  const uint64_t n = a.hashes.size();
  for (uint64_t i = 0; i < n;) {
    if (a.hashes[i] == b.hashes[i]) {
      ++i;
      continue;
    }
    uint64_t j = i + 1;
    while (j < n && !(a.hashes[j] == b.hashes[j])) ++j;
    BlockRange r;
    r.first_block = a.first_block + i;
    r.block_count = j - i;
    r.offset = r.first_block * a.block_size;
    r.length = std::min<uint64_t>((a.first_block + j) * a.block_size, a.disk_size) - r.offset;
    out.push_back(r);
    i = j;
  }
  return out;
}

// ---------------------------------------------------------------- file

Result<BlockHashList> HashFileBlocks(const std::string& path, const BlockHashOptions& options,
                                     BlockHashStats* stats, const HashProgress& progress) {
  VMR_RETURN_IF_ERROR(ValidateOptions(options));
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return Status::NotFound("no such file: " + path);
    return Errno("open " + path);
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st;
  if (fstat(fd, &st) != 0) return Errno("fstat " + path);
  uint64_t size = 0;
  if (S_ISREG(st.st_mode)) {
    size = static_cast<uint64_t>(st.st_size);
  } else if (S_ISBLK(st.st_mode)) {
    if (ioctl(fd, BLKGETSIZE64, &size) != 0) return Errno("BLKGETSIZE64 " + path);
  } else {
    return Status::InvalidArgument(path + " is neither a regular file nor a block device");
  }
  BlockHashList list;
  list.block_size = options.block_size;
  list.disk_size = size;
  VMR_ASSIGN_OR_RETURN(const ByteRange range, PlanRange(options, list));

  const uint64_t span = RequestSpan(options);
  const uint64_t requests = (range.end - range.begin + span - 1) / span;
  const Hash128 zero_full = HashOfZeros(options.block_size);
  const uint32_t threads = static_cast<uint32_t>(std::min<uint64_t>(options.parallelism, requests));

  // Shared between the reader threads, guarded by mu.
  std::mutex mu;
  uint64_t next_request = 0;
  uint64_t done_bytes = 0;
  BlockHashStats total;
  Status failure;

  auto worker = [&]() {
    std::vector<unsigned char> buf(static_cast<size_t>(span));
    for (;;) {
      uint64_t req = 0;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (!failure.ok() || next_request >= requests) return;
        if (options.cancel != nullptr && options.cancel->load()) {
          failure = Status::Cancelled("block hashing of " + path + " cancelled");
          return;
        }
        req = next_request++;
      }
      const uint64_t offset = range.begin + req * span;
      const uint64_t bytes = std::min(span, range.end - offset);
      // A regular file's holes read as zeros: they are zeroed here, not
      // read (a block device, or a file system without SEEK_DATA, is read).
      uint64_t read_here = 0, holes_here = 0;
      Status err;
      for (uint64_t pos = offset; err.ok() && pos < offset + bytes;) {
        const uint64_t end = offset + bytes;
        uint64_t data_end = end;
        if (S_ISREG(st.st_mode)) {
          const off_t d = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
          const uint64_t data = d >= 0 ? std::min<uint64_t>(static_cast<uint64_t>(d), end)
                                       : (errno == ENXIO ? end : pos);
          // A short hole is read with the data after it (fewer calls).
          if (data > pos && (data - pos >= kMinHoleSkip || data == end)) {
            std::memset(buf.data() + (pos - offset), 0, static_cast<size_t>(data - pos));
            holes_here += data - pos;
            pos = data;
            continue;
          }
          if (d >= 0 && data < end) {
            const off_t h = ::lseek(fd, static_cast<off_t>(data), SEEK_HOLE);
            if (h >= 0 && static_cast<uint64_t>(h) > data) data_end = std::min<uint64_t>(static_cast<uint64_t>(h), end);
          }
        }
        for (uint64_t got = pos; got < data_end;) {
          ssize_t n = ::pread(fd, buf.data() + (got - offset), static_cast<size_t>(data_end - got),
                              static_cast<off_t>(got));
          if (n < 0 && errno == EINTR) continue;
          if (n < 0) {
            err = Errno("read " + path + " at " + std::to_string(got));
            break;
          }
          if (n == 0) {
            err = Status::IOError(path + " ended at " + std::to_string(got) + " (shrank while being hashed?)");
            break;
          }
          got += static_cast<uint64_t>(n);
        }
        read_here += data_end - pos;
        pos = data_end;
      }
      uint64_t zeros = 0;
      // Each request writes its own disjoint range of list.hashes.
      if (err.ok())
        zeros = HashRequest(buf.data(), bytes, offset / options.block_size - list.first_block,
                            options.block_size, zero_full, list.hashes);
      std::lock_guard<std::mutex> lock(mu);
      if (!err.ok()) {
        if (failure.ok()) failure = err;
        return;
      }
      total.bytes_read += read_here;
      total.hole_bytes += holes_here;
      total.zero_blocks += zeros;
      ++total.read_requests;
      done_bytes += bytes;
      // Under mu: progress calls are serialised.
      if (progress) progress(done_bytes, range.end - range.begin);
    }
  };
  std::vector<std::thread> pool;
  for (uint32_t i = 1; i < threads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  if (!failure.ok()) return failure;
  if (stats != nullptr) *stats = total;
  return list;
}

// ---------------------------------------------------------------- NBD

namespace {

using Clock = std::chrono::steady_clock;

Status NbdError(const std::string& what) {
  const int err = nbd_get_errno();
  const char* msg = nbd_get_error();
  std::string m = what + ": " + (msg != nullptr ? msg : "unknown libnbd error");
  switch (err) {
    case ENOTCONN:
    case ECONNRESET:
    case ECONNREFUSED:
    case EPIPE:
    case ESHUTDOWN:
    case ENOENT:
      return Status::Unavailable(m);
    case ETIMEDOUT:
      return Status::Timeout(m);
    default:
      return Status::IOError(m);
  }
}

int RemainingMs(Clock::time_point deadline) {
  auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  if (left <= 0) return 0;
  return static_cast<int>(std::min<long long>(left, std::numeric_limits<int>::max()));
}

}  // namespace

// Reads a run of blocks of an NBD export once, in request-sized pieces with
// several requests in flight, handing the pieces out in disk order. Used by
// one thread at a time (libnbd handle and buffers are not shared).
class NbdBlockReader {
 public:
  struct Piece {
    uint64_t offset = 0;
    uint64_t bytes = 0;
    const unsigned char* data = nullptr;  // valid until the next call of Next()
  };

  // Connects; disk_size() is the export's size. No range is read until
  // SetRanges().
  static Result<std::unique_ptr<NbdBlockReader>> Connect(const std::string& socket_path,
                                                         const std::string& export_name,
                                                         const BlockHashOptions& options) {
    VMR_RETURN_IF_ERROR(ValidateOptions(options));
    const std::string where = "nbd+unix:///" + export_name + "?socket=" + socket_path;
    nbd_handle* h = nbd_create();
    if (h == nullptr) return NbdError("nbd_create");
    std::unique_ptr<NbdBlockReader> r(new NbdBlockReader(h, where, options));
    if (nbd_set_export_name(h, export_name.c_str()) == -1)
      return NbdError("nbd_set_export_name").WithContext(where);
    if (nbd_set_pread_initialize(h, false) == -1)
      return NbdError("nbd_set_pread_initialize").WithContext(where);
    // Extents that read as zeros are hashed without being read.
    if (nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1)
      return NbdError("nbd_add_meta_context").WithContext(where);
    if (nbd_aio_connect_unix(h, socket_path.c_str()) == -1)
      return Status::Unavailable(NbdError("connect").WithContext(where).message());
    auto deadline = Clock::now() + options.io_timeout;
    while (nbd_aio_is_ready(h) != 1) {
      if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1)
        return Status::Unavailable(where + ": connection closed during negotiation");
      int rc = nbd_poll(h, RemainingMs(deadline));
      if (rc == -1) return Status::Unavailable(NbdError("negotiate").WithContext(where).message());
      if (rc == 0 && Clock::now() >= deadline)
        return Status::Timeout(where + ": no answer during negotiation");
      if (rc == 1) deadline = Clock::now() + options.io_timeout;
    }
    const int64_t size = nbd_get_size(h);
    if (size < 0) return NbdError("nbd_get_size").WithContext(where);
    r->disk_size_ = static_cast<uint64_t>(size);
    r->zero_map_ = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;

    r->span_ = RequestSpan(options);
    const int64_t server_max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
    if (server_max > 0 && static_cast<uint64_t>(server_max) < r->span_) {
      r->span_ = static_cast<uint64_t>(server_max) -
                 static_cast<uint64_t>(server_max) % options.block_size;
      if (r->span_ == 0)
        return Status::NotSupported(where + ": server maximum request " +
                                    std::to_string(server_max) + " is below the block size");
    }
    const int64_t server_min = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
    if (server_min > 1 && (options.block_size % static_cast<uint64_t>(server_min) != 0 ||
                           r->disk_size_ % static_cast<uint64_t>(server_min) != 0))
      return Status::NotSupported(where + ": server minimum block size " +
                                  std::to_string(server_min) + " unsupported");
    return r;
  }

  // Connects and sizes `list` (block size from options, disk size from the
  // server, range from options.first_block / block_count).
  static Result<std::unique_ptr<NbdBlockReader>> Open(const std::string& socket_path,
                                                      const std::string& export_name,
                                                      const BlockHashOptions& options,
                                                      BlockHashList& list) {
    VMR_ASSIGN_OR_RETURN(auto r, Connect(socket_path, export_name, options));
    list.block_size = options.block_size;
    list.disk_size = r->disk_size_;
    auto range = PlanRange(options, list);
    if (!range.ok()) return range.status().WithContext(r->where_);
    r->SetRanges({*range});
    return r;
  }

  // The byte ranges to read, ascending and not overlapping, each inside the
  // disk. Each is read in request-sized pieces counted from its own start
  // (a piece never spans two ranges). Called once, before Next().
  void SetRanges(std::vector<ByteRange> ranges) {
    ranges_ = std::move(ranges);
    range_ = 0;
    next_offset_ = ranges_.empty() ? 0 : ranges_[0].begin;
    total_bytes_ = 0;
    for (const ByteRange& b : ranges_) total_bytes_ += b.end - b.begin;
  }

  ~NbdBlockReader() {
    // Close first: libnbd must not touch the buffers after they are freed.
    nbd_close(h_);
  }
  NbdBlockReader(const NbdBlockReader&) = delete;
  NbdBlockReader& operator=(const NbdBlockReader&) = delete;

  const std::string& where() const { return where_; }
  uint64_t disk_size() const { return disk_size_; }
  uint64_t range_bytes() const { return total_bytes_; }
  const BlockHashStats& stats() const { return stats_; }
  void CountZeroBlocks(uint64_t n) { stats_.zero_blocks += n; }

  // The next piece in disk order, or nullopt after the last one.
  Result<std::optional<Piece>> Next() {
    if (!failed_.ok()) return failed_;
    auto r = NextImpl();
    if (!r.ok()) failed_ = r.status();
    return r;
  }

 private:
  struct InFlight {
    std::vector<int64_t> cookies;  // reads of the piece's data parts not yet completed
    uint64_t offset;
    uint64_t bytes;
    std::vector<unsigned char>* buf;  // nullptr: the piece reads as zeros (zero_buf_)
    uint64_t read_bytes;              // of `bytes`, read; the rest was known zeros
  };

  NbdBlockReader(nbd_handle* h, std::string where, const BlockHashOptions& options)
      : h_(h), where_(std::move(where)), options_(options) {}

  // base:allocation extents (libnbd's callback): the ones that read as
  // zeros are kept, merged, in zeros_; scan_end_ = the end of what the
  // reply described. Anything odd turns the zero map off (everything is
  // then read), never an error: reading is always correct.
  static int ExtentCallback(void* user, const char* context, uint64_t offset, uint32_t* entries, size_t count,
                            int* /*error*/) {
    auto* self = static_cast<NbdBlockReader*>(user);
    if (std::strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0) return 0;
    if (offset != self->scan_start_ || count % 2 != 0) {
      self->scan_odd_ = true;
      return 0;
    }
    uint64_t pos = offset;
    for (size_t i = 0; i + 1 < count && pos < self->disk_size_; i += 2) {
      if (entries[i] == 0) {
        self->scan_odd_ = true;
        return 0;
      }
      const uint64_t end = std::min<uint64_t>(pos + entries[i], self->disk_size_);
      if ((entries[i + 1] & LIBNBD_STATE_ZERO) != 0) {
        if (!self->zeros_.empty() && self->zeros_.back().end == pos) {
          self->zeros_.back().end = end;
        } else {
          self->zeros_.push_back(ByteRange{pos, end});
        }
      }
      pos = end;
    }
    self->scan_end_ = std::max(self->scan_end_, pos);
    return 0;
  }

  // Learns the extents from `start` on (up to 1 GiB, as far as the server
  // answers). Reads in flight go on meanwhile.
  Status ScanZeros(uint64_t start) {
    scan_start_ = start;
    scan_end_ = start;
    scan_odd_ = false;
    const uint64_t count = std::min<uint64_t>(disk_size_ - start, uint64_t{1} << 30);
    const int64_t cookie = nbd_aio_block_status(
        h_, count, start, nbd_extent_callback{&NbdBlockReader::ExtentCallback, this, nullptr},
        nbd_completion_callback{nullptr, nullptr, nullptr}, 0);
    if (cookie == -1) return NbdError("block status at " + std::to_string(start)).WithContext(where_);
    auto deadline = Clock::now() + options_.io_timeout;
    for (;;) {
      const int done = nbd_aio_command_completed(h_, static_cast<uint64_t>(cookie));
      if (done == -1) {
        // The server answered with an error: read everything from here on.
        if (nbd_aio_is_dead(h_) == 1 || nbd_aio_is_closed(h_) == 1)
          return Status::Unavailable(where_ + ": connection lost");
        zero_map_ = false;
        zeros_.clear();
        return Status::Ok();
      }
      if (done == 1) break;
      const int rc = nbd_poll(h_, RemainingMs(deadline));
      if (rc == -1) return NbdError("NBD connection").WithContext(where_);
      if (rc == 1) {
        deadline = Clock::now() + options_.io_timeout;
      } else if (Clock::now() >= deadline) {
        return Status::Timeout(where_ + ": no answer within " + std::to_string(options_.io_timeout.count()) + " ms");
      }
    }
    if (scan_odd_ || scan_end_ <= start) {
      zero_map_ = false;
      zeros_.clear();
      return Status::Ok();
    }
    mapped_to_ = scan_end_;
    return Status::Ok();
  }

  // The parts of [offset, offset+bytes) that read as zeros by the
  // server's map, ascending: only runs of at least kMinHoleSkip bytes (a
  // shorter one is cheaper to read with its neighbours).
  Result<std::vector<ByteRange>> ZeroParts(uint64_t offset, uint64_t bytes) {
    const uint64_t end = offset + bytes;
    for (;;) {
      while (!zeros_.empty() && zeros_.front().end <= offset) zeros_.pop_front();
      if (!zero_map_) return std::vector<ByteRange>();
      if (mapped_to_ >= end) break;
      VMR_RETURN_IF_ERROR(ScanZeros(std::max(mapped_to_, offset)));
    }
    std::vector<ByteRange> out;
    for (const ByteRange& z : zeros_) {
      if (z.begin >= end) break;
      const ByteRange part{std::max(z.begin, offset), std::min(z.end, end)};
      if (part.end - part.begin >= kMinHoleSkip || part.end - part.begin == bytes) out.push_back(part);
    }
    return out;
  }

  Result<std::optional<Piece>> NextImpl() {
    if (handed_out_ != nullptr) {  // the previous piece is done with
      free_.push_back(handed_out_);
      handed_out_ = nullptr;
    }
    auto deadline = Clock::now() + options_.io_timeout;
    for (;;) {
      if (options_.cancel != nullptr && options_.cancel->load())
        return Status::Cancelled("block hashing of " + where_ + " cancelled");
      while (range_ < ranges_.size() && in_flight_.size() < options_.parallelism) {
        const uint64_t bytes = std::min(span_, ranges_[range_].end - next_offset_);
        VMR_ASSIGN_OR_RETURN(const std::vector<ByteRange> zero, ZeroParts(next_offset_, bytes));
        if (zero.size() == 1 && zero[0].end - zero[0].begin == bytes) {
          // Nothing to read: handed out from a buffer of zeros, in order.
          if (zero_buf_.size() < span_) zero_buf_.assign(static_cast<size_t>(span_), 0);
          in_flight_.push_back(InFlight{{}, next_offset_, bytes, nullptr, 0});
        } else {
          if (free_.empty()) {
            buffers_.emplace_back(static_cast<size_t>(span_));
            free_.push_back(&buffers_.back());
          }
          std::vector<unsigned char>* buf = free_.back();
          InFlight f{{}, next_offset_, bytes, buf, 0};
          // The data parts are read; the zero parts are zeroed here.
          uint64_t at = next_offset_;
          auto read_part = [&](uint64_t from, uint64_t to) -> Status {
            if (to <= from) return Status::Ok();
            const int64_t cookie = nbd_aio_pread(h_, buf->data() + (from - next_offset_), to - from, from,
                                                 nbd_completion_callback{nullptr, nullptr, nullptr}, 0);
            if (cookie == -1) return NbdError("read at " + std::to_string(from)).WithContext(where_);
            f.cookies.push_back(cookie);
            f.read_bytes += to - from;
            ++stats_.read_requests;
            return Status::Ok();
          };
          Status issued;
          for (const ByteRange& z : zero) {
            issued = read_part(at, z.begin);
            if (!issued.ok()) break;
            std::memset(buf->data() + (z.begin - next_offset_), 0, static_cast<size_t>(z.end - z.begin));
            at = z.end;
          }
          if (issued.ok()) issued = read_part(at, next_offset_ + bytes);
          free_.pop_back();
          in_flight_.push_back(std::move(f));  // its buffer stays owned until its reads end
          if (!issued.ok()) return issued;
        }
        next_offset_ += bytes;
        if (next_offset_ == ranges_[range_].end && ++range_ < ranges_.size())
          next_offset_ = ranges_[range_].begin;
      }
      if (in_flight_.empty()) return std::optional<Piece>();
      InFlight& f = in_flight_.front();
      while (!f.cookies.empty()) {
        const int done = nbd_aio_command_completed(h_, static_cast<uint64_t>(f.cookies.back()));
        if (done == -1) return NbdError("read at " + std::to_string(f.offset)).WithContext(where_);
        if (done == 0) break;
        f.cookies.pop_back();
      }
      if (f.cookies.empty()) {
        const Piece piece{f.offset, f.bytes, f.buf != nullptr ? f.buf->data() : zero_buf_.data()};
        stats_.bytes_read += f.read_bytes;
        stats_.hole_bytes += f.bytes - f.read_bytes;
        handed_out_ = f.buf;
        in_flight_.pop_front();
        return std::optional<Piece>(piece);
      }
      const int rc = nbd_poll(h_, RemainingMs(deadline));
      if (rc == -1) return NbdError("NBD connection").WithContext(where_);
      if (rc == 1) {
        deadline = Clock::now() + options_.io_timeout;
      } else if (Clock::now() >= deadline) {
        return Status::Timeout(where_ + ": no answer within " +
                               std::to_string(options_.io_timeout.count()) + " ms");
      }
      if (nbd_aio_is_dead(h_) == 1 || nbd_aio_is_closed(h_) == 1)
        return Status::Unavailable(where_ + ": connection lost");
    }
  }

  nbd_handle* const h_;
  const std::string where_;
  const BlockHashOptions options_;
  uint64_t disk_size_ = 0;
  uint64_t span_ = 0;
  std::vector<ByteRange> ranges_;
  uint64_t total_bytes_ = 0;  // of ranges_

  size_t range_ = 0;                                // range being requested
  uint64_t next_offset_ = 0;                        // next byte to request in ranges_[range_]
  std::deque<std::vector<unsigned char>> buffers_;  // at most parallelism + 1
  std::vector<std::vector<unsigned char>*> free_;
  std::deque<InFlight> in_flight_;  // oldest first
  std::vector<unsigned char>* handed_out_ = nullptr;
  BlockHashStats stats_;
  Status failed_;

  // The server's map of extents that read as zeros (base:allocation).
  bool zero_map_ = false;
  std::deque<ByteRange> zeros_;  // ascending, merged, from the current offset on
  uint64_t mapped_to_ = 0;       // the map is known below this offset
  uint64_t scan_start_ = 0, scan_end_ = 0;
  bool scan_odd_ = false;
  std::vector<unsigned char> zero_buf_;
};

Result<BlockHashList> HashNbdBlocks(const std::string& socket_path, const std::string& export_name,
                                    const BlockHashOptions& options, BlockHashStats* stats,
                                    const HashProgress& progress) {
  BlockHashList list;
  VMR_ASSIGN_OR_RETURN(auto reader, NbdBlockReader::Open(socket_path, export_name, options, list));
  const Hash128 zero_full = HashOfZeros(options.block_size);
  uint64_t done = 0;
  for (;;) {
    VMR_ASSIGN_OR_RETURN(auto piece, reader->Next());
    if (!piece.has_value()) break;
    reader->CountZeroBlocks(HashRequest(piece->data, piece->bytes,
                                        piece->offset / options.block_size - list.first_block,
                                        options.block_size, zero_full, list.hashes));
    done += piece->bytes;
    if (progress) progress(done, reader->range_bytes());
  }
  if (stats != nullptr) *stats = reader->stats();
  return list;
}

// ---------------------------------------------------------------- feed

HashListFeed::HashListFeed(uint32_t block_size, std::vector<uint64_t> disk_sizes) : block_size_(block_size) {
  for (uint64_t size : disk_sizes) {
    BlockHashList l;
    l.block_size = block_size;
    l.disk_size = size;
    lists_.push_back(std::move(l));
  }
  filled_.assign(lists_.size(), 0);
}

Status HashListFeed::Append(uint32_t disk, BlockHashList list) {
  std::unique_lock<std::mutex> lock(mu_);
  if (finished_) return failure_.ok() ? Status::FailedPrecondition("the hash feed has ended") : failure_;
  Status refused = [&]() -> Status {
    if (disk >= lists_.size()) {
      return Status::FailedPrecondition("a hash list of disk " + std::to_string(disk) + ", but this side has " +
                                        std::to_string(lists_.size()) + " disks");
    }
    VMR_RETURN_IF_ERROR(ValidateBlockHashList(list).WithContext("disk " + std::to_string(disk)));
    // Skip disks whose lists are complete (an empty disk never has one).
    while (current_ < lists_.size() && filled_[current_] == lists_[current_].TotalBlocks()) ++current_;
    if (disk != current_) {
      return Status::Corruption("a hash list of disk " + std::to_string(disk) + " while disk " +
                                std::to_string(current_) + " is incomplete");
    }
    BlockHashList& mine = lists_[disk];
    if (list.block_size != block_size_) {
      return Status::Corruption("disk " + std::to_string(disk) + ": a hash list of block size " +
                                std::to_string(list.block_size) + ", not " + std::to_string(block_size_));
    }
    if (list.disk_size != mine.disk_size) {
      return Status::InvalidArgument("disk sizes differ: " + std::to_string(mine.disk_size) + " bytes here, " +
                                     std::to_string(list.disk_size) + " on the other side");
    }
    if (list.first_block != filled_[disk]) {
      return Status::Corruption("disk " + std::to_string(disk) + ": a hash list from block " +
                                std::to_string(list.first_block) + " where block " + std::to_string(filled_[disk]) +
                                " was expected");
    }
    return Status::Ok();
  }();
  if (!refused.ok()) {
    finished_ = true;
    failure_ = refused;
    cv_.notify_all();
    return refused;
  }
  BlockHashList& mine = lists_[disk];
  // Sized once, at the disk's first list: readers keep pointers into it.
  if (mine.hashes.empty()) mine.hashes.resize(mine.TotalBlocks());
  std::copy(list.hashes.begin(), list.hashes.end(), mine.hashes.begin() + static_cast<std::ptrdiff_t>(filled_[disk]));
  filled_[disk] += list.hashes.size();
  cv_.notify_all();
  return Status::Ok();
}

void HashListFeed::Finish(Status status) {
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_) return;
  finished_ = true;
  if (status.ok()) {
    for (size_t d = 0; d < lists_.size(); ++d) {
      if (filled_[d] != lists_[d].TotalBlocks()) {
        status = Status::Corruption("the hash lists ended at block " + std::to_string(filled_[d]) + " of disk " +
                                    std::to_string(d) + " (" + std::to_string(lists_[d].TotalBlocks()) + " blocks)");
        break;
      }
    }
  }
  failure_ = status;
  cv_.notify_all();
}

Result<const Hash128*> HashListFeed::Await(uint32_t disk, uint64_t end_block, const std::function<bool()>& cancelled) {
  std::unique_lock<std::mutex> lock(mu_);
  if (disk >= lists_.size() || end_block > lists_[disk].TotalBlocks()) {
    return Status::InvalidArgument("hash feed: blocks up to " + std::to_string(end_block) + " of disk " +
                                   std::to_string(disk) + " do not exist");
  }
  for (;;) {
    if (finished_ && !failure_.ok()) return failure_;
    if (filled_[disk] >= end_block) return static_cast<const Hash128*>(lists_[disk].hashes.data());
    if (finished_) return Status::Internal("hash feed ended without disk " + std::to_string(disk));
    if (cancelled && cancelled()) return Status::Cancelled("waiting for the other side's block hashes cancelled");
    cv_.wait_for(lock, std::chrono::milliseconds(100));
  }
}

bool HashListFeed::Complete() const {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t d = 0; d < lists_.size(); ++d)
    if (filled_[d] != lists_[d].TotalBlocks()) return false;
  return true;
}

Result<std::vector<BlockHashList>> HashListFeed::Lists() const {
  if (!Complete()) return Status::FailedPrecondition("the hash lists are not complete");
  std::lock_guard<std::mutex> lock(mu_);
  return lists_;
}

// ---------------------------------------------------------------- diff source

NbdBlockDiffSource::NbdBlockDiffSource(std::unique_ptr<NbdBlockReader> reader, uint32_t disk_index,
                                       std::vector<BlockHashList> remote,
                                       std::vector<BlockHashList> local, uint32_t block_size)
    : reader_(std::move(reader)),
      disk_index_(disk_index),
      block_size_(block_size),
      remote_(std::move(remote)),
      local_(std::move(local)),
      zero_full_(HashOfZeros(block_size)) {}

NbdBlockDiffSource::~NbdBlockDiffSource() = default;

Result<std::unique_ptr<NbdBlockDiffSource>> NbdBlockDiffSource::Open(
    const std::string& socket_path, const std::string& export_name, uint32_t disk_index,
    BlockHashList remote, const BlockHashOptions& options) {
  VMR_RETURN_IF_ERROR(ValidateBlockHashList(remote).WithContext("the other side's hash list"));
  if (options.block_size != remote.block_size)
    return Status::InvalidArgument("block size " + std::to_string(options.block_size) +
                                   " differs from the other side's " +
                                   std::to_string(remote.block_size));
  BlockHashOptions o = options;
  o.first_block = remote.first_block;
  o.block_count = remote.hashes.size();
  BlockHashList local;
  // The local disk's size is only known once connected; a range that does
  // not fit it is refused by Open, another size right after.
  VMR_ASSIGN_OR_RETURN(auto reader, NbdBlockReader::Open(socket_path, export_name, o, local));
  if (local.disk_size != remote.disk_size)
    return Status::InvalidArgument("disk sizes differ: " + std::to_string(local.disk_size) +
                                   " bytes here, " + std::to_string(remote.disk_size) +
                                   " on the other side");
  std::vector<BlockHashList> remotes, locals;
  remotes.push_back(std::move(remote));
  locals.push_back(std::move(local));
  return std::unique_ptr<NbdBlockDiffSource>(new NbdBlockDiffSource(
      std::move(reader), disk_index, std::move(remotes), std::move(locals), options.block_size));
}

Result<std::unique_ptr<NbdBlockDiffSource>> NbdBlockDiffSource::OpenRuns(
    const std::string& socket_path, const std::string& export_name, uint32_t disk_index,
    std::vector<BlockHashList> remote_runs, const BlockHashOptions& options) {
  VMR_RETURN_IF_ERROR(ValidateOptions(options));
  for (size_t i = 0; i < remote_runs.size(); ++i) {
    const BlockHashList& r = remote_runs[i];
    const std::string which = "the other side's run " + std::to_string(i);
    VMR_RETURN_IF_ERROR(ValidateBlockHashList(r).WithContext(which));
    if (r.block_size != options.block_size)
      return Status::InvalidArgument(which + ": block size " + std::to_string(r.block_size) +
                                     " differs from " + std::to_string(options.block_size));
    if (i == 0) continue;
    const BlockHashList& prev = remote_runs[i - 1];
    if (r.disk_size != prev.disk_size)
      return Status::InvalidArgument(which + ": disk size " + std::to_string(r.disk_size) +
                                     " differs from run 0's " +
                                     std::to_string(remote_runs[0].disk_size));
    if (r.first_block < prev.first_block + prev.hashes.size())
      return Status::InvalidArgument(which + " starts at block " + std::to_string(r.first_block) +
                                     ", before the end of run " + std::to_string(i - 1) +
                                     " (block " +
                                     std::to_string(prev.first_block + prev.hashes.size()) +
                                     "): runs must be ascending and not overlap");
  }
  VMR_ASSIGN_OR_RETURN(auto reader, NbdBlockReader::Connect(socket_path, export_name, options));
  if (!remote_runs.empty() && reader->disk_size() != remote_runs[0].disk_size)
    return Status::InvalidArgument("disk sizes differ: " + std::to_string(reader->disk_size()) +
                                   " bytes here, " + std::to_string(remote_runs[0].disk_size) +
                                   " on the other side");
  std::vector<BlockHashList> locals;
  std::vector<ByteRange> ranges;
  for (const BlockHashList& r : remote_runs) {
    BlockHashOptions o = options;
    o.first_block = r.first_block;
    o.block_count = r.hashes.size();
    BlockHashList local;
    local.block_size = options.block_size;
    local.disk_size = reader->disk_size();
    VMR_ASSIGN_OR_RETURN(const ByteRange range, PlanRange(o, local));
    ranges.push_back(range);
    locals.push_back(std::move(local));
  }
  reader->SetRanges(std::move(ranges));
  return std::unique_ptr<NbdBlockDiffSource>(
      new NbdBlockDiffSource(std::move(reader), disk_index, std::move(remote_runs),
                             std::move(locals), options.block_size));
}

Result<std::unique_ptr<NbdBlockDiffSource>> NbdBlockDiffSource::OpenFed(
    const std::string& socket_path, const std::string& export_name, uint32_t disk_index,
    std::shared_ptr<HashListFeed> feed, const BlockHashOptions& options, std::function<bool()> cancelled) {
  if (feed == nullptr || disk_index >= feed->disk_count())
    return Status::InvalidArgument("no hash feed for disk " + std::to_string(disk_index));
  if (options.block_size != feed->block_size())
    return Status::InvalidArgument("block size " + std::to_string(options.block_size) +
                                   " differs from the feed's " + std::to_string(feed->block_size()));
  BlockHashOptions o = options;
  o.first_block = 0;
  o.block_count = 0;
  BlockHashList local;
  VMR_ASSIGN_OR_RETURN(auto reader, NbdBlockReader::Open(socket_path, export_name, o, local));
  if (local.disk_size != feed->disk_size(disk_index))
    return Status::InvalidArgument("disk sizes differ: the export has " + std::to_string(local.disk_size) +
                                   " bytes, the feed expects " + std::to_string(feed->disk_size(disk_index)));
  std::vector<BlockHashList> locals;
  locals.push_back(std::move(local));
  std::unique_ptr<NbdBlockDiffSource> source(
      new NbdBlockDiffSource(std::move(reader), disk_index, {}, std::move(locals), options.block_size));
  source->feed_ = std::move(feed);
  source->cancelled_ = std::move(cancelled);
  return source;
}

const BlockHashList& NbdBlockDiffSource::local() const {
  static const BlockHashList kNone;
  return local_.empty() ? kNone : local_.front();
}

const BlockHashStats& NbdBlockDiffSource::stats() const { return reader_->stats(); }

Result<std::optional<DeltaRecord>> NbdBlockDiffSource::Next() {
  const uint32_t bs = block_size_;
  for (;;) {
    // Runs found in the current piece go out first, in order.
    if (!pending_.empty()) {
      DeltaRecord r = std::move(pending_.front());
      pending_.pop_front();
      sent_bytes_ += r.length;
      return std::optional<DeltaRecord>(std::move(r));
    }
    if (done_) return std::optional<DeltaRecord>();
    // Checked per piece: a long run of equal blocks returns nothing for a
    // while, and a send that gave up must not wait for its end.
    if (cancelled_ && cancelled_()) return Status::Cancelled("the block comparison was cancelled");
    VMR_ASSIGN_OR_RETURN(auto piece, reader_->Next());
    if (!piece.has_value()) {
      done_ = true;
      continue;
    }
    // Pieces come in disk order and never span two runs.
    const uint64_t block = piece->offset / bs;
    auto run_end = [this](size_t r) { return local_[r].first_block + local_[r].hashes.size(); };
    while (run_ + 1 < local_.size() && block >= run_end(run_)) ++run_;
    if (run_ >= local_.size() || block < local_[run_].first_block ||
        block + (piece->bytes + bs - 1) / bs > run_end(run_))
      return Status::Internal("piece at " + std::to_string(piece->offset) + " is outside the runs");
    std::vector<Hash128>& local = local_[run_].hashes;
    const uint64_t first = block - local_[run_].first_block;
    reader_->CountZeroBlocks(HashRequest(piece->data, piece->bytes, first, bs, zero_full_, local));
    const uint64_t blocks = (piece->bytes + bs - 1) / bs;
    // The other side's hashes, indexed like `local`; fed: waited for.
    const Hash128* remote = nullptr;
    if (feed_) {
      VMR_ASSIGN_OR_RETURN(const Hash128* all, feed_->Await(disk_index_, block + blocks, cancelled_));
      remote = all + local_[run_].first_block;
    } else {
      remote = remote_[run_].hashes.data();
    }
    // Maximal runs of differing blocks inside the piece; a run is all-zero
    // blocks (a zero record) or not (a data record).
    for (uint64_t k = 0; k < blocks;) {
      if (local[first + k] == remote[first + k]) {
        ++k;
        continue;
      }
      auto is_zero = [&](uint64_t b) {
        return IsAllZero(piece->data + b * bs, std::min<uint64_t>(bs, piece->bytes - b * bs));
      };
      const bool zero = is_zero(k);
      uint64_t j = k + 1;
      while (j < blocks && !(local[first + j] == remote[first + j]) &&
             is_zero(j) == zero)
        ++j;
      const uint64_t off = k * bs;
      const uint64_t len = std::min<uint64_t>(j * bs, piece->bytes) - off;
      if (zero) {
        pending_.push_back(ZeroRecord(disk_index_, piece->offset + off, len));
      } else {
        pending_.push_back(
            DataRecord(disk_index_, piece->offset + off,
                       std::string(reinterpret_cast<const char*>(piece->data) + off, len)));
      }
      k = j;
    }
  }
}

}  // namespace vmreplica
