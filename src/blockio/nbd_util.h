// Private to src/blockio: libnbd helpers shared by the readers.
#pragma once

#include <libnbd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <limits>
#include <string>

#include "vmreplica/status.h"

namespace vmreplica::blockio_internal {

// Maps the current libnbd error (thread-local) to a Status: connection
// errors Unavailable, a timeout Timeout, protocol violations Corruption.
inline Status NbdError(const std::string& what) {
  const int err = nbd_get_errno();
  const char* msg = nbd_get_error();
  std::string m = what + ": " + (msg != nullptr ? msg : "unknown libnbd error");
  switch (err) {
    case ENOTCONN:
    case ECONNRESET:
    case ECONNREFUSED:
    case ECONNABORTED:
    case EPIPE:
    case ESHUTDOWN:
    case ENOENT:
      return Status::Unavailable(m);
    case ETIMEDOUT:
      return Status::Timeout(m);
    case EPROTO:
    case EBADMSG:
    case EOVERFLOW:
    case ERANGE:
      return Status::Corruption(m);
    default:
      return Status::IOError(m);
  }
}

// Milliseconds left until `deadline` for nbd_poll (0 when past).
inline int RemainingMs(std::chrono::steady_clock::time_point deadline) {
  auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
  if (left <= 0) return 0;
  return static_cast<int>(std::min<long long>(left, std::numeric_limits<int>::max()));
}

}  // namespace vmreplica::blockio_internal
