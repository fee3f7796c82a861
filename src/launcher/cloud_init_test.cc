// Failover IP settings: every validation rule refused with the field named,
// the network-config v2 text for static and DHCP adapters, and the NoCloud
// seed image read back with isoinfo (genisoimage's companion).
#include "vmreplica/cloud_init.h"

#include <gtest/gtest.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

namespace vmreplica {
namespace {

using Settings = FailoverNetworkAdapterSettings;

struct TempDir {
  TempDir() {
    std::string t = (std::filesystem::temp_directory_path() / "vmr-cloudinit-XXXXXX").string();
    if (::mkdtemp(t.data()) != nullptr) path = t;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string path;
};

// Runs a shell command line; answers its exit code and stdout.
std::pair<int, std::string> Shell(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return {-1, ""};
  char buf[4096];
  size_t n = 0;
  while ((n = ::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int st = ::pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, out};
}

void RequireTool(const std::string& tool) {
  ASSERT_EQ(Shell("command -v " + tool + " >/dev/null 2>&1").first, 0)
      << tool << " is required for this test (Debian package genisoimage)";
}

Settings Static() {
  Settings s;
  s.adapter = "52:54:00:AB:cd:01";
  s.ip_addresses = {"192.0.2.10", "2001:DB8:0:0::10"};
  s.subnets = {"255.255.255.0", "64"};
  s.default_gateways = {"192.0.2.1", "2001:db8::1"};
  s.dns_servers = {"192.0.2.53", "2001:db8::53"};
  return s;
}

void ExpectRefused(const std::vector<Settings>& list, const std::string& field) {
  Status s = ValidateFailoverNetworkSettings(list);
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << field << ": " << s.ToString();
  EXPECT_NE(s.message().find(field), std::string::npos) << "expected the field " << field << " in: " << s.message();
  // The renderer refuses the same way.
  EXPECT_EQ(RenderNetworkConfigV2(list).status().code(), Code::kInvalidArgument);
}

TEST(CloudInitTest, ValidSettingsPass) {
  EXPECT_TRUE(ValidateFailoverNetworkSettings({Static()}).ok());
  Settings dhcp;
  dhcp.adapter = "eth1";
  dhcp.dhcp_enabled = true;
  dhcp.dns_servers = {"10.0.0.53"};  // allowed with DHCP
  EXPECT_TRUE(ValidateFailoverNetworkSettings({Static(), dhcp}).ok());
  Settings five = Static();
  five.default_gateways = {"192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", "2001:db8::1"};
  EXPECT_TRUE(ValidateFailoverNetworkSettings({five}).ok());
  EXPECT_TRUE(ValidateFailoverNetworkSettings({}).ok());
}

TEST(CloudInitTest, SixthDefaultGatewayIsRefusedNamingIt) {
  Settings s = Static();
  s.default_gateways = {"192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5", "192.0.2.6"};
  Settings ok;
  ok.adapter = "eth9";
  ok.dhcp_enabled = true;
  Status st = ValidateFailoverNetworkSettings({ok, s});
  EXPECT_EQ(st.code(), Code::kInvalidArgument);
  EXPECT_EQ(st.message(), "FailoverNetworkAdapterSettings[1].DefaultGateways[5]: at most 5");
}

TEST(CloudInitTest, MismatchedAddressAndSubnetCountsAreRefused) {
  Settings s = Static();
  s.subnets.pop_back();
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].Subnets");
  s = Static();
  s.subnets.push_back("24");
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].Subnets");
}

TEST(CloudInitTest, BadAddressesAreRefusedNamingTheField) {
  Settings s = Static();
  s.ip_addresses[1] = "2001:db8::zz";
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].IPAddresses[1]");
  s = Static();
  s.ip_addresses[0] = "192.0.2.300";
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].IPAddresses[0]");
  s = Static();
  s.ip_addresses[0] = "0.0.0.0";
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].IPAddresses[0]");
  s = Static();
  s.ip_addresses[0] = "224.0.0.1";
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].IPAddresses[0]");
  s = Static();
  s.default_gateways[1] = "gateway";
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].DefaultGateways[1]");
  s = Static();
  s.dns_servers[0] = "192.0.2";
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].DNSServers[0]");
  s = Static();
  s.dns_servers[1] = "ff02::1";
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].DNSServers[1]");
}

TEST(CloudInitTest, BadSubnetsAreRefused) {
  for (const auto& [index, subnet] : std::vector<std::pair<int, std::string>>{
           {0, "33"}, {0, "0"}, {0, "255.0.255.0"}, {0, "/24"}, {0, "abc"}, {1, "129"}, {1, "255.255.255.0"}}) {
    Settings s = Static();
    s.subnets[index] = subnet;
    ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].Subnets[" + std::to_string(index) + "]");
  }
}

TEST(CloudInitTest, GatewayNeedsAnAddressOfItsFamily) {
  Settings s = Static();
  s.ip_addresses = {"192.0.2.10"};
  s.subnets = {"24"};
  s.default_gateways = {"192.0.2.1", "2001:db8::1"};
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].DefaultGateways[1]");
}

TEST(CloudInitTest, StaticSettingsTogetherWithDhcpAreRefused) {
  Settings s = Static();
  s.dhcp_enabled = true;
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].IPAddresses");
  Settings g;
  g.adapter = "eth0";
  g.dhcp_enabled = true;
  g.default_gateways = {"192.0.2.1"};
  ExpectRefused({g}, "FailoverNetworkAdapterSettings[0].DefaultGateways");
}

TEST(CloudInitTest, BadOrDuplicateAdaptersAreRefused) {
  Settings s = Static();
  s.adapter = "";
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].Adapter");
  s.adapter = "eth 0";
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].Adapter");
  s.adapter = "a-very-long-name0";  // 17 bytes
  ExpectRefused({s}, "FailoverNetworkAdapterSettings[0].Adapter");
  Settings a = Static();
  Settings b = Static();
  b.adapter = "52:54:00:ab:CD:01";  // the same MAC in another case
  ExpectRefused({a, b}, "FailoverNetworkAdapterSettings[1].Adapter");
}

TEST(CloudInitTest, NetworkConfigForAStaticAndADhcpAdapter) {
  Settings dhcp;
  dhcp.adapter = "ens4";
  dhcp.dhcp_enabled = true;
  dhcp.dns_servers = {"10.1.2.3"};
  auto y = RenderNetworkConfigV2({Static(), dhcp});
  ASSERT_TRUE(y.ok()) << y.status().ToString();
  const std::string expected =
      "version: 2\n"
      "ethernets:\n"
      "  nic0:\n"
      "    match:\n"
      "      macaddress: \"52:54:00:ab:cd:01\"\n"
      "    dhcp4: false\n"
      "    dhcp6: false\n"
      "    addresses:\n"
      "      - \"192.0.2.10/24\"\n"
      "      - \"2001:db8::10/64\"\n"
      "    routes:\n"
      "      - to: \"0.0.0.0/0\"\n"
      "        via: \"192.0.2.1\"\n"
      "        metric: 100\n"
      "      - to: \"::/0\"\n"
      "        via: \"2001:db8::1\"\n"
      "        metric: 101\n"
      "    nameservers:\n"
      "      addresses:\n"
      "        - \"192.0.2.53\"\n"
      "        - \"2001:db8::53\"\n"
      "  nic1:\n"
      "    match:\n"
      "      name: \"ens4\"\n"
      "    dhcp4: true\n"
      "    dhcp6: true\n"
      "    nameservers:\n"
      "      addresses:\n"
      "        - \"10.1.2.3\"\n";
  EXPECT_EQ(*y, expected);
}

TEST(CloudInitTest, NetworkConfigIsYamlWithTheExpectedStructure) {
  // An independent reader (PyYAML) must see the structure cloud-init sees.
  ASSERT_EQ(Shell("python3 -c 'import yaml' 2>/dev/null").first, 0) << "python3 with PyYAML is required";
  TempDir dir;
  auto y = RenderNetworkConfigV2({Static()});
  ASSERT_TRUE(y.ok());
  const std::string file = dir.path + "/nc.yaml";
  FILE* f = ::fopen(file.c_str(), "w");
  ASSERT_NE(f, nullptr);
  ::fwrite(y->data(), 1, y->size(), f);
  ::fclose(f);
  auto r = Shell(
      "python3 -c \"import yaml,sys; d=yaml.safe_load(open(sys.argv[1])); e=d['ethernets']['nic0']; "
      "print(d['version'], e['match']['macaddress'], e['dhcp4'], ','.join(e['addresses']), "
      "len(e['routes']), e['routes'][0]['via'], e['nameservers']['addresses'][1])\" " +
      file);
  ASSERT_EQ(r.first, 0) << r.second;
  EXPECT_EQ(r.second, "2 52:54:00:ab:cd:01 False 192.0.2.10/24,2001:db8::10/64 2 192.0.2.1 2001:db8::53\n");
}

TEST(CloudInitTest, MetaDataNeedsAValidInstanceIdAndHostName) {
  NoCloudSeed seed;
  seed.instance_id = "vm-1234.failover_2";
  seed.local_hostname = "web01.example.com";
  auto m = RenderMetaData(seed);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(*m, "instance-id: \"vm-1234.failover_2\"\nlocal-hostname: \"web01.example.com\"\n");
  seed.instance_id = "a b";
  EXPECT_EQ(RenderMetaData(seed).status().code(), Code::kInvalidArgument);
  EXPECT_NE(RenderMetaData(seed).status().message().find("instance_id"), std::string::npos);
  seed.instance_id = "ok";
  for (const char* bad : {"", "-web", "web-", "a..b", "under_score", "x.-y"}) {
    seed.local_hostname = bad;
    Status s = RenderMetaData(seed).status();
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << bad;
    EXPECT_NE(s.message().find("local_hostname"), std::string::npos) << s.message();
  }
}

TEST(CloudInitTest, SeedImageHoldsTheThreeFilesUnderLabelCidata) {
  RequireTool("isoinfo");
  TempDir dir;
  NoCloudSeed seed;
  seed.instance_id = "iid-failover-1";
  seed.local_hostname = "db01";
  seed.user_data = "#cloud-config\nruncmd:\n  - [touch, /run/failover]\n";
  seed.network = {Static()};
  const std::string iso = dir.path + "/seed.iso";
  Status s = WriteNoCloudSeedImage(seed, iso);
  ASSERT_TRUE(s.ok()) << s.ToString();

  auto d = Shell("isoinfo -d -i " + iso);
  ASSERT_EQ(d.first, 0);
  EXPECT_NE(d.second.find("Volume id: cidata\n"), std::string::npos) << d.second;
  auto net = RenderNetworkConfigV2(seed.network);
  ASSERT_TRUE(net.ok());
  // Rock Ridge names (what a Linux mount shows).
  auto r = Shell("isoinfo -R -i " + iso + " -x /network-config");
  ASSERT_EQ(r.first, 0);
  EXPECT_EQ(r.second, *net);
  // Joliet names.
  r = Shell("isoinfo -J -i " + iso + " -x /network-config");
  EXPECT_EQ(r.second, *net);
  r = Shell("isoinfo -J -i " + iso + " -x /meta-data");
  EXPECT_EQ(r.second, "instance-id: \"iid-failover-1\"\nlocal-hostname: \"db01\"\n");
  r = Shell("isoinfo -J -i " + iso + " -x /user-data");
  EXPECT_EQ(r.second, seed.user_data);
  r = Shell("isoinfo -J -f -i " + iso + " | sort");
  EXPECT_EQ(r.second, "/meta-data\n/network-config\n/user-data\n");
  // No work files left beside the image.
  size_t entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path)) ++entries;
  EXPECT_EQ(entries, 1u);
}

TEST(CloudInitTest, SeedWithoutNetworkSettingsHasNoNetworkConfig) {
  RequireTool("isoinfo");
  TempDir dir;
  NoCloudSeed seed;
  seed.instance_id = "iid-2";
  seed.local_hostname = "plain";
  const std::string iso = dir.path + "/seed.iso";
  ASSERT_TRUE(WriteNoCloudSeedImage(seed, iso).ok());
  auto r = Shell("isoinfo -J -f -i " + iso + " | sort");
  EXPECT_EQ(r.second, "/meta-data\n/user-data\n");
  r = Shell("isoinfo -J -i " + iso + " -x /user-data");
  EXPECT_EQ(r.second, "#cloud-config\n");
}

TEST(CloudInitTest, SeedRefusesBadSettingsAndAMissingTool) {
  TempDir dir;
  NoCloudSeed seed;
  seed.instance_id = "iid-3";
  seed.local_hostname = "h";
  Settings bad = Static();
  bad.dhcp_enabled = true;
  seed.network = {bad};
  Status s = WriteNoCloudSeedImage(seed, dir.path + "/seed.iso");
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.ToString();
  EXPECT_FALSE(std::filesystem::exists(dir.path + "/seed.iso"));
  seed.network.clear();
  SeedImageOptions o;
  o.genisoimage_binary = "vmr-no-such-genisoimage";
  s = WriteNoCloudSeedImage(seed, dir.path + "/seed.iso", o);
  EXPECT_EQ(s.code(), Code::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find("genisoimage"), std::string::npos);
}

}  // namespace
}  // namespace vmreplica
