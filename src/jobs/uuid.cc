#include "jobs/uuid.h"

#include <openssl/err.h>
#include <openssl/rand.h>

namespace vmreplica::jobs_internal {

Result<std::string> NewUuidV4() {
  unsigned char b[16];
  if (RAND_bytes(b, sizeof b) != 1) {
    char err[256];
    ERR_error_string_n(ERR_get_error(), err, sizeof err);
    return Status::Internal(std::string("cannot generate a job id: RAND_bytes failed: ") + err);
  }
  b[6] = static_cast<unsigned char>((b[6] & 0x0f) | 0x40);  // version 4
  b[8] = static_cast<unsigned char>((b[8] & 0x3f) | 0x80);  // variant 10
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(36);
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out.push_back('-');
    out.push_back(kHex[b[i] >> 4]);
    out.push_back(kHex[b[i] & 0x0f]);
  }
  return out;
}

}  // namespace vmreplica::jobs_internal
