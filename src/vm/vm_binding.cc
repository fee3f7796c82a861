// InspectVm / AttachVm for the QMP and offline kinds, and the dispatch.
#include "vmreplica/fileutil.h"
#include "vmreplica/vm_binding.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "vm/vm_internal.h"

namespace vmreplica {
namespace vm_internal {
namespace {

// Runs argv, capturing stdout (at most 1 MiB). Returns exit code + output.
struct Captured {
  int exit_code = -1;
  std::string out;
};

Result<Captured> RunCapture(const std::vector<std::string>& argv) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return Status::IOError(std::string("pipe: ") + std::strerror(errno));
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    return Status::IOError(std::string("fork: ") + std::strerror(errno));
  }
  if (pid == 0) {
    ResetSignalsForExec();
    ::dup2(fds[1], 1);
    int devnull = ::open("/dev/null", O_WRONLY);
    if (devnull >= 0) ::dup2(devnull, 2);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  Captured c;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fds[0], buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    if (c.out.size() < (1u << 20)) c.out.append(buf, static_cast<size_t>(n));
  }
  ::close(fds[0]);
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  c.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return c;
}

// qemu-img info of an offline image.
Result<VmDiskSpec> InspectImage(const std::string& disk_name, const std::string& path) {
  std::string f = "disk " + disk_name + ": ";
  if (path.empty() || path[0] != '/') return Status::InvalidArgument(f + "image path \"" + path + "\" is not absolute");
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return Status::NotFound(f + "image " + path + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) return Status::InvalidArgument(f + path + " is not a regular file");
  VMR_ASSIGN_OR_RETURN(Captured c, RunCapture({"qemu-img", "info", "--force-share", "--output=json", path}));
  if (c.exit_code == 127) return Status::Unavailable("qemu-img is not installed (package qemu-utils)");
  if (c.exit_code != 0) return Status::InvalidArgument(f + "qemu-img info " + path + " failed");
  nlohmann::json j = nlohmann::json::parse(c.out, nullptr, false);
  if (!j.is_object() || !j.contains("format") || !j["format"].is_string() || !j.contains("virtual-size") ||
      !j["virtual-size"].is_number_unsigned()) {
    return Status::Corruption(f + "qemu-img info gave an unexpected answer");
  }
  VmDiskSpec d;
  d.name = disk_name;
  d.node_name = QsdProcess::FormatNodeName(disk_name);
  d.path = path;
  d.format = j["format"].get<std::string>();
  d.size_bytes = j["virtual-size"].get<uint64_t>();
  if (d.format != "qcow2" && d.format != "raw") {
    return Status::InvalidArgument(f + path + " is " + d.format + "; only qcow2 and raw are supported");
  }
  return d;
}

// Asks QEMU for a value; NotSupported (command missing, e.g. in a
// qemu-storage-daemon) becomes nullopt.
Result<std::optional<nlohmann::json>> Optional(QmpChannel* qmp, const std::string& cmd) {
  auto r = qmp->Execute(cmd, nullptr, std::chrono::seconds(10));
  if (!r.ok()) {
    if (r.status().code() == Code::kNotSupported) return std::optional<nlohmann::json>();
    return r.status();
  }
  return std::optional<nlohmann::json>(std::move(r).value());
}

class QmpAttachedVm : public AttachedVm {
 public:
  QmpAttachedVm(std::unique_ptr<QmpClient> qmp, std::unique_ptr<QsdProcess> qsd, std::vector<VmDiskSpec> disks,
                std::string export_dir, std::string nbd_socket = "", std::string qga_socket = "")
      : qsd_(std::move(qsd)),
        qmp_(std::move(qmp)),
        disks_(std::move(disks)),
        export_dir_(std::move(export_dir)),
        nbd_socket_(std::move(nbd_socket)),
        qga_socket_(std::move(qga_socket)) {}
  ~QmpAttachedVm() override {
    qmp_.reset();
    if (qsd_) (void)qsd_->Stop();  // clean stop: qcow2 keeps its persistent bitmaps
  }
  QmpChannel* qmp() override { return qmp_.get(); }
  std::vector<TrackedDisk> tracked_disks() const override { return ToTracked(disks_); }
  std::string nbd_socket() const override { return qsd_ ? qsd_->nbd_socket() : nbd_socket_; }
  std::string export_dir() const override { return export_dir_; }
  std::string guest_agent_socket() const override { return qga_socket_; }

 private:
  std::unique_ptr<QsdProcess> qsd_;  // offline kind only; destroyed after qmp_
  std::unique_ptr<QmpClient> qmp_;
  const std::vector<VmDiskSpec> disks_;
  const std::string export_dir_;
  const std::string nbd_socket_;  // kQmp: the VM's own NBD server, if any
  const std::string qga_socket_;  // kQmp: the guest agent's channel, if any
};

Result<VmDefinition> InspectQmp(const VmAddRequest& req) {
  if (req.qmp_socket.empty() || req.qmp_socket[0] != '/') {
    return Status::InvalidArgument("qmp_socket: an absolute unix socket path is required");
  }
  if (req.disk_nodes.empty()) return Status::InvalidArgument("disk_nodes: at least one disk=node is required");
  auto client = QmpClient::Connect(req.qmp_socket);
  if (!client.ok()) {
    return Status::Unavailable("cannot reach QEMU at " + req.qmp_socket + ": " + client.status().message());
  }
  QmpChannel* qmp = client->get();
  VmDefinition def;
  def.kind = VmSourceKind::kQmp;
  def.qmp_socket = req.qmp_socket;
  def.nbd_socket = req.nbd_socket;
  def.qga_socket = req.qga_socket;
  def.boot_kernel = req.boot_kernel;
  def.boot_initrd = req.boot_initrd;
  def.boot_append = req.boot_append;
  for (const auto& [disk, node] : req.disk_nodes) {
    if (!ValidDiskName(disk)) {
      return Status::InvalidArgument("disk_nodes: disk name \"" + disk + "\" must match [A-Za-z][A-Za-z0-9_]{0,25}");
    }
    VMR_ASSIGN_OR_RETURN(VmDiskSpec d, DescribeNode(qmp, disk, node));
    def.disks.push_back(std::move(d));
  }
  VMR_ASSIGN_OR_RETURN(auto name, Optional(qmp, "query-name"));
  def.name = req.name;
  if (def.name.empty() && name && name->contains("name") && (*name)["name"].is_string()) {
    def.name = (*name)["name"].get<std::string>();
  }
  if (def.name.empty()) return Status::InvalidArgument("name: required (QEMU has no -name)");
  VMR_ASSIGN_OR_RETURN(auto uuid, Optional(qmp, "query-uuid"));
  def.uuid = req.uuid;
  if (def.uuid.empty() && uuid && uuid->contains("UUID") && (*uuid)["UUID"].is_string()) {
    std::string u = (*uuid)["UUID"].get<std::string>();
    if (u != "00000000-0000-0000-0000-000000000000") def.uuid = u;
  }
  VMR_ASSIGN_OR_RETURN(auto mem, Optional(qmp, "query-memory-size-summary"));
  def.memory_mib = req.memory_mib;
  if (def.memory_mib == 0 && mem && mem->contains("base-memory") && (*mem)["base-memory"].is_number_unsigned()) {
    def.memory_mib = (*mem)["base-memory"].get<uint64_t>() >> 20;
  }
  if (def.memory_mib == 0) return Status::InvalidArgument("memory_mib: QEMU cannot tell; give the memory size");
  VMR_ASSIGN_OR_RETURN(auto cpus, Optional(qmp, "query-cpus-fast"));
  def.vcpus = req.vcpus;
  if (def.vcpus == 0 && cpus && cpus->is_array()) def.vcpus = static_cast<uint32_t>(cpus->size());
  if (def.vcpus == 0) return Status::InvalidArgument("vcpus: QEMU cannot tell; give the number of vCPUs");
  // The NICs, by their MAC (failover IP settings name adapters by MAC):
  // query-rx-filter lists every NIC that has a receive filter (virtio-net,
  // e1000, rtl8139...).
  VMR_ASSIGN_OR_RETURN(auto filters, Optional(qmp, "query-rx-filter"));
  if (filters && filters->is_array()) {
    for (const auto& f : *filters) {
      if (!f.is_object() || !f.contains("main-mac") || !f["main-mac"].is_string()) continue;
      std::string mac = f["main-mac"].get<std::string>();
      std::transform(mac.begin(), mac.end(), mac.begin(), [](unsigned char c) { return std::tolower(c); });
      VmNicSpec nic;
      nic.mac = mac;
      def.nics.push_back(std::move(nic));
      if (def.nics.size() == 64) break;
    }
  }
  return def;
}

Result<VmDefinition> InspectOffline(const VmAddRequest& req) {
  if (req.disk_images.empty()) return Status::InvalidArgument("disk_images: at least one disk=image is required");
  VmDefinition def;
  def.kind = VmSourceKind::kOffline;
  def.boot_kernel = req.boot_kernel;
  def.boot_initrd = req.boot_initrd;
  def.boot_append = req.boot_append;
  def.name = req.name;
  if (def.name.empty()) return Status::InvalidArgument("name: required");
  def.uuid = req.uuid;
  def.memory_mib = req.memory_mib;
  def.vcpus = req.vcpus;
  if (def.memory_mib == 0) return Status::InvalidArgument("memory_mib: required for an offline VM");
  if (def.vcpus == 0) return Status::InvalidArgument("vcpus: required for an offline VM");
  for (const auto& [disk, path] : req.disk_images) {
    if (!ValidDiskName(disk)) {
      return Status::InvalidArgument("disk_images: disk name \"" + disk + "\" must match [A-Za-z][A-Za-z0-9_]{0,25}");
    }
    VMR_ASSIGN_OR_RETURN(VmDiskSpec d, InspectImage(disk, path));
    def.disks.push_back(std::move(d));
  }
  return def;
}

Result<std::unique_ptr<AttachedVm>> AttachQmp(const VmDefinition& def, const std::string& run_dir) {
  auto client = QmpClient::Connect(def.qmp_socket);
  if (!client.ok()) {
    return Status::Unavailable("cannot reach QEMU at " + def.qmp_socket + ": " + client.status().message());
  }
  VMR_RETURN_IF_ERROR(CheckDisks(client->get(), def.disks));
  return std::unique_ptr<AttachedVm>(new QmpAttachedVm(std::move(client).value(), nullptr, def.disks, run_dir, def.nbd_socket,
                                                           def.qga_socket));
}

Result<std::unique_ptr<AttachedVm>> AttachOffline(const VmDefinition& def, const std::string& run_dir) {
  for (const auto& d : def.disks) {
    struct stat st;
    if (::stat(d.path.c_str(), &st) != 0) {
      return Status::NotFound("disk " + d.name + ": image " + d.path + ": " + std::strerror(errno));
    }
  }
  QsdOptions o;
  o.run_dir = run_dir;
  o.nbd_server = true;
  for (const auto& d : def.disks) {
    if (d.node_name != QsdProcess::FormatNodeName(d.name)) {
      return Status::FailedPrecondition("disk " + d.name + ": node \"" + d.node_name +
                                        "\" is not the name an offline attach gives it");
    }
    o.disks.push_back(QsdDisk{d.name, d.path, d.format, false});
  }
  auto qsd = std::make_unique<QsdProcess>(std::move(o));
  VMR_RETURN_IF_ERROR(qsd->Start());
  auto client = QmpClient::Connect(qsd->qmp_socket());
  if (!client.ok()) return client.status();  // qsd's destructor stops it
  Status s = CheckDisks(client->get(), def.disks);
  if (!s.ok()) {
    client->reset();
    (void)qsd->Stop();
    return s;
  }
  return std::unique_ptr<AttachedVm>(new QmpAttachedVm(std::move(client).value(), std::move(qsd), def.disks, run_dir));
}

}  // namespace

Result<std::string> NewUuid() {
  unsigned char b[16];
  int fd = ::open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::IOError(std::string("/dev/urandom: ") + std::strerror(errno));
  ssize_t n = ::read(fd, b, sizeof(b));
  ::close(fd);
  if (n != static_cast<ssize_t>(sizeof(b))) return Status::IOError("/dev/urandom: short read");
  b[6] = static_cast<unsigned char>((b[6] & 0x0f) | 0x40);
  b[8] = static_cast<unsigned char>((b[8] & 0x3f) | 0x80);
  char out[37];
  std::snprintf(out, sizeof(out), "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
                b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
  return std::string(out);
}

Status QmpErrorStatus(const std::string& command, const nlohmann::json& error) {
  std::string cls = error.is_object() && error.contains("class") && error["class"].is_string()
                        ? error["class"].get<std::string>()
                        : "GenericError";
  std::string desc =
      error.is_object() && error.contains("desc") && error["desc"].is_string() ? error["desc"].get<std::string>() : "";
  std::string msg = "QMP " + command + ": " + cls + ": " + desc;
  if (cls == "CommandNotFound") return Status::NotSupported(msg);
  if (cls == "DeviceNotFound") return Status::NotFound(msg);
  return Status::FailedPrecondition(msg);
}

Result<VmDiskSpec> DescribeNode(QmpChannel* qmp, const std::string& disk_name, const std::string& node) {
  VMR_ASSIGN_OR_RETURN(nlohmann::json nodes,
                       qmp->Execute("query-named-block-nodes", {{"flat", true}}, std::chrono::seconds(10)));
  if (!nodes.is_array()) return Status::Corruption("query-named-block-nodes: not an array");
  for (const auto& n : nodes) {
    if (!n.is_object() || !n.contains("node-name") || !n["node-name"].is_string()) continue;
    if (n["node-name"].get<std::string>() != node) continue;
    VmDiskSpec d;
    d.name = disk_name;
    d.node_name = node;
    if (!n.contains("drv") || !n["drv"].is_string() || !n.contains("file") || !n["file"].is_string() ||
        !n.contains("image") || !n["image"].is_object() || !n["image"].contains("virtual-size") ||
        !n["image"]["virtual-size"].is_number_unsigned()) {
      return Status::Corruption("query-named-block-nodes: node " + node + " is described incompletely");
    }
    d.format = n["drv"].get<std::string>();
    d.path = n["file"].get<std::string>();
    d.size_bytes = n["image"]["virtual-size"].get<uint64_t>();
    if (d.format != "qcow2" && d.format != "raw") {
      return Status::InvalidArgument("disk " + disk_name + ": node " + node + " is a " + d.format +
                                     " node; name the qcow2 or raw format node the guest writes through");
    }
    return d;
  }
  return Status::NotFound("disk " + disk_name + ": QEMU has no block node \"" + node + "\"");
}

Status CheckDisks(QmpChannel* qmp, const std::vector<VmDiskSpec>& disks) {
  for (const auto& want : disks) {
    auto got = DescribeNode(qmp, want.name, want.node_name);
    if (!got.ok()) {
      if (got.status().code() == Code::kNotFound) {
        return Status::FailedPrecondition("disk " + want.name + ": node " + want.node_name + " is gone");
      }
      return got.status();
    }
    if (got->format != want.format) {
      return Status::FailedPrecondition("disk " + want.name + ": format is " + got->format + ", defined as " +
                                        want.format);
    }
    if (got->size_bytes != want.size_bytes) {
      return Status::FailedPrecondition("disk " + want.name + ": size is " + std::to_string(got->size_bytes) +
                                        " bytes, defined as " + std::to_string(want.size_bytes));
    }
    if (got->path != want.path) {
      return Status::FailedPrecondition("disk " + want.name + ": image is " + got->path + ", defined as " + want.path);
    }
  }
  return Status::Ok();
}

std::vector<TrackedDisk> ToTracked(const std::vector<VmDiskSpec>& disks) {
  std::vector<TrackedDisk> out;
  for (const auto& d : disks) {
    TrackedDisk t;
    t.name = d.name;
    t.node_name = d.node_name;
    t.size_bytes = d.size_bytes;
    t.qcow2 = d.format == "qcow2";
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace vm_internal

Result<VmDefinition> InspectVm(const VmAddRequest& request) {
  Result<VmDefinition> def = Status::Internal("unset");
  switch (request.kind) {
    case VmSourceKind::kQmp:
      def = vm_internal::InspectQmp(request);
      break;
    case VmSourceKind::kLibvirt:
      def = vm_internal::InspectLibvirt(request);
      break;
    case VmSourceKind::kOffline:
      def = vm_internal::InspectOffline(request);
      break;
    default:
      return Status::InvalidArgument("kind: unknown value " + std::to_string(static_cast<int>(request.kind)));
  }
  if (!def.ok()) return def;
  if (def->uuid.empty()) {
    VMR_ASSIGN_OR_RETURN(def->uuid, vm_internal::NewUuid());
  }
  VMR_RETURN_IF_ERROR(def->Validate());
  return def;
}

Result<std::unique_ptr<AttachedVm>> AttachVm(const VmDefinition& def, const std::string& run_dir) {
  VMR_RETURN_IF_ERROR(def.Validate());
  struct stat st;
  if (run_dir.empty() || ::stat(run_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return Status::InvalidArgument("run_dir: \"" + run_dir + "\" is not an existing directory");
  }
  switch (def.kind) {
    case VmSourceKind::kQmp:
      return vm_internal::AttachQmp(def, run_dir);
    case VmSourceKind::kLibvirt:
      return vm_internal::AttachLibvirt(def, run_dir);
    case VmSourceKind::kOffline:
      return vm_internal::AttachOffline(def, run_dir);
  }
  return Status::InvalidArgument("kind: unknown");
}

Result<VmPowerState> QueryVmPower(const VmDefinition& def) {
  VMR_RETURN_IF_ERROR(def.Validate());
  VmPowerState out;
  switch (def.kind) {
    case VmSourceKind::kOffline:
      out.power = VmPower::kOff;
      out.detail = "an offline VM: no guest runs";
      return out;
    case VmSourceKind::kLibvirt:
      return vm_internal::LibvirtPower(def);
    case VmSourceKind::kQmp:
      break;
  }
  QmpClientOptions qo;
  qo.connect_timeout = std::chrono::seconds(5);
  auto qmp = QmpClient::Connect(def.qmp_socket, qo);
  if (!qmp.ok()) {
    const std::string m = qmp.status().message();
    if (qmp.status().code() == Code::kTimeout) {
      // Something listens but does not greet: QEMU serving another client.
      out.power = VmPower::kRunning;
      out.detail = "QEMU's monitor at " + def.qmp_socket + " is busy (" + m + ")";
    } else if (m.find(std::strerror(ENOENT)) != std::string::npos ||
               m.find(std::strerror(ECONNREFUSED)) != std::string::npos) {
      // No socket, or nobody listening on it: no QEMU serves this monitor.
      // (The caller proves that no other process holds the images.)
      out.power = VmPower::kOff;
      out.detail = "no QEMU answers at " + def.qmp_socket + " (" + m + ")";
    } else {
      out.power = VmPower::kUnknown;
      out.detail = "QEMU's monitor at " + def.qmp_socket + " cannot be reached (" + m + ")";
    }
    return out;
  }
  auto status = (*qmp)->Execute("query-status", nullptr, std::chrono::seconds(5));
  if (!status.ok() || !status->is_object() || !status->contains("status") || !(*status)["status"].is_string()) {
    out.power = VmPower::kRunning;
    out.detail = "a process answers at " + def.qmp_socket + " but query-status failed (" +
                 (status.ok() ? std::string("no status") : status.status().message()) + ")";
    return out;
  }
  const std::string st = (*status)["status"].get<std::string>();
  const bool stopped = st == "shutdown" || st == "guest-panicked" || st == "internal-error";
  out.power = stopped ? VmPower::kOff : VmPower::kRunning;
  out.via_qemu = stopped;
  out.detail = "QEMU status " + st;
  return out;
}

Result<std::unique_ptr<AttachedVm>> AttachVmImages(const VmDefinition& def, const std::string& run_dir) {
  VMR_RETURN_IF_ERROR(def.Validate());
  struct stat st;
  if (run_dir.empty() || ::stat(run_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return Status::InvalidArgument("run_dir: \"" + run_dir + "\" is not an existing directory");
  }
  VmDefinition images = def;
  images.kind = VmSourceKind::kOffline;
  images.qmp_socket.clear();
  images.nbd_socket.clear();
  images.qga_socket.clear();
  images.libvirt_uri.clear();
  images.libvirt_domain.clear();
  images.libvirt_xml.clear();
  for (auto& d : images.disks) d.node_name = QsdProcess::FormatNodeName(d.name);
  auto attached = vm_internal::AttachOffline(images, run_dir);
  // QEMU's image locking: 'Failed to get "write" lock'.
  if (!attached.ok() && attached.status().message().find("Failed to get") != std::string::npos &&
      attached.status().message().find("lock") != std::string::npos) {
    return Status::FailedPrecondition("an image of VM " + def.name + " is in use by another process (" +
                                      attached.status().message() + ")");
  }
  return attached;
}

}  // namespace vmreplica
