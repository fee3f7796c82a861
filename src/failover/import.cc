// ImportInitialReplica on the replica host (docs/replica_store.md section
// 17, docs/export_format.md): the export a primary wrote with
// StartReplication type 2 is loaded into the replica store as point 1, then
// the logs staged meanwhile apply in order.
#include <spdlog/spdlog.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "vmreplica/failover.h"
#include "vmreplica/initial_export.h"
#include "vmreplica/model/transitions.h"
#include "vmreplica/replica_store.h"

namespace vmreplica {

namespace {

using nlohmann::json;

constexpr const char* kLoadSource = "import";

// Which export a load in progress belongs to: a new export of the VM has a
// new generation (and cut time), so a load of another one is never resumed.
std::string LoadTag(const ExportInfo& info) {
  return info.generation_id + ":" + std::to_string(info.cut_time_unix_ms);
}

// Hands out one record (one export chunk per LoadChunk call).
class OneRecord final : public DeltaSource {
 public:
  explicit OneRecord(DeltaRecord r) : r_(std::move(r)) {}
  Result<std::optional<DeltaRecord>> Next() override {
    if (done_) return std::optional<DeltaRecord>();
    done_ = true;
    return std::optional<DeltaRecord>(std::move(r_));
  }

 private:
  DeltaRecord r_;
  bool done_ = false;
};

}  // namespace

Result<JobRecord> FailoverManager::ImportInitialReplica(const std::string& vm_name, const std::string& location) {
  if (location.empty() || location[0] != '/' || location.size() > 4096 ||
      std::any_of(location.begin(), location.end(), [](unsigned char c) { return c < 0x20 || c == 0x7f; })) {
    return Status::InvalidArgument("InitialReplicationImportLocation: '" + location +
                                   "' is not an absolute directory path");
  }
  VMR_ASSIGN_OR_RETURN(VmRecord vm, ResolveReplicaVm(vm_name));
  if (vm.mode != ReplicationMode::kReplica) {
    return Status::FailedPrecondition("VM " + vm.name + " is not a replica on this host (mode " +
                                      std::string(Name(vm.mode)) + ")");
  }
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm.id, 0));
  if (!rel) return Status::FailedPrecondition("VM " + vm.name + " has no replication relationship");
  VMR_RETURN_IF_ERROR(CheckTransition(TableMode::kReplica, rel->state, Operation::kImportInitialReplica).status());
  const std::string key = vm.id + ".import";
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!started_) return Status::Unavailable("the failover service is not running");
    if (busy_.count(key) != 0) return Status::Busy("an import into VM " + vm.name + " is already running");
    busy_.insert(key);
  }
  auto job = jobs_->Start(JobType::kImport, vm.id, json{{"vm", vm.id}, {"location", location}}.dump(),
                          /*cancellable=*/true, /*resumable=*/false,
                          [this, id = vm.id, location, key](JobContext& ctx) -> Status {
                            Status s = DoImport(ctx, id, location);
                            std::lock_guard<std::mutex> l(mu_);
                            busy_.erase(key);
                            return s;
                          });
  if (!job.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    busy_.erase(key);
  }
  return job;
}

Status FailoverManager::DoImport(JobContext& job, const std::string& vm_id, const std::string& location) {
  VMR_ASSIGN_OR_RETURN(auto vm, catalog_->GetVm(vm_id));
  if (!vm) return Status::NotFound("VM " + vm_id + " is no longer in the catalog");
  std::error_code ec;
  if (!std::filesystem::is_directory(location, ec)) {
    return Status::NotFound("InitialReplicationImportLocation: '" + location + "' is not a directory");
  }
  std::string base = location;
  while (base.size() > 1 && base.back() == '/') base.pop_back();
  const std::string dir = base + "/" + ExportDirectoryName(vm->name, vm->id);
  auto opened = ExportReader::Open(dir, vm->id);
  if (!opened.ok()) {
    if (opened.status().code() == Code::kNotFound) {
      return Status::NotFound("InitialReplicationImportLocation: no complete export of VM " + vm->name + " in " +
                              dir + " (" + opened.status().message() + ")");
    }
    return opened.status().WithContext("export " + dir);
  }
  std::unique_ptr<ExportReader> reader = std::move(*opened);
  const ExportInfo& info = reader->info();

  VMR_ASSIGN_OR_RETURN(ReplicaStore * store, replicas_->AcquireLocal(vm_id));
  struct Hold {
    ReplicaManager* m;
    std::string id;
    ~Hold() { m->ReleaseLocal(id); }
  } hold{replicas_, vm_id};

  // The export must be of this replica: its disks, and the generation the
  // primary announced (when it could tell us).
  const auto& disks = store->disks();
  if (info.disks.size() != disks.size()) {
    return Status::InvalidArgument("export " + dir + ": it has " + std::to_string(info.disks.size()) +
                                   " disks, the replica " + std::to_string(disks.size()));
  }
  for (size_t i = 0; i < disks.size(); ++i) {
    if (info.disks[i].name != disks[i].name || info.disks[i].size != disks[i].size) {
      return Status::InvalidArgument("export " + dir + ": disk " + std::to_string(i) + " is '" + info.disks[i].name +
                                     "' of " + std::to_string(info.disks[i].size) + " bytes, the replica's '" +
                                     disks[i].name + "' of " + std::to_string(disks[i].size) + " bytes");
    }
  }
  // The reservation checked (or made) and the load begun, or found again
  // when this very export was being loaded (it continues), with no log
  // received meanwhile.
  LoadInfo li;
  li.point.time_ms = info.cut_time_unix_ms;
  li.point.kind = ReplicationType::kRegular;
  li.point.generation_id = info.generation_id;
  li.source = kLoadSource;
  li.tag = LoadTag(info);
  auto begun = replicas_->BeginImportLoad(vm_id, li);
  if (!begun.ok()) {
    if (begun.status().code() == Code::kInvalidArgument) return begun.status().WithContext("export " + dir);
    return begun.status();
  }
  const uint64_t first = *begun;
  if (first > 0) spdlog::info("replica {}: the import continues at chunk {} of {}", vm_id, first, reader->chunk_count());
  if (first > reader->chunk_count()) {
    return Status::Corruption("replica " + vm_id + ": the load in progress counts more chunks than the export has");
  }

  // One pass: every chunk's hash is checked as it is read, before its data
  // is written. A chunk that fails undoes the whole load (the disks are
  // empty again: nothing is imported) and the error names it.
  VMR_ASSIGN_OR_RETURN(auto records, reader->Records(first));
  const size_t n = reader->chunk_count();
  uint64_t data_bytes = 0, zero_bytes = 0;
  // Besides the store's own syncs (every load_sync_bytes), progress is made
  // durable every few seconds: a crash redoes at most that much.
  auto last_sync = std::chrono::steady_clock::now();
  for (size_t k = first; k < n; ++k) {
    if (std::chrono::steady_clock::now() - last_sync >= std::chrono::seconds(2)) {
      VMR_RETURN_IF_ERROR(store->SyncLoad());
      last_sync = std::chrono::steady_clock::now();
    }
    if (job.CancelRequested()) {
      Status s = store->SyncLoad();
      return Status::Cancelled("import cancelled at chunk " + std::to_string(k) + " of " + std::to_string(n) +
                               "; ImportInitialReplica with the same export continues from there" +
                               (s.ok() ? std::string() : " (" + s.ToString() + ")"));
    }
    auto rec = records->Next();
    Status bad;
    if (!rec.ok()) {
      bad = rec.status();
    } else if (!*rec) {
      bad = Status::Corruption("the export ended at chunk " + std::to_string(k) + " of " + std::to_string(n));
    }
    if (bad.ok()) {
      DeltaRecord r = std::move(**rec);
      (r.zero ? zero_bytes : data_bytes) += r.length;
      OneRecord one(std::move(r));
      bad = store->LoadChunk(k, one);
      if (!bad.ok() && bad.code() != Code::kInvalidArgument && bad.code() != Code::kCorruption) {
        return bad.WithContext("loading " + reader->ChunkName(k));  // an I/O error: the load stays, retry later
      }
    }
    if (!bad.ok()) {
      Status undo = store->AbandonLoad();
      if (!undo.ok()) spdlog::error("replica {}: undoing the failed import: {}", vm_id, undo.ToString());
      if (bad.code() == Code::kCorruption) bad = Status::InvalidArgument(bad.message());
      return bad.WithContext("export " + dir + ", nothing imported");
    }
    job.SetProgress(static_cast<uint32_t>((k + 1) * 98 / n));
    if (options_.test_import_chunk_delay.count() > 0) std::this_thread::sleep_for(options_.test_import_chunk_delay);
  }
  VMR_RETURN_IF_ERROR(store->FinishLoad());
  VMR_RETURN_IF_ERROR(replicas_->FinishImport(vm_id));
  // The deltas staged while the replica waited apply now, in order.
  Status applied = replicas_->WaitApplied(vm_id, std::chrono::minutes(30));
  const uint64_t latest = store->latest_sequence();
  job.SetResult(json{{"directory", dir},
                     {"chunks", n},
                     {"chunks_resumed_at", first},
                     {"data_bytes", data_bytes},
                     {"zero_bytes", zero_bytes},
                     {"generation", info.generation_id},
                     {"latest_sequence", latest}}
                    .dump());
  spdlog::info("replica {}: initial replica imported from {} ({} chunks, {} bytes of data); latest point {}{}",
               vm_id, dir, n, data_bytes, latest,
               applied.ok() ? std::string() : " (staged logs still applying: " + applied.ToString() + ")");
  return Status::Ok();
}

// After a restart: an import that was loading continues by itself, from
// the export of its last ImportInitialReplica job.
void FailoverManager::ResumeImports() {
  auto rels = catalog_->ListRelationships();
  if (!rels.ok()) return;
  auto jobs = jobs_->List();
  for (const auto& rel : *rels) {
    if (rel.index != 0 || rel.local_mode != ReplicationMode::kReplica ||
        rel.state != ReplicationState::kWaitingToCompleteInitialReplication) {
      continue;
    }
    auto store = replicas_->AcquireLocal(rel.vm_id);
    if (!store.ok()) continue;
    const bool loading = (*store)->load_state().has_value() && (*store)->load_state()->info.source == kLoadSource;
    const bool loaded = (*store)->latest_sequence() >= 1;
    replicas_->ReleaseLocal(rel.vm_id);
    if (loaded) {
      // Point 1 committed, the finish not done (a crash in between): the
      // reservation goes, state 3, the staged logs apply.
      auto reserved = replicas_->ImportReservation(rel.vm_id);
      if (reserved.ok() && reserved->has_value()) {
        Status s = replicas_->FinishImport(rel.vm_id);
        if (s.ok()) {
          spdlog::warn("replica {}: an import interrupted after its load was finished now", rel.vm_id);
        } else {
          spdlog::error("replica {}: finishing an interrupted import: {}", rel.vm_id, s.ToString());
        }
      }
      continue;
    }
    if (!loading) continue;
    std::string location;
    int64_t newest = -1;
    if (jobs.ok()) {
      for (const auto& j : *jobs) {
        if (j.type != JobType::kImport || j.created_ms <= newest) continue;
        auto p = json::parse(j.parameters_json, nullptr, false);
        if (p.is_discarded() || !p.is_object() || p.value("vm", std::string()) != rel.vm_id) continue;
        if (!p.contains("location") || !p["location"].is_string()) continue;
        newest = j.created_ms;
        location = p["location"].get<std::string>();
      }
    }
    if (location.empty()) {
      spdlog::warn("replica {}: an import was interrupted; run ImportInitialReplica again to continue it", rel.vm_id);
      continue;
    }
    auto job = ImportInitialReplica(rel.vm_id, location);
    if (job.ok()) {
      spdlog::warn("replica {}: the interrupted import from {} continues as job {}", rel.vm_id, location, job->id);
    } else {
      spdlog::error("replica {}: continuing the interrupted import: {}", rel.vm_id, job.status().ToString());
    }
  }
}

}  // namespace vmreplica
