#include "daemon/config.h"

#include <gtest/gtest.h>

namespace vmreplica::daemon {
namespace {

TEST(ConfigTest, FullFileParsesAndRelativePathsResolveAgainstTheFile) {
  auto c = ParseConfig(R"(
[daemon]
state_dir = "/var/lib/vmr"
admin_socket = "run/admin.sock"
log_level = "debug"
[listener]
address = "127.0.0.1"
port = 18443
start = false
[tls]
ca = "pki/ca.crt"
certificate = "/etc/x/host.crt"
key = "pki/host.key"
[admin]
remote_principals = ["*.ops.example", "admin1.example"]
[knobs]
connect_timeout_ms = 2000
job_workers = 2
[replication]
max_parallel_transfers = 5
bandwidth_limit_bytes_per_s = 1000000
[[replication.bandwidth_schedule]]
start = "08:00"
end = "18:30"
bytes_per_s = 500000
days = ["mon", "fri"]
[[replication.bandwidth_schedule]]
start = "22:00"
end = "06:00"
bytes_per_s = 0
[testing]
replication_interval_override_ms = 2000
app_consistent_interval_override_ms = 3000
)", "/etc/vmreplica");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->admin_socket, "/etc/vmreplica/run/admin.sock");
  EXPECT_EQ(c->ca_file, "/etc/vmreplica/pki/ca.crt");
  EXPECT_EQ(c->certificate_file, "/etc/x/host.crt");
  EXPECT_EQ(c->listen_port, 18443u);
  EXPECT_FALSE(c->start_listener);
  EXPECT_EQ(c->service.connect_timeout, std::chrono::milliseconds(2000));
  EXPECT_EQ(c->job_workers, 2);
  EXPECT_EQ(c->max_parallel_transfers, 5);
  EXPECT_EQ(c->bandwidth_limit_bytes_per_s, 1000000u);
  EXPECT_EQ(c->test_replication_interval_override_ms, 2000);
  EXPECT_EQ(c->test_app_consistent_interval_override_ms, 3000);
  ASSERT_EQ(c->bandwidth_schedule.size(), 2u);
  EXPECT_EQ(c->bandwidth_schedule[0].start_min, 8u * 60);
  EXPECT_EQ(c->bandwidth_schedule[0].end_min, 18u * 60 + 30);
  EXPECT_EQ(c->bandwidth_schedule[0].bytes_per_s, 500000u);
  EXPECT_EQ(c->bandwidth_schedule[0].days_mask, (1u << 1) | (1u << 5));
  EXPECT_EQ(c->bandwidth_schedule[1].start_min, 22u * 60);
  EXPECT_EQ(c->bandwidth_schedule[1].end_min, 6u * 60);
  EXPECT_EQ(c->bandwidth_schedule[1].days_mask, 0x7f);
  EXPECT_EQ(c->service.remote_admin_principals.size(), 2u);
}

TEST(ConfigTest, EmptyFileGivesDefaults) {
  auto c = ParseConfig("", "/etc");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->state_dir, "/var/lib/vmreplica");
  EXPECT_TRUE(c->start_listener);
  EXPECT_TRUE(c->libvirt_vms_through_libvirt);
  EXPECT_TRUE(c->apply_while_receiving);
}

TEST(ConfigTest, ReplicaApplyWhileReceivingCanBeTurnedOff) {
  auto off = ParseConfig("[replica]\napply_while_receiving = false\n", "/etc");
  ASSERT_TRUE(off.ok()) << off.status().ToString();
  EXPECT_FALSE(off->apply_while_receiving);
  auto on = ParseConfig("[replica]\napply_while_receiving = true\n", "/etc");
  ASSERT_TRUE(on.ok()) << on.status().ToString();
  EXPECT_TRUE(on->apply_while_receiving);
}

TEST(ConfigTest, FailoverHypervisorChoosesQemuOrTheSameAsThePrimary) {
  auto q = ParseConfig("[failover]\nhypervisor = \"qemu\"\n", "/etc");
  ASSERT_TRUE(q.ok()) << q.status().ToString();
  EXPECT_FALSE(q->libvirt_vms_through_libvirt);
  auto same = ParseConfig("[failover]\nhypervisor = \"same\"\n", "/etc");
  ASSERT_TRUE(same.ok()) << same.status().ToString();
  EXPECT_TRUE(same->libvirt_vms_through_libvirt);
}

struct BadCase {
  const char* text;
  const char* expected_in_message;
};

TEST(ConfigTest, BadFilesAreRefusedNamingTheKey) {
  const BadCase cases[] = {
      {"[daemon]\nstate_dir = ", "TOML syntax error at line 2"},
      {"[daemon]\nstatedir = \"/x\"", "unknown key daemon.statedir"},
      {"[deamon]\n", "unknown table [deamon]"},
      {"[listener]\nport = 0", "listener.port: 0 is not in 1..65535"},
      {"[listener]\nport = 70000", "listener.port: 70000"},
      {"[listener]\nport = \"443\"", "listener.port must be an integer"},
      {"[listener]\nstart = 1", "listener.start must be true or false"},
      {"[listener]\naddress = \"bad host!\"", "listener.address"},
      {"[daemon]\nlog_level = \"loud\"", "daemon.log_level"},
      {"[daemon]\nstate_dir = \"relative\"", ""},
      {"[failover]\nhypervisor = \"xen\"", "failover.hypervisor"},
      {"[failover]\nhypervisor = 1", "failover.hypervisor"},
      {"[replica]\napply_while_receiving = \"yes\"", "replica.apply_while_receiving must be true or false"},
      {"[replica]\nstaging = true", "unknown key replica.staging"},
      {"[knobs]\njob_workers = 0", "knobs.job_workers: 0 is not in 1..64"},
      {"[knobs]\nconnect_timeout_ms = 5", "knobs.connect_timeout_ms"},
      {"[replication]\nmax_parallel_transfers = 0", "replication.max_parallel_transfers: 0 is not in 1..64"},
      {"[replication]\nbandwidth_limit_bytes_per_s = -1", "replication.bandwidth_limit_bytes_per_s"},
      {"[replication]\nparallel = 2", "unknown key replication.parallel"},
      {"[testing]\nreplication_interval_override_ms = 5", "testing.replication_interval_override_ms"},
      {"[admin]\nremote_principals = \"x\"", "admin.remote_principals must be an array"},
      {"[replication]\nbandwidth_schedule = 5", "replication.bandwidth_schedule must be an array of tables"},
      {"[[replication.bandwidth_schedule]]\nstart = \"8:00\"\nend = \"09:00\"\nbytes_per_s = 1",
       "replication.bandwidth_schedule[0].start"},
      {"[[replication.bandwidth_schedule]]\nstart = \"08:00\"\nend = \"24:00\"\nbytes_per_s = 1",
       "replication.bandwidth_schedule[0].end"},
      {"[[replication.bandwidth_schedule]]\nstart = \"08:00\"\nend = \"09:00\"",
       "replication.bandwidth_schedule[0].bytes_per_s"},
      {"[[replication.bandwidth_schedule]]\nstart = \"08:00\"\nend = \"09:00\"\nbytes_per_s = -2",
       "replication.bandwidth_schedule[0].bytes_per_s"},
      {"[[replication.bandwidth_schedule]]\nstart = \"08:00\"\nend = \"09:00\"\nbytes_per_s = 1\ndays = [\"monday\"]",
       "replication.bandwidth_schedule[0].days"},
      {"[[replication.bandwidth_schedule]]\nstart = \"08:00\"\nend = \"09:00\"\nbytes_per_s = 1\nrate = 2",
       "unknown key replication.bandwidth_schedule[0].rate"},
      {"[testing]\napp_consistent_interval_override_ms = 1", "testing.app_consistent_interval_override_ms"},
      {"[admin]\nremote_principals = [\"a.*.com\"]", "admin.remote_principals"},
  };
  for (const auto& c : cases) {
    auto r = ParseConfig(c.text, "");
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << c.text;
    EXPECT_NE(r.status().message().find(c.expected_in_message), std::string::npos)
        << c.text << " -> " << r.status().message();
  }
}

}  // namespace
}  // namespace vmreplica::daemon
