// Two (or three) real vmreplicad processes on loopback with lab
// certificates: the replica-server configuration and TestReplicationConnection
// paths, remote administration over mTLS, and a daemon killed mid-job.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "integration/harness.h"

namespace vmreplica::testing {
namespace {

using nlohmann::json;

// primary.vmreplica.test and replica.vmreplica.test under one CA; a third
// host ("rogue") whose certificate comes from another CA but which trusts
// both (so only the replica's refusal of its certificate can stop it).
class TwoDaemonsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MakeCa(dir_ / "ca1", "vmreplica test CA 1");
    MakeCa(dir_ / "ca2", "vmreplica test CA 2");
    MakeHost(dir_ / "ca1", dir_ / "pki", "primary.vmreplica.test", {"localhost", "127.0.0.1"});
    MakeHost(dir_ / "ca1", dir_ / "pki", "replica.vmreplica.test", {"localhost", "127.0.0.1"});
    MakeHost(dir_ / "ca2", dir_ / "pki", "rogue.vmreplica.test", {"localhost", "127.0.0.1"});
    std::ofstream(dir_ / "both-cas.crt") << ReadText(dir_ / "ca1/ca.crt") << ReadText(dir_ / "ca2/ca.crt");
  }

  DaemonSpec Spec(const std::string& host, const std::string& ca, const std::string& extra = "") {
    return DaemonSpec{host, ca, dir_ / ("pki/" + host + ".crt"), dir_ / ("pki/" + host + ".key"), FreePort(), extra};
  }

  // The replica: a replica server that authorises `pattern`.
  void ConfigureReplica(Daemon& replica, const std::string& pattern) {
    auto r = replica.Cli({"server", "set", "--enable", "--auth", "certificate"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = replica.Cli({"auth", "add", pattern, "--storage", dir_ / "replicas", "--trust-group", "lab"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  static std::string Port(const Daemon& d) { return std::to_string(d.port()); }

  // Starts every daemon, failing the test with its log when one does not come up.
  static void StartAll(std::initializer_list<Daemon*> daemons) {
    for (Daemon* d : daemons) {
      std::string err;
      ASSERT_TRUE(d->Start(&err)) << err;
    }
  }

  // A method that failed: exit status 1, the WMI code and the reason on stderr.
  static void ExpectFailure(const RunResult& r, const std::string& code, const std::string& reason) {
    EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
    EXPECT_NE(r.err.find(code), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(reason), std::string::npos) << r.err;
  }

  TempDir dir_;
};

TEST_F(TwoDaemonsTest, ConnectionTestSucceedsWithValidCertificatesAndAuthorization) {
  Daemon primary(dir_, Spec("primary.vmreplica.test", dir_ / "ca1/ca.crt"));
  Daemon replica(dir_, Spec("replica.vmreplica.test", dir_ / "ca1/ca.crt"));
  StartAll({&primary, &replica});
  if (HasFatalFailure()) return;
  ConfigureReplica(replica, "*.vmreplica.test");

  auto r = primary.Cli({"--json", "test-connection", "127.0.0.1", Port(replica)});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  // --json prints the method's answer (4096 + job), then the final job.
  json final_job = LastJsonDocument(r.out)["job"];
  EXPECT_EQ(final_job["job_state"], 7) << r.out;
  json learnt = json::parse(final_job["result_json"].get<std::string>());
  EXPECT_EQ(learnt["authorized_by"], "*.vmreplica.test");
  EXPECT_EQ(learnt["trust_group"], "lab");
  EXPECT_EQ(learnt["remote_host_name"], "replica.vmreplica.test");
  EXPECT_EQ(learnt["names_seen_by_remote"][0], "primary.vmreplica.test");
  // The replica saw the primary by its certificate's name.
  EXPECT_NE(ReadText(replica.log_path()).find("hello from primary.vmreplica.test"), std::string::npos);

  // The job is listed, completed, with type 115 and no error.
  r = primary.Cli({"--json", "jobs", "list"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json jobs = json::parse(r.out);
  ASSERT_EQ(jobs["jobs"].size(), 1u) << r.out;
  EXPECT_EQ(jobs["jobs"][0]["job_type"], 115);
  EXPECT_EQ(jobs["jobs"][0]["job_state"], 7);
  EXPECT_EQ(jobs["jobs"][0]["error_code"], 0);
}

TEST_F(TwoDaemonsTest, PrimaryWithCertificateFromAnotherCaIsDenied) {
  Daemon replica(dir_, Spec("replica.vmreplica.test", dir_ / "ca1/ca.crt"));
  Daemon rogue(dir_, Spec("rogue.vmreplica.test", dir_ / "both-cas.crt"));
  StartAll({&replica, &rogue});
  if (HasFatalFailure()) return;
  ConfigureReplica(replica, "*");  // even "allow from any server" needs a trusted certificate

  auto r = rogue.Cli({"test-connection", "127.0.0.1", Port(replica)});
  ExpectFailure(r, "32769", "rejected our certificate");
}

TEST_F(TwoDaemonsTest, ReplicaWithCertificateFromAnotherCaIsDenied) {
  // Here the primary does not trust the server it dials.
  Daemon primary(dir_, Spec("primary.vmreplica.test", dir_ / "ca1/ca.crt"));
  Daemon rogue(dir_, Spec("rogue.vmreplica.test", dir_ / "both-cas.crt"));
  StartAll({&primary, &rogue});
  if (HasFatalFailure()) return;
  ConfigureReplica(rogue, "*");

  auto r = primary.Cli({"test-connection", "127.0.0.1", Port(rogue)});
  ExpectFailure(r, "32769", "not trusted");
}

TEST_F(TwoDaemonsTest, PrimaryThatNoAuthorizationEntryMatchesIsDenied) {
  Daemon primary(dir_, Spec("primary.vmreplica.test", dir_ / "ca1/ca.crt"));
  Daemon replica(dir_, Spec("replica.vmreplica.test", dir_ / "ca1/ca.crt"));
  StartAll({&primary, &replica});
  if (HasFatalFailure()) return;
  ConfigureReplica(replica, "*.other.example");

  auto r = primary.Cli({"test-connection", "127.0.0.1", Port(replica)});
  ExpectFailure(r, "32769", "no authorization entry");

  // Adding a matching entry lets it through; removing it denies again.
  ASSERT_EQ(replica.Cli({"auth", "add", "primary.vmreplica.test", "--storage", dir_ / "r2"}).exit_code, 0);
  EXPECT_EQ(primary.Cli({"test-connection", "127.0.0.1", Port(replica)}).exit_code, 0);
  ASSERT_EQ(replica.Cli({"auth", "remove", "primary.vmreplica.test"}).exit_code, 0);
  EXPECT_EQ(primary.Cli({"test-connection", "127.0.0.1", Port(replica)}).exit_code, 1);
}

TEST_F(TwoDaemonsTest, ServerThatIsNotAReplicaServerIsNotAvailable) {
  Daemon primary(dir_, Spec("primary.vmreplica.test", dir_ / "ca1/ca.crt"));
  Daemon replica(dir_, Spec("replica.vmreplica.test", dir_ / "ca1/ca.crt"));
  StartAll({&primary, &replica});
  if (HasFatalFailure()) return;
  // RecoveryServerEnabled stays off (the default).
  auto r = primary.Cli({"test-connection", "127.0.0.1", Port(replica)});
  ExpectFailure(r, "32777", "RecoveryServerEnabled");
}

TEST_F(TwoDaemonsTest, NothingListeningIsNotAvailableAndBadInputIsInvalidParameter) {
  Daemon primary(dir_, Spec("primary.vmreplica.test", dir_ / "ca1/ca.crt"));
  std::string err;
  ASSERT_TRUE(primary.Start(&err)) << err;

  auto r = primary.Cli({"test-connection", "127.0.0.1", std::to_string(FreePort())});
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("32777"), std::string::npos) << r.err;

  const std::string long_name(300, 'a');
  for (const std::string& host : {std::string("bad host!"), std::string("-leading.example"), std::string("a..b"), long_name}) {
    r = primary.Cli({"test-connection", "--", host, "443"});
    EXPECT_EQ(r.exit_code, 1) << host << r.err;
    EXPECT_NE(r.err.find("32773"), std::string::npos) << host << ": " << r.err;
    EXPECT_NE(r.err.find("RecoveryConnectionPoint"), std::string::npos) << r.err;
  }
  for (const auto& port : {"0", "65536"}) {
    r = primary.Cli({"test-connection", "127.0.0.1", port});
    EXPECT_EQ(r.exit_code, 1) << port << r.err;
    EXPECT_NE(r.err.find("32773"), std::string::npos) << port << ": " << r.err;
  }
  r = primary.Cli({"test-connection", "127.0.0.1", "443", "--auth", "kerberos"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("32770"), std::string::npos) << r.err;
}

TEST_F(TwoDaemonsTest, StoppedListenerIsNotAvailableUntilStartedAgain) {
  Daemon primary(dir_, Spec("primary.vmreplica.test", dir_ / "ca1/ca.crt"));
  Daemon replica(dir_, Spec("replica.vmreplica.test", dir_ / "ca1/ca.crt"));
  StartAll({&primary, &replica});
  if (HasFatalFailure()) return;
  ConfigureReplica(replica, "*.vmreplica.test");
  ASSERT_EQ(replica.Cli({"service", "stop"}).exit_code, 0);
  auto r = primary.Cli({"test-connection", "127.0.0.1", Port(replica)});
  EXPECT_NE(r.err.find("32777"), std::string::npos) << r.err;
  ASSERT_EQ(replica.Cli({"service", "start"}).exit_code, 0);
  r = primary.Cli({"test-connection", "127.0.0.1", Port(replica)});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST_F(TwoDaemonsTest, RemoteAdministrationNeedsANamedPrincipal) {
  Daemon replica(dir_, Spec("replica.vmreplica.test", dir_ / "ca1/ca.crt",
                            "[admin]\nremote_principals = [\"primary.vmreplica.test\"]\n"));
  std::string err;
  ASSERT_TRUE(replica.Start(&err)) << err;
  auto remote = [&](const std::string& who, const std::vector<std::string>& args) {
    std::vector<std::string> argv = {CliBinary(), "--remote", "127.0.0.1:" + Port(replica),
                                     "--ca", dir_ / "both-cas.crt",
                                     "--cert", dir_ / ("pki/" + who + ".crt"),
                                     "--key", dir_ / ("pki/" + who + ".key")};
    argv.insert(argv.end(), args.begin(), args.end());
    return RunProgram(argv);
  };
  // Named principal: may administer.
  auto r = remote("primary.vmreplica.test", {"auth", "add", "*.lab.example", "--storage", dir_ / "lab"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  // Same CA, not named: access denied.
  MakeHost(dir_ / "ca1", dir_ / "pki", "other.vmreplica.test", {});
  r = remote("other.vmreplica.test", {"auth", "list"});
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("32769"), std::string::npos) << r.err;
  // The listener refuses to stop itself over itself.
  r = remote("primary.vmreplica.test", {"service", "stop"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("32774"), std::string::npos) << r.err;
  // Locally the entry is there.
  r = replica.Cli({"--json", "auth", "list"});
  EXPECT_NE(r.out.find("*.lab.example"), std::string::npos) << r.out;
}

TEST_F(TwoDaemonsTest, AdminSocketIsOwnerOnly) {
  Daemon d(dir_, Spec("primary.vmreplica.test", dir_ / "ca1/ca.crt"));
  std::string err;
  ASSERT_TRUE(d.Start(&err)) << err;
  struct stat st {};
  ASSERT_EQ(::stat(d.socket().c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_TRUE(d.Stop());
  EXPECT_FALSE(std::filesystem::exists(d.socket()));
}

// A daemon killed with SIGKILL while a job runs: after the restart the job
// is reported as Exception with the reason, and the catalog opens cleanly.
TEST_F(TwoDaemonsTest, JobInterruptedByKillIsReportedAfterRestart) {
  // A peer that accepts TCP and never speaks TLS keeps the job running.
  int silent = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(silent, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(silent, 4), 0);
  socklen_t len = sizeof a;
  ::getsockname(silent, reinterpret_cast<sockaddr*>(&a), &len);
  const std::string silent_port = std::to_string(ntohs(a.sin_port));

  Daemon primary(dir_, Spec("primary.vmreplica.test", dir_ / "ca1/ca.crt",
                            "[knobs]\nconnect_timeout_ms = 120000\n"));
  std::string err;
  ASSERT_TRUE(primary.Start(&err)) << err;
  auto r = primary.Cli({"--json", "--async", "test-connection", "127.0.0.1", silent_port});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const std::string id = json::parse(r.out)["result"]["job"]["id"];
  ASSERT_FALSE(id.empty());

  // Wait until the job runs (Running = 4).
  int state = 0;
  for (int i = 0; i < 100 && state != 4; ++i) {
    r = primary.Cli({"--json", "jobs", "get", id});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    state = json::parse(r.out)["job"]["job_state"];
    if (state != 4) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_EQ(state, 4);

  primary.Kill();
  ASSERT_TRUE(primary.Start(&err)) << err;
  r = primary.Cli({"--json", "jobs", "get", id});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json job = json::parse(r.out)["job"];
  EXPECT_EQ(job["job_state"], 10) << r.out;      // Exception
  EXPECT_EQ(job["error_code"], 32768) << r.out;  // Failed
  EXPECT_NE(job["error_description"].get<std::string>().find("interrupted"), std::string::npos) << r.out;
  // The restarted daemon works normally.
  EXPECT_EQ(primary.Cli({"server", "get"}).exit_code, 0);
  ::close(silent);
}

TEST_F(TwoDaemonsTest, DaemonRefusesBadConfigMissingCertificateAndALockedStateDir) {
  Daemon first(dir_, Spec("primary.vmreplica.test", dir_ / "ca1/ca.crt"));
  std::string err;
  ASSERT_TRUE(first.Start(&err)) << err;

  // Same state dir: the lock is held.
  auto r = RunProgram({DaemonBinary(), "--config", first.config_path(), "--check-config"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("locked"), std::string::npos) << r.err;

  // Missing certificate file.
  DaemonSpec missing = Spec("replica.vmreplica.test", dir_ / "ca1/ca.crt");
  missing.cert_file = dir_ / "pki/nope.crt";
  Daemon no_cert(dir_, missing);
  r = RunProgram({DaemonBinary(), "--config", no_cert.config_path(), "--check-config"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("nope.crt"), std::string::npos) << r.err;

  // A key that does not belong to the certificate.
  DaemonSpec wrong_key = Spec("replica.vmreplica.test", dir_ / "ca1/ca.crt");
  wrong_key.key_file = dir_ / "pki/primary.vmreplica.test.key";
  Daemon bad_key(dir_, wrong_key);
  r = RunProgram({DaemonBinary(), "--config", bad_key.config_path(), "--check-config"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_FALSE(r.err.empty());

  // A typo in the config.
  std::ofstream(dir_ / "typo.toml") << "[listener]\nprot = 1\n";
  r = RunProgram({DaemonBinary(), "--config", dir_ / "typo.toml"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("unknown key listener.prot"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace vmreplica::testing
