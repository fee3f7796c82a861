// The old primary's side of a reverse (docs/failover.md sections 8, 11 and
// 14.1 steps 1 "inspecting" and 2 "adopting"): what A's disks may hold that
// B's do not (A's candidates), and A's images placed as the disk files of a
// replica store. Internal to src/failover: the PrepareReverse job calls
// these; they know nothing of the catalog, the RPC or the job.
//
// Thread safety: free functions without shared state; each call owns the
// processes it starts (qemu-img, a qemu-storage-daemon) and ends them
// before it returns. Two calls for the same images or the same target must
// not run at once (the caller holds the VM's lock).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "vmreplica/replica_store.h"
#include "vmreplica/status.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica {

// ---------------------------------------------------------------- adoption

struct PlacedDisk {
  // Bytes of data in the placed file: the sum of its SEEK_DATA extents
  // (holes and zero ranges qemu-img skipped are not counted; 0 in place).
  uint64_t local_copy_bytes = 0;
  // The image already lives at the target (nothing copied): A's disk is a
  // wrapper of ours (qcow2, data-file-raw) whose data file is the target,
  // or a raw image that is the target file itself.
  bool in_place = false;
};

// Places the content of A's disk `disk` as `<store_dir>/disks/<disk.name>.img`
// (raw, exactly `rounded_size` bytes: the disk's content, zeros after it),
// ready for ReplicaStore::Adopt. `<store_dir>/disks` is created (0700) when
// missing.
//
// In place when the image already is that file (see PlacedDisk::in_place;
// the file must then be `rounded_size` bytes long). Otherwise a local copy:
// `<target>.part` created (0600) sparse at `rounded_size`, `qemu-img convert
// -n --target-is-zero -f <disk.format> -O raw <disk.path> <part>` (holes and
// zeros are not written), fdatasync, rename over the target, fsync of the
// directory. A leftover .part is replaced; a crash leaves at most a .part.
// The original image is only read, with QEMU's locking: it is never changed.
//
// Errors: InvalidArgument (disk name, path or format invalid, size 0 or
// above `rounded_size`, `rounded_size` not a positive multiple of kReplicaBlockSize (4096),
// `store_dir` not absolute, the image missing or not of `disk.size_bytes`
// virtual bytes, an in-place file of another size, a wrapper of the target
// without data-file-raw); FailedPrecondition "image ... is in use by another
// process" (a QEMU holds it for writing) or qemu-img not installed;
// IOError (a system call or qemu-img failed: its message).
// Blocking: the copy reads the whole allocated image.
Result<PlacedDisk> PlaceAdoptedDisk(const VmDiskSpec& disk, const std::string& store_dir, uint64_t rounded_size,
                                    const std::string& qemu_img = "qemu-img");

// ---------------------------------------------------------------- candidates

// A's candidates: the blocks of its disks that may differ from the common
// point (section 8).
struct OldPrimaryCandidates {
  // The tracking bitmaps were found consistent and recording: `ranges` are
  // the dirty blocks since the last acknowledged cut. False: tracking is
  // lost and `ranges` are every block of every disk.
  bool tracking_intact = false;
  // Sorted by (disk, offset), not overlapping, offsets and lengths multiples
  // of 4096 (a disk whose size is not is rounded up past its end); `disk`
  // is the index in `included`.
  std::vector<ReplicaRange> ranges;
  uint64_t candidate_bytes = 0;  // sum of the lengths
};

// Opens the VM's images (AttachVmImages under `run_dir`: the VM must be
// off, the caller checked), builds the ChangeTracker of relationship
// `vm_id` over the `included` disks exactly as a replication cycle does,
// runs Reconcile and CheckTracking. Intact: takes a cut, reads the dirty
// extents of its bitmap g per disk (NbdDirtyExtents, block status only)
// and aborts the cut (g merged back: the bitmaps record the same blocks as
// before). Lost ("resynchronization required", no bitmap of ours, a raw
// image whose QEMU exited, a killed QEMU): every block. Nothing is written
// to the disks. The qemu-storage-daemon is stopped cleanly before the call
// returns (qcow2 bitmaps stored consistent).
//
// More than kRangeListMaxEntries ranges are coarsened (CoarsenRanges) so
// that WriteCandidatesFile can write them.
//
// Errors: InvalidArgument (`included` empty, above kRangeListMaxDisks, a
// disk not in `def` or named twice, `vm_id` empty); errors of
// AttachVmImages (FailedPrecondition "in use by another process",
// NotFound), of the tracker and of NbdDirtyExtents pass through.
Result<OldPrimaryCandidates> InspectOldPrimary(const VmDefinition& def, const std::vector<VmDiskSpec>& included,
                                               const std::string& vm_id, const std::string& run_dir);

// Writes `candidates` as a range list v1 of kind 1 (labels 0) for
// `disk_count` disks (docs/failover.md section 15.1), atomically, mode 0600.
// InvalidArgument when a range breaks a rule of 15.1 (a disk index not
// below `disk_count`, misaligned, unsorted, overlapping); IOError.
Status WriteCandidatesFile(const std::string& path, uint32_t disk_count, const OldPrimaryCandidates& candidates);

// `ranges` (sorted by (disk, offset), not overlapping) with at most
// `max_entries` (>= the number of disks present) entries: neighbours on one
// disk closer than 64 KiB are merged, then 128 KiB, ... until they fit. A
// superset of the input; unchanged when it already fits.
std::vector<ReplicaRange> CoarsenRanges(std::vector<ReplicaRange> ranges, uint64_t max_entries);

}  // namespace vmreplica
