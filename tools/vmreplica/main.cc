// vmreplica: the command-line client of vmreplicad. Everything lives in
// the cli library (src/cli); see cli/cli.h for the verbs and exit codes.
#include <unistd.h>

#include <iostream>

#include "cli/cli.h"

int main(int argc, char** argv) {
  return vmreplica::cli::Main(argc, argv, std::cout, std::cerr, isatty(STDERR_FILENO) == 1);
}
