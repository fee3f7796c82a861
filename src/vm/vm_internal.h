// Private to src/vm: pieces shared by the QMP/offline and libvirt bindings.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "vmreplica/qmp.h"
#include "vmreplica/status.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica::vm_internal {

bool ValidDiskName(const std::string& n);
bool ValidUuid(const std::string& u);
bool ValidVmName(const std::string& n);

// A random version-4 UUID (lower case) from /dev/urandom. IOError when it
// cannot be read.
Result<std::string> NewUuid();

// The format node `node` as query-named-block-nodes describes it: path of the
// image file, format (qcow2/raw; others are InvalidArgument), virtual size.
// NotFound when QEMU has no such node.
Result<VmDiskSpec> DescribeNode(QmpChannel* qmp, const std::string& disk_name, const std::string& node);

// Checks that every disk of `def` is still what it was (node present, format,
// size, path): FailedPrecondition naming the first difference.
Status CheckDisks(QmpChannel* qmp, const std::vector<VmDiskSpec>& disks);

std::vector<TrackedDisk> ToTracked(const std::vector<VmDiskSpec>& disks);

// Maps a QMP "error" member to a Status as QmpClient does.
Status QmpErrorStatus(const std::string& command, const nlohmann::json& error);

// libvirt (vm_libvirt.cc).
Result<VmDefinition> InspectLibvirt(const VmAddRequest& request);
Result<std::unique_ptr<AttachedVm>> AttachLibvirt(const VmDefinition& def, const std::string& run_dir);
// virDomainGetState of the definition's domain (kOff for SHUTOFF, else
// kRunning; kOff when libvirt has no such domain); Unavailable when libvirt
// cannot be reached.
Result<VmPowerState> LibvirtPower(const VmDefinition& def);

}  // namespace vmreplica::vm_internal
