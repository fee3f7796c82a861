#include "cli/cli.h"

#include <google/protobuf/descriptor.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "vmreplica/control.grpc.pb.h"
#include "vmreplica/vm.grpc.pb.h"

namespace vmreplica::cli {
namespace {

struct CliRun {
  int code = -1;
  std::string out, err;
};

CliRun RunCli(std::vector<std::string> args) {
  args.insert(args.begin(), "vmreplica");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  std::ostringstream out, err;
  CliRun r;
  r.code = Main(static_cast<int>(argv.size()), argv.data(), out, err, /*stderr_is_tty=*/false);
  r.out = out.str();
  r.err = err.str();
  return r;
}

std::vector<std::string> Words(const std::string& path) {
  std::vector<std::string> words;
  std::istringstream in(path);
  for (std::string w; in >> w;) words.push_back(w);
  return words;
}

const google::protobuf::ServiceDescriptor* ReplicationService() {
  return google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
      v1::ReplicationService::service_full_name());
}

const google::protobuf::ServiceDescriptor* VmInventoryService() {
  return google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
      v1::VmInventory::service_full_name());
}

// ---- the verb table

TEST(VerbTable, EveryRpcOfTheServiceIsReachedBySomeVerb) {
  std::set<std::string> reached;
  for (const auto& v : VerbTable()) reached.insert(v.rpcs.begin(), v.rpcs.end());
  for (const auto* service : {ReplicationService(), VmInventoryService()}) {
    ASSERT_NE(service, nullptr);
    for (int i = 0; i < service->method_count(); ++i) {
      EXPECT_TRUE(reached.count(service->method(i)->name()) > 0)
          << service->method(i)->name() << " is reached by no verb";
    }
  }
}

TEST(VerbTable, EveryDeclaredRpcIsAMethodOfTheService) {
  const auto* service = ReplicationService();
  const auto* vms = VmInventoryService();
  ASSERT_NE(service, nullptr);
  ASSERT_NE(vms, nullptr);
  for (const auto& v : VerbTable()) {
    // The "vm" verbs speak to the VmInventory service, every other verb (and
    // `vm start`: StartVm acts on a committed failover) to ReplicationService.
    const auto* owner = v.verb.rfind("vm ", 0) == 0 && v.verb != "vm start" ? vms : service;
    for (const auto& rpc : v.rpcs) {
      EXPECT_NE(owner->FindMethodByName(rpc), nullptr) << v.verb << " declares unknown RPC " << rpc;
    }
  }
}

TEST(VerbTable, EveryVerbIsOnTheCommandLineWithHelp) {
  const auto table = VerbTable();
  EXPECT_GE(table.size(), 40u);
  std::set<std::string> seen;
  for (const auto& v : table) {
    EXPECT_TRUE(seen.insert(v.verb).second) << "duplicate verb " << v.verb;
    auto args = Words(v.verb);
    args.push_back("--help");
    CliRun r = RunCli(args);
    EXPECT_EQ(r.code, 0) << v.verb << ": " << r.err;
    EXPECT_NE(r.out.find(args[args.size() - 2]), std::string::npos) << v.verb << " help:\n" << r.out;
  }
}

TEST(VerbTable, OnlyTheCertificateToolsAreLocal) {
  std::set<std::string> local;
  for (const auto& v : VerbTable()) {
    if (v.rpcs.empty()) local.insert(v.verb);
  }
  EXPECT_EQ(local, (std::set<std::string>{"cert ca", "cert issue", "cert show"}));
}

// ---- usage errors exit 2 before anything is sent

TEST(Usage, NoVerbUnknownVerbOrUnknownOptionExit2) {
  EXPECT_EQ(RunCli({}).code, 2);
  EXPECT_EQ(RunCli({"frobnicate"}).code, 2);
  EXPECT_EQ(RunCli({"server"}).code, 2);
  EXPECT_EQ(RunCli({"server", "frobnicate"}).code, 2);
  EXPECT_EQ(RunCli({"server", "get", "--frobnicate"}).code, 2);
  EXPECT_EQ(RunCli({"server", "get", "extra"}).code, 2);
  EXPECT_EQ(RunCli({"jobs", "list", "get"}).code, 2);
  CliRun r = RunCli({"frobnicate"});
  EXPECT_NE(r.err.find("vmreplica: "), std::string::npos) << r.err;
}

TEST(Usage, HelpAndVersionExit0) {
  CliRun r = RunCli({"--help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("failover"), std::string::npos);
  EXPECT_EQ(RunCli({"--version"}).code, 0);
}

TEST(Usage, RelationshipOutsideZeroToOneExits2) {
  EXPECT_EQ(RunCli({"suspend", "vm1", "--relationship", "2"}).code, 2);
  EXPECT_EQ(RunCli({"remove", "vm1", "--relationship", "-1"}).code, 2);
  EXPECT_EQ(RunCli({"measure", "vm1", "--relationship", "x"}).code, 2);
}

TEST(Usage, BadValuesExit2) {
  EXPECT_EQ(RunCli({"start", "vm1", "--at", "tomorrow"}).code, 2);
  EXPECT_EQ(RunCli({"start", "vm1", "--export", "/tmp/x", "--seeded"}).code, 2);
  EXPECT_EQ(RunCli({"enable", "vm1", "--replica-server", "r", "--replica-port", "443", "--interval", "60"}).code, 2);
  EXPECT_EQ(RunCli({"enable", "vm1", "--replica-server", "r"}).code, 2);  // --replica-port missing
  EXPECT_EQ(
      RunCli({"enable", "vm1", "--replica-server", "r", "--replica-port", "443", "--auto-resync-window", "18:30"}).code,
      2);
  EXPECT_EQ(RunCli({"server", "set", "--monitoring-start", "25:00"}).code, 2);
  EXPECT_EQ(RunCli({"server", "set", "--auth", "sometimes"}).code, 2);
  EXPECT_EQ(RunCli({"server", "set", "--enable", "--disable"}).code, 2);
  EXPECT_EQ(RunCli({"service", "request-state", "4"}).code, 2);
  EXPECT_EQ(RunCli({"test-connection", "r", "port"}).code, 2);  // not a number (the range is the daemon's)
  EXPECT_EQ(RunCli({"test-connection", "r", "443", "--auth", "ntlm"}).code, 2);
  EXPECT_EQ(RunCli({"resume", "vm1", "--at", "now"}).code, 2);  // --at needs --resynchronize
  EXPECT_EQ(RunCli({"failover", "vm1", "--prepare", "--as-test"}).code, 2);
  EXPECT_EQ(RunCli({"--remote", "host:443", "server", "get"}).code, 2);  // no --ca/--cert/--key
  EXPECT_EQ(RunCli({"--remote", "nonsense", "--ca", "a", "--cert", "b", "--key", "c", "server", "get"}).code, 2);
  EXPECT_EQ(RunCli({"--timeout", "0", "jobs", "list"}).code, 2);
}

TEST(Usage, ServerSetWithNothingToChangeExits2WithoutCallingTheDaemon) {
  CliRun r = RunCli({"--socket", "/nonexistent/vmreplica.sock", "server", "set"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("nothing to change"), std::string::npos) << r.err;
}

TEST(Usage, TooManyGatewaysExit2) {
  std::vector<std::string> args = {"--socket", "/nonexistent/vmreplica.sock", "set-failover-ip", "vm1", "--adapter",
                                   "eth0"};
  for (int i = 0; i < 6; ++i) {
    args.push_back("--gateway");
    args.push_back("10.0.0." + std::to_string(i + 1));
  }
  EXPECT_EQ(RunCli(args).code, 2);
}

// ---- an absent daemon: exit 3 with the socket in the message

TEST(Unreachable, MissingSocketExits3AndNamesIt) {
  const std::string socket = "/nonexistent/vmreplica-cli-test.sock";
  for (auto args : std::vector<std::vector<std::string>>{
           {"--socket", socket, "server", "get"},
           {"--socket", socket, "get"},
           {"--socket", socket, "--json", "jobs", "list"},
           {"server", "get", "--socket", socket},  // global options may follow the verb
       }) {
    CliRun r = RunCli(args);
    EXPECT_EQ(r.code, 3) << r.err;
    EXPECT_NE(r.err.find("vmreplica: cannot reach vmreplicad at " + socket + ": "), std::string::npos) << r.err;
    EXPECT_EQ(r.out, "");
  }
}

TEST(Unreachable, SocketComesFromTheEnvironment) {
  const std::string socket = "/nonexistent/from-env.sock";
  setenv("VMREPLICA_SOCKET", socket.c_str(), 1);
  CliRun r = RunCli({"service", "status"});
  unsetenv("VMREPLICA_SOCKET");
  EXPECT_EQ(r.code, 3);
  EXPECT_NE(r.err.find(socket), std::string::npos) << r.err;
}

TEST(Remote, UnreadableCertificateFileIsAFailureNamingTheFile) {
  CliRun r = RunCli({"--remote", "127.0.0.1:1", "--ca", "/nonexistent/ca.pem", "--cert", "/nonexistent/c.pem", "--key",
                     "/nonexistent/k.pem", "server", "get"});
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("/nonexistent/ca.pem"), std::string::npos) << r.err;
}

// ---- the local certificate tools

class CertTools : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmreplica-cli-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  std::string dir_;
};

TEST_F(CertTools, CaIssueAndShow) {
  CliRun ca = RunCli({"cert", "ca", "--cert", Path("ca.crt"), "--key", Path("ca.key"), "--cn", "Lab CA"});
  ASSERT_EQ(ca.code, 0) << ca.err;
  EXPECT_NE(ca.out.find("IsCA"), std::string::npos) << ca.out;

  CliRun issue =
      RunCli({"--json", "cert", "issue", "--ca-cert", Path("ca.crt"), "--ca-key", Path("ca.key"), "--cn", "host1.lab",
              "--san", "10.0.0.1", "--cert", Path("host1.crt"), "--key", Path("host1.key"), "--days", "30"});
  ASSERT_EQ(issue.code, 0) << issue.err;
  auto j = nlohmann::json::parse(issue.out);
  EXPECT_EQ(j["subject_cn"], "host1.lab");
  EXPECT_EQ(j["cert_path"], Path("host1.crt"));
  EXPECT_TRUE(j["server_auth"].get<bool>());
  EXPECT_TRUE(j["client_auth"].get<bool>());
  EXPECT_FALSE(j["is_ca"].get<bool>());
  EXPECT_EQ(j["ip_addresses"], nlohmann::json::array({"10.0.0.1"}));

  CliRun show = RunCli({"cert", "show", Path("host1.crt")});
  ASSERT_EQ(show.code, 0) << show.err;
  EXPECT_NE(show.out.find("host1.lab"), std::string::npos) << show.out;
  EXPECT_NE(show.out.find(j["thumbprint_sha1"].get<std::string>()), std::string::npos) << show.out;
}

TEST_F(CertTools, ShowOfAMissingOrGarbageFileFails) {
  EXPECT_EQ(RunCli({"cert", "show", Path("missing.pem")}).code, 1);
  FILE* f = fopen(Path("garbage.pem").c_str(), "w");
  ASSERT_NE(f, nullptr);
  fputs("not a certificate\n", f);
  fclose(f);
  CliRun r = RunCli({"cert", "show", Path("garbage.pem")});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("vmreplica: cert show: "), std::string::npos) << r.err;
}

}  // namespace
}  // namespace vmreplica::cli
