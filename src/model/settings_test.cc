#include "vmreplica/model/settings.h"

#include <gtest/gtest.h>

#include <string>

namespace vmreplica {
namespace {

const std::string kThumbprint = "0123456789abcdef0123456789ABCDEF01234567";

RelationshipSettings ValidRelationship() {
  RelationshipSettings s;
  s.recovery_connection_point = "replica.example.com";
  s.recovery_server_port = 443;
  s.authentication_type = AuthenticationType::kCertificate;
  s.certificate_thumbprint = kThumbprint;
  return s;
}

AuthorizationEntry ValidEntry() {
  AuthorizationEntry e;
  e.allowed_primary_host_system = "*.example.com";
  e.replica_storage_location = "/var/lib/vmreplica/replicas";
  e.trust_group = "group-1";
  return e;
}

// Expects InvalidArgument whose message starts with "<field>: ".
::testing::AssertionResult InvalidField(const Status& s, const std::string& field) {
  if (s.code() != Code::kInvalidArgument) {
    return ::testing::AssertionFailure()
           << "expected InvalidArgument for " << field << ", got " << s.ToString();
  }
  if (s.message().rfind(field + ": ", 0) != 0) {
    return ::testing::AssertionFailure()
           << "message does not start with '" << field << ": ': " << s.message();
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult IsOk(const Status& s) {
  if (s.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << s.ToString();
}

std::string Labels(int count, int length) {  // count labels of `length` 'a's
  std::string out;
  for (int i = 0; i < count; ++i) {
    if (i > 0) out += '.';
    out += std::string(static_cast<std::size_t>(length), 'a');
  }
  return out;
}

// ---- Relationship settings ----------------------------------------------

TEST(RelationshipSettingsTest, DefaultsWithAConnectionPointAreValid) {
  EXPECT_TRUE(IsOk(ValidateRelationshipSettings(ValidRelationship(), false)));
  RelationshipSettings kerberos = ValidRelationship();
  kerberos.authentication_type = AuthenticationType::kKerberos;
  kerberos.certificate_thumbprint.clear();
  EXPECT_TRUE(IsOk(ValidateRelationshipSettings(kerberos, false)));
}

TEST(RelationshipSettingsTest, RecoveryConnectionPointMustBeAHostName) {
  const char* kField = "RecoveryConnectionPoint";
  RelationshipSettings s = ValidRelationship();
  auto with = [&](const std::string& v) {
    s.recovery_connection_point = v;
    return ValidateRelationshipSettings(s, false);
  };
  EXPECT_TRUE(InvalidField(with(""), kField));
  EXPECT_TRUE(IsOk(with("r")));
  EXPECT_TRUE(IsOk(with("10.0.0.7")));
  EXPECT_TRUE(IsOk(with("fd00::7")));
  const std::string longest = Labels(3, 63) + "." + std::string(61, 'b');  // 253
  ASSERT_EQ(longest.size(), 253u);
  EXPECT_TRUE(IsOk(with(longest)));
  EXPECT_TRUE(InvalidField(with(longest + "b"), kField));  // 254: too long for a host name
  const Status way_too_long = with(std::string(257, 'a'));
  EXPECT_TRUE(InvalidField(way_too_long, kField));
  EXPECT_NE(way_too_long.message().find("256"), std::string::npos) << way_too_long.message();
  EXPECT_TRUE(InvalidField(with("bad_host.example.com"), kField));
}

TEST(RelationshipSettingsTest, PortIsOneTo65535) {
  const char* kField = "RecoveryServerPortNumber";
  RelationshipSettings s = ValidRelationship();
  for (uint32_t ok : {1u, 80u, 65535u}) {
    s.recovery_server_port = ok;
    EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, false))) << ok;
  }
  s.recovery_server_port = 0;
  const Status unset = ValidateRelationshipSettings(s, false);
  EXPECT_TRUE(InvalidField(unset, kField));
  EXPECT_EQ(unset.message(), "RecoveryServerPortNumber: 0 is outside 1..65535");
  s.recovery_server_port = 65536;
  EXPECT_TRUE(InvalidField(ValidateRelationshipSettings(s, false), kField));
}

TEST(RelationshipSettingsTest, AuthenticationTypeIsKerberosOrCertificate) {
  RelationshipSettings s = ValidRelationship();
  for (uint16_t bad : {0, 3, 65535}) {
    s.authentication_type = static_cast<AuthenticationType>(bad);
    EXPECT_TRUE(InvalidField(ValidateRelationshipSettings(s, false), "AuthenticationType")) << bad;
  }
}

TEST(RelationshipSettingsTest, CertificateNeedsA40HexDigitThumbprint) {
  const char* kField = "CertificateThumbPrint";
  RelationshipSettings s = ValidRelationship();
  s.certificate_thumbprint = "";
  EXPECT_TRUE(InvalidField(ValidateRelationshipSettings(s, false), kField));
  s.certificate_thumbprint = kThumbprint.substr(1);  // 39
  EXPECT_TRUE(InvalidField(ValidateRelationshipSettings(s, false), kField));
  s.certificate_thumbprint = kThumbprint + "0";  // 41
  EXPECT_TRUE(InvalidField(ValidateRelationshipSettings(s, false), kField));
  s.certificate_thumbprint = "g" + kThumbprint.substr(1);
  EXPECT_TRUE(InvalidField(ValidateRelationshipSettings(s, false), kField));
  s.certificate_thumbprint = std::string(40, 'F');
  EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, false)));
  // With Kerberos the thumbprint is optional, but a set one must be well formed.
  s.authentication_type = AuthenticationType::kKerberos;
  s.certificate_thumbprint = "nope";
  EXPECT_TRUE(InvalidField(ValidateRelationshipSettings(s, false), kField));
}

TEST(RelationshipSettingsTest, ReplicationIntervalIs30Or300Or900) {
  RelationshipSettings s = ValidRelationship();
  for (uint32_t ok : {30u, 300u, 900u}) {
    s.replication_interval_s = ok;
    EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, false))) << ok;
  }
  for (uint32_t bad : {0u, 29u, 31u, 60u, 299u, 301u, 899u, 901u, 3600u}) {
    s.replication_interval_s = bad;
    const Status st = ValidateRelationshipSettings(s, false);
    EXPECT_TRUE(InvalidField(st, "ReplicationInterval")) << bad;
    EXPECT_EQ(st.message(), "ReplicationInterval: " + std::to_string(bad) + " is not one of 30, 300, 900");
  }
}

TEST(RelationshipSettingsTest, ExtendedIntervalIs300Or900AndNotShorterThanThePrimarys) {
  RelationshipSettings s = ValidRelationship();
  s.replication_interval_s = 30;
  const Status thirty = ValidateRelationshipSettings(s, true, 30);
  EXPECT_TRUE(InvalidField(thirty, "ReplicationInterval"));
  EXPECT_EQ(thirty.message(), "ReplicationInterval: 30 is not one of 300, 900 (extended relationship)");
  s.replication_interval_s = 300;
  EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, true, 30)));
  EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, true, 300)));
  EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, true)));  // primary's unknown: not compared
  const Status shorter = ValidateRelationshipSettings(s, true, 900);
  EXPECT_TRUE(InvalidField(shorter, "ReplicationInterval"));
  EXPECT_EQ(shorter.message(), "ReplicationInterval: 300 is shorter than the primary relationship's 900");
  s.replication_interval_s = 900;
  EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, true, 900)));
  // The primary's interval only matters for an extended relationship.
  s.replication_interval_s = 30;
  EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, false, 900)));
}

TEST(RelationshipSettingsTest, RecoveryHistoryIs0To24) {
  RelationshipSettings s = ValidRelationship();
  for (uint32_t ok : {0u, 1u, 24u}) {
    s.recovery_history = ok;
    EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, false))) << ok;
  }
  s.recovery_history = 25;
  const Status st = ValidateRelationshipSettings(s, false);
  EXPECT_TRUE(InvalidField(st, "RecoveryHistory"));
  EXPECT_EQ(st.message(), "RecoveryHistory: 25 is outside 0..24");
}

TEST(RelationshipSettingsTest, AppConsistentIntervalIs0To12AndNeedsHistory) {
  const char* kField = "ApplicationConsistentSnapshotInterval";
  RelationshipSettings s = ValidRelationship();
  s.recovery_history = 4;
  for (uint32_t ok : {0u, 1u, 12u}) {
    s.application_consistent_snapshot_interval_h = ok;
    EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, false))) << ok;
  }
  s.application_consistent_snapshot_interval_h = 13;
  EXPECT_TRUE(InvalidField(ValidateRelationshipSettings(s, false), kField));
  s.application_consistent_snapshot_interval_h = 1;
  s.recovery_history = 0;
  const Status no_history = ValidateRelationshipSettings(s, false);
  EXPECT_TRUE(InvalidField(no_history, kField));
  EXPECT_NE(no_history.message().find("RecoveryHistory"), std::string::npos);
  s.application_consistent_snapshot_interval_h = 0;
  EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, false)));
}

TEST(RelationshipSettingsTest, ExtendedRelationshipHasNoAppConsistentPoints) {
  RelationshipSettings s = ValidRelationship();
  s.recovery_history = 4;
  s.application_consistent_snapshot_interval_h = 1;
  const Status st = ValidateRelationshipSettings(s, true, 300);
  EXPECT_TRUE(InvalidField(st, "ApplicationConsistentSnapshotInterval"));
  EXPECT_NE(st.message().find("extended"), std::string::npos);
  s.application_consistent_snapshot_interval_h = 0;
  EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, true, 300)));  // history alone is fine
}

TEST(RelationshipSettingsTest, AutoResynchronizeWindowIsMinutesOfADayAndNotEmpty) {
  RelationshipSettings s = ValidRelationship();
  s.auto_resynchronize_interval_start_min = 0;
  s.auto_resynchronize_interval_end_min = 1439;
  EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, false)));
  s.auto_resynchronize_interval_start_min = 1439;
  s.auto_resynchronize_interval_end_min = 0;  // wraps past midnight
  EXPECT_TRUE(IsOk(ValidateRelationshipSettings(s, false)));
  s.auto_resynchronize_interval_start_min = 1440;
  EXPECT_TRUE(InvalidField(ValidateRelationshipSettings(s, false), "AutoResynchronizeIntervalStart"));
  s.auto_resynchronize_interval_start_min = 0;
  s.auto_resynchronize_interval_end_min = 1440;
  EXPECT_TRUE(InvalidField(ValidateRelationshipSettings(s, false), "AutoResynchronizeIntervalEnd"));
  s.auto_resynchronize_interval_start_min = 600;
  s.auto_resynchronize_interval_end_min = 600;
  EXPECT_TRUE(InvalidField(ValidateRelationshipSettings(s, false), "AutoResynchronizeIntervalEnd"));
}

TEST(RelationshipSettingsTest, WriteOrderPreservationMustStayOn) {
  RelationshipSettings s = ValidRelationship();
  s.enable_write_order_preservation_across_disks = false;
  const Status st = ValidateRelationshipSettings(s, false);
  EXPECT_TRUE(InvalidField(st, "EnableWriteOrderPreservationAcrossDisks"));
}

TEST(RelationshipSettingsTest, IncludedDiskNamesAreShortSafeAndUnique) {
  const char* kField = "IncludedDisks";
  RelationshipSettings s = ValidRelationship();
  auto with = [&](std::vector<std::string> disks) {
    s.included_disks = std::move(disks);
    return ValidateRelationshipSettings(s, false);
  };
  EXPECT_TRUE(IsOk(with({})));
  EXPECT_TRUE(IsOk(with({"disk0", "a.b_c-D", std::string(64, 'x'), "Disk0", "..."})));
  EXPECT_TRUE(InvalidField(with({std::string(65, 'x')}), kField));
  EXPECT_TRUE(InvalidField(with({"disk0", ""}), kField));
  EXPECT_TRUE(InvalidField(with({"a/b"}), kField));
  EXPECT_TRUE(InvalidField(with({"a b"}), kField));
  EXPECT_TRUE(InvalidField(with({"d\xc3\xa9"}), kField));
  EXPECT_TRUE(InvalidField(with({"."}), kField));
  EXPECT_TRUE(InvalidField(with({".."}), kField));
  const Status twice = with({"disk0", "disk1", "disk0"});
  EXPECT_TRUE(InvalidField(twice, kField));
  EXPECT_NE(twice.message().find("'disk0'"), std::string::npos);
}

// ---- Server settings -------------------------------------------------------

TEST(ServerSettingsTest, DefaultsAreValid) { EXPECT_TRUE(IsOk(ValidateServerSettings(ServerSettings{}))); }

TEST(ServerSettingsTest, EveryFieldHasItsBounds) {
  struct Case {
    const char* field;
    uint32_t ServerSettings::*member;
    uint32_t lo, hi;
  };
  const Case cases[] = {
      {"HttpPort", &ServerSettings::http_port, 1, 65535},
      {"HttpsPort", &ServerSettings::https_port, 1, 65535},
      {"MonitoringInterval", &ServerSettings::monitoring_interval_s, 3600, 604800},
      {"MonitoringStartTime", &ServerSettings::monitoring_start_time_min, 0, 1439},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.field);
    ServerSettings s;
    s.*c.member = c.lo;
    EXPECT_TRUE(IsOk(ValidateServerSettings(s)));
    s.*c.member = c.hi;
    EXPECT_TRUE(IsOk(ValidateServerSettings(s)));
    s.*c.member = c.hi + 1;
    EXPECT_TRUE(InvalidField(ValidateServerSettings(s), c.field));
    if (c.lo > 0) {
      s.*c.member = c.lo - 1;
      const Status st = ValidateServerSettings(s);
      EXPECT_TRUE(InvalidField(st, c.field));
      EXPECT_EQ(st.message(), std::string(c.field) + ": " + std::to_string(c.lo - 1) + " is outside " +
                                  std::to_string(c.lo) + ".." + std::to_string(c.hi));
    }
  }
}

TEST(ServerSettingsTest, AllowedAuthenticationTypeIs0To3) {
  ServerSettings s;
  for (AllowedAuthenticationType t : AllValues<AllowedAuthenticationType>()) {
    s.allowed_authentication_type = t;
    EXPECT_TRUE(IsOk(ValidateServerSettings(s)));
  }
  s.allowed_authentication_type = static_cast<AllowedAuthenticationType>(4);
  EXPECT_TRUE(InvalidField(ValidateServerSettings(s), "AllowedAuthenticationType"));
}

// ---- Authorization entries -------------------------------------------------

TEST(AuthorizationEntryTest, ValidEntriesPass) {
  AuthorizationEntry e = ValidEntry();
  EXPECT_TRUE(IsOk(ValidateAuthorizationEntry(e)));
  e.allowed_primary_host_system = "*";
  e.replica_storage_location = "/";
  e.trust_group = "";
  EXPECT_TRUE(IsOk(ValidateAuthorizationEntry(e)));
  e.allowed_primary_host_system = "primary1.example.com";
  EXPECT_TRUE(IsOk(ValidateAuthorizationEntry(e)));
}

TEST(AuthorizationEntryTest, PatternMustBeValid) {
  AuthorizationEntry e = ValidEntry();
  for (const char* bad :
       {"", "a.*.com", "*foo.com", "**.com", "*.", "*.*.com", "*.1.2.3.4", "h*", "bad_host"}) {
    e.allowed_primary_host_system = bad;
    EXPECT_TRUE(InvalidField(ValidateAuthorizationEntry(e), "AllowedPrimaryHostSystem")) << bad;
  }
}

TEST(AuthorizationEntryTest, StorageLocationIsAbsoluteAndNormalised) {
  const char* kField = "ReplicaStorageLocation";
  AuthorizationEntry e = ValidEntry();
  for (const std::string& bad :
       std::vector<std::string>{"", "relative/dir", "./x", "/a//b", "//a", "/a/../b", "/a/./b", "/a/..",
                                "/a/", std::string("/a\nb"), std::string("/a\0b", 4)}) {
    e.replica_storage_location = bad;
    EXPECT_TRUE(InvalidField(ValidateAuthorizationEntry(e), kField)) << bad;
  }
  for (const char* ok : {"/srv/replicas", "/a/.hidden/b", "/a/..b/c...", "/x y/z"}) {
    e.replica_storage_location = ok;
    EXPECT_TRUE(IsOk(ValidateAuthorizationEntry(e))) << ok;
  }
  const std::string longest = "/" + Labels(1, 4095);
  e.replica_storage_location = longest;
  EXPECT_TRUE(IsOk(ValidateAuthorizationEntry(e)));
  e.replica_storage_location = longest + "a";
  EXPECT_TRUE(InvalidField(ValidateAuthorizationEntry(e), kField));
}

TEST(AuthorizationEntryTest, TrustGroupIsShortPrintableAscii) {
  AuthorizationEntry e = ValidEntry();
  e.trust_group = std::string(256, 'g');
  EXPECT_TRUE(IsOk(ValidateAuthorizationEntry(e)));
  e.trust_group = " Finance ~ group ";
  EXPECT_TRUE(IsOk(ValidateAuthorizationEntry(e)));
  e.trust_group = std::string(257, 'g');
  EXPECT_TRUE(InvalidField(ValidateAuthorizationEntry(e), "TrustGroup"));
  for (const char* bad : {"a\tb", "caf\xc3\xa9", "\x7f"}) {
    e.trust_group = bad;
    EXPECT_TRUE(InvalidField(ValidateAuthorizationEntry(e), "TrustGroup")) << bad;
  }
}

// ---- Host names, patterns, matching -----------------------------------------

TEST(HostNameTest, AcceptsRfc1123NamesAndAddressLiterals) {
  for (const std::string& ok : std::vector<std::string>{
           "a", "a-b.c", "A.EXAMPLE.COM", "xn--bcher-kva.example", "1a.example.com", "host.123",
           Labels(1, 63), Labels(3, 63) + "." + std::string(61, 'b'), "0.0.0.0", "1.2.3.4", "255.255.255.255",
           "::1", "fe80::1", "2001:db8::8a2e:370:7334", "::ffff:192.0.2.1"}) {
    EXPECT_TRUE(IsOk(ValidateHostName(ok, "F"))) << ok;
  }
}

TEST(HostNameTest, RefusesBadLabelsAndBadLiterals) {
  for (const std::string& bad : std::vector<std::string>{"",
                                                         Labels(1, 64),
                                                         Labels(3, 63) + "." + std::string(62, 'b'),
                                                         "-a",
                                                         "a-",
                                                         "a.-b",
                                                         "a..b",
                                                         ".a",
                                                         "a.",
                                                         "a_b",
                                                         "a b",
                                                         "h\xc3\xa9",
                                                         "*",
                                                         "*.example.com",
                                                         "256.1.1.1",
                                                         "01.2.3.4",
                                                         "1.2.3",
                                                         "1.2.3.4.5",
                                                         "1..2.3",
                                                         "123",
                                                         "[::1]",
                                                         "1:2:3",
                                                         "fe80::1%eth0",
                                                         "::g"}) {
    const Status st = ValidateHostName(bad, "SomeField");
    EXPECT_TRUE(InvalidField(st, "SomeField")) << bad;
  }
}

TEST(HostPatternTest, WildcardOnlyAsTheWholeFirstLabel) {
  for (const char* ok :
       {"*", "*.example.com", "*.com", "*.EXAMPLE.com", "host.example.com", "10.0.0.1", "::1"}) {
    EXPECT_TRUE(IsOk(ValidateHostPattern(ok, "P"))) << ok;
  }
  for (const char* bad : {"", "a.*.com", "*foo.com", "foo*.com", "**.com", "*.*.com", "*.", "*..com",
                          "*.1.2.3.4", "*.::1", "example.*", "* .com"}) {
    EXPECT_TRUE(InvalidField(ValidateHostPattern(bad, "P"), "P")) << bad;
  }
}

TEST(HostMatchTest, StarMatchesEveryValidHost) {
  EXPECT_TRUE(HostMatchesPattern("h.example.com", "*"));
  EXPECT_TRUE(HostMatchesPattern("localhost", "*"));
  EXPECT_TRUE(HostMatchesPattern("10.0.0.1", "*"));
  EXPECT_FALSE(HostMatchesPattern("", "*"));
  EXPECT_FALSE(HostMatchesPattern("bad_host", "*"));
}

TEST(HostMatchTest, WildcardMatchesOneOrMoreLabelsButNotTheSuffixItself) {
  EXPECT_TRUE(HostMatchesPattern("h.example.com", "*.example.com"));
  EXPECT_TRUE(HostMatchesPattern("a.b.example.com", "*.example.com"));
  EXPECT_TRUE(HostMatchesPattern("H.Example.COM", "*.example.com"));
  EXPECT_TRUE(HostMatchesPattern("h.example.com", "*.EXAMPLE.COM"));
  EXPECT_FALSE(HostMatchesPattern("example.com", "*.example.com"));
  EXPECT_FALSE(HostMatchesPattern("hexample.com", "*.example.com"));
  EXPECT_FALSE(HostMatchesPattern("h.example.com.evil.net", "*.example.com"));
  EXPECT_FALSE(HostMatchesPattern("h.example.co", "*.example.com"));
  EXPECT_FALSE(HostMatchesPattern("h.notexample.com", "*.example.com"));
}

TEST(HostMatchTest, ExactPatternsCompareCaseInsensitively) {
  EXPECT_TRUE(HostMatchesPattern("Host.Example.com", "host.example.COM"));
  EXPECT_FALSE(HostMatchesPattern("host2.example.com", "host.example.com"));
  EXPECT_TRUE(HostMatchesPattern("FE80::1", "fe80::1"));
  EXPECT_FALSE(HostMatchesPattern("::1", "0::1"));  // textual, documented
}

TEST(HostMatchTest, InvalidPatternsOrHostsNeverMatch) {
  EXPECT_FALSE(HostMatchesPattern("a.b.com", "a.*.com"));
  EXPECT_FALSE(HostMatchesPattern("a.*.com", "a.*.com"));
  EXPECT_FALSE(HostMatchesPattern("x.example.com", ""));
  EXPECT_FALSE(HostMatchesPattern("bad_host.example.com", "*.example.com"));
  EXPECT_FALSE(HostMatchesPattern("*.example.com", "*.example.com"));
}

}  // namespace
}  // namespace vmreplica
