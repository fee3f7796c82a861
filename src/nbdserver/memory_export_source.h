// An ExportSource over bytes in memory, for tests and the fuzzer. Extents
// are reported per 4 KiB block: an all-zero block is a hole (HOLE|ZERO).
#pragma once

#include <algorithm>
#include <atomic>
#include <string>

#include "vmreplica/nbd_server.h"

namespace vmreplica::nbd {

class MemoryExportSource : public ExportSource {
 public:
  explicit MemoryExportSource(std::string bytes) : bytes_(std::move(bytes)) {}

  uint64_t size() const override { return bytes_.size(); }

  Status Read(uint64_t offset, uint64_t length, char* out) override {
    if (offset > bytes_.size() || length > bytes_.size() - offset) {
      return Status::InvalidArgument("read beyond the end");
    }
    if (fail_reads_) return Status::IOError("injected read failure");
    bytes_.copy(out, length, offset);
    return Status::Ok();
  }

  Result<std::vector<Extent>> Extents(uint64_t offset, uint64_t length) override {
    if (length == 0 || offset > bytes_.size() || length > bytes_.size() - offset) {
      return Status::InvalidArgument("extent range out of the source");
    }
    constexpr uint64_t kBlock = 4096;
    std::vector<Extent> out;
    uint64_t pos = offset;
    const uint64_t end = offset + length;
    while (pos < end) {
      uint64_t next = std::min(end, (pos / kBlock + 1) * kBlock);
      bool zero = std::all_of(bytes_.begin() + static_cast<std::ptrdiff_t>(pos),
                              bytes_.begin() + static_cast<std::ptrdiff_t>(next),
                              [](char c) { return c == '\0'; });
      if (!out.empty() && out.back().hole == zero) {
        out.back().length += next - pos;
      } else {
        out.push_back({next - pos, zero, zero});
      }
      pos = next;
    }
    return out;
  }

  // Makes every later Read fail with IOError (fault injection).
  void set_fail_reads(bool fail) { fail_reads_ = fail; }

 private:
  const std::string bytes_;
  std::atomic<bool> fail_reads_{false};
};

}  // namespace vmreplica::nbd
