// The `vmreplica` command line: verbs that mirror the Hyper-V Replica
// cmdlets, each calling the control API of vmreplicad (control.proto), plus
// local certificate tools.
//
//   vmreplica [--socket PATH | --remote HOST:PORT --ca F --cert F --key F]
//             [--json] [--async] [--timeout SECONDS] VERB ...
//
// Exit codes: 0 success; 1 the method or its job failed; 2 bad command
// line; 3 vmreplicad unreachable (see session.h for the output rules).
#pragma once

#include <ostream>
#include <string>
#include <vector>

namespace vmreplica::cli {

// Runs one command line (argv[0] is the program name) and returns the exit
// code. `stderr_is_tty` enables the job progress bar on `err`.
int Main(int argc, const char* const* argv, std::ostream& out, std::ostream& err, bool stderr_is_tty);

// One row of the verb table: a command path ("server get", "failover")
// and the control RPCs it may call. Local verbs (cert ca / issue / show)
// call none. Built from the same registration that builds the command
// line, so the table cannot drift from the commands; the session asserts
// at run time that a verb calls only the RPCs it declares.
struct VerbRpcs {
  std::string verb;
  std::vector<std::string> rpcs;
};
std::vector<VerbRpcs> VerbTable();

}  // namespace vmreplica::cli
