#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <cctype>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "vmreplica/block_hash.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/guest_agent.h"
#include "vmreplica/initial_export.h"
#include "vmreplica/model/transitions.h"
#include "vmreplica/nbd_reader.h"
#include "vmreplica/qmp.h"
#include "vmreplica/replica_store.h"
#include "vmreplica/replication.h"
#include "vmreplica/reverse.h"
#include "vmreplica/reverse_sync.h"
#include "vmreplica/tracker.h"
#include "vmreplica/transfer.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica {
namespace {

constexpr int kPrimaryIndex = 0;
// Resynchronize and seeded initial replication compare blocks of
// ResyncBlockSize() (docs/protocol.md GetBlockHashes): the smallest power
// of two from kMinResyncBlockSize that keeps every disk's hash list (16
// bytes a block) within kResyncListBudget, never above kMaxResyncBlockSize.
// 4 KiB blocks (a guest's write size: a scattered 4 KiB change costs 4 KiB,
// not a 64 KiB block) up to 16 GiB disks; 64 KiB, the size used before
// session 16, from 256 GiB on (the list then grows past the budget, as it
// did).
constexpr uint32_t kMinResyncBlockSize = 4u << 10;
constexpr uint32_t kMaxResyncBlockSize = 64u << 10;
constexpr uint64_t kResyncListBudget = uint64_t{64} << 20;
// GetBlockHashes windows: the replica sends the hashes of each 16 MiB of a
// disk as soon as it hashed them.
constexpr uint32_t kHashWindowBytes = 16u << 20;
// The primary's reads of its cut while comparing.
constexpr uint32_t kResyncReadBytes = 512u << 10;
constexpr uint32_t kResyncReadsInFlight = 8;

uint32_t ResyncBlockSize(const std::vector<TrackedDisk>& disks) {
  uint64_t largest = 0;
  for (const auto& d : disks) largest = std::max(largest, d.size_bytes);
  uint32_t bs = kMinResyncBlockSize;
  while (bs < kMaxResyncBlockSize && (largest + bs - 1) / bs * 16 > kResyncListBudget) bs *= 2;
  return bs;
}

std::string HexId(const GenerationId& g) {
  static const char* kHex = "0123456789abcdef";
  std::string out;
  for (uint8_t b : g) {
    out.push_back(kHex[b >> 4]);
    out.push_back(kHex[b & 15]);
  }
  return out;
}

Result<GenerationId> ParseHexId(const std::string& s) {
  GenerationId g{};
  if (s.size() != 32) return Status::Corruption("generation id '" + s + "' is not 32 hex digits");
  for (size_t i = 0; i < 16; ++i) {
    unsigned v = 0;
    for (int k = 0; k < 2; ++k) {
      char c = s[2 * i + k];
      unsigned d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : 99;
      if (d > 15) return Status::Corruption("generation id '" + s + "' is not 32 hex digits");
      v = v * 16 + d;
    }
    g[i] = static_cast<uint8_t>(v);
  }
  return g;
}

GenerationId RandomId() {
  std::random_device rd;
  GenerationId g{};
  for (auto& b : g) b = static_cast<uint8_t>(rd());
  return g;
}

// The switched reverse record of `vm_id` in `state_dir`, or nullopt.
std::optional<ReverseSendRecord> SwitchedReverse(const std::string& state_dir, const std::string& vm_id) {
  if (state_dir.empty()) return std::nullopt;
  auto raw = ReadReverseRecord(ReverseSendRecordPath(state_dir, vm_id));
  if (!raw.ok()) return std::nullopt;
  auto rec = ReverseSendRecord::Decode(*raw, state_dir);
  if (!rec.ok()) {
    spdlog::error("VM {}: reverse record left alone: {}", vm_id, rec.status().ToString());
    return std::nullopt;
  }
  if (rec->vm_id != vm_id || rec->purpose != "reverse" || rec->phase != "switched" || !rec->claim) return std::nullopt;
  return *rec;
}

// The disks that replicate, in the definition's order (the replica's order).
Result<std::vector<VmDiskSpec>> IncludedDisks(const VmDefinition& def, const RelationshipSettings& s) {
  std::vector<VmDiskSpec> out;
  for (const auto& name : s.included_disks) {
    bool found = std::any_of(def.disks.begin(), def.disks.end(), [&](const VmDiskSpec& d) { return d.name == name; });
    if (!found) return Status::InvalidArgument("IncludedDisks: the VM has no disk named '" + name + "'");
  }
  for (const auto& d : def.disks) {
    if (s.included_disks.empty() ||
        std::find(s.included_disks.begin(), s.included_disks.end(), d.name) != s.included_disks.end()) {
      out.push_back(d);
    }
  }
  if (out.empty()) return Status::InvalidArgument("IncludedDisks: no disk of the VM is included");
  return out;
}

Result<VmDefinition> DefinitionOf(const VmRecord& vm) {
  auto j = nlohmann::json::parse(vm.definition_json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::Corruption("VM " + vm.id + ": its stored definition is not JSON");
  return VmDefinition::FromJson(j);
}

}  // namespace

struct ReplicationEngine::ResyncProgress {
  DeltaInfo info;                     // the log's start (its first cut)
  uint64_t replica_latest = 0;        // the replica's latest point when it hashed
  std::vector<BlockHashList> remote;  // the replica's hashes, per disk
  std::vector<ChunkMark> marks;       // every chunk made, in order
  uint64_t read_bytes = 0;            // read from our disks so far
  uint64_t hole_bytes = 0;            // compared without reading so far
};

namespace {

// Passes `inner`'s records on; when destroyed (ConcatDeltaSource frees a
// part once it is done) adds what `inner` read to `*total`.
class ReadTap : public DeltaSource {
 public:
  ReadTap(std::unique_ptr<DeltaSource> inner, std::function<uint64_t()> read, uint64_t* total,
          std::function<uint64_t()> holes = {}, uint64_t* hole_total = nullptr)
      : inner_(std::move(inner)),
        read_(std::move(read)),
        total_(total),
        holes_(std::move(holes)),
        hole_total_(hole_total) {}
  ~ReadTap() override {
    *total_ += read_();
    if (holes_) *hole_total_ += holes_();
  }
  Result<std::optional<DeltaRecord>> Next() override { return inner_->Next(); }
  void Recycle(std::string buffer) override { inner_->Recycle(std::move(buffer)); }

 private:
  std::unique_ptr<DeltaSource> inner_;
  std::function<uint64_t()> read_;
  uint64_t* total_;
  std::function<uint64_t()> holes_;
  uint64_t* hole_total_;
};

// The records of `inner` (one disk, increasing offsets) below `end`; a
// record crossing it is cut there. Stops reading `inner` at `end`.
class ClipSource : public DeltaSource {
 public:
  ClipSource(std::unique_ptr<DeltaSource> inner, uint64_t end) : inner_(std::move(inner)), end_(end) {}
  Result<std::optional<DeltaRecord>> Next() override {
    if (done_) return std::optional<DeltaRecord>();
    VMR_ASSIGN_OR_RETURN(auto r, inner_->Next());
    if (!r || r->offset >= end_) {
      done_ = true;
      return std::optional<DeltaRecord>();
    }
    if (r->offset + r->length > end_) {
      r->length = end_ - r->offset;
      if (!r->zero) r->data.resize(r->length);
    }
    return r;
  }
  void Recycle(std::string buffer) override { inner_->Recycle(std::move(buffer)); }

 private:
  std::unique_ptr<DeltaSource> inner_;
  const uint64_t end_;
  bool done_ = false;
};

// Turns the records of an initial-copy read (data only: zero extents are
// skipped because a fresh replica reads as zeros) into a complete image:
// every gap between records, and the tail of each disk, becomes a zero
// record. Needed when the full copy lands on a replica that already holds
// data (the copy sent again as an ordinary log). Records of one disk come
// in increasing offset order and disks one after the other.
class GapFillingSource : public DeltaSource {
 public:
  GapFillingSource(DeltaSource* inner, std::vector<uint64_t> disk_sizes)
      : inner_(inner), sizes_(std::move(disk_sizes)), pos_(sizes_.size(), 0) {}
  Result<std::optional<DeltaRecord>> Next() override {
    constexpr uint64_t kMaxZero = 1ull << 30;
    for (;;) {
      if (held_) {
        DeltaRecord& r = *held_;
        if (r.disk >= sizes_.size()) return Status::Internal("gap filler: record of unknown disk");
        // Disks before this one are finished: fill their tails first.
        if (disk_ < r.disk) {
          if (auto z = Tail(disk_)) return z;
          ++disk_;
          continue;
        }
        if (r.offset > pos_[r.disk]) {
          uint64_t len = std::min(r.offset - pos_[r.disk], kMaxZero);
          DeltaRecord z = ZeroRecord(r.disk, pos_[r.disk], len);
          pos_[r.disk] += len;
          return std::optional<DeltaRecord>(std::move(z));
        }
        pos_[r.disk] = std::max(pos_[r.disk], r.offset + r.length);
        std::optional<DeltaRecord> out(std::move(r));
        held_.reset();
        return out;
      }
      if (!inner_done_) {
        VMR_ASSIGN_OR_RETURN(auto next, inner_->Next());
        if (next) {
          held_ = std::move(next);
          continue;
        }
        inner_done_ = true;
      }
      while (disk_ < sizes_.size()) {
        if (auto z = Tail(disk_)) return z;
        ++disk_;
      }
      return std::optional<DeltaRecord>();
    }
  }
  void Recycle(std::string buffer) override { inner_->Recycle(std::move(buffer)); }

 private:
  std::optional<DeltaRecord> Tail(size_t d) {
    constexpr uint64_t kMaxZero = 1ull << 30;
    if (pos_[d] >= sizes_[d]) return std::nullopt;
    uint64_t len = std::min(sizes_[d] - pos_[d], kMaxZero);
    DeltaRecord z = ZeroRecord(static_cast<uint32_t>(d), pos_[d], len);
    pos_[d] += len;
    return z;
  }

  DeltaSource* inner_;
  std::vector<uint64_t> sizes_;
  std::vector<uint64_t> pos_;
  size_t disk_ = 0;
  bool inner_done_ = false;
  std::optional<DeltaRecord> held_;
};

// How RunCycle says that the VM is shut down (the worker skips the cycle).
constexpr const char* kVmIsOff = "the VM is off";

bool IsNetworkError(const Status& s) {
  return s.code() == Code::kUnavailable || s.code() == Code::kTimeout;
}

}  // namespace

// <run_dir>/<the first 16 hex digits of the VM's UUID>: unix sockets go
// there and their paths are limited to 107 bytes, so the full UUID would
// leave too little room. 64 bits keep two VMs of one host apart.
std::string ReplicationEngine::RunDirOf(const std::string& vm_id) const {
  std::string hex;
  for (char c : vm_id) {
    if (c != '-') hex.push_back(c);
    if (hex.size() == 16) break;
  }
  return options_.run_dir + "/" + hex;
}

struct ReplicationEngine::Worker {
  std::string vm_id;
  std::thread thread;
  std::mutex mu;
  std::condition_variable cv;
  bool kicked = false;  // guarded by mu
  bool stop = false;    // guarded by mu
  bool exited = false;  // guarded by mu: the loop returned (relationship gone)
};

ReplicationEngine::ReplicationEngine(Catalog* catalog, JobEngine* jobs, ReplicationEngineOptions options)
    : catalog_(catalog), jobs_(jobs), options_(std::move(options)) {}

ReplicationEngine::~ReplicationEngine() { Stop(); }

int64_t ReplicationEngine::Now() const {
  if (options_.now_ms) return options_.now_ms();
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::chrono::milliseconds ReplicationEngine::IntervalOf(const RelationshipRecord& rel) const {
  if (options_.test_interval_override_ms > 0) return std::chrono::milliseconds(options_.test_interval_override_ms);
  return std::chrono::seconds(rel.settings.replication_interval_s);
}

std::shared_ptr<std::mutex> ReplicationEngine::VmLock(const std::string& vm_id) {
  std::lock_guard<std::mutex> lock(vm_locks_mu_);
  auto& m = vm_locks_[vm_id];
  if (!m) m = std::make_shared<std::mutex>();
  return m;
}

void ReplicationEngine::AcquireSlot() {
  std::unique_lock<std::mutex> lock(slots_mu_);
  const int max = std::max(1, options_.max_parallel_transfers);
  slots_cv_.wait(lock, [&] { return slots_used_ < max; });
  ++slots_used_;
}

void ReplicationEngine::ReleaseSlot() {
  {
    std::lock_guard<std::mutex> lock(slots_mu_);
    --slots_used_;
  }
  slots_cv_.notify_one();
}

// A token bucket shared by all transfers: at most one second of burst.
void ReplicationEngine::Throttle(uint64_t bytes) {
  const double rate =
      static_cast<double>(BandwidthLimitAt(options_.bandwidth_schedule, options_.bandwidth_bytes_per_s, Now()));
  if (rate <= 0) return;
  std::unique_lock<std::mutex> lock(bucket_mu_);
  auto now = std::chrono::steady_clock::now();
  if (bucket_time_ == std::chrono::steady_clock::time_point{}) {
    bucket_time_ = now;
    bucket_tokens_ = rate;
  }
  bucket_tokens_ = std::min(rate, bucket_tokens_ + rate * std::chrono::duration<double>(now - bucket_time_).count());
  bucket_time_ = now;
  bucket_tokens_ -= static_cast<double>(bytes);
  if (bucket_tokens_ < 0) {
    const auto until = std::chrono::steady_clock::now() +
                       std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                           std::chrono::duration<double>(-bucket_tokens_ / rate));
    lock.unlock();  // other transfers may take their turn meanwhile
    // In short steps, so that a stopping daemon is not held up.
    while (!stop_flag_.load() && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(
          until - std::chrono::steady_clock::now(), std::chrono::milliseconds(100)));
    }
  }
}

Result<VmRecord> ReplicationEngine::ResolveVm(const std::string& vm) {
  if (vm.empty()) return Status::InvalidArgument("VM: a name or id is required");
  VMR_ASSIGN_OR_RETURN(auto by_id, catalog_->GetVm(vm));
  if (by_id) return *by_id;
  VMR_ASSIGN_OR_RETURN(auto by_name, catalog_->FindVmByName(vm));
  if (by_name) return *by_name;
  return Status::NotFound("no VM named or with id '" + vm + "' on this host (`vmreplica vm add` binds one)");
}

Status ReplicationEngine::RequirePrimary(const VmRecord& vm, const RelationshipRecord& rel, const char* method,
                                         std::optional<Operation> op) {
  if (rel.local_mode == ReplicationMode::kPrimary) return Status::Ok();
  if (op) {
    auto mode = TableModeFor(vm.mode, rel.index);
    if (mode.ok()) {
      auto t = CheckTransition(*mode, rel.state, *op);
      if (!t.ok()) return t.status().WithContext(std::string(method) + " on the " + std::string(Name(rel.local_mode)) +
                                                 " side of VM " + vm.name);
    }
  }
  return Status::NotSupported(std::string(method) + " on the " + std::string(Name(rel.local_mode)) +
                              " side of VM " + vm.name +
                              " is not supported by this vmreplica build yet; run it on the primary");
}

Status ReplicationEngine::UpdateRelationship(const std::string& vm_id,
                                             const std::function<Status(RelationshipRecord&)>& change) {
  return catalog_->RunInTransaction([&]() -> Status {
    VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, kPrimaryIndex));
    if (!rel) return Status::NotFound("VM " + vm_id + " has no replication relationship");
    VMR_RETURN_IF_ERROR(change(*rel));
    return catalog_->PutRelationship(*rel);
  });
}

// ------------------------------------------------------------------ start/stop

Status ReplicationEngine::Start() {
  VMR_ASSIGN_OR_RETURN(auto rels, catalog_->ListRelationships());
  std::vector<std::string> restart_initial, interrupted_resync;
  std::unique_lock<std::mutex> lock(mu_);
  stopping_ = false;
  stop_flag_ = false;
  for (const auto& rel : rels) {
    if (rel.index != kPrimaryIndex || rel.local_mode != ReplicationMode::kPrimary) continue;
    if (rel.state == ReplicationState::kReplicating || rel.state == ReplicationState::kCritical ||
        rel.state == ReplicationState::kSuspended || rel.state == ReplicationState::kWaitingForStartResynchronize ||
        rel.state == ReplicationState::kResynchronizing || rel.state == ReplicationState::kResynchronizeSuspended) {
      spdlog::info("replication of VM {} resumes after the daemon restart (state {})", rel.vm_id,
                   Name(rel.state));
      if (rel.state == ReplicationState::kResynchronizing) interrupted_resync.push_back(rel.vm_id);
      StartWorkerLocked(rel.vm_id);
    } else if (rel.state == ReplicationState::kWaitingToCompleteInitialReplication &&
               rel.initial_replication_type == InitialReplicationType::kExport && rel.sequence >= 1 &&
               !rel.generation_id.empty()) {
      spdlog::info("VM {}: exported; its deltas replicate while the replica waits for the import", rel.vm_id);
      StartWorkerLocked(rel.vm_id);
    } else if (rel.state == ReplicationState::kWaitingToCompleteInitialReplication) {
      restart_initial.push_back(rel.vm_id);
    }
  }
  lock.unlock();
  // A resync the daemon's end interrupted was not applied (its log is whole
  // or nothing): it waits to be started again (9; auto-resync may do it).
  for (const auto& vm_id : interrupted_resync) {
    Status u = UpdateRelationship(vm_id, [](RelationshipRecord& r) {
      if (r.state == ReplicationState::kResynchronizing) r.state = ReplicationState::kWaitingForStartResynchronize;
      return Status::Ok();
    });
    if (!u.ok()) spdlog::error("VM {}: resetting an interrupted resync: {}", vm_id, u.ToString());
    KickWorker(vm_id);
  }
  // An initial copy interrupted by the daemon's end starts again by itself
  // (a new cut: the replica drops the partial log of the old one; a log it
  // had already staged is kept and the copy goes under the next number).
  auto jobs = restart_initial.empty() ? Result<std::vector<JobRecord>>(std::vector<JobRecord>()) : jobs_->List();
  for (const auto& vm_id : restart_initial) {
    auto vm = catalog_->GetVm(vm_id);
    const std::string name = vm.ok() && *vm ? (*vm)->name : vm_id;
    // A copy scheduled for later keeps its StartTime (from the last initial
    // replication job of the VM); one already due starts now.
    int64_t start_unix_s = 0;
    bool seeded = false;
    std::string export_location;  // the last try was an export (StartReplication type 2)
    int64_t newest_ms = -1;
    if (jobs.ok()) {
      for (const auto& j : *jobs) {
        if (j.type != JobType::kInitialReplicationNetwork && j.type != JobType::kSeededInitialReplication &&
            j.type != JobType::kExportInitialReplication) {
          continue;
        }
        auto p = nlohmann::json::parse(j.parameters_json, nullptr, /*allow_exceptions=*/false);
        if (p.is_discarded() || !p.is_object() || p.value("vm", std::string()) != vm_id) continue;
        if (j.created_ms <= newest_ms) continue;
        newest_ms = j.created_ms;
        export_location = j.type == JobType::kExportInitialReplication && p.contains("location") &&
                                  p["location"].is_string()
                              ? p["location"].get<std::string>()
                              : std::string();
        const auto& at = p.contains("start_time_unix_s") ? p["start_time_unix_s"] : nlohmann::json();
        start_unix_s = at.is_number_integer() ? at.get<int64_t>() : 0;
        seeded = p.contains("seeded") && p["seeded"].is_boolean() && p["seeded"].get<bool>();
      }
    }
    if (start_unix_s <= Now() / 1000) start_unix_s = 0;
    auto job = !export_location.empty()
                   ? StartExportJob(vm_id, name, export_location, NextInitialEpoch(vm_id))
                   : StartInitialJob(vm_id, name, start_unix_s, ReplicationState::kReadyForReplication,
                                     NextInitialEpoch(vm_id), seeded);
    if (job.ok()) {
      spdlog::warn("VM {}: the initial replication was interrupted by a daemon restart; it starts again as job {}",
                   vm_id, job->id);
    } else {
      Status s = UpdateRelationship(vm_id, [](RelationshipRecord& r) {
        if (r.state == ReplicationState::kWaitingToCompleteInitialReplication) {
          r.state = ReplicationState::kReadyForReplication;
        }
        return Status::Ok();
      });
      spdlog::error("VM {}: restarting the interrupted initial replication failed: {}; run StartReplication "
                    "again ({})",
                    vm_id, job.status().ToString(), s.ok() ? "state back to ReadyForReplication" : s.ToString());
    }
  }
  return Status::Ok();
}

void ReplicationEngine::Stop() {
  std::map<std::string, std::unique_ptr<Worker>> workers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    stop_flag_ = true;
    workers.swap(workers_);
  }
  for (auto& [id, w] : workers) {
    {
      std::lock_guard<std::mutex> l(w->mu);
      w->stop = true;
    }
    w->cv.notify_all();
  }
  for (auto& [id, w] : workers) {
    if (w->thread.joinable()) w->thread.join();
  }
}

void ReplicationEngine::StartWorkerLocked(const std::string& vm_id) {
  if (stopping_ || workers_.count(vm_id)) return;
  auto w = std::make_unique<Worker>();
  w->vm_id = vm_id;
  Worker* raw = w.get();
  workers_[vm_id] = std::move(w);
  raw->thread = std::thread([this, raw] { WorkerLoop(raw); });
}

void ReplicationEngine::KickWorker(const std::string& vm_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = workers_.find(vm_id);
  if (it != workers_.end()) {
    bool exited = false;
    {
      std::lock_guard<std::mutex> l(it->second->mu);
      exited = it->second->exited;
      it->second->kicked = true;
    }
    if (!exited) {
      it->second->cv.notify_all();
      return;
    }
    // Its loop ended (the relationship was gone for a while): replace it.
    if (it->second->thread.joinable()) it->second->thread.join();
    workers_.erase(it);
  }
  StartWorkerLocked(vm_id);
}

// ------------------------------------------------------------------ the cycle

Result<CycleReport> ReplicationEngine::RunCycle(const std::string& vm_id, bool initial, JobContext* job, bool resync,
                                                const PlannedCycle* planned) {
  const auto started = std::chrono::steady_clock::now();
  VMR_ASSIGN_OR_RETURN(auto vm_opt, catalog_->GetVm(vm_id));
  if (!vm_opt) return Status::NotFound("VM " + vm_id + " is no longer in the catalog");
  VMR_ASSIGN_OR_RETURN(auto rel_opt, catalog_->GetRelationship(vm_id, kPrimaryIndex));
  if (!rel_opt) return Status::NotFound("VM " + vm_id + " has no replication relationship");
  const RelationshipRecord rel = *rel_opt;
  VMR_ASSIGN_OR_RETURN(auto def, DefinitionOf(*vm_opt));
  VMR_ASSIGN_OR_RETURN(auto included, IncludedDisks(def, rel.settings));

  const std::string run_dir = RunDirOf(vm_id);
  VMR_RETURN_IF_ERROR(MakeDirs(run_dir));
  // A planned failover's cycle brings its own attach (the VM is off: the
  // images opened by a qemu-storage-daemon, or the QEMU that still holds them).
  std::unique_ptr<AttachedVm> attached_owned;
  AttachedVm* attached = planned != nullptr ? planned->attached : nullptr;
  if (attached == nullptr) {
    auto a = AttachVm(def, run_dir);
    bool from_images = false;  // the VM is off: its images opened by a qemu-storage-daemon
    if (!a.ok()) {
      // A VM that is shut down (no QEMU serves it, or its libvirt domain is
      // off) writes nothing: the cycle is skipped, not failed, so a VM shut
      // down for maintenance (or before a planned failover) stays healthy.
      if (def.kind != VmSourceKind::kOffline) {
        auto power = QueryVmPower(def);
        if (power.ok() && power->power == VmPower::kOff && !power->via_qemu) {
          // The proof that nothing writes the images: they can be opened
          // with QEMU's locking (a QEMU started elsewhere holds them).
          auto probe = AttachVmImages(def, run_dir);
          if (probe.ok() && initial) {
            // An initial copy (or resync) of a VM that is off reads its
            // images directly; the tracking bitmaps it starts are stored
            // in qcow2 images when the daemon ends, for the VM's next run.
            spdlog::info("VM {}: the VM is off ({}); its images are read directly", vm_id, power->detail);
            a = std::move(probe);
            from_images = true;
          } else if (probe.ok()) {
            probe->reset();
            return Status::FailedPrecondition(std::string(kVmIsOff) + " (" + power->detail + ")");
          }
          if (!from_images) {
            spdlog::warn("VM {}: its monitor is gone but its images cannot be opened: {}", vm_id,
                         probe.status().ToString());
          }
        }
      }
      if (!from_images) return a.status();
    }
    attached_owned = std::move(a).value();
    attached = attached_owned.get();
  }
  std::vector<TrackedDisk> tracked;
  for (const auto& d : included) {
    bool found = false;
    for (const auto& t : attached->tracked_disks()) {
      if (t.name == d.name) {
        tracked.push_back(t);
        found = true;
      }
    }
    if (!found) return Status::FailedPrecondition("disk " + d.name + " of VM " + vm_id + " is not attached");
  }
  TrackerOptions topt;
  topt.nbd_socket = attached->nbd_socket();
  ChangeTracker tracker(attached->qmp(), vm_id, tracked, topt);
  VMR_ASSIGN_OR_RETURN(auto reconciled, tracker.Reconcile());
  for (const auto& a : reconciled.actions) spdlog::info("VM {}: reconcile: {}", vm_id, a);
  GenerationId generation{};
  // A resync paused or broken earlier may continue its log (decided once
  // the replica's status is known; its tracking is not restarted then).
  std::unique_ptr<ResyncProgress> prior;
  if (initial && resync) {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = resync_progress_.find(vm_id); it != resync_progress_.end()) {
      prior = std::move(it->second);
      resync_progress_.erase(it);
    }
  }
  auto restart_tracking = [&]() -> Status {
    // The initial copy reads everything allocated; tracking starts at its cut.
    if (reconciled.generation != 0) return tracker.RestartTracking();
    return tracker.Enable();
  };
  if (initial && prior) {
    generation = prior->info.new_generation;
  } else if (initial) {
    VMR_RETURN_IF_ERROR(restart_tracking());
    generation = RandomId();
  } else {
    VMR_RETURN_IF_ERROR(tracker.CheckTracking());
    VMR_ASSIGN_OR_RETURN(generation, ParseHexId(rel.generation_id));
    // What waits to be sent, kept for the statistics even if this cycle fails.
    if (auto pending = tracker.PendingBytes(); pending.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      pending_[vm_id] = *pending;
    }
  }

  if (!options_.open_channel) return Status::Internal("replication engine: no channel factory");
  VMR_ASSIGN_OR_RETURN(auto channel, options_.open_channel(rel.settings.recovery_connection_point,
                                                           static_cast<uint16_t>(rel.settings.recovery_server_port)));
  ReplicaClient client(channel);
  VMR_ASSIGN_OR_RETURN(auto replica, client.GetReplicaStatus(vm_id, kPrimaryIndex));
  bool settings_synced = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    replica_state_[vm_id] = replica.state;
    settings_synced = replica_settings_synced_.count(vm_id) != 0;
  }
  // Settings modified while the replica was not reachable (or since this
  // daemon started): the replica gets them now. Not fatal for the cycle.
  if (!settings_synced) {
    // The settings as stored now (a ModifySettings may have run since this
    // cycle read them); marked synced only if they are still the current ones.
    auto fresh = catalog_->GetRelationship(vm_id, kPrimaryIndex);
    const RelationshipSettings sent = fresh.ok() && *fresh ? (*fresh)->settings : rel.settings;
    auto m = client.ModifyReplica(vm_id, kPrimaryIndex, sent);
    auto after = catalog_->GetRelationship(vm_id, kPrimaryIndex);
    const bool current = after.ok() && *after && (*after)->settings.recovery_history == sent.recovery_history &&
                         (*after)->settings.replication_interval_s == sent.replication_interval_s &&
                         (*after)->settings.application_consistent_snapshot_interval_h ==
                             sent.application_consistent_snapshot_interval_h;
    if (m.ok() && current) {
      std::lock_guard<std::mutex> lock(mu_);
      replica_settings_synced_.insert(vm_id);
    } else if (m.ok()) {
      spdlog::info("VM {}: settings changed while they were sent; they are sent again", vm_id);
    } else {
      spdlog::warn("VM {}: the replica did not take the relationship's settings yet: {}", vm_id,
                   m.status().ToString());
    }
  }
  if (replica.last_apply_ms > rel.last_apply_ms) {
    Status s = UpdateRelationship(vm_id, [&](RelationshipRecord& r) {
      r.last_apply_ms = std::max(r.last_apply_ms, replica.last_apply_ms);
      return Status::Ok();
    });
    if (!s.ok()) spdlog::warn("VM {}: recording LastApplyTime failed: {}", vm_id, s.ToString());
  }
  // StartReplication type 2: until the replica imported the export (its
  // latest point is still 0) every cycle renews the import reservation
  // (idempotent) so that the replica stages this log instead of expecting
  // log 1; the first cycle that finds the import done ends state 2.
  if (!initial && rel.initial_replication_type == InitialReplicationType::kExport) {
    if (replica.latest_applied == 0) {
      VMR_ASSIGN_OR_RETURN(replica, client.ReserveImport(vm_id, kPrimaryIndex, generation, /*release=*/false));
    } else if (rel.state == ReplicationState::kWaitingToCompleteInitialReplication) {
      VMR_RETURN_IF_ERROR(UpdateRelationship(vm_id, [&](RelationshipRecord& r) {
        if (r.state == ReplicationState::kWaitingToCompleteInitialReplication) {
          r.state = ReplicationState::kReplicating;
          spdlog::info("VM {}: the replica imported the initial copy: state {} -> {}", vm_id,
                       Name(ReplicationState::kWaitingToCompleteInitialReplication),
                       Name(ReplicationState::kReplicating));
        }
        return Status::Ok();
      }));
    }
  }
  // A copy over the link while the replica still waits for an import it
  // will never get (an export given up) or holds logs of an earlier try
  // but no point: those are released first, so the copy goes as log 1.
  if (initial && replica.latest_applied == 0 && replica.expected_sequence > 1) {
    spdlog::info("VM {}: the replica holds staged logs or an import reservation but no point; releasing them",
                 vm_id);
    VMR_ASSIGN_OR_RETURN(replica, client.ReserveImport(vm_id, kPrimaryIndex, GenerationId{}, /*release=*/true));
  }
  // The replica already holds a log although we never recorded the initial
  // copy as done (we crashed between its acknowledgement and our record, or
  // an earlier copy was cancelled after it was staged): the full copy goes
  // as an ordinary log under the next number. It is a superset of any change.
  const bool initial_log = initial && replica.expected_sequence <= 1;
  // The replica expects a log we already sent and it acknowledged: it lost
  // logs (a restored or rolled-back replica). Those changes are gone from
  // our bitmaps, so a delta would silently miss them: tracking is lost.
  if (!initial && replica.expected_sequence <= rel.sequence) {
    return Status::FailedPrecondition("resynchronization required: the replica expects log " +
                                      std::to_string(replica.expected_sequence) + " but logs up to " +
                                      std::to_string(rel.sequence) + " were acknowledged (out of sequence)");
  }
  // Resync: the replica's hashes of its latest image (a continued log: the
  // ones its first attempt got; otherwise fetched below while this side
  // compares).
  std::vector<BlockHashList> remote;
  std::optional<ChunkMark> continuation;
  if (prior) {
    // The replica must hold the first chunks of that very log and nothing
    // newer: same latest point (it hashed that image), the log still
    // expected, and our tracking intact since the log's first cut (its
    // bitmap holds every write since then).
    const bool same = !initial_log && replica.latest_applied == prior->replica_latest &&
                      replica.expected_sequence == prior->info.sequence &&
                      replica.partial_sequence == prior->info.sequence && replica.partial_chunks >= 1 &&
                      replica.partial_chunks <= prior->marks.size() && prior->remote.size() == tracked.size();
    Status tracking = same ? tracker.CheckTracking() : Status::FailedPrecondition("not continued");
    if (same && tracking.ok()) {
      continuation = prior->marks[replica.partial_chunks - 1];
      prior->marks.resize(replica.partial_chunks);
      remote = prior->remote;
      spdlog::info("VM {}: the resynchronization continues its log {} after chunk {} (disk {} at {})", vm_id,
                   prior->info.sequence, continuation->index, continuation->last_disk, continuation->last_end);
    } else {
      spdlog::info("VM {}: the resynchronization starts over (the replica holds {} chunk(s) of log {}, latest {}; {})",
                   vm_id, replica.partial_chunks, replica.partial_sequence, replica.latest_applied,
                   tracking.ToString());
      prior.reset();
      VMR_RETURN_IF_ERROR(restart_tracking());
      generation = RandomId();
    }
  }
  // Seeded (no log applied yet): the replica's disks hold the copy its
  // operator registered; a resync: its latest image. Either way only
  // blocks that differ travel, so the result is exact. The replica hashes
  // its disks while this side reads its cut: each window of its hashes is
  // compared as soon as it arrives (docs/protocol.md "GetBlockHashes"), so
  // the two passes overlap and each side reads its disks once.
  std::shared_ptr<HashListFeed> feed;
  std::unique_ptr<BlockHashFetch> fetch;
  // Set when SendDelta gives up while its chunk-making thread may still be
  // reading the sources (SendOptions::abandon): they stop as if cancelled.
  std::atomic<bool> send_abandoned{false};
  auto cancelled = [this, job, &send_abandoned] {
    return send_abandoned.load() || stop_flag_.load() || (job && job->CancelRequested());
  };
  if (resync && !continuation) {
    std::vector<uint64_t> sizes;
    for (const auto& t : tracked) sizes.push_back(t.size_bytes);
    const uint32_t bs = ResyncBlockSize(tracked);
    feed = std::make_shared<HashListFeed>(bs, std::move(sizes));
    fetch = client.FetchBlockHashes(vm_id, kPrimaryIndex, std::max<uint32_t>(kHashWindowBytes / bs, 1), feed);
    // The replica applies its staged logs, checks its state and refuses to
    // hash while a stream of this VM runs: the first window says it passed
    // all that. Waited for before the cut, so that the cut's fleecing
    // export does not wait for the replica's applies; the log starts after
    // the cut, so never before the replica began hashing.
    if (auto first = feed->Await(0, 1, cancelled); !first.ok()) return first.status();
  }

  CycleReport report;
  report.initial = initial && (!resync || initial_log);
  report.sequence = replica.expected_sequence;
  // An application-consistent point when one is due: the guest's file
  // systems are frozen for the cut and thawed whatever its outcome (a guard
  // thaws on every way out). When the agent does not answer, the point is
  // crash-consistent, the failure is counted and the next attempt waits.
  class FreezeGuard {
   public:
    FreezeGuard(std::string socket, std::chrono::milliseconds timeout, std::string vm_id)
        : socket_(std::move(socket)), timeout_(timeout), vm_id_(std::move(vm_id)) {}
    ~FreezeGuard() {
      if (frozen_) (void)Thaw();
    }
    // Connects and freezes; an error says why the point is not application-consistent.
    Status Freeze() {
      auto c = GuestAgentClient::Connect(socket_, std::min(timeout_, std::chrono::milliseconds(2000)));
      if (!c.ok()) return c.status();
      agent_ = std::move(c).value();
      if (Status ping = agent_->Ping(std::min(timeout_, std::chrono::milliseconds(3000))); !ping.ok()) return ping;
      frozen_ = true;  // from here a thaw is owed, even if the freeze reports a failure or times out
      auto f = agent_->FreezeFileSystems(timeout_);
      if (!f.ok()) {
        Status t = Thaw();
        return t.ok() ? f.status() : f.status().WithContext("and the thaw failed too: " + t.ToString());
      }
      return Status::Ok();
    }
    // Thaws, reconnecting when needed, until the agent reports "thawed"
    // (bounded: a few attempts of the agent timeout each).
    Status Thaw() {
      Status last = Status::Ok();
      for (int attempt = 0; attempt < 3; ++attempt) {
        if (!agent_) {
          auto c = GuestAgentClient::Connect(socket_, std::min(timeout_, std::chrono::milliseconds(2000)));
          if (!c.ok()) {
            last = c.status();
            continue;
          }
          agent_ = std::move(c).value();
        }
        auto t = agent_->ThawFileSystems(timeout_);
        auto st = t.ok() ? agent_->FreezeStatus(timeout_) : Result<std::string>(t.status());
        if (st.ok() && *st == "thawed") {
          frozen_ = false;
          return Status::Ok();
        }
        last = st.ok() ? Status::FailedPrecondition("the agent reports '" + *st + "' after a thaw") : st.status();
        agent_.reset();  // resynchronise on a fresh connection
      }
      spdlog::error("VM {}: the guest's file systems could not be thawed: {}", vm_id_, last.ToString());
      return last;
    }

   private:
    const std::string socket_;
    const std::chrono::milliseconds timeout_;
    const std::string vm_id_;
    std::unique_ptr<GuestAgentClient> agent_;
    bool frozen_ = false;
  };
  std::optional<FreezeGuard> freeze;
  bool frozen = false;
  if (!initial && planned == nullptr && AppConsistentDue(rel)) {
    const std::string sock = attached->guest_agent_socket();
    if (def.kind == VmSourceKind::kLibvirt) {
      // libvirtd holds the agent's channel itself; freezing through libvirt
      // is not implemented yet.
      report.app_consistent_failure = "application-consistent points of libvirt VMs are not supported yet";
    } else if (sock.empty()) {
      report.app_consistent_failure = "the VM has no guest-agent channel (vm add --qga-socket)";
    } else {
      freeze.emplace(sock, options_.guest_agent_timeout, vm_id);
      Status f = freeze->Freeze();
      if (f.ok()) {
        frozen = true;
      } else {
        report.app_consistent_failure = f.ToString();
      }
    }
  }
  auto cut_or = tracker.TakeCut(attached->export_dir());
  report.cut_time_ms = Now();
  if (frozen) {
    Status t = freeze->Thaw();
    if (t.ok() && cut_or.ok()) {
      report.kind = ReplicationType::kApplicationConsistent;
    } else if (!t.ok()) {
      report.app_consistent_failure = "the guest could not be thawed after the cut: " + t.ToString();
    }
  }
  freeze.reset();
  if (planned != nullptr) {
    report.kind = ReplicationType::kPlanned;
    report.planned = true;
  }
  if (!report.app_consistent_failure.empty()) {
    spdlog::warn("VM {}: application-consistent point not taken, crash-consistent instead: {}", vm_id,
                 report.app_consistent_failure);
    std::lock_guard<std::mutex> lock(mu_);
    app_retry_at_[vm_id] = std::chrono::steady_clock::now() + AppConsistentRetryDelay(rel);
  }
  VMR_ASSIGN_OR_RETURN(auto cut, std::move(cut_or));
  auto abort = [&](const Status& why) -> Status {
    Status a = tracker.Abort(cut);
    if (!a.ok()) spdlog::error("VM {}: aborting cut g{} failed too: {}", vm_id, cut.generation, a.ToString());
    return why;
  };

  std::vector<std::unique_ptr<DeltaSource>> parts;
  uint64_t total_bytes = 0;
  std::vector<uint64_t> disk_base;
  // What the resync's sources read (for the job's read_bytes), added up as
  // each source is freed.
  uint64_t read_now = 0, holes_now = 0;
  auto tap_diff = [&read_now, &holes_now](std::unique_ptr<NbdBlockDiffSource> d) -> std::unique_ptr<DeltaSource> {
    const NbdBlockDiffSource* raw = d.get();
    return std::make_unique<ReadTap>(
        std::move(d), [raw] { return raw->stats().bytes_read; }, &read_now,
        [raw] { return raw->stats().hole_bytes; }, &holes_now);
  };
  for (size_t i = 0; i < cut.disks.size(); ++i) {
    const auto& cd = cut.disks[i];
    if (continuation) {
      // Continuing a resync's log after the chunk the replica holds last,
      // which ends at (dP, eP). Before it, everything was compared at the
      // first cut: only what the guest wrote since then (this cut's bitmap)
      // is sent again. The block holding eP (when a record was split there)
      // is sent whole. After it, the blocks are compared with the replica's
      // hashes as usual. Later records overwrite earlier ones of the log.
      auto built = [&]() -> Result<std::unique_ptr<DeltaSource>> {
        const uint32_t dP = continuation->last_disk;
        const uint64_t bs = remote[i].block_size;  // as hashed at the log's start
        const BlockHashList& list = remote[i];
        const uint64_t total_blocks = list.TotalBlocks();
        uint64_t clip = cd.size_bytes, diff_from = total_blocks;
        std::optional<uint64_t> forced;
        if (i == dP) {
          const uint64_t eP = std::min(continuation->last_end, cd.size_bytes);
          clip = eP / bs * bs;
          diff_from = (eP + bs - 1) / bs;
          if (eP % bs != 0) forced = eP / bs;
        } else if (i > dP) {
          clip = 0;
          diff_from = 0;
        }
        std::vector<std::unique_ptr<DeltaSource>> pieces;
        if (clip > 0) {
          VMR_ASSIGN_OR_RETURN(auto dirty, NbdDeltaReader::Open(cd.socket_path, cd.export_name,
                                                                static_cast<uint32_t>(i), cd.bitmap_context));
          const NbdDeltaReader* raw = dirty.get();
          pieces.push_back(std::make_unique<ClipSource>(
              std::make_unique<ReadTap>(std::move(dirty), [raw] { return raw->stats().data_bytes; }, &read_now),
              clip));
        }
        auto diff_range = [&](uint64_t first, uint64_t count, bool force) -> Status {
          BlockHashList sub;
          sub.block_size = list.block_size;
          sub.disk_size = list.disk_size;
          sub.first_block = first;
          if (force) {
            sub.hashes.assign(count, Hash128{~uint64_t{0}, ~uint64_t{0}});  // matches no block: sent
          } else {
            sub.hashes.assign(list.hashes.begin() + static_cast<std::ptrdiff_t>(first - list.first_block),
                              list.hashes.begin() + static_cast<std::ptrdiff_t>(first - list.first_block + count));
          }
          BlockHashOptions ho;
          ho.block_size = list.block_size;
          VMR_ASSIGN_OR_RETURN(auto d, NbdBlockDiffSource::Open(cd.socket_path, cd.export_name,
                                                                static_cast<uint32_t>(i), std::move(sub), ho));
          pieces.push_back(tap_diff(std::move(d)));
          return Status::Ok();
        };
        if (forced) VMR_RETURN_IF_ERROR(diff_range(*forced, 1, /*force=*/true));
        if (diff_from < total_blocks) VMR_RETURN_IF_ERROR(diff_range(diff_from, total_blocks - diff_from, false));
        return std::unique_ptr<DeltaSource>(std::make_unique<ConcatDeltaSource>(std::move(pieces)));
      }();
      if (!built.ok()) {
        parts.clear();
        return abort(built.status().WithContext("disk " + cd.disk));
      }
      disk_base.push_back(total_bytes);
      total_bytes += cd.size_bytes;
      parts.push_back(std::move(*built));
      continue;
    }
    if (resync) {
      BlockHashOptions ho;
      ho.block_size = feed->block_size();
      // qemu-storage-daemon serves 8 reads of 512 KiB in flight about twice
      // as fast as 4 of 1 MiB (measured with nbdcopy, docs/benchmarks.md).
      ho.request_bytes = kResyncReadBytes;
      ho.parallelism = kResyncReadsInFlight;
      auto diff = NbdBlockDiffSource::OpenFed(cd.socket_path, cd.export_name, static_cast<uint32_t>(i), feed, ho,
                                              cancelled);
      if (!diff.ok()) {
        parts.clear();
        return abort(diff.status().WithContext("disk " + cd.disk));
      }
      disk_base.push_back(total_bytes);
      total_bytes += cd.size_bytes;
      parts.push_back(tap_diff(std::move(*diff)));
      continue;
    }
    std::optional<std::string> bitmap;
    if (!initial) bitmap = cd.bitmap_context;
    auto reader = NbdDeltaReader::Open(cd.socket_path, cd.export_name, static_cast<uint32_t>(i), bitmap);
    if (!reader.ok()) {
      parts.clear();  // close the readers opened so far before the exports go
      return abort(reader.status());
    }
    disk_base.push_back(total_bytes);
    total_bytes += cd.size_bytes;
    parts.push_back(std::move(*reader));
  }
  // Owned here so that the NBD connections close before an Abort: QEMU
  // removes an export only once its clients are gone.
  auto concat = std::make_unique<ConcatDeltaSource>(std::move(parts));
  // Stops the transfer when the job is cancelled or the engine stops.
  class CancellableSource : public DeltaSource {
   public:
    CancellableSource(DeltaSource* inner, std::function<bool()> cancelled)
        : inner_(inner), cancelled_(std::move(cancelled)) {}
    Result<std::optional<DeltaRecord>> Next() override {
      if (cancelled_()) return Status::Cancelled("the transfer was cancelled");
      return inner_->Next();
    }
    void Recycle(std::string buffer) override { inner_->Recycle(std::move(buffer)); }

   private:
    DeltaSource* inner_;
    std::function<bool()> cancelled_;
  };
  std::unique_ptr<GapFillingSource> filled;
  DeltaSource* inner = concat.get();
  // A full copy always sends its holes as zero records (cheap: no payload,
  // nothing written over holes on the replica): whatever the replica's
  // disks held before (an earlier copy, a seed), the result is exact.
  if (initial && !resync) {
    std::vector<uint64_t> sizes;
    for (const auto& cd : cut.disks) sizes.push_back(cd.size_bytes);
    filled = std::make_unique<GapFillingSource>(concat.get(), std::move(sizes));
    inner = filled.get();
  }
  // The log ends only once the replica's hash answer ended well: a disk
  // only the replica has, or a list broken after the last one this side
  // needed, fails the log instead of letting it commit.
  class AfterFetch : public DeltaSource {
   public:
    AfterFetch(DeltaSource* inner, BlockHashFetch* fetch) : inner_(inner), fetch_(fetch) {}
    Result<std::optional<DeltaRecord>> Next() override {
      auto r = inner_->Next();
      if (r.ok() && !r->has_value() && fetch_ != nullptr) {
        Status f = fetch_->Wait();
        fetch_ = nullptr;
        if (!f.ok()) return f;
      }
      return r;
    }
    void Recycle(std::string buffer) override { inner_->Recycle(std::move(buffer)); }

   private:
    DeltaSource* inner_;
    BlockHashFetch* fetch_;
  };
  AfterFetch gated(inner, fetch.get());
  if (fetch) inner = &gated;
  CancellableSource source(inner, cancelled);
  ConcatDeltaSource& observed = *concat;
  if (job != nullptr && total_bytes > 0) {
    observed.set_observer([job, &disk_base, total_bytes](size_t part, uint64_t end) {
      job->SetProgress(static_cast<uint32_t>((disk_base[part] + end) * 99 / total_bytes));
    });
  }

  DeltaInfo info;
  info.vm_id = vm_id;
  info.relationship_index = kPrimaryIndex;
  info.sequence = replica.expected_sequence;
  info.base_generation = initial ? GenerationId{} : generation;
  info.new_generation = generation;
  info.cut_time_unix_ms = static_cast<uint64_t>(report.cut_time_ms);
  info.kind = report.kind;
  info.initial = initial_log;
  // A continued resync log keeps its start (the replica matches it with the
  // part it holds): its sequence, generation and first cut's time.
  if (continuation) info = prior->info;
  SendOptions so;
  so.compress = rel.settings.compression_enabled;
  so.throttle = [this](uint64_t bytes) { Throttle(bytes); };
  so.abandon = [&send_abandoned, &fetch] {
    send_abandoned = true;
    if (fetch) fetch->Cancel();  // a source waiting for hash windows or the call's end
  };
  const bool resync_log = resync && !initial_log;
  std::vector<ChunkMark> marks = prior ? prior->marks : std::vector<ChunkMark>();
  if (resync_log) {
    so.continuation = continuation;
    // A chunk of the dirty part of a continuation ends below the point the
    // replica's part already covers: its mark keeps that point, so that a
    // later continuation never compares (instead of resending) blocks the
    // part holds with content of an older cut.
    so.on_chunk = [&marks, floor = continuation](ChunkMark m) {
      if (floor && (m.last_disk < floor->last_disk ||
                    (m.last_disk == floor->last_disk && m.last_end < floor->last_end))) {
        m.last_disk = floor->last_disk;
        m.last_end = floor->last_end;
      }
      marks.push_back(m);
    };
  }
  auto sent = client.SendDelta(info, source, so);
  filled.reset();
  concat.reset();  // every source freed: read_now is complete
  const uint64_t read_bytes = (prior ? prior->read_bytes : 0) + read_now;
  const uint64_t hole_bytes = (prior ? prior->hole_bytes : 0) + holes_now;
  if (fetch) {
    // A log sent whole compared every block and waited for the call's
    // end (AfterFetch). A broken one can be continued only with the
    // replica's whole lists, kept if they came.
    if (!sent.ok()) fetch->Cancel();
    if (Status f = fetch->Wait(); !f.ok() && sent.ok()) {
      spdlog::warn("VM {}: the block hash call ended with an error after every list arrived: {}", vm_id,
                   f.ToString());
    }
    if (!sent.ok()) {
      if (auto lists = feed->Lists(); lists.ok()) remote = std::move(*lists);
    }
  }
  if (!sent.ok()) {
    // The replica keeps the part of the log it holds: the next resync of
    // this VM continues it instead of hashing and reading everything again.
    // Not when the replica lost it (or never had any).
    if (resync_log && !marks.empty() && remote.size() == tracked.size() &&
        sent.status().message().find("lost the partial log") == std::string::npos) {
      auto p = std::make_unique<ResyncProgress>();
      p->info = info;
      p->replica_latest = replica.latest_applied;
      p->remote = std::move(remote);
      p->marks = std::move(marks);
      p->read_bytes = read_bytes;
      p->hole_bytes = hole_bytes;
      std::lock_guard<std::mutex> lock(mu_);
      resync_progress_[vm_id] = std::move(p);
    }
    return abort(sent.status());
  }
  report.read_bytes = read_bytes;
  report.hole_bytes = hole_bytes;
  report.continued_from_chunk = continuation ? continuation->index + 1 : 0;
  if (continuation) {
    report.continued_at_disk = continuation->last_disk;
    report.continued_at_offset = continuation->last_end;
    report.read_bytes_before = prior->read_bytes;
    report.hole_bytes_before = prior->hole_bytes;
  }

  if (Status c = tracker.Commit(cut); !c.ok()) {
    // The replica holds the log; bitmap g stays and merges into g+1 at the
    // next Reconcile, so the next delta resends a superset: no loss.
    spdlog::warn("VM {}: commit of cut g{} failed ({}); its changes will be sent again", vm_id, cut.generation,
                 c.ToString());
  }
  // A cancel that arrives once the replica holds the whole copy: the cut is
  // committed (the replica has it), the copy is not recorded as done, and
  // the next StartReplication sends it again as an ordinary, complete log.
  if (job && job->CancelRequested()) return Status::Cancelled("initial replication cancelled");
  report.records = sent->records;
  report.data_bytes = sent->data_bytes;
  report.zero_bytes = sent->zero_bytes;
  report.wire_bytes = sent->wire_bytes;
  report.resumed = sent->resumed;
  report.duration_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started).count();
  if (auto pending = tracker.PendingBytes(); pending.ok()) {
    report.pending_bytes = *pending;
    std::lock_guard<std::mutex> lock(mu_);
    pending_[vm_id] = *pending;
  }
  if (initial) {
    std::string gen = HexId(generation);
    VMR_RETURN_IF_ERROR(UpdateRelationship(vm_id, [&](RelationshipRecord& r) {
      r.generation_id = gen;
      return Status::Ok();
    }));
  }
  return report;
}

Status ReplicationEngine::RecordSuccess(const std::string& vm_id, const CycleReport& report) {
  {
    // The cycle is done whatever the catalog write below answers: the
    // replica acknowledged the log. Memory only (ReplicationEngine::LastCycle).
    const int64_t finished_ms = Now();
    std::lock_guard<std::mutex> lock(mu_);
    failures_[vm_id] = 0;
    last_cycle_[vm_id] = LastCycleInfo{report, finished_ms};
  }
  return catalog_->RunInTransaction([&]() -> Status {
    VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, kPrimaryIndex));
    if (!rel) return Status::NotFound("VM " + vm_id + " has no replication relationship");
    rel->sequence = report.sequence;
    rel->last_replication_ms = report.cut_time_ms;
    rel->last_replication_type = report.kind;
    if (report.kind == ReplicationType::kApplicationConsistent) rel->last_app_consistent_ms = report.cut_time_ms;
    if (rel->state == ReplicationState::kCritical) {
      spdlog::info("VM {}: replication recovered", vm_id);
      rel->state = ReplicationState::kReplicating;
    }
    // The final log of a planned failover: prepared (4). Only from 3: a
    // state changed meanwhile is left as it is (the job reports it).
    if (report.planned && rel->state == ReplicationState::kReplicating) {
      rel->state = ReplicationState::kSyncedReplicationComplete;
    }
    VMR_ASSIGN_OR_RETURN(StatisticsRecord s, LoadStatistics(vm_id));
    s.pending_replication_size_bytes = report.pending_bytes;
    if (!report.app_consistent_failure.empty()) s.application_consistent_snapshot_failure_count += 1;
    if (report.initial) {
      s.initial_replication_size_bytes = report.data_bytes;
    } else {
      s.replication_success_count += 1;
      s.replication_size_bytes += report.data_bytes;
      s.max_replication_size_bytes = std::max(s.max_replication_size_bytes, report.data_bytes);
      s.replication_latency_ms += static_cast<uint64_t>(report.duration_ms);
      s.max_replication_latency_ms =
          std::max(s.max_replication_latency_ms, static_cast<uint64_t>(report.duration_ms));
    }
    HealthVerdict h = FullHealth(*rel, s, 0);
    rel->health = h.health;
    s.replication_health = h.health;
    s.health_issues = h.issues;
    VMR_RETURN_IF_ERROR(catalog_->PutRelationship(*rel));
    return catalog_->PutStatistics(s);
  });
}

std::optional<ReplicationEngine::LastCycleInfo> ReplicationEngine::LastCycle(const std::string& vm_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = last_cycle_.find(vm_id);
  if (it == last_cycle_.end()) return std::nullopt;
  return it->second;
}

Result<StatisticsRecord> ReplicationEngine::LoadStatistics(const std::string& vm_id) {
  VMR_ASSIGN_OR_RETURN(auto stats, catalog_->GetStatistics(vm_id, kPrimaryIndex));
  StatisticsRecord s = stats.value_or(StatisticsRecord{});
  s.vm_id = vm_id;
  s.index = kPrimaryIndex;
  VMR_ASSIGN_OR_RETURN(auto server, catalog_->GetServerSettings());
  if (RollStatisticsWindow(s, server, Now())) {
    spdlog::info("VM {}: a new statistics window starts (MonitoringInterval {} s)", vm_id,
                 server.monitoring_interval_s);
  }
  return s;
}

std::chrono::milliseconds ReplicationEngine::AppConsistentInterval(const RelationshipRecord& rel) const {
  if (options_.test_app_consistent_interval_override_ms > 0) {
    return std::chrono::milliseconds(options_.test_app_consistent_interval_override_ms);
  }
  return std::chrono::hours(rel.settings.application_consistent_snapshot_interval_h);
}

// After a failed attempt, a quarter of the interval (at least one cycle's
// worth of time passes; with hours that is 15 min .. 3 h).
std::chrono::milliseconds ReplicationEngine::AppConsistentRetryDelay(const RelationshipRecord& rel) const {
  return AppConsistentInterval(rel) / 4;
}

bool ReplicationEngine::AppConsistentDue(const RelationshipRecord& rel) {
  if (rel.settings.application_consistent_snapshot_interval_h == 0) return false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = app_retry_at_.find(rel.vm_id);
    if (it != app_retry_at_.end() && std::chrono::steady_clock::now() < it->second) return false;
  }
  const int64_t since = Now() - rel.last_app_consistent_ms;
  // Never taken, due, or the wall clock went back past the last one.
  return rel.last_app_consistent_ms == 0 || since < 0 || since >= AppConsistentInterval(rel).count();
}

HealthVerdict ReplicationEngine::FullHealth(const RelationshipRecord& rel, const StatisticsRecord& s, int failures) {
  HealthVerdict h = EvaluateHealth(rel, s, Now(), failures);
  std::string last_failure;
  std::optional<ReplicationState> replica_state;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = replica_state_.find(rel.vm_id); it != replica_state_.end()) replica_state = it->second;
    if (auto it = last_failure_.find(rel.vm_id); it != last_failure_.end() && failures > 0) last_failure = it->second;
  }
  if (replica_state) ApplyReplicaSideHealth(h, *replica_state);
  if (!last_failure.empty()) h.issues.push_back("last failure: " + last_failure);
  return h;
}

Status ReplicationEngine::RecordFailure(const std::string& vm_id, const Status& why, bool network) {
  int failures = 0;
  std::optional<uint64_t> pending;  // unknown when this run never measured it: the stored value stays
  {
    std::lock_guard<std::mutex> lock(mu_);
    failures = ++failures_[vm_id];
    last_failure_[vm_id] = why.ToString();
    if (auto it = pending_.find(vm_id); it != pending_.end()) pending = it->second;
  }
  const bool resync = why.code() == Code::kFailedPrecondition &&
                      why.message().find("resynchronization required") != std::string::npos;
  return catalog_->RunInTransaction([&]() -> Status {
    VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, kPrimaryIndex));
    if (!rel) return Status::Ok();  // removed meanwhile
    VMR_ASSIGN_OR_RETURN(StatisticsRecord s, LoadStatistics(vm_id));
    if (pending) s.pending_replication_size_bytes = *pending;
    if (network) {
      s.network_failure_count += 1;
    } else {
      s.replication_failure_count += 1;
    }
    // A prepared planned failover (4) keeps its state: its final log is
    // on the replica whatever an earlier cycle's outcome was.
    if (resync && rel->state != ReplicationState::kSyncedReplicationComplete) {
      rel->state = ReplicationState::kWaitingForStartResynchronize;
    } else if (failures >= options_.failures_before_critical && rel->state == ReplicationState::kReplicating) {
      spdlog::error("VM {}: {} replication cycles in a row failed; state Critical: {}", vm_id, failures,
                    why.ToString());
      rel->state = ReplicationState::kCritical;
    }
    HealthVerdict h = FullHealth(*rel, s, failures);
    rel->health = h.health;
    s.replication_health = h.health;
    s.health_issues = h.issues;
    VMR_RETURN_IF_ERROR(catalog_->PutRelationship(*rel));
    return catalog_->PutStatistics(s);
  });
}

void ReplicationEngine::WorkerLoop(Worker* w) {
  // The schedule runs on the steady clock: a wall-clock step (NTP, an
  // operator changing the time) neither fires a burst of cycles nor stalls
  // them. Wall time (Now()) is only recorded.
  using Steady = std::chrono::steady_clock;
  const std::string vm_id = w->vm_id;
  Steady::time_point due = Steady::now();  // a resumed relationship replicates at once
  bool off_logged = false;                 // "the VM is off" logged once per stretch
  {
    auto rel = catalog_->GetRelationship(vm_id, kPrimaryIndex);
    if (rel.ok() && *rel && (*rel)->last_replication_ms > 0) {
      const int64_t wait_ms = (*rel)->last_replication_ms + IntervalOf(**rel).count() - Now();
      if (wait_ms > 0) due += std::chrono::milliseconds(std::min<int64_t>(wait_ms, IntervalOf(**rel).count()));
    }
  }
  int64_t misses_counted = 0;
  Steady::time_point next_auto_resync{};
  auto backoff = options_.retry_initial;
  bool retrying = false;
  Steady::time_point retry_at{};
  while (true) {
    {
      std::unique_lock<std::mutex> lock(w->mu);
      const Steady::time_point until = retrying ? retry_at : due;
      w->cv.wait_until(lock, until, [&] { return w->stop || w->kicked; });
      if (w->stop) return;
      w->kicked = false;
    }
    auto rel = catalog_->GetRelationship(vm_id, kPrimaryIndex);
    if (!rel.ok()) {
      // A transient catalog error must not end replication: retry.
      spdlog::error("VM {}: reading its relationship failed: {}; retrying", vm_id, rel.status().ToString());
      retrying = true;
      retry_at = Steady::now() + options_.retry_initial;
      continue;
    }
    if (!*rel || (*rel)->local_mode != ReplicationMode::kPrimary) {  // removed
      std::lock_guard<std::mutex> lock(w->mu);
      w->exited = true;
      return;
    }
    const ReplicationState state = (*rel)->state;
    // An export waiting for its import (StartReplication type 2) replicates
    // its deltas in state 2: the replica stages them.
    const bool awaiting_import = state == ReplicationState::kWaitingToCompleteInitialReplication &&
                                 (*rel)->initial_replication_type == InitialReplicationType::kExport &&
                                 (*rel)->sequence >= 1 && !(*rel)->generation_id.empty();
    if (state != ReplicationState::kReplicating && state != ReplicationState::kCritical && !awaiting_import) {
      // Resync required and AutoResynchronizeEnabled: the resync starts by
      // itself inside its window (checked again every 30 s; a failed one
      // leaves 9 and is retried at the next check).
      bool auto_resync = false;
      const RelationshipSettings& st = (*rel)->settings;
      if (state == ReplicationState::kWaitingForStartResynchronize && st.auto_resynchronize_enabled) {
        auto_resync = true;
        if (Steady::now() >= next_auto_resync &&
            InTimeWindow(st.auto_resynchronize_interval_start_min, st.auto_resynchronize_interval_end_min, 0x7f,
                         Now())) {
          // At most one automatic attempt a minute (a failed one kicks us).
          next_auto_resync = Steady::now() + std::chrono::minutes(1);
          auto job = Resynchronize(vm_id, 0);
          if (job.ok()) {
            spdlog::info("VM {}: automatic resynchronization started (job {})", vm_id, job->id);
          } else {
            spdlog::warn("VM {}: automatic resynchronization not started: {}", vm_id, job.status().ToString());
          }
        }
      }
      // Suspended, resync required, ...: wait for a kick (resume) or stop.
      std::unique_lock<std::mutex> lock(w->mu);
      if (auto_resync) {
        w->cv.wait_for(lock, std::chrono::seconds(30), [&] { return w->stop || w->kicked; });
      } else {
        w->cv.wait(lock, [&] { return w->stop || w->kicked; });
      }
      if (w->stop) return;
      due = Steady::now();
      retrying = false;
      misses_counted = 0;
      continue;
    }
    const auto interval = IntervalOf(**rel);
    const Steady::time_point begin = Steady::now();
    Result<CycleReport> r = Status::Unavailable("not run");
    bool prepared = false;
    // The VM's lock is held until the cycle's result is recorded: a planned
    // failover (which takes it too) never has its state 4 and final
    // sequence overwritten by a cycle that ran before it.
    auto vm_lock = VmLock(vm_id);
    std::unique_lock<std::mutex> vm_locked(*vm_lock);
    {
      // A planned failover holds the lock while it sends the final log: once
      // it is done the state is 4 and no cycle may follow it.
      auto now_rel = catalog_->GetRelationship(vm_id, kPrimaryIndex);
      prepared = now_rel.ok() && *now_rel && (*now_rel)->state == ReplicationState::kSyncedReplicationComplete;
      if (!prepared) {
        Slot slot(this);
        r = RunCycle(vm_id, /*initial=*/false, nullptr);
      }
    }
    if (prepared) continue;  // the state is read again: 4 waits for a kick (the lock is released)
    const Steady::time_point end = Steady::now();
    // Every interval boundary passed since the cycle was due without a
    // successful cycle is a missed cycle.
    const int64_t boundaries = interval.count() > 0 && end > due ? (end - due) / interval : 0;
    const int64_t new_misses = boundaries - misses_counted;
    misses_counted = boundaries;
    if (new_misses > 0) {
      Status s = catalog_->RunInTransaction([&]() -> Status {
        VMR_ASSIGN_OR_RETURN(auto rel_now, catalog_->GetRelationship(vm_id, kPrimaryIndex));
        if (!rel_now) return Status::Ok();
        VMR_ASSIGN_OR_RETURN(StatisticsRecord st, LoadStatistics(vm_id));
        st.replication_miss_count += static_cast<uint64_t>(new_misses);
        return catalog_->PutStatistics(st);
      });
      if (!s.ok()) spdlog::warn("VM {}: recording missed cycles failed: {}", vm_id, s.ToString());
    }
    if (r.ok()) off_logged = false;
    if (r.ok()) {
      spdlog::info("VM {}: delta {} sent {} bytes changed ({} on the wire, {} zero) in {} ms{}", vm_id,
                   r->sequence, r->data_bytes, r->wire_bytes, r->zero_bytes, r->duration_ms,
                   r->kind == ReplicationType::kApplicationConsistent ? " (application-consistent)" : "");
      if (Status s = RecordSuccess(vm_id, *r); !s.ok()) {
        spdlog::error("VM {}: recording cycle {} failed: {}", vm_id, r->sequence, s.ToString());
      }
      // A cycle run before it was due (kicked by a settings change or a
      // resume) starts the schedule afresh from its own start.
      due = begin < due ? begin + interval : due + (boundaries + 1) * interval;
      misses_counted = 0;
      retrying = false;
      backoff = options_.retry_initial;
    } else if (r.status().message().rfind(kVmIsOff, 0) == 0) {
      // Nothing to send while the VM is off: the schedule goes on as after
      // an empty cycle (no failure, no miss, LastReplicationTime unchanged).
      if (!off_logged) spdlog::info("VM {}: {}; cycles wait until it runs", vm_id, r.status().message());
      off_logged = true;
      due = due + (boundaries + 1) * interval;
      misses_counted = 0;
      retrying = false;
      backoff = options_.retry_initial;
    } else {
      spdlog::warn("VM {}: cycle failed: {}", vm_id, r.status().ToString());
      if (Status s = RecordFailure(vm_id, r.status(), IsNetworkError(r.status())); !s.ok()) {
        spdlog::error("VM {}: recording a failed cycle failed: {}", vm_id, s.ToString());
      }
      retrying = true;
      retry_at = Steady::now() + backoff;
      // Retry at least once an interval, whatever the backoff has grown to.
      backoff = std::min({backoff * 2, options_.retry_max, std::max(options_.retry_initial, interval)});
    }
  }
}

// ------------------------------------------------------------------ methods

Status ReplicationEngine::CreateRelationship(const std::string& vm, const RelationshipSettings& settings) {
  VMR_ASSIGN_OR_RETURN(auto rec, ResolveVm(vm));
  VMR_ASSIGN_OR_RETURN(auto existing, catalog_->GetRelationship(rec.id, kPrimaryIndex));
  if (existing) {
    return Status::FailedPrecondition("VM " + rec.name + " already has a replication relationship (state " +
                                      std::string(Name(existing->state)) + ")");
  }
  if (rec.mode != ReplicationMode::kNone && rec.mode != ReplicationMode::kPrimary) {
    return Status::FailedPrecondition("VM " + rec.name + " is a " + std::string(Name(rec.mode)) +
                                      " VM; only a VM of this host can be replicated from here");
  }
  VMR_RETURN_IF_ERROR(ValidateRelationshipSettings(settings, /*extended=*/false));
  VMR_ASSIGN_OR_RETURN(auto def, DefinitionOf(rec));
  VMR_ASSIGN_OR_RETURN(auto included, IncludedDisks(def, settings));

  CreateReplicaParams params;
  params.vm_id = rec.id;
  params.vm_name = rec.name;
  params.definition_json = rec.definition_json;
  for (const auto& d : included) {
    ReplicaDisk rd;
    rd.name = d.name;
    rd.size = (d.size_bytes + kReplicaBlockSize - 1) / kReplicaBlockSize * kReplicaBlockSize;
    params.disks.push_back(rd);
  }
  params.settings = settings;
  params.settings.primary_connection_point = options_.advertised_address ? options_.advertised_address() : "";
  if (!options_.open_channel) return Status::Internal("replication engine: no channel factory");
  VMR_ASSIGN_OR_RETURN(auto channel, options_.open_channel(settings.recovery_connection_point,
                                                           static_cast<uint16_t>(settings.recovery_server_port)));
  ReplicaClient client(channel);
  VMR_ASSIGN_OR_RETURN(auto replica, client.CreateReplica(params));
  (void)replica;

  return catalog_->RunInTransaction([&]() -> Status {
    VmRecord v = rec;
    v.mode = ReplicationMode::kPrimary;
    VMR_RETURN_IF_ERROR(catalog_->PutVm(v));
    RelationshipRecord r;
    r.vm_id = rec.id;
    r.index = kPrimaryIndex;
    r.local_mode = ReplicationMode::kPrimary;
    r.state = ReplicationState::kReadyForReplication;
    r.settings = settings;
    r.settings.primary_connection_point = params.settings.primary_connection_point;
    StatisticsRecord s;
    HealthVerdict h = EvaluateHealth(r, s, Now(), 0);
    r.health = h.health;
    VMR_RETURN_IF_ERROR(catalog_->PutRelationship(r));
    s.vm_id = rec.id;
    s.index = kPrimaryIndex;
    s.start_ms = Now();
    s.replication_health = h.health;
    s.health_issues = h.issues;
    return catalog_->PutStatistics(s);
  });
}

Result<JobRecord> ReplicationEngine::StartReplication(const std::string& vm, int64_t start_unix_s, bool seeded) {
  VMR_ASSIGN_OR_RETURN(auto rec, ResolveVm(vm));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(rec.id, kPrimaryIndex));
  if (!rel) return Status::FailedPrecondition("VM " + rec.name + " has no replication relationship");
  VMR_RETURN_IF_ERROR(RequirePrimary(rec, *rel, "StartReplication"));
  if (seeded && SwitchedReverse(options_.state_dir, rec.id)) {
    return Status::InvalidArgument("InitialReplicationType: a reversed relationship starts from the old primary's "
                                   "disks (type 1)");
  }
  DropResyncProgress(rec.id);
  const int64_t now_s = Now() / 1000;
  if (start_unix_s != 0 && (start_unix_s < now_s - 60 || start_unix_s > now_s + 7 * 86400)) {
    return Status::InvalidArgument("ScheduledStartTime: must be within the next 7 days");
  }
  const std::string vm_id = rec.id;
  // The check and the change in one transaction: two concurrent calls
  // cannot both start a copy.
  uint64_t epoch = 0;
  VMR_RETURN_IF_ERROR(UpdateRelationship(vm_id, [&](RelationshipRecord& r) -> Status {
    VMR_ASSIGN_OR_RETURN(auto t, CheckTransition(TableMode::kPrimary, r.state, Operation::kStartReplication));
    r.state = t.during;
    r.initial_replication_type = seeded ? InitialReplicationType::kSeededNetwork : InitialReplicationType::kNetwork;
    // This call owns the copy's state from here on (catalog, then mu_: the
    // engine's lock order inside transactions).
    epoch = NextInitialEpoch(vm_id);
    return Status::Ok();
  }));
  return StartInitialJob(vm_id, rec.name, start_unix_s, rel->state, epoch, seeded);
}

Result<JobRecord> ReplicationEngine::Resynchronize(const std::string& vm, int64_t start_unix_s) {
  VMR_ASSIGN_OR_RETURN(auto rec, ResolveVm(vm));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(rec.id, kPrimaryIndex));
  if (!rel) return Status::FailedPrecondition("VM " + rec.name + " has no replication relationship");
  VMR_RETURN_IF_ERROR(RequirePrimary(rec, *rel, "Resynchronize"));
  const int64_t now_s = Now() / 1000;
  if (start_unix_s != 0 && (start_unix_s < now_s - 60 || start_unix_s > now_s + 7 * 86400)) {
    return Status::InvalidArgument("StartTime: must be within the next 7 days");
  }
  const std::string vm_id = rec.id;
  ReplicationState before{};
  VMR_RETURN_IF_ERROR(UpdateRelationship(vm_id, [&](RelationshipRecord& r) -> Status {
    VMR_ASSIGN_OR_RETURN(auto t, CheckTransition(TableMode::kPrimary, r.state, Operation::kResynchronize));
    before = r.state;
    r.state = t.during;
    return Status::Ok();
  }));
  spdlog::info("VM {}: resynchronization requested (state {} -> {})", rec.name, Name(before),
               Name(ReplicationState::kResynchronizing));
  // Back to "waiting for a resync" when it does not complete (the table's
  // RequestCancelResynchronization target), unless the state moved meanwhile.
  auto leave = [this, vm_id](const char* why) {
    Status u = UpdateRelationship(vm_id, [&](RelationshipRecord& r) {
      if (r.state == ReplicationState::kResynchronizing) r.state = ReplicationState::kWaitingForStartResynchronize;
      return Status::Ok();
    });
    if (!u.ok()) spdlog::error("VM {}: resetting the state after a resync that {}: {}", vm_id, why, u.ToString());
  };
  nlohmann::json params = {{"vm", vm_id}, {"start_time_unix_s", start_unix_s}};
  auto job = jobs_->Start(
      JobType::kResynchronizing, rec.name, params.dump(), /*cancellable=*/true, /*resumable=*/false,
      [this, vm_id, start_unix_s, leave](JobContext& jc) -> Status {
        while (start_unix_s != 0 && Now() / 1000 < start_unix_s) {
          if (stop_flag_.load() || jc.CancelRequested()) {
            leave("was cancelled");
            return Status::Cancelled("resynchronization cancelled before its StartTime");
          }
          std::this_thread::sleep_for(std::chrono::milliseconds(200));
        }
        Result<CycleReport> r = Status::Unavailable("not run");
        {
          auto vm_lock = VmLock(vm_id);
          std::lock_guard<std::mutex> l(*vm_lock);
          Slot slot(this);
          r = RunCycle(vm_id, /*initial=*/true, &jc, /*resync=*/true);
          // The replica no longer holds the part a paused resync would
          // continue (it restarted meanwhile): the resync starts over.
          if (!r.ok() && r.status().message().find("lost the partial log") != std::string::npos &&
              !stop_flag_.load() && !jc.CancelRequested()) {
            spdlog::info("VM {}: {}; the resynchronization starts over", vm_id, r.status().ToString());
            r = RunCycle(vm_id, /*initial=*/true, &jc, /*resync=*/true);
          }
        }
        if (!r.ok()) {
          leave("failed");
          Status f = RecordFailure(vm_id, r.status(), IsNetworkError(r.status()));
          (void)f;
          KickWorker(vm_id);  // an automatic resync is retried by the worker
          return r.status().WithContext("resynchronization");
        }
        VMR_RETURN_IF_ERROR(UpdateRelationship(vm_id, [&](RelationshipRecord& rel) {
          if (rel.state == ReplicationState::kResynchronizing) rel.state = ReplicationState::kReplicating;
          return Status::Ok();
        }));
        if (Status s = RecordSuccess(vm_id, *r); !s.ok()) {
          spdlog::error("VM {}: recording the resynchronization failed: {}", vm_id, s.ToString());
        }
        jc.SetResult(nlohmann::json{{"sequence", r->sequence},
                                    {"read_bytes", r->read_bytes},
                                    {"continued_from_chunk", r->continued_from_chunk},
                                    {"continued_at_disk", r->continued_at_disk},
                                    {"continued_at_offset", r->continued_at_offset},
                                    {"read_bytes_before", r->read_bytes_before},
                                    {"hole_bytes", r->hole_bytes},
                                    {"hole_bytes_before", r->hole_bytes_before},
                                    {"resynchronized_bytes", r->data_bytes + r->zero_bytes},
                                    {"data_bytes", r->data_bytes},
                                    {"zero_bytes", r->zero_bytes},
                                    {"wire_bytes", r->wire_bytes},
                                    {"records", r->records},
                                    {"duration_ms", r->duration_ms}}
                         .dump());
        spdlog::info("VM {}: resynchronized: {} bytes differed ({} on the wire) in {} ms", vm_id,
                     r->data_bytes + r->zero_bytes, r->wire_bytes, r->duration_ms);
        KickWorker(vm_id);
        return Status::Ok();
      });
  if (!job.ok()) leave("could not start");
  return job;
}

// ------------------------------------------------------------ planned failover

Result<JobRecord> ReplicationEngine::PrepareForPlannedFailover(const std::string& vm) {
  VMR_ASSIGN_OR_RETURN(auto rec, ResolveVm(vm));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(rec.id, kPrimaryIndex));
  if (!rel) return Status::FailedPrecondition("VM " + rec.name + " has no replication relationship");
  const Operation op = Operation::kRequestPrepareForPlannedFailover;
  VMR_RETURN_IF_ERROR(RequirePrimary(rec, *rel, "RequestReplicationStateChange 4", op));
  VMR_RETURN_IF_ERROR(CheckTransition(TableMode::kPrimary, rel->state, op).status());
  VMR_ASSIGN_OR_RETURN(auto def, DefinitionOf(rec));
  // The VM must be off: a planned failover loses nothing only if nothing
  // writes after the final cut.
  VMR_ASSIGN_OR_RETURN(VmPowerState power, QueryVmPower(def));
  if (power.power != VmPower::kOff) {
    return Status::FailedPrecondition("VM " + rec.name + " runs (" + power.detail +
                                      "): shut it down first, then prepare the planned failover");
  }
  // The replica must take the final log now.
  if (!options_.open_channel) return Status::Internal("replication engine: no channel factory");
  auto channel = options_.open_channel(rel->settings.recovery_connection_point,
                                       static_cast<uint16_t>(rel->settings.recovery_server_port));
  if (!channel.ok()) return Status::Unavailable("the replica server cannot be reached: " + channel.status().message());
  ReplicaClient client(*channel);
  auto replica = client.GetReplicaStatus(rec.id, kPrimaryIndex);
  if (!replica.ok()) {
    if (IsNetworkError(replica.status())) {
      return Status::Unavailable("the replica server " + rel->settings.recovery_connection_point +
                                 " cannot be reached; a planned failover needs its replica: " +
                                 replica.status().message());
    }
    return replica.status().WithContext("the replica server");
  }
  if (replica->state != ReplicationState::kReplicating) {
    return Status::FailedPrecondition("the replica of VM " + rec.name + " is in state " +
                                      std::string(Name(replica->state)) + " (" +
                                      std::to_string(static_cast<int>(replica->state)) +
                                      "), not Replicating (3): a planned failover needs a replicating replica");
  }
  const std::string vm_id = rec.id;
  const bool via_qemu = power.via_qemu;
  spdlog::info("VM {}: planned failover requested ({})", rec.name, power.detail);
  nlohmann::json params = {{"vm", vm_id}, {"requested_state", 4}};
  return jobs_->Start(
      JobType::kStateChange, rec.name, params.dump(), /*cancellable=*/false, /*resumable=*/false,
      [this, vm_id, via_qemu](JobContext& jc) -> Status {
        // The VM's lock keeps the worker's cycles out from the attach to the
        // catalog write (section 9.2).
        auto vm_lock = VmLock(vm_id);
        std::lock_guard<std::mutex> l(*vm_lock);
        VMR_ASSIGN_OR_RETURN(auto rel_now, catalog_->GetRelationship(vm_id, kPrimaryIndex));
        if (!rel_now || (*rel_now).state != ReplicationState::kReplicating) {
          return Status::FailedPrecondition("VM " + vm_id + ": the state changed before the planned failover ran");
        }
        VMR_ASSIGN_OR_RETURN(auto vm_rec, catalog_->GetVm(vm_id));
        if (!vm_rec) return Status::NotFound("VM " + vm_id + " is no longer in the catalog");
        VMR_ASSIGN_OR_RETURN(auto def, DefinitionOf(*vm_rec));
        const std::string run_dir = RunDirOf(vm_id);
        VMR_RETURN_IF_ERROR(MakeDirs(run_dir));
        // The QEMU that still holds the disks (guest shut down, process
        // kept), else the images opened here: the image locks prove that no
        // other process writes them.
        std::unique_ptr<AttachedVm> attached;
        if (via_qemu) {
          VMR_ASSIGN_OR_RETURN(attached, AttachVm(def, run_dir));
        } else {
          VMR_ASSIGN_OR_RETURN(attached, AttachVmImages(def, run_dir));
        }
        // A QEMU that holds the disks must still have its guest stopped, at
        // the cut and after the log (nobody may resume it in between).
        auto guest_stopped = [&]() -> Status {
          if (!via_qemu) return Status::Ok();
          auto st = attached->qmp()->Execute("query-status", nullptr, std::chrono::seconds(5));
          const std::string status = st.ok() && st->is_object() && st->contains("status") && (*st)["status"].is_string()
                                         ? (*st)["status"].get<std::string>()
                                         : std::string("unknown");
          if (status == "shutdown" || status == "guest-panicked" || status == "internal-error") return Status::Ok();
          return Status::FailedPrecondition("VM " + vm_id + " runs again (QEMU status " + status +
                                            "): the planned failover is abandoned; shut it down first");
        };
        VMR_RETURN_IF_ERROR(guest_stopped());
        PlannedCycle planned{attached.get()};
        Slot slot(this);
        bool resync_form = false;
        Result<CycleReport> r = RunCycle(vm_id, /*initial=*/false, &jc, /*resync=*/false, &planned);
        if (!r.ok() && r.status().code() == Code::kFailedPrecondition &&
            r.status().message().find("resynchronization required") != std::string::npos) {
          // Tracking was lost (a raw disk whose QEMU exited, a killed QEMU):
          // the final log compares every block with the replica's hashes.
          spdlog::info("VM {}: planned failover: {}; the final log takes the resynchronization form", vm_id,
                       r.status().ToString());
          DropResyncProgress(vm_id);
          resync_form = true;
          r = RunCycle(vm_id, /*initial=*/true, &jc, /*resync=*/true, &planned);
        }
        if (!r.ok()) return r.status().WithContext("planned failover");
        // Resumed while the log went out: the cut is committed and the log
        // stays on the replica as an ordinary point, but the state stays 3
        // (the next cycle sends what the guest wrote since).
        if (Status again = guest_stopped(); !again.ok()) {
          CycleReport ordinary = *r;
          ordinary.planned = false;
          (void)RecordSuccess(vm_id, ordinary);
          return again;
        }
        // Detach before the catalog write: a qemu-storage-daemon started
        // here stops cleanly and stores the (empty) bitmaps consistent.
        attached.reset();
        VMR_RETURN_IF_ERROR(RecordSuccess(vm_id, *r).WithContext("recording the planned failover"));
        VMR_ASSIGN_OR_RETURN(auto rel_after, catalog_->GetRelationship(vm_id, kPrimaryIndex));
        if (!rel_after || rel_after->state != ReplicationState::kSyncedReplicationComplete) {
          return Status::FailedPrecondition("VM " + vm_id +
                                            ": the final log was sent but the state changed meanwhile");
        }
        jc.SetResult(nlohmann::json{{"sequence", r->sequence},
                                    {"kind", static_cast<int>(r->kind)},
                                    {"data_bytes", r->data_bytes},
                                    {"zero_bytes", r->zero_bytes},
                                    {"wire_bytes", r->wire_bytes},
                                    {"records", r->records},
                                    {"resync_form", resync_form}}
                         .dump());
        spdlog::info("VM {}: planned failover prepared: final log {} ({} bytes of data, {} of zeros); state {}",
                     vm_id, r->sequence, r->data_bytes, r->zero_bytes,
                     Name(ReplicationState::kSyncedReplicationComplete));
        return Status::Ok();
      });
}

Result<JobRecord> ReplicationEngine::RevertPlannedFailover(const std::string& vm) {
  VMR_ASSIGN_OR_RETURN(auto rec, ResolveVm(vm));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(rec.id, kPrimaryIndex));
  if (!rel) return Status::FailedPrecondition("VM " + rec.name + " has no replication relationship");
  VMR_RETURN_IF_ERROR(RequirePrimary(rec, *rel, "RevertFailover", Operation::kRevertFailover));
  VMR_RETURN_IF_ERROR(CheckTransition(TableMode::kPrimary, rel->state, Operation::kRevertFailover).status());
  // Reverting while the replica has failed over would make two primaries.
  if (options_.open_channel) {
    auto channel = options_.open_channel(rel->settings.recovery_connection_point,
                                         static_cast<uint16_t>(rel->settings.recovery_server_port));
    Result<ReplicaStatusInfo> replica = channel.ok() ? ReplicaClient(*channel).GetReplicaStatus(rec.id, kPrimaryIndex)
                                                     : Result<ReplicaStatusInfo>(channel.status());
    if (!replica.ok() && !IsNetworkError(replica.status())) {
      // The replica answered but refused (the relationship removed there,
      // our certificate refused...): it cannot confirm that it did not fail
      // over, so nothing is reverted.
      return Status::FailedPrecondition("the replica of VM " + rec.name + " cannot confirm its state (" +
                                        replica.status().ToString() + "): RevertFailover is refused");
    }
    if (replica.ok()) {
      const ReplicationState s = replica->state;
      if (s == ReplicationState::kRecovered || s == ReplicationState::kCommitted ||
          s == ReplicationState::kRecoveryInProgress || s == ReplicationState::kFailbackInProgress ||
          s == ReplicationState::kFailbackComplete) {
        return Status::FailedPrecondition("the replica of VM " + rec.name + " has failed over (state " +
                                          std::string(Name(s)) + "): revert it there first, or reverse");
      }
    } else {
      spdlog::warn("VM {}: RevertFailover: the replica cannot tell its state ({}); reverting anyway", rec.name,
                   replica.status().ToString());
    }
  }
  const std::string vm_id = rec.id;
  return jobs_->Start(JobType::kRevertFailover, rec.name, nlohmann::json{{"vm", vm_id}}.dump(), false, false,
                      [this, vm_id](JobContext& jc) -> Status {
                        ReplicationState before{};
                        VMR_RETURN_IF_ERROR(UpdateRelationship(vm_id, [&](RelationshipRecord& r) -> Status {
                          VMR_ASSIGN_OR_RETURN(auto t, CheckTransition(TableMode::kPrimary, r.state,
                                                                       Operation::kRevertFailover));
                          before = r.state;
                          r.state = t.after;
                          return Status::Ok();
                        }));
                        spdlog::info("VM {}: planned failover reverted: state {} -> {}", vm_id, Name(before),
                                     Name(ReplicationState::kReplicating));
                        {
                          std::lock_guard<std::mutex> lock(mu_);
                          failures_[vm_id] = 0;
                        }
                        KickWorker(vm_id);
                        jc.SetResult(nlohmann::json{{"state", 3}}.dump());
                        return Status::Ok();
                      });
}

Result<JobRecord> ReplicationEngine::StartExportReplication(const std::string& vm, const std::string& location) {
  VMR_ASSIGN_OR_RETURN(auto rec, ResolveVm(vm));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(rec.id, kPrimaryIndex));
  if (!rel) return Status::FailedPrecondition("VM " + rec.name + " has no replication relationship");
  VMR_RETURN_IF_ERROR(RequirePrimary(rec, *rel, "StartReplication"));
  if (location.empty() || location[0] != '/' || location.size() > 4096 ||
      std::any_of(location.begin(), location.end(), [](unsigned char c) { return c < 0x20 || c == 0x7f; })) {
    return Status::InvalidArgument("InitialReplicationExportLocation: '" + location +
                                   "' is not an absolute directory path");
  }
  const std::string vm_id = rec.id;
  DropResyncProgress(vm_id);
  uint64_t epoch = 0;
  VMR_RETURN_IF_ERROR(UpdateRelationship(vm_id, [&](RelationshipRecord& r) -> Status {
    VMR_ASSIGN_OR_RETURN(auto t, CheckTransition(TableMode::kPrimary, r.state, Operation::kStartReplication));
    r.state = t.during;
    r.initial_replication_type = InitialReplicationType::kExport;
    r.generation_id.clear();
    r.sequence = 0;
    epoch = NextInitialEpoch(vm_id);
    return Status::Ok();
  }));
  return StartExportJob(vm_id, rec.name, location, epoch);
}

Result<JobRecord> ReplicationEngine::StartExportJob(const std::string& vm_id, const std::string& vm_name,
                                                    const std::string& location, uint64_t epoch) {
  nlohmann::json params = {{"vm", vm_id}, {"location", location}};
  auto job = jobs_->Start(JobType::kExportInitialReplication, vm_name, params.dump(), /*cancellable=*/true,
                          /*resumable=*/false, [this, vm_id, location, epoch](JobContext& jc) -> Status {
                            return RunExport(vm_id, location, &jc, epoch);
                          });
  if (!job.ok()) {
    Status undo = UndoInitialState(vm_id, epoch, ReplicationState::kReadyForReplication);
    (void)undo;
  }
  return job;
}

// StartReplication type 2: the cut goes into an export directory instead of
// over the link (docs/export_format.md); the replica is then told to expect
// log 1 from ImportInitialReplica (docs/protocol.md "ReserveImport").
Status ReplicationEngine::RunExport(const std::string& vm_id, const std::string& location, JobContext* job,
                                   uint64_t epoch) {
  const auto started = std::chrono::steady_clock::now();
  auto body = [&]() -> Result<std::pair<ExportSummary, CycleReport>> {
    auto vm_lock = VmLock(vm_id);
    std::lock_guard<std::mutex> l(*vm_lock);
    Slot slot(this);
    VMR_ASSIGN_OR_RETURN(auto vm_opt, catalog_->GetVm(vm_id));
    if (!vm_opt) return Status::NotFound("VM " + vm_id + " is no longer in the catalog");
    VMR_ASSIGN_OR_RETURN(auto rel_opt, catalog_->GetRelationship(vm_id, kPrimaryIndex));
    if (!rel_opt) return Status::NotFound("VM " + vm_id + " has no replication relationship");
    VMR_ASSIGN_OR_RETURN(auto def, DefinitionOf(*vm_opt));
    VMR_ASSIGN_OR_RETURN(auto included, IncludedDisks(def, rel_opt->settings));
    // The replica, when it can be reached, must hold no point (an export
    // only starts an empty replica) and gives up what an earlier export
    // left: its reservation and the logs staged for it.
    if (options_.open_channel) {
      auto channel = options_.open_channel(rel_opt->settings.recovery_connection_point,
                                           static_cast<uint16_t>(rel_opt->settings.recovery_server_port));
      if (channel.ok()) {
        ReplicaClient client(*channel);
        auto st = client.GetReplicaStatus(vm_id, kPrimaryIndex);
        if (st.ok() && st->latest_applied >= 1) {
          return Status::FailedPrecondition("the replica already holds point " + std::to_string(st->latest_applied) +
                                            " of this VM: an export cannot start it; start a network initial "
                                            "replication (it makes the replica exact) instead");
        }
        if (st.ok()) {
          VMR_RETURN_IF_ERROR(client.ReserveImport(vm_id, kPrimaryIndex, GenerationId{}, /*release=*/true).status());
        } else {
          spdlog::warn("VM {}: the replica cannot be asked before the export ({}); it is told afterwards", vm_id,
                       st.status().ToString());
        }
      }
    }
    const std::string run_dir = RunDirOf(vm_id);
    VMR_RETURN_IF_ERROR(MakeDirs(run_dir));
    VMR_ASSIGN_OR_RETURN(auto attached, AttachVm(def, run_dir));
    std::vector<TrackedDisk> tracked;
    const std::vector<TrackedDisk> all = attached->tracked_disks();
    for (const auto& d : included) {
      auto it = std::find_if(all.begin(), all.end(), [&](const TrackedDisk& t) { return t.name == d.name; });
      if (it == all.end()) {
        return Status::FailedPrecondition("disk " + d.name + " of VM " + vm_id + " is not attached");
      }
      tracked.push_back(*it);
    }
    TrackerOptions topt;
    topt.nbd_socket = attached->nbd_socket();
    ChangeTracker tracker(attached->qmp(), vm_id, tracked, topt);
    VMR_ASSIGN_OR_RETURN(auto reconciled, tracker.Reconcile());
    for (const auto& a : reconciled.actions) spdlog::info("VM {}: reconcile: {}", vm_id, a);
    // Tracking starts at the export's cut: the deltas after it go over the link.
    if (reconciled.generation != 0) {
      VMR_RETURN_IF_ERROR(tracker.RestartTracking());
    } else {
      VMR_RETURN_IF_ERROR(tracker.Enable());
    }
    const GenerationId generation = RandomId();
    VMR_ASSIGN_OR_RETURN(auto cut, tracker.TakeCut(attached->export_dir()));
    CycleReport report;
    report.initial = true;
    report.sequence = 1;
    report.cut_time_ms = Now();
    auto abort = [&](const Status& why) -> Status {
      Status a = tracker.Abort(cut);
      if (!a.ok()) spdlog::error("VM {}: aborting cut g{} failed too: {}", vm_id, cut.generation, a.ToString());
      return why;
    };
    ExportInfo info;
    info.vm_id = vm_id;
    info.vm_name = vm_opt->name;
    info.definition = vm_opt->definition_json;
    info.generation_id = HexId(generation);
    info.cut_time_unix_ms = report.cut_time_ms;
    std::vector<std::unique_ptr<DeltaSource>> parts;
    for (size_t i = 0; i < cut.disks.size(); ++i) {
      const auto& cd = cut.disks[i];
      info.disks.push_back(ExportDisk{cd.disk, cd.size_bytes});
      auto reader = NbdDeltaReader::Open(cd.socket_path, cd.export_name, static_cast<uint32_t>(i), std::nullopt);
      if (!reader.ok()) {
        parts.clear();
        return abort(reader.status().WithContext("disk " + cd.disk));
      }
      parts.push_back(std::move(*reader));
    }
    Result<ExportSummary> written = Status::Unavailable("not run");
    {
      ConcatDeltaSource concat(std::move(parts));
      std::atomic<bool> cancel{false};
      ExportOptions eo;
      eo.compress = rel_opt->settings.compression_enabled;
      eo.cancel = &cancel;
      written = WriteInitialExport(location, info, concat, eo, [&](uint64_t done, uint64_t all) {
        if (stop_flag_.load() || (job && job->CancelRequested())) cancel = true;
        if (job && all > 0) job->SetProgress(static_cast<uint32_t>(done * 95 / all));
      });
    }
    if (!written.ok()) return abort(written.status().WithContext("writing the export under " + location));
    if (Status c = tracker.Commit(cut); !c.ok()) {
      // The export holds the cut; bitmap g merges into the next one at the
      // next Reconcile, so the first delta resends a superset: no loss.
      spdlog::warn("VM {}: commit of cut g{} failed ({}); its changes will be sent again", vm_id, cut.generation,
                   c.ToString());
    }
    report.data_bytes = written->totals.data_bytes;
    report.zero_bytes = written->totals.zero_bytes;
    report.wire_bytes = 0;
    report.records = written->totals.data_chunks + written->totals.zero_chunks;
    report.duration_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started).count();
    // Recorded before the replica is told: from here the relationship's
    // deltas start at log 2 on top of this generation.
    VMR_RETURN_IF_ERROR(UpdateRelationship(vm_id, [&](RelationshipRecord& r) -> Status {
      if (!IsCurrentInitial(vm_id, epoch)) return Status::Cancelled("a newer StartReplication owns the copy");
      if (r.state == ReplicationState::kReadyForReplication || r.state == ReplicationState::kDisabled) {
        return Status::Cancelled("the initial replication was cancelled");
      }
      r.generation_id = HexId(generation);
      r.sequence = 1;
      r.last_replication_ms = report.cut_time_ms;
      r.last_replication_type = ReplicationType::kRegular;
      return Status::Ok();
    }));
    return std::make_pair(*written, report);
  };
  auto r = body();
  if (!r.ok()) {
    if (stop_flag_.load()) return r.status().WithContext("export interrupted by the daemon's stop");
    Status undo = UndoInitialState(vm_id, epoch, ReplicationState::kReadyForReplication);
    if (!undo.ok()) spdlog::error("VM {}: resetting the state failed: {}", vm_id, undo.ToString());
    Status f = RecordFailure(vm_id, r.status(), false);
    (void)f;
    return r.status().WithContext("export of the initial replica");
  }
  const auto& [summary, report] = *r;
  if (Status s = catalog_->RunInTransaction([&]() -> Status {
        VMR_ASSIGN_OR_RETURN(StatisticsRecord st, LoadStatistics(vm_id));
        st.initial_replication_size_bytes = report.data_bytes;
        return catalog_->PutStatistics(st);
      });
      !s.ok()) {
    spdlog::warn("VM {}: recording the export's size failed: {}", vm_id, s.ToString());
  }
  // Tell the replica now; when it cannot be reached, every cycle asks again
  // before it sends a log.
  std::string reserved = "reserved on the replica";
  if (Status s = ReserveImportOnReplica(vm_id); !s.ok()) {
    reserved = "the replica could not be told yet (" + s.ToString() + "); every cycle tries again";
    spdlog::warn("VM {}: {}", vm_id, reserved);
  }
  if (job) {
    job->SetResult(nlohmann::json{{"directory", summary.directory},
                                  {"data_bytes", summary.totals.data_bytes},
                                  {"zero_bytes", summary.totals.zero_bytes},
                                  {"stored_bytes", summary.totals.stored_bytes},
                                  {"data_chunks", summary.totals.data_chunks},
                                  {"zero_chunks", summary.totals.zero_chunks},
                                  {"data_files", summary.data_files},
                                  {"import", reserved},
                                  {"duration_ms", report.duration_ms}}
                       .dump());
  }
  spdlog::info("VM {}: initial replica exported to {}: {} bytes of data ({} stored) in {} ms; waiting for "
               "ImportInitialReplica on the replica",
               vm_id, summary.directory, summary.totals.data_bytes, summary.totals.stored_bytes, report.duration_ms);
  KickWorker(vm_id);
  return Status::Ok();
}

Status ReplicationEngine::ReserveImportOnReplica(const std::string& vm_id) {
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, kPrimaryIndex));
  if (!rel) return Status::NotFound("VM " + vm_id + " has no replication relationship");
  VMR_ASSIGN_OR_RETURN(GenerationId generation, ParseHexId(rel->generation_id));
  if (!options_.open_channel) return Status::Internal("replication engine: no channel factory");
  VMR_ASSIGN_OR_RETURN(auto channel, options_.open_channel(rel->settings.recovery_connection_point,
                                                           static_cast<uint16_t>(rel->settings.recovery_server_port)));
  ReplicaClient client(channel);
  return client.ReserveImport(vm_id, kPrimaryIndex, generation, /*release=*/false).status();
}

uint64_t ReplicationEngine::NextInitialEpoch(const std::string& vm_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return ++initial_epoch_[vm_id];
}

// Puts the relationship back to `state_before` when it is still in the
// copy's own state and no newer StartReplication owns it (checked inside
// the transaction that writes it).
Status ReplicationEngine::UndoInitialState(const std::string& vm_id, uint64_t epoch, ReplicationState state_before) {
  return UpdateRelationship(vm_id, [&](RelationshipRecord& r) {
    if (!IsCurrentInitial(vm_id, epoch)) return Status::Ok();
    if (r.state == ReplicationState::kWaitingToCompleteInitialReplication ||
        (r.state == ReplicationState::kSuspended && r.generation_id.empty())) {
      r.state = state_before;
    }
    return Status::Ok();
  });
}

// The initial copy's job. Before its StartTime the job waits (state
// Running, 0%); a cancel then returns the relationship to the state it had.
Result<JobRecord> ReplicationEngine::StartInitialJob(const std::string& vm_id, const std::string& vm_name,
                                                     int64_t start_unix_s, ReplicationState state_before,
                                                     uint64_t epoch, bool seeded) {
  nlohmann::json params = {{"vm", vm_id}, {"start_time_unix_s", start_unix_s}, {"seeded", seeded}};
  auto job = jobs_->Start(
      seeded ? JobType::kSeededInitialReplication : JobType::kInitialReplicationNetwork, vm_name, params.dump(),
      /*cancellable=*/true,
      /*resumable=*/false, [this, vm_id, start_unix_s, state_before, epoch, seeded](JobContext& jc) -> Status {
        while (start_unix_s != 0 && Now() / 1000 < start_unix_s) {
          if (stop_flag_.load()) {
            // The daemon stops: the state stays Waiting (2) and the next
            // start schedules the copy again for its StartTime.
            return Status::Cancelled("vmreplicad stops; the scheduled initial replication resumes at its next start");
          }
          if (jc.CancelRequested()) {
            Status undo = UndoInitialState(vm_id, epoch, state_before);
            if (!undo.ok()) spdlog::error("VM {}: resetting the state failed: {}", vm_id, undo.ToString());
            return Status::Cancelled("the initial replication was cancelled before its start time");
          }
          std::this_thread::sleep_for(std::chrono::milliseconds(200));
        }
        return RunInitial(vm_id, &jc, epoch, seeded);
      });
  if (!job.ok()) {
    Status undo = UndoInitialState(vm_id, epoch, state_before);
    (void)undo;
    return job.status();
  }
  return job;
}

bool ReplicationEngine::IsCurrentInitial(const std::string& vm_id, uint64_t epoch) {
  std::lock_guard<std::mutex> lock(mu_);
  return initial_epoch_[vm_id] == epoch;
}

Status ReplicationEngine::RunInitial(const std::string& vm_id, JobContext* job, uint64_t epoch, bool seeded) {
  Result<CycleReport> r = Status::Unavailable("not run");
  nlohmann::json reverse_result;  // the reverse start's own members (empty otherwise)
  {
    auto vm_lock = VmLock(vm_id);
    std::lock_guard<std::mutex> l(*vm_lock);
    Slot slot(this);
    auto reverse = RunReverseStart(vm_id, job, &reverse_result);
    if (reverse) {
      r = std::move(*reverse);
    } else {
      r = RunCycle(vm_id, /*initial=*/true, job, /*resync=*/seeded);
    }
  }
  if (!r.ok()) {
    if (stop_flag_.load()) {
      // Ended by the daemon's stop, not by a fault: the state stays
      // Waiting (2) so the next start runs the copy again by itself.
      return r.status().WithContext("initial replication interrupted by the daemon's stop");
    }
    // Only the copy's own state goes back (a suspend or cancel meanwhile
    // stays), and only when no newer StartReplication owns it by now.
    Status undo = UndoInitialState(vm_id, epoch, ReplicationState::kReadyForReplication);
    if (!undo.ok()) spdlog::error("VM {}: resetting the state failed: {}", vm_id, undo.ToString());
    Status f = RecordFailure(vm_id, r.status(), IsNetworkError(r.status()));
    (void)f;
    return r.status().WithContext("initial replication");
  }
  bool replicating = false;
  VMR_RETURN_IF_ERROR(UpdateRelationship(vm_id, [&](RelationshipRecord& rel) {
    // Suspended during the copy: stays suspended (resume starts the cycles).
    if (rel.state == ReplicationState::kWaitingToCompleteInitialReplication) {
      rel.state = ReplicationState::kReplicating;
    }
    replicating = rel.state == ReplicationState::kReplicating;
    return Status::Ok();
  }));
  if (Status s = RecordSuccess(vm_id, *r); !s.ok()) {
    spdlog::error("VM {}: recording the initial copy's statistics failed: {}", vm_id, s.ToString());
  }
  if (job) {
    nlohmann::json out = {{"sequence", r->sequence},   {"data_bytes", r->data_bytes},
                          {"zero_bytes", r->zero_bytes}, {"wire_bytes", r->wire_bytes},
                          {"records", r->records},       {"duration_ms", r->duration_ms}};
    if (reverse_result.is_object()) out.update(reverse_result);
    if (r->read_bytes != 0 || r->hole_bytes != 0) {  // seeded: what comparing read
      out["read_bytes"] = r->read_bytes;
      out["hole_bytes"] = r->hole_bytes;
    }
    job->SetResult(out.dump());
  }
  spdlog::info("VM {}: initial replication done: {} bytes of data ({} on the wire) in {} ms", vm_id,
               r->data_bytes, r->wire_bytes, r->duration_ms);
  if (replicating) KickWorker(vm_id);
  return Status::Ok();
}

Status ReplicationEngine::RequestStateChange(const std::string& vm, int index, RequestedReplicationState requested) {
  if (index != kPrimaryIndex) return Status::NotSupported("extended replication is not supported yet");
  VMR_ASSIGN_OR_RETURN(auto rec, ResolveVm(vm));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(rec.id, index));
  if (!rel) return Status::FailedPrecondition("VM " + rec.name + " has no replication relationship");
  auto op = OperationForRequestedState(requested);
  if (!op) return Status::InvalidArgument("RequestedState: not a replication state change");
  // Planned failover (4) runs as a job (PrepareForPlannedFailover).
  if (*op == Operation::kRequestPrepareForPlannedFailover) return PrepareForPlannedFailover(rec.id).status();
  const bool built = *op == Operation::kRequestSuspend || *op == Operation::kRequestResume ||
                     *op == Operation::kRequestCancelInitialReplication ||
                     *op == Operation::kRequestCancelResynchronization;
  if (!built) {
    return Status::NotSupported("RequestedState " + std::to_string(static_cast<int>(requested)) +
                                " is not supported by this vmreplica build yet");
  }
  VMR_RETURN_IF_ERROR(RequirePrimary(rec, *rel, "RequestReplicationStateChange"));
  VMR_RETURN_IF_ERROR(CheckTransition(TableMode::kPrimary, rel->state, *op).status());
  if (*op == Operation::kRequestResume && (rel->state == ReplicationState::kWaitingForStartResynchronize ||
                                           rel->state == ReplicationState::kResynchronizeSuspended)) {
    // Resuming a resync that waits or was paused runs it: it continues its
    // log where it stopped when it can, else it starts over (RunCycle).
    return Resynchronize(rec.id, 0).status();
  }
  if (*op == Operation::kRequestResume && rel->state != ReplicationState::kSuspended &&
      rel->state != ReplicationState::kCritical) {
    return Status::NotSupported("resuming from " + std::string(Name(rel->state)) +
                                " (an update of the disk set) is not supported by this vmreplica build yet");
  }
  // Pausing or cancelling a running resync ends its job (the state changes
  // first, so the job's own error path leaves it alone).
  const bool end_resync = rel->state == ReplicationState::kResynchronizing &&
                          (*op == Operation::kRequestSuspend || *op == Operation::kRequestCancelResynchronization);
  if (*op == Operation::kRequestCancelInitialReplication) {
    auto jobs = jobs_->List();
    if (jobs.ok()) {
      for (const auto& j : *jobs) {
        if ((j.type == JobType::kInitialReplicationNetwork || j.type == JobType::kSeededInitialReplication ||
             j.type == JobType::kExportInitialReplication) &&
            j.parameters_json.find(rec.id) != std::string::npos &&
            (j.state == JobState::kNew || j.state == JobState::kStarting || j.state == JobState::kRunning)) {
          Status c = jobs_->Cancel(j.id);
          (void)c;
        }
      }
    }
  }
  // A cancelled resync is not continued later: the next one starts over.
  if (*op == Operation::kRequestCancelResynchronization) DropResyncProgress(rec.id);
  ReplicationState after = rel->state;
  VMR_RETURN_IF_ERROR(UpdateRelationship(rec.id, [&](RelationshipRecord& r) -> Status {
    VMR_ASSIGN_OR_RETURN(auto t, CheckTransition(TableMode::kPrimary, r.state, *op));
    r.state = t.after;
    // A cancelled initial replication (an export waiting for its import
    // too) starts from nothing again: the next copy releases the replica's
    // reservation and staged logs.
    if (*op == Operation::kRequestCancelInitialReplication) {
      r.generation_id.clear();
      r.sequence = 0;
    }
    // Resumed before the initial copy finished: there is nothing to send
    // deltas against yet; StartReplication runs it again.
    if (r.state == ReplicationState::kReplicating && r.generation_id.empty()) {
      r.state = ReplicationState::kReadyForReplication;
    }
    // Resumed while an export waits for its import (nothing applied on the
    // replica yet): back to waiting; its cycles go on there.
    if (r.state == ReplicationState::kReplicating && r.initial_replication_type == InitialReplicationType::kExport &&
        r.last_apply_ms == 0) {
      r.state = ReplicationState::kWaitingToCompleteInitialReplication;
    }
    after = r.state;
    StatisticsRecord none;
    r.health = EvaluateHealth(r, none, Now(), 0).health;
    return Status::Ok();
  }));
  spdlog::info("VM {}: replication state {} -> {}", rec.name, Name(rel->state), Name(after));
  if (end_resync) {
    auto jobs = jobs_->List();
    if (jobs.ok()) {
      for (const auto& j : *jobs) {
        if (j.type == JobType::kResynchronizing && j.parameters_json.find(rec.id) != std::string::npos &&
            (j.state == JobState::kNew || j.state == JobState::kStarting || j.state == JobState::kRunning)) {
          Status c = jobs_->Cancel(j.id);
          if (!c.ok()) spdlog::warn("VM {}: cancelling resync job {}: {}", rec.name, j.id, c.ToString());
        }
      }
    }
  }
  if (after == ReplicationState::kReplicating ||
      (after == ReplicationState::kWaitingToCompleteInitialReplication && *op == Operation::kRequestResume)) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      failures_[rec.id] = 0;
    }
    KickWorker(rec.id);
  }
  return Status::Ok();
}

Status ReplicationEngine::ModifySettings(const std::string& vm, const RelationshipSettings& settings) {
  VMR_ASSIGN_OR_RETURN(auto rec, ResolveVm(vm));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(rec.id, kPrimaryIndex));
  if (!rel) return Status::FailedPrecondition("VM " + rec.name + " has no replication relationship");
  VMR_RETURN_IF_ERROR(RequirePrimary(rec, *rel, "ModifyReplicationSettings"));
  VMR_RETURN_IF_ERROR(CheckTransition(TableMode::kPrimary, rel->state, Operation::kModifyReplicationSettings).status());
  VMR_RETURN_IF_ERROR(ValidateRelationshipSettings(settings, /*extended=*/false));
  if (settings.recovery_connection_point != rel->settings.recovery_connection_point ||
      settings.recovery_server_port != rel->settings.recovery_server_port) {
    return Status::InvalidArgument(
        "RecoveryConnectionPoint/RecoveryServerPortNumber: the replica server of a relationship cannot change; "
        "remove and create the relationship again");
  }
  if (settings.included_disks != rel->settings.included_disks) {
    return Status::InvalidArgument("IncludedDisks: the replicated disks cannot change after the relationship exists");
  }
  VMR_RETURN_IF_ERROR(UpdateRelationship(rec.id, [&](RelationshipRecord& r) {
    r.settings = settings;
    return Status::Ok();
  }));
  {
    std::lock_guard<std::mutex> lock(mu_);
    replica_settings_synced_.erase(rec.id);
  }
  // The replica applies RecoveryHistory (its retention) now when it can be
  // reached; otherwise the next cycle hands the settings over.
  if (options_.open_channel) {
    auto channel = options_.open_channel(settings.recovery_connection_point,
                                         static_cast<uint16_t>(settings.recovery_server_port));
    Status sent = channel.ok() ? ReplicaClient(*channel).ModifyReplica(rec.id, kPrimaryIndex, settings).status()
                               : channel.status();
    if (sent.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      replica_settings_synced_.insert(rec.id);
    } else {
      spdlog::warn("VM {}: new settings not yet on the replica ({}); the next cycle sends them", rec.name,
                   sent.ToString());
    }
  }
  KickWorker(rec.id);
  return Status::Ok();
}

void ReplicationEngine::DropResyncProgress(const std::string& vm_id) {
  std::lock_guard<std::mutex> lock(mu_);
  resync_progress_.erase(vm_id);
}

Status ReplicationEngine::ReleaseForReverse(const std::string& vm_id) {
  DropResyncProgress(vm_id);
  std::unique_ptr<Worker> worker;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = workers_.find(vm_id);
    if (it != workers_.end()) {
      worker = std::move(it->second);
      workers_.erase(it);
    }
    failures_.erase(vm_id);
    last_failure_.erase(vm_id);
    replica_state_.erase(vm_id);
    pending_.erase(vm_id);
    last_cycle_.erase(vm_id);
    replica_settings_synced_.erase(vm_id);
    app_retry_at_.erase(vm_id);
  }
  if (worker) {
    {
      std::lock_guard<std::mutex> l(worker->mu);
      worker->stop = true;
    }
    worker->cv.notify_all();
    worker->thread.join();
  }
  // A job of the VM (initial copy, resync, planned failover) holds the lock
  // for its whole work: once we had it, none runs.
  auto vm_lock = VmLock(vm_id);
  { std::lock_guard<std::mutex> l(*vm_lock); }
  spdlog::info("VM {}: replication released for a reverse (worker stopped)", vm_id);
  return Status::Ok();
}

void ReplicationEngine::ResumeAfterReverse(const std::string& vm_id) {
  auto rel = catalog_->GetRelationship(vm_id, kPrimaryIndex);
  if (!rel.ok() || !*rel || (*rel)->local_mode != ReplicationMode::kPrimary) return;
  const ReplicationState s = (*rel)->state;
  const bool runs_cycles = s == ReplicationState::kReplicating || s == ReplicationState::kCritical ||
                           s == ReplicationState::kSuspended ||
                           s == ReplicationState::kWaitingForStartResynchronize ||
                           s == ReplicationState::kResynchronizeSuspended;
  if (!runs_cycles) return;
  spdlog::info("VM {}: the reverse did not happen; replication resumes (state {})", vm_id, Name(s));
  KickWorker(vm_id);
}

Status ReplicationEngine::RemoveRelationship(const std::string& vm, int index) {
  if (auto rec = ResolveVm(vm); rec.ok()) DropResyncProgress(rec->id);
  if (index != kPrimaryIndex) return Status::NotSupported("extended replication is not supported yet");
  VMR_ASSIGN_OR_RETURN(auto rec, ResolveVm(vm));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(rec.id, index));
  if (!rel) return Status::FailedPrecondition("VM " + rec.name + " has no replication relationship");
  VMR_RETURN_IF_ERROR(RequirePrimary(rec, *rel, "RemoveReplicationRelationship"));
  VMR_RETURN_IF_ERROR(CheckTransition(TableMode::kPrimary, rel->state, Operation::kRemoveReplicationRelationship)
                          .status());
  std::unique_ptr<Worker> worker;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = workers_.find(rec.id);
    if (it != workers_.end()) {
      worker = std::move(it->second);
      workers_.erase(it);
    }
    // Nothing of the old relationship may colour a new one.
    failures_.erase(rec.id);
    last_failure_.erase(rec.id);
    replica_state_.erase(rec.id);
    pending_.erase(rec.id);
    last_cycle_.erase(rec.id);
    replica_settings_synced_.erase(rec.id);
    app_retry_at_.erase(rec.id);
  }
  if (worker) {
    {
      std::lock_guard<std::mutex> l(worker->mu);
      worker->stop = true;
    }
    worker->cv.notify_all();
    worker->thread.join();
  }
  auto vm_lock = VmLock(rec.id);
  std::lock_guard<std::mutex> l(*vm_lock);
  // Tell the replica (best effort: each side is removed separately).
  if (options_.open_channel) {
    auto channel = options_.open_channel(rel->settings.recovery_connection_point,
                                         static_cast<uint16_t>(rel->settings.recovery_server_port));
    if (channel.ok()) {
      ReplicaClient client(*channel);
      Status s = client.RemoveReplica(rec.id, index);
      if (!s.ok()) spdlog::warn("VM {}: the replica side was not removed: {}", rec.name, s.ToString());
    } else {
      spdlog::warn("VM {}: the replica server was not reached, its side was not removed: {}", rec.name,
                   channel.status().ToString());
    }
  }
  // Stop tracking: drop this relationship's bitmaps when QEMU is reachable.
  auto def = DefinitionOf(rec);
  if (def.ok()) {
    const std::string run_dir = RunDirOf(rec.id);
    if (MakeDirs(run_dir).ok()) {
      auto attached = AttachVm(*def, run_dir);
      if (attached.ok()) {
        ChangeTracker tracker((*attached)->qmp(), rec.id, (*attached)->tracked_disks(), {});
        auto rep = tracker.Reconcile();
        Status s = rep.ok() ? tracker.Disable() : rep.status();
        if (!s.ok()) spdlog::warn("VM {}: tracking bitmaps not dropped: {}", rec.name, s.ToString());
      }
    }
  }
  return catalog_->RunInTransaction([&]() -> Status {
    VMR_RETURN_IF_ERROR(catalog_->DeleteRelationship(rec.id, index));
    VmRecord v = rec;
    v.mode = ReplicationMode::kNone;
    return catalog_->PutVm(v);
  });
}

Result<ReplicationEngine::PrimaryRunState> ReplicationEngine::QueryPrimaryRunState(
    const std::vector<std::string>& caller_names, const std::string& vm_id) {
  VMR_ASSIGN_OR_RETURN(auto rec, catalog_->GetVm(vm_id));
  if (!rec) return Status::NotFound("VM " + vm_id + " is not replicated from this host");
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, kPrimaryIndex));
  if (!rel) return Status::NotFound("VM " + vm_id + " is not replicated from this host");
  // After a failback (docs/failover.md section 13.2) this host holds a
  // replica in 14 whose failback target (RecoveryConnectionPoint) asks
  // before it runs the VM again.
  const bool failed_back =
      rec->mode == ReplicationMode::kReplica && rel->state == ReplicationState::kFailbackComplete;
  if (rec->mode != ReplicationMode::kPrimary && !failed_back) {
    return Status::NotFound("VM " + vm_id + " is not replicated from this host");
  }
  auto lower = [](std::string t) {
    std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return std::tolower(c); });
    return t;
  };
  const std::string server = lower(rel->settings.recovery_connection_point);
  const bool is_replica = std::any_of(caller_names.begin(), caller_names.end(),
                                      [&](const std::string& n) { return lower(n) == server; });
  if (!is_replica) {
    return Status::PermissionDenied("the caller is not the " +
                                    std::string(failed_back ? "failback target" : "replica server") + " of VM " +
                                    vm_id + " (" + rel->settings.recovery_connection_point + ")");
  }
  PrimaryRunState out;
  out.state = rel->state;
  if (failed_back) {
    // A failback sends a frozen image: the failover VM was stopped, and in
    // 14 nothing starts it here (StartVm needs state 6).
    out.run_state = 2;
    out.detail = "failback complete: the failover VM on this host is stopped";
    return out;
  }
  VMR_ASSIGN_OR_RETURN(auto def, DefinitionOf(*rec));
  switch (def.kind) {
    case VmSourceKind::kOffline:
      out.run_state = 2;
      out.detail = "an offline VM: its disks are served by qemu-storage-daemon, no guest runs";
      return out;
    case VmSourceKind::kLibvirt: {
      auto power = QueryVmPower(def);
      if (!power.ok()) {
        out.run_state = 0;
        out.detail = "libvirt cannot tell: " + power.status().message();
      } else {
        out.run_state = power->power == VmPower::kOff ? 2 : power->power == VmPower::kRunning ? 1 : 0;
        out.detail = power->detail;
      }
      return out;
    }
    case VmSourceKind::kQmp:
      break;
  }
  // A cycle holds the VM's QMP connection (QEMU serves one monitor client
  // at a time); a cycle in progress means QEMU answered a moment ago.
  auto vm_lock = VmLock(vm_id);
  std::unique_lock<std::mutex> l(*vm_lock, std::try_to_lock);
  if (!l.owns_lock()) {
    out.run_state = 1;
    out.detail = "a replication cycle of the VM is in progress";
    return out;
  }
  QmpClientOptions qo;
  qo.connect_timeout = std::chrono::seconds(5);
  auto qmp = QmpClient::Connect(def.qmp_socket, qo);
  if (!qmp.ok() && qmp.status().code() == Code::kTimeout) {
    // Something listens but does not greet: QEMU serving another monitor client.
    out.run_state = 1;
    out.detail = "QEMU's monitor at " + def.qmp_socket + " is busy (" + qmp.status().message() + ")";
    return out;
  }
  if (!qmp.ok()) {
    out.run_state = 2;
    out.detail = "QEMU does not answer at " + def.qmp_socket + " (" + qmp.status().message() + ")";
    return out;
  }
  auto status = (*qmp)->Execute("query-status", nullptr, std::chrono::seconds(5));
  if (!status.ok() || !status->is_object() || !status->contains("status") || !(*status)["status"].is_string()) {
    out.run_state = 0;
    out.detail = "QEMU answers but query-status failed";
    return out;
  }
  const std::string st = (*status)["status"].get<std::string>();
  out.run_state = (st == "shutdown" || st == "guest-panicked" || st == "internal-error") ? 2 : 1;
  out.detail = "QEMU status " + st;
  return out;
}

Result<StatisticsRecord> ReplicationEngine::GetStatistics(const std::string& vm, int index) {
  VMR_ASSIGN_OR_RETURN(auto rec, ResolveVm(vm));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(rec.id, index));
  if (!rel) return Status::FailedPrecondition("VM " + rec.name + " has no replication relationship");
  VMR_ASSIGN_OR_RETURN(auto stats, catalog_->GetStatistics(rec.id, index));
  StatisticsRecord s = stats.value_or(StatisticsRecord{});
  s.vm_id = rec.id;
  s.index = index;
  // The window as of now (a window that ended is reported as the new,
  // empty one; the next recorded event stores it).
  VMR_ASSIGN_OR_RETURN(auto server, catalog_->GetServerSettings());
  RollStatisticsWindow(s, server, Now());
  s.end_ms = Now();  // EndStatisticTime: the window is open; this is when it was read
  int failures = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = failures_.find(rec.id);
    if (it != failures_.end()) failures = it->second;
  }
  HealthVerdict h = rel->local_mode == ReplicationMode::kPrimary ? FullHealth(*rel, s, failures)
                                                                  : EvaluateHealth(*rel, s, Now(), failures);
  s.replication_health = h.health;
  if (rel->local_mode == ReplicationMode::kPrimary) s.health_issues = h.issues;
  return s;
}

Status ReplicationEngine::ResetStatistics(const std::string& vm, int index) {
  VMR_ASSIGN_OR_RETURN(auto rec, ResolveVm(vm));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(rec.id, index));
  if (!rel) return Status::FailedPrecondition("VM " + rec.name + " has no replication relationship");
  return catalog_->ResetStatistics(rec.id, index, Now());
}

// ------------------------------------------------------------------ reverse start


std::optional<Result<CycleReport>> ReplicationEngine::RunReverseStart(const std::string& vm_id, JobContext* job,
                                                                      nlohmann::json* extra_result) {
  auto record = SwitchedReverse(options_.state_dir, vm_id);
  if (!record) return std::nullopt;
  auto run = [&]() -> Result<CycleReport> {
    VMR_ASSIGN_OR_RETURN(auto vm, catalog_->GetVm(vm_id));
    if (!vm) return Status::NotFound("VM " + vm_id + " is no longer in the catalog");
    VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, kPrimaryIndex));
    if (!rel) return Status::NotFound("VM " + vm_id + " has no replication relationship");
    VMR_ASSIGN_OR_RETURN(auto def, DefinitionOf(*vm));
    VMR_ASSIGN_OR_RETURN(auto included, IncludedDisks(def, rel->settings));
    if (!options_.open_channel) return Status::Internal("replication engine: no channel factory");
    VMR_ASSIGN_OR_RETURN(auto channel,
                         options_.open_channel(rel->settings.recovery_connection_point,
                                               static_cast<uint16_t>(rel->settings.recovery_server_port)));
    ReverseSyncParams p;
    p.vm_id = vm_id;
    p.definition = def;
    for (const auto& d : included) p.disks.push_back(d.name);
    p.run_dir = RunDirOf(vm_id);
    VMR_RETURN_IF_ERROR(MakeDirs(p.run_dir));
    p.channel = channel;
    p.claim = *record->claim;
    // B's history since the common point (written by CommitFailover).
    const std::string since_path = options_.state_dir + "/failover/" + vm_id + ".since";
    auto since = ReadRangeListFile(since_path, kRangeListSince, static_cast<uint32_t>(included.size()));
    if (since.ok()) {
      p.since = std::move(*since);
    } else if (since.status().code() != Code::kNotFound) {
      spdlog::warn("VM {}: the since file cannot be used ({}): every block is a candidate", vm_id,
                   since.status().ToString());
    }
    p.kind = ReplicationType::kRegular;
    p.compress = rel->settings.compression_enabled;
    p.throttle = [this](uint64_t bytes) { Throttle(bytes); };
    p.job = job;
    // A sync that reached A before this host recorded it is finished, not
    // run again (A no longer waits at point 1).
    VMR_ASSIGN_OR_RETURN(auto delivered, ReverseSyncDelivered(channel, vm_id));
    ReverseSyncReport rep;
    if (delivered) {
      spdlog::warn("VM {}: the old primary already holds log {} of this reverse; the reverse start is finished", vm_id,
                   delivered->sequence);
      rep = *delivered;
    } else {
      VMR_ASSIGN_OR_RETURN(rep, RunReverseSync(p));
    }
    CycleReport report;
    report.sequence = rep.sequence;
    report.initial = true;
    report.kind = ReplicationType::kRegular;
    report.records = rep.records;
    report.data_bytes = rep.data_bytes;
    report.zero_bytes = rep.zero_bytes;
    report.wire_bytes = rep.wire_bytes;
    report.cut_time_ms = rep.cut_time_ms;
    const std::string gen = HexId(rep.generation);
    VMR_RETURN_IF_ERROR(UpdateRelationship(vm_id, [&](RelationshipRecord& r) {
      r.generation_id = gen;
      return Status::Ok();
    }));
    *extra_result = {{"reverse", true},
                     {"candidate_bytes", rep.candidate_bytes},
                     {"whole_disks", rep.whole_disks},
                     {"generation", gen}};
    // Done: the records of the reverse go (the failover record stays: it
    // holds the VM's launcher and wrappers).
    for (const std::string& path : {ReverseSendRecordPath(options_.state_dir, vm_id), since_path}) {
      if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
        spdlog::warn("VM {}: removing {}: {}", vm_id, path, std::strerror(errno));
      }
    }
    spdlog::info("VM {}: reverse start done: {} bytes of data and {} bytes of zeros sent, {} candidate bytes compared "
                 "by hash{}",
                 vm_id, rep.data_bytes, rep.zero_bytes, rep.candidate_bytes,
                 rep.whole_disks ? " (every block was a candidate)" : "");
    return report;
  };
  return run();
}

}  // namespace vmreplica
