// RunReverseSync: B's side of the reverse sync (docs/failover.md section 12).
#include "vmreplica/reverse_sync.h"

#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <utility>

#include "vmreplica/block_hash.h"
#include "vmreplica/nbd_reader.h"
#include "vmreplica/replication.h"  // ConcatDeltaSource
#include "vmreplica/tracker.h"
#include "vmreplica/transfer.h"

namespace vmreplica {
namespace {

constexpr uint32_t kIndex = 0;            // relationship index
constexpr uint64_t kAdoptedPoint = 1;     // A's only point after the adoption
constexpr uint64_t kReverseSequence = 2;  // the sync's log

// A fresh generation (the same few lines as the engine's RandomId).
GenerationId RandomGeneration() {
  std::random_device rd;
  GenerationId g{};
  for (auto& b : g) b = static_cast<uint8_t>(rd());
  return g;
}

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Stops the transfer once `cancelled` answers true (as the engine's
// CancellableSource).
class CancellableSource final : public DeltaSource {
 public:
  CancellableSource(DeltaSource* inner, std::function<bool()> cancelled)
      : inner_(inner), cancelled_(std::move(cancelled)) {}
  Result<std::optional<DeltaRecord>> Next() override {
    if (cancelled_()) return Status::Cancelled("the reverse sync was cancelled");
    return inner_->Next();
  }

 private:
  DeltaSource* inner_;
  std::function<bool()> cancelled_;
};

// Hands out `first` (when set) and then the records of `inner`: the sync
// reads its first record before the log starts, to know whether the log has
// any (its new generation depends on it).
class PeekedSource final : public DeltaSource {
 public:
  PeekedSource(std::optional<DeltaRecord> first, DeltaSource* inner) : first_(std::move(first)), inner_(inner) {}
  Result<std::optional<DeltaRecord>> Next() override {
    if (first_) {
      std::optional<DeltaRecord> r = std::move(first_);
      first_.reset();
      return r;
    }
    return inner_->Next();
  }

 private:
  std::optional<DeltaRecord> first_;
  DeltaSource* inner_;
};

// Bytes of its disk that one run covers (the last block may be short).
uint64_t RunBytes(const BlockHashList& run) {
  const uint64_t start = run.first_block * run.block_size;
  const uint64_t end = std::min(run.disk_size, (run.first_block + run.hashes.size()) * run.block_size);
  return end > start ? end - start : 0;
}

// Bytes of `runs` below offset `end`.
uint64_t RunBytesBelow(const std::vector<BlockHashList>& runs, uint64_t end) {
  uint64_t done = 0;
  for (const auto& r : runs) {
    const uint64_t start = r.first_block * r.block_size;
    if (start >= end) break;
    const uint64_t stop = std::min({r.disk_size, (r.first_block + r.hashes.size()) * r.block_size, end});
    if (stop > start) done += stop - start;
  }
  return done;
}

Status CheckParams(const ReverseSyncParams& p) {
  if (p.vm_id.empty()) return Status::InvalidArgument("reverse sync: empty vm_id");
  if (p.disks.empty()) return Status::InvalidArgument("reverse sync: no disks");
  if (p.channel == nullptr) return Status::InvalidArgument("reverse sync: no channel to the old primary");
  if (p.kind != ReplicationType::kRegular && p.kind != ReplicationType::kPlanned) {
    return Status::InvalidArgument("reverse sync: kind must be Regular (1) or Planned (3)");
  }
  struct stat st {};
  if (p.run_dir.empty() || ::stat(p.run_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return Status::InvalidArgument("reverse sync: run_dir \"" + p.run_dir + "\" is not an existing directory");
  }
  return Status::Ok();
}

// Attaches B's VM: its QEMU when one runs (or still holds the images),
// otherwise a qemu-storage-daemon on the images with image locking.
Result<std::unique_ptr<AttachedVm>> AttachB(const VmDefinition& def, const std::string& run_dir,
                                            const std::string& vm_id) {
  auto power = QueryVmPower(def);
  if (power.ok() && power->power == VmPower::kOff && !power->via_qemu) {
    spdlog::info("VM {}: reverse sync on its images ({})", vm_id, power->detail);
    return AttachVmImages(def, run_dir);
  }
  if (!power.ok()) {
    spdlog::warn("VM {}: its power state is unknown ({}); attaching to its QEMU", vm_id, power.status().ToString());
  }
  return AttachVm(def, run_dir);
}

}  // namespace

Result<ReverseSyncReport> RunReverseSync(const ReverseSyncParams& p) {
  VMR_RETURN_IF_ERROR(CheckParams(p));
  const std::string& vm_id = p.vm_id;
  const uint32_t disk_count = static_cast<uint32_t>(p.disks.size());
  auto cancelled = [&p] { return p.job != nullptr && p.job->CancelRequested(); };

  // A must be exactly as the adoption left it.
  ReplicaClient client(p.channel);
  VMR_ASSIGN_OR_RETURN(ReplicaStatusInfo a, client.GetReplicaStatus(vm_id, kIndex));
  if (a.expected_sequence != kReverseSequence || a.latest_applied != kAdoptedPoint ||
      a.state != ReplicationState::kWaitingToCompleteInitialReplication) {
    return Status::FailedPrecondition(
        "reverse sync of VM " + vm_id + ": the old primary's replica is not at its adopted point (expected log " +
        std::to_string(a.expected_sequence) + ", latest point " + std::to_string(a.latest_applied) + ", state " +
        std::to_string(static_cast<int>(a.state)) + " " + std::string(Name(a.state)) +
        "; the sync needs expected log 2, latest point 1, state 2)");
  }
  if (cancelled()) return Status::Cancelled("the reverse sync was cancelled");

  // 1. Attach, Reconcile, CheckTracking, TakeCut. `attached` outlives the
  // tracker (which borrows its QMP channel).
  VMR_ASSIGN_OR_RETURN(std::unique_ptr<AttachedVm> attached, AttachB(p.definition, p.run_dir, vm_id));
  std::vector<TrackedDisk> tracked;
  const std::vector<TrackedDisk> all = attached->tracked_disks();
  for (const auto& name : p.disks) {
    auto it = std::find_if(all.begin(), all.end(), [&](const TrackedDisk& t) { return t.name == name; });
    if (it == all.end()) return Status::FailedPrecondition("disk " + name + " of VM " + vm_id + " is not attached");
    tracked.push_back(*it);
  }
  for (const auto& t : tracked) {
    // The next generation's bitmap is persistent only on qcow2: on anything
    // else tracking ends with the VM's QEMU (the next cycle resyncs).
    if (!t.qcow2)
      spdlog::warn("VM {}: disk {} is not a qcow2 wrapper: its tracking will not survive QEMU", vm_id, t.name);
  }
  TrackerOptions topt;
  topt.nbd_socket = attached->nbd_socket();
  ChangeTracker tracker(attached->qmp(), vm_id, tracked, topt);
  VMR_ASSIGN_OR_RETURN(ReconcileReport reconciled, tracker.Reconcile());
  for (const auto& action : reconciled.actions) spdlog::info("VM {}: reconcile: {}", vm_id, action);
  bool b_all = false;  // B's candidates are every block
  if (Status t = tracker.CheckTracking(); !t.ok()) {
    if (t.code() != Code::kFailedPrecondition) return t;
    // Tracking lost (QEMU killed, bitmap missing): B's candidates are every
    // block; tracking starts afresh so that the cut has a bitmap and the
    // relationship records from it on.
    spdlog::warn("VM {}: reverse sync: tracking lost ({}); every block is a candidate", vm_id, t.ToString());
    b_all = true;
    VMR_RETURN_IF_ERROR(tracker.RestartTracking());
  }
  VMR_ASSIGN_OR_RETURN(Cut cut, tracker.TakeCut(attached->export_dir()));
  ReverseSyncReport report;
  report.cut_time_ms = NowMs();
  report.sequence = kReverseSequence;
  // Every way out after this point either commits or aborts the cut; the
  // NBD connections to its exports are closed first (QEMU removes an
  // export only once its clients are gone).
  auto abort = [&](const Status& why) -> Status {
    Status s = tracker.Abort(cut);
    if (!s.ok()) spdlog::error("VM {}: aborting cut g{} failed too: {}", vm_id, cut.generation, s.ToString());
    spdlog::warn("VM {}: reverse sync failed: {}", vm_id, why.ToString());
    return why;
  };
  if (cut.disks.size() != disk_count) {
    return abort(Status::Internal("the cut has " + std::to_string(cut.disks.size()) + " disks, not " +
                                  std::to_string(disk_count)));
  }

  // 2. B's candidates: the cut's dirty extents united with the since list's
  // ranges written after the common point.
  std::vector<ReplicaRange> b_cands;
  for (uint32_t i = 0; i < disk_count && !b_all; ++i) {
    const CutDisk& cd = cut.disks[i];
    auto dirty = NbdDirtyExtents(cd.socket_path, cd.export_name, cd.bitmap_context, i);
    if (!dirty.ok()) {
      if (dirty.status().code() != Code::kFailedPrecondition)
        return abort(dirty.status().WithContext("disk " + cd.disk));
      spdlog::warn("VM {}: reverse sync: disk {}: {}; every block is a candidate", vm_id, cd.disk,
                   dirty.status().ToString());
      b_all = true;
      break;
    }
    b_cands = UniteRanges(std::move(b_cands), *dirty);
  }
  if (!b_all && !p.since) {
    spdlog::info("VM {}: reverse sync: no since file (B's history is unknown); every block is a candidate", vm_id);
    b_all = true;
  }
  if (!b_all) {
    auto after = ChangedAfter(*p.since, p.claim.generation, p.claim.common_sequence);
    if (!after.ok()) {
      if (after.status().code() != Code::kFailedPrecondition) return abort(after.status());
      spdlog::info("VM {}: reverse sync: the since file cannot tell B's writes after point {} ({}): every block", vm_id,
                   p.claim.common_sequence, after.status().ToString());
      b_all = true;
    } else {
      // The since file is ours, but it is read from disk: a range outside
      // the disks widens the candidates to every block instead of failing.
      for (const auto& r : *after) {
        if (r.disk >= disk_count || r.offset > cut.disks[r.disk].size_bytes ||
            r.length > cut.disks[r.disk].size_bytes - r.offset) {
          spdlog::warn("VM {}: reverse sync: the since file names a range outside disk {}; every block is a candidate",
                       vm_id, r.disk);
          b_all = true;
          break;
        }
      }
      if (!b_all) b_cands = UniteRanges(std::move(b_cands), *after);
    }
  }
  if (b_all) b_cands.clear();
  report.whole_disks = b_all || !p.claim.tracking_intact;
  uint64_t b_bytes = 0;
  for (const auto& r : b_cands) b_bytes += r.length;
  spdlog::info("VM {}: reverse sync: B's candidates: {}; A's: {}", vm_id,
               b_all ? std::string("every block") : std::to_string(b_bytes) + " bytes",
               p.claim.tracking_intact ? std::to_string(p.claim.candidate_bytes) + " bytes" : "every block");

  // 3./4. Hashes of the united candidates on A, the same blocks read here.
  const bool nothing = !b_all && b_cands.empty() && p.claim.tracking_intact && p.claim.candidate_bytes == 0;
  std::vector<std::vector<BlockHashList>> runs(disk_count);
  if (!nothing) {
    if (cancelled()) return abort(Status::Cancelled("the reverse sync was cancelled"));
    // A's candidates are every block when its tracking was lost: asked for
    // as such, so that the answer does not depend on A's acand file saying it.
    const bool all_blocks = report.whole_disks;
    auto got = client.GetRangeHashes(vm_id, kIndex, kReverseSyncBlockSize, all_blocks ? nullptr : &b_cands, disk_count);
    if (!got.ok()) return abort(got.status().WithContext("GetRangeHashes"));
    if (got->size() != disk_count) {
      return abort(Status::Corruption("GetRangeHashes answered " + std::to_string(got->size()) + " disks, not " +
                                      std::to_string(disk_count)));
    }
    runs = std::move(got).value();
    for (const auto& disk_runs : runs) {
      for (const auto& r : disk_runs) report.candidate_bytes += RunBytes(r);
    }
  }

  // 5. Log 2: one source per disk with runs (the runs in order), the first
  // record read before the log starts (whether it has any decides its new
  // generation). Every NBD connection is closed when this returns, before
  // the cut is committed or aborted (QEMU removes an export only once its
  // clients are gone).
  auto send = [&]() -> Result<SendStats> {
    std::vector<std::unique_ptr<DeltaSource>> parts;
    std::vector<uint32_t> part_disk;
    for (uint32_t i = 0; i < disk_count; ++i) {
      if (runs[i].empty()) continue;
      const CutDisk& cd = cut.disks[i];
      BlockHashOptions ho;
      ho.block_size = kReverseSyncBlockSize;
      auto diff = NbdBlockDiffSource::OpenRuns(cd.socket_path, cd.export_name, i, runs[i], ho);
      if (!diff.ok()) return diff.status().WithContext("disk " + cd.disk);
      parts.push_back(std::move(diff).value());
      part_disk.push_back(i);
    }
    ConcatDeltaSource concat(std::move(parts));
    if (p.job != nullptr && report.candidate_bytes > 0) {
      std::vector<uint64_t> base;  // candidate bytes of the parts before each part
      uint64_t sum = 0;
      for (uint32_t d : part_disk) {
        base.push_back(sum);
        for (const auto& r : runs[d]) sum += RunBytes(r);
      }
      concat.set_observer([&p, &runs, part_disk, base, total = report.candidate_bytes](size_t part, uint64_t end) {
        if (part >= part_disk.size()) return;
        const uint64_t done = base[part] + RunBytesBelow(runs[part_disk[part]], end);
        p.job->SetProgress(static_cast<uint32_t>(done * 99 / total));
      });
    }
    CancellableSource cancellable(&concat, cancelled);
    VMR_ASSIGN_OR_RETURN(std::optional<DeltaRecord> first, cancellable.Next());
    const bool any = first.has_value();
    PeekedSource source(std::move(first), &cancellable);

    DeltaInfo info;
    info.vm_id = vm_id;
    info.relationship_index = kIndex;
    info.sequence = kReverseSequence;
    info.base_generation = p.claim.generation;
    info.new_generation = any ? RandomGeneration() : p.claim.generation;
    info.cut_time_unix_ms = static_cast<uint64_t>(report.cut_time_ms);
    info.kind = p.kind;
    info.initial = false;
    report.generation = info.new_generation;
    SendOptions so;
    so.compress = p.compress;
    so.throttle = p.throttle;
    return client.SendDelta(info, source, so);
  };
  Result<SendStats> sent = send();
  if (!sent.ok()) return abort(sent.status());

  if (Status c = tracker.Commit(cut); !c.ok()) {
    // A holds log 2; bitmap g stays and merges into the recording one at the
    // next Reconcile, so the next delta resends a superset: no loss.
    spdlog::warn("VM {}: commit of cut g{} failed ({}); its changes will be sent again", vm_id, cut.generation,
                 c.ToString());
  }
  report.records = sent->records;
  report.data_bytes = sent->data_bytes;
  report.zero_bytes = sent->zero_bytes;
  report.wire_bytes = sent->wire_bytes;
  spdlog::info(
      "VM {}: reverse sync sent log 2: {} record(s), {} data bytes, {} zero bytes, {} bytes on the wire; {} "
      "candidate bytes hashed on each side{}",
      vm_id, report.records, report.data_bytes, report.zero_bytes, report.wire_bytes, report.candidate_bytes,
      report.whole_disks ? " (whole disks)" : "");
  return report;
}

Result<std::optional<ReverseSyncReport>> ReverseSyncDelivered(const std::shared_ptr<grpc::Channel>& channel,
                                                              const std::string& vm_id) {
  ReplicaClient client(channel);
  VMR_ASSIGN_OR_RETURN(ReplicaStatusInfo st, client.GetReplicaStatus(vm_id, 0));
  if (st.latest_applied < 2 || st.state != ReplicationState::kReplicating || !st.latest_generation) {
    return std::optional<ReverseSyncReport>();
  }
  ReverseSyncReport r;
  r.sequence = st.latest_applied;
  r.generation = *st.latest_generation;
  r.cut_time_ms = st.last_apply_ms;
  return std::optional<ReverseSyncReport>(r);
}

}  // namespace vmreplica
