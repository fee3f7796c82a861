// Replica-host domains through libvirt: the XML transform and the lifecycle
// calls (include/vmreplica/libvirt_domain.h).
#include "vmreplica/libvirt_domain.h"

#include <libxml/tree.h>

#include <algorithm>
#include <set>

#include "vm/libvirt_util.h"

namespace vmreplica {
namespace {

using vm_internal::ConnPtr;
using vm_internal::DomainPtr;
using vm_internal::DomainXml;
using vm_internal::LastError;
using vm_internal::LastErrorCode;

const xmlChar* X(const char* s) { return reinterpret_cast<const xmlChar*>(s); }

// The namespace of vmreplica's element in a domain's <metadata>.
const char* const kOwnerNamespace = "https://vmreplica.dev/xmlns/replica-domain/1";

void Unlink(xmlNodePtr n) {
  xmlUnlinkNode(n);
  xmlFreeNode(n);
}

xmlNodePtr Child(xmlNodePtr parent, const char* name, const std::string& text = "") {
  return xmlNewTextChild(parent, nullptr, X(name), text.empty() ? nullptr : X(text.c_str()));
}

std::string Prop(xmlNodePtr n, const char* name) {
  xmlChar* v = xmlGetProp(n, X(name));
  std::string s = v != nullptr ? reinterpret_cast<const char*>(v) : "";
  xmlFree(v);
  return s;
}

void Attr(xmlNodePtr n, const char* name, const std::string& value) { xmlSetProp(n, X(name), X(value.c_str())); }

// The first element child of `parent` named `name`, created (appended)
// when missing.
xmlNodePtr Ensure(xmlNodePtr parent, const char* name) {
  for (xmlNodePtr c = parent->children; c != nullptr; c = c->next) {
    if (c->type == XML_ELEMENT_NODE && xmlStrcmp(c->name, X(name)) == 0) return c;
  }
  return xmlNewChild(parent, nullptr, X(name), nullptr);
}

void SetText(xmlNodePtr parent, const char* name, const std::string& text) {
  xmlNodePtr n = Ensure(parent, name);
  xmlNodeSetContent(n, nullptr);
  xmlNodeAddContent(n, X(text.c_str()));  // escapes
}

std::string MinimalTemplate(const ReplicaDomainPlan& p) {
  return "<domain type='qemu'><name>x</name><memory unit='MiB'>" + std::to_string(p.memory_mib) +
         "</memory><vcpu>" + std::to_string(p.vcpus) +
         "</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/><apic/></features>"
         "<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>"
         "<devices/></domain>";
}

bool BadText(const std::string& s) {
  return std::any_of(s.begin(), s.end(), [](unsigned char c) { return c < 0x20 || c == 0x7f; });
}

// Fills a <disk> element (kept from the template or new) for `d`.
void FillDisk(xmlNodePtr disk, const ReplicaDomainDisk& d) {
  // Keep target, address, boot, serial, wwn, vendor/product, blockio; the
  // rest describes the primary's image.
  std::vector<xmlNodePtr> drop;
  for (xmlNodePtr c = disk->children; c != nullptr; c = c->next) {
    if (c->type != XML_ELEMENT_NODE) {
      drop.push_back(c);
      continue;
    }
    static const std::set<std::string> keep = {"target", "address", "boot", "serial", "wwn", "vendor", "product",
                                               "blockio"};
    if (keep.count(reinterpret_cast<const char*>(c->name)) == 0) drop.push_back(c);
  }
  for (xmlNodePtr c : drop) Unlink(c);
  Attr(disk, "type", "file");
  Attr(disk, "device", "disk");
  xmlNodePtr driver = Child(disk, "driver");
  Attr(driver, "name", "qemu");
  Attr(driver, "type", d.format);
  if (d.backing != ReplicaDomainDisk::Backing::kNone) Attr(driver, "discard", "unmap");
  Attr(Child(disk, "source"), "file", d.file);
  xmlNodePtr bs = Child(disk, "backingStore");
  switch (d.backing) {
    case ReplicaDomainDisk::Backing::kNone:
      break;  // <backingStore/>: no backing (a disk wrapper's data file is in its header)
    case ReplicaDomainDisk::Backing::kFile: {
      Attr(bs, "type", "file");
      Attr(Child(bs, "format"), "type", d.backing_format);
      Attr(Child(bs, "source"), "file", d.backing_path);
      if (d.backing_format == "raw") Child(bs, "backingStore");
      break;
    }
    case ReplicaDomainDisk::Backing::kNbdUnix:
    case ReplicaDomainDisk::Backing::kNbdTcp: {
      Attr(bs, "type", "network");
      Attr(Child(bs, "format"), "type", "raw");
      xmlNodePtr src = Child(bs, "source");
      Attr(src, "protocol", "nbd");
      Attr(src, "name", d.nbd_export);
      xmlNodePtr host = Child(src, "host");
      if (d.backing == ReplicaDomainDisk::Backing::kNbdUnix) {
        Attr(host, "transport", "unix");
        Attr(host, "socket", d.backing_path);
      } else {
        Attr(host, "name", d.nbd_host);
        Attr(host, "port", std::to_string(d.nbd_port));
      }
      Child(bs, "backingStore");
      break;
    }
  }
  xmlNodePtr target = Ensure(disk, "target");
  if (Prop(target, "dev").empty()) {
    Attr(target, "dev", d.target);
    Attr(target, "bus", "virtio");
  }
  if (d.read_only) Child(disk, "readonly");
  if (!d.alias.empty()) Attr(Child(disk, "alias"), "name", d.alias);
}

}  // namespace

Result<std::string> RenderReplicaDomainXml(const ReplicaDomainPlan& plan) {
  if (plan.name.empty() || BadText(plan.name) || plan.name.find('/') != std::string::npos) {
    return Status::InvalidArgument("name: 1.. bytes, no '/' or control characters");
  }
  if (plan.uuid.size() != 36) return Status::InvalidArgument("uuid: canonical form expected");
  if (plan.disks.empty()) return Status::InvalidArgument("disks: at least one");
  if (plan.serial_log.empty() || plan.serial_log[0] != '/') return Status::InvalidArgument("serial_log: absolute path");
  if (plan.owner.empty() || plan.owner[0] != '/' || BadText(plan.owner)) {
    return Status::InvalidArgument("owner: the run directory (absolute path)");
  }
  for (size_t i = 0; i < plan.disks.size(); ++i) {
    const auto& d = plan.disks[i];
    const std::string f = "disks[" + std::to_string(i) + "].";
    if (d.target.empty() || BadText(d.target)) return Status::InvalidArgument(f + "target: required");
    if (d.file.empty() || d.file[0] != '/' || BadText(d.file)) return Status::InvalidArgument(f + "file: absolute");
    if (d.format != "qcow2" && d.format != "raw") return Status::InvalidArgument(f + "format: qcow2 or raw");
    if (!d.alias.empty() && d.alias.rfind("ua-", 0) != 0) return Status::InvalidArgument(f + "alias: ua-...");
  }
  if (plan.template_xml.empty() && (plan.memory_mib == 0 || plan.vcpus == 0)) {
    return Status::InvalidArgument("memory_mib / vcpus: required without a template");
  }
  auto parsed = DomainXml::Parse(plan.template_xml.empty() ? MinimalTemplate(plan) : plan.template_xml);
  if (!parsed.ok()) return Status::InvalidArgument("template_xml: " + parsed.status().message());
  DomainXml& x = **parsed;
  xmlNodePtr root = xmlDocGetRootElement(x.doc());
  if (root == nullptr || xmlStrcmp(root->name, X("domain")) != 0) {
    return Status::InvalidArgument("template_xml: the root element is not <domain>");
  }
  Attr(root, "type", plan.kvm ? "kvm" : "qemu");
  xmlUnsetProp(root, X("id"));
  SetText(root, "name", plan.name);
  SetText(root, "uuid", plan.uuid);
  // Security labels (the domain's and per-device ones) name users, profiles
  // or contexts of the primary host.
  for (xmlNodePtr n : x.Nodes("//seclabel")) Unlink(n);
  {
    xmlNodePtr sl = xmlNewNode(nullptr, X("seclabel"));
    Attr(sl, "type", "static");
    Attr(sl, "model", "dac");
    Attr(sl, "relabel", "no");
    Child(sl, "label", "+0:+0");
    xmlNodePtr devices_at = nullptr;
    for (xmlNodePtr n : x.Nodes("/domain/devices")) devices_at = n;
    if (devices_at != nullptr) {
      xmlAddNextSibling(devices_at, sl);
    } else {
      xmlAddChild(root, sl);
    }
  }
  for (xmlNodePtr cpu : x.Nodes("/domain/cpu")) {
    if (!plan.kvm) {
      // TCG: no host CPU model or features; topology and NUMA cells stay.
      for (const char* a : {"mode", "check", "migratable", "match"}) xmlUnsetProp(cpu, X(a));
      for (const char* c : {"model", "vendor", "feature", "cache"}) {
        for (xmlNodePtr n : x.Nodes(c, cpu)) Unlink(n);
      }
    } else if (xmlHasProp(cpu, X("check")) != nullptr) {
      // Another host's CPU: no strict check against the primary's model.
      Attr(cpu, "check", "none");
    }
  }
  xmlNodePtr os = Ensure(root, "os");
  for (xmlNodePtr n : x.Nodes("/domain/os/nvram")) Unlink(n);  // libvirt makes one for this name
  if (!plan.kernel.empty()) {
    for (const char* e : {"kernel", "initrd", "cmdline", "dtb"}) {
      std::string xp = std::string("/domain/os/") + e;
      for (xmlNodePtr n : x.Nodes(xp.c_str())) Unlink(n);
    }
    Child(os, "kernel", plan.kernel);
    if (!plan.initrd.empty()) Child(os, "initrd", plan.initrd);
    Child(os, "cmdline", plan.cmdline);
  }
  xmlNodePtr devices = Ensure(root, "devices");
  for (const char* xp : {"/domain/devices/emulator", "/domain/devices/hostdev", "/domain/devices/filesystem",
                         "/domain/devices/tpm", "/domain/devices/serial", "/domain/devices/console",
                         "/domain/devices/smartcard", "/domain/devices/redirdev",
                         "/domain/devices/disk[@device='cdrom' or @device='floppy' or @device='lun']",
                         "/domain/devices/channel[not(target/@name='org.qemu.guest_agent.0')]"}) {
    for (xmlNodePtr n : x.Nodes(xp)) Unlink(n);
  }
  // The guest agent's channel: libvirt picks the host socket path.
  for (xmlNodePtr n : x.Nodes("/domain/devices/channel")) {
    Attr(n, "type", "unix");
    for (xmlNodePtr s : x.Nodes("source", n)) Unlink(s);
    Attr(Child(n, "source"), "mode", "bind");
  }
  // Graphics listen on libvirt's default address of this host.
  for (xmlNodePtr g : x.Nodes("/domain/devices/graphics")) {
    for (const char* a : {"port", "tlsPort", "websocket", "socket", "listen"}) xmlUnsetProp(g, X(a));
    if (Prop(g, "type") == "vnc" || Prop(g, "type") == "spice") {
      Attr(g, "autoport", "yes");
    }
    for (xmlNodePtr l : x.Nodes("listen", g)) Unlink(l);
  }
  // Tuning tied to the primary's CPUs, NUMA nodes, hugepages or cgroups.
  for (const char* xp : {"/domain/cputune", "/domain/numatune", "/domain/memoryBacking", "/domain/resource"}) {
    for (xmlNodePtr n : x.Nodes(xp)) Unlink(n);
  }
  for (xmlNodePtr v : x.Nodes("/domain/vcpu")) xmlUnsetProp(v, X("cpuset"));
  // A guest that powers off, reboots or crashes must not keep a domain
  // whose QEMU no longer runs it ("preserve").
  for (const char* e : {"on_poweroff", "on_crash"}) {
    std::string xp = std::string("/domain/") + e;
    for (xmlNodePtr n : x.Nodes(xp.c_str())) {
      if (x.Text(".", n).find("preserve") != std::string::npos) {
        xmlNodeSetContent(n, nullptr);
        xmlNodeAddContent(n, X("destroy"));
      }
    }
  }
  for (xmlNodePtr n : x.Nodes("/domain/on_reboot")) {
    if (x.Text(".", n).find("preserve") != std::string::npos) {
      xmlNodeSetContent(n, nullptr);
      xmlNodeAddContent(n, X("restart"));
    }
  }
  // Disks: the template's disk with the same target is reused in place.
  std::vector<xmlNodePtr> old_disks = x.Nodes("/domain/devices/disk");
  std::vector<bool> used(old_disks.size(), false);
  const bool any_boot = !x.Nodes("/domain/os/boot").empty() || !x.Nodes("/domain/devices/*/boot").empty();
  bool first_new = true;
  for (size_t i = 0; i < plan.disks.size(); ++i) {
    const ReplicaDomainDisk& d = plan.disks[i];
    xmlNodePtr at = nullptr;
    for (size_t k = 0; k < old_disks.size(); ++k) {
      if (!used[k] && x.Text("target/@dev", old_disks[k]) == d.target) {
        at = old_disks[k];
        used[k] = true;
        break;
      }
    }
    if (at == nullptr) {
      at = xmlNewChild(devices, nullptr, X("disk"), nullptr);
      FillDisk(at, d);
      if (!any_boot && first_new && !d.read_only && plan.kernel.empty() && i == 0) {
        Attr(Child(at, "boot"), "order", "1");
      }
      first_new = false;
    } else {
      FillDisk(at, d);
    }
  }
  for (size_t k = 0; k < old_disks.size(); ++k) {
    if (!used[k]) Unlink(old_disks[k]);
  }
  // NICs: the template's interface with the same MAC keeps its model and
  // PCI address; everything else about it is replaced by an unattached tap.
  // Every template MAC is read before any node is touched; matched
  // template interfaces are unlinked only after the loop.
  std::vector<xmlNodePtr> old_nics = x.Nodes("/domain/devices/interface");
  std::vector<std::string> old_macs, old_models;
  std::vector<xmlNodePtr> old_addresses;
  for (xmlNodePtr n : old_nics) {
    std::string mac = x.Text("mac/@address", n);
    std::transform(mac.begin(), mac.end(), mac.begin(), [](unsigned char c) { return std::tolower(c); });
    old_macs.push_back(mac);
    old_models.push_back(x.Text("model/@type", n));
    auto addrs = x.Nodes("address", n);
    old_addresses.push_back(addrs.empty() ? nullptr : addrs[0]);
  }
  std::vector<bool> nic_used(old_nics.size(), false);
  for (const VmNicSpec& nic : plan.nics) {
    std::string model = nic.model.empty() ? "virtio" : nic.model;
    xmlNodePtr address = nullptr;
    for (size_t k = 0; k < old_nics.size(); ++k) {
      if (nic_used[k] || old_macs[k] != nic.mac) continue;
      nic_used[k] = true;
      if (!old_models[k].empty()) model = old_models[k];
      if (old_addresses[k] != nullptr) address = xmlCopyNode(old_addresses[k], 1);
      break;
    }
    xmlNodePtr n = xmlNewChild(devices, nullptr, X("interface"), nullptr);
    Attr(n, "type", "ethernet");
    Attr(Child(n, "mac"), "address", nic.mac);
    Attr(Child(n, "model"), "type", model);
    if (address != nullptr) xmlAddChild(n, address);
  }
  for (xmlNodePtr n : old_nics) Unlink(n);
  // Ours: the run directory in vmreplica's metadata element. Every call
  // that changes or reports a domain checks it (OwnedBy).
  {
    for (xmlNodePtr n : x.Nodes("/domain/metadata/*")) {
      if (n->ns != nullptr && xmlStrcmp(n->ns->href, X(kOwnerNamespace)) == 0) Unlink(n);
    }
    xmlNodePtr metadata = Ensure(root, "metadata");
    xmlNodePtr run = xmlNewChild(metadata, nullptr, X("run"), nullptr);
    xmlNsPtr ns = xmlNewNs(run, X(kOwnerNamespace), X("vmr"));
    xmlSetNs(run, ns);
    Attr(run, "dir", plan.owner);
  }
  // The serial console: a socket (and its log), or a log file only.
  {
    xmlNodePtr serial = xmlNewChild(devices, nullptr, X("serial"), nullptr);
    if (plan.serial_socket.empty()) {
      Attr(serial, "type", "file");
      Attr(Child(serial, "source"), "path", plan.serial_log);
    } else {
      Attr(serial, "type", "unix");
      xmlNodePtr src = Child(serial, "source");
      Attr(src, "mode", "bind");
      Attr(src, "path", plan.serial_socket);
      Attr(Child(serial, "log"), "file", plan.serial_log);
    }
    Attr(Child(serial, "target"), "port", "0");
  }
  return x.Dump();
}

namespace {

Result<DomainPtr> ByUuid(virConnectPtr conn, const std::string& uuid) {
  virDomainPtr d = virDomainLookupByUUIDString(conn, uuid.c_str());
  if (d == nullptr) {
    if (LastErrorCode() == VIR_ERR_NO_DOMAIN) return Status::NotFound("libvirt has no domain with uuid " + uuid);
    return Status::Unavailable("libvirt lookup of " + uuid + ": " + LastError());
  }
  return DomainPtr(d);
}

// Whether the domain carries our metadata element naming `owner` (the
// launcher's run directory). A domain without it is someone else's.
bool OwnedBy(virDomainPtr dom, const std::string& owner) {
  char* md = virDomainGetMetadata(dom, VIR_DOMAIN_METADATA_ELEMENT, kOwnerNamespace, VIR_DOMAIN_AFFECT_CURRENT);
  if (md == nullptr) return false;
  std::string text(md);
  free(md);
  auto parsed = DomainXml::Parse(text);
  return parsed.ok() && (*parsed)->Text("/*/@dir") == owner;
}

// The domain with `uuid` when it is ours; NotFound when there is none or it
// is someone else's (`*foreign` tells which).
Result<DomainPtr> OurDomain(virConnectPtr conn, const std::string& uuid, const std::string& owner,
                            bool* foreign = nullptr) {
  VMR_ASSIGN_OR_RETURN(DomainPtr dom, ByUuid(conn, uuid));
  if (!OwnedBy(dom.get(), owner)) {
    if (foreign != nullptr) *foreign = true;
    return Status::NotFound("the libvirt domain with uuid " + uuid + " is not vmreplica's (run directory " + owner +
                            ")");
  }
  return dom;
}

// A QMP channel that owns its connection and domain handle.
class OwnedChannel : public QmpChannel {
 public:
  OwnedChannel(ConnPtr conn, DomainPtr dom)
      : conn_(std::move(conn)), dom_(std::move(dom)), inner_(dom_.get(), "/nonexistent-no-handover", 0, 0) {}
  Result<nlohmann::json> Execute(const std::string& command, const nlohmann::json& arguments,
                                 std::chrono::milliseconds timeout) override {
    return inner_.Execute(command, arguments, timeout);
  }

 private:
  ConnPtr conn_;
  DomainPtr dom_;
  vm_internal::LibvirtChannel inner_;
};

}  // namespace

Status CreateReplicaDomain(const std::string& uri, const std::string& xml, const std::string& name,
                           const std::string& uuid) {
  VMR_ASSIGN_OR_RETURN(ConnPtr conn, vm_internal::Open(uri));
  auto by_uuid = ByUuid(conn.get(), uuid);
  if (by_uuid.ok()) {
    const char* n = virDomainGetName(by_uuid->get());
    return Status::FailedPrecondition("libvirt already has a domain with uuid " + uuid + " (\"" +
                                      (n != nullptr ? n : "?") + "\"): remove or rename it first");
  }
  if (by_uuid.status().code() != Code::kNotFound) return by_uuid.status();
  auto by_name = vm_internal::Lookup(conn.get(), name);
  if (by_name.ok()) {
    return Status::FailedPrecondition("libvirt already has a domain named \"" + name + "\": remove or rename it first");
  }
  if (by_name.status().code() != Code::kNotFound) return by_name.status();
  virDomainPtr d = virDomainCreateXML(conn.get(), xml.c_str(), VIR_DOMAIN_START_VALIDATE);
  if (d == nullptr) {
    const std::string why = LastError();
    if (why.find("Failed to get") != std::string::npos && why.find("lock") != std::string::npos) {
      // QEMU's image locking: another process holds an image for now.
      return Status::FailedPrecondition("an image of domain \"" + name + "\" is in use by another process: " + why);
    }
    return Status::IOError("libvirt could not start domain \"" + name + "\": " + why);
  }
  virDomainFree(d);
  return Status::Ok();
}

Result<bool> ReplicaDomainActive(const std::string& uri, const std::string& uuid, const std::string& owner) {
  VMR_ASSIGN_OR_RETURN(ConnPtr conn, vm_internal::Open(uri));
  auto dom = OurDomain(conn.get(), uuid, owner);
  if (!dom.ok()) {
    if (dom.status().code() == Code::kNotFound) return false;
    return dom.status();
  }
  const int active = virDomainIsActive(dom->get());
  if (active < 0) {
    if (LastErrorCode() == VIR_ERR_NO_DOMAIN) return false;  // went away between the calls
    return Status::Unavailable("virDomainIsActive " + uuid + ": " + LastError());
  }
  return active == 1;
}

Status ShutdownReplicaDomain(const std::string& uri, const std::string& uuid, const std::string& owner) {
  VMR_ASSIGN_OR_RETURN(ConnPtr conn, vm_internal::Open(uri));
  auto dom = OurDomain(conn.get(), uuid, owner);
  if (!dom.ok()) return dom.status().code() == Code::kNotFound ? Status::Ok() : dom.status();
  if (virDomainShutdownFlags(dom->get(), VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN) != 0) {
    if (LastErrorCode() == VIR_ERR_NO_DOMAIN || LastErrorCode() == VIR_ERR_OPERATION_INVALID) return Status::Ok();
    return Status::Unavailable("virDomainShutdown " + uuid + ": " + LastError());
  }
  return Status::Ok();
}

Status DestroyReplicaDomain(const std::string& uri, const std::string& uuid, const std::string& owner) {
  VMR_ASSIGN_OR_RETURN(ConnPtr conn, vm_internal::Open(uri));
  auto dom = OurDomain(conn.get(), uuid, owner);
  if (!dom.ok()) return dom.status().code() == Code::kNotFound ? Status::Ok() : dom.status();
  if (virDomainDestroy(dom->get()) != 0) {
    if (LastErrorCode() == VIR_ERR_NO_DOMAIN || LastErrorCode() == VIR_ERR_OPERATION_INVALID) return Status::Ok();
    return Status::Unavailable("virDomainDestroy " + uuid + ": " + LastError());
  }
  return Status::Ok();
}

Result<std::unique_ptr<QmpChannel>> OpenReplicaDomainQmp(const std::string& uri, const std::string& uuid,
                                                         const std::string& owner) {
  VMR_ASSIGN_OR_RETURN(ConnPtr conn, vm_internal::Open(uri));
  VMR_ASSIGN_OR_RETURN(DomainPtr dom, OurDomain(conn.get(), uuid, owner));
  if (virDomainIsActive(dom.get()) != 1) return Status::NotFound("domain " + uuid + " does not run");
  return std::unique_ptr<QmpChannel>(new OwnedChannel(std::move(conn), std::move(dom)));
}

}  // namespace vmreplica
