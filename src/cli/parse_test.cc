#include "cli/parse.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <ctime>
#include <optional>

namespace vmreplica::cli {
namespace {

// Sets TZ for the life of the object (and restores the previous value).
class ScopedTimeZone {
 public:
  explicit ScopedTimeZone(const char* tz) {
    if (const char* old = std::getenv("TZ")) old_ = old;
    setenv("TZ", tz, 1);
    tzset();
  }
  ~ScopedTimeZone() {
    if (old_) {
      setenv("TZ", old_->c_str(), 1);
    } else {
      unsetenv("TZ");
    }
    tzset();
  }

 private:
  std::optional<std::string> old_;
};

constexpr int64_t k20250601 = 1748736000;  // 2025-06-01T00:00:00Z

TEST(ParseTimeArg, UnixSecondsAndNow) {
  EXPECT_EQ(*ParseTimeArg("1700000000"), 1700000000);
  EXPECT_EQ(*ParseTimeArg("now"), 0);
}

TEST(ParseTimeArg, Iso8601WithZone) {
  EXPECT_EQ(*ParseTimeArg("2025-06-01T18:30:00Z"), k20250601 + 18 * 3600 + 30 * 60);
  EXPECT_EQ(*ParseTimeArg("2025-06-01T18:30Z"), k20250601 + 18 * 3600 + 30 * 60);
  EXPECT_EQ(*ParseTimeArg("2025-06-01 18:30:15.250Z"), k20250601 + 18 * 3600 + 30 * 60 + 15);
  EXPECT_EQ(*ParseTimeArg("2025-06-01T18:30:00+02:00"), k20250601 + 16 * 3600 + 30 * 60);
  EXPECT_EQ(*ParseTimeArg("2025-06-01T18:30:00+0200"), k20250601 + 16 * 3600 + 30 * 60);
  EXPECT_EQ(*ParseTimeArg("2025-06-01T18:30-05"), k20250601 + 23 * 3600 + 30 * 60);
  EXPECT_EQ(*ParseTimeArg("2024-02-29T12:00:00Z"), 1709208000);
}

TEST(ParseTimeArg, Iso8601WithoutZoneIsLocalTime) {
  ScopedTimeZone tz("EST5");  // UTC-5, no daylight saving time
  EXPECT_EQ(*ParseTimeArg("2025-06-01T18:30"), k20250601 + 23 * 3600 + 30 * 60);
  EXPECT_EQ(*ParseTimeArg("2025-06-01"), k20250601 + 5 * 3600);
}

TEST(ParseTimeArg, BadInputIsInvalidArgument) {
  for (const char* bad : {"", "tomorrow", "-5", "1e9", "2025-13-01", "2025-02-29", "2025-06-31", "2025-6-1",
                          "2025-06-01T25:00", "2025-06-01T18:60", "2025-06-01T18", "2025-06-01T18:30+",
                          "2025-06-01T18:30Zjunk", "2025-06-01T18:30+25:00", "2025-06-01X18:30", "9999999999999"}) {
    auto r = ParseTimeArg(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << bad;
  }
}

TEST(ParseHhMm, AcceptsTimesOfDay) {
  EXPECT_EQ(*ParseHhMm("00:00"), 0u);
  EXPECT_EQ(*ParseHhMm("09:00"), 540u);
  EXPECT_EQ(*ParseHhMm("9:00"), 540u);
  EXPECT_EQ(*ParseHhMm("18:30"), 1110u);
  EXPECT_EQ(*ParseHhMm("23:59"), 1439u);
}

TEST(ParseHhMm, RefusesWhatIsNotATimeOfDay) {
  for (const char* bad : {"", "24:00", "12:60", "1200", ":30", "123:00", "12:5", "12:345", "ab:cd", "-1:00"}) {
    EXPECT_FALSE(ParseHhMm(bad).ok()) << bad;
  }
}

TEST(ParseHhMmRange, WindowMayWrapPastMidnightButNotBeEmpty) {
  auto w = ParseHhMmRange("18:30-06:00");
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->first, 1110u);
  EXPECT_EQ(w->second, 360u);
  EXPECT_FALSE(ParseHhMmRange("06:00-06:00").ok());
  EXPECT_FALSE(ParseHhMmRange("18:30").ok());
  EXPECT_FALSE(ParseHhMmRange("18:30-25:00").ok());
}

TEST(ParseAuth, PerRelationship) {
  EXPECT_EQ(*ParseVmAuth("certificate"), AuthenticationType::kCertificate);
  EXPECT_EQ(*ParseVmAuth("Certificate"), AuthenticationType::kCertificate);
  EXPECT_EQ(*ParseVmAuth("2"), AuthenticationType::kCertificate);
  EXPECT_EQ(*ParseVmAuth("kerberos"), AuthenticationType::kKerberos);
  EXPECT_EQ(*ParseVmAuth("1"), AuthenticationType::kKerberos);
  for (const char* bad : {"", "0", "3", "none", "both", "cert"}) EXPECT_FALSE(ParseVmAuth(bad).ok()) << bad;
}

TEST(ParseAuth, ReplicaServer) {
  EXPECT_EQ(*ParseServerAuth("none"), AllowedAuthenticationType::kNone);
  EXPECT_EQ(*ParseServerAuth("0"), AllowedAuthenticationType::kNone);
  EXPECT_EQ(*ParseServerAuth("kerberos"), AllowedAuthenticationType::kKerberos);
  EXPECT_EQ(*ParseServerAuth("certificate"), AllowedAuthenticationType::kCertificate);
  EXPECT_EQ(*ParseServerAuth("both"), AllowedAuthenticationType::kKerberosAndCertificate);
  EXPECT_EQ(*ParseServerAuth("BOTH"), AllowedAuthenticationType::kKerberosAndCertificate);
  EXPECT_EQ(*ParseServerAuth("KerberosAndCertificate"), AllowedAuthenticationType::kKerberosAndCertificate);
  EXPECT_EQ(*ParseServerAuth("3"), AllowedAuthenticationType::kKerberosAndCertificate);
  for (const char* bad : {"", "4", "cert", "all"}) EXPECT_FALSE(ParseServerAuth(bad).ok()) << bad;
}

TEST(ParseHostPort, NamesAndBracketedIpv6) {
  auto a = ParseHostPort("replica.example.com:8443");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "replica.example.com");
  EXPECT_EQ(a->port, 8443);
  auto b = ParseHostPort("[fd00::1]:443");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->host, "fd00::1");
  EXPECT_EQ(b->port, 443);
  for (const char* bad :
       {"", "host", "host:", ":443", "host:0", "host:65536", "fd00::1:443", "[fd00::1]443", "host:44x"}) {
    EXPECT_FALSE(ParseHostPort(bad).ok()) << bad;
  }
}

TEST(NormalizeThumbprint, DropsSeparatorsAndUpperCases) { EXPECT_EQ(NormalizeThumbprint("ab cd:ef01"), "ABCDEF01"); }

// ---- the mapping from the options of enable / set onto RelationshipSettings

RelationshipOptions Target() {
  RelationshipOptions o;
  o.replica_server = "replica.example.com";
  o.replica_port = 443;
  return o;
}

TEST(ApplyRelationshipOptions, EnableWithOnlyTheTargetGetsHyperVDefaults) {
  auto s = ApplyRelationshipOptions(Target(), DefaultRelationshipSettings(), /*creating=*/true);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->recovery_connection_point(), "replica.example.com");
  EXPECT_EQ(s->recovery_server_port_number(), 443u);
  EXPECT_EQ(s->authentication_type(), 2u);
  EXPECT_TRUE(s->compression_enabled());
  EXPECT_EQ(s->replication_interval(), 300u);
  EXPECT_EQ(s->recovery_history(), 0u);
  EXPECT_EQ(s->application_consistent_snapshot_interval(), 0u);
  EXPECT_TRUE(s->included_disks().empty());
  EXPECT_FALSE(s->auto_resynchronize_enabled());
  EXPECT_EQ(s->auto_resynchronize_interval_start_min(), 18u * 60 + 30);
  EXPECT_EQ(s->auto_resynchronize_interval_end_min(), 6u * 60);
  EXPECT_TRUE(s->enable_write_order_preservation_across_disks());
  EXPECT_FALSE(s->bypass_proxy_server());
  EXPECT_TRUE(s->replicate_host_kvp_items());
}

TEST(ApplyRelationshipOptions, EveryOptionLandsInItsField) {
  RelationshipOptions o = Target();
  o.auth = "kerberos";
  o.thumbprint = "aa bb cc";
  o.interval_s = 30;
  o.history = 6;
  o.vss_hours = 2;
  o.compression = false;
  o.disks = {"disk0", "data"};
  o.auto_resync = true;
  o.auto_resync_window = "22:00-05:30";
  o.bypass_proxy = true;
  o.replicate_host_kvp = false;
  auto s = ApplyRelationshipOptions(o, DefaultRelationshipSettings(), true);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->authentication_type(), 1u);
  EXPECT_EQ(s->certificate_thumbprint(), "AABBCC");
  EXPECT_EQ(s->replication_interval(), 30u);
  EXPECT_EQ(s->recovery_history(), 6u);
  EXPECT_EQ(s->application_consistent_snapshot_interval(), 2u);
  EXPECT_FALSE(s->compression_enabled());
  ASSERT_EQ(s->included_disks_size(), 2);
  EXPECT_EQ(s->included_disks(0), "disk0");
  EXPECT_EQ(s->included_disks(1), "data");
  EXPECT_TRUE(s->auto_resynchronize_enabled());
  EXPECT_EQ(s->auto_resynchronize_interval_start_min(), 22u * 60);
  EXPECT_EQ(s->auto_resynchronize_interval_end_min(), 5u * 60 + 30);
  EXPECT_TRUE(s->bypass_proxy_server());
  EXPECT_FALSE(s->replicate_host_kvp_items());
}

TEST(ApplyRelationshipOptions, HistoryOnEnableDefaultsToFourHourlySnapshots) {
  RelationshipOptions o = Target();
  o.history = 4;
  EXPECT_EQ(
      ApplyRelationshipOptions(o, DefaultRelationshipSettings(), true)->application_consistent_snapshot_interval(), 4u);
  o.vss_hours = 0;  // explicitly off
  EXPECT_EQ(
      ApplyRelationshipOptions(o, DefaultRelationshipSettings(), true)->application_consistent_snapshot_interval(), 0u);
}

TEST(ApplyRelationshipOptions, SetKeepsWhatIsNotNamed) {
  v1::RelationshipSettings base = DefaultRelationshipSettings();
  base.set_recovery_connection_point("old.example.com");
  base.set_recovery_server_port_number(8443);
  base.set_certificate_thumbprint("ABCD");
  base.set_replication_interval(900);
  base.set_recovery_history(3);
  base.set_application_consistent_snapshot_interval(2);
  base.add_included_disks("disk0");
  base.set_recovery_host_system("read-only");
  base.set_primary_connection_point("read-only");
  base.set_primary_host_system("read-only");
  base.set_enable_write_order_preservation_across_disks(false);

  RelationshipOptions o;
  o.interval_s = 30;
  auto s = ApplyRelationshipOptions(o, base, /*creating=*/false);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->recovery_connection_point(), "old.example.com");
  EXPECT_EQ(s->recovery_server_port_number(), 8443u);
  EXPECT_EQ(s->certificate_thumbprint(), "ABCD");
  EXPECT_EQ(s->replication_interval(), 30u);
  EXPECT_EQ(s->recovery_history(), 3u);
  EXPECT_EQ(s->application_consistent_snapshot_interval(), 2u);
  ASSERT_EQ(s->included_disks_size(), 1);
  // Read-only fields are never sent back; write order preservation is always on.
  EXPECT_EQ(s->recovery_host_system(), "");
  EXPECT_EQ(s->primary_connection_point(), "");
  EXPECT_EQ(s->primary_host_system(), "");
  EXPECT_TRUE(s->enable_write_order_preservation_across_disks());
}

TEST(ApplyRelationshipOptions, DroppingTheHistoryTurnsSnapshotsOff) {
  v1::RelationshipSettings base = DefaultRelationshipSettings();
  base.set_recovery_history(3);
  base.set_application_consistent_snapshot_interval(4);
  RelationshipOptions o;
  o.history = 0;
  EXPECT_EQ(ApplyRelationshipOptions(o, base, false)->application_consistent_snapshot_interval(), 0u);
}

TEST(ApplyRelationshipOptions, OutOfRangeValuesAreInvalidArgument) {
  auto bad = [](auto mutate) {
    RelationshipOptions o = Target();
    mutate(o);
    auto s = ApplyRelationshipOptions(o, DefaultRelationshipSettings(), true);
    return !s.ok() && s.status().code() == Code::kInvalidArgument;
  };
  EXPECT_TRUE(bad([](RelationshipOptions& o) { o.interval_s = 60; }));
  EXPECT_TRUE(bad([](RelationshipOptions& o) { o.history = 25; }));
  EXPECT_TRUE(bad([](RelationshipOptions& o) { o.vss_hours = 13; }));
  EXPECT_TRUE(bad([](RelationshipOptions& o) { o.vss_hours = 2; }));  // no history
  EXPECT_TRUE(bad([](RelationshipOptions& o) { o.replica_port = 0; }));
  EXPECT_TRUE(bad([](RelationshipOptions& o) { o.replica_port = 70000; }));
  EXPECT_TRUE(bad([](RelationshipOptions& o) { o.replica_server = ""; }));
  EXPECT_TRUE(bad([](RelationshipOptions& o) { o.auth = "ntlm"; }));
  EXPECT_TRUE(bad([](RelationshipOptions& o) { o.auto_resync_window = "18:30"; }));
}

}  // namespace
}  // namespace vmreplica::cli
