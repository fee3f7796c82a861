// VmDefinition: JSON form, validation, catalog mapping.
#include <cctype>
#include <string>

#include "vm/vm_internal.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica {
namespace {

constexpr int kDefinitionVersion = 1;
constexpr uint64_t kMaxMemoryMib = 16ull << 20;
constexpr uint32_t kMaxVcpus = 4096;

bool IsHex(char c) {
  return std::isxdigit(static_cast<unsigned char>(c)) != 0 && !std::isupper(static_cast<unsigned char>(c));
}

bool ValidMac(const std::string& m) {
  if (m.size() != 17) return false;
  for (size_t i = 0; i < m.size(); ++i) {
    if (i % 3 == 2) {
      if (m[i] != ':') return false;
    } else if (!IsHex(m[i])) {
      return false;
    }
  }
  return true;
}

bool ValidText(const std::string& s, size_t max) {
  if (s.size() > max) return false;
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) return false;
  }
  return true;
}

// Typed member access for FromJson; every miss names the field.
class Reader {
 public:
  Reader(const nlohmann::json& j, std::string prefix) : j_(j), prefix_(std::move(prefix)) {}
  Status String(const char* key, std::string* out) const {
    auto it = j_.find(key);
    if (it == j_.end() || !it->is_string()) return Status::InvalidArgument(Field(key) + ": missing or not a string");
    *out = it->get<std::string>();
    return Status::Ok();
  }
  Status Uint(const char* key, uint64_t max, uint64_t* out) const {
    auto it = j_.find(key);
    if (it == j_.end() || !it->is_number_unsigned()) {
      return Status::InvalidArgument(Field(key) + ": missing or not an unsigned integer");
    }
    *out = it->get<uint64_t>();
    if (*out > max) return Status::InvalidArgument(Field(key) + ": out of range");
    return Status::Ok();
  }
  // A string member that older definitions do not have ("" when absent).
  Status OptionalString(const char* key, std::string* out) const {
    if (!j_.contains(key)) {
      out->clear();
      return Status::Ok();
    }
    return String(key, out);
  }
  Result<const nlohmann::json*> Array(const char* key) const {
    auto it = j_.find(key);
    if (it == j_.end() || !it->is_array()) return Status::InvalidArgument(Field(key) + ": missing or not an array");
    return &*it;
  }
  std::string Field(const char* key) const { return prefix_ + key; }

 private:
  const nlohmann::json& j_;
  std::string prefix_;
};

}  // namespace

const char* VmSourceKindName(VmSourceKind kind) {
  switch (kind) {
    case VmSourceKind::kQmp:
      return "qmp";
    case VmSourceKind::kLibvirt:
      return "libvirt";
    case VmSourceKind::kOffline:
      return "offline";
  }
  return "unknown";
}

Result<VmSourceKind> ParseVmSourceKind(const std::string& name) {
  if (name == "qmp") return VmSourceKind::kQmp;
  if (name == "libvirt") return VmSourceKind::kLibvirt;
  if (name == "offline") return VmSourceKind::kOffline;
  return Status::InvalidArgument("kind: \"" + name + "\" is not qmp, libvirt or offline");
}

namespace vm_internal {

bool ValidDiskName(const std::string& n) {
  if (n.empty() || n.size() > 26 || !std::isalpha(static_cast<unsigned char>(n[0]))) return false;
  for (unsigned char c : n) {
    if (!std::isalnum(c) && c != '_') return false;
  }
  return true;
}

bool ValidUuid(const std::string& u) {
  if (u.size() != 36) return false;
  for (size_t i = 0; i < u.size(); ++i) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (u[i] != '-') return false;
    } else if (!IsHex(u[i])) {
      return false;
    }
  }
  return true;
}

bool ValidVmName(const std::string& n) { return !n.empty() && ValidText(n, 128) && n.find('/') == std::string::npos; }

}  // namespace vm_internal

Status VmDefinition::Validate() const {
  using namespace vm_internal;
  if (!ValidVmName(name)) return Status::InvalidArgument("name: 1..128 printable bytes without '/' required");
  if (!ValidUuid(uuid)) return Status::InvalidArgument("uuid: \"" + uuid + "\" is not a lower-case 8-4-4-4-12 UUID");
  if (memory_mib == 0 || memory_mib > kMaxMemoryMib) {
    return Status::InvalidArgument("memory_mib: must be 1.." + std::to_string(kMaxMemoryMib));
  }
  if (vcpus == 0 || vcpus > kMaxVcpus) return Status::InvalidArgument("vcpus: must be 1..4096");
  if (disks.empty()) return Status::InvalidArgument("disks: at least one disk is required");
  for (size_t i = 0; i < disks.size(); ++i) {
    const VmDiskSpec& d = disks[i];
    std::string f = "disks[" + std::to_string(i) + "].";
    if (!ValidDiskName(d.name)) {
      return Status::InvalidArgument(f + "name: \"" + d.name + "\" must match [A-Za-z][A-Za-z0-9_]{0,25}");
    }
    for (size_t k = 0; k < i; ++k) {
      if (disks[k].name == d.name) return Status::InvalidArgument(f + "name: \"" + d.name + "\" appears twice");
    }
    if (d.node_name.empty() && kind != VmSourceKind::kLibvirt) {
      return Status::InvalidArgument(f + "node_name: required");
    }
    if (!ValidText(d.node_name, 127)) return Status::InvalidArgument(f + "node_name: at most 127 printable bytes");
    if (d.path.empty() || d.path[0] != '/' || !ValidText(d.path, 4095)) {
      return Status::InvalidArgument(f + "path: an absolute path is required");
    }
    if (d.format != "qcow2" && d.format != "raw") {
      return Status::InvalidArgument(f + "format: \"" + d.format + "\" is not qcow2 or raw");
    }
    if (d.size_bytes == 0) return Status::InvalidArgument(f + "size_bytes: must be > 0");
  }
  for (size_t i = 0; i < nics.size(); ++i) {
    std::string f = "nics[" + std::to_string(i) + "].";
    if (!ValidMac(nics[i].mac))
      return Status::InvalidArgument(f + "mac: \"" + nics[i].mac + "\" is not aa:bb:cc:dd:ee:ff");
    if (!ValidText(nics[i].model, 64)) return Status::InvalidArgument(f + "model: at most 64 printable bytes");
    if (!ValidText(nics[i].network, 256)) return Status::InvalidArgument(f + "network: at most 256 printable bytes");
  }
  for (const auto& [field, path] : {std::pair<const char*, const std::string*>{"boot_kernel", &boot_kernel},
                                    {"boot_initrd", &boot_initrd}}) {
    if (!path->empty() && ((*path)[0] != '/' || !ValidText(*path, 4096))) {
      return Status::InvalidArgument(std::string(field) + ": an absolute file path (at most 4096 bytes)");
    }
  }
  if (!ValidText(boot_append, 4096)) return Status::InvalidArgument("boot_append: at most 4096 printable bytes");
  if (boot_kernel.empty() && (!boot_initrd.empty() || !boot_append.empty())) {
    return Status::InvalidArgument("boot_kernel: required with boot_initrd or boot_append");
  }
  if (kind == VmSourceKind::kLibvirt && !boot_kernel.empty()) {
    return Status::InvalidArgument("boot_kernel: a libvirt VM boots as its domain XML says");
  }
  switch (kind) {
    case VmSourceKind::kQmp:
      if (qmp_socket.empty() || qmp_socket[0] != '/' || qmp_socket.size() > 107) {
        return Status::InvalidArgument("qmp_socket: an absolute unix socket path (at most 107 bytes) is required");
      }
      if (!nbd_socket.empty() && (nbd_socket[0] != '/' || nbd_socket.size() > 107 || !ValidText(nbd_socket, 107))) {
        return Status::InvalidArgument("nbd_socket: an absolute unix socket path (at most 107 bytes)");
      }
      if (!qga_socket.empty() && (qga_socket[0] != '/' || qga_socket.size() > 107 || !ValidText(qga_socket, 107))) {
        return Status::InvalidArgument("qga_socket: an absolute unix socket path (at most 107 bytes)");
      }
      break;
    case VmSourceKind::kLibvirt:
      if (libvirt_uri.empty() || !ValidText(libvirt_uri, 1024)) {
        return Status::InvalidArgument("libvirt_uri: required");
      }
      if (libvirt_domain.empty() || !ValidText(libvirt_domain, 256)) {
        return Status::InvalidArgument("libvirt_domain: required");
      }
      if (libvirt_xml.empty()) return Status::InvalidArgument("libvirt_xml: required for a libvirt VM");
      break;
    case VmSourceKind::kOffline:
      break;
    default:
      return Status::InvalidArgument("kind: unknown value " + std::to_string(static_cast<int>(kind)));
  }
  if (libvirt_xml.size() > (4u << 20)) return Status::InvalidArgument("libvirt_xml: larger than 4 MiB");
  return Status::Ok();
}

nlohmann::json VmDefinition::ToJson() const {
  nlohmann::json j;
  j["version"] = static_cast<uint64_t>(kDefinitionVersion);
  j["kind"] = VmSourceKindName(kind);
  j["name"] = name;
  j["uuid"] = uuid;
  j["memory_mib"] = memory_mib;
  j["vcpus"] = vcpus;
  j["disks"] = nlohmann::json::array();
  for (const auto& d : disks) {
    j["disks"].push_back({{"name", d.name},
                          {"node_name", d.node_name},
                          {"path", d.path},
                          {"format", d.format},
                          {"size_bytes", d.size_bytes}});
  }
  j["nics"] = nlohmann::json::array();
  for (const auto& n : nics) j["nics"].push_back({{"mac", n.mac}, {"model", n.model}, {"network", n.network}});
  j["libvirt_xml"] = libvirt_xml;
  j["qmp_socket"] = qmp_socket;
  j["nbd_socket"] = nbd_socket;
  j["qga_socket"] = qga_socket;
  j["boot_kernel"] = boot_kernel;
  j["boot_initrd"] = boot_initrd;
  j["boot_append"] = boot_append;
  j["libvirt_uri"] = libvirt_uri;
  j["libvirt_domain"] = libvirt_domain;
  return j;
}

Result<VmDefinition> VmDefinition::FromJson(const nlohmann::json& j) {
  if (!j.is_object()) return Status::InvalidArgument("definition: not a JSON object");
  Reader r(j, "");
  uint64_t version = 0;
  VMR_RETURN_IF_ERROR(r.Uint("version", 1u << 30, &version));
  if (version != kDefinitionVersion) {
    return Status::InvalidArgument("version: " + std::to_string(version) + " is not supported (expected 1)");
  }
  VmDefinition d;
  std::string kind;
  VMR_RETURN_IF_ERROR(r.String("kind", &kind));
  VMR_ASSIGN_OR_RETURN(d.kind, ParseVmSourceKind(kind));
  VMR_RETURN_IF_ERROR(r.String("name", &d.name));
  VMR_RETURN_IF_ERROR(r.String("uuid", &d.uuid));
  VMR_RETURN_IF_ERROR(r.Uint("memory_mib", kMaxMemoryMib, &d.memory_mib));
  uint64_t vcpus = 0;
  VMR_RETURN_IF_ERROR(r.Uint("vcpus", kMaxVcpus, &vcpus));
  d.vcpus = static_cast<uint32_t>(vcpus);
  VMR_ASSIGN_OR_RETURN(const nlohmann::json* disks, r.Array("disks"));
  for (size_t i = 0; i < disks->size(); ++i) {
    const nlohmann::json& e = (*disks)[i];
    std::string prefix = "disks[" + std::to_string(i) + "].";
    if (!e.is_object()) return Status::InvalidArgument(prefix.substr(0, prefix.size() - 1) + ": not an object");
    Reader dr(e, prefix);
    VmDiskSpec s;
    VMR_RETURN_IF_ERROR(dr.String("name", &s.name));
    VMR_RETURN_IF_ERROR(dr.String("node_name", &s.node_name));
    VMR_RETURN_IF_ERROR(dr.String("path", &s.path));
    VMR_RETURN_IF_ERROR(dr.String("format", &s.format));
    VMR_RETURN_IF_ERROR(dr.Uint("size_bytes", UINT64_MAX, &s.size_bytes));
    d.disks.push_back(std::move(s));
  }
  VMR_ASSIGN_OR_RETURN(const nlohmann::json* nics, r.Array("nics"));
  for (size_t i = 0; i < nics->size(); ++i) {
    const nlohmann::json& e = (*nics)[i];
    std::string prefix = "nics[" + std::to_string(i) + "].";
    if (!e.is_object()) return Status::InvalidArgument(prefix.substr(0, prefix.size() - 1) + ": not an object");
    Reader nr(e, prefix);
    VmNicSpec n;
    VMR_RETURN_IF_ERROR(nr.String("mac", &n.mac));
    VMR_RETURN_IF_ERROR(nr.String("model", &n.model));
    VMR_RETURN_IF_ERROR(nr.String("network", &n.network));
    d.nics.push_back(std::move(n));
  }
  VMR_RETURN_IF_ERROR(r.String("libvirt_xml", &d.libvirt_xml));
  VMR_RETURN_IF_ERROR(r.String("qmp_socket", &d.qmp_socket));
  VMR_RETURN_IF_ERROR(r.String("nbd_socket", &d.nbd_socket));
  VMR_RETURN_IF_ERROR(r.OptionalString("qga_socket", &d.qga_socket));
  VMR_RETURN_IF_ERROR(r.OptionalString("boot_kernel", &d.boot_kernel));
  VMR_RETURN_IF_ERROR(r.OptionalString("boot_initrd", &d.boot_initrd));
  VMR_RETURN_IF_ERROR(r.OptionalString("boot_append", &d.boot_append));
  VMR_RETURN_IF_ERROR(r.String("libvirt_uri", &d.libvirt_uri));
  VMR_RETURN_IF_ERROR(r.String("libvirt_domain", &d.libvirt_domain));
  VMR_RETURN_IF_ERROR(d.Validate());
  return d;
}

VmRecord ToVmRecord(const VmDefinition& def) {
  VmRecord r;
  r.id = def.uuid;
  r.name = def.name;
  r.mode = ReplicationMode::kNone;
  r.definition_json = def.ToJson().dump();
  return r;
}

std::vector<DiskRecord> ToDiskRecords(const VmDefinition& def) {
  std::vector<DiskRecord> out;
  for (const auto& d : def.disks) {
    DiskRecord r;
    r.vm_id = def.uuid;
    r.name = d.name;
    r.size_bytes = d.size_bytes;
    r.path = d.path;
    r.node_name = d.node_name;
    r.granularity = TrackerOptions{}.granularity;
    r.included = true;
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace vmreplica
