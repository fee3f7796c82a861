// Feeds arbitrary bytes to the delta log reader in both modes. The reader
// must answer records or a Status, never crash, hang or over-allocate; a
// record it answers must obey the bounds of docs/log_format.md.
//
// Random mutations almost never carry a valid XXH3, so each input is also
// read once more with every checksum recomputed (Resign): that lets the
// fuzzer reach the bounds checks, zstd and the trailer behind them.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "logformat/log_format.h"
#include "vmreplica/logformat.h"

namespace {

void Check(bool ok) {
  if (!ok) std::abort();
}

void ReadAll(const std::string& bytes, vmreplica::LogReadMode mode) {
  auto reader = vmreplica::LogReader::OpenBuffer(bytes, mode);
  if (!reader.ok()) return;
  const vmreplica::LogHeader& header = (*reader)->header();
  Check(!header.disks.empty() && header.disks.size() <= vmreplica::kLogMaxDisks);
  uint64_t previous = 0;
  while (true) {
    auto next = (*reader)->NextRecord();
    if (!next.ok()) {
      // Errors are sticky.
      Check(!(*reader)->NextRecord().ok());
      return;
    }
    if (!*next) break;
    const vmreplica::DeltaRecord& r = (*next)->record;
    Check(r.disk < header.disks.size());
    Check(r.length > 0 && r.offset + r.length <= header.disks[r.disk].size_bytes);
    Check(r.zero ? r.data.empty() : r.data.size() == r.length);
    Check((*reader)->valid_prefix_bytes() > previous);
    Check((*reader)->valid_prefix_bytes() <= bytes.size());
    previous = (*reader)->valid_prefix_bytes();
  }
  if (mode == vmreplica::LogReadMode::kComplete) Check((*reader)->trailer().has_value());
}

void PutU64At(std::string& s, size_t at, uint64_t v) {
  std::string le;
  vmreplica::log::PutU64(&le, v);
  s.replace(at, 8, le);
}

// Rewrites the checksums of whatever structure the bytes describe.
std::string Resign(std::string s) {
  using namespace vmreplica::log;
  if (s.size() < kHeaderPrefixSize) return s;
  uint32_t header_length = GetU32(s.data() + 12);
  if (header_length < kHeaderFixedSize + 8 || header_length > s.size()) return s;
  PutU64At(s, header_length - 8, Checksum(std::string_view(s).substr(0, header_length - 8)));
  uint64_t chain = GetU64(s.data() + header_length - 8);
  size_t pos = header_length;
  while (s.size() - pos >= kBlockSize) {
    uint8_t type = static_cast<uint8_t>(s[pos]);
    if (type == kTypeTrailer) PutU64At(s, pos + 32, chain);
    if (type == kTypeData || type == kTypeZero) {
      uint32_t stored = GetU32(s.data() + pos + 24);
      if (stored > s.size() - pos - kBlockSize) break;
      uint64_t record = Checksum2(std::string_view(s).substr(pos, kRecordChecksumOffset),
                                  std::string_view(s).substr(pos + kBlockSize, stored));
      PutU64At(s, pos + kRecordChecksumOffset, record);
      chain = ChainNext(chain, record);
      PutU64At(s, pos + kBlockChecksumOffset, Checksum(std::string_view(s).substr(pos, kBlockChecksumOffset)));
      pos += kBlockSize + stored;
      continue;
    }
    PutU64At(s, pos + kBlockChecksumOffset, Checksum(std::string_view(s).substr(pos, kBlockChecksumOffset)));
    break;
  }
  return s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string bytes(reinterpret_cast<const char*>(data), size);
  ReadAll(bytes, vmreplica::LogReadMode::kComplete);
  ReadAll(bytes, vmreplica::LogReadMode::kPartial);
  std::string resigned = Resign(bytes);
  ReadAll(resigned, vmreplica::LogReadMode::kComplete);
  ReadAll(resigned, vmreplica::LogReadMode::kPartial);
  return 0;
}
