// Domains that the replica host runs through libvirt: failover, test and
// reversed VMs of VMs bound through libvirt on the primary (see
// docs/failover_vm.md section 9). The launcher (vm_launcher.h) uses these;
// the domain XML is the primary's stored XML with every host-specific part
// replaced (RenderReplicaDomainXml).
//
// Domains are transient (virDomainCreateXML): they exist while their QEMU
// runs, and a stopped one leaves nothing in libvirt.
//
// Thread safety: every function opens its own libvirt connection; all may be
// called from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "vmreplica/qmp.h"
#include "vmreplica/status.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica {

// One disk of a replica-host domain.
struct ReplicaDomainDisk {
  // The guest's device name ("vda", "sda"). A disk of the template with this
  // target keeps its bus, address, boot order and serial; otherwise a
  // virtio disk is added.
  std::string target;
  std::string file;      // absolute path of the image QEMU opens
  std::string format;    // "qcow2" or "raw"
  bool read_only = false;
  // What `file` (a qcow2 overlay) reads through; none for a disk wrapper or
  // a seed image. libvirt 9.0 has no NBD reconnect setting: a restart of the
  // NBD server fails the guest's reads of blocks not in its overlay.
  enum class Backing { kNone = 0, kFile = 1, kNbdUnix = 2, kNbdTcp = 3 };
  Backing backing = Backing::kNone;
  std::string backing_path;    // kFile: image path; kNbdUnix: socket path
  std::string backing_format;  // kFile: "raw" or "qcow2"; NBD: "raw"
  std::string nbd_host;        // kNbdTcp
  uint16_t nbd_port = 0;       // kNbdTcp
  std::string nbd_export;      // NBD
  std::string alias;           // "ua-..." user alias (the QMP device id is this)
};

struct ReplicaDomainPlan {
  // The domain XML stored at inspection ("" = a minimal pc domain built
  // from the fields below).
  std::string template_xml;
  std::string name;  // libvirt domain name
  std::string uuid;  // canonical lower case
  uint64_t memory_mib = 0;  // only for the minimal domain
  uint32_t vcpus = 0;       // only for the minimal domain
  bool kvm = false;         // domain type kvm, else qemu (TCG; a host CPU model is dropped)
  std::vector<ReplicaDomainDisk> disks;  // the VM's disks in guest order, then read-only extras
  // NICs kept (matched by MAC with the template's), each a tap device of
  // its own attached to no bridge ("isolated"). Empty: no NIC at all.
  std::vector<VmNicSpec> nics;
  std::string serial_socket;  // "" = the serial port writes serial_log only
  std::string serial_log;     // absolute path
  // Direct kernel boot replacing the template's <kernel>/<initrd>/<cmdline>
  // ("" kernel = the template's boot as it is).
  std::string kernel, initrd, cmdline;
  // The launcher's run directory, written into the domain's <metadata>
  // (element "run", namespace https://vmreplica.dev/xmlns/replica-domain/1,
  // attribute "dir"). The calls below act only on a domain that carries it.
  std::string owner;
};

// The domain XML for `plan`: the template with its name, uuid, type, disks,
// NICs, serial port and security label replaced, and the parts that only
// mean something on the primary host removed (emulator path, removable
// media, host devices, host file systems, TPM, NVRAM path, channels other
// than the guest agent's, fixed graphics ports). The security label is
// static DAC root without relabelling: QEMU reads the daemon's files and
// sockets as the QEMU-direct launcher's QEMU does, and libvirt never changes
// their owner. InvalidArgument for a template that does not parse or is not
// a <domain>, or a plan missing name/uuid/disks/serial_log.
Result<std::string> RenderReplicaDomainXml(const ReplicaDomainPlan& plan);

// Starts a transient domain from `xml`. FailedPrecondition when libvirt
// already has a domain with this name or uuid (it is left alone) or when
// QEMU cannot lock an image ("... is in use by another process"),
// Unavailable when libvirt cannot be reached, IOError with libvirt's
// message when the start fails otherwise.
Status CreateReplicaDomain(const std::string& uri, const std::string& xml, const std::string& name,
                           const std::string& uuid);

// The calls below find the domain by `uuid` and act only when it carries
// the metadata element naming `owner` (ReplicaDomainPlan::owner): a domain
// with that uuid that is someone else's (the operator's own definition of
// the VM, started meanwhile) counts as "not there" and is never shut down,
// destroyed or driven.

// Whether our domain runs (false: no such domain, not ours, or shut off).
// Unavailable when libvirt cannot be reached.
Result<bool> ReplicaDomainActive(const std::string& uri, const std::string& uuid, const std::string& owner);

// The ACPI power button (virDomainShutdown with the ACPI method). OK when
// the domain is gone or not ours.
Status ShutdownReplicaDomain(const std::string& uri, const std::string& uuid, const std::string& owner);

// Stops QEMU at once (virDomainDestroy). OK when the domain is gone or not
// ours.
Status DestroyReplicaDomain(const std::string& uri, const std::string& uuid, const std::string& owner);

// The domain's QMP monitor through libvirt (virDomainQemuMonitorCommand).
// NotFound when our domain does not run.
Result<std::unique_ptr<QmpChannel>> OpenReplicaDomainQmp(const std::string& uri, const std::string& uuid,
                                                         const std::string& owner);

}  // namespace vmreplica
