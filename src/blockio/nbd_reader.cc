#include "vmreplica/nbd_reader.h"

#include <libnbd.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "blockio/extent_map.h"
#include "blockio/nbd_util.h"

static_assert(vmreplica::blockio_internal::kStateZero == LIBNBD_STATE_ZERO);

namespace vmreplica {
namespace {

using blockio_internal::NbdError;
using blockio_internal::RemainingMs;

constexpr uint32_t kMinRequest = 4096;
constexpr uint32_t kMaxRequest = 32u << 20;
constexpr uint32_t kMaxInFlight = 64;
constexpr uint64_t kMinStatusChunk = 4096;
constexpr uint64_t kMaxStatusChunk = 2ull << 30;
constexpr uint64_t kMaxZeroRecord = 1ull << 62;
// Planned ranges kept ahead of the reads before block status stops walking
// ahead (bounds the memory spent on zero ranges while a read is pending).
constexpr size_t kMaxLookaheadRanges = 4096;

constexpr const char* kBaseAllocation = LIBNBD_CONTEXT_BASE_ALLOCATION;
constexpr nbd_completion_callback kNoCompletion{nullptr, nullptr, nullptr};


using Clock = std::chrono::steady_clock;


Status ValidateOptions(const NbdReaderOptions& o) {
  if (o.max_request_bytes < kMinRequest || o.max_request_bytes > kMaxRequest)
    return Status::InvalidArgument("max_request_bytes " + std::to_string(o.max_request_bytes) +
                                   " outside [4 KiB, 32 MiB]");
  if (o.requests_in_flight < 1 || o.requests_in_flight > kMaxInFlight)
    return Status::InvalidArgument("requests_in_flight " + std::to_string(o.requests_in_flight) +
                                   " outside [1, 64]");
  if (o.status_chunk < kMinStatusChunk || o.status_chunk > kMaxStatusChunk)
    return Status::InvalidArgument("status_chunk " + std::to_string(o.status_chunk) +
                                   " outside [4 KiB, 2 GiB]");
  if (o.max_zero_record_bytes < kMinRequest || o.max_zero_record_bytes > kMaxZeroRecord)
    return Status::InvalidArgument("max_zero_record_bytes " +
                                   std::to_string(o.max_zero_record_bytes) +
                                   " outside [4 KiB, 2^62]");
  if (o.io_timeout < std::chrono::milliseconds(1) || o.io_timeout > std::chrono::hours(1))
    return Status::InvalidArgument("io_timeout outside [1 ms, 1 h]");
  return Status::Ok();
}

}  // namespace

// Extents of one block-status reply, per context.
struct NbdDeltaReader::ExtentCollector {
  const char* alloc_name = nullptr;
  const char* dirty_name = nullptr;  // null in initial-copy mode
  blockio_internal::ContextExtents alloc;
  blockio_internal::ContextExtents dirty;
  std::string error;  // first protocol violation seen, if any

  void Reset(uint64_t offset) {
    alloc.Reset(offset);
    dirty.Reset(offset);
    error.clear();
  }

  static int Callback(void* user_data, const char* metacontext, uint64_t offset, uint32_t* entries,
                      size_t nr_entries, int* /*error*/) {
    auto* self = static_cast<ExtentCollector*>(user_data);
    blockio_internal::ContextExtents* c = nullptr;
    if (std::strcmp(metacontext, self->alloc_name) == 0) {
      c = &self->alloc;
    } else if (self->dirty_name != nullptr && std::strcmp(metacontext, self->dirty_name) == 0) {
      c = &self->dirty;
    } else {
      return 0;  // a context we did not ask for: ignore
    }
    if (self->error.empty()) self->error = c->Add(metacontext, offset, entries, nr_entries);
    return 0;
  }
};

Result<std::unique_ptr<NbdDeltaReader>> NbdDeltaReader::Open(
    const std::string& socket_path, const std::string& export_name, uint32_t disk_index,
    std::optional<std::string> dirty_bitmap_context, const NbdReaderOptions& options) {
  VMR_RETURN_IF_ERROR(ValidateOptions(options));
  if (socket_path.empty()) return Status::InvalidArgument("empty NBD socket path");
  if (dirty_bitmap_context.has_value() &&
      (dirty_bitmap_context->empty() || *dirty_bitmap_context == kBaseAllocation))
    return Status::InvalidArgument("invalid dirty bitmap context '" + *dirty_bitmap_context + "'");

  const std::string where = "nbd+unix:///" + export_name + "?socket=" + socket_path;
  nbd_handle* h = nbd_create();
  if (h == nullptr) return NbdError("nbd_create");
  auto fail = [&](const Status& s) -> Status {
    nbd_close(h);
    return s.WithContext(where);
  };

  if (nbd_set_export_name(h, export_name.c_str()) == -1)
    return fail(Status::InvalidArgument(NbdError("nbd_set_export_name").message()));
  // libnbd need not clear read buffers before every read: a read succeeds
  // only once the server's replies covered all of it ("all or nothing",
  // nbd_pread(3)), so no byte of a record is left from before, neither the
  // zeros of a new buffer nor the old data of a recycled one.
  if (nbd_set_pread_initialize(h, false) == -1) return fail(NbdError("nbd_set_pread_initialize"));
  if (nbd_add_meta_context(h, kBaseAllocation) == -1) return fail(NbdError("nbd_add_meta_context"));
  if (dirty_bitmap_context.has_value() &&
      nbd_add_meta_context(h, dirty_bitmap_context->c_str()) == -1)
    return fail(NbdError("nbd_add_meta_context"));

  // Connect and negotiate without blocking past the timeout.
  if (nbd_aio_connect_unix(h, socket_path.c_str()) == -1) {
    Status s = NbdError("connect");
    return fail(Status::Unavailable(s.message()));
  }
  auto deadline = Clock::now() + options.io_timeout;
  while (nbd_aio_is_ready(h) != 1) {
    if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1)
      return fail(Status::Unavailable("connection closed during negotiation"));
    int r = nbd_poll(h, RemainingMs(deadline));
    if (r == -1) {
      Status s = NbdError("negotiate");
      return fail(Status::Unavailable(s.message()));
    }
    if (r == 0 && Clock::now() >= deadline)
      return fail(Status::Timeout("no answer from the NBD server during negotiation"));
    if (r == 1) deadline = Clock::now() + options.io_timeout;
  }

  for (const char* ctx :
       {kBaseAllocation, dirty_bitmap_context.has_value() ? dirty_bitmap_context->c_str()
                                                          : static_cast<const char*>(nullptr)}) {
    if (ctx == nullptr) continue;
    int r = nbd_can_meta_context(h, ctx);
    if (r == -1) return fail(NbdError("nbd_can_meta_context"));
    if (r == 0) {
      std::string m = std::string("server does not offer meta context '") + ctx + "'";
      if (ctx != kBaseAllocation) m += " (dirty bitmap missing or not exported: tracking lost)";
      return fail(Status::FailedPrecondition(m));
    }
  }

  int64_t size = nbd_get_size(h);
  if (size < 0) return fail(NbdError("nbd_get_size"));

  uint32_t max_request = options.max_request_bytes;
  int64_t server_max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
  if (server_max > 0 && static_cast<uint64_t>(server_max) < max_request) {
    max_request = static_cast<uint32_t>(server_max);
    if (max_request < kMinRequest)
      return fail(Status::NotSupported("server maximum block size " + std::to_string(server_max) +
                                       " is below 4 KiB"));
  }
  int64_t server_min = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
  if (server_min > 1) {
    // Reads must be multiples of the minimum block size; keep it simple and
    // only accept servers whose minimum divides 4 KiB (QEMU says 1 or 512).
    if (kMinRequest % static_cast<uint64_t>(server_min) != 0)
      return fail(Status::NotSupported("server minimum block size " + std::to_string(server_min) +
                                       " unsupported"));
    max_request -= max_request % static_cast<uint32_t>(server_min);
  }

  spdlog::debug("nbd reader {}: size {} context {} max request {}", where, size,
                dirty_bitmap_context.value_or("(initial copy)"), max_request);
  return std::unique_ptr<NbdDeltaReader>(
      new NbdDeltaReader(h, disk_index, std::move(dirty_bitmap_context), options,
                         static_cast<uint64_t>(size), max_request));
}

NbdDeltaReader::NbdDeltaReader(nbd_handle* h, uint32_t disk_index,
                               std::optional<std::string> bitmap, const NbdReaderOptions& options,
                               uint64_t size, uint32_t max_request_bytes)
    : h_(h),
      disk_index_(disk_index),
      bitmap_(std::move(bitmap)),
      options_(options),
      size_(size),
      max_request_bytes_(max_request_bytes),
      collector_(std::make_unique<ExtentCollector>()) {
  collector_->alloc_name = kBaseAllocation;
  collector_->dirty_name = bitmap_.has_value() ? bitmap_->c_str() : nullptr;
}

NbdDeltaReader::~NbdDeltaReader() {
  // Close first: libnbd must stop touching read buffers and the collector
  // before the members holding them are destroyed.
  nbd_close(h_);
}

Status NbdDeltaReader::Fail(const Status& s) {
  if (failed_.ok()) {
    failed_ = s;
    spdlog::warn("nbd reader (disk {}): {}", disk_index_, s.ToString());
  }
  return failed_;
}

Status NbdDeltaReader::WaitFor(int64_t cookie) {
  auto deadline = Clock::now() + options_.io_timeout;
  for (;;) {
    int done = nbd_aio_command_completed(h_, static_cast<uint64_t>(cookie));
    if (done == 1) return Status::Ok();
    if (done == -1) return NbdError("NBD command failed");
    int r = nbd_poll(h_, RemainingMs(deadline));
    if (r == -1) return NbdError("NBD connection");
    if (r == 1) {
      deadline = Clock::now() + options_.io_timeout;
    } else if (Clock::now() >= deadline) {
      return Status::Timeout("no answer from the NBD server within " +
                             std::to_string(options_.io_timeout.count()) + " ms");
    }
  }
}

void NbdDeltaReader::Plan(uint64_t offset, uint64_t length, bool zero) {
  const uint64_t limit = zero ? options_.max_zero_record_bytes : max_request_bytes_;
  while (length > 0) {
    if (!plan_.empty()) {
      Range& tail = *plan_.back();
      if (!tail.issued && tail.zero == zero && tail.offset + tail.length == offset &&
          tail.length < limit) {
        uint64_t add = std::min(length, limit - tail.length);
        tail.length += add;
        offset += add;
        length -= add;
        continue;
      }
    }
    auto r = std::make_unique<Range>();
    r->offset = offset;
    r->length = std::min(length, limit);
    r->zero = zero;
    offset += r->length;
    length -= r->length;
    plan_.push_back(std::move(r));
  }
}

Status NbdDeltaReader::ScanChunk() {
  const uint64_t start = scan_pos_;
  const uint64_t count = std::min(options_.status_chunk, size_ - start);
  ExtentCollector& c = *collector_;
  c.Reset(start);
  int64_t cookie = nbd_aio_block_status(
      h_, count, start,
      nbd_extent_callback{.callback = &ExtentCollector::Callback, .user_data = &c, .free = nullptr},
      kNoCompletion, 0);
  if (cookie == -1) return NbdError("block status at " + std::to_string(start));
  ++stats_.status_requests;
  Status s = WaitFor(cookie);
  if (!c.error.empty()) return Status::Corruption(c.error);
  if (!s.ok()) return s.WithContext("block status at " + std::to_string(start));

  auto known = blockio_internal::Intersect(
      size_, c.alloc, c.alloc_name, bitmap_.has_value() ? &c.dirty : nullptr, c.dirty_name,
      [this](uint64_t offset, uint64_t length, bool zero) { Plan(offset, length, zero); });
  if (!known.ok()) return known.status();
  const uint64_t end = *known;
  stats_.extents += c.alloc.extents().size() + c.dirty.extents().size();
  stats_.scanned_bytes += end - start;
  scan_pos_ = end;
  return Status::Ok();
}

Status NbdDeltaReader::IssueReads() {
  while (in_flight_ < options_.requests_in_flight && next_issue_ < plan_.size()) {
    Range& r = *plan_[next_issue_];
    ++next_issue_;
    if (r.zero) continue;
    // A recycled buffer big enough for the read, if any: resize then
    // neither allocates nor fills (it fills only what it adds).
    for (size_t i = spare_.size(); i-- > 0;) {
      if (spare_[i].capacity() >= r.length) {
        spare_bytes_ -= spare_[i].capacity();
        r.data = std::move(spare_[i]);
        spare_[i] = std::move(spare_.back());
        spare_.pop_back();
        break;
      }
    }
    r.data.resize(static_cast<size_t>(r.length));
    int64_t cookie = nbd_aio_pread(h_, r.data.data(), r.data.size(), r.offset, kNoCompletion, 0);
    if (cookie == -1)
      return NbdError("read of " + std::to_string(r.length) + " bytes at " +
                      std::to_string(r.offset));
    r.cookie = cookie;
    r.issued = true;
    ++in_flight_;
    ++stats_.read_requests;
  }
  return Status::Ok();
}

void NbdDeltaReader::Recycle(std::string buffer) {
  const uint64_t cap = buffer.capacity();
  if (spare_.size() < kMaxSpareBuffers && cap <= max_request_bytes_ && !buffer.empty() &&
      spare_bytes_ + cap <= uint64_t{options_.requests_in_flight} * max_request_bytes_) {
    spare_bytes_ += cap;
    spare_.push_back(std::move(buffer));
  }
}

Result<std::optional<DeltaRecord>> NbdDeltaReader::Next() {
  if (!failed_.ok()) return failed_;
  for (;;) {
    if (Status s = IssueReads(); !s.ok()) return Fail(s);
    if (!plan_.empty()) {
      Range& front = *plan_.front();
      if (!front.zero) {
        // While the front read is pending and reads are still free, learn
        // more of the map so the pipeline stays full.
        if (in_flight_ < options_.requests_in_flight && next_issue_ >= plan_.size() &&
            scan_pos_ < size_ && plan_.size() < kMaxLookaheadRanges) {
          if (Status s = ScanChunk(); !s.ok()) return Fail(s);
          continue;
        }
        if (!front.issued) return Fail(Status::Internal("front range not issued"));
        if (Status s = WaitFor(front.cookie); !s.ok())
          return Fail(s.WithContext("read of " + std::to_string(front.length) + " bytes at " +
                                    std::to_string(front.offset)));
        --in_flight_;
      }
      DeltaRecord rec;
      rec.disk = disk_index_;
      rec.offset = front.offset;
      rec.length = front.length;
      rec.zero = front.zero;
      if (front.zero) {
        stats_.zero_bytes += front.length;
        ++stats_.zero_records;
      } else {
        rec.data = std::move(front.data);
        stats_.data_bytes += front.length;
        ++stats_.data_records;
      }
      plan_.pop_front();
      if (next_issue_ > 0) --next_issue_;
      return std::optional<DeltaRecord>(std::move(rec));
    }
    if (scan_pos_ >= size_) return std::optional<DeltaRecord>();
    if (Status s = ScanChunk(); !s.ok()) return Fail(s);
  }
}

}  // namespace vmreplica
