// ReplicaManager: the replica side of docs/protocol.md "Data plane".
#include <fcntl.h>
#include <limits.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>
#include <zstd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "vmreplica/fileutil.h"
#include "vmreplica/reverse.h"
#include "vmreplica/transfer.h"
#include "stream_apply.h"

namespace vmreplica {

namespace {

int64_t SystemNowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

bool IsUuid(const std::string& s) {
  if (s.size() != 36) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-') return false;
    } else if (!std::isxdigit(static_cast<unsigned char>(c))) {
      return false;
    }
  }
  return true;
}

Result<std::string> RealPath(const std::string& path) {
  char buf[PATH_MAX];
  if (::realpath(path.c_str(), buf) == nullptr) {
    const int e = errno;
    if (e == ENOENT) return Status::NotFound("no such path: " + path);
    return Status::IOError("realpath " + path + ": " + std::strerror(e));
  }
  return std::string(buf);
}

// Whether `path` exists (without following a final symlink).
Result<bool> Exists(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) return true;
  if (errno == ENOENT) return false;
  return Status::IOError("lstat " + path + ": " + std::strerror(errno));
}

bool ValidDiskName(const std::string& n) {
  if (n.empty() || n.size() > 64 || n[0] == '.') return false;
  for (char c : n) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') return false;
  }
  return true;
}

Status ValidateDisks(const std::vector<ReplicaDisk>& disks) {
  if (disks.empty() || disks.size() > kLogMaxDisks) return Status::InvalidArgument("a replica needs 1..64 disks");
  for (size_t i = 0; i < disks.size(); ++i) {
    const auto& d = disks[i];
    if (!ValidDiskName(d.name)) return Status::InvalidArgument("bad disk name '" + d.name + "'");
    if (d.size == 0 || d.size % kReplicaBlockSize != 0 || d.size > kLogMaxDiskSize) {
      return Status::InvalidArgument("disk " + d.name + ": size must be a positive multiple of 4096");
    }
    for (size_t j = 0; j < i; ++j) {
      if (disks[j].name == d.name) return Status::InvalidArgument("disk " + d.name + " given twice");
    }
  }
  return Status::Ok();
}

bool SameDisks(const std::vector<ReplicaDisk>& a, const std::vector<ReplicaDisk>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].size != b[i].size) return false;
  }
  return true;
}

// The ownership record beside a store (docs/protocol.md step 6).
struct Owner {
  std::string trust_group;
  std::string authorized_by;
  std::vector<std::string> names;
};

std::string OwnerPath(const std::string& dir) { return dir + ".primary"; }

Result<std::optional<Owner>> ReadOwner(const std::string& dir) {
  const std::string path = OwnerPath(dir);
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return std::optional<Owner>();
    return Status::IOError("lstat " + path + ": " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) return Status::PermissionDenied(path + " is not a regular file");
  VMR_ASSIGN_OR_RETURN(std::string text, ReadFile(path, 1 << 20));
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("trust_group") || !j["trust_group"].is_string()) {
    return Status::Corruption(path + ": not an ownership record");
  }
  Owner o;
  o.trust_group = j["trust_group"].get<std::string>();
  if (j.contains("authorized_by") && j["authorized_by"].is_string()) o.authorized_by = j["authorized_by"];
  return std::optional<Owner>(o);
}

Status WriteOwner(const std::string& dir, const PrimaryCaller& caller) {
  nlohmann::json j;
  j["trust_group"] = caller.entry.trust_group;
  j["authorized_by"] = caller.entry.allowed_primary_host_system;
  j["names"] = caller.names;
  return WriteFileAtomic(OwnerPath(dir), j.dump(2) + "\n", 0600);
}

Status CheckOwner(const std::string& dir, const std::string& vm_id, const PrimaryCaller& caller) {
  VMR_ASSIGN_OR_RETURN(auto owner, ReadOwner(dir));
  if (!owner) {
    return Status::PermissionDenied("VM " + vm_id + " was not created here by a primary of this storage location");
  }
  if (owner->trust_group != caller.entry.trust_group) {
    return Status::PermissionDenied("VM " + vm_id + " belongs to trust group '" + owner->trust_group +
                                    "', the caller's entry has '" + caller.entry.trust_group + "'");
  }
  return Status::Ok();
}

std::string GenerationText(const std::string& bytes) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out.push_back(hex[c >> 4]);
    out.push_back(hex[c & 15]);
  }
  return out;
}

bool IsAllZero(const std::string& bytes) {
  return std::all_of(bytes.begin(), bytes.end(), [](char c) { return c == 0; });
}

bool SameStart(const v1::DeltaStart& a, const v1::DeltaStart& b) {
  return a.vm_id() == b.vm_id() && a.relationship_index() == b.relationship_index() && a.sequence() == b.sequence() &&
         a.base_generation() == b.base_generation() && a.new_generation() == b.new_generation() &&
         a.cut_time_unix_ms() == b.cut_time_unix_ms() && a.kind() == b.kind() && a.initial() == b.initial();
}

// Whether the store's load in progress is the network load of log 1 `start`
// (and not an import's, or another copy's).
bool OwnsLoad(const ReplicaStore& store, const v1::DeltaStart& start) {
  auto ls = store.load_state();
  return ls && ls->info.source == "network" && ls->info.tag == "network:" + GenerationText(start.new_generation());
}

// GetRangeHashes (docs/protocol.md "GetRangeHashes"): the largest `ranges`
// blob; runs per disk before the merge gap is doubled; the first merge gap.
constexpr size_t kMaxRangeBlobBytes = size_t{16} << 20;
constexpr size_t kMaxRunsPerDisk = size_t{1} << 20;
constexpr uint64_t kRunMergeGap = uint64_t{1} << 20;

// A run of whole blocks of one disk.
struct HashRun {
  uint64_t first_block = 0;
  uint64_t block_count = 0;
};

// The entries of a kind-1 list as ranges.
std::vector<ReplicaRange> Ranges(const SinceList& list) {
  std::vector<ReplicaRange> out;
  out.reserve(list.entries.size());
  for (const RangeEntry& e : list.entries) out.push_back(ReplicaRange{e.disk, e.offset, e.length});
  return out;
}

// The first entry that ends past its disk, or -1.
int64_t FirstOutside(const SinceList& list, const std::vector<ReplicaDisk>& disks) {
  for (size_t i = 0; i < list.entries.size(); ++i) {
    const RangeEntry& e = list.entries[i];
    // disk < disks.size() and offset + length without overflow: rules of 15.1.
    if (e.offset + e.length > disks[e.disk].size) return static_cast<int64_t>(i);
  }
  return -1;
}

std::vector<std::vector<HashRun>> EveryBlock(const std::vector<ReplicaDisk>& disks, uint32_t block_size) {
  std::vector<std::vector<HashRun>> out(disks.size());
  for (size_t d = 0; d < disks.size(); ++d) {
    const uint64_t blocks = disks[d].size / block_size + (disks[d].size % block_size != 0 ? 1 : 0);
    if (blocks > 0) out[d].push_back(HashRun{0, blocks});
  }
  return out;
}

// The runs GetRangeHashes hashes, one vector per disk of `disks` (in
// order), each ascending and not overlapping: with `all_blocks` one run
// covering the disk; otherwise the entries of `ranges_blob` (range list v1,
// kind 1, parsed with every rule of 15.1 for disks.size() disks; every
// entry must end inside its disk) united with those of the file
// ReverseAcandPath(state_dir, vm_id) (`state_dir` "": none), rounded out to `block_size` (> 0), runs closer than kRunMergeGap
// merged, the gap doubled while a disk has more than kMaxRunsPerDisk runs.
// An acand file that is missing, cannot be read or fails a check (or names
// a range outside a disk) is logged and the answer is every block. InvalidArgument
// for a bad blob (or one over kMaxRangeBlobBytes), naming the rule.
Result<std::vector<std::vector<HashRun>>> CandidateRuns(std::string_view ranges_blob, bool all_blocks,
                                                        const std::vector<ReplicaDisk>& disks, uint32_t block_size,
                                                        const std::string& state_dir, const std::string& vm_id) {
  if (block_size == 0) return Status::InvalidArgument("block_size 0");
  if (disks.empty() || disks.size() > kRangeListMaxDisks) {
    return Status::InvalidArgument("a store of " + std::to_string(disks.size()) + " disks");
  }
  const auto disk_count = static_cast<uint32_t>(disks.size());
  if (all_blocks) {
    if (!ranges_blob.empty()) return Status::InvalidArgument("ranges and all_blocks given together");
    return EveryBlock(disks, block_size);
  }
  if (ranges_blob.size() > kMaxRangeBlobBytes) {
    return Status::InvalidArgument("ranges: " + std::to_string(ranges_blob.size()) + " bytes, more than 16 MiB");
  }
  auto parsed = ParseRangeList(ranges_blob, kRangeListCandidates, disk_count);
  if (!parsed.ok()) return parsed.status().WithContext("ranges");
  SinceList theirs = std::move(*parsed);
  if (int64_t i = FirstOutside(theirs, disks); i >= 0) {
    const RangeEntry& e = theirs.entries[static_cast<size_t>(i)];
    return Status::InvalidArgument("ranges: entry " + std::to_string(i) + " (disk " + std::to_string(e.disk) +
                                   ", offset " + std::to_string(e.offset) + ", length " + std::to_string(e.length) +
                                   ") ends past the disk (" + std::to_string(disks[e.disk].size) + " bytes)");
  }
  std::vector<ReplicaRange> united = Ranges(theirs);
  theirs = SinceList{};
  if (!state_dir.empty()) {
    const std::string acand_path = ReverseAcandPath(state_dir, vm_id);
    auto ours = ReadRangeListFile(acand_path, kRangeListCandidates, disk_count);
    if (!ours.ok()) {
      // Missing too: a store at its adopted point 1 always has one (the
      // adoption writes it first), so its absence means A's changes are
      // unknown, not that there are none.
      spdlog::error("replica {}: candidates file {}: {}; every block is hashed", vm_id, acand_path,
                    ours.status().ToString());
      return EveryBlock(disks, block_size);
    }
    if (ours.ok()) {
      if (int64_t i = FirstOutside(*ours, disks); i >= 0) {
        spdlog::error("replica {}: candidates file {}: entry {} ends past its disk; every block is hashed", vm_id,
                      acand_path, i);
        return EveryBlock(disks, block_size);
      }
      united = UniteRanges(std::move(united), Ranges(*ours));
    }
  }
  // Per disk (the ranges are sorted by disk after UniteRanges; the blob's
  // are sorted by the format's rules when no file was added).
  std::vector<std::vector<ReplicaRange>> per_disk(disks.size());
  for (const ReplicaRange& r : united) per_disk[r.disk].push_back(r);
  united.clear();
  united.shrink_to_fit();
  std::vector<std::vector<HashRun>> out(disks.size());
  for (uint32_t d = 0; d < disk_count; ++d) {
    if (per_disk[d].empty()) continue;
    uint64_t gap = kRunMergeGap;
    std::vector<BlockRun> runs = RoundToBlocks(per_disk[d], d, block_size, disks[d].size, gap);
    while (runs.size() > kMaxRunsPerDisk && gap < (uint64_t{1} << 62)) {
      gap *= 2;
      runs = RoundToBlocks(per_disk[d], d, block_size, disks[d].size, gap);
    }
    out[d].reserve(runs.size());
    for (const BlockRun& b : runs) out[d].push_back(HashRun{b.first_block, b.block_count});
  }
  return out;
}

}  // namespace

Result<std::string> ConfinedStoreDir(const std::string& storage_location, const std::string& vm_id) {
  if (storage_location.empty() || storage_location[0] != '/') {
    return Status::FailedPrecondition("storage location '" + storage_location + "' is not an absolute path");
  }
  // Anything that is not one plain path component would leave the location.
  if (vm_id.empty() || vm_id == "." || vm_id == ".." || vm_id.find('/') != std::string::npos ||
      vm_id.find('\0') != std::string::npos) {
    return Status::PermissionDenied("VM id '" + vm_id + "' would leave the storage location");
  }
  if (!IsUuid(vm_id)) return Status::InvalidArgument("VM id '" + vm_id + "' is not a UUID");
  VMR_ASSIGN_OR_RETURN(std::string root, RealPath(storage_location));
  const std::string candidate = (root == "/" ? std::string() : root) + "/" + vm_id;
  VMR_ASSIGN_OR_RETURN(bool exists, Exists(candidate));
  if (exists) {
    auto real = RealPath(candidate);
    if (!real.ok() || *real != candidate) {
      return Status::PermissionDenied(candidate + " resolves outside the storage location " + root + " (a symlink?)");
    }
  }
  VMR_ASSIGN_OR_RETURN(bool owner_exists, Exists(OwnerPath(candidate)));
  if (owner_exists) {
    auto real = RealPath(OwnerPath(candidate));
    if (!real.ok() || *real != OwnerPath(candidate)) {
      return Status::PermissionDenied(OwnerPath(candidate) + " resolves outside the storage location");
    }
  }
  return candidate;
}

Status WriteStoreOwner(const std::string& store_dir, const PrimaryCaller& caller) {
  return WriteOwner(store_dir, caller);
}

// States in which staged logs are not applied (docs/failover.md): the
// replica's data belongs to a failover in progress.
static bool ApplyHeld(ReplicationState s) {
  return s == ReplicationState::kRecoveryInProgress || s == ReplicationState::kRecovered ||
         s == ReplicationState::kCommitted || s == ReplicationState::kFailbackInProgress ||
         s == ReplicationState::kFailbackComplete;
}

// One open replica. Members are grouped by the lock that guards them.
struct ReplicaManager::Replica {
  // Constant after open.
  std::string vm_id;
  uint32_t index = 0;
  std::string dir;
  Catalog* catalog = nullptr;
  std::function<int64_t()> now_ms;
  std::unique_ptr<ReplicaStore> store;  // declared before staging: destroyed after it
  std::unique_ptr<Staging> staging;

  // The receiver (one stream at a time).
  struct Partial {
    v1::DeltaStart start;
    std::unique_ptr<LogWriter> writer;
    // Chunks held. Written by the receiving stream only; atomic because
    // StatusOf reports it from other threads.
    std::atomic<uint64_t> next_chunk{0};
    LogTrailer totals;  // counts received so far (chain unused)
    // The initial copy onto an empty store: loaded straight into the disks
    // (ReplicaStore::BeginLoad), no log file, no writer.
    bool load = false;
    // An ordinary delta applied while it is received (docs/protocol.md
    // "Replica side: applying"): no log file, no writer. Destroying it
    // rolls an unfinished apply back.
    std::unique_ptr<StreamApply> express;
  };
  std::mutex recv_mu;
  std::condition_variable recv_cv;
  bool receiving = false;                   // guarded by recv_mu
  bool removed = false;                     // guarded by recv_mu
  std::optional<Partial> partial;           // guarded by recv_mu (owned by the receiving stream)
  std::optional<v1::DeltaStart> committed;  // guarded by recv_mu: the last committed log
  // guarded by recv_mu: a log whose apply-while-receiving was given up: its
  // next stream is staged (and so resumes chunk by chunk).
  std::optional<v1::DeltaStart> express_given_up;

  // The applier thread.
  std::mutex apply_mu;
  std::condition_variable apply_cv;
  uint64_t apply_requests = 0;  // guarded by apply_mu
  uint64_t apply_done = 0;      // guarded by apply_mu: requests handled
  bool stop = false;            // guarded by apply_mu
  bool failed = false;          // guarded by apply_mu: a log was rejected; nothing more is applied
  bool held = false;            // guarded by apply_mu: HoldApply(): no ApplyReady starts
  bool applying = false;        // guarded by apply_mu: an ApplyReady runs now
  // guarded by apply_mu: the apply-while-receiving in progress (owned by
  // partial->express; cleared by its thread when Apply returns).
  StreamApply* express_active = nullptr;
  std::thread applier;

  // An apply-while-receiving still waiting for its stream is rolled back
  // and its thread joined here, before any member (store, apply_mu) goes.
  ~Replica() { partial.reset(); }

  std::mutex rel_mu;  // serialises read-modify-write of the relationship row

  int local_holds = 0;  // guarded by ReplicaManager::mu_: AcquireLocal() calls not yet released
  bool seeding = false;  // guarded by ReplicaManager::mu_: a seed copy is written into the disks

  void RequestApply() {
    std::lock_guard<std::mutex> l(apply_mu);
    ++apply_requests;
    apply_cv.notify_all();
  }

  void Stop() {
    {
      std::lock_guard<std::mutex> l(apply_mu);
      stop = true;
      apply_cv.notify_all();
    }
    if (applier.joinable()) applier.join();
  }

  // Updates the relationship row; `edit` answers false to skip the write.
  void EditRelationship(const std::function<bool(RelationshipRecord&)>& edit) {
    std::lock_guard<std::mutex> l(rel_mu);
    auto rel = catalog->GetRelationship(vm_id, static_cast<int>(index));
    if (!rel.ok() || !*rel) return;  // removed meanwhile
    if (!edit(**rel)) return;
    Status s = catalog->PutRelationship(**rel);
    if (!s.ok()) spdlog::error("replica {}: cannot update the relationship: {}", vm_id, s.ToString());
  }

  void ApplierLoop() {
    for (;;) {
      uint64_t target;
      bool is_failed;
      {
        std::unique_lock<std::mutex> l(apply_mu);
        apply_cv.wait(l, [&] { return stop || apply_requests > apply_done; });
        if (stop) return;
        target = apply_requests;
        // An apply-while-receiving owns the store's next sequence: nothing
        // staged can be applied before it ends.
        is_failed = failed || held || express_active != nullptr;
        applying = !is_failed;
      }
      // While failed over (or failing back) the replica keeps its staged
      // logs: a failover VM and CommitFailover work on the store, and a
      // RevertFailover applies them afterwards.
      bool held = false;
      if (auto rel = catalog->GetRelationship(vm_id, static_cast<int>(index)); rel.ok() && *rel) {
        held = ApplyHeld((*rel)->state);
      }
      if (!is_failed && !held) {
        auto n = staging->ApplyReady(*store);
        const uint64_t latest = store->latest_sequence();
        if (!n.ok()) {
          spdlog::error("replica {}: applying staged logs: {}", vm_id, n.status().ToString());
          if (n.status().code() == Code::kCorruption) {
            std::lock_guard<std::mutex> l(apply_mu);
            failed = true;
          }
        }
        const bool corrupt = !n.ok() && n.status().code() == Code::kCorruption;
        const bool applied = n.ok() && *n > 0;
        if (applied || corrupt) {
          const int64_t now = now_ms();
          EditRelationship([&](RelationshipRecord& r) {
            r.sequence = latest;
            if (applied) r.last_apply_ms = now;
            if (latest >= 1 && r.state == ReplicationState::kWaitingToCompleteInitialReplication) {
              spdlog::info("replica {}: initial replication applied: state {} -> {}", vm_id, Name(r.state),
                           Name(ReplicationState::kReplicating));
              r.state = ReplicationState::kReplicating;
            }
            if (corrupt) r.health = ReplicationHealth::kCritical;
            return true;
          });
        }
      }
      std::lock_guard<std::mutex> l(apply_mu);
      apply_done = target;
      applying = false;
      apply_cv.notify_all();
    }
  }
};

ReplicaManager::ReplicaManager(Catalog* catalog, ReplicaManagerOptions options)
    : catalog_(catalog), options_(std::move(options)) {}

ReplicaManager::~ReplicaManager() {
  std::map<std::string, std::shared_ptr<Replica>> all;
  {
    std::lock_guard<std::mutex> l(mu_);
    all.swap(replicas_);
  }
  for (auto& [id, r] : all) r->Stop();
}

Result<std::shared_ptr<ReplicaManager::Replica>> ReplicaManager::OpenLocked(const std::string& dir,
                                                                            const RelationshipRecord& rel) {
  ReplicaStoreOptions so;
  so.fine_window_ms = options_.fine_window_ms;
  so.recovery_history_hours = static_cast<int>(rel.settings.recovery_history);
  so.now_ms = options_.now_ms;
  if (options_.apply_batch_bytes != 0) so.apply_batch_bytes = options_.apply_batch_bytes;
  VMR_ASSIGN_OR_RETURN(auto store, ReplicaStore::Open(dir, catalog_, so));
  StagingOptions staging_options = options_.staging;
  if (staging_options.catalog == nullptr) staging_options.catalog = catalog_;  // staged logs mirrored
  VMR_ASSIGN_OR_RETURN(auto staging, Staging::Open(dir + "/staging", *store, staging_options));
  auto r = std::make_shared<Replica>();
  r->vm_id = rel.vm_id;
  r->index = static_cast<uint32_t>(rel.index);
  r->dir = dir;
  r->catalog = catalog_;
  r->now_ms = options_.now_ms ? options_.now_ms : SystemNowMs;
  r->store = std::move(store);
  r->staging = std::move(staging);
  r->applier = std::thread([p = r.get()] { p->ApplierLoop(); });
  r->RequestApply();  // staged logs left from before a restart
  replicas_[rel.vm_id] = r;
  spdlog::info("replica {}: opened store {} at sequence {}", rel.vm_id, dir, r->store->latest_sequence());
  return r;
}

Result<std::shared_ptr<ReplicaManager::Replica>> ReplicaManager::Get(const PrimaryCaller& caller,
                                                                     const std::string& vm_id, uint32_t index) {
  VMR_ASSIGN_OR_RETURN(std::string dir, ConfinedStoreDir(caller.entry.replica_storage_location, vm_id));
  std::lock_guard<std::mutex> l(mu_);
  VMR_RETURN_IF_ERROR(CheckOwner(dir, vm_id, caller));
  auto it = replicas_.find(vm_id);
  if (it != replicas_.end()) {
    if (it->second->dir != dir)
      return Status::PermissionDenied("VM " + vm_id + " is not in the caller's storage location");
    if (it->second->index != index) {
      return Status::NotFound("VM " + vm_id + " has no replica relationship " + std::to_string(index));
    }
    return it->second;
  }
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, static_cast<int>(index)));
  if (!rel || rel->local_mode != ReplicationMode::kReplica) {
    return Status::NotFound("VM " + vm_id + " has no replica relationship " + std::to_string(index));
  }
  return OpenLocked(dir, *rel);
}

Result<ReplicaStatusInfo> ReplicaManager::StatusOf(Replica& r) {
  ReplicaStatusInfo s;
  s.latest_applied = r.store->latest_sequence();
  VMR_ASSIGN_OR_RETURN(s.expected_sequence, r.staging->expected_sequence());
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(r.vm_id, static_cast<int>(r.index)));
  if (!rel) return Status::NotFound("VM " + r.vm_id + " has no replica relationship");
  s.state = rel->state;
  s.last_apply_ms = rel->last_apply_ms;
  for (const auto& p : r.store->ListPoints()) {
    if (p.sequence != s.latest_applied || p.generation_id.size() != 32) continue;
    if (auto g = ParseGenerationHex(p.generation_id); g.ok()) s.latest_generation = *g;
  }
  {
    // Only a part no stream is adding to (a stream still running, its
    // break not yet seen, could add chunks after this answer).
    std::unique_lock<std::mutex> l(r.recv_mu);
    r.recv_cv.wait_for(l, std::chrono::seconds(2), [&] { return !r.receiving; });
    // An apply-while-receiving that ended without a commit holds nothing.
    if (r.partial && !r.receiving && !(r.partial->express && r.partial->express->done())) {
      s.partial_sequence = r.partial->start.sequence();
      s.partial_chunks = r.partial->next_chunk.load();
    }
  }
  return s;
}

void ReplicaManager::OpenAll() {
  auto rels = catalog_->ListRelationships();
  auto entries = catalog_->ListAuthorizationEntries();
  if (!rels.ok() || !entries.ok()) {
    spdlog::error("replica manager: cannot list relationships / entries");
    return;
  }
  std::lock_guard<std::mutex> l(mu_);
  for (const auto& rel : *rels) {
    if (rel.local_mode != ReplicationMode::kReplica || replicas_.count(rel.vm_id) != 0) continue;
    for (const auto& e : *entries) {
      auto dir = ConfinedStoreDir(e.replica_storage_location, rel.vm_id);
      if (!dir.ok()) continue;
      auto manifest = Exists(*dir + "/MANIFEST");
      if (!manifest.ok() || !*manifest) continue;
      auto r = OpenLocked(*dir, rel);
      if (!r.ok()) spdlog::error("replica {}: cannot open {}: {}", rel.vm_id, *dir, r.status().ToString());
      break;
    }
  }
}

Result<ReplicaStatusInfo> ReplicaManager::CreateReplica(const PrimaryCaller& caller, const CreateReplicaParams& p) {
  const std::string& storage = caller.entry.replica_storage_location;
  auto confined = ConfinedStoreDir(storage, p.vm_id);
  if (!confined.ok() && confined.status().code() == Code::kNotFound) {
    // The id passed the path checks; the administrator's configured
    // location does not exist yet.
    VMR_RETURN_IF_ERROR(MakeDirs(storage, 0700));
    confined = ConfinedStoreDir(storage, p.vm_id);
  }
  VMR_ASSIGN_OR_RETURN(std::string dir, std::move(confined));
  if (p.vm_name.empty() || p.vm_name.size() > 1024) return Status::InvalidArgument("VM name must be 1..1024 bytes");
  if (p.definition_json.size() > kMaxDefinitionBytes) return Status::InvalidArgument("definition over 1 MiB");
  VMR_RETURN_IF_ERROR(ValidateDisks(p.disks));
  VMR_RETURN_IF_ERROR(ValidateRelationshipSettings(p.settings, /*extended=*/false, 0));

  std::lock_guard<std::mutex> l(mu_);
  VMR_ASSIGN_OR_RETURN(auto vm, catalog_->GetVm(p.vm_id));
  VMR_ASSIGN_OR_RETURN(auto owner, ReadOwner(dir));
  VMR_ASSIGN_OR_RETURN(bool store_exists, Exists(dir + "/MANIFEST"));
  if (vm || owner) {
    VMR_RETURN_IF_ERROR(CheckOwner(dir, p.vm_id, caller));
    if (!vm) {
      // A create that crashed half-way: the ownership record exists without the rest.
      if (store_exists) return Status::FailedPrecondition("VM " + p.vm_id + ": a store without a catalog row");
    } else {
      if (vm->mode != ReplicationMode::kReplica) {
        return Status::FailedPrecondition("VM " + p.vm_id + " exists here and is not a replica");
      }
      auto it = replicas_.find(p.vm_id);
      std::shared_ptr<Replica> r;
      if (it != replicas_.end()) {
        r = it->second;
      } else {
        if (!store_exists) return Status::FailedPrecondition("VM " + p.vm_id + " exists here without its store");
        VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(p.vm_id, 0));
        RelationshipRecord use;
        if (rel) {
          use = *rel;
        } else {
          use.vm_id = p.vm_id;
          use.index = 0;
          use.settings = p.settings;
        }
        VMR_ASSIGN_OR_RETURN(r, OpenLocked(dir, use));
        if (!rel) {
          // Continuing a replica whose relationship was removed.
          if (!SameDisks(r->store->disks(), p.disks)) {
            replicas_.erase(p.vm_id);
            r->Stop();
            return Status::AlreadyExists("VM " + p.vm_id + " exists here with other disks");
          }
          use.local_mode = ReplicationMode::kReplica;
          use.settings.primary_host_system = caller.entry.allowed_primary_host_system;
          use.sequence = r->store->latest_sequence();
          use.state = use.sequence >= 1 ? ReplicationState::kReplicating
                                        : ReplicationState::kWaitingToCompleteInitialReplication;
          use.health = ReplicationHealth::kNormal;
          VMR_RETURN_IF_ERROR(catalog_->PutRelationship(use));
        }
      }
      if (!SameDisks(r->store->disks(), p.disks)) {
        return Status::AlreadyExists("VM " + p.vm_id + " exists here with other disks");
      }
      return StatusOf(*r);
    }
  }

  // A new replica: ownership record, catalog rows, store, staging; undone on failure.
  VMR_ASSIGN_OR_RETURN(bool dir_existed, Exists(dir));
  bool wrote_owner = false, wrote_catalog = false;
  auto undo = [&](const Status& why) -> Status {
    spdlog::error("replica {}: create failed, undoing: {}", p.vm_id, why.ToString());
    if (wrote_catalog) catalog_->DeleteVm(p.vm_id).IgnoreError();
    if (!dir_existed) {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
    if (wrote_owner) ::unlink(OwnerPath(dir).c_str());
    return why;
  };
  Status s = WriteOwner(dir, caller);
  if (!s.ok()) return undo(s);
  wrote_owner = true;
  const int64_t now = (options_.now_ms ? options_.now_ms : SystemNowMs)();
  RelationshipRecord rel;
  rel.vm_id = p.vm_id;
  rel.index = 0;
  rel.local_mode = ReplicationMode::kReplica;
  rel.state = ReplicationState::kWaitingToCompleteInitialReplication;
  rel.health = ReplicationHealth::kNormal;
  rel.settings = p.settings;
  rel.settings.primary_host_system = caller.entry.allowed_primary_host_system;
  s = catalog_->RunInTransaction([&]() -> Status {
    VmRecord v;
    v.id = p.vm_id;
    v.name = p.vm_name;
    v.mode = ReplicationMode::kReplica;
    v.definition_json = p.definition_json;
    v.created_ms = now;
    VMR_RETURN_IF_ERROR(catalog_->PutVm(v));
    std::vector<DiskRecord> disks;
    for (const auto& d : p.disks) {
      DiskRecord r;
      r.vm_id = p.vm_id;
      r.name = d.name;
      r.size_bytes = d.size;
      r.path = dir + "/disks/" + d.name + ".img";
      disks.push_back(std::move(r));
    }
    VMR_RETURN_IF_ERROR(catalog_->PutDisks(p.vm_id, disks));
    return catalog_->PutRelationship(rel);
  });
  if (!s.ok()) return undo(s);
  wrote_catalog = true;
  ReplicaStoreOptions so;
  so.fine_window_ms = options_.fine_window_ms;
  so.recovery_history_hours = static_cast<int>(p.settings.recovery_history);
  so.now_ms = options_.now_ms;
  if (options_.apply_batch_bytes != 0) so.apply_batch_bytes = options_.apply_batch_bytes;
  {
    auto store = ReplicaStore::Create(dir, p.vm_id, p.disks, catalog_, so);
    if (!store.ok()) return undo(store.status());
  }  // closed again: OpenLocked opens it with its staging
  auto r = OpenLocked(dir, rel);
  if (!r.ok()) return undo(r.status());
  spdlog::info("replica {} ({}) created in {} for {} (trust group '{}')", p.vm_id, p.vm_name, dir,
               caller.entry.allowed_primary_host_system, caller.entry.trust_group);
  return StatusOf(**r);
}

Result<ReplicaStatusInfo> ReplicaManager::GetReplicaStatus(const PrimaryCaller& caller, const std::string& vm_id,
                                                           uint32_t index) {
  VMR_ASSIGN_OR_RETURN(auto r, Get(caller, vm_id, index));
  return StatusOf(*r);
}

Status ReplicaManager::RemoveReplica(const PrimaryCaller& caller, const std::string& vm_id, uint32_t index) {
  VMR_ASSIGN_OR_RETURN(auto r, Get(caller, vm_id, index));
  {
    std::lock_guard<std::mutex> l(mu_);
    if (r->local_holds > 0 || r->seeding) {
      return Status::FailedPrecondition("VM " + vm_id +
                                        ": a failover or test VM on the replica host uses the replica; stop it first");
    }
  }
  std::unique_ptr<StreamApply> doomed;
  {
    std::unique_lock<std::mutex> l(r->recv_mu);
    if (!r->recv_cv.wait_for(l, options_.resume_wait, [&] { return !r->receiving; })) {
      return Status::Busy("a delta of VM " + vm_id + " is being received");
    }
    r->removed = true;
    if (r->partial) {
      if (r->partial->writer) r->partial->writer->Abandon();
      doomed = std::move(r->partial->express);
      r->partial.reset();
    }
  }
  doomed.reset();  // an apply-while-receiving rolls back, outside recv_mu
  {
    std::lock_guard<std::mutex> l(mu_);
    if (r->local_holds > 0 || r->seeding) {
      // Taken while we waited for the receiver: the failover keeps it.
      std::lock_guard<std::mutex> rl(r->recv_mu);
      r->removed = false;
      return Status::FailedPrecondition("VM " + vm_id +
                                        ": a failover or test VM on the replica host uses the replica; stop it first");
    }
    replicas_.erase(vm_id);
  }
  r->Stop();
  {
    std::lock_guard<std::mutex> l(r->rel_mu);
    VMR_RETURN_IF_ERROR(catalog_->DeleteRelationship(vm_id, static_cast<int>(index)));
  }
  spdlog::info("replica {}: relationship {} removed; VM, store and points kept", vm_id, index);
  return Status::Ok();
}

Result<ReplicaStatusInfo> ReplicaManager::ModifyReplica(const PrimaryCaller& caller, const std::string& vm_id,
                                                        uint32_t index, const RelationshipSettings& settings) {
  VMR_RETURN_IF_ERROR(ValidateRelationshipSettings(settings, /*extended=*/false));
  VMR_ASSIGN_OR_RETURN(auto r, Get(caller, vm_id, index));
  {
    std::lock_guard<std::mutex> l(r->rel_mu);
    VMR_RETURN_IF_ERROR(catalog_->RunInTransaction([&]() -> Status {
      VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, static_cast<int>(index)));
      if (!rel) return Status::NotFound("VM " + vm_id + " has no replica relationship");
      // What the replica server decided stays (its connection point, port).
      RelationshipSettings next = settings;
      next.recovery_connection_point = rel->settings.recovery_connection_point;
      next.recovery_server_port = rel->settings.recovery_server_port;
      next.primary_connection_point = rel->settings.primary_connection_point;
      next.primary_host_system = rel->settings.primary_host_system;
      rel->settings = next;
      return catalog_->PutRelationship(*rel);
    }));
  }
  VMR_RETURN_IF_ERROR(r->store->SetRecoveryHistory(static_cast<int>(settings.recovery_history)));
  spdlog::info("replica {}: settings modified (recovery history {} h)", vm_id, settings.recovery_history);
  return StatusOf(*r);
}

Status ReplicaManager::HashDisks(const PrimaryCaller& caller, const std::string& vm_id, uint32_t index,
                                 uint32_t block_size, uint32_t window_blocks,
                                 const std::function<bool(uint32_t disk, bool last, const std::string& serialized)>& emit) {
  if (block_size < 4096 || block_size > (64u << 20) || (block_size & (block_size - 1)) != 0) {
    return Status::InvalidArgument("block_size " + std::to_string(block_size) +
                                   " is not a power of two of 4 KiB .. 64 MiB");
  }
  if (window_blocks != 0 && uint64_t{window_blocks} * block_size < (uint64_t{1} << 20)) {
    return Status::InvalidArgument("window_blocks " + std::to_string(window_blocks) + " of " +
                                   std::to_string(block_size) + " bytes cover less than 1 MiB");
  }
  VMR_ASSIGN_OR_RETURN(auto r, Get(caller, vm_id, index));
  for (const auto& d : r->store->disks()) {
    if ((d.size + block_size - 1) / block_size * 16 > (uint64_t{1} << 30)) {
      return Status::InvalidArgument("block_size " + std::to_string(block_size) + ": the hash list of disk " + d.name +
                                     " would exceed 1 GiB");
    }
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    if (r->seeding) return Status::Unavailable("VM " + vm_id + ": a seed copy is being written on the replica");
  }
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, static_cast<int>(index)));
  if (!rel || (rel->state != ReplicationState::kWaitingToCompleteInitialReplication &&
               rel->state != ReplicationState::kReplicating)) {
    return Status::FailedPrecondition("VM " + vm_id + ": the replica is not receiving (state " +
                                      (rel ? std::string(Name(rel->state)) : std::string("none")) + ")");
  }
  // A log being applied while received and left by a broken stream may
  // have written some of its blocks into the disks already: it is rolled
  // back first (the primary gave it up: it resynchronises), so that the
  // hashes describe a committed point.
  {
    std::unique_ptr<StreamApply> doomed;
    {
      std::unique_lock<std::mutex> l(r->recv_mu);
      if (!r->recv_cv.wait_for(l, options_.resume_wait, [&] { return !r->receiving; })) {
        return Status::Unavailable("a delta stream of VM " + vm_id + " is still running");
      }
      if (r->partial && r->partial->express) {
        spdlog::warn("replica {}: log {} being applied while received is rolled back: the primary asks for hashes",
                     vm_id, r->partial->start.sequence());
        r->express_given_up = r->partial->start;
        doomed = std::move(r->partial->express);
        r->partial.reset();
      }
    }
  }
  // The latest image is what the primary compares with: every staged log
  // goes in first. The primary sends nothing while it resynchronises.
  VMR_RETURN_IF_ERROR(WaitApplied(vm_id, std::chrono::minutes(30)));
  // Each window goes out as soon as it is hashed: the primary compares
  // it with its own blocks meanwhile (docs/protocol.md "GetBlockHashes").
  // A log the primary sends during this call is staged or loaded: it only
  // writes blocks of windows already sent, which are hashed.
  BlockHashOptions o;
  o.block_size = block_size;
  for (uint32_t d = 0; d < r->store->disks().size(); ++d) {
    const uint64_t total = (r->store->disks()[d].size + block_size - 1) / block_size;
    const uint64_t step = window_blocks == 0 ? total : window_blocks;
    uint64_t bytes_read = 0;
    for (uint64_t first = 0; first < total; first += step) {
      o.first_block = first;
      o.block_count = std::min(step, total - first);
      BlockHashStats stats;
      VMR_ASSIGN_OR_RETURN(BlockHashList list, HashFileBlocks(r->store->DiskPath(d), o, &stats));
      bytes_read += stats.bytes_read;
      if (!emit(d, first + step >= total, SerializeBlockHashes(list))) {
        return Status::Cancelled("the primary went away");
      }
    }
    spdlog::info("replica {}: disk {} hashed for a resynchronisation ({} bytes read, {})", vm_id,
                 r->store->disks()[d].name, bytes_read,
                 window_blocks == 0 ? std::string("one list") : std::to_string(window_blocks) + "-block windows");
  }
  return Status::Ok();
}

Status ReplicaManager::HashRanges(const PrimaryCaller& caller, const std::string& vm_id, uint32_t index,
                                  uint32_t block_size, std::string_view ranges_blob, bool all_blocks,
                                  const RangeHashSink& emit) {
  VMR_ASSIGN_OR_RETURN(auto r, Get(caller, vm_id, index));
  if (block_size < kMinHashBlockSize || block_size > kMaxHashBlockSize || (block_size & (block_size - 1)) != 0) {
    return Status::InvalidArgument("block_size " + std::to_string(block_size) +
                                   " is not a power of two of 4 KiB .. 64 MiB");
  }
  if (ranges_blob.size() > kMaxRangeBlobBytes) {
    return Status::InvalidArgument("ranges: more than 16 MiB");
  }
  if (all_blocks && !ranges_blob.empty()) return Status::InvalidArgument("ranges and all_blocks given together");
  {
    std::lock_guard<std::mutex> l(mu_);
    if (r->seeding) return Status::Unavailable("VM " + vm_id + ": a seed copy is being written on the replica");
  }
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, static_cast<int>(index)));
  if (!rel || rel->state != ReplicationState::kWaitingToCompleteInitialReplication) {
    return Status::FailedPrecondition("VM " + vm_id + ": range hashes are served only at the adopted point (state " +
                                      std::string(Name(ReplicationState::kWaitingToCompleteInitialReplication)) +
                                      "); the replica is in state " +
                                      (rel ? std::string(Name(rel->state)) : std::string("none")));
  }
  const uint64_t latest = r->store->latest_sequence();
  if (latest != 1) {
    return Status::FailedPrecondition("VM " + vm_id + ": range hashes are served only at point 1; the replica's " +
                                      "latest point is " + std::to_string(latest));
  }
  VMR_ASSIGN_OR_RETURN(uint64_t expected, r->staging->expected_sequence());
  if (expected != latest + 1) {
    return Status::FailedPrecondition("VM " + vm_id + ": logs up to " + std::to_string(expected - 1) +
                                      " are staged and not applied");
  }
  {
    std::lock_guard<std::mutex> l(r->recv_mu);
    if (r->receiving) return Status::FailedPrecondition("VM " + vm_id + ": a log is being received");
    if (r->partial) {
      return Status::FailedPrecondition("VM " + vm_id + ": log " + std::to_string(r->partial->start.sequence()) +
                                        " is held in part");
    }
  }
  const std::vector<ReplicaDisk>& disks = r->store->disks();
  VMR_ASSIGN_OR_RETURN(auto runs,
                       CandidateRuns(ranges_blob, all_blocks, disks, block_size, options_.state_dir, vm_id));
  uint64_t total_blocks = 0;
  for (const auto& d : runs) {
    for (const auto& run : d) total_blocks += run.block_count;
  }
  if (total_blocks > (uint64_t{1} << 30) / 16) {
    return Status::InvalidArgument("block_size " + std::to_string(block_size) + ": the hash lists would exceed 1 GiB");
  }
  BlockHashOptions o;
  o.block_size = block_size;
  uint64_t bytes_read = 0, run_count = 0;
  for (uint32_t d = 0; d < runs.size(); ++d) {
    for (size_t i = 0; i < runs[d].size(); ++i) {
      o.first_block = runs[d][i].first_block;
      o.block_count = runs[d][i].block_count;
      BlockHashStats stats;
      VMR_ASSIGN_OR_RETURN(BlockHashList list, HashFileBlocks(r->store->DiskPath(d), o, &stats));
      // The file must be the store's disk, whole (a run cut at the end would
      // leave blocks uncompared).
      if (list.disk_size != disks[d].size || list.hashes.size() != runs[d][i].block_count) {
        return Status::Corruption("VM " + vm_id + ": disk file " + r->store->DiskPath(d) + " has " +
                                  std::to_string(list.disk_size) + " bytes, the store says " +
                                  std::to_string(disks[d].size));
      }
      bytes_read += stats.bytes_read;
      ++run_count;
      if (!emit(d, i, i + 1 == runs[d].size(), SerializeBlockHashes(list))) {
        return Status::Cancelled("the caller went away");
      }
    }
  }
  // A log applied meanwhile would have changed blocks under the hasher.
  if (r->store->latest_sequence() != latest) {
    return Status::FailedPrecondition("VM " + vm_id + ": log " + std::to_string(r->store->latest_sequence()) +
                                      " was applied while the ranges were hashed");
  }
  spdlog::info("replica {}: {} candidate runs hashed for a reverse sync ({} bytes read{})", vm_id, run_count,
               bytes_read, all_blocks ? ", every block" : "");
  return Status::Ok();
}

Result<ReplicaStatusInfo> ReplicaManager::ReserveImport(const PrimaryCaller& caller, const std::string& vm_id,
                                                        uint32_t index, const std::string& generation_hex,
                                                        bool release) {
  VMR_ASSIGN_OR_RETURN(auto r, Get(caller, vm_id, index));
  VMR_RETURN_IF_ERROR(ReserveOrRelease(*r, generation_hex, release));
  return StatusOf(*r);
}

Status ReplicaManager::ReserveOrRelease(Replica& r, const std::string& generation_hex, bool release) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (r.seeding) return Status::Unavailable("VM " + r.vm_id + ": a seed copy is being written on the replica");
  }
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(r.vm_id, static_cast<int>(r.index)));
  if (!rel || rel->state != ReplicationState::kWaitingToCompleteInitialReplication) {
    return Status::FailedPrecondition("VM " + r.vm_id + ": the replica does not wait for an initial replication (state " +
                                      (rel ? std::string(Name(rel->state)) : std::string("none")) + ")");
  }
  // No log is received meanwhile.
  std::unique_lock<std::mutex> l(r.recv_mu);
  if (!r.recv_cv.wait_for(l, options_.resume_wait, [&] { return !r.receiving; })) {
    return Status::Unavailable("another stream of VM " + r.vm_id + " is still running");
  }
  if (!release) {
    VMR_RETURN_IF_ERROR(r.staging->ReserveImport(generation_hex));
    // A network copy of log 1 broken off earlier cannot resume any more.
    if (r.partial && r.partial->load) r.partial.reset();
    return Status::Ok();
  }
  if (r.store->latest_sequence() != 0) {
    return Status::FailedPrecondition("VM " + r.vm_id + ": the replica holds point " +
                                      std::to_string(r.store->latest_sequence()) + "; nothing to release");
  }
  // A load left by a network copy or an import of the copy given up is
  // undone (an import still running then fails at its next chunk).
  if (auto ls = r.store->load_state()) {
    spdlog::warn("replica {}: the primary gave the initial copy up; the unfinished load ({}) is undone", r.vm_id,
                 ls->info.source);
    VMR_RETURN_IF_ERROR(r.store->AbandonLoad());
  }
  // Nothing is applied meanwhile (the applier reads the files we delete).
  {
    std::unique_lock<std::mutex> al(r.apply_mu);
    r.held = true;
    r.apply_cv.wait(al, [&] { return r.stop || (!r.applying && !r.express_active); });
  }
  if (r.partial) {
    if (r.partial->writer) r.partial->writer->Abandon();
    r.partial.reset();
  }
  r.committed.reset();
  Status s = r.staging->DiscardStaged();
  if (s.ok()) s = r.staging->ClearImportReservation();
  {
    std::lock_guard<std::mutex> al(r.apply_mu);
    r.held = false;
  }
  if (s.ok()) spdlog::info("replica {}: import reservation and staged logs released by the primary", r.vm_id);
  return s;
}

Result<uint64_t> ReplicaManager::BeginImportLoad(const std::string& vm_id, const LoadInfo& info) {
  std::shared_ptr<Replica> r = FindOpen(vm_id);
  if (!r) return Status::NotFound("replica " + vm_id + " is not open");
  {
    std::lock_guard<std::mutex> l(mu_);
    if (r->seeding) return Status::Busy("VM " + vm_id + ": a seed copy is being written into the replica");
  }
  // No log is received meanwhile, so the reservation and the load agree.
  std::unique_lock<std::mutex> l(r->recv_mu);
  if (!r->recv_cv.wait_for(l, options_.resume_wait, [&] { return !r->receiving; })) {
    return Status::Unavailable("a stream of VM " + vm_id + " is still running");
  }
  if (r->store->latest_sequence() != 0) {
    return Status::FailedPrecondition("VM " + vm_id + ": the replica already holds point " +
                                      std::to_string(r->store->latest_sequence()));
  }
  VMR_ASSIGN_OR_RETURN(auto reserved, r->staging->import_reservation());
  if (reserved && *reserved != info.point.generation_id) {
    return Status::InvalidArgument("the export is of generation " + info.point.generation_id +
                                   ", but the primary announced the export of generation " + *reserved +
                                   " (an older export of this VM?)");
  }
  if (!reserved) {
    // The primary could not reach us after its export: deltas wait on its
    // side; from now on this replica expects log 2.
    VMR_RETURN_IF_ERROR(r->staging->ReserveImport(info.point.generation_id));
  }
  if (r->partial && r->partial->load) r->partial.reset();
  if (auto load = r->store->load_state()) {
    if (load->info.source == info.source && load->info.tag == info.tag) return load->done_chunks;
    spdlog::warn("replica {}: an unfinished load ({}, {}) is undone before this import", vm_id, load->info.source,
                 load->info.tag);
    VMR_RETURN_IF_ERROR(r->store->AbandonLoad());
  }
  VMR_RETURN_IF_ERROR(r->store->BeginLoad(info));
  return uint64_t{0};
}

Result<std::optional<std::string>> ReplicaManager::ImportReservation(const std::string& vm_id) {
  std::shared_ptr<Replica> r = FindOpen(vm_id);
  if (!r) return Status::NotFound("replica " + vm_id + " is not open");
  return r->staging->import_reservation();
}

Status ReplicaManager::ReserveImportLocal(const std::string& vm_id, const std::string& generation_hex) {
  std::shared_ptr<Replica> r = FindOpen(vm_id);
  if (!r) return Status::NotFound("replica " + vm_id + " is not open");
  return ReserveOrRelease(*r, generation_hex, /*release=*/false);
}

Status ReplicaManager::FinishImport(const std::string& vm_id) {
  std::shared_ptr<Replica> r = FindOpen(vm_id);
  if (!r) return Status::NotFound("replica " + vm_id + " is not open");
  if (r->store->latest_sequence() < 1) {
    return Status::FailedPrecondition("VM " + vm_id + ": the import is not loaded yet");
  }
  VMR_RETURN_IF_ERROR(r->staging->ClearImportReservation());
  const uint64_t latest = r->store->latest_sequence();
  const int64_t now = r->now_ms();
  r->EditRelationship([&](RelationshipRecord& rel) {
    rel.sequence = std::max(rel.sequence, latest);
    rel.last_apply_ms = now;
    if (rel.state == ReplicationState::kWaitingToCompleteInitialReplication) {
      spdlog::info("replica {}: initial replica imported: state {} -> {}", vm_id, Name(rel.state),
                   Name(ReplicationState::kReplicating));
      rel.state = ReplicationState::kReplicating;
    }
    return true;
  });
  r->RequestApply();
  return Status::Ok();
}

Result<ReplicaStore*> ReplicaManager::AcquireLocal(const std::string& vm_id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = replicas_.find(vm_id);
  if (it == replicas_.end()) {
    VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, 0));
    if (!rel || rel->local_mode != ReplicationMode::kReplica) {
      return Status::NotFound("VM " + vm_id + " is not a replica on this host");
    }
    VMR_ASSIGN_OR_RETURN(auto entries, catalog_->ListAuthorizationEntries());
    std::shared_ptr<Replica> opened;
    for (const auto& e : entries) {
      auto dir = ConfinedStoreDir(e.replica_storage_location, vm_id);
      if (!dir.ok()) continue;
      VMR_ASSIGN_OR_RETURN(bool manifest, Exists(*dir + "/MANIFEST"));
      if (!manifest) continue;
      VMR_ASSIGN_OR_RETURN(opened, OpenLocked(*dir, *rel));
      break;
    }
    if (!opened) return Status::NotFound("VM " + vm_id + ": its replica store is in no authorised storage location");
    it = replicas_.find(vm_id);
  }
  ++it->second->local_holds;
  return it->second->store.get();
}

void ReplicaManager::ReleaseLocal(const std::string& vm_id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = replicas_.find(vm_id);
  if (it != replicas_.end() && it->second->local_holds > 0) --it->second->local_holds;
}

std::shared_ptr<ReplicaManager::Replica> ReplicaManager::FindOpen(const std::string& vm_id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = replicas_.find(vm_id);
  return it == replicas_.end() ? nullptr : it->second;
}

Status ReplicaManager::HoldApply(const std::string& vm_id, std::chrono::milliseconds timeout) {
  std::shared_ptr<Replica> r = FindOpen(vm_id);
  if (!r) return Status::NotFound("replica " + vm_id + " is not open");
  std::unique_lock<std::mutex> l(r->apply_mu);
  r->held = true;
  // A log being applied while received is rolled back: the store stays at
  // its latest committed point (the primary sends the log again later).
  if (r->express_active) {
    r->express_active->Cancel(Status::Cancelled("VM " + vm_id + ": applies are held (a failover started)"));
  }
  if (!r->apply_cv.wait_for(l, timeout, [&] { return r->stop || (!r->applying && !r->express_active); })) {
    return Status::Timeout("replica " + vm_id + ": an apply in progress did not end in time");
  }
  return Status::Ok();
}

void ReplicaManager::ReleaseApply(const std::string& vm_id) {
  std::shared_ptr<Replica> r = FindOpen(vm_id);
  if (!r) return;
  {
    std::lock_guard<std::mutex> l(r->apply_mu);
    r->held = false;
  }
  r->RequestApply();
}

Status ReplicaManager::SetSeeding(const std::string& vm_id, bool seeding) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = replicas_.find(vm_id);
  if (it == replicas_.end()) return Status::NotFound("replica " + vm_id + " is not open");
  if (seeding && it->second->seeding) return Status::Busy("VM " + vm_id + ": a seed copy is already being written");
  it->second->seeding = seeding;
  return Status::Ok();
}

void ReplicaManager::KickApply(const std::string& vm_id) {
  std::shared_ptr<Replica> r = FindOpen(vm_id);
  if (!r) return;
  r->RequestApply();
}

Status ReplicaManager::Retire(const std::string& vm_id, int holds_of_caller) {
  auto busy_with_others = [&](const Replica& r) { return r.local_holds > holds_of_caller || r.seeding; };
  std::shared_ptr<Replica> r;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = replicas_.find(vm_id);
    if (it == replicas_.end()) return Status::Ok();
    r = it->second;
    if (busy_with_others(*r)) {
      return Status::FailedPrecondition("VM " + vm_id + ": a failover or test VM on this host uses the replica");
    }
  }
  std::unique_ptr<StreamApply> doomed;
  {
    std::unique_lock<std::mutex> l(r->recv_mu);
    if (!r->recv_cv.wait_for(l, options_.resume_wait, [&] { return !r->receiving; })) {
      return Status::Busy("a delta of VM " + vm_id + " is being received");
    }
    r->removed = true;  // no stream starts on it from now on
    if (r->partial) {
      if (r->partial->writer) r->partial->writer->Abandon();
      doomed = std::move(r->partial->express);
      r->partial.reset();
    }
  }
  doomed.reset();  // an apply-while-receiving rolls back, outside recv_mu
  {
    std::lock_guard<std::mutex> l(mu_);
    if (busy_with_others(*r)) {
      std::lock_guard<std::mutex> rl(r->recv_mu);
      r->removed = false;
      return Status::FailedPrecondition("VM " + vm_id + ": a failover or test VM on this host uses the replica");
    }
    replicas_.erase(vm_id);
  }
  r->Stop();  // the applier has ended: nothing applies or stages any more
  // The staged logs: rows first (a crash leaves files without rows, which
  // nobody reads: the directory is no store's staging any more), then files.
  VMR_ASSIGN_OR_RETURN(auto logs, catalog_->ListStagedLogs(vm_id));
  for (const auto& log : logs) {
    Status s = catalog_->DeleteStagedLog(vm_id, log.sequence, log.state);
    if (!s.ok() && s.code() != Code::kNotFound) return s;
  }
  std::error_code ec;
  std::filesystem::remove_all(r->dir + "/staging", ec);
  if (ec) return Status::IOError("removing " + r->dir + "/staging: " + ec.message());
  spdlog::info("replica {}: retired ({} staged log(s) deleted); the disk files in {} stay", vm_id, logs.size(),
               r->dir);
  return Status::Ok();  // the store closes with the last reference to `r`
}

Status ReplicaManager::WaitApplied(const std::string& vm_id, std::chrono::milliseconds timeout) {
  std::shared_ptr<Replica> r = FindOpen(vm_id);
  if (!r) return Status::NotFound("replica " + vm_id + " is not open");
  std::unique_lock<std::mutex> l(r->apply_mu);
  const uint64_t target = r->apply_requests;
  if (!r->apply_cv.wait_for(l, timeout, [&] { return r->stop || r->apply_done >= target; })) {
    return Status::Timeout("replica " + vm_id + ": staged logs not applied in time");
  }
  return Status::Ok();
}

namespace {

// Decodes one chunk's body (docs/protocol.md "PushDelta"): bounds first,
// then decompression into exactly raw_size bytes, then the checksum.
Result<v1::ChunkBody> DecodeChunk(const v1::DeltaChunk& c) {
  if (c.raw_size() > kMaxChunkBodyBytes || c.payload().size() > kMaxChunkBodyBytes) {
    return Status::InvalidArgument("chunk " + std::to_string(c.index()) + " over the size limit");
  }
  // An uncompressed body is checked and parsed where it lies (no copy).
  std::string decompressed;
  std::string_view raw;
  if (c.compression() == 0) {
    if (c.payload().size() != c.raw_size()) {
      return Status::Corruption("chunk " + std::to_string(c.index()) + ": payload size differs from raw_size");
    }
    raw = c.payload();
  } else if (c.compression() == 1) {
    const unsigned long long declared = ZSTD_getFrameContentSize(c.payload().data(), c.payload().size());
    if (declared != c.raw_size()) {
      return Status::Corruption("chunk " + std::to_string(c.index()) + ": zstd frame size differs from raw_size");
    }
    decompressed.resize(c.raw_size());
    const size_t n = ZSTD_decompress(decompressed.data(), decompressed.size(), c.payload().data(), c.payload().size());
    if (ZSTD_isError(n) || n != c.raw_size()) {
      return Status::Corruption("chunk " + std::to_string(c.index()) + ": bad zstd frame");
    }
    raw = decompressed;
  } else {
    return Status::InvalidArgument("chunk " + std::to_string(c.index()) + ": unknown compression " +
                                   std::to_string(c.compression()));
  }
  if (XXH3_64bits(raw.data(), raw.size()) != c.checksum()) {
    return Status::Corruption("chunk " + std::to_string(c.index()) + ": checksum mismatch");
  }
  v1::ChunkBody body;
  if (!body.ParseFromArray(raw.data(), static_cast<int>(raw.size()))) {
    return Status::Corruption("chunk " + std::to_string(c.index()) + ": bad body");
  }
  return body;
}

}  // namespace

Status ReplicaManager::ReceiveDelta(const PrimaryCaller& caller, DeltaStream& stream) {
  v1::DeltaMessage msg;
  if (!stream.Read(&msg)) return Status::Unavailable("the stream ended before its start");
  if (!msg.has_start()) return Status::InvalidArgument("the first message of a delta stream must be its start");
  const v1::DeltaStart start = msg.start();
  VMR_ASSIGN_OR_RETURN(auto r, Get(caller, start.vm_id(), start.relationship_index()));
  {
    std::lock_guard<std::mutex> l(mu_);
    if (r->seeding) return Status::Unavailable("VM " + r->vm_id + ": a seed copy is being written on the replica");
  }
  const std::string& vm = r->vm_id;
  if (start.sequence() == 0) return Status::InvalidArgument("sequence 0 is not a log");
  if (start.base_generation().size() != 16 || start.new_generation().size() != 16) {
    return Status::InvalidArgument("generation ids must be 16 bytes");
  }
  if (start.kind() < 1 || start.kind() > 3) return Status::InvalidArgument("kind must be 1, 2 or 3");
  if (start.initial() != (start.sequence() == 1)) {
    return Status::InvalidArgument("the initial log is sequence 1 and only it (got sequence " +
                                   std::to_string(start.sequence()) + (start.initial() ? ", initial)" : ")"));
  }

  std::unique_ptr<StreamApply> doomed;  // see Release
  std::unique_lock<std::mutex> l(r->recv_mu);
  if (!r->recv_cv.wait_for(l, options_.resume_wait, [&] { return !r->receiving; })) {
    return Status::Unavailable("another stream of VM " + vm + " is still running");
  }
  if (r->removed) return Status::NotFound("the replica of VM " + vm + " was removed");
  r->receiving = true;
  // Released on every return; the partial log stays unless dropped below.
  // A dropped apply-while-receiving is rolled back (its thread joined)
  // outside recv_mu, while `receiving` still keeps other streams out; one
  // that stays (a broken stream) starts counting its idle timeout.
  struct Release {
    Replica* r;
    std::unique_lock<std::mutex>* l;
    std::unique_ptr<StreamApply>* doomed;
    ~Release() {
      if (l->owns_lock()) l->unlock();
      doomed->reset();
      l->lock();
      if (r->partial && r->partial->express) r->partial->express->Detach();
      r->receiving = false;
      r->recv_cv.notify_all();
    }
  } release{r.get(), &l, &doomed};
  auto drop = [&](const Status& why) {
    spdlog::warn("replica {}: partial log {} dropped: {}", vm, start.sequence(), why.ToString());
    if (r->partial) {
      // A load stays in progress: the next stream of log 1 restarts it.
      if (r->partial->writer) r->partial->writer->Abandon();
      // An apply-while-receiving is rolled back (by Release, outside the
      // lock); the next stream of this log is staged, so that it can resume.
      if (r->partial->express) {
        r->express_given_up = r->partial->start;
        doomed = std::move(r->partial->express);
      }
      r->partial.reset();
    }
    return why;
  };

  // An ordinary delta the store can take at once is applied while it is
  // received (docs/protocol.md "Replica side: applying"); nullptr: stage it.
  auto start_express = [&](const RelationshipRecord& rel) -> std::unique_ptr<StreamApply> {
    if (!options_.apply_while_receiving || IsAllZero(start.base_generation()) ||
        rel.state != ReplicationState::kReplicating || start.sequence() != r->store->latest_sequence() + 1 ||
        (r->express_given_up && SameStart(*r->express_given_up, start))) {
      return nullptr;
    }
    std::unique_lock<std::mutex> al(r->apply_mu);
    // The applier may be running a pass that finds nothing to apply (at
    // open, after a kick): it ends soon. A log it applies meanwhile changes
    // the latest point, checked again below.
    r->apply_cv.wait_for(al, options_.resume_wait, [&] { return r->stop || !r->applying; });
    if (r->failed || r->held || r->applying || r->stop || r->express_active != nullptr ||
        start.sequence() != r->store->latest_sequence() + 1) {
      return nullptr;
    }
    PointInfo info;
    info.time_ms = static_cast<int64_t>(start.cut_time_unix_ms());
    info.kind = static_cast<ReplicationType>(start.kind());
    info.generation_id = GenerationText(start.new_generation());
    StreamApplyOptions so;
    so.idle_timeout = options_.apply_idle_timeout;
    Replica* rp = r.get();
    // Set below under apply_mu, which on_done needs: it never sees nullptr.
    auto self = std::make_shared<StreamApply*>(nullptr);
    so.on_done = [rp, self] {
      std::lock_guard<std::mutex> l(rp->apply_mu);
      if (rp->express_active == *self) rp->express_active = nullptr;
      rp->apply_cv.notify_all();
    };
    auto express = std::make_unique<StreamApply>(*r->store, start.sequence(), std::move(info), std::move(so));
    *self = express.get();
    r->express_active = express.get();
    return express;
  };

  if (r->committed && SameStart(*r->committed, start)) {
    // The sender lost our commit answer: the log is staged already.
    v1::DeltaReply rep;
    rep.set_started(true);
    rep.set_committed(true);
    stream.Write(rep);
    return Status::Ok();
  }
  if (r->partial && r->partial->express && r->partial->express->done()) {
    // Its apply ended without a commit while no stream fed it (it waited
    // too long, or a failover cancelled it): what it held is rolled back.
    const Status why = r->partial->express->status().value_or(Status::Ok());
    drop(why.ok() ? Status::Cancelled("the apply ended") : why).IgnoreError();
  }
  if (r->partial && !SameStart(r->partial->start, start)) drop(Status::Cancelled("another log started")).IgnoreError();
  if (!r->partial) {
    VMR_ASSIGN_OR_RETURN(uint64_t expected, r->staging->expected_sequence());
    if (start.sequence() != expected) {
      return Status::FailedPrecondition("VM " + vm + ": log " + std::to_string(start.sequence()) +
                                        " is out of sequence, expected " + std::to_string(expected));
    }
    VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm, static_cast<int>(r->index)));
    if (!rel) return Status::NotFound("VM " + vm + " has no replica relationship");
    if (rel->state != ReplicationState::kWaitingToCompleteInitialReplication &&
        rel->state != ReplicationState::kReplicating) {
      return Status::FailedPrecondition("VM " + vm + " is in state " + std::string(Name(rel->state)) +
                                        ": it does not receive logs");
    }
    // A log builds on the replica's latest point (or, before an import, on
    // the reserved export): one based on another history would leave an
    // image that is neither (an earlier copy, another export).
    if (!IsAllZero(start.base_generation())) {
      std::string have;
      const uint64_t latest = r->store->latest_sequence();
      if (start.sequence() - 1 > latest && !(latest == 0 && start.sequence() == 2)) {
        // The log before it is staged: its header names its generation
        // (log 1 is never staged before an import: the reservation says).
        auto prev = LogReader::Open(r->staging->LogPath(start.sequence() - 1), LogReadMode::kComplete);
        if (prev.ok()) {
          const GenerationId& g = (*prev)->header().new_generation;
          have = GenerationText(std::string(g.begin(), g.end()));
        } else if (prev.status().code() == Code::kNotFound && r->store->latest_sequence() >= start.sequence() - 1) {
          have = r->store->ListPoints().back().generation_id;  // applied (and unlinked) meanwhile
        } else {
          return prev.status().WithContext("VM " + vm + ": reading staged log " + std::to_string(start.sequence() - 1));
        }
      } else if (latest >= 1) {
        have = r->store->ListPoints().back().generation_id;
      } else {
        VMR_ASSIGN_OR_RETURN(auto reserved, r->staging->import_reservation());
        if (reserved) have = *reserved;
      }
      if (have != GenerationText(start.base_generation())) {
        return Status::FailedPrecondition(
            "VM " + vm + ": resynchronization required: log " + std::to_string(start.sequence()) +
            " builds on generation " + GenerationText(start.base_generation()) + " but the replica's latest point is " +
            (have.empty() ? std::string("the empty disks") : "of generation " + have));
      }
    }
    if (start.sequence() == 1 && r->store->latest_sequence() == 0) {
      if (auto ls = r->store->load_state(); ls && ls->info.source != "network") {
        return Status::FailedPrecondition("VM " + vm + ": an initial replica is being imported into the replica");
      }
      // The initial copy is written once, straight into the disks, and
      // becomes point 1 at its end (docs/replica_store.md section 17). A
      // load left by an earlier try restarts: every log 1 makes the disks
      // exact whatever they hold (holes travel as zero records; a seeded
      // copy was compared with the disks as they are).
      LoadInfo li;
      li.point.time_ms = static_cast<int64_t>(start.cut_time_unix_ms());
      li.point.kind = static_cast<ReplicationType>(start.kind());
      li.point.generation_id = GenerationText(start.new_generation());
      li.source = "network";
      li.tag = "network:" + li.point.generation_id;
      VMR_RETURN_IF_ERROR(r->store->load_state() ? r->store->RestartLoad(li) : r->store->BeginLoad(li));
      r->partial.emplace();
      r->partial->start = start;
      r->partial->load = true;
      spdlog::info("replica {}: receiving the initial copy (log 1, {}) straight into the disks", vm,
                   li.point.generation_id);
    } else if (auto express = start_express(*rel)) {
      r->partial.emplace();
      r->partial->start = start;
      r->partial->express = std::move(express);
      spdlog::info("replica {}: receiving log {} ({} -> {}), applied as it arrives", vm, start.sequence(),
                   GenerationText(start.base_generation()), GenerationText(start.new_generation()));
    } else {
    LogHeader h;
    h.relationship_id = vm;
    h.relationship_index = r->index;
    h.sequence = start.sequence();
    std::copy(start.base_generation().begin(), start.base_generation().end(), h.base_generation.begin());
    std::copy(start.new_generation().begin(), start.new_generation().end(), h.new_generation.begin());
    h.cut_time_unix_ms = start.cut_time_unix_ms();
    h.kind = static_cast<ReplicationType>(start.kind());
    for (const auto& d : r->store->disks()) h.disks.push_back(LogDisk{d.name, d.size});
    VMR_ASSIGN_OR_RETURN(auto writer, r->staging->BeginReceive(h));
    r->partial.emplace();
    r->partial->start = start;
    r->partial->writer = std::move(writer);
    spdlog::info("replica {}: receiving log {} ({} -> {})", vm, start.sequence(),
                 GenerationText(start.base_generation()), GenerationText(start.new_generation()));
    }
  } else {
    if (r->partial->load && !OwnsLoad(*r->store, start)) {
      return drop(Status::FailedPrecondition("VM " + vm + ": the initial load of log 1 was taken over (an import)"));
    }
    if (r->partial->express) r->partial->express->Attach();
    spdlog::info("replica {}: resuming log {} at chunk {}", vm, start.sequence(), r->partial->next_chunk.load());
  }
  Replica::Partial& part = *r->partial;
  l.unlock();  // the partial log is ours while `receiving` is set

  // While an apply-while-receiving makes the stream wait for the store, the
  // last ack is repeated every few seconds: the sender sees the replica
  // alive (docs/protocol.md "Replica side: applying").
  auto heartbeat = [&] {
    v1::DeltaReply hb;
    hb.set_acked_chunks(part.next_chunk);
    stream.Write(hb);
  };
  v1::DeltaReply rep;
  rep.set_started(true);
  rep.set_resume_chunk(part.next_chunk);
  rep.set_acked_chunks(part.next_chunk);
  if (!stream.Write(rep)) return Status::Unavailable("the stream broke");

  for (;;) {
    if (!stream.Read(&msg)) return Status::Unavailable("the stream ended before the log's end");
    if (msg.has_chunk()) {
      const v1::DeltaChunk& c = msg.chunk();
      if (c.index() != part.next_chunk) {
        l.lock();
        return drop(Status::FailedPrecondition("chunk " + std::to_string(c.index()) + " out of order, expected " +
                                               std::to_string(part.next_chunk.load())));
      }
      auto body = DecodeChunk(c);
      if (!body.ok()) {
        l.lock();
        return drop(body.status());
      }
      if (part.totals.record_count + body->records_size() > kMaxRecordsPerLog) {
        l.lock();
        return drop(Status::InvalidArgument("the log has more than 2^24 records"));
      }
      std::vector<DeltaRecord> loaded;  // a load's records of this chunk
      for (auto& pr : *body->mutable_records()) {
        DeltaRecord rec;
        rec.disk = pr.disk();
        rec.offset = pr.offset();
        rec.length = pr.length();
        rec.zero = pr.zero();
        if (rec.zero) {
          if (!pr.data().empty()) {
            l.lock();
            return drop(Status::InvalidArgument("a zero record with data"));
          }
          part.totals.zero_bytes += rec.length;
        } else {
          rec.data = std::move(*pr.mutable_data());
          part.totals.data_bytes += rec.length;
        }
        ++part.totals.record_count;
        if (part.load || part.express) {
          loaded.push_back(std::move(rec));
          continue;
        }
        // Records of a chunk that zstd could not shrink on the wire are
        // staged as they are: trying again would only burn CPU.
        Status s = part.writer->Add(rec, /*try_compress=*/c.compression() != 0);
        if (!s.ok()) {
          l.lock();
          return drop(s);
        }
      }
      if (part.load) {
        VectorDeltaSource src(std::move(loaded));
        Status s = r->store->LoadChunk(part.next_chunk, src);
        if (!s.ok()) {
          l.lock();
          return drop(s);
        }
      } else if (part.express) {
        // Waits while the apply is 32 MiB behind: the stream (and the
        // sender's window) follows the disk.
        Status s = part.express->Push(std::move(loaded), heartbeat);
        if (!s.ok()) {
          l.lock();
          return drop(s);
        }
      }
      ++part.next_chunk;
      v1::DeltaReply ack;
      ack.set_acked_chunks(part.next_chunk);
      if (!stream.Write(ack)) return Status::Unavailable("the stream broke");
    } else if (msg.has_end()) {
      const v1::DeltaEnd& e = msg.end();
      l.lock();
      if (e.chunk_count() != part.next_chunk || e.record_count() != part.totals.record_count ||
          e.data_bytes() != part.totals.data_bytes || e.zero_bytes() != part.totals.zero_bytes) {
        return drop(Status::Corruption("the log's end does not match what was received (" +
                                       std::to_string(part.next_chunk.load()) + " chunks, " +
                                       std::to_string(part.totals.record_count) + " records)"));
      }
      const bool loaded = part.load;
      if (loaded && !OwnsLoad(*r->store, start)) {
        return drop(Status::FailedPrecondition("VM " + vm + ": the initial load of log 1 was taken over (an import)"));
      }
      const bool express = part.express != nullptr;
      // An apply-while-receiving commits the point here: before-images,
      // data, fsyncs, MANIFEST (docs/replica_store.md section 5).
      Status s = loaded ? r->store->FinishLoad() : express ? part.express->Finish(heartbeat) : part.writer->Finish();
      if (s.ok() && !loaded && !express) s = r->staging->CommitReceived(start.sequence());
      if (!s.ok()) return drop(s);
      r->partial.reset();
      r->committed = start;
      r->express_given_up.reset();
      l.unlock();
      const uint64_t latest = r->store->latest_sequence();
      const int64_t now = r->now_ms();
      r->EditRelationship([&](RelationshipRecord& rel) {
        rel.last_replication_ms = now;
        rel.last_replication_type = static_cast<ReplicationType>(start.kind());
        if (start.kind() == 2) rel.last_app_consistent_ms = now;
        if (express) {
          rel.sequence = std::max(rel.sequence, latest);
          rel.last_apply_ms = now;
        }
        if (loaded) {
          // Point 1 is committed: applied as well as received.
          rel.sequence = std::max<uint64_t>(rel.sequence, 1);
          rel.last_apply_ms = now;
          if (rel.state == ReplicationState::kWaitingToCompleteInitialReplication) {
            spdlog::info("replica {}: initial replication applied (loaded into the disks): state {} -> {}", vm,
                         Name(rel.state), Name(ReplicationState::kReplicating));
            rel.state = ReplicationState::kReplicating;
          }
        }
        return true;
      });
      if (express) {
        spdlog::info("replica {}: log {} applied while received ({} records)", vm, start.sequence(),
                     e.record_count());
      } else if (loaded) {
        spdlog::info("replica {}: log 1 loaded into the disks ({} records)", vm, e.record_count());
        r->RequestApply();  // logs staged after it, if any
      } else {
        spdlog::info("replica {}: log {} staged ({} records)", vm, start.sequence(), e.record_count());
        r->RequestApply();
      }
      v1::DeltaReply done;
      done.set_committed(true);
      done.set_acked_chunks(e.chunk_count());
      stream.Write(done);  // a lost answer is handled by the sender's resume
      return Status::Ok();
    } else {
      l.lock();
      return drop(Status::InvalidArgument("a second start in one stream"));
    }
  }
}

}  // namespace vmreplica
