// Small checks of text read from the replica's own files (LOAD, IMPORT).
// Internal to src/replica.
#pragma once

#include <string>

namespace vmreplica::replica_internal {

// Exactly 32 hex digits (either case): a generation id in text.
inline bool IsHex32(const std::string& s) {
  if (s.size() != 32) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) return false;
  return true;
}

}  // namespace vmreplica::replica_internal
