// Starting a VM on the replica host from its stored definition (QEMU
// directly, or a transient libvirt domain: VmHypervisor), and reading back
// what that VM wrote. See docs/failover_vm.md (section 9 for libvirt).
//
// A failover or test VM never writes to the replica store: each of its disks
// is a qcow2 overlay created in the run directory whose backing is a
// point-in-time view of the replica disk (an NBD export, or a file). Reads
// fall through to the view; writes stay in the overlay. The exception is a
// VM whose failover was committed: it runs directly on disk wrappers
// (MakeDiskWrapper, VmLaunchDisk::direct_image) over the store's files, and
// the wrappers' persistent bitmaps record its writes. OverlayDeltaSource
// reads exactly the extents an overlay holds (not its backing), for
// CommitFailover (merge into the base) and failback (send changed blocks).
//
// Lifecycle of a launched VM (one run directory per VM):
//
//    Start(spec) ----> running ----Stop()----> stopped ----DropOverlays()----> (run dir emptied)
//                         |  ^                    ^
//      launcher destroyed |  | Adopt(run_dir)    | QEMU exited by itself
//      (VM keeps running) v  |                    |  (Adopt answers a stopped launcher)
//                      orphaned -----------------+
//
// Files in the run directory (all made by the launcher; DropOverlays removes
// them): <disk>.qcow2 (overlays), qemu.pid (QEMU's -pidfile), vm.json
// (state: pid, process start time, accelerator, name, uuid, files and, for
// direct disks only, "direct_images": their absolute paths), qmp.sock,
// serial.sock, serial.log, qemu.log. Direct images live outside the run
// directory and are never removed by the launcher.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "vmreplica/delta.h"
#include "vmreplica/qmp.h"
#include "vmreplica/status.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica {

enum class VmNetworkMode {
  // No NIC at all (-nic none).
  kNone = 1,
  // One virtio-net NIC per VmNicSpec of the definition, with its stored MAC,
  // each attached to its own QEMU hub (-netdev hubport) that has no other
  // port: frames the guest sends reach nothing (no host, no DHCP, no other
  // VM). The guest still sees the adapters, so settings matched by MAC apply.
  kIsolated = 2,
};

// Which accelerator QEMU runs with.
enum class VmAccel {
  kAuto = 0,  // KVM when ProbeKvm() says it works, else TCG
  kKvm = 1,   // KVM, or FailedPrecondition from Start when ProbeKvm() fails
  kTcg = 2,   // always TCG
};
const char* VmAccelName(VmAccel accel);  // "auto", "kvm", "tcg"

// OK when /dev/kvm is usable here: opens read-write, API version 12, a VM
// and a vCPU can be created, a real-mode `hlt` runs to KVM_EXIT_HLT, and the
// supported CPUID has the baseline features of QEMU's default x86-64 CPU
// model (a nested setup that lacks them hung booting Linux here). The first
// answer is cached for the life of the process. FailedPrecondition with the
// reason otherwise. Thread-safe.
Status ProbeKvm();

struct VmLaunchDisk {
  // What the overlay reads from: an NBD URI ("nbd+unix:///<export>?socket=
  // <path>", "nbd://host:port/<export>") whose data is raw, or an absolute
  // path of an image file. No commas, no control characters. Empty when
  // direct_image is set.
  std::string backing;
  std::string backing_format = "raw";  // "raw" or "qcow2" (files only; NBD is always raw)
  uint64_t size_bytes = 0;             // virtual size of the disk, > 0, a multiple of 512
  // nbd+unix:// backings only: when > 0, QEMU's NBD client reconnects for up
  // to this many seconds when the server goes away (a daemon restart), and
  // guest reads wait instead of failing. The overlay then records the
  // backing as json:{"driver":"nbd","server":{...},"export":...,
  // "reconnect-delay":N} with backing format "nbd". [0, 3600].
  uint32_t nbd_reconnect_delay_s = 0;
  // "" (the default): the disk is an overlay over `backing`, as above.
  // Otherwise the absolute path of an existing qcow2 disk wrapper
  // (MakeDiskWrapper) that QEMU opens read-write itself, with node name
  // "vmr-commit-<disk name>" (the name CommitFailover's live merge gives its
  // target, docs/failover.md section 10.3): no overlay is made, the guest's
  // writes go to the wrapper's data file and its persistent bitmap records
  // them. No commas, no control characters; its virtual size must be
  // size_bytes; backing must be empty and nbd_reconnect_delay_s 0; either
  // every disk of a spec has a direct_image or none has; the disk's name is
  // at most 20 bytes (QEMU's node names are at most 31). The launcher never
  // removes or changes the file (DropOverlays leaves it).
  std::string direct_image;
};

// Makes `wrapper_path` a qcow2 disk wrapper of the raw file `raw_path`
// (docs/failover.md section 10.2): cluster size 1 MiB, data file `raw_path`
// (recorded exactly as given) with data_file_raw=on and preallocated
// metadata, so guest offset = file offset and every byte of data stays in
// the raw file; it carries the persistent, enabled dirty bitmap
// `bitmap_name` (granularity 4096) from its creation. The qemu-img sequence:
// create over a scratch data file <dir>/.<stem>.tmp (a create naming the raw
// file would truncate it), amend the data file to `raw_path`, unlink the
// scratch file, add the bitmap, check the header with qemu-img info, fsync,
// rename <wrapper_path>.part to `wrapper_path`, fsync the directory. The raw
// file is never truncated or written (its size is checked before and after).
//
// Idempotent: a file already at `wrapper_path` that is a qcow2 of
// `size_bytes` with data file `raw_path` (raw) and the bitmap (granularity
// 4096) is OK as it is (whether or not its bitmap is consistent: that is the
// tracker's concern); a leftover .part or scratch file is replaced.
// Errors: InvalidArgument (paths not absolute or with ',' or control
// characters, the same path twice, size 0 or not a multiple of 512, a bad
// bitmap name (empty, over 1023 bytes, control characters, a leading '-'),
// the raw file not a regular file or not exactly `size_bytes` long, the
// wrapper's directory missing), NotFound (no raw file),
// AlreadyExists (another file at `wrapper_path`: it is left alone),
// FailedPrecondition (qemu-img not installed), IOError (a step failed:
// qemu-img's message; nothing is left but the raw file).
// Blocking (runs qemu-img 5 times); not safe against a concurrent call for
// the same wrapper_path.
Status MakeDiskWrapper(const std::string& raw_path, const std::string& wrapper_path, uint64_t size_bytes,
                       const std::string& bitmap_name, const std::string& qemu_img = "qemu-img");

// A read-only disk after the VM's own disks (a cloud-init seed image).
struct VmExtraDrive {
  std::string path;            // absolute path of the image file
  std::string format = "raw";  // "raw" or "qcow2"
};

// Direct kernel boot (-kernel/-initrd/-append) instead of the disks' boot
// loader.
struct VmKernelBoot {
  std::string kernel;  // absolute path
  std::string initrd;  // absolute path, "" = none
  std::string append;  // kernel command line, no control characters
};

enum class VmSerialMode {
  kSocket = 1,  // run_dir/serial.sock (server, one client at a time); also logged to run_dir/serial.log
  kFile = 2,    // run_dir/serial.log only
};

// What runs the VM's QEMU.
enum class VmHypervisor {
  // vmreplica forks QEMU itself (command line of docs/failover_vm.md
  // section 2) and supervises it through its pid and QMP socket.
  kQemu = 1,
  // A transient libvirt domain (libvirt_domain.h): the definition's stored
  // domain XML (or a minimal one) with its disks on the overlays or direct
  // images, its NICs isolated, its serial port on serial.sock/serial.log.
  // libvirt owns QEMU; the launcher reaches it by the domain's uuid.
  kLibvirt = 2,
};
const char* VmHypervisorName(VmHypervisor h);  // "qemu", "libvirt"

struct VmLaunchSpec {
  // The stored definition (name, uuid, memory, vCPUs, disks, NICs). Only
  // those fields are used; kind and sockets of the primary are ignored.
  VmDefinition definition;
  // Existing directory that holds every file of this VM. Short (unix socket
  // paths are limited to 107 bytes: at most 90 bytes here) and without ','.
  std::string run_dir;
  // One per definition.disks, same order. Guest order: /dev/vda, /dev/vdb...
  std::vector<VmLaunchDisk> disks;
  VmNetworkMode network = VmNetworkMode::kNone;
  std::vector<VmExtraDrive> extra_drives;  // after the disks, read-only
  std::optional<VmKernelBoot> kernel_boot;
  std::string name_override;  // "" = definition.name (a test VM: "<name> - Test")
  std::string uuid_override;  // "" = definition.uuid; canonical lower-case form
  VmSerialMode serial = VmSerialMode::kSocket;
  VmAccel accel = VmAccel::kAuto;
  std::string qemu_binary = "qemu-system-x86_64";
  std::string qemu_img_binary = "qemu-img";
  // Deadline for QEMU's QMP monitor to greet after the start. [1 s, 10 min].
  std::chrono::milliseconds start_timeout{60'000};
  VmHypervisor hypervisor = VmHypervisor::kQemu;
  // kLibvirt: the connection URI (qemu:///system). The domain is named
  // after the VM (name_override) with its uuid; the template is
  // definition.libvirt_xml ("" = a minimal domain). qemu_binary is not used
  // (libvirt picks the emulator); disk names become the guest's targets.
  std::string libvirt_uri;
};

class OverlayDeltaSource;

// One VM started by (or adopted by) this process.
//
// Thread safety: not thread-safe; one owner drives it.
// Destroying the object does NOT stop the VM: a restarted daemon finds it
// with Adopt(). QEMU runs in its own session, so it survives the daemon.
class VmLauncher {
 public:
  // Writes vm.json, creates the overlays (qemu-img create -f qcow2 -F <fmt>
  // -b <backing>) or checks the direct images (qemu-img info), records
  // QEMU's pid in vm.json before QEMU execs, starts QEMU and waits for its
  // QMP monitor (connects once, then disconnects: the monitor takes one
  // client at a time).
  // InvalidArgument for a bad spec (naming the field: "disks[1].backing";
  // also a direct image that is not a qcow2 of the disk's size),
  // AlreadyExists when run_dir already holds a VM's state or an overlay
  // (Adopt it, Stop, DropOverlays first), FailedPrecondition for kKvm
  // without a usable KVM, when qemu-img is not installed or when a direct
  // image is held by another process, Unavailable when
  // a backing cannot be opened (qemu-img's message), IOError when QEMU cannot
  // be executed or exits during the start (the end of qemu.log), Timeout
  // when QMP does not answer in time (QEMU is killed). On any error nothing
  // is left running and the files made are removed.
  //
  // Blocks up to start_timeout; forks (the child only execs).
  static Result<std::unique_ptr<VmLauncher>> Start(const VmLaunchSpec& spec);

  // Finds the VM whose state is in run_dir (after a daemon restart). Answers
  // a launcher whether QEMU still runs or not (IsRunning() tells; a process
  // with the same pid but another start time is not ours). NotFound when
  // run_dir holds no state, Corruption when vm.json is malformed.
  static Result<std::unique_ptr<VmLauncher>> Adopt(const std::string& run_dir);

  ~VmLauncher();
  VmLauncher(const VmLauncher&) = delete;
  VmLauncher& operator=(const VmLauncher&) = delete;

  // True while the QEMU process started for this VM exists (reaps it when it
  // is our child and has exited). kLibvirt: while libvirt reports the
  // domain active; true when libvirt cannot be reached (it may still run).
  bool IsRunning();

  // The VM's QMP monitor: its socket (kQemu; one client at a time) or
  // through libvirt (kLibvirt). Unavailable / NotFound when it does not run.
  Result<std::unique_ptr<QmpChannel>> OpenQmp();

  // system_powerdown (ACPI), wait up to `graceful`; then `quit` over QMP
  // (SIGTERM when QMP cannot be reached), wait up to 10 s; then SIGKILL.
  // OK when the VM is stopped at the end (also when it already was).
  Status Stop(std::chrono::milliseconds graceful = std::chrono::seconds(30));

  // Removes every file the launcher made in run_dir (overlays, state,
  // sockets, logs), keeping files of others. FailedPrecondition while the
  // VM runs. Idempotent.
  Status DropOverlays();

  // Reads the extents the overlays hold (all disks, in disk order).
  // FailedPrecondition while the VM runs, and for direct images (no
  // overlay: the wrappers' bitmaps record what the VM wrote).
  Result<std::unique_ptr<OverlayDeltaSource>> OpenWrites();

  VmHypervisor hypervisor() const { return hypervisor_; }
  const std::string& libvirt_uri() const { return libvirt_uri_; }  // kLibvirt
  pid_t pid() const { return pid_; }  // -1 once IsRunning() has seen the VM gone (or it never started)
  VmAccel accel() const { return accel_; }  // kKvm or kTcg: what QEMU runs with
  const std::string& name() const { return name_; }
  const std::string& uuid() const { return uuid_; }
  const std::string& run_dir() const { return run_dir_; }
  // Absolute paths, disk order; empty when the disks are direct images.
  const std::vector<std::string>& overlays() const { return overlays_; }
  // The direct images (VmLaunchDisk::direct_image), disk order; empty when
  // the disks are overlays.
  const std::vector<std::string>& direct_images() const { return direct_images_; }
  std::string qmp_socket() const { return run_dir_ + "/qmp.sock"; }
  std::string serial_socket() const { return run_dir_ + "/serial.sock"; }  // kSocket only
  std::string serial_log() const { return run_dir_ + "/serial.log"; }
  std::string qemu_log() const { return run_dir_ + "/qemu.log"; }
  std::string state_path() const { return run_dir_ + "/vm.json"; }
  std::string pid_path() const { return run_dir_ + "/qemu.pid"; }

 private:
  VmLauncher() = default;
  Status WaitGone(std::chrono::milliseconds timeout);

  std::string run_dir_;
  std::string name_;
  std::string uuid_;
  VmAccel accel_ = VmAccel::kTcg;
  std::vector<std::string> overlays_;
  std::vector<std::string> direct_images_;  // absolute paths outside run_dir, never removed
  std::vector<std::string> files_;  // every file made in run_dir (relative names)
  pid_t pid_ = -1;
  uint64_t start_ticks_ = 0;  // /proc/<pid>/stat field 22: tells our QEMU from a reused pid
  bool child_ = false;        // started by this object (we may waitpid it)
  VmHypervisor hypervisor_ = VmHypervisor::kQemu;
  std::string libvirt_uri_;
};

struct OverlayDeltaOptions {
  // Largest data record. [4 KiB, 64 MiB]. Extents are split at this size.
  uint64_t max_record_bytes = 1u << 20;
  std::string qemu_img_binary = "qemu-img";
};

// Counters since Open(); they only grow.
struct OverlayDeltaStats {
  uint64_t data_bytes = 0;  // bytes read from the overlay files and returned
  uint64_t zero_bytes = 0;  // bytes returned in zero records
  uint64_t data_records = 0;
  uint64_t zero_records = 0;
};

// The extents held by qcow2 overlays themselves (their backing is never
// opened): `qemu-img map --output=json` on each overlay with its backing
// detached lists the allocated extents and where their bytes sit in the file;
// data extents are read from the file with pread, extents the overlay holds
// as zero clusters become zero records. Records come disk by disk in offset
// order; `disk` is the index into `overlays`.
//
// Only for overlays no QEMU has open (qemu-img refuses an image locked by a
// running VM: FailedPrecondition). Every field of qemu-img's answer is
// checked (Corruption when out of range, overlapping or out of order);
// compressed or encrypted clusters (which overlays made here never hold)
// answer NotSupported.
//
// Thread safety: not thread-safe; one consumer.
class OverlayDeltaSource final : public DeltaSource {
 public:
  static Result<std::unique_ptr<OverlayDeltaSource>> Open(std::vector<std::string> overlays,
                                                          OverlayDeltaOptions options = {});
  ~OverlayDeltaSource() override;
  OverlayDeltaSource(const OverlayDeltaSource&) = delete;
  OverlayDeltaSource& operator=(const OverlayDeltaSource&) = delete;

  Result<std::optional<DeltaRecord>> Next() override;
  const OverlayDeltaStats& stats() const { return stats_; }

 private:
  struct Extent {
    uint64_t start = 0;
    uint64_t length = 0;
    bool zero = false;
    uint64_t file_offset = 0;  // data extents
  };
  OverlayDeltaSource(std::vector<std::string> overlays, OverlayDeltaOptions options);
  Status LoadDisk(size_t disk);

  const std::vector<std::string> overlays_;
  const OverlayDeltaOptions options_;
  size_t disk_ = 0;      // disk being read
  bool loaded_ = false;  // extents_ hold disk_'s map
  int fd_ = -1;          // overlays_[disk_] opened read-only
  uint64_t file_size_ = 0;
  std::vector<Extent> extents_;
  size_t extent_ = 0;         // next extent
  uint64_t extent_done_ = 0;  // bytes of extents_[extent_] already returned
  OverlayDeltaStats stats_;
};

}  // namespace vmreplica
