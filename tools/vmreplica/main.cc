// vmreplica: the command-line client of vmreplicad. Everything lives in
// the cli library (src/cli); see cli/cli.h for the verbs and exit codes.
#include <grpc/support/log.h>
#include <unistd.h>

#include <cstdlib>
#include <iostream>

#include "cli/cli.h"

namespace {
// gRPC's own log lines ("Handshake failed with fatal error ...") repeat what
// the client reports in its error message; keep them for GRPC_VERBOSITY.
void DiscardGrpcLog(gpr_log_func_args*) {}
}  // namespace

int main(int argc, char** argv) {
  if (std::getenv("GRPC_VERBOSITY") == nullptr) gpr_set_log_function(DiscardGrpcLog);
  return vmreplica::cli::Main(argc, argv, std::cout, std::cerr, isatty(STDERR_FILENO) == 1);
}
