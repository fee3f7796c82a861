// Registration of the verbs (private to the cli module). Each verbs_*.cc
// adds a family of commands to a Registry: the CLI11 sub-command with its
// options, the RPCs it calls (the verb table) and the handler that runs it
// once the command line has parsed.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli/cli.h"
#include "cli/session.h"
#include "vmreplica/status.h"

namespace vmreplica::cli {

using Handler = std::function<int(Session&)>;

class Registry {
 public:
  explicit Registry(CLI::App* root) : root_(root) {}

  // Adds the command at `path` ("server get"); the groups on the way
  // ("server") are created on first use and require a sub-command.
  // `rpcs` are the RPCs the handler may call (empty for local verbs).
  CLI::App* Add(const std::string& path, const std::string& description, std::vector<std::string> rpcs,
                Handler handler);

  // Describes a group ("server") before its verbs are added.
  void Group(const std::string& path, const std::string& description);

  const std::vector<VerbRpcs>& table() const { return table_; }

  // The verb the command line selected (after parsing), or nullptr.
  const Handler* selected_handler() const;
  const std::vector<std::string>* selected_rpcs() const;

 private:
  CLI::App* GroupApp(const std::string& path);

  CLI::App* root_;
  std::map<std::string, CLI::App*> groups_;
  std::vector<VerbRpcs> table_;
  std::vector<Handler> handlers_;
  std::optional<size_t> selected_;
};

void AddServerVerbs(Registry& registry);       // server, service, auth, test-connection
void AddJobVerbs(Registry& registry);          // jobs
void AddCertVerbs(Registry& registry);         // cert
void AddReplicationVerbs(Registry& registry);  // get, enable, set, start, ..., set-failover-ip
void AddVmVerbs(Registry& registry);           // vm add, vm list, vm get, vm remove

// ---- helpers shared by the verb files

// A CLI11 validator from a parser: `parse(text)` returning a Status.
CLI::Validator StatusValidator(std::function<Status(const std::string&)> check, std::string description);

// --relationship N (0..1). Returns the option to ask whether it was given.
CLI::Option* AddRelationshipOption(CLI::App* app, uint32_t* index);

// The index when the option was given.
std::optional<uint32_t> Given(const CLI::Option* option, uint32_t value);

}  // namespace vmreplica::cli
