// NbdDirtyExtents: the dirty ranges of a bitmap context, block status only.
#include <libnbd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <limits>
#include <memory>

#include "blockio/extent_map.h"
#include "blockio/nbd_util.h"
#include "vmreplica/nbd_reader.h"

namespace vmreplica {
namespace {

using blockio_internal::NbdError;
using blockio_internal::RemainingMs;

using Clock = std::chrono::steady_clock;

constexpr uint64_t kAlign = 4096;
// Bytes asked for per block-status request (below the 32-bit NBD limit).
constexpr uint64_t kChunk = 1ull << 30;
constexpr auto kIoTimeout = std::chrono::seconds(60);



struct HandleCloser {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};

// The extents of the one context asked for, checked as they arrive.
struct Collector {
  const char* context = nullptr;
  blockio_internal::ContextExtents extents;
  std::string error;  // first protocol violation, if any

  static int Callback(void* user_data, const char* metacontext, uint64_t offset, uint32_t* entries, size_t nr_entries,
                      int* /*error*/) {
    auto* self = static_cast<Collector*>(user_data);
    if (std::strcmp(metacontext, self->context) != 0) return 0;  // not asked for: ignored
    if (self->error.empty()) self->error = self->extents.Add(metacontext, offset, entries, nr_entries);
    return 0;
  }
};

// Polls `h` until command `cookie` completes; no progress for kIoTimeout is
// Timeout.
Status Wait(nbd_handle* h, int64_t cookie) {
  auto deadline = Clock::now() + kIoTimeout;
  for (;;) {
    const int done = nbd_aio_command_completed(h, static_cast<uint64_t>(cookie));
    if (done == 1) return Status::Ok();
    if (done == -1) return NbdError("block status");
    const int r = nbd_poll(h, RemainingMs(deadline));
    if (r == -1) return NbdError("NBD connection");
    if (r == 1) {
      deadline = Clock::now() + kIoTimeout;
    } else if (Clock::now() >= deadline) {
      return Status::Timeout("no answer from the NBD server within 60 s");
    }
  }
}

}  // namespace

Result<std::vector<ReplicaRange>> NbdDirtyExtents(const std::string& socket_path, const std::string& export_name,
                                                  const std::string& bitmap_context, uint32_t disk_index) {
  if (socket_path.empty()) return Status::InvalidArgument("empty NBD socket path");
  if (bitmap_context.empty() || bitmap_context == LIBNBD_CONTEXT_BASE_ALLOCATION)
    return Status::InvalidArgument("invalid dirty bitmap context '" + bitmap_context + "'");
  const std::string where = "nbd+unix:///" + export_name + "?socket=" + socket_path;
  std::unique_ptr<nbd_handle, HandleCloser> owner(nbd_create());
  nbd_handle* h = owner.get();
  if (h == nullptr) return NbdError("nbd_create");
  if (nbd_set_export_name(h, export_name.c_str()) == -1)
    return Status::InvalidArgument(NbdError("nbd_set_export_name").WithContext(where).message());
  if (nbd_add_meta_context(h, bitmap_context.c_str()) == -1)
    return NbdError("nbd_add_meta_context").WithContext(where);
  if (nbd_aio_connect_unix(h, socket_path.c_str()) == -1)
    return Status::Unavailable(NbdError("connect").WithContext(where).message());
  auto deadline = Clock::now() + kIoTimeout;
  while (nbd_aio_is_ready(h) != 1) {
    if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1)
      return Status::Unavailable(where + ": connection closed during negotiation");
    const int r = nbd_poll(h, RemainingMs(deadline));
    if (r == -1) return Status::Unavailable(NbdError("negotiate").WithContext(where).message());
    if (r == 0 && Clock::now() >= deadline) return Status::Timeout(where + ": no answer during negotiation");
    if (r == 1) deadline = Clock::now() + kIoTimeout;
  }
  const int can = nbd_can_meta_context(h, bitmap_context.c_str());
  if (can == -1) return NbdError("nbd_can_meta_context").WithContext(where);
  if (can == 0)
    return Status::FailedPrecondition(where + ": server does not offer meta context '" + bitmap_context +
                                      "' (dirty bitmap missing or not exported: tracking lost)");
  const int64_t ssize = nbd_get_size(h);
  if (ssize < 0) return NbdError("nbd_get_size").WithContext(where);
  const uint64_t size = static_cast<uint64_t>(ssize);

  std::vector<ReplicaRange> out;
  Collector c;
  c.context = bitmap_context.c_str();
  for (uint64_t pos = 0; pos < size;) {
    c.extents.Reset(pos);
    c.error.clear();
    const uint64_t count = std::min(kChunk, size - pos);
    const int64_t cookie = nbd_aio_block_status(
        h, count, pos, nbd_extent_callback{.callback = &Collector::Callback, .user_data = &c, .free = nullptr},
        nbd_completion_callback{nullptr, nullptr, nullptr}, 0);
    if (cookie == -1) return NbdError("block status at " + std::to_string(pos)).WithContext(where);
    Status s = Wait(h, cookie);
    if (!c.error.empty()) return Status::Corruption(where + ": " + c.error);
    if (!s.ok()) return s.WithContext(where + ": block status at " + std::to_string(pos));
    if (!c.extents.seen())
      return Status::Corruption(where + ": server sent no extents for " + bitmap_context + " at offset " +
                                std::to_string(pos));
    const uint64_t end = std::min(size, c.extents.end());
    if (end <= pos) return Status::Corruption(where + ": block status at " + std::to_string(pos) + " made no progress");
    uint64_t at = pos;
    for (const auto& e : c.extents.extents()) {
      if (at >= end) break;
      const uint64_t e_end = std::min(end, at + e.length);
      if ((e.flags & blockio_internal::kStateDirty) != 0) {
        const uint64_t b = at - at % kAlign;
        const uint64_t f = std::min(size, e_end % kAlign == 0 ? e_end : e_end + (kAlign - e_end % kAlign));
        if (!out.empty() && b <= out.back().offset + out.back().length) {
          out.back().length = std::max(out.back().offset + out.back().length, f) - out.back().offset;
        } else {
          out.push_back(ReplicaRange{disk_index, b, f - b});
        }
      }
      at = e_end;
    }
    pos = end;
  }
  return out;
}

}  // namespace vmreplica
