// Random identifiers for jobs. Private to src/jobs.
#pragma once

#include <string>

#include "vmreplica/status.h"

namespace vmreplica::jobs_internal {

// A random (version 4, RFC 9562) UUID in lower-case 8-4-4-4-12 form, from
// OpenSSL's CSPRNG. Internal error when the generator cannot be seeded.
Result<std::string> NewUuidV4();

}  // namespace vmreplica::jobs_internal
