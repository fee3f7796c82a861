// OldPrimaryReverse: the old primary's side of a reverse (see the header).
#include "vmreplica/reverse_receiver.h"

#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "failover/old_primary.h"
#include "launcher/subprocess.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica {

namespace {

constexpr size_t kMaxCallerNames = 64;

bool IsLowerUuid(const std::string& s) {
  if (s.size() != 36) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-') return false;
    } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
      return false;
    }
  }
  return true;
}

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// The relationship's generation as the catalog holds it (32 lower-case hex
// digits); nullopt for anything else, an empty one included.
std::optional<GenerationId> StoredGeneration(const std::string& hex) {
  if (hex.size() != 32 || hex != Lower(hex)) return std::nullopt;
  auto g = ParseGenerationHex(hex);
  if (!g.ok()) return std::nullopt;
  return *g;
}

Result<VmDefinition> DefinitionOf(const VmRecord& vm) {
  auto j = nlohmann::json::parse(vm.definition_json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::Corruption("VM " + vm.id + ": its stored definition is not JSON");
  return VmDefinition::FromJson(j);
}

// The disks that replicate, in the definition's order (the replica's order),
// as the replication engine picks them.
Result<std::vector<VmDiskSpec>> IncludedDisks(const VmDefinition& def, const RelationshipSettings& s) {
  std::vector<VmDiskSpec> out;
  for (const auto& d : def.disks) {
    if (s.included_disks.empty() ||
        std::find(s.included_disks.begin(), s.included_disks.end(), d.name) != s.included_disks.end()) {
      out.push_back(d);
    }
  }
  if (out.empty() || (!s.included_disks.empty() && out.size() != s.included_disks.size())) {
    return Status::FailedPrecondition("the VM's IncludedDisks do not name its disks");
  }
  return out;
}

uint64_t RoundedSize(uint64_t size) { return (size + kReplicaBlockSize - 1) / kReplicaBlockSize * kReplicaBlockSize; }

Result<bool> PathExists(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) return true;
  if (errno == ENOENT) return false;
  return Status::IOError("lstat " + path + ": " + std::strerror(errno));
}

const char* PurposeName(uint32_t purpose) { return purpose == 2 ? "failback" : "reverse"; }

nlohmann::json ClaimJson(const ReverseClaim& c) {
  return {{"generation", GenerationHex(c.generation)},
          {"common_sequence", c.common_sequence},
          {"tracking", c.tracking_intact ? 1 : 2},
          {"candidate_bytes", c.candidate_bytes},
          {"local_copy_bytes", c.local_copy_bytes}};
}

}  // namespace

OldPrimaryReverse::OldPrimaryReverse(Catalog* catalog, JobEngine* jobs, ReplicationEngine* engine,
                                     ReplicaManager* replicas, OldPrimaryReverseOptions options)
    : catalog_(catalog), jobs_(jobs), engine_(engine), replicas_(replicas), options_(std::move(options)) {}

// ------------------------------------------------------------------ restart

Status OldPrimaryReverse::Start() {
  const std::string dir = options_.state_dir + "/reverse";
  std::error_code ec;
  if (!std::filesystem::exists(dir, ec)) return Status::Ok();
  std::vector<std::string> records;
  for (auto it = std::filesystem::directory_iterator(dir, ec); !ec && it != std::filesystem::directory_iterator();
       it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const std::string suffix = ".recv.json";
    if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      records.push_back(it->path().string());
    }
  }
  if (ec) return Status::IOError("listing " + dir + ": " + ec.message());
  for (const auto& path : records) {
    auto j = ReadReverseRecord(path);
    auto rec = j.ok() ? ReverseRecvRecord::Decode(*j, options_.state_dir) : Result<ReverseRecvRecord>(j.status());
    if (!rec.ok()) {
      spdlog::error("reverse record {}: {}; left alone", path, rec.status().ToString());
      continue;
    }
    if (ReverseRecvRecordPath(options_.state_dir, rec->vm_id) != path) {
      spdlog::error("reverse record {} names VM {}; left alone", path, rec->vm_id);
      continue;
    }
    if (rec->phase == "switched") continue;
    if (CompleteIfSwitched(*rec)) continue;
    spdlog::warn("reverse of VM {} (request {}) was interrupted in phase {}: undone; the caller starts over",
                 rec->vm_id, rec->request_id, rec->phase);
    Undo(*rec);
  }
  return Status::Ok();
}

bool OldPrimaryReverse::CompleteIfSwitched(ReverseRecvRecord& record) {
  if (record.phase != "adopting" || !record.claim) return false;
  auto vm = catalog_->GetVm(record.vm_id);
  auto rel = catalog_->GetRelationship(record.vm_id, 0);
  const bool switched = vm.ok() && *vm && (*vm)->mode == ReplicationMode::kReplica && rel.ok() && *rel &&
                        (*rel)->local_mode == ReplicationMode::kReplica &&
                        (*rel)->generation_id == GenerationHex(record.claim->generation);
  if (!switched) return false;
  record.phase = "switched";
  Status s = WriteReverseRecord(ReverseRecvRecordPath(options_.state_dir, record.vm_id), record.Encode());
  spdlog::warn("reverse of VM {} (request {}): the catalog was switched before the record said so; {}",
               record.vm_id, record.request_id, s.ok() ? "record completed" : s.ToString());
  return true;
}

void OldPrimaryReverse::Undo(const ReverseRecvRecord& record) {
  // The path comes from a file: removed only when it is exactly the store
  // directory of this VM under one of the authorization entries.
  bool confined = false;
  if (auto entries = catalog_->ListAuthorizationEntries(); entries.ok()) {
    for (const auto& e : *entries) {
      auto dir = ConfinedStoreDir(e.replica_storage_location, record.vm_id);
      if (dir.ok() && *dir == record.store_dir) confined = true;
    }
  }
  if (record.created_dir && !record.store_dir.empty() && !confined) {
    spdlog::error("reverse of VM {}: {} is not a store directory of an authorization entry; left alone",
                  record.vm_id, record.store_dir);
  }
  if (record.created_dir && !record.store_dir.empty() && confined) {
    std::error_code ec;
    std::filesystem::remove_all(record.store_dir, ec);
    if (ec) spdlog::error("reverse of VM {}: removing {}: {}", record.vm_id, record.store_dir, ec.message());
    ::unlink((record.store_dir + ".primary").c_str());
  }
  // An Adopt that ran mirrored its point into the catalog of a VM that is
  // still a primary.
  auto vm = catalog_->GetVm(record.vm_id);
  if (vm.ok() && *vm && (*vm)->mode != ReplicationMode::kReplica) {
    auto points = catalog_->ListRecoveryPoints(record.vm_id);
    if (points.ok() && !points->empty()) {
      std::vector<std::string> ids;
      for (const auto& p : *points) ids.push_back(p.id);
      Status s = catalog_->DeleteRecoveryPoints(ids);
      if (!s.ok()) spdlog::error("reverse of VM {}: recovery point rows: {}", record.vm_id, s.ToString());
    }
  }
  ::unlink(record.acand_file.c_str());
  ::unlink(ReverseRecvRecordPath(options_.state_dir, record.vm_id).c_str());
}

// ------------------------------------------------------------------ the call

Result<PrepareReverseAnswer> OldPrimaryReverse::AnswerSwitched(const ReverseRecvRecord& record,
                                                               const std::vector<std::string>& caller_names,
                                                               const AuthorizationEntry& entry,
                                                               const PrepareReverseParams& p) {
  const bool same_caller = std::any_of(caller_names.begin(), caller_names.end(), [&](const std::string& n) {
    return std::find(record.caller_names.begin(), record.caller_names.end(), n) != record.caller_names.end();
  });
  if (!same_caller || record.request_id != p.request_id) {
    return Status::FailedPrecondition("VM " + p.vm_id + " was already adopted here as a replica (request " +
                                      record.request_id + " of " + record.caller_names.front() + ")");
  }
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(p.vm_id, 0));
  // Waiting at its adopted point 1; or, for a retry of this very request
  // whose log 2 already arrived (the caller then finishes without sending
  // again), replicating at point 2.
  const bool waiting = rel && rel->local_mode == ReplicationMode::kReplica &&
                       rel->state == ReplicationState::kWaitingToCompleteInitialReplication;
  const bool synced = rel && rel->local_mode == ReplicationMode::kReplica &&
                      rel->state == ReplicationState::kReplicating;
  if (!waiting && !synced) {
    return Status::FailedPrecondition("VM " + p.vm_id + " is no longer a replica waiting at its adopted point 1");
  }
  PrimaryCaller caller{caller_names, entry};
  VMR_ASSIGN_OR_RETURN(auto status, replicas_->GetReplicaStatus(caller, p.vm_id, 0));
  if ((waiting && status.latest_applied != 1) || (synced && status.latest_applied != 2)) {
    return Status::FailedPrecondition("VM " + p.vm_id + ": the replica is at point " +
                                      std::to_string(status.latest_applied) + ", not its adopted point 1");
  }
  PrepareReverseAnswer a;
  a.done = true;
  a.claim = *record.claim;
  a.status = status;
  return a;
}

Result<PrepareReverseAnswer> OldPrimaryReverse::PrepareReverse(const std::vector<std::string>& caller_names,
                                                               const AuthorizationEntry& entry,
                                                               const PrepareReverseParams& p) {
  // Every field from the network first.
  if (!IsLowerUuid(p.vm_id)) return Status::InvalidArgument("vm_id: not a lower-case UUID");
  if (!IsLowerUuid(p.request_id)) return Status::InvalidArgument("request_id: not a lower-case UUID");
  if (p.purpose != 1 && p.purpose != 2) return Status::InvalidArgument("purpose: must be 1 or 2");
  if (p.vm_name.empty() || p.vm_name.size() > 1024) return Status::InvalidArgument("vm_name: must be 1..1024 bytes");
  if (p.disks.empty() || p.disks.size() > kRangeListMaxDisks) return Status::InvalidArgument("disks: 1..64");
  for (const auto& d : p.disks) {
    if (d.size == 0 || d.size % kReplicaBlockSize != 0) {
      return Status::InvalidArgument("disk " + d.name + ": size must be a positive multiple of 4096");
    }
  }
  if (p.primary_address.empty() || p.primary_address.size() > 262) {
    return Status::InvalidArgument("primary_address: must be 1..262 bytes");
  }
  // It becomes this host's PrimaryConnectionPoint.
  if (!IsHostPort(p.primary_address)) {
    return Status::InvalidArgument("primary_address: \"" + p.primary_address + "\" is not host:port");
  }
  VMR_RETURN_IF_ERROR(ValidateRelationshipSettings(p.settings, /*extended=*/false, 0).WithContext("settings"));
  if (caller_names.empty()) return Status::PermissionDenied("the call came without certificate names");

  std::lock_guard<std::mutex> l(mu_);
  if (auto it = running_.find(p.vm_id); it != running_.end()) {
    if (it->second.request_id != p.request_id) {
      return Status::Unavailable("VM " + p.vm_id + ": another reverse request (" + it->second.request_id +
                                 ") is running here");
    }
    PrepareReverseAnswer a;
    a.job_id = it->second.job_id;
    return a;
  }
  if (auto it = failed_.find(p.vm_id); it != failed_.end()) {
    if (it->second.request_id == p.request_id) {
      // Not retryable by the caller's loop: the job ended.
      const Status& why = it->second.why;
      if (why.code() == Code::kUnavailable || why.code() == Code::kTimeout || why.code() == Code::kBusy) {
        return Status::FailedPrecondition("the adoption job failed: " + why.ToString());
      }
      return why;
    }
    failed_.erase(it);  // a new request starts over
  }
  const std::string record_path = ReverseRecvRecordPath(options_.state_dir, p.vm_id);
  if (auto j = ReadReverseRecord(record_path); j.ok()) {
    VMR_ASSIGN_OR_RETURN(auto rec, ReverseRecvRecord::Decode(*j, options_.state_dir));
    VMR_ASSIGN_OR_RETURN(auto vm_now, catalog_->GetVm(p.vm_id));
    CompleteIfSwitched(rec);
    if (rec.phase == "switched") {
      if (vm_now && vm_now->mode == ReplicationMode::kReplica) return AnswerSwitched(rec, caller_names, entry, p);
      // The VM became a primary here again since (the round trip): the
      // record of that earlier reverse is history. Its store stays (it holds
      // the VM's disks or was given up by the operator).
      spdlog::info("reverse of VM {}: the record of the earlier reverse (request {}) is dropped", p.vm_id,
                   rec.request_id);
      ::unlink(rec.acand_file.c_str());
      ::unlink(record_path.c_str());
    } else {
      // No job runs for it (checked above): left by a job that could not
      // clean up. Undone, then this request starts over.
      spdlog::warn("reverse of VM {}: a stale record in phase {} is undone", p.vm_id, rec.phase);
      Undo(rec);
    }
  } else if (j.status().code() != Code::kNotFound) {
    return j.status();
  }

  // Role (a): A is the primary and the caller its replica server.
  VMR_ASSIGN_OR_RETURN(auto vm, catalog_->GetVm(p.vm_id));
  if (!vm) return Status::NotFound("no VM " + p.vm_id + " on this host");
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(p.vm_id, 0));
  if (!rel) return Status::FailedPrecondition("VM " + vm->name + " has no replication relationship here");
  if (rel->local_mode == ReplicationMode::kReplica && rel->state == ReplicationState::kFailbackComplete) {
    return Status::FailedPrecondition("VM " + vm->name +
                                      " is a replica in FailbackComplete (14): a reverse after a failback is not "
                                      "built yet");
  }
  if (vm->mode != ReplicationMode::kPrimary || rel->local_mode != ReplicationMode::kPrimary) {
    return Status::FailedPrecondition("VM " + vm->name + " is not a primary here (mode " +
                                      std::to_string(static_cast<int>(rel->local_mode)) + ", state " +
                                      std::to_string(static_cast<int>(rel->state)) + ")");
  }
  const std::string rcp = Lower(rel->settings.recovery_connection_point);
  if (std::none_of(caller_names.begin(), caller_names.end(),
                   [&](const std::string& n) { return !rcp.empty() && Lower(n) == rcp; })) {
    return Status::PermissionDenied("VM " + vm->name + " replicates to " + rel->settings.recovery_connection_point +
                                    ", not to the caller");
  }
  if (rel->state == ReplicationState::kDisabled || rel->state == ReplicationState::kRecoveryInProgress ||
      rel->state == ReplicationState::kFailbackInProgress) {
    return Status::FailedPrecondition("VM " + vm->name + " is in state " + std::string(Name(rel->state)) + " (" +
                                      std::to_string(static_cast<int>(rel->state)) + ")");
  }
  VMR_ASSIGN_OR_RETURN(auto def, DefinitionOf(*vm));
  VMR_ASSIGN_OR_RETURN(auto included, IncludedDisks(def, rel->settings));
  if (included.size() != p.disks.size()) {
    return Status::InvalidArgument("VM " + vm->name + " has " + std::to_string(included.size()) +
                                   " replicated disk(s) here, the caller " + std::to_string(p.disks.size()));
  }
  for (size_t i = 0; i < included.size(); ++i) {
    if (included[i].name != p.disks[i].name || RoundedSize(included[i].size_bytes) != p.disks[i].size) {
      return Status::InvalidArgument("disk " + std::to_string(i) + ": here " + included[i].name + " of " +
                                     std::to_string(RoundedSize(included[i].size_bytes)) + " bytes, the caller's " +
                                     p.disks[i].name + " of " + std::to_string(p.disks[i].size));
    }
  }
  if (!StoredGeneration(rel->generation_id)) {
    return Status::FailedPrecondition("VM " + vm->name + " has no generation here (no initial copy was made)");
  }
  VMR_ASSIGN_OR_RETURN(VmPowerState power, QueryVmPower(def));
  if (power.power != VmPower::kOff || power.via_qemu) {
    return Status::FailedPrecondition("VM " + vm->name + " runs on this host (" + power.detail +
                                      "): shut it down; its changes since the common point will be replaced");
  }

  Request req;
  // Only names the record can hold (ReverseRecvRecord::Decode: 1..255
  // printable ASCII characters without spaces).
  for (const auto& n : caller_names) {
    if (req.caller_names.size() == kMaxCallerNames) break;
    if (!n.empty() && n.size() <= 255 &&
        std::all_of(n.begin(), n.end(), [](unsigned char c) { return c > 0x20 && c < 0x7f; })) {
      req.caller_names.push_back(n);
    }
  }
  if (req.caller_names.empty()) {
    return Status::PermissionDenied("the caller's certificate names cannot be recorded (none is printable ASCII "
                                    "of at most 255 characters without spaces)");
  }
  req.entry = entry;
  req.params = p;
  const JobType type = p.purpose == 2 ? JobType::kFailback : JobType::kReverseReplication;
  nlohmann::json params = {{"vm", p.vm_id}, {"request_id", p.request_id}, {"purpose", PurposeName(p.purpose)}};
  // The job's end takes mu_ (held here until running_ has the job).
  VMR_ASSIGN_OR_RETURN(
      JobRecord job,
      jobs_->Start(type, vm->name, params.dump(), /*cancellable=*/false, /*resumable=*/false,
                   [this, req](JobContext& jc) -> Status {
                     Status s = RunJob(req, jc);
                     std::lock_guard<std::mutex> l(mu_);
                     running_.erase(req.params.vm_id);
                     if (!s.ok()) {
                       failed_[req.params.vm_id] =
                           Failed{req.params.request_id, s.WithContext("the reverse job on the old primary")};
                     }
                     return s;
                   }));
  running_[p.vm_id] = Running{p.request_id, job.id};
  spdlog::info("PrepareReverse of VM {} from {} (request {}): job {}", vm->name, caller_names.front(),
               p.request_id, job.id);
  PrepareReverseAnswer a;
  a.job_id = job.id;
  return a;
}

// ------------------------------------------------------------------ the job

Status OldPrimaryReverse::RunJob(const Request& req, JobContext& job) {
  const PrepareReverseParams& p = req.params;
  ReverseRecvRecord record;
  record.purpose = PurposeName(p.purpose);
  record.vm_id = p.vm_id;
  record.request_id = p.request_id;
  record.phase = "inspecting";
  record.caller_names = req.caller_names;
  record.acand_file = ReverseAcandPath(options_.state_dir, p.vm_id);
  const std::string record_path = ReverseRecvRecordPath(options_.state_dir, p.vm_id);
  bool record_written = false;
  if (engine_ != nullptr) VMR_RETURN_IF_ERROR(engine_->ReleaseForReverse(p.vm_id));
  Status s = [&]() -> Status {
    VMR_RETURN_IF_ERROR(MakeDirs(options_.state_dir + "/reverse", 0700));
    VMR_RETURN_IF_ERROR(WriteReverseRecord(record_path, record.Encode()));
    record_written = true;
    return Adopt(req, record, job);  // OK only once the catalog is switched
  }();
  if (!s.ok()) {
    spdlog::error("PrepareReverse of VM {} (request {}) failed in phase {}: {}; undone", p.vm_id, p.request_id,
                  record.phase, s.ToString());
    if (record_written) {
      Undo(record);
    } else {
      ::unlink(record.acand_file.c_str());
    }
    if (engine_ != nullptr) engine_->ResumeAfterReverse(p.vm_id);
    return s;
  }
  job.SetProgress(100);
  nlohmann::json result = ClaimJson(*record.claim);
  job.SetResult(result.dump());
  return Status::Ok();
}

Status OldPrimaryReverse::Adopt(const Request& req, ReverseRecvRecord& record, JobContext& job) {
  const PrepareReverseParams& p = req.params;
  const std::string record_path = ReverseRecvRecordPath(options_.state_dir, p.vm_id);
  // 1. inspecting: A's candidates and the common point.
  VMR_ASSIGN_OR_RETURN(auto vm, catalog_->GetVm(p.vm_id));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(p.vm_id, 0));
  if (!vm || !rel || vm->mode != ReplicationMode::kPrimary || rel->local_mode != ReplicationMode::kPrimary) {
    return Status::FailedPrecondition("VM " + p.vm_id + " stopped being a primary before its reverse ran");
  }
  VMR_ASSIGN_OR_RETURN(auto def, DefinitionOf(*vm));
  VMR_ASSIGN_OR_RETURN(auto included, IncludedDisks(def, rel->settings));
  auto generation = StoredGeneration(rel->generation_id);
  if (!generation) return Status::FailedPrecondition("VM " + p.vm_id + " has no generation");
  std::string hex16;
  for (char c : p.vm_id) {
    if (c != '-' && hex16.size() < 16) hex16.push_back(c);
  }
  const std::string run_dir = options_.run_dir + "/" + hex16;
  VMR_RETURN_IF_ERROR(MakeDirs(run_dir, 0700));
  VMR_ASSIGN_OR_RETURN(OldPrimaryCandidates candidates, InspectOldPrimary(def, included, p.vm_id, run_dir));
  VMR_RETURN_IF_ERROR(
      WriteCandidatesFile(record.acand_file, static_cast<uint32_t>(included.size()), candidates));
  ReverseClaim claim;
  claim.generation = *generation;
  claim.common_sequence = rel->sequence;
  claim.tracking_intact = candidates.tracking_intact;
  claim.candidate_bytes = candidates.candidate_bytes;
  spdlog::info("PrepareReverse of VM {}: common point ({}, {}), tracking {}, {} candidate bytes", vm->name,
               rel->generation_id, rel->sequence, candidates.tracking_intact ? "intact" : "lost",
               candidates.candidate_bytes);
  job.SetProgress(20);

  // 2. adopting: the store directory of the caller's entry.
  const std::string& storage = req.entry.replica_storage_location;
  auto confined = ConfinedStoreDir(storage, p.vm_id);
  if (!confined.ok() && confined.status().code() == Code::kNotFound) {
    VMR_RETURN_IF_ERROR(MakeDirs(storage, 0700));
    confined = ConfinedStoreDir(storage, p.vm_id);
  }
  VMR_ASSIGN_OR_RETURN(std::string store_dir, std::move(confined));
  VMR_ASSIGN_OR_RETURN(bool existed, PathExists(store_dir));
  record.phase = "adopting";
  record.store_dir = store_dir;
  record.created_dir = !existed;
  record.claim = claim;
  VMR_RETURN_IF_ERROR(WriteReverseRecord(record_path, record.Encode()));
  if (!existed && ::mkdir(store_dir.c_str(), 0700) != 0) {
    return Status::IOError("mkdir " + store_dir + ": " + std::strerror(errno));
  }
  // A replica of the VM the manager still has open from an earlier life of
  // the directory (its applier, and its store's lock, which would refuse
  // Adopt) is closed before the disk files are placed.
  VMR_RETURN_IF_ERROR(replicas_->Retire(p.vm_id));
  VMR_RETURN_IF_ERROR(WriteStoreOwner(store_dir, PrimaryCaller{req.caller_names, req.entry}));
  uint64_t copied = 0;
  for (size_t i = 0; i < included.size(); ++i) {
    VMR_ASSIGN_OR_RETURN(PlacedDisk placed,
                         PlaceAdoptedDisk(included[i], store_dir, p.disks[i].size, options_.qemu_img));
    copied += placed.local_copy_bytes;
    spdlog::info("PrepareReverse of VM {}: disk {} {} ({} bytes written)", vm->name, included[i].name,
                 placed.in_place ? "adopted in place" : "copied", placed.local_copy_bytes);
    job.SetProgress(20 + static_cast<uint32_t>(60 * (i + 1) / included.size()));
  }
  claim.local_copy_bytes = copied;
  record.claim = claim;
  // Staged logs of an earlier life of the directory (and an IMPORT
  // reservation) do not belong to the adopted history.
  VMR_ASSIGN_OR_RETURN(auto staged, catalog_->ListStagedLogs(p.vm_id));
  for (const auto& log : staged) {
    Status d = catalog_->DeleteStagedLog(p.vm_id, log.sequence, log.state);
    if (!d.ok() && d.code() != Code::kNotFound) return d;
  }
  {
    std::error_code ec;
    std::filesystem::remove_all(store_dir + "/staging", ec);
    if (ec) return Status::IOError("removing " + store_dir + "/staging: " + ec.message());
  }
  PointInfo point;
  point.time_ms = rel->last_replication_ms;
  point.kind = rel->state == ReplicationState::kSyncedReplicationComplete ? ReplicationType::kPlanned
                                                                          : ReplicationType::kRegular;
  point.generation_id = rel->generation_id;
  ReplicaStoreOptions so;
  so.recovery_history_hours = static_cast<int>(p.settings.recovery_history);
  {
    VMR_ASSIGN_OR_RETURN(auto store, ReplicaStore::Adopt(store_dir, p.vm_id, p.disks, 1, point, catalog_, so));
  }  // closed: the ReplicaManager opens it on first use
  VMR_RETURN_IF_ERROR(WriteReverseRecord(record_path, record.Encode()));
  job.SetProgress(90);

  // 3. switched: A's catalog (docs/failover.md 13.4).
  const std::string definition_json = vm->definition_json;
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  VMR_RETURN_IF_ERROR(catalog_->RunInTransaction([&]() -> Status {
    VmRecord v = *vm;  // the definition JSON stays as it is
    v.mode = ReplicationMode::kReplica;
    VMR_RETURN_IF_ERROR(catalog_->PutVm(v));
    std::vector<DiskRecord> disks;
    for (const auto& d : p.disks) {
      DiskRecord r;
      r.vm_id = p.vm_id;
      r.name = d.name;
      r.size_bytes = d.size;
      r.path = store_dir + "/disks/" + d.name + ".img";
      disks.push_back(std::move(r));
    }
    VMR_RETURN_IF_ERROR(catalog_->PutDisks(p.vm_id, disks));
    RelationshipRecord r;
    r.vm_id = p.vm_id;
    r.index = 0;
    r.local_mode = ReplicationMode::kReplica;
    r.state = ReplicationState::kWaitingToCompleteInitialReplication;
    r.health = ReplicationHealth::kNormal;
    r.settings = p.settings;
    r.settings.primary_connection_point = p.primary_address;
    r.settings.primary_host_system = req.entry.allowed_primary_host_system;
    r.last_replication_ms = point.time_ms;
    r.last_replication_type = point.kind;
    r.generation_id = rel->generation_id;
    r.sequence = 1;
    VMR_RETURN_IF_ERROR(catalog_->PutRelationship(r));
    return catalog_->ResetStatistics(p.vm_id, 0, now);
  }));
  record.phase = "switched";
  Status w = WriteReverseRecord(record_path, record.Encode());
  if (!w.ok()) {
    // The catalog is switched: Start() completes the record after a restart.
    spdlog::error("PrepareReverse of VM {}: the catalog is switched but the record was not written: {}", vm->name,
                  w.ToString());
  }
  spdlog::info("PrepareReverse of VM {}: adopted as the replica of {} at point 1 ({} bytes copied locally)",
               vm->name, p.primary_address, copied);
  CleanUpOldImages(p.vm_id, definition_json);
  return Status::Ok();
}

void OldPrimaryReverse::CleanUpOldImages(const std::string& vm_id, const std::string& definition_json) {
  auto j = nlohmann::json::parse(definition_json, nullptr, /*allow_exceptions=*/false);
  auto def = j.is_discarded() ? Result<VmDefinition>(Status::Corruption("not JSON")) : VmDefinition::FromJson(j);
  if (!def.ok()) {
    spdlog::warn("reverse of VM {}: old images not cleaned up: {}", vm_id, def.status().ToString());
    return;
  }
  const std::string wrappers = options_.state_dir + "/wrappers/" + vm_id;
  const bool on_wrappers = std::any_of(def->disks.begin(), def->disks.end(), [&](const VmDiskSpec& d) {
    return d.path.compare(0, wrappers.size() + 1, wrappers + "/") == 0;
  });
  if (on_wrappers) {
    std::error_code ec;
    std::filesystem::remove_all(wrappers, ec);
    if (ec) spdlog::warn("reverse of VM {}: removing {}: {}", vm_id, wrappers, ec.message());
    const std::string failover_record = options_.state_dir + "/failover/" + vm_id + ".json";
    if (::unlink(failover_record.c_str()) != 0 && errno != ENOENT) {
      spdlog::warn("reverse of VM {}: removing {}: {}", vm_id, failover_record, std::strerror(errno));
    }
    return;
  }
  const std::string prefix = "vmr-" + vm_id + "-g";
  for (const auto& d : def->disks) {
    if (d.format != "qcow2") continue;
    auto info = launcher_internal::RunCapture({options_.qemu_img, "info", "--force-share", "--output=json", d.path});
    if (!info.ok() || info->exit_code != 0) {
      spdlog::warn("reverse of VM {}: qemu-img info {} failed; its bitmaps stay", vm_id, d.path);
      continue;
    }
    auto ij = nlohmann::json::parse(info->output, nullptr, /*allow_exceptions=*/false);
    if (ij.is_discarded() || !ij.is_object()) continue;
    const auto fs = ij.value("format-specific", nlohmann::json::object());
    const auto data = fs.is_object() ? fs.value("data", nlohmann::json::object()) : nlohmann::json::object();
    const auto bitmaps = data.is_object() ? data.value("bitmaps", nlohmann::json::array()) : nlohmann::json::array();
    if (!bitmaps.is_array()) continue;
    for (const auto& b : bitmaps) {
      if (!b.is_object() || !b.contains("name") || !b["name"].is_string()) continue;
      const std::string name = b["name"].get<std::string>();
      if (name.compare(0, prefix.size(), prefix) != 0) continue;
      auto r = launcher_internal::RunCapture({options_.qemu_img, "bitmap", "--remove", d.path, name});
      if (!r.ok() || r->exit_code != 0) {
        spdlog::warn("reverse of VM {}: bitmap {} of {} not removed: {}", vm_id, name, d.path,
                     r.ok() ? r->output : r.status().ToString());
      } else {
        spdlog::info("reverse of VM {}: bitmap {} removed from {}", vm_id, name, d.path);
      }
    }
  }
}

}  // namespace vmreplica
