// Primary-side change tracking and consistent cuts for one VM, driven over
// QMP (see docs/tracking.md for the full QMP sequence and names).
//
//   Enable ──> [recording g] ──TakeCut──> [cut of g open, recording g+1]
//                   ^                            │            │
//                   │                         Commit        Abort
//                   └── (g := g+1) <─────────────┴────────────┘
//                                 (Abort first merges g into g+1)
//
// Names, for relationship R (tag T = 8 hex digits of a hash of R):
//   bitmap        vmr-R-g<N>           on every disk's format node
//   fleece node   vmrf-T-<disk index>  qcow2 overlay backed by the disk
//   backup job    vmrj-T-<disk index>  blockdev-backup sync=none disk -> fleece
//   export        vmrx-T-<disk name>   NBD export (id and name) of the fleece node
//   overlay file  <export dir>/vmrf-T-<disk name>.qcow2
//   NBD socket    <export dir>/vmr-T.nbd.sock (unless options name one)
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "vmreplica/qmp.h"
#include "vmreplica/status.h"

namespace vmreplica {

// One disk of the VM as QEMU sees it.
struct TrackedDisk {
  std::string name;         // [A-Za-z][A-Za-z0-9_]{0,31}, unique in the VM
  std::string node_name;    // the format node (qcow2 / raw) that the guest writes through
  uint64_t size_bytes = 0;  // virtual size recorded at enable; a change means tracking lost
  bool qcow2 = false;       // qcow2 keeps the bitmap across a clean QEMU restart (persistent)
};

struct TrackerOptions {
  // Bitmap granularity in bytes (power of two, 512 .. 64 MiB). 4 KiB so that
  // small random writes do not inflate a delta (docs/tracking.md).
  uint32_t granularity = 4096;
  // When set, the NBD server is already running on this unix socket (for
  // example a QSD started with --nbd-server) and the tracker only adds exports.
  std::string nbd_socket;
  std::chrono::milliseconds qmp_timeout{10000};
  // Waiting for a cancelled job / deleted export to disappear.
  std::chrono::milliseconds teardown_timeout{10000};
  std::string qemu_img = "qemu-img";
};

// What one disk of an open cut offers to the reader (blockio).
struct CutDisk {
  std::string disk;            // TrackedDisk::name
  std::string export_name;     // NBD export name of the point-in-time view
  std::string socket_path;     // NBD unix socket
  std::string bitmap;          // bitmap g, frozen at the cut
  std::string bitmap_context;  // "qemu:dirty-bitmap:<bitmap>"
  uint64_t size_bytes = 0;
  uint64_t generation = 0;  // g
  // Internal names, for teardown.
  std::string fleece_node;
  std::string job_id;
  std::string overlay_path;
};

// An open cut: the point-in-time views of all disks at one QMP transaction.
struct Cut {
  std::string relationship_id;
  uint64_t generation = 0;  // g: the changes since the previous cut
  std::vector<CutDisk> disks;
};

struct ReconcileReport {
  std::vector<std::string> actions;  // human-readable, one per repair done
  uint64_t generation = 0;           // the recording generation afterwards (0: none found)
};

// Tracks changes of one VM's disks through QEMU dirty bitmaps.
//
// Thread safety: not thread-safe; one owner (the VM's primary engine) calls
// it from one thread at a time. The QmpChannel (a QmpClient or a libvirt
// monitor channel) is borrowed and must outlive the tracker; it may be shared
// with other users (channels are thread-safe).
//
// Errors: QMP errors pass through (Unavailable when QEMU went away);
// FailedPrecondition("resynchronization required: <reason>") when tracking
// is lost; FailedPrecondition for calls in the wrong state (a second Cut
// while one is open). A failed Cut leaves no cut open: whatever it had set
// up is torn down and bitmap g keeps (or regains) every change.
class ChangeTracker {
 public:
  ChangeTracker(QmpChannel* qmp, std::string relationship_id, std::vector<TrackedDisk> disks,
                TrackerOptions options = {});

  // Starts tracking: adds bitmap g1 on every disk (persistent on qcow2) in
  // one transaction. AlreadyExists when bitmaps of this relationship exist
  // already (use Reconcile() to adopt them, or RestartTracking()).
  Status Enable();

  // Adopts the state left in QEMU by an earlier tracker of this relationship
  // (vmreplicad restarted): removes our NBD exports, backup jobs, fleecing
  // nodes and their overlay files, merges every older generation bitmap into
  // the newest one per disk and removes the older ones, re-enables the newest
  // if it was left disabled. Inconsistent bitmaps are left alone (see
  // CheckTracking). Idempotent.
  Result<ReconcileReport> Reconcile();

  // OK when every disk has its current bitmap, consistent and recording,
  // and the disk size is unchanged (also after a Reconcile() that found no
  // bitmap of ours at all: reported as lost); otherwise
  // FailedPrecondition("resynchronization required: <reason>").
  Status CheckTracking();

  // Bytes marked dirty in this relationship's bitmaps on all disks: changes
  // not yet held by the replica (PendingReplicationSize). A region dirty in
  // two generations (a cut open) counts twice.
  Result<uint64_t> PendingBytes();

  // Drops every bitmap of this relationship (also inconsistent ones) and
  // starts afresh with a new generation: the start of a resynchronization,
  // which then compares the whole disks. Refused while a cut is open.
  Status RestartTracking();

  // Stops tracking: drops every bitmap of this relationship on every disk
  // (also inconsistent ones), in one transaction. Refused while a cut is
  // open. Run Reconcile() first so leftovers of a crashed cut are gone.
  Status Disable();

  // Takes a consistent cut of all disks in one QMP transaction and exports
  // the point-in-time views over NBD under `export_dir` (must exist; overlay
  // files and the NBD socket go there). Checks tracking first (and runs
  // Reconcile() first if an earlier failed cut could not be rolled back).
  // On failure no cut is open and no change is lost.
  Result<Cut> TakeCut(const std::string& export_dir);

  // The replica holds the cut durably: tear the views down and drop bitmap g.
  Status Commit(const Cut& cut);
  // The cut failed: tear the views down and merge bitmap g into g+1 first so
  // no change is lost. Safe to call again after a partial failure.
  Status Abort(const Cut& cut);

  // The generation currently recording (0 before Enable / Reconcile).
  uint64_t generation() const { return generation_; }
  bool cut_open() const { return cut_open_; }
  const std::string& relationship_id() const { return relationship_id_; }

  // Names (see the file comment).
  std::string BitmapName(uint64_t generation) const;
  std::string Tag() const { return tag_; }

 private:
  struct BitmapInfo {
    std::string name;
    uint64_t generation = 0;
    bool recording = false;
    bool inconsistent = false;
    bool busy = false;
    uint64_t count = 0;  // dirty bytes
  };
  struct NodeState {
    bool found = false;
    uint64_t size_bytes = 0;
    std::vector<BitmapInfo> bitmaps;  // ours only, by generation ascending
  };

  Status ValidateConfig() const;
  Result<std::vector<NodeState>> QueryDisks();
  Result<nlohmann::json> Qmp(const std::string& cmd, const nlohmann::json& args);
  Status Teardown(const Cut& cut);
  Status RemoveExport(const std::string& id);
  Status CancelJob(const std::string& job_id);
  Status DeleteNode(const std::string& node_name);
  Status EnsureNbdServer(const std::string& socket_path);

  QmpChannel* const qmp_;
  const std::string relationship_id_;
  const std::vector<TrackedDisk> disks_;
  const TrackerOptions options_;
  const std::string tag_;

  uint64_t generation_ = 0;
  bool cut_open_ = false;
  bool nbd_started_ = false;
  bool reconciled_ = false;       // Reconcile() ran (generation_ 0 then means "lost")
  bool needs_reconcile_ = false;  // a failed cut could not be rolled back
};

}  // namespace vmreplica
