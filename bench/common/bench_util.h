// Helpers shared by the benchmark programs in bench/.
#pragma once

#include <cstdint>
#include <cstdlib>

namespace vmreplica::bench {

// Parses "512M", "4G", "1.5k", "65536": a positive size with an optional
// K/M/G/T suffix (powers of 1024). False for anything else.
inline bool ParseSize(const char* s, uint64_t* out) {
  char* end = nullptr;
  double v = std::strtod(s, &end);
  if (end == s || v <= 0) return false;
  uint64_t mult = 1;
  switch (*end) {
    case 'k': case 'K': mult = 1ull << 10; ++end; break;
    case 'm': case 'M': mult = 1ull << 20; ++end; break;
    case 'g': case 'G': mult = 1ull << 30; ++end; break;
    case 't': case 'T': mult = 1ull << 40; ++end; break;
    default: break;
  }
  if (*end != '\0') return false;
  *out = static_cast<uint64_t>(v * static_cast<double>(mult));
  return true;
}

}  // namespace vmreplica::bench
