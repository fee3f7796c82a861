// Binding a VM to the daemon (see docs/tracking.md, "Binding a VM").
//
// A VM reaches vmreplica in one of three ways:
//   kQmp      a QEMU (or qemu-storage-daemon) whose QMP monitor listens on a
//             unix socket; the operator names which block node is which disk.
//   kLibvirt  a libvirt domain; its QEMU monitor is reached through
//             virDomainQemuMonitorCommand (libvirt-qemu), the definition comes
//             from the domain XML.
//   kOffline  qcow2/raw image files of a VM that is not running; vmreplica
//             starts a qemu-storage-daemon on them while it tracks or reads.
//
// InspectVm() turns an operator's request into a validated VmDefinition (what
// the catalog stores as VmRecord.definition_json); AttachVm() turns a stored
// definition into a live handle for the ChangeTracker.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "vmreplica/catalog.h"
#include "vmreplica/qmp.h"
#include "vmreplica/status.h"
#include "vmreplica/tracker.h"

namespace vmreplica {

enum class VmSourceKind { kQmp = 1, kLibvirt = 2, kOffline = 3 };

// "qmp", "libvirt", "offline"; ParseVmSourceKind is the inverse
// (InvalidArgument for anything else).
const char* VmSourceKindName(VmSourceKind kind);
Result<VmSourceKind> ParseVmSourceKind(const std::string& name);

struct VmDiskSpec {
  std::string name;         // [A-Za-z][A-Za-z0-9_]{0,25}, unique in the VM ("vda")
  std::string node_name;    // QEMU format node (kLibvirt: as seen at inspection; re-read at attach)
  std::string path;         // absolute path of the image file
  std::string format;       // "qcow2" or "raw"
  uint64_t size_bytes = 0;  // virtual size, > 0
};

struct VmNicSpec {
  std::string mac;      // "52:54:00:12:34:56" (lower case)
  std::string model;    // "virtio", "" when unknown
  std::string network;  // libvirt network / bridge name, "" when unknown
};

struct VmDefinition {
  std::string name;               // 1..128 bytes, no control characters, no '/'
  std::string uuid;               // canonical lower-case 8-4-4-4-12
  uint64_t memory_mib = 0;        // 1 .. 16 Mi
  uint32_t vcpus = 0;             // 1 .. 4096
  std::vector<VmDiskSpec> disks;  // at least one
  std::vector<VmNicSpec> nics;
  std::string libvirt_xml;  // the domain XML (libvirt kind), stored so the replica can define the same VM
  VmSourceKind kind = VmSourceKind::kQmp;
  std::string qmp_socket;                   // kQmp
  std::string nbd_socket;                   // kQmp: the NBD server QEMU already runs ("" = none; the tracker starts one)
  std::string qga_socket;                   // kQmp: the host end of the guest agent's channel ("" = no agent)
  // Direct kernel boot of a VM that does not boot from its disks (QEMU
  // -kernel/-initrd/-append): a failover VM started from this definition
  // boots the same way. "" = boots from its disks. kQmp and kOffline.
  std::string boot_kernel, boot_initrd, boot_append;
  std::string libvirt_uri, libvirt_domain;  // kLibvirt

  // {"version":1,"kind":"qmp",...}: every field above, always all present
  // when written; "qga_socket" and "boot_*" (added later) may be absent
  // when read.
  nlohmann::json ToJson() const;
  // Strict: unknown version, missing or mistyped members and every value
  // rule above answer InvalidArgument naming the field ("disks[1].format").
  static Result<VmDefinition> FromJson(const nlohmann::json& j);
  // The value rules above (FromJson and InspectVm call it).
  Status Validate() const;
};

struct VmAddRequest {
  VmSourceKind kind = VmSourceKind::kQmp;
  std::string name;
  std::string uuid;  // "" = taken from QEMU/libvirt or generated
  std::string qmp_socket;
  std::string nbd_socket;  // kQmp: unix socket of an NBD server QEMU already runs ("" = none)
  std::string qga_socket;  // kQmp: unix socket of the guest agent's channel ("" = none)
  std::string boot_kernel, boot_initrd, boot_append;  // kQmp/kOffline: direct kernel boot ("" = from disk)
  std::vector<std::pair<std::string, std::string>> disk_nodes;  // kQmp: disk name -> block node
  std::string libvirt_uri = "qemu:///system";
  std::string libvirt_domain;                                    // kLibvirt ("" = name)
  std::vector<std::pair<std::string, std::string>> disk_images;  // kOffline: disk name -> image file
  uint64_t memory_mib = 0;                                       // kQmp/kOffline when QEMU cannot tell
  uint32_t vcpus = 0;
};

// Asks QEMU (query-named-block-nodes, query-name, query-uuid,
// query-memory-size-summary, query-cpus-fast; commands a qemu-storage-daemon
// lacks fall back to the request), libvirt (domain XML parsed with libxml2)
// or qemu-img (offline) and answers the validated definition.
// InvalidArgument names the bad field; NotFound for a missing node, domain or
// file; Unavailable when QEMU/libvirt cannot be reached.
Result<VmDefinition> InspectVm(const VmAddRequest& request);

// A live handle the primary engine uses for one replication cycle or longer.
//
// Thread safety: qmp() is thread-safe (as QmpChannel); the rest are constant.
class AttachedVm {
 public:
  virtual ~AttachedVm() = default;  // detaches (offline: stops the qemu-storage-daemon it started)
  virtual QmpChannel* qmp() = 0;    // for ChangeTracker
  virtual std::vector<TrackedDisk> tracked_disks() const = 0;
  virtual std::string nbd_socket() const = 0;          // "" = the tracker starts the NBD server itself
  virtual std::string export_dir() const = 0;          // a directory the QEMU process can create files/sockets in
  virtual std::string guest_agent_socket() const = 0;  // "" when unknown
};

// kQmp: connects to the socket. kLibvirt: opens the connection, QMP through
// virDomainQemuMonitorCommand. kOffline: starts a qemu-storage-daemon on the
// images under run_dir (persistent bitmaps survive between attaches).
// `run_dir` must exist; keep it short (unix sockets go there).
// Checks that the disks still match the definition (sizes, nodes):
// FailedPrecondition naming the difference. kLibvirt: the domain must be
// running (FailedPrecondition otherwise); export_dir is
// <run_dir>/export, owned by the domain's QEMU user, and the QMP channel
// hands overlay files created there to that user before QEMU opens them.
Result<std::unique_ptr<AttachedVm>> AttachVm(const VmDefinition& def, const std::string& run_dir);

// Whether a VM is running, as far as this host can tell (a planned failover
// needs it off; GetPrimaryVmState reports it). docs/failover.md section 9.1.
enum class VmPower { kUnknown = 0, kRunning = 1, kOff = 2 };
struct VmPowerState {
  VmPower power = VmPower::kUnknown;
  // kQmp: QEMU still runs with the guest stopped (status shutdown,
  // guest-panicked, internal-error): it holds the disks and the bitmaps, so
  // AttachVm (not AttachVmImages) reaches them.
  bool via_qemu = false;
  std::string detail;  // what was seen, for messages and logs
};

// kQmp: connects to qmp_socket (5 s). No socket, or a refused connection:
// off (no QEMU serves it; AttachVmImages then proves that no other process
// writes the images). A greeting plus query-status answering shutdown,
// guest-panicked or internal-error: off and via_qemu. Any other status, a
// failed query-status or a monitor that does not greet in time (busy with
// another client): running. kLibvirt: virDomainGetState; SHUTOFF is off,
// anything else running; no such domain (a transient one that stopped) is
// off; libvirt unreachable is Unavailable. kOffline: off.
Result<VmPowerState> QueryVmPower(const VmDefinition& def);

// Opens the definition's images (whatever its kind) with a
// qemu-storage-daemon under run_dir, node names as an offline attach gives
// them, with QEMU's image locking on: FailedPrecondition "an image of VM X
// is in use by another process" when a QEMU (or libvirt domain) still holds
// one for writing. Persistent bitmaps come with qcow2 images. NotFound when
// an image is missing.
Result<std::unique_ptr<AttachedVm>> AttachVmImages(const VmDefinition& def, const std::string& run_dir);

// Catalog mapping: id = uuid, mode kNone, definition_json = ToJson().dump().
VmRecord ToVmRecord(const VmDefinition& def);
std::vector<DiskRecord> ToDiskRecords(const VmDefinition& def);

}  // namespace vmreplica
