// Tests of the VM binding: definition JSON and validation (unit), the QMP
// and offline kinds against real qemu-storage-daemons, the libvirt kind
// against a real libvirtd (vm_libvirt_test.cc).
#include "vmreplica/vm_binding.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "qemu/qemu_test_util.h"
#include "vmreplica/nbd_reader.h"
#include "vmreplica/tracker.h"

namespace vmreplica {
namespace {

using testutil::TempDir;

constexpr uint64_t kMiB = 1u << 20;

VmDefinition SampleDefinition() {
  VmDefinition d;
  d.name = "web01";
  d.uuid = "0b7c3a52-6a0e-4d55-9f1e-3c2d4b5a6978";
  d.memory_mib = 2048;
  d.vcpus = 2;
  d.disks.push_back({"vda", "drive-vda", "/var/lib/images/web01.qcow2", "qcow2", 20ull << 30});
  d.disks.push_back({"vdb", "drive-vdb", "/var/lib/images/web01-data.raw", "raw", 1ull << 30});
  d.nics.push_back({"52:54:00:aa:bb:cc", "virtio", "default"});
  d.kind = VmSourceKind::kQmp;
  d.qmp_socket = "/run/web01.qmp";
  d.nbd_socket = "/run/web01.nbd";
  return d;
}

// Reads every record of a cut's disk and returns the bytes of dirty data by offset.
std::vector<DeltaRecord> ReadCut(const CutDisk& disk) {
  std::vector<DeltaRecord> out;
  auto reader = NbdDeltaReader::Open(disk.socket_path, disk.export_name, 0, disk.bitmap_context);
  EXPECT_TRUE(reader.ok()) << reader.status().ToString();
  if (!reader.ok()) return out;
  for (;;) {
    auto r = (*reader)->Next();
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    if (!r.ok() || !r->has_value()) break;
    out.push_back(std::move(**r));
  }
  return out;
}

// True when `records` hold exactly `len` bytes of `byte` at `offset` (as data).
bool HasBytes(const std::vector<DeltaRecord>& records, uint64_t offset, uint64_t len, char byte) {
  for (const auto& r : records) {
    if (r.zero || r.offset > offset || r.offset + r.length < offset + len) continue;
    std::string want(len, byte);
    return r.data.compare(offset - r.offset, len, want) == 0;
  }
  return false;
}

// ---- definition JSON (unit)

TEST(VmDefinitionTest, JsonRoundTripKeepsEveryField) {
  VmDefinition d = SampleDefinition();
  d.libvirt_xml = "<domain/>";
  auto back = VmDefinition::FromJson(nlohmann::json::parse(d.ToJson().dump()));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->ToJson(), d.ToJson());
  EXPECT_EQ(back->name, "web01");
  EXPECT_EQ(back->disks.size(), 2u);
  EXPECT_EQ(back->disks[1].format, "raw");
  EXPECT_EQ(back->disks[0].size_bytes, 20ull << 30);
  EXPECT_EQ(back->nics[0].mac, "52:54:00:aa:bb:cc");
  EXPECT_EQ(back->kind, VmSourceKind::kQmp);
  EXPECT_EQ(back->qmp_socket, "/run/web01.qmp");
  EXPECT_EQ(back->nbd_socket, "/run/web01.nbd");
}

TEST(VmDefinitionTest, LaterFieldsRoundTripAndMayBeAbsent) {
  VmDefinition d = SampleDefinition();
  d.qga_socket = "/run/web01.qga";
  d.boot_kernel = "/boot/vmlinuz";
  d.boot_initrd = "/boot/initrd.img";
  d.boot_append = "console=ttyS0 root=/dev/vda1";
  auto back = VmDefinition::FromJson(nlohmann::json::parse(d.ToJson().dump()));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->qga_socket, "/run/web01.qga");
  EXPECT_EQ(back->boot_kernel, "/boot/vmlinuz");
  EXPECT_EQ(back->boot_initrd, "/boot/initrd.img");
  EXPECT_EQ(back->boot_append, "console=ttyS0 root=/dev/vda1");
  // A definition stored before these fields existed still reads.
  nlohmann::json old = SampleDefinition().ToJson();
  for (const char* k : {"qga_socket", "boot_kernel", "boot_initrd", "boot_append"}) old.erase(k);
  auto older = VmDefinition::FromJson(old);
  ASSERT_TRUE(older.ok()) << older.status().ToString();
  EXPECT_EQ(older->qga_socket, "");
  EXPECT_EQ(older->boot_kernel, "");
}

TEST(VmDefinitionTest, CatalogRecordsCarryTheDefinition) {
  VmDefinition d = SampleDefinition();
  VmRecord r = ToVmRecord(d);
  EXPECT_EQ(r.id, d.uuid);
  EXPECT_EQ(r.name, "web01");
  EXPECT_EQ(r.mode, ReplicationMode::kNone);
  EXPECT_EQ(nlohmann::json::parse(r.definition_json), d.ToJson());
  auto disks = ToDiskRecords(d);
  ASSERT_EQ(disks.size(), 2u);
  EXPECT_EQ(disks[1].vm_id, d.uuid);
  EXPECT_EQ(disks[1].name, "vdb");
  EXPECT_EQ(disks[1].path, "/var/lib/images/web01-data.raw");
  EXPECT_EQ(disks[1].node_name, "drive-vdb");
  EXPECT_EQ(disks[1].size_bytes, 1ull << 30);
  EXPECT_TRUE(disks[1].included);
}

struct BadField {
  const char* field;  // expected in the message
  std::function<void(nlohmann::json&)> mutate;
};

TEST(VmDefinitionTest, EveryBadFieldIsNamed) {
  std::vector<BadField> cases = {
      {"version", [](nlohmann::json& j) { j["version"] = 2; }},
      {"version", [](nlohmann::json& j) { j.erase("version"); }},
      {"kind", [](nlohmann::json& j) { j["kind"] = "xen"; }},
      {"kind", [](nlohmann::json& j) { j["kind"] = 1; }},
      {"name", [](nlohmann::json& j) { j["name"] = ""; }},
      {"name", [](nlohmann::json& j) { j["name"] = "a/b"; }},
      {"name", [](nlohmann::json& j) { j["name"] = "bad\nname"; }},
      {"name", [](nlohmann::json& j) { j.erase("name"); }},
      {"uuid", [](nlohmann::json& j) { j["uuid"] = "not-a-uuid"; }},
      {"uuid", [](nlohmann::json& j) { j["uuid"] = "0B7C3A52-6A0E-4D55-9F1E-3C2D4B5A6978"; }},
      {"memory_mib", [](nlohmann::json& j) { j["memory_mib"] = 0; }},
      {"memory_mib", [](nlohmann::json& j) { j["memory_mib"] = -5; }},
      {"memory_mib", [](nlohmann::json& j) { j["memory_mib"] = "2048"; }},
      {"vcpus", [](nlohmann::json& j) { j["vcpus"] = 0; }},
      {"vcpus", [](nlohmann::json& j) { j["vcpus"] = 5000; }},
      {"disks", [](nlohmann::json& j) { j["disks"] = nlohmann::json::array(); }},
      {"disks", [](nlohmann::json& j) { j["disks"] = "vda"; }},
      {"disks[1]", [](nlohmann::json& j) { j["disks"][1] = 7; }},
      {"disks[0].name", [](nlohmann::json& j) { j["disks"][0]["name"] = "1vda"; }},
      {"disks[0].name", [](nlohmann::json& j) { j["disks"][0]["name"] = std::string(27, 'a'); }},
      {"disks[1].name", [](nlohmann::json& j) { j["disks"][1]["name"] = "vda"; }},
      {"disks[0].node_name", [](nlohmann::json& j) { j["disks"][0]["node_name"] = ""; }},
      {"disks[0].path", [](nlohmann::json& j) { j["disks"][0]["path"] = "relative.qcow2"; }},
      {"disks[1].format", [](nlohmann::json& j) { j["disks"][1]["format"] = "vmdk"; }},
      {"disks[0].size_bytes", [](nlohmann::json& j) { j["disks"][0]["size_bytes"] = 0; }},
      {"disks[0].size_bytes", [](nlohmann::json& j) { j["disks"][0].erase("size_bytes"); }},
      {"nics[0].mac", [](nlohmann::json& j) { j["nics"][0]["mac"] = "52:54:00:AA:BB:CC"; }},
      {"nics[0].mac", [](nlohmann::json& j) { j["nics"][0]["mac"] = "52-54-00-aa-bb-cc"; }},
      {"nics[0].model", [](nlohmann::json& j) { j["nics"][0]["model"] = nullptr; }},
      {"nics", [](nlohmann::json& j) { j.erase("nics"); }},
      {"qmp_socket", [](nlohmann::json& j) { j["qmp_socket"] = ""; }},
      {"qmp_socket", [](nlohmann::json& j) { j["qmp_socket"] = "/" + std::string(120, 's'); }},
      {"nbd_socket", [](nlohmann::json& j) { j["nbd_socket"] = "relative.sock"; }},
      {"nbd_socket", [](nlohmann::json& j) { j.erase("nbd_socket"); }},
      {"qga_socket", [](nlohmann::json& j) { j["qga_socket"] = "relative.sock"; }},
      {"qga_socket", [](nlohmann::json& j) { j["qga_socket"] = 5; }},
      {"boot_kernel", [](nlohmann::json& j) { j["boot_kernel"] = "vmlinuz"; }},
      {"boot_kernel", [](nlohmann::json& j) { j["boot_append"] = "console=ttyS0"; }},
      {"boot_initrd", [](nlohmann::json& j) {
         j["boot_kernel"] = "/boot/vmlinuz";
         j["boot_initrd"] = "initrd";
       }},
      {"boot_append", [](nlohmann::json& j) {
         j["boot_kernel"] = "/boot/vmlinuz";
         j["boot_append"] = "bad\x01";
       }},
      {"libvirt_xml",
       [](nlohmann::json& j) {
         j["kind"] = "libvirt";
         j["libvirt_uri"] = "qemu:///system";
         j["libvirt_domain"] = "web01";
       }},
      {"libvirt_domain",
       [](nlohmann::json& j) {
         j["kind"] = "libvirt";
         j["libvirt_uri"] = "qemu:///system";
         j["libvirt_xml"] = "<domain/>";
       }},
      {"libvirt_uri", [](nlohmann::json& j) { j.erase("libvirt_uri"); }},
  };
  for (const auto& c : cases) {
    nlohmann::json j = SampleDefinition().ToJson();
    c.mutate(j);
    auto r = VmDefinition::FromJson(j);
    ASSERT_FALSE(r.ok()) << "accepted with a bad " << c.field << ": " << j.dump();
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << r.status().ToString();
    EXPECT_NE(r.status().message().find(c.field), std::string::npos)
        << "message does not name " << c.field << ": " << r.status().ToString();
  }
  auto not_object = VmDefinition::FromJson(nlohmann::json::array());
  EXPECT_EQ(not_object.status().code(), Code::kInvalidArgument);
}

TEST(VmDefinitionTest, OfflineAndLibvirtKindsValidate) {
  VmDefinition d = SampleDefinition();
  d.kind = VmSourceKind::kOffline;
  d.qmp_socket.clear();
  EXPECT_TRUE(d.Validate().ok()) << d.Validate().ToString();
  d.kind = VmSourceKind::kLibvirt;
  d.libvirt_uri = "qemu:///system";
  d.libvirt_domain = "web01";
  d.libvirt_xml = "<domain type='kvm'/>";
  d.disks[0].node_name.clear();  // a stopped domain has no node names yet
  EXPECT_TRUE(d.Validate().ok()) << d.Validate().ToString();
  EXPECT_EQ(ParseVmSourceKind("libvirt").value(), VmSourceKind::kLibvirt);
  EXPECT_FALSE(ParseVmSourceKind("LIBVIRT").ok());
}

// ---- QMP and offline kinds (e2e: qemu-storage-daemon)

class VmBindingE2eTest : public ::testing::Test {
 protected:
  std::string MakeImage(const std::string& name, const char* format, const char* size = "64M") {
    std::string path = dir_.path() + "/" + name + "." + format;
    auto r = testutil::Run(std::string("qemu-img create -q -f ") + format + " " + path + " " + size);
    EXPECT_EQ(r.exit_code, 0) << "qemu-img (package qemu-utils) is required: " << r.output;
    return path;
  }
  TempDir dir_{"vm"};
};

TEST_F(VmBindingE2eTest, QmpKindInspectAttachTrackAndReadCut) {
  std::string image = MakeImage("vda", "qcow2");
  std::string run = dir_.path() + "/qsd";
  std::filesystem::create_directory(run);
  QsdOptions o;
  o.run_dir = run;
  o.disks = {{"vda", image, "qcow2", true}};
  QsdProcess qsd(o);
  Status started = qsd.Start();
  ASSERT_TRUE(started.ok()) << "qemu-storage-daemon (package qemu-system-common) is required: " << started.ToString();

  VmAddRequest req;
  req.kind = VmSourceKind::kQmp;
  req.name = "qmpvm";
  req.qmp_socket = qsd.qmp_socket();
  req.disk_nodes = {{"vda", "vda"}};
  req.memory_mib = 256;
  req.vcpus = 1;
  auto def = InspectVm(req);
  ASSERT_TRUE(def.ok()) << def.status().ToString();
  EXPECT_EQ(def->name, "qmpvm");
  EXPECT_EQ(def->memory_mib, 256u);  // a QSD has no query-memory-size-summary: the request's value
  EXPECT_EQ(def->vcpus, 1u);
  ASSERT_EQ(def->disks.size(), 1u);
  EXPECT_EQ(def->disks[0].node_name, "vda");
  EXPECT_EQ(def->disks[0].path, image);
  EXPECT_EQ(def->disks[0].format, "qcow2");
  EXPECT_EQ(def->disks[0].size_bytes, 64 * kMiB);
  EXPECT_TRUE(def->Validate().ok());
  auto again = InspectVm(req);
  ASSERT_TRUE(again.ok());
  EXPECT_NE(again->uuid, def->uuid) << "a generated uuid must be fresh each time";

  // Errors: unknown node, nobody listening, a protocol node instead of the format node.
  VmAddRequest bad = req;
  bad.disk_nodes = {{"vda", "nosuchnode"}};
  EXPECT_EQ(InspectVm(bad).status().code(), Code::kNotFound);
  bad.disk_nodes = {{"vda", "vda-file"}};
  auto proto_node = InspectVm(bad);
  EXPECT_EQ(proto_node.status().code(), Code::kInvalidArgument) << proto_node.status().ToString();
  bad = req;
  bad.qmp_socket = dir_.path() + "/nobody.sock";
  EXPECT_EQ(InspectVm(bad).status().code(), Code::kUnavailable);
  bad = req;
  bad.memory_mib = 0;
  auto no_mem = InspectVm(bad);
  EXPECT_EQ(no_mem.status().code(), Code::kInvalidArgument);
  EXPECT_NE(no_mem.status().message().find("memory_mib"), std::string::npos);
  bad = req;
  bad.disk_nodes = {{"9vda", "vda"}};
  EXPECT_EQ(InspectVm(bad).status().code(), Code::kInvalidArgument);

  auto vm = AttachVm(*def, run);
  ASSERT_TRUE(vm.ok()) << vm.status().ToString();
  EXPECT_EQ((*vm)->export_dir(), run);
  auto tracked = (*vm)->tracked_disks();
  ASSERT_EQ(tracked.size(), 1u);
  EXPECT_EQ(tracked[0].node_name, "vda");
  EXPECT_TRUE(tracked[0].qcow2);

  TrackerOptions to;
  to.nbd_socket = (*vm)->nbd_socket().empty() ? qsd.nbd_socket() : (*vm)->nbd_socket();
  ChangeTracker tracker((*vm)->qmp(), "rel-qmp", tracked, to);
  ASSERT_TRUE(tracker.Enable().ok());
  auto w =
      testutil::Run("qemu-io -f raw '" + testutil::NbdUri("vda", qsd.nbd_socket()) + "' -c 'write -P 0x5a 3M 64k'");
  ASSERT_EQ(w.exit_code, 0) << w.output;
  auto cut = tracker.TakeCut((*vm)->export_dir());
  ASSERT_TRUE(cut.ok()) << cut.status().ToString();
  ASSERT_EQ(cut->disks.size(), 1u);
  auto records = ReadCut(cut->disks[0]);
  EXPECT_TRUE(HasBytes(records, 3 * kMiB, 64 * 1024, 0x5a)) << records.size() << " records";
  uint64_t dirty = 0;
  for (const auto& r : records) dirty += r.length;
  EXPECT_EQ(dirty, 64u * 1024) << "only the written range is in the delta";
  EXPECT_TRUE(tracker.Commit(*cut).ok());

  // The definition no longer matches once the disk grows.
  vm->reset();
  VmDefinition stale = *def;
  stale.disks[0].size_bytes = 32 * kMiB;
  auto mismatch = AttachVm(stale, run);
  EXPECT_EQ(mismatch.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(mismatch.status().message().find("size"), std::string::npos) << mismatch.status().ToString();
  stale = *def;
  stale.disks[0].node_name = "gone";
  EXPECT_EQ(AttachVm(stale, run).status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(AttachVm(*def, dir_.path() + "/no-such-dir").status().code(), Code::kInvalidArgument);
}

TEST_F(VmBindingE2eTest, OfflineKindKeepsTrackingAcrossCleanDetach) {
  std::string vda = MakeImage("vda", "qcow2");
  std::string vdb = MakeImage("vdb", "raw", "8M");
  VmAddRequest req;
  req.kind = VmSourceKind::kOffline;
  req.name = "offvm";
  req.uuid = "5d1e6f70-1111-4222-8333-944455556666";
  req.disk_images = {{"vda", vda}};
  req.memory_mib = 512;
  req.vcpus = 2;
  auto def = InspectVm(req);
  ASSERT_TRUE(def.ok()) << def.status().ToString();
  EXPECT_EQ(def->uuid, req.uuid);
  ASSERT_EQ(def->disks.size(), 1u);
  EXPECT_EQ(def->disks[0].size_bytes, 64 * kMiB);
  EXPECT_EQ(def->disks[0].format, "qcow2");

  VmAddRequest raw = req;
  raw.disk_images = {{"vdb", vdb}};
  auto raw_def = InspectVm(raw);
  ASSERT_TRUE(raw_def.ok()) << raw_def.status().ToString();
  EXPECT_EQ(raw_def->disks[0].format, "raw");
  EXPECT_EQ(raw_def->disks[0].size_bytes, 8 * kMiB);

  VmAddRequest bad = req;
  bad.disk_images = {{"vda", dir_.path() + "/missing.qcow2"}};
  EXPECT_EQ(InspectVm(bad).status().code(), Code::kNotFound);
  bad = req;
  bad.vcpus = 0;
  EXPECT_EQ(InspectVm(bad).status().code(), Code::kInvalidArgument);
  bad = req;
  bad.uuid = "nope";
  EXPECT_EQ(InspectVm(bad).status().code(), Code::kInvalidArgument);

  std::string run = dir_.path() + "/run";
  std::filesystem::create_directory(run);
  uint64_t generation = 0;
  {
    auto vm = AttachVm(*def, run);
    ASSERT_TRUE(vm.ok()) << vm.status().ToString();
    ASSERT_FALSE((*vm)->nbd_socket().empty());
    TrackerOptions to;
    to.nbd_socket = (*vm)->nbd_socket();
    ChangeTracker tracker((*vm)->qmp(), "rel-off", (*vm)->tracked_disks(), to);
    ASSERT_TRUE(tracker.Enable().ok());
    auto cut = tracker.TakeCut((*vm)->export_dir());
    ASSERT_TRUE(cut.ok()) << cut.status().ToString();
    auto records = ReadCut(cut->disks[0]);
    EXPECT_TRUE(records.empty()) << "nothing was written";
    ASSERT_TRUE(tracker.Commit(*cut).ok());
    generation = tracker.generation();
  }  // detach: the QSD stops cleanly and the persistent bitmap is stored
  auto info = testutil::Run("qemu-img info --output=json " + vda);
  EXPECT_NE(info.output.find("vmr-rel-off-g" + std::to_string(generation)), std::string::npos) << info.output;
  {
    auto vm = AttachVm(*def, run);
    ASSERT_TRUE(vm.ok()) << vm.status().ToString();
    TrackerOptions to;
    to.nbd_socket = (*vm)->nbd_socket();
    ChangeTracker tracker((*vm)->qmp(), "rel-off", (*vm)->tracked_disks(), to);
    auto rec = tracker.Reconcile();
    ASSERT_TRUE(rec.ok()) << rec.status().ToString();
    EXPECT_EQ(rec->generation, generation);
    Status check = tracker.CheckTracking();
    EXPECT_TRUE(check.ok()) << check.ToString();
  }
  // The image grew while detached: attach refuses, naming the size.
  auto grow = testutil::Run("qemu-img resize -q " + vda + " 128M");
  ASSERT_EQ(grow.exit_code, 0) << grow.output;
  auto mismatch = AttachVm(*def, run);
  EXPECT_EQ(mismatch.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(mismatch.status().message().find("size"), std::string::npos) << mismatch.status().ToString();
}

}  // namespace
}  // namespace vmreplica
