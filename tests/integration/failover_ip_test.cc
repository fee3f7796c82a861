// SetFailoverNetworkAdapterSettings / GetFailoverNetworkAdapterSettings end
// to end: one real vmreplicad, the real CLI (set-failover-ip,
// get-failover-ip) and, for what the CLI refuses before calling, a gRPC
// client on the admin socket. The settings must survive a daemon restart and
// a refused call must store nothing.
//
// The VM: only libvirt bindings (and replica VMs, which carry the primary's
// definition) record NICs; QMP and offline bindings do not. So the test
// writes into the daemon's catalog, before the daemon first starts, the
// record a replica host holds for a replicated libvirt VM: mode Replica and
// the primary's definition with two NICs (the real Catalog and VmDefinition
// code, as ReplicaManager stores it). An offline VM bound with `vm add
// --image` shows the answer for a VM without NICs.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "integration/harness.h"
#include "vmreplica/catalog.h"
#include "vmreplica/control.grpc.pb.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica::testing {
namespace {

using nlohmann::json;

constexpr const char* kVmName = "web01";
constexpr const char* kVmUuid = "3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b";
constexpr const char* kNic1 = "52:54:00:aa:00:01";
constexpr const char* kNic2 = "52:54:00:aa:00:02";

class FailoverIpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MakeCa(dir_ / "ca", "vmreplica failover-ip CA");
    MakeHost(dir_ / "ca", dir_ / "pki", "replica.vmreplica.test", {"localhost", "127.0.0.1"});
    daemon_ = std::make_unique<Daemon>(
        dir_, DaemonSpec{"replica.vmreplica.test", dir_ / "ca/ca.crt", dir_ / "pki/replica.vmreplica.test.crt",
                         dir_ / "pki/replica.vmreplica.test.key", FreePort(), ""});
    SeedReplicaVm();
    if (HasFatalFailure()) return;
    std::string err;
    ASSERT_TRUE(daemon_->Start(&err)) << err;
  }

  // The catalog rows of a replica VM whose primary is a libvirt domain with
  // two NICs (the second given in upper case, as a definition may hold it).
  void SeedReplicaVm() {
    std::filesystem::create_directories(daemon_->state_dir());
    VmDefinition def;
    def.name = kVmName;
    def.uuid = kVmUuid;
    def.memory_mib = 256;
    def.vcpus = 1;
    def.kind = VmSourceKind::kLibvirt;
    def.libvirt_uri = "qemu:///system";
    def.libvirt_domain = kVmName;
    def.libvirt_xml = "<domain type='qemu'><name>web01</name></domain>";
    def.disks.push_back({"vda", "", dir_ / "replicas/vda.raw", "raw", 64ull << 20});
    def.nics.push_back({kNic1, "virtio", "default"});
    def.nics.push_back({kNic2, "virtio", "backend"});
    ASSERT_TRUE(def.Validate().ok()) << def.Validate().ToString();
    auto catalog = Catalog::Open(daemon_->state_dir() + "/catalog.db");
    ASSERT_TRUE(catalog.ok()) << catalog.status().ToString();
    VmRecord rec = ToVmRecord(def);
    rec.mode = ReplicationMode::kReplica;
    ASSERT_TRUE((*catalog)->PutVm(rec).ok());
    ASSERT_TRUE((*catalog)->PutDisks(rec.id, ToDiskRecords(def)).ok());
  }

  // `get-failover-ip --json VM`: the FailoverNetworkResponse document.
  json Get(const std::string& vm = kVmName) {
    auto r = daemon_->Cli({"--json", "get-failover-ip", vm});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    return LastJsonDocument(r.out);
  }

  // A method refused with `code`; the description names `field`.
  static void ExpectRefused(const RunResult& r, const std::string& code, const std::string& field) {
    EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
    EXPECT_NE(r.err.find(code), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(field), std::string::npos) << r.err;
  }

  // Calls SetFailoverNetworkAdapterSettings over the admin socket directly.
  v1::MethodResult CallSet(const v1::FailoverNetworkRequest& request) {
    auto channel = grpc::CreateChannel("unix:" + daemon_->socket(), grpc::InsecureChannelCredentials());
    auto stub = v1::ReplicationService::NewStub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    v1::MethodResponse resp;
    grpc::Status s = stub->SetFailoverNetworkAdapterSettings(&ctx, request, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.result();
  }

  TempDir dir_;
  std::unique_ptr<Daemon> daemon_;
};

// A Get document holds exactly what the first two set-failover-ip calls set.
void ExpectStaticAndDhcp(const json& doc) {
  ASSERT_EQ(JsonInt(doc["result"]["return_value"]), 0) << doc.dump();
  EXPECT_EQ(doc["vm_id"], kVmUuid);
  const json& a = doc["adapters"];
  ASSERT_EQ(a.size(), 2u) << doc.dump();
  EXPECT_EQ(a[0]["adapter"], kNic1);
  EXPECT_EQ(a[0]["ip_addresses"], json({"192.0.2.10", "2001:db8::10"}));
  EXPECT_EQ(a[0]["subnets"], json({"255.255.255.0", "64"}));
  EXPECT_EQ(a[0]["default_gateways"], json({"192.0.2.1", "192.0.2.2"}));
  EXPECT_EQ(a[0]["dns_servers"], json({"192.0.2.53"}));
  EXPECT_EQ(a[0]["dhcp_enabled"], false);
  EXPECT_EQ(JsonInt(a[0]["protocol_if_type"]), 4098);
  EXPECT_EQ(a[1]["adapter"], kNic2);
  EXPECT_EQ(a[1]["ip_addresses"], json::array());
  EXPECT_EQ(a[1]["default_gateways"], json::array());
  EXPECT_EQ(a[1]["dns_servers"], json({"198.51.100.53"}));
  EXPECT_EQ(a[1]["dhcp_enabled"], true);
}

TEST_F(FailoverIpTest, SettingsAreStoredValidatedAndSurviveARestart) {
  if (HasFatalFailure()) return;
  // Nothing stored yet.
  json empty = Get();
  EXPECT_EQ(JsonInt(empty["result"]["return_value"]), 0);
  EXPECT_TRUE(empty["adapters"].empty()) << empty.dump();

  // Static IPv4 + IPv6 with two gateways on NIC 1 (MAC given in upper case),
  // DHCP on NIC 2 (by UUID).
  auto r = daemon_->Cli({"set-failover-ip", kVmName, "--adapter", "52:54:00:AA:00:01", "--ip", "192.0.2.10", "--subnet",
                         "255.255.255.0", "--ip", "2001:db8::10", "--subnet", "64", "--gateway", "192.0.2.1",
                         "--gateway", "192.0.2.2", "--dns", "192.0.2.53"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  r = daemon_->Cli({"set-failover-ip", kVmUuid, "--adapter", kNic2, "--dhcp", "--dns", "198.51.100.53"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const json stored = Get();
  ExpectStaticAndDhcp(stored);

  // The table form shows both adapters.
  r = daemon_->Cli({"get-failover-ip", kVmName});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("192.0.2.1,192.0.2.2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(kNic2), std::string::npos) << r.out;

  // A restart keeps them (catalog).
  ASSERT_TRUE(daemon_->Stop());
  std::string err;
  ASSERT_TRUE(daemon_->Start(&err)) << err;
  ExpectStaticAndDhcp(Get());
  EXPECT_EQ(Get(), stored);

  // Refusals; after each, the stored settings are unchanged.
  {
    // 6 gateways: the CLI refuses before calling (exit 2), so ask the daemon directly.
    v1::FailoverNetworkRequest req;
    req.set_vm(kVmName);
    auto* n = req.add_adapters();
    n->set_adapter(kNic1);
    n->add_ip_addresses("192.0.2.10");
    n->add_subnets("24");
    for (int i = 1; i <= 6; ++i) n->add_default_gateways("192.0.2." + std::to_string(i));
    v1::MethodResult res = CallSet(req);
    EXPECT_EQ(res.return_value(), 32773u);
    EXPECT_NE(res.error_description().find("DefaultGateways[5]"), std::string::npos) << res.error_description();
    EXPECT_EQ(daemon_
                  ->Cli({"set-failover-ip", kVmName,     "--adapter", kNic1,       "--ip",
                         "192.0.2.10",      "--subnet",  "24",        "--gateway", "192.0.2.1",
                         "--gateway",       "192.0.2.2", "--gateway", "192.0.2.3", "--gateway",
                         "192.0.2.4",       "--gateway", "192.0.2.5", "--gateway", "192.0.2.6"})
                  .exit_code,
              2);
  }
  EXPECT_EQ(Get(), stored);
  ExpectRefused(daemon_->Cli({"set-failover-ip", kVmName, "--adapter", kNic1, "--ip", "192.0.2.300", "--subnet", "24"}),
                "32773", "IPAddresses[0]");
  EXPECT_EQ(Get(), stored);
  ExpectRefused(daemon_->Cli({"set-failover-ip", kVmName, "--adapter", kNic1, "--ip", "192.0.2.10", "--subnet", "24",
                              "--gateway", "198.51.100.1", "--gateway", "2001:db8::1"}),
                "32773", "DefaultGateways[1]");
  EXPECT_EQ(Get(), stored);
  ExpectRefused(daemon_->Cli({"set-failover-ip", "no-such-vm", "--adapter", kNic1, "--dhcp"}), "32779", "no-such-vm");
  ExpectRefused(daemon_->Cli({"get-failover-ip", "no-such-vm"}), "32779", "no-such-vm");
  ExpectRefused(daemon_->Cli({"set-failover-ip", kVmName, "--adapter", "52:54:00:aa:00:09", "--dhcp"}), "32773",
                "FailoverNetworkAdapterSettings[0].Adapter");
  ExpectRefused(daemon_->Cli({"set-failover-ip", kVmName, "--adapter", "eth0", "--dhcp"}), "32773",
                "FailoverNetworkAdapterSettings[0].Adapter");
  ExpectRefused(daemon_->Cli({"set-failover-ip", kVmName, "--adapter", kNic2, "--dns", "192.0.2.53"}), "32773",
                "DNSServers");
  {
    // One good adapter and one bad one in a single call: nothing is stored.
    v1::FailoverNetworkRequest req;
    req.set_vm(kVmName);
    auto* good = req.add_adapters();
    good->set_adapter(kNic2);
    good->add_ip_addresses("198.51.100.7");
    good->add_subnets("24");
    auto* bad = req.add_adapters();
    bad->set_adapter(kNic1);
    bad->add_ip_addresses("198.51.100.8");
    bad->add_subnets("33");
    v1::MethodResult res = CallSet(req);
    EXPECT_EQ(res.return_value(), 32773u);
    EXPECT_NE(res.error_description().find("FailoverNetworkAdapterSettings[1].Subnets[0]"), std::string::npos)
        << res.error_description();
  }
  EXPECT_EQ(Get(), stored);
  {
    // Lists are bounded: 33 DNS servers.
    v1::FailoverNetworkRequest req;
    req.set_vm(kVmName);
    auto* n = req.add_adapters();
    n->set_adapter(kNic2);
    n->set_dhcp_enabled(true);
    for (int i = 1; i <= 33; ++i) n->add_dns_servers("198.51.100." + std::to_string(i));
    v1::MethodResult res = CallSet(req);
    EXPECT_EQ(res.return_value(), 32773u);
    EXPECT_NE(res.error_description().find("FailoverNetworkAdapterSettings[0].DNSServers[32]"), std::string::npos)
        << res.error_description();
  }
  EXPECT_EQ(Get(), stored);

  // A VM whose binding records no NICs (offline images) cannot take any.
  const std::string image = dir_ / "offline.raw";
  ASSERT_EQ(RunProgram({"/usr/bin/qemu-img", "create", "-q", "-f", "raw", image, "16M"}).exit_code, 0)
      << "qemu-img (Debian package qemu-utils) is required";
  r = daemon_->Cli({"vm", "add", "offline01", "--image", "vda=" + image, "--memory", "128", "--vcpus", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  ExpectRefused(daemon_->Cli({"set-failover-ip", "offline01", "--adapter", kNic1, "--dhcp"}), "32773",
                "has no network adapters");
  json offline = Get("offline01");
  EXPECT_TRUE(offline["adapters"].empty()) << offline.dump();

  // A later call replaces only the adapter it names, in place.
  r = daemon_->Cli({"set-failover-ip", kVmName, "--adapter", kNic1, "--ip", "203.0.113.5", "--subnet", "24"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  json replaced = Get();
  ASSERT_EQ(replaced["adapters"].size(), 2u) << replaced.dump();
  EXPECT_EQ(replaced["adapters"][0]["adapter"], kNic1);
  EXPECT_EQ(replaced["adapters"][0]["ip_addresses"], json({"203.0.113.5"}));
  EXPECT_EQ(replaced["adapters"][0]["default_gateways"], json::array());
  EXPECT_EQ(JsonInt(replaced["adapters"][0]["protocol_if_type"]), 4096);
  EXPECT_EQ(replaced["adapters"][1], stored["adapters"][1]);

  // Neither addresses nor DHCP: that adapter's settings are removed.
  r = daemon_->Cli({"set-failover-ip", kVmName, "--adapter", kNic1});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  json removed = Get();
  ASSERT_EQ(removed["adapters"].size(), 1u) << removed.dump();
  EXPECT_EQ(removed["adapters"][0], stored["adapters"][1]);

  // Kept over a second restart too.
  ASSERT_TRUE(daemon_->Stop());
  ASSERT_TRUE(daemon_->Start(&err)) << err;
  EXPECT_EQ(Get(), removed);
}

}  // namespace
}  // namespace vmreplica::testing
