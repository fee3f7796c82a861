// The lab PKI with every knob exposed, for tests that need certificates the
// public functions refuse to make (expired, server-only EKU).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "vmreplica/status.h"

namespace vmreplica::security::internal {

struct LeafOptions {
  int64_t not_before_unix = 0;
  int64_t not_after_unix = 0;  // clamped to the CA's notAfter
  bool server_auth = true;     // at least one of the two must be set
  bool client_auth = true;
};

// IssueHostCertificate with an explicit validity window and EKU. Unlike the
// public function it accepts an expired CA and a window in the past.
Status IssueHostCertificateWithOptions(const std::string& ca_cert_path,
                                       const std::string& ca_key_path,
                                       const std::string& common_name,
                                       const std::vector<std::string>& alt_names,
                                       const std::string& cert_path, const std::string& key_path,
                                       const LeafOptions& options);

}  // namespace vmreplica::security::internal
