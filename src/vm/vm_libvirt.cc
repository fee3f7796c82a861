// The libvirt kind: domain XML through libvirt + libxml2, QMP through
// virDomainQemuMonitorCommand (libvirt-qemu).
#include <libvirt/libvirt-qemu.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <libxml/parser.h>
#include <libxml/xpath.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>

#include "vm/libvirt_util.h"
#include "vm/vm_internal.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica::vm_internal {
namespace {

struct LibvirtDisk {
  std::string target;  // "vda"
  std::string path;
  std::string format;
  std::string alias;  // "virtio-disk0" (running domains)
};

std::vector<LibvirtDisk> Disks(DomainXml& x) {
  std::vector<LibvirtDisk> out;
  for (xmlNodePtr n : x.Nodes("/domain/devices/disk[@device='disk' or not(@device)]")) {
    LibvirtDisk d;
    d.target = x.Text("target/@dev", n);
    d.path = x.Text("source/@file", n);
    if (d.path.empty()) d.path = x.Text("source/@dev", n);
    d.format = x.Text("driver/@type", n);
    d.alias = x.Text("alias/@name", n);
    // Drives the replica host's launcher adds (the cloud-init seed) are not
    // the VM's disks (docs/failover_vm.md section 9.1).
    if (d.alias.rfind("ua-vmr-extra", 0) == 0) continue;
    out.push_back(std::move(d));
  }
  return out;
}

class LibvirtAttachedVm : public AttachedVm {
 public:
  LibvirtAttachedVm(ConnPtr conn, DomainPtr dom, std::vector<VmDiskSpec> disks, std::string export_dir, uid_t uid,
                    gid_t gid, std::string agent)
      : conn_(std::move(conn)),
        dom_(std::move(dom)),
        channel_(dom_.get(), export_dir, uid, gid),
        disks_(std::move(disks)),
        export_dir_(std::move(export_dir)),
        agent_(std::move(agent)) {}
  QmpChannel* qmp() override { return &channel_; }
  std::vector<TrackedDisk> tracked_disks() const override { return ToTracked(disks_); }
  std::string nbd_socket() const override { return ""; }
  std::string export_dir() const override { return export_dir_; }
  std::string guest_agent_socket() const override { return agent_; }

 private:
  ConnPtr conn_;
  DomainPtr dom_;
  LibvirtChannel channel_;
  const std::vector<VmDiskSpec> disks_;
  const std::string export_dir_;
  const std::string agent_;
};

// Resolves the format node of every disk of a running domain through
// query-block (matched by the device alias).
Status ResolveNodes(QmpChannel* qmp, const std::vector<LibvirtDisk>& disks, std::vector<VmDiskSpec>* specs) {
  VMR_ASSIGN_OR_RETURN(nlohmann::json blocks, qmp->Execute("query-block", nullptr, std::chrono::seconds(10)));
  if (!blocks.is_array()) return Status::Corruption("query-block: not an array");
  for (size_t i = 0; i < disks.size(); ++i) {
    for (const auto& b : blocks) {
      if (!b.is_object() || !b.contains("qdev") || !b["qdev"].is_string()) continue;
      std::string qdev = b["qdev"].get<std::string>();
      bool match = !disks[i].alias.empty() &&
                   (qdev == disks[i].alias || qdev.find("/" + disks[i].alias + "/") != std::string::npos);
      if (!match) continue;
      if (b.contains("inserted") && b["inserted"].is_object() && b["inserted"].contains("node-name") &&
          b["inserted"]["node-name"].is_string()) {
        (*specs)[i].node_name = b["inserted"]["node-name"].get<std::string>();
      }
    }
    if ((*specs)[i].node_name.empty()) {
      return Status::NotFound("disk " + disks[i].target + ": no block node found for device " + disks[i].alias);
    }
  }
  return Status::Ok();
}

struct Inspected {
  VmDefinition def;
  std::vector<LibvirtDisk> disks;
  std::string live_xml;
};

Result<Inspected> InspectDomain(virConnectPtr conn, virDomainPtr dom, const std::string& uri,
                                const std::string& domain) {
  Inspected out;
  VmDefinition& def = out.def;
  def.kind = VmSourceKind::kLibvirt;
  def.libvirt_uri = uri;
  def.libvirt_domain = domain;
  const char* n = virDomainGetName(dom);
  def.name = n != nullptr ? n : domain;
  char uuid[VIR_UUID_STRING_BUFLEN];
  if (virDomainGetUUIDString(dom, uuid) != 0) return Status::Unavailable("virDomainGetUUIDString: " + LastError());
  def.uuid = uuid;
  virDomainInfo info;
  if (virDomainGetInfo(dom, &info) != 0) return Status::Unavailable("virDomainGetInfo: " + LastError());
  def.memory_mib = info.maxMem / 1024;
  def.vcpus = info.nrVirtCpu;
  VMR_ASSIGN_OR_RETURN(out.live_xml, XmlDesc(dom, 0));
  VMR_ASSIGN_OR_RETURN(def.libvirt_xml, XmlDesc(dom, VIR_DOMAIN_XML_INACTIVE));
  VMR_ASSIGN_OR_RETURN(auto x, DomainXml::Parse(out.live_xml));
  out.disks = Disks(*x);
  if (out.disks.empty()) return Status::InvalidArgument("domain " + domain + " has no disk");
  for (const auto& d : out.disks) {
    if (!ValidDiskName(d.target)) return Status::InvalidArgument("disk target \"" + d.target + "\" is not usable");
    if (d.path.empty()) return Status::NotSupported("disk " + d.target + ": only file or block sources are supported");
    VmDiskSpec s;
    s.name = d.target;
    s.path = d.path;
    s.format = d.format.empty() ? "raw" : d.format;
    virDomainBlockInfo bi;
    if (virDomainGetBlockInfo(dom, d.target.c_str(), &bi, 0) != 0) {
      return Status::Unavailable("virDomainGetBlockInfo " + d.target + ": " + LastError());
    }
    s.size_bytes = bi.capacity;
    def.disks.push_back(std::move(s));
  }
  for (xmlNodePtr nic : x->Nodes("/domain/devices/interface")) {
    VmNicSpec s;
    s.mac = x->Text("mac/@address", nic);
    for (auto& c : s.mac) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    s.model = x->Text("model/@type", nic);
    s.network = x->Text("source/@network", nic);
    if (s.network.empty()) s.network = x->Text("source/@bridge", nic);
    def.nics.push_back(std::move(s));
  }
  (void)conn;
  return out;
}

// The uid/gid QEMU runs as: the DAC label of the running domain ("+64055:+64055"),
// else the owner of the first disk image (libvirt hands images to QEMU's user).
std::pair<uid_t, gid_t> QemuUser(const std::string& live_xml, const std::string& first_image) {
  auto x = DomainXml::Parse(live_xml);
  if (x.ok()) {
    std::string label = (*x)->Text("/domain/seclabel[@model='dac']/label");
    unsigned long uid = 0, gid = 0;
    if (!label.empty() && std::sscanf(label.c_str(), "+%lu:+%lu", &uid, &gid) == 2) {
      return {static_cast<uid_t>(uid), static_cast<gid_t>(gid)};
    }
  }
  struct stat st;
  if (::stat(first_image.c_str(), &st) == 0) return {st.st_uid, st.st_gid};
  return {::getuid(), ::getgid()};
}

}  // namespace

Result<VmDefinition> InspectLibvirt(const VmAddRequest& req) {
  std::string domain = req.libvirt_domain.empty() ? req.name : req.libvirt_domain;
  if (domain.empty()) return Status::InvalidArgument("libvirt_domain: required");
  if (req.libvirt_uri.empty()) return Status::InvalidArgument("libvirt_uri: required");
  VMR_ASSIGN_OR_RETURN(ConnPtr conn, Open(req.libvirt_uri));
  VMR_ASSIGN_OR_RETURN(DomainPtr dom, Lookup(conn.get(), domain));
  VMR_ASSIGN_OR_RETURN(Inspected in, InspectDomain(conn.get(), dom.get(), req.libvirt_uri, domain));
  if (virDomainIsActive(dom.get()) == 1) {
    LibvirtChannel channel(dom.get(), "", ::getuid(), ::getgid());
    VMR_RETURN_IF_ERROR(ResolveNodes(&channel, in.disks, &in.def.disks));
  }
  if (!req.name.empty()) in.def.name = req.name;
  if (!req.uuid.empty() && req.uuid != in.def.uuid) {
    return Status::InvalidArgument("uuid: libvirt says " + in.def.uuid + " for domain " + domain);
  }
  return std::move(in.def);
}

Result<std::unique_ptr<AttachedVm>> AttachLibvirt(const VmDefinition& def, const std::string& run_dir) {
  VMR_ASSIGN_OR_RETURN(ConnPtr conn, Open(def.libvirt_uri));
  VMR_ASSIGN_OR_RETURN(DomainPtr dom, Lookup(conn.get(), def.libvirt_domain));
  if (virDomainIsActive(dom.get()) != 1) {
    return Status::FailedPrecondition("domain " + def.libvirt_domain + " is not running");
  }
  char uuid[VIR_UUID_STRING_BUFLEN];
  if (virDomainGetUUIDString(dom.get(), uuid) != 0)
    return Status::Unavailable("virDomainGetUUIDString: " + LastError());
  if (def.uuid != uuid) {
    return Status::FailedPrecondition("domain " + def.libvirt_domain + " has uuid " + uuid + ", defined as " +
                                      def.uuid);
  }
  VMR_ASSIGN_OR_RETURN(Inspected in, InspectDomain(conn.get(), dom.get(), def.libvirt_uri, def.libvirt_domain));
  LibvirtChannel probe_channel(dom.get(), "", ::getuid(), ::getgid());
  VMR_RETURN_IF_ERROR(ResolveNodes(&probe_channel, in.disks, &in.def.disks));
  // Compare with the definition: same disks by name, size, path, format.
  if (in.def.disks.size() != def.disks.size()) {
    return Status::FailedPrecondition("domain has " + std::to_string(in.def.disks.size()) + " disks, defined with " +
                                      std::to_string(def.disks.size()));
  }
  for (size_t i = 0; i < def.disks.size(); ++i) {
    const VmDiskSpec& want = def.disks[i];
    const VmDiskSpec& got = in.def.disks[i];
    if (got.name != want.name) return Status::FailedPrecondition("disk " + want.name + ": domain has " + got.name);
    if (got.size_bytes != want.size_bytes) {
      return Status::FailedPrecondition("disk " + want.name + ": size is " + std::to_string(got.size_bytes) +
                                        " bytes, defined as " + std::to_string(want.size_bytes));
    }
    // What QEMU has open (a domain whose disk was pivoted by a block job
    // outside libvirt, as CommitFailover's live merge does, still shows the
    // old source in its XML).
    auto node = DescribeNode(&probe_channel, want.name, got.node_name);
    if (!node.ok()) return node.status().WithContext("disk " + want.name);
    if (node->path != want.path) {
      return Status::FailedPrecondition("disk " + want.name + ": image is " + node->path + ", defined as " + want.path);
    }
    if (node->format != want.format) {
      return Status::FailedPrecondition("disk " + want.name + ": format is " + node->format + ", defined as " +
                                        want.format);
    }
  }
  // export_dir: owned by QEMU's user; run_dir must be traversable by it.
  auto [uid, gid] = QemuUser(in.live_xml, in.def.disks[0].path);
  std::string export_dir = run_dir + "/export";
  if (::mkdir(export_dir.c_str(), 0750) != 0 && errno != EEXIST) {
    return Status::IOError("mkdir " + export_dir + ": " + std::strerror(errno));
  }
  if (::chown(export_dir.c_str(), uid, gid) != 0) {
    return Status::IOError("chown " + export_dir + ": " + std::strerror(errno));
  }
  struct stat st;
  if (::stat(run_dir.c_str(), &st) != 0 || ::chmod(run_dir.c_str(), (st.st_mode & 07777) | S_IXOTH) != 0) {
    return Status::IOError("chmod o+x " + run_dir + ": " + std::strerror(errno));
  }
  std::string agent;
  auto x = DomainXml::Parse(in.live_xml);
  if (x.ok()) {
    agent = (*x)->Text("/domain/devices/channel[@type='unix'][target/@name='org.qemu.guest_agent.0']/source/@path");
  }
  return std::unique_ptr<AttachedVm>(
      new LibvirtAttachedVm(std::move(conn), std::move(dom), std::move(in.def.disks), export_dir, uid, gid, agent));
}

Result<VmPowerState> LibvirtPower(const VmDefinition& def) {
  VMR_ASSIGN_OR_RETURN(ConnPtr conn, Open(def.libvirt_uri));
  auto found = Lookup(conn.get(), def.libvirt_domain);
  if (!found.ok() && found.status().code() == Code::kNotFound) {
    // Not defined here at all (a transient domain that stopped, as the
    // replica host runs failed-over and reversed VMs): nothing runs it.
    VmPowerState out;
    out.power = VmPower::kOff;
    out.detail = "libvirt has no domain " + def.libvirt_domain;
    return out;
  }
  VMR_ASSIGN_OR_RETURN(DomainPtr dom, std::move(found));
  int state = 0, reason = 0;
  if (virDomainGetState(dom.get(), &state, &reason, 0) != 0) {
    return Status::Unavailable("virDomainGetState of " + def.libvirt_domain + ": " + LastError());
  }
  VmPowerState out;
  out.detail = "libvirt domain " + def.libvirt_domain + " state " + std::to_string(state) + " reason " +
               std::to_string(reason);
  if (state != VIR_DOMAIN_SHUTOFF) {
    out.power = VmPower::kRunning;
  } else if (reason == VIR_DOMAIN_SHUTOFF_MIGRATED) {
    // Shut off here because it runs on another host now (shared storage):
    // not off.
    out.power = VmPower::kUnknown;
    out.detail += " (migrated to another host)";
  } else {
    out.power = VmPower::kOff;
  }
  return out;
}

}  // namespace vmreplica::vm_internal
