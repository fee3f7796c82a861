#include "vmreplica/vm_launcher.h"

#include <fcntl.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "launcher/subprocess.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/libvirt_domain.h"
#include "vmreplica/qmp.h"

namespace vmreplica {
namespace {

using Clock = std::chrono::steady_clock;
using launcher_internal::EscapeCommas;
using launcher_internal::HasControlChars;
using launcher_internal::ReadProcInfo;
using launcher_internal::RunCapture;

constexpr int kStateVersion = 1;
constexpr size_t kMaxRunDirBytes = 90;
constexpr size_t kMaxStateBytes = 1u << 20;
// QEMU keeps node names in 32 bytes: "vmr-commit-" leaves 20 for the disk.
constexpr size_t kMaxDirectDiskName = 20;
const char* const kDirectNodePrefix = "vmr-commit-";
constexpr auto kQuitWait = std::chrono::seconds(10);
constexpr auto kKillWait = std::chrono::seconds(10);

const char* const kStateFile = "vm.json";
const char* const kPidFile = "qemu.pid";
// Files QEMU makes besides the overlays (removed by DropOverlays).
const char* const kQemuFiles[] = {"qemu.pid", "qmp.sock", "serial.sock", "serial.log", "qemu.log"};

bool IsDirectory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool IsRegularFile(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool Exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

bool IsNbdUri(const std::string& s) {
  return s.rfind("nbd://", 0) == 0 || s.rfind("nbd+unix://", 0) == 0 || s.rfind("nbds://", 0) == 0 ||
         s.rfind("nbds+unix://", 0) == 0;
}

// The NBD URI forms the launcher accepts, split for a libvirt disk source.
Status SplitNbdBacking(const std::string& uri, ReplicaDomainDisk* d) {
  const std::string unix_prefix = "nbd+unix:///";
  if (uri.rfind(unix_prefix, 0) == 0) {
    const size_t q = uri.find("?socket=", unix_prefix.size());
    if (q == std::string::npos) return Status::InvalidArgument("no ?socket= in " + uri);
    d->backing = ReplicaDomainDisk::Backing::kNbdUnix;
    d->nbd_export = uri.substr(unix_prefix.size(), q - unix_prefix.size());
    d->backing_path = uri.substr(q + 8);
    if (d->backing_path.empty() || d->backing_path[0] != '/' || uri.find_first_of("%&#") != std::string::npos) {
      return Status::InvalidArgument("unsupported NBD URI (absolute socket, no %, & or #): " + uri);
    }
    return Status::Ok();
  }
  const std::string tcp_prefix = "nbd://";
  if (uri.rfind(tcp_prefix, 0) == 0) {
    const size_t slash = uri.find('/', tcp_prefix.size());
    const std::string hostport = uri.substr(tcp_prefix.size(), slash == std::string::npos ? std::string::npos
                                                                                            : slash - tcp_prefix.size());
    const size_t colon = hostport.rfind(':');
    d->backing = ReplicaDomainDisk::Backing::kNbdTcp;
    d->nbd_host = colon == std::string::npos ? hostport : hostport.substr(0, colon);
    unsigned long port = 10809;
    if (colon != std::string::npos) {
      char* end = nullptr;
      port = std::strtoul(hostport.c_str() + colon + 1, &end, 10);
      if (end == nullptr || *end != '\0' || port == 0 || port > 65535) {
        return Status::InvalidArgument("bad port in " + uri);
      }
    }
    d->nbd_port = static_cast<uint16_t>(port);
    d->nbd_export = slash == std::string::npos ? "" : uri.substr(slash + 1);
    if (d->nbd_host.empty() || uri.find_first_of("%?#") != std::string::npos) {
      return Status::InvalidArgument("unsupported NBD URI: " + uri);
    }
    return Status::Ok();
  }
  return Status::InvalidArgument("libvirt takes nbd+unix:/// or nbd:// backings, not " + uri);
}

// "nbd+unix:///<export>?socket=<path>" -> the json: backing string of an
// NBD client that reconnects for `delay_s` seconds. InvalidArgument for
// other URIs (or percent-encoded ones).
Result<std::string> ReconnectingBacking(const std::string& uri, uint32_t delay_s) {
  if (uri.rfind("nbd+unix:///", 0) != 0) return Status::InvalidArgument("reconnect needs an nbd+unix:/// URI");
  ReplicaDomainDisk d;
  VMR_RETURN_IF_ERROR(SplitNbdBacking(uri, &d));
  nlohmann::json j = {{"driver", "nbd"},
                      {"server", {{"type", "unix"}, {"path", d.backing_path}}},
                      {"export", d.nbd_export},
                      {"reconnect-delay", delay_s}};
  return "json:" + j.dump();
}

std::string Tail(const std::string& path, size_t bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "(no " + path + ")";
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  if (s.size() > bytes) s = "..." + s.substr(s.size() - bytes);
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  return s.empty() ? "(empty)" : s;
}

// A plain file name inside the run directory (no '/', not "." or "..").
bool PlainName(const std::string& n) {
  return !n.empty() && n != "." && n != ".." && n.find('/') == std::string::npos && !HasControlChars(n) &&
         n.size() < 256;
}

const char* NicDevice(const std::string& model) {
  if (model == "e1000") return "e1000";
  if (model == "e1000e") return "e1000e";
  if (model == "rtl8139") return "rtl8139";
  return "virtio-net-pci";  // "virtio", "" and anything QEMU would not know
}

Status ValidateSpec(const VmLaunchSpec& spec, const VmDefinition& def) {
  // The primary-side binding (kind, sockets, XML) does not matter here:
  // check the rest with the rules of the offline kind.
  VmDefinition check = def;
  check.kind = VmSourceKind::kOffline;
  check.libvirt_xml.clear();
  for (auto& d : check.disks) {
    if (d.node_name.empty()) d.node_name = d.name;
  }
  VMR_RETURN_IF_ERROR(check.Validate().WithContext("definition"));
  const std::string& dir = spec.run_dir;
  if (dir.empty() || dir[0] != '/') return Status::InvalidArgument("run_dir: an absolute path is required");
  if (dir.size() > kMaxRunDirBytes) {
    return Status::InvalidArgument("run_dir: at most 90 bytes (unix socket paths): " + dir);
  }
  if (dir.find(',') != std::string::npos || HasControlChars(dir)) {
    return Status::InvalidArgument("run_dir: no ',' or control characters allowed: " + dir);
  }
  if (!IsDirectory(dir)) return Status::InvalidArgument("run_dir: not an existing directory: " + dir);
  if (spec.disks.size() != def.disks.size()) {
    return Status::InvalidArgument("disks: " + std::to_string(spec.disks.size()) + " given, the definition has " +
                                   std::to_string(def.disks.size()));
  }
  for (size_t i = 0; i < spec.disks.size(); ++i) {
    const VmLaunchDisk& d = spec.disks[i];
    const std::string f = "disks[" + std::to_string(i) + "].";
    if (d.direct_image.empty() != spec.disks[0].direct_image.empty()) {
      return Status::InvalidArgument(f + "direct_image: every disk has one or none has");
    }
    if (!d.direct_image.empty()) {
      if (d.direct_image[0] != '/' || d.direct_image.find(',') != std::string::npos ||
          HasControlChars(d.direct_image)) {
        return Status::InvalidArgument(f + "direct_image: an absolute path without ',' is required");
      }
      if (!IsRegularFile(d.direct_image)) {
        return Status::InvalidArgument(f + "direct_image: no such file: " + d.direct_image);
      }
      if (!d.backing.empty() || d.nbd_reconnect_delay_s != 0) {
        return Status::InvalidArgument(f + "backing: must be empty (and nbd_reconnect_delay_s 0) with direct_image");
      }
      if (def.disks[i].name.size() > kMaxDirectDiskName) {
        return Status::InvalidArgument(f + "direct_image: the disk name \"" + def.disks[i].name +
                                       "\" is longer than 20 bytes (QEMU node name " + kDirectNodePrefix +
                                       "<disk>)");
      }
      if (d.size_bytes == 0 || d.size_bytes % 512 != 0) {
        return Status::InvalidArgument(f + "size_bytes: a positive multiple of 512 is required");
      }
      continue;
    }
    if (d.backing.empty() || d.backing.find(',') != std::string::npos || HasControlChars(d.backing)) {
      return Status::InvalidArgument(f + "backing: a non-empty NBD URI or path without ',' is required");
    }
    if (d.nbd_reconnect_delay_s > 3600) return Status::InvalidArgument(f + "nbd_reconnect_delay_s: 0..3600");
    if (IsNbdUri(d.backing)) {
      if (d.backing_format != "raw") return Status::InvalidArgument(f + "backing_format: an NBD backing is raw");
      if (d.nbd_reconnect_delay_s > 0) {
        auto r = ReconnectingBacking(d.backing, d.nbd_reconnect_delay_s);
        if (!r.ok()) return Status::InvalidArgument(f + "backing: " + r.status().message());
      }
    } else if (d.nbd_reconnect_delay_s > 0) {
      return Status::InvalidArgument(f + "nbd_reconnect_delay_s: only for nbd+unix:// backings");
    } else if (d.backing[0] != '/') {
      return Status::InvalidArgument(f + "backing: an NBD URI or an absolute path is required: " + d.backing);
    } else if (d.backing_format != "raw" && d.backing_format != "qcow2") {
      return Status::InvalidArgument(f + "backing_format: raw or qcow2");
    }
    if (d.size_bytes == 0 || d.size_bytes % 512 != 0) {
      return Status::InvalidArgument(f + "size_bytes: a positive multiple of 512 is required");
    }
  }
  for (size_t i = 0; i < spec.extra_drives.size(); ++i) {
    const VmExtraDrive& x = spec.extra_drives[i];
    const std::string f = "extra_drives[" + std::to_string(i) + "].";
    if (x.path.empty() || x.path[0] != '/' || HasControlChars(x.path)) {
      return Status::InvalidArgument(f + "path: an absolute path is required");
    }
    if (!IsRegularFile(x.path)) return Status::InvalidArgument(f + "path: no such file: " + x.path);
    if (x.format != "raw" && x.format != "qcow2") return Status::InvalidArgument(f + "format: raw or qcow2");
  }
  if (spec.kernel_boot) {
    const VmKernelBoot& k = *spec.kernel_boot;
    if (k.kernel.empty() || k.kernel[0] != '/' || !IsRegularFile(k.kernel)) {
      return Status::InvalidArgument("kernel_boot.kernel: an existing absolute path is required");
    }
    if (!k.initrd.empty() && (k.initrd[0] != '/' || !IsRegularFile(k.initrd))) {
      return Status::InvalidArgument("kernel_boot.initrd: an existing absolute path is required");
    }
    if (HasControlChars(k.append)) return Status::InvalidArgument("kernel_boot.append: no control characters");
  }
  if (spec.network == VmNetworkMode::kIsolated) {
    for (size_t i = 0; i < def.nics.size(); ++i) {
      const std::string& mac = def.nics[i].mac;
      bool ok = mac.size() == 17;
      for (size_t j = 0; ok && j < mac.size(); ++j) {
        ok = (j % 3 == 2) ? mac[j] == ':' : std::isxdigit(static_cast<unsigned char>(mac[j])) != 0;
      }
      if (!ok) return Status::InvalidArgument("definition.nics[" + std::to_string(i) + "].mac: bad MAC " + mac);
    }
  } else if (spec.network != VmNetworkMode::kNone) {
    return Status::InvalidArgument("network: none or isolated");
  }
  if (spec.serial != VmSerialMode::kSocket && spec.serial != VmSerialMode::kFile) {
    return Status::InvalidArgument("serial: socket or file");
  }
  if (spec.start_timeout < std::chrono::seconds(1) || spec.start_timeout > std::chrono::minutes(10)) {
    return Status::InvalidArgument("start_timeout: 1 s .. 10 min");
  }
  if (spec.qemu_binary.empty() || spec.qemu_img_binary.empty()) {
    return Status::InvalidArgument("qemu_binary / qemu_img_binary: empty");
  }
  if (spec.hypervisor == VmHypervisor::kLibvirt) {
    if (spec.libvirt_uri.empty() || HasControlChars(spec.libvirt_uri)) {
      return Status::InvalidArgument("libvirt_uri: required with the libvirt hypervisor");
    }
  } else if (spec.hypervisor != VmHypervisor::kQemu) {
    return Status::InvalidArgument("hypervisor: qemu or libvirt");
  }
  return Status::Ok();
}

Result<std::string> LibvirtXml(const VmLaunchSpec& spec, const VmDefinition& def, VmAccel accel,
                               const std::vector<std::string>& overlays) {
  ReplicaDomainPlan plan;
  plan.template_xml = def.libvirt_xml;
  plan.name = def.name;
  plan.uuid = def.uuid;
  plan.memory_mib = def.memory_mib;
  plan.vcpus = def.vcpus;
  plan.kvm = accel == VmAccel::kKvm;
  plan.owner = spec.run_dir;
  std::set<std::string> targets;
  for (size_t i = 0; i < def.disks.size(); ++i) {
    ReplicaDomainDisk d;
    d.target = def.disks[i].name;
    d.alias = "ua-vmr-disk" + std::to_string(i);
    d.format = "qcow2";
    const VmLaunchDisk& ld = spec.disks[i];
    if (!ld.direct_image.empty()) {
      d.file = ld.direct_image;
    } else {
      d.file = overlays.at(i);
      if (IsNbdUri(ld.backing)) {
        VMR_RETURN_IF_ERROR(SplitNbdBacking(ld.backing, &d).WithContext("disks[" + std::to_string(i) + "].backing"));
        d.backing_format = "raw";
      } else {
        d.backing = ReplicaDomainDisk::Backing::kFile;
        d.backing_path = ld.backing;
        d.backing_format = ld.backing_format;
      }
    }
    targets.insert(d.target);
    plan.disks.push_back(std::move(d));
  }
  // Extra drives take the next free vdX names.
  char letter = 'a';
  for (size_t i = 0; i < spec.extra_drives.size(); ++i) {
    std::string t;
    do {
      if (letter > 'z') return Status::InvalidArgument("extra_drives: no free vd[a-z] target");
      t = std::string("vd") + letter++;
    } while (targets.count(t) != 0);
    targets.insert(t);
    ReplicaDomainDisk d;
    d.target = t;
    d.file = spec.extra_drives[i].path;
    d.format = spec.extra_drives[i].format;
    d.read_only = true;
    d.alias = "ua-vmr-extra" + std::to_string(i);
    plan.disks.push_back(std::move(d));
  }
  if (spec.network == VmNetworkMode::kIsolated) plan.nics = def.nics;
  plan.serial_socket = spec.serial == VmSerialMode::kSocket ? spec.run_dir + "/serial.sock" : "";
  plan.serial_log = spec.run_dir + "/serial.log";
  if (spec.kernel_boot) {
    plan.kernel = spec.kernel_boot->kernel;
    plan.initrd = spec.kernel_boot->initrd;
    plan.cmdline = spec.kernel_boot->append;
  }
  return RenderReplicaDomainXml(plan);
}

// libvirt's pid file of a domain of qemu:///system (best effort: 0 when it
// cannot be read).
pid_t LibvirtPid(const std::string& name) {
  auto text = ReadFile("/run/libvirt/qemu/" + name + ".pid", 64);
  if (!text.ok()) return 0;
  char* end = nullptr;
  long v = std::strtol(text->c_str(), &end, 10);
  return v > 0 && v < 0x3fffffff ? static_cast<pid_t>(v) : 0;
}

std::vector<std::string> QemuArgs(const VmLaunchSpec& spec, const VmDefinition& def, VmAccel accel,
                                  const std::vector<std::string>& overlays) {
  const std::string& dir = spec.run_dir;
  std::vector<std::string> a = {spec.qemu_binary,
                                "-name",
                                "guest=" + EscapeCommas(def.name),
                                "-uuid",
                                def.uuid,
                                "-machine",
                                "pc",
                                "-accel",
                                accel == VmAccel::kKvm ? "kvm" : "tcg",
                                "-m",
                                std::to_string(def.memory_mib),
                                "-smp",
                                std::to_string(def.vcpus),
                                "-nodefaults",
                                "-no-user-config",
                                "-display",
                                "none",
                                "-pidfile",
                                dir + "/" + kPidFile,
                                "-chardev",
                                "socket,id=vmr-qmp,path=" + dir + "/qmp.sock,server=on,wait=off",
                                "-mon",
                                "chardev=vmr-qmp,mode=control"};
  if (spec.serial == VmSerialMode::kSocket) {
    a.insert(a.end(), {"-chardev", "socket,id=vmr-ser0,path=" + dir + "/serial.sock,server=on,wait=off,logfile=" + dir +
                                       "/serial.log"});
  } else {
    a.insert(a.end(), {"-chardev", "file,id=vmr-ser0,path=" + dir + "/serial.log"});
  }
  a.insert(a.end(), {"-serial", "chardev:vmr-ser0"});
  for (size_t i = 0; i < def.disks.size(); ++i) {
    std::string node = def.disks[i].name;
    nlohmann::json blockdev;
    if (spec.disks[i].direct_image.empty()) {
      blockdev = {{"driver", "qcow2"},
                  {"node-name", node},
                  {"discard", "unmap"},
                  {"file", {{"driver", "file"}, {"filename", overlays[i]}, {"discard", "unmap"}}}};
    } else {
      // The wrapper itself, read-write; QEMU opens its data file (the header
      // names it) and loads its persistent bitmap. Discards are not passed
      // down: the store's file keeps its blocks.
      node = kDirectNodePrefix + node;
      blockdev = {{"driver", "qcow2"},
                  {"node-name", node},
                  {"file", {{"driver", "file"}, {"filename", spec.disks[i].direct_image}}}};
    }
    std::string device =
        "virtio-blk-pci,drive=" + node + ",id=vmr-disk" + std::to_string(i) + ",serial=" + def.disks[i].name;
    if (!spec.kernel_boot && i == 0) device += ",bootindex=1";
    a.insert(a.end(), {"-blockdev", blockdev.dump(), "-device", device});
  }
  for (size_t i = 0; i < spec.extra_drives.size(); ++i) {
    const std::string node = "vmr-extra" + std::to_string(i);
    nlohmann::json blockdev = {
        {"driver", spec.extra_drives[i].format},
        {"node-name", node},
        {"read-only", true},
        {"file", {{"driver", "file"}, {"filename", spec.extra_drives[i].path}, {"read-only", true}}}};
    a.insert(a.end(), {"-blockdev", blockdev.dump(), "-device", "virtio-blk-pci,drive=" + node + ",id=" + node});
  }
  if (spec.network == VmNetworkMode::kNone || def.nics.empty()) {
    a.insert(a.end(), {"-nic", "none"});
  } else {
    for (size_t i = 0; i < def.nics.size(); ++i) {
      const std::string id = "vmr-net" + std::to_string(i);
      // A hub of its own per NIC, with no other port: no uplink.
      a.insert(a.end(), {"-netdev", "hubport,id=" + id + ",hubid=" + std::to_string(i), "-device",
                         std::string(NicDevice(def.nics[i].model)) + ",netdev=" + id + ",mac=" + def.nics[i].mac +
                             ",id=vmr-nic" + std::to_string(i)});
    }
  }
  if (spec.kernel_boot) {
    a.insert(a.end(), {"-kernel", spec.kernel_boot->kernel});
    if (!spec.kernel_boot->initrd.empty()) a.insert(a.end(), {"-initrd", spec.kernel_boot->initrd});
    a.insert(a.end(), {"-append", spec.kernel_boot->append});
  }
  return a;
}

nlohmann::json StateJson(const VmLauncher& l, pid_t pid, uint64_t ticks, const std::vector<std::string>& files) {
  nlohmann::json overlays = nlohmann::json::array();
  for (const auto& o : l.overlays()) overlays.push_back(o.substr(o.rfind('/') + 1));
  nlohmann::json j = {{"version", kStateVersion}, {"pid", pid},           {"start_ticks", ticks},
                      {"name", l.name()},         {"uuid", l.uuid()},     {"accel", VmAccelName(l.accel())},
                      {"overlays", overlays},     {"files", files}};
  // Only for direct disks: a state without it is what older builds wrote.
  if (!l.direct_images().empty()) j["direct_images"] = l.direct_images();
  // Only for libvirt domains (absent: qemu).
  if (l.hypervisor() == VmHypervisor::kLibvirt) {
    j["hypervisor"] = VmHypervisorName(l.hypervisor());
    j["libvirt_uri"] = l.libvirt_uri();
  }
  return j;
}

}  // namespace

const char* VmHypervisorName(VmHypervisor h) {
  switch (h) {
    case VmHypervisor::kQemu:
      return "qemu";
    case VmHypervisor::kLibvirt:
      return "libvirt";
  }
  return "unknown";
}

Result<std::unique_ptr<VmLauncher>> VmLauncher::Start(const VmLaunchSpec& spec) {
  VmDefinition def = spec.definition;
  if (!spec.name_override.empty()) def.name = spec.name_override;
  if (!spec.uuid_override.empty()) def.uuid = spec.uuid_override;
  VMR_RETURN_IF_ERROR(ValidateSpec(spec, def));
  std::string dir = spec.run_dir;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  if (Exists(dir + "/" + kStateFile)) {
    return Status::AlreadyExists("run_dir " + dir + " already holds a VM (vm.json): adopt it, stop it, drop it");
  }

  VmAccel accel = VmAccel::kTcg;
  if (spec.accel == VmAccel::kKvm) {
    VMR_RETURN_IF_ERROR(ProbeKvm());
    accel = VmAccel::kKvm;
  } else if (spec.accel == VmAccel::kAuto) {
    Status kvm = ProbeKvm();
    if (kvm.ok()) {
      accel = VmAccel::kKvm;
    } else {
      spdlog::info("VM {}: using TCG ({})", def.name, kvm.message());
    }
  }

  std::unique_ptr<VmLauncher> l(new VmLauncher());
  l->run_dir_ = dir;
  l->name_ = def.name;
  l->uuid_ = def.uuid;
  l->accel_ = accel;
  l->hypervisor_ = spec.hypervisor;
  l->libvirt_uri_ = spec.libvirt_uri;
  VmLaunchSpec effective = spec;
  effective.run_dir = dir;
  bool domain_created = false;

  // From here on every failure removes what was made (and kills QEMU).
  struct Cleanup {
    VmLauncher* l;
    const bool* domain_created;
    bool armed = true;
    ~Cleanup() {
      if (!armed) return;
      if (*domain_created) {
        Status s = DestroyReplicaDomain(l->libvirt_uri_, l->uuid_, l->run_dir_);
        if (!s.ok()) spdlog::warn("VM {}: destroying the domain after a failed start: {}", l->name_, s.ToString());
        l->pid_ = -1;
      } else if (l->pid_ > 0) {
        ::kill(l->pid_, SIGKILL);
        int ws = 0;
        while (::waitpid(l->pid_, &ws, 0) < 0 && errno == EINTR) {
        }
        l->pid_ = -1;
      }
      for (const auto& f : l->files_) ::unlink((l->run_dir_ + "/" + f).c_str());
    }
  } cleanup{l.get(), &domain_created};

  const bool direct = !spec.disks.empty() && !spec.disks[0].direct_image.empty();
  for (size_t i = 0; i < def.disks.size() && !direct; ++i) {
    const std::string path = dir + "/" + def.disks[i].name + ".qcow2";
    if (Exists(path)) return Status::AlreadyExists("disks[" + std::to_string(i) + "]: " + path + " exists");
    l->overlays_.push_back(path);
  }
  for (size_t i = 0; i < def.disks.size() && direct; ++i) {
    // A wrapper QEMU can open: qcow2 of the disk's size, not held by another
    // process (qemu-img takes the same locks QEMU will).
    const std::string f = "disks[" + std::to_string(i) + "].direct_image";
    const std::string& path = spec.disks[i].direct_image;
    VMR_ASSIGN_OR_RETURN(auto c, RunCapture({spec.qemu_img_binary, "info", "--output=json", path}));
    if (c.exit_code == 127) return Status::FailedPrecondition("qemu-img is not installed (package qemu-utils)");
    if (c.exit_code != 0) {
      if (c.output.find("lock") != std::string::npos) {
        return Status::FailedPrecondition(f + ": " + path + " is in use by another process: " + c.output);
      }
      return Status::InvalidArgument(f + ": qemu-img cannot open " + path + ": " + c.output);
    }
    const nlohmann::json info = nlohmann::json::parse(c.output, nullptr, /*allow_exceptions=*/false);
    if (!info.is_object() || !info.contains("format") || info["format"] != "qcow2") {
      return Status::InvalidArgument(f + ": " + path + " is not a qcow2 image");
    }
    if (!info.contains("virtual-size") || !info["virtual-size"].is_number_unsigned() ||
        info["virtual-size"].get<uint64_t>() != spec.disks[i].size_bytes) {
      return Status::InvalidArgument(f + ": " + path + " is not " + std::to_string(spec.disks[i].size_bytes) +
                                     " bytes");
    }
    l->direct_images_.push_back(path);
  }
  // The state comes first (pid 0: not started), so a crash at any later
  // point leaves files that Adopt + DropOverlays can remove.
  l->files_.push_back(kStateFile);
  for (const char* f : kQemuFiles) {
    ::unlink((dir + "/" + f).c_str());
    l->files_.push_back(f);
  }
  {
    std::vector<std::string> all = l->files_;
    for (size_t i = 0; i < def.disks.size() && !direct; ++i) all.push_back(def.disks[i].name + ".qcow2");
    VMR_RETURN_IF_ERROR(WriteFileAtomic(l->state_path(), StateJson(*l, 0, 0, all).dump(2) + "\n", 0600));
  }
  for (size_t i = 0; i < def.disks.size() && !direct; ++i) {
    const std::string name = def.disks[i].name + ".qcow2";
    const std::string& path = l->overlays_[i];
    const VmLaunchDisk& d = spec.disks[i];
    std::string backing = d.backing;
    std::string backing_format = d.backing_format;
    if (d.nbd_reconnect_delay_s > 0) {
      VMR_ASSIGN_OR_RETURN(backing, ReconnectingBacking(d.backing, d.nbd_reconnect_delay_s));
      backing_format = "nbd";  // the protocol driver itself: no format probing
    }
    l->files_.push_back(name);  // before it exists: a failed create may leave a part
    VMR_ASSIGN_OR_RETURN(auto c, RunCapture({spec.qemu_img_binary, "create", "-q", "-f", "qcow2", "-F", backing_format,
                                             "-b", backing, path, std::to_string(d.size_bytes)}));
    if (c.exit_code == 127) return Status::FailedPrecondition("qemu-img is not installed (package qemu-utils)");
    if (c.exit_code != 0) {
      return Status::Unavailable("disks[" + std::to_string(i) + "]: qemu-img create on backing " + d.backing +
                                 " failed: " + c.output);
    }
  }

  if (spec.hypervisor == VmHypervisor::kLibvirt) {
    VMR_ASSIGN_OR_RETURN(std::string xml, LibvirtXml(effective, def, accel, l->overlays_));
    const std::string xml_path = dir + "/domain.xml";
    l->files_.push_back("domain.xml");
    VMR_RETURN_IF_ERROR(WriteFileAtomic(xml_path, xml, 0600));
    VMR_RETURN_IF_ERROR(WriteFileAtomic(l->state_path(), StateJson(*l, 0, 0, l->files_).dump(2) + "\n", 0600));
    // Recorded before the create: a crash after it leaves a state whose
    // Adopt finds the domain by its uuid.
    domain_created = true;
    Status created = CreateReplicaDomain(spec.libvirt_uri, xml, def.name, def.uuid);
    if (!created.ok()) {
      // FailedPrecondition: another domain has the name or uuid, or an
      // image is locked; either way libvirt started nothing of ours (and
      // the destroy would find nothing of ours anyway: the owner check).
      if (created.code() == Code::kFailedPrecondition) domain_created = false;
      WriteFileAtomic(l->qemu_log(), created.ToString() + "\n", 0600).IgnoreError();
      return created;
    }
    l->pid_ = LibvirtPid(def.name);
    for (const auto& d : spec.disks) {
      if (d.nbd_reconnect_delay_s > 0 && IsNbdUri(d.backing)) {
        spdlog::warn("VM {}: libvirt has no NBD reconnect setting: a restart of the NBD server fails the guest's "
                     "reads of blocks its overlay does not hold",
                     def.name);
        break;
      }
    }
    spdlog::info("VM {} ({}): libvirt domain started on {} with {} (qemu pid {}), run dir {}", l->name_, l->uuid_,
                 spec.libvirt_uri, VmAccelName(accel), l->pid_, dir);
    cleanup.armed = false;
    return l;
  }

  std::vector<std::string> args = QemuArgs(effective, def, accel, l->overlays_);
  std::vector<char*> argv;
  argv.reserve(args.size() + 1);
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string log_path = l->qemu_log();
  int log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (log_fd < 0) return Status::IOError("open " + log_path + ": " + std::strerror(errno));
  // The child waits for one byte on `go` before it execs QEMU: the parent
  // sends it once vm.json names the child's pid. If the parent dies first,
  // the child reads EOF and exits, so no QEMU ever runs unrecorded.
  int go[2];
  if (::pipe2(go, O_CLOEXEC) != 0) {
    int err = errno;
    ::close(log_fd);
    return Status::IOError(std::string("pipe: ") + std::strerror(err));
  }
  pid_t pid = ::fork();
  if (pid < 0) {
    int err = errno;
    ::close(log_fd);
    ::close(go[0]);
    ::close(go[1]);
    return Status::IOError(std::string("fork: ") + std::strerror(err));
  }
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec. Its own session, so
    // it outlives the daemon and no terminal signal meant for it arrives.
    ResetSignalsForExec();
    ::setsid();
    ::close(go[1]);
    char byte = 0;
    ssize_t n;
    do {
      n = ::read(go[0], &byte, 1);
    } while (n < 0 && errno == EINTR);
    if (n != 1) ::_exit(126);
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, 0);
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
    ::close_range(3, ~0U, 0);  // descriptors other libraries left without O_CLOEXEC
    ::execvp(argv[0], argv.data());
    static const char kMsg[] = "exec of qemu failed\n";
    ssize_t ignored = ::write(2, kMsg, sizeof(kMsg) - 1);
    (void)ignored;
    ::_exit(127);
  }
  ::close(log_fd);
  ::close(go[0]);
  l->pid_ = pid;
  l->child_ = true;
  auto info = ReadProcInfo(pid);
  Status recorded =
      info ? WriteFileAtomic(l->state_path(), StateJson(*l, pid, info->start_ticks, l->files_).dump(2) + "\n", 0600)
           : Status::IOError("the child process vanished");
  if (recorded.ok()) {
    l->start_ticks_ = info->start_ticks;
    const char byte = 1;
    if (::write(go[1], &byte, 1) != 1) recorded = Status::IOError(std::string("pipe: ") + std::strerror(errno));
  }
  ::close(go[1]);  // without the byte the child exits
  VMR_RETURN_IF_ERROR(recorded);
  spdlog::info("VM {} ({}): qemu pid {} started with {}, run dir {}", l->name_, l->uuid_, pid, VmAccelName(accel), dir);

  const auto deadline = Clock::now() + spec.start_timeout;
  Status last = Status::Timeout("no QMP greeting");
  for (;;) {
    if (!l->IsRunning()) {
      return Status::IOError("qemu exited during start: " + Tail(log_path, 2000));
    }
    QmpClientOptions qo;
    qo.connect_timeout = std::chrono::milliseconds(2000);
    auto client = QmpClient::Connect(l->qmp_socket(), qo);
    if (client.ok()) break;  // disconnects here; the monitor accepts the next client
    last = client.status();
    if (Clock::now() >= deadline) {
      return Status::Timeout("qemu did not answer on QMP (" + last.ToString() + "): " + Tail(log_path, 2000));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  cleanup.armed = false;
  return l;
}

Result<std::unique_ptr<VmLauncher>> VmLauncher::Adopt(const std::string& run_dir) {
  std::string dir = run_dir;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  const std::string state_path = dir + "/" + kStateFile;
  if (!Exists(state_path)) return Status::NotFound("no VM state in " + dir);
  VMR_ASSIGN_OR_RETURN(std::string text, ReadFile(state_path, kMaxStateBytes));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  auto bad = [&](const std::string& what) { return Status::Corruption(state_path + ": " + what); };
  if (!j.is_object()) return bad("not a JSON object");
  for (const char* k : {"version", "pid", "start_ticks"}) {
    if (!j.contains(k) || !j[k].is_number_unsigned()) return bad(std::string(k) + ": unsigned integer expected");
  }
  for (const char* k : {"accel", "name", "uuid"}) {
    if (!j.contains(k) || !j[k].is_string()) return bad(std::string(k) + ": string expected");
  }
  for (const char* k : {"overlays", "files"}) {
    if (!j.contains(k) || !j[k].is_array()) return bad(std::string(k) + ": array expected");
    for (const auto& e : j[k]) {
      if (!e.is_string() || !PlainName(e.get<std::string>())) return bad(std::string(k) + ": bad file name");
    }
  }
  if (j.contains("direct_images")) {
    if (!j["direct_images"].is_array()) return bad("direct_images: array expected");
    for (const auto& e : j["direct_images"]) {
      if (!e.is_string() || e.get<std::string>().empty() || e.get<std::string>()[0] != '/' ||
          HasControlChars(e.get<std::string>())) {
        return bad("direct_images: absolute paths expected");
      }
    }
  }
  VmHypervisor hypervisor = VmHypervisor::kQemu;
  std::string libvirt_uri;
  if (j.contains("hypervisor")) {
    if (!j["hypervisor"].is_string()) return bad("hypervisor: string expected");
    if (j["hypervisor"] == "libvirt") {
      hypervisor = VmHypervisor::kLibvirt;
      if (!j.contains("libvirt_uri") || !j["libvirt_uri"].is_string() ||
          j["libvirt_uri"].get<std::string>().empty() || HasControlChars(j["libvirt_uri"].get<std::string>())) {
        return bad("libvirt_uri: string expected");
      }
      libvirt_uri = j["libvirt_uri"].get<std::string>();
    } else if (j["hypervisor"] != "qemu") {
      return bad("hypervisor: qemu or libvirt expected");
    }
  }
  if (j["version"].get<uint64_t>() != kStateVersion) return bad("unknown version");
  const uint64_t pid = j["pid"].get<uint64_t>();
  if (pid > 0x3fffffff) return bad("pid out of range");  // 0: QEMU was never started
  const std::string accel = j["accel"].get<std::string>();
  if (accel != "kvm" && accel != "tcg") return bad("accel: kvm or tcg expected");

  std::unique_ptr<VmLauncher> l(new VmLauncher());
  l->run_dir_ = dir;
  l->name_ = j["name"].get<std::string>();
  l->uuid_ = j["uuid"].get<std::string>();
  l->accel_ = accel == "kvm" ? VmAccel::kKvm : VmAccel::kTcg;
  for (const auto& e : j["overlays"]) l->overlays_.push_back(dir + "/" + e.get<std::string>());
  for (const auto& e : j["files"]) l->files_.push_back(e.get<std::string>());
  if (j.contains("direct_images")) {
    for (const auto& e : j["direct_images"]) l->direct_images_.push_back(e.get<std::string>());
  }
  l->pid_ = pid == 0 ? -1 : static_cast<pid_t>(pid);
  l->start_ticks_ = j["start_ticks"].get<uint64_t>();
  l->child_ = false;
  l->hypervisor_ = hypervisor;
  l->libvirt_uri_ = libvirt_uri;
  if (hypervisor == VmHypervisor::kLibvirt) {
    if (l->IsRunning()) {
      l->pid_ = LibvirtPid(l->name_);
      spdlog::info("VM {}: adopted libvirt domain {} in {}", l->name_, l->uuid_, dir);
    } else {
      spdlog::info("VM {}: libvirt domain {} of {} does not run", l->name_, l->uuid_, dir);
    }
    return l;
  }
  // QEMU's own pid file, while it exists, must name the same process.
  auto pid_text = ReadFile(dir + "/" + kPidFile, 64);
  if (pid_text.ok()) {
    std::string t = *pid_text;
    while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
    if (!t.empty() && pid != 0 && t != std::to_string(pid)) {
      return bad("qemu.pid names process " + t + ", the state names " + std::to_string(pid));
    }
  }
  if (l->IsRunning()) {
    spdlog::info("VM {}: adopted qemu pid {} in {}", l->name_, pid, dir);
  } else {
    spdlog::info("VM {}: qemu pid {} of {} is gone", l->name_, pid, dir);
  }
  return l;
}

VmLauncher::~VmLauncher() = default;

bool VmLauncher::IsRunning() {
  if (hypervisor_ == VmHypervisor::kLibvirt) {
    auto active = ReplicaDomainActive(libvirt_uri_, uuid_, run_dir_);
    if (!active.ok()) {
      spdlog::warn("VM {}: cannot ask libvirt whether it runs ({}); taken as running", name_,
                   active.status().ToString());
      return true;
    }
    if (!*active) pid_ = -1;
    return *active;
  }
  if (pid_ <= 0) return false;
  if (child_) {
    int ws = 0;
    pid_t r = ::waitpid(pid_, &ws, WNOHANG);
    if (r == pid_ || (r < 0 && errno == ECHILD)) {
      pid_ = -1;
      return false;
    }
  }
  auto info = ReadProcInfo(pid_);
  if (!info || info->start_ticks != start_ticks_) {
    pid_ = -1;  // gone, or the pid now belongs to another process
    return false;
  }
  if (info->state == 'Z' || info->state == 'X') {
    // The main thread has exited. The process is gone once it can be
    // reaped (we are its parent or subreaper) or, for someone else's child,
    // once no other thread of it is left.
    int ws = 0;
    pid_t r = ::waitpid(pid_, &ws, WNOHANG);
    if (r == 0) return true;  // our child, other threads still exiting
    if (r == pid_ || launcher_internal::TaskCount(pid_) <= 1) {
      pid_ = -1;
      return false;
    }
  }
  return true;
}

Status VmLauncher::WaitGone(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (!IsRunning()) return Status::Ok();
    if (Clock::now() >= deadline) return Status::Timeout("VM " + name_ + " still runs");
    // libvirt is asked over a connection per poll: less often.
    std::this_thread::sleep_for(std::chrono::milliseconds(hypervisor_ == VmHypervisor::kLibvirt ? 200 : 20));
  }
}

Result<std::unique_ptr<QmpChannel>> VmLauncher::OpenQmp() {
  if (hypervisor_ == VmHypervisor::kLibvirt) return OpenReplicaDomainQmp(libvirt_uri_, uuid_, run_dir_);
  QmpClientOptions qo;
  qo.connect_timeout = std::chrono::seconds(30);
  VMR_ASSIGN_OR_RETURN(auto client, QmpClient::Connect(qmp_socket(), qo));
  return std::unique_ptr<QmpChannel>(std::move(client));
}

Status VmLauncher::Stop(std::chrono::milliseconds graceful) {
  if (!IsRunning()) return Status::Ok();
  if (hypervisor_ == VmHypervisor::kLibvirt) {
    Status s = ShutdownReplicaDomain(libvirt_uri_, uuid_, run_dir_);
    if (!s.ok()) spdlog::warn("VM {}: ACPI shutdown through libvirt: {}", name_, s.ToString());
    if (WaitGone(graceful).ok()) {
      spdlog::info("VM {}: libvirt domain powered down", name_);
      return Status::Ok();
    }
    spdlog::info("VM {}: guest ignored the power button; destroying the domain", name_);
    VMR_RETURN_IF_ERROR(DestroyReplicaDomain(libvirt_uri_, uuid_, run_dir_));
    if (WaitGone(kKillWait).ok()) return Status::Ok();
    return Status::Internal("libvirt domain " + uuid_ + " still runs after virDomainDestroy");
  }
  const pid_t pid = pid_;
  QmpClientOptions qo;
  qo.connect_timeout = std::chrono::milliseconds(3000);
  auto qmp = QmpClient::Connect(qmp_socket(), qo);
  if (qmp.ok()) {
    auto r = (*qmp)->Execute("system_powerdown", nullptr, std::chrono::seconds(5));
    if (!r.ok()) spdlog::warn("VM {}: system_powerdown: {}", name_, r.status().ToString());
    if (WaitGone(graceful).ok()) {
      spdlog::info("VM {}: qemu pid {} powered down", name_, pid);
      return Status::Ok();
    }
    // The reply may never come: QEMU exits as it handles quit.
    (*qmp)->Execute("quit", nullptr, std::chrono::seconds(5)).status().IgnoreError();
    spdlog::info("VM {}: guest ignored the power button; quit sent", name_);
  } else {
    spdlog::warn("VM {}: QMP unreachable ({}); SIGTERM", name_, qmp.status().ToString());
    if (IsRunning()) ::kill(pid_, SIGTERM);
  }
  if (WaitGone(kQuitWait).ok()) return Status::Ok();
  spdlog::warn("VM {}: qemu pid {} still runs; SIGKILL", name_, pid);
  if (IsRunning()) ::kill(pid_, SIGKILL);
  if (WaitGone(kKillWait).ok()) return Status::Ok();
  return Status::Internal("qemu pid " + std::to_string(pid) + " survived SIGKILL");
}

Status VmLauncher::DropOverlays() {
  if (IsRunning()) return Status::FailedPrecondition("VM " + name_ + " still runs (pid " + std::to_string(pid_) + ")");
  // The state file goes last: a crash in between leaves a state Adopt finds.
  for (const auto& f : files_) {
    if (f == kStateFile) continue;
    const std::string p = run_dir_ + "/" + f;
    if (::unlink(p.c_str()) != 0 && errno != ENOENT) {
      return Status::IOError("unlink " + p + ": " + std::strerror(errno));
    }
  }
  const std::string state = state_path();
  if (::unlink(state.c_str()) != 0 && errno != ENOENT) {
    return Status::IOError("unlink " + state + ": " + std::strerror(errno));
  }
  return FsyncParentDir(state);
}

Result<std::unique_ptr<OverlayDeltaSource>> VmLauncher::OpenWrites() {
  if (IsRunning()) {
    return Status::FailedPrecondition("VM " + name_ + " still runs: its overlays are read only while it is stopped");
  }
  if (!direct_images_.empty()) {
    return Status::FailedPrecondition("VM " + name_ +
                                      " runs on direct disk wrappers: no overlay (their bitmaps record the writes)");
  }
  return OverlayDeltaSource::Open(overlays_);
}

}  // namespace vmreplica
