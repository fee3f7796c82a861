#include "cli/cli.h"

#include <sstream>

#include "cli/connection.h"
#include "cli/parse.h"
#include "cli/session.h"
#include "cli/verbs.h"

#ifndef VMREPLICA_VERSION
#define VMREPLICA_VERSION "unknown"
#endif

namespace vmreplica::cli {

// ---------------------------------------------------------------- Registry

CLI::App* Registry::GroupApp(const std::string& path) {
  if (path.empty()) return root_;
  if (auto it = groups_.find(path); it != groups_.end()) return it->second;
  const size_t space = path.rfind(' ');
  CLI::App* parent = GroupApp(space == std::string::npos ? "" : path.substr(0, space));
  CLI::App* group = parent->add_subcommand(space == std::string::npos ? path : path.substr(space + 1));
  group->require_subcommand(1);
  groups_[path] = group;
  return group;
}

void Registry::Group(const std::string& path, const std::string& description) {
  GroupApp(path)->description(description);
}

CLI::App* Registry::Add(const std::string& path, const std::string& description, std::vector<std::string> rpcs,
                        Handler handler) {
  const size_t space = path.rfind(' ');
  CLI::App* parent = GroupApp(space == std::string::npos ? "" : path.substr(0, space));
  CLI::App* verb = parent->add_subcommand(space == std::string::npos ? path : path.substr(space + 1), description);
  const size_t index = handlers_.size();
  handlers_.push_back(std::move(handler));
  table_.push_back({path, std::move(rpcs)});
  verb->callback([this, index] { selected_ = index; });
  return verb;
}

const Handler* Registry::selected_handler() const { return selected_ ? &handlers_[*selected_] : nullptr; }

const std::vector<std::string>* Registry::selected_rpcs() const {
  return selected_ ? &table_[*selected_].rpcs : nullptr;
}

// ---------------------------------------------------------------- helpers

CLI::Validator StatusValidator(std::function<Status(const std::string&)> check, std::string description) {
  return CLI::Validator(
      [check = std::move(check)](std::string& text) -> std::string {
        Status s = check(text);
        return s.ok() ? std::string() : s.message();
      },
      std::move(description));
}

CLI::Option* AddRelationshipOption(CLI::App* app, uint32_t* index) {
  return app
      ->add_option("--relationship", *index,
                   "0 = primary -> replica, 1 = replica -> extended replica (uses the ...Ex method)")
      ->check(CLI::Range(0, 1));
}

std::optional<uint32_t> Given(const CLI::Option* option, uint32_t value) {
  if (option == nullptr || option->count() == 0) return std::nullopt;
  return value;
}

// ---------------------------------------------------------------- the command line

namespace {

struct Cli {
  CLI::App app{
      "vmreplica: Hyper-V Replica for Linux/KVM. Talks to vmreplicad over its admin socket, "
      "or to a remote daemon over mutual TLS.",
      "vmreplica"};
  GlobalOptions global;
  Registry registry{&app};
  CLI::Option* socket_option = nullptr;

  Cli() {
    app.set_version_flag("--version", VMREPLICA_VERSION);
    // Global options may follow the verb: `vmreplica server get --json`.
    app.fallthrough();
    app.require_subcommand(1);
    app.failure_message([](const CLI::App*, const CLI::Error& e) {
      return "vmreplica: " + std::string(e.what()) + "\nRun with --help for more information.\n";
    });
    global.connection.socket = DefaultSocketPath();
    socket_option = app.add_option("--socket", global.connection.socket,
                                   std::string("admin socket of the local vmreplicad (default: $") + kSocketEnv +
                                       ", else " + kDefaultSocket + ")");
    socket_option->capture_default_str();
    auto* remote =
        app.add_option("--remote", global.connection.remote, "HOST:PORT of a remote vmreplicad (mutual TLS)")
            ->check(StatusValidator([](const std::string& s) { return ParseHostPort(s).status(); }, "HOST:PORT"))
            ->excludes(socket_option);
    auto* ca = app.add_option("--ca", global.connection.ca_file, "with --remote: CA certificate(s) to trust (PEM)");
    auto* cert = app.add_option("--cert", global.connection.cert_file, "with --remote: our certificate (PEM)");
    auto* key = app.add_option("--key", global.connection.key_file, "with --remote: our private key (PEM)");
    remote->needs(ca)->needs(cert)->needs(key);
    ca->needs(remote);
    cert->needs(remote);
    key->needs(remote);
    app.add_flag("--json", global.json, "print the response messages as JSON, one object per line");
    app.add_flag("--async", global.async, "do not wait for jobs: print the job and return");
    app.add_option("--timeout", global.timeout_s, "give up waiting for a job after SECONDS (default: no limit)")
        ->check(CLI::PositiveNumber);

    AddServerVerbs(registry);
    AddJobVerbs(registry);
    AddCertVerbs(registry);
    AddReplicationVerbs(registry);
    AddVmVerbs(registry);
  }
};

}  // namespace

int Main(int argc, const char* const* argv, std::ostream& out, std::ostream& err, bool stderr_is_tty) {
  Cli cli;
  try {
    cli.app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = cli.app.exit(e, out, err);
    return rc == 0 ? kExitOk : kExitUsage;
  }
  const Handler* handler = cli.registry.selected_handler();
  if (handler == nullptr) {
    err << "vmreplica: no verb given\nRun with --help for more information.\n";
    return kExitUsage;
  }
  Session session(cli.global, out, err, stderr_is_tty);
  session.set_declared_rpcs(cli.registry.selected_rpcs());
  return (*handler)(session);
}

std::vector<VerbRpcs> VerbTable() {
  Cli cli;
  return cli.registry.table();
}

}  // namespace vmreplica::cli
