// RenderReplicaDomainXml: a primary's domain XML with host-specific parts
// becomes a domain the replica host can start. No libvirtd needed; the
// output is checked with XPath and, when libvirt-clients is installed,
// against libvirt's own schema (virt-xml-validate).
#include "vmreplica/libvirt_domain.h"

#include <gtest/gtest.h>

#include <fstream>

#include "qemu/qemu_test_util.h"
#include "vm/libvirt_util.h"

namespace vmreplica {
namespace {

using vm_internal::DomainXml;

const char* kTemplate = R"(<domain type='kvm' id='7'>
  <name>web</name>
  <uuid>0a1b2c3d-0000-4000-8000-000000000001</uuid>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static' cpuset='0-3'>2</vcpu>
  <cputune><vcpupin vcpu='0' cpuset='2'/></cputune>
  <memoryBacking><hugepages/></memoryBacking>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='host-passthrough' check='partial'><topology sockets='1' dies='1' cores='2' threads='1'/></cpu>
  <on_poweroff>preserve</on_poweroff>
  <devices>
    <emulator>/opt/qemu/bin/qemu-system-x86_64</emulator>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg0/web-root'><seclabel model='dac' relabel='no'/></source>
      <target dev='vda' bus='virtio'/>
      <serial>ROOT-1</serial>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/iso/debian.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:AA:BB:01'/>
      <source network='prod'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:02'/>
      <source bridge='br-backup'/>
      <model type='e1000e'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web.org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <graphics type='vnc' port='5901' autoport='no' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x3b' slot='0x00' function='0x0'/></source>
    </hostdev>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'/>
</domain>)";

ReplicaDomainPlan TestPlan() {
  ReplicaDomainPlan p;
  p.template_xml = kTemplate;
  p.name = "web - Test";
  p.uuid = "0a1b2c3d-0000-4000-8000-0000000000ff";
  p.kvm = false;
  ReplicaDomainDisk d;
  d.target = "vda";
  d.file = "/var/lib/vmreplica/run/t-1/vda.qcow2";
  d.format = "qcow2";
  d.backing = ReplicaDomainDisk::Backing::kNbdUnix;
  d.backing_path = "/var/lib/vmreplica/run/points.sock";
  d.backing_format = "raw";
  d.nbd_export = "p-1-7-vda";
  d.alias = "ua-vmr-disk0";
  p.disks.push_back(d);
  ReplicaDomainDisk seed;
  seed.target = "vdb";
  seed.file = "/var/lib/vmreplica/run/t-1/seed.iso";
  seed.format = "raw";
  seed.read_only = true;
  seed.alias = "ua-vmr-extra0";
  p.disks.push_back(seed);
  p.nics.push_back(VmNicSpec{"52:54:00:aa:bb:01", "virtio", "prod"});
  p.nics.push_back(VmNicSpec{"52:54:00:aa:bb:02", "e1000e", "br-backup"});
  p.serial_socket = "/var/lib/vmreplica/run/t-1/serial.sock";
  p.serial_log = "/var/lib/vmreplica/run/t-1/serial.log";
  p.owner = "/var/lib/vmreplica/run/t-1";
  return p;
}

size_t Count(DomainXml& x, const char* xpath) { return x.Nodes(xpath).size(); }

// virt-xml-validate against libvirt's schema, when installed (it comes with
// libvirt-clients, which the test command installs).
void ExpectSchemaValid(const std::string& xml) {
  testutil::TempDir dir("lvdom");
  const std::string path = dir.path() + "/d.xml";
  std::ofstream(path) << xml;
  auto r = testutil::Run("virt-xml-validate " + path + " domain 2>&1");
  EXPECT_EQ(r.exit_code, 0) << r.output << "\n" << xml;
}

TEST(LibvirtDomainXmlTest, TheTemplateKeepsItsHardwareAndLosesWhatBelongsToThePrimaryHost) {
  auto xml = RenderReplicaDomainXml(TestPlan());
  ASSERT_TRUE(xml.ok()) << xml.status().ToString();
  auto parsed = DomainXml::Parse(*xml);
  ASSERT_TRUE(parsed.ok());
  DomainXml& x = **parsed;
  EXPECT_EQ(x.Text("/domain/@type"), "qemu");
  EXPECT_EQ(x.Text("/domain/@id"), "");
  EXPECT_EQ(x.Text("/domain/name"), "web - Test");
  EXPECT_EQ(x.Text("/domain/uuid"), "0a1b2c3d-0000-4000-8000-0000000000ff");
  // Kept: memory, vCPUs, machine type, firmware loader, boot order, features.
  EXPECT_EQ(x.Text("/domain/memory"), "1048576");
  EXPECT_EQ(x.Text("/domain/vcpu"), "2");
  EXPECT_EQ(x.Text("/domain/os/type/@machine"), "pc-q35-7.2");
  EXPECT_EQ(x.Text("/domain/os/loader"), "/usr/share/OVMF/OVMF_CODE_4M.fd");
  EXPECT_EQ(x.Text("/domain/os/boot/@dev"), "hd");
  EXPECT_EQ(Count(x, "/domain/features/acpi"), 1u);
  // Gone: NVRAM path, emulator, cdrom, host
  // devices, TPM, the spice channel.
  EXPECT_EQ(Count(x, "/domain/os/nvram"), 0u);
  EXPECT_EQ(Count(x, "/domain/devices/emulator"), 0u);
  EXPECT_EQ(Count(x, "/domain/devices/disk[@device='cdrom']"), 0u);
  EXPECT_EQ(Count(x, "/domain/devices/hostdev"), 0u);
  EXPECT_EQ(Count(x, "/domain/devices/tpm"), 0u);
  EXPECT_EQ(Count(x, "/domain/devices/console"), 0u);
  // One security label: static DAC root, no relabelling.
  EXPECT_EQ(Count(x, "//seclabel"), 1u);
  EXPECT_EQ(x.Text("/domain/seclabel/@type"), "static");
  EXPECT_EQ(x.Text("/domain/seclabel/@model"), "dac");
  EXPECT_EQ(x.Text("/domain/seclabel/@relabel"), "no");
  EXPECT_EQ(x.Text("/domain/seclabel/label"), "+0:+0");
  // The disk: same target, address and serial; the overlay over the NBD view.
  ASSERT_EQ(Count(x, "/domain/devices/disk"), 2u);
  const char* vda = "/domain/devices/disk[target/@dev='vda']";
  EXPECT_EQ(x.Text((std::string(vda) + "/@type").c_str()), "file");
  EXPECT_EQ(x.Text((std::string(vda) + "/driver/@type").c_str()), "qcow2");
  EXPECT_EQ(x.Text((std::string(vda) + "/driver/@cache").c_str()), "");
  EXPECT_EQ(x.Text((std::string(vda) + "/source/@file").c_str()), "/var/lib/vmreplica/run/t-1/vda.qcow2");
  EXPECT_EQ(x.Text((std::string(vda) + "/serial").c_str()), "ROOT-1");
  EXPECT_EQ(x.Text((std::string(vda) + "/address/@bus").c_str()), "0x04");
  EXPECT_EQ(x.Text((std::string(vda) + "/alias/@name").c_str()), "ua-vmr-disk0");
  EXPECT_EQ(x.Text((std::string(vda) + "/backingStore/@type").c_str()), "network");
  EXPECT_EQ(x.Text((std::string(vda) + "/backingStore/source/@protocol").c_str()), "nbd");
  EXPECT_EQ(x.Text((std::string(vda) + "/backingStore/source/@name").c_str()), "p-1-7-vda");
  EXPECT_EQ(x.Text((std::string(vda) + "/backingStore/source/host/@socket").c_str()),
            "/var/lib/vmreplica/run/points.sock");
  EXPECT_EQ(Count(x, (std::string(vda) + "/backingStore/backingStore").c_str()), 1u);
  EXPECT_EQ(Count(x, (std::string(vda) + "/boot").c_str()), 0u) << "the template boots with <os><boot>";
  const char* vdb = "/domain/devices/disk[target/@dev='vdb']";
  EXPECT_EQ(Count(x, (std::string(vdb) + "/readonly").c_str()), 1u);
  EXPECT_EQ(x.Text((std::string(vdb) + "/driver/@type").c_str()), "raw");
  // Two NICs: the kept MACs, their models and PCI addresses, taps on no bridge.
  ASSERT_EQ(Count(x, "/domain/devices/interface"), 2u);
  EXPECT_EQ(Count(x, "/domain/devices/interface[@type='ethernet']"), 2u);
  const char* nic1 = "/domain/devices/interface[mac/@address='52:54:00:aa:bb:01']";
  EXPECT_EQ(x.Text((std::string(nic1) + "/model/@type").c_str()), "virtio");
  EXPECT_EQ(x.Text((std::string(nic1) + "/address/@bus").c_str()), "0x01");
  const char* nic2 = "/domain/devices/interface[mac/@address='52:54:00:aa:bb:02']";
  EXPECT_EQ(x.Text((std::string(nic2) + "/model/@type").c_str()), "e1000e");
  EXPECT_EQ(Count(x, (std::string(nic2) + "/address").c_str()), 0u);
  EXPECT_EQ(Count(x, "/domain/devices/interface/source"), 0u);
  // Host tuning gone; the CPU topology stays (TCG: no model, no mode).
  EXPECT_EQ(Count(x, "/domain/cputune"), 0u);
  EXPECT_EQ(Count(x, "/domain/memoryBacking"), 0u);
  EXPECT_EQ(x.Text("/domain/vcpu/@cpuset"), "");
  EXPECT_EQ(x.Text("/domain/cpu/topology/@cores"), "2");
  EXPECT_EQ(x.Text("/domain/cpu/@mode"), "");
  EXPECT_EQ(x.Text("/domain/on_poweroff"), "destroy");
  // Ours: the run directory in vmreplica's metadata element.
  EXPECT_EQ(x.Text("/domain/metadata/*[local-name()='run']/@dir"), "/var/lib/vmreplica/run/t-1");
  // Serial: the run directory's socket and log.
  ASSERT_EQ(Count(x, "/domain/devices/serial"), 1u);
  EXPECT_EQ(x.Text("/domain/devices/serial/@type"), "unix");
  EXPECT_EQ(x.Text("/domain/devices/serial/source/@path"), "/var/lib/vmreplica/run/t-1/serial.sock");
  EXPECT_EQ(x.Text("/domain/devices/serial/log/@file"), "/var/lib/vmreplica/run/t-1/serial.log");
  // The guest agent's channel stays, libvirt picks its socket.
  ASSERT_EQ(Count(x, "/domain/devices/channel"), 1u);
  EXPECT_EQ(x.Text("/domain/devices/channel/target/@name"), "org.qemu.guest_agent.0");
  EXPECT_EQ(x.Text("/domain/devices/channel/source/@mode"), "bind");
  EXPECT_EQ(x.Text("/domain/devices/channel/source/@path"), "");
  EXPECT_EQ(x.Text("/domain/devices/graphics/@port"), "");
  EXPECT_EQ(x.Text("/domain/devices/graphics/@listen"), "");
  EXPECT_EQ(Count(x, "/domain/devices/graphics/listen"), 0u);
  EXPECT_EQ(x.Text("/domain/devices/graphics/@autoport"), "yes");
  ExpectSchemaValid(*xml);
}

TEST(LibvirtDomainXmlTest, KvmKeepsTheCpuAndNoNicsMeansNoInterface) {
  ReplicaDomainPlan p = TestPlan();
  p.kvm = true;
  p.nics.clear();
  p.serial_socket.clear();
  auto xml = RenderReplicaDomainXml(p);
  ASSERT_TRUE(xml.ok()) << xml.status().ToString();
  auto parsed = DomainXml::Parse(*xml);
  ASSERT_TRUE(parsed.ok());
  DomainXml& x = **parsed;
  EXPECT_EQ(x.Text("/domain/@type"), "kvm");
  EXPECT_EQ(x.Text("/domain/cpu/@mode"), "host-passthrough");
  EXPECT_EQ(x.Text("/domain/cpu/@check"), "none");
  EXPECT_EQ(Count(x, "/domain/devices/interface"), 0u);
  EXPECT_EQ(x.Text("/domain/devices/serial/@type"), "file");
  EXPECT_EQ(x.Text("/domain/devices/serial/source/@path"), "/var/lib/vmreplica/run/t-1/serial.log");
  ExpectSchemaValid(*xml);
}

TEST(LibvirtDomainXmlTest, AMinimalDomainBootsItsFirstDiskOrTheKernel) {
  ReplicaDomainPlan p = TestPlan();
  p.template_xml.clear();
  p.memory_mib = 256;
  p.vcpus = 1;
  p.disks[0].backing = ReplicaDomainDisk::Backing::kNone;  // a disk wrapper
  auto xml = RenderReplicaDomainXml(p);
  ASSERT_TRUE(xml.ok()) << xml.status().ToString();
  auto parsed = DomainXml::Parse(*xml);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ((*parsed)->Text("/domain/memory"), "256");
  EXPECT_EQ((*parsed)->Text("/domain/memory/@unit"), "MiB");
  EXPECT_EQ((*parsed)->Text("/domain/devices/disk[target/@dev='vda']/boot/@order"), "1");
  EXPECT_EQ((*parsed)->Text("/domain/devices/disk[target/@dev='vda']/target/@bus"), "virtio");
  EXPECT_EQ(Count(**parsed, "/domain/devices/disk[target/@dev='vda']/backingStore/*"), 0u);
  EXPECT_EQ((*parsed)->Text("/domain/devices/disk[target/@dev='vda']/driver/@discard"), "");
  // The NIC is new: no template interface had its MAC.
  EXPECT_EQ((*parsed)->Text("/domain/devices/interface/mac/@address"), "52:54:00:aa:bb:01");
  ExpectSchemaValid(*xml);

  p.kernel = "/boot/vmlinuz";
  p.initrd = "/boot/initrd.img";
  p.cmdline = "console=ttyS0 root=/dev/vda";
  xml = RenderReplicaDomainXml(p);
  ASSERT_TRUE(xml.ok()) << xml.status().ToString();
  parsed = DomainXml::Parse(*xml);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ((*parsed)->Text("/domain/os/kernel"), "/boot/vmlinuz");
  EXPECT_EQ((*parsed)->Text("/domain/os/initrd"), "/boot/initrd.img");
  EXPECT_EQ((*parsed)->Text("/domain/os/cmdline"), "console=ttyS0 root=/dev/vda");
  EXPECT_EQ(Count(**parsed, "/domain/devices/disk/boot"), 0u);
  ExpectSchemaValid(*xml);
}

TEST(LibvirtDomainXmlTest, BadPlansAreRefusedNamingTheField) {
  struct Case {
    void (*edit)(ReplicaDomainPlan&);
    const char* field;
  };
  const Case cases[] = {
      {[](ReplicaDomainPlan& p) { p.template_xml = "<domain><name>"; }, "template_xml"},
      {[](ReplicaDomainPlan& p) { p.template_xml = "<network><name>x</name></network>"; }, "template_xml"},
      {[](ReplicaDomainPlan& p) { p.name = "a/b"; }, "name"},
      {[](ReplicaDomainPlan& p) { p.uuid = "x"; }, "uuid"},
      {[](ReplicaDomainPlan& p) { p.disks.clear(); }, "disks"},
      {[](ReplicaDomainPlan& p) { p.disks[0].file = "relative.qcow2"; }, "disks[0].file"},
      {[](ReplicaDomainPlan& p) { p.disks[1].format = "vmdk"; }, "disks[1].format"},
      {[](ReplicaDomainPlan& p) { p.disks[0].alias = "vmr-disk0"; }, "disks[0].alias"},
      {[](ReplicaDomainPlan& p) { p.serial_log.clear(); }, "serial_log"},
      {[](ReplicaDomainPlan& p) { p.owner = "run"; }, "owner"},
      {[](ReplicaDomainPlan& p) {
         p.template_xml.clear();
         p.memory_mib = 0;
       },
       "memory_mib"},
  };
  for (const auto& c : cases) {
    ReplicaDomainPlan p = TestPlan();
    c.edit(p);
    auto xml = RenderReplicaDomainXml(p);
    ASSERT_FALSE(xml.ok()) << c.field;
    EXPECT_EQ(xml.status().code(), Code::kInvalidArgument) << c.field;
    EXPECT_NE(xml.status().message().find(c.field), std::string::npos) << xml.status().ToString();
  }
}

}  // namespace
}  // namespace vmreplica
