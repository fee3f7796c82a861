// FailoverManager: see include/vmreplica/failover.h and docs/failover.md.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include <spdlog/spdlog.h>

#include "jobs/uuid.h"
#include "launcher/subprocess.h"
#include "vmreplica/cloud_init.h"
#include "vmreplica/failover.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/model/transitions.h"
#include "vmreplica/qmp.h"
#include "vmreplica/reverse.h"
#include "vmreplica/reverse_sync.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica {

namespace {

using nlohmann::json;

constexpr size_t kMaxRecordBytes = 64 * 1024;

int64_t SystemNowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

bool IsUuidText(const std::string& s) {
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

// The first 16 hex digits of a UUID: short run-directory names.
std::string ShortId(const std::string& uuid) {
  std::string hex;
  for (char c : uuid) {
    if (c != '-') hex += c;
    if (hex.size() == 16) break;
  }
  return hex;
}

// An RFC 1123 host name from a VM name ("Web 01" -> "web-01").
std::string HostNameFor(const std::string& name, const std::string& uuid) {
  std::string out;
  for (char c : name) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (std::isalnum(u)) {
      out += static_cast<char>(std::tolower(u));
    } else if (!out.empty() && out.back() != '-') {
      out += '-';
    }
    if (out.size() == 63) break;
  }
  while (!out.empty() && out.back() == '-') out.pop_back();
  if (out.empty()) out = "vm-" + ShortId(uuid).substr(0, 8);
  return out;
}

Status Errno(const std::string& what, const std::string& path) {
  return Status::IOError(what + " " + path + ": " + std::strerror(errno));
}

}  // namespace

// ---------------------------------------------------------------- record

struct FailoverManager::Record {
  std::string kind;   // "failover" / "test"
  std::string vm_id;  // the replica VM
  std::string phase;  // "preparing" / "failed-over" / "test"
  int previous_state = 0;
  uint64_t sequence = 0;
  std::string point_id;
  std::vector<std::string> exports;
  std::string run_dir;
  std::string test_vm_id;
  bool started = false;
  uint64_t commit_sequence = 0;  // CommitFailover: the point the rollback makes (0 = not committing)
  std::vector<std::string> merged_disks;  // CommitFailover: disks whose VM already runs on the replica's file
  // CommitFailover (docs/failover.md section 10.3; absent in records of
  // older builds): the store's latest point before the rollback (the last
  // one received from the primary), and the since file written before the
  // history is dropped ("" = not written).
  uint64_t replicated_sequence = 0;
  std::string since_file;
  // CommitFailover: the disk wrappers (qcow2 over the store's files with the
  // tracking bitmap, section 10.2), disk order; empty until made.
  std::vector<std::string> wrappers;
  // The cloud-init instance-id the failover VM's seed carried ("" = none
  // yet): a restart of the same VM (StartVm) keeps it, so cloud-init does
  // not take it for a new instance.
  std::string instance_id;

  std::string Encode() const {
    json j;
    j["version"] = 1;
    j["kind"] = kind;
    j["vm_id"] = vm_id;
    j["phase"] = phase;
    j["previous_state"] = previous_state;
    j["sequence"] = sequence;
    j["point_id"] = point_id;
    j["exports"] = exports;
    j["run_dir"] = run_dir;
    j["test_vm_id"] = test_vm_id;
    j["started"] = started;
    j["commit_sequence"] = commit_sequence;
    j["merged_disks"] = merged_disks;
    if (replicated_sequence != 0) j["replicated_sequence"] = replicated_sequence;
    if (!since_file.empty()) j["since_file"] = since_file;
    if (!wrappers.empty()) j["wrappers"] = wrappers;
    if (!instance_id.empty()) j["instance_id"] = instance_id;
    return j.dump(2) + "\n";
  }

  // The state directory exactly as the writers spell it (run_root is
  // state_dir + "/run"; no normalisation, so "/x/" stays "/x/").
  static std::string StateRootOf(const std::string& run_root) {
    return run_root.size() >= 4 ? run_root.substr(0, run_root.size() - 4) : run_root;
  }

  // docs/failover.md section 4: every member checked.
  static Result<Record> Decode(const std::string& text, const std::string& run_root) {
    if (text.size() > kMaxRecordBytes) return Status::Corruption("failover record over 64 KiB");
    json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) return Status::Corruption("failover record is not a JSON object");
    auto str = [&](const char* k) -> Result<std::string> {
      if (!j.contains(k) || !j[k].is_string()) return Status::Corruption(std::string("failover record: ") + k);
      return j[k].get<std::string>();
    };
    if (!j.contains("version") || !j["version"].is_number_unsigned() || j["version"].get<uint64_t>() != 1) {
      return Status::Corruption("failover record: version is not 1");
    }
    Record r;
    VMR_ASSIGN_OR_RETURN(r.kind, str("kind"));
    VMR_ASSIGN_OR_RETURN(r.vm_id, str("vm_id"));
    VMR_ASSIGN_OR_RETURN(r.phase, str("phase"));
    VMR_ASSIGN_OR_RETURN(r.point_id, str("point_id"));
    VMR_ASSIGN_OR_RETURN(r.run_dir, str("run_dir"));
    VMR_ASSIGN_OR_RETURN(r.test_vm_id, str("test_vm_id"));
    if (r.kind != "failover" && r.kind != "test") return Status::Corruption("failover record: kind");
    if (!IsUuidText(r.vm_id)) return Status::Corruption("failover record: vm_id");
    if (r.phase != "preparing" && r.phase != "failed-over" && r.phase != "committing" && r.phase != "committed" &&
        r.phase != "reversed" && r.phase != "failed-back" && r.phase != "test") {
      return Status::Corruption("failover record: phase");
    }
    if ((r.kind == "test") != (r.phase == "test")) return Status::Corruption("failover record: phase of kind");
    if (r.kind == "test" && !IsUuidText(r.test_vm_id)) return Status::Corruption("failover record: test_vm_id");
    if (!j.contains("previous_state") || !j["previous_state"].is_number_integer()) {
      return Status::Corruption("failover record: previous_state");
    }
    r.previous_state = j["previous_state"].get<int>();
    if (r.previous_state < 0 || r.previous_state > 21) return Status::Corruption("failover record: previous_state");
    if (!j.contains("sequence") || !j["sequence"].is_number_unsigned() || j["sequence"].get<uint64_t>() == 0) {
      return Status::Corruption("failover record: sequence");
    }
    r.sequence = j["sequence"].get<uint64_t>();
    if (!j.contains("started") || !j["started"].is_boolean()) return Status::Corruption("failover record: started");
    r.started = j["started"].get<bool>();
    if (!j.contains("commit_sequence") || !j["commit_sequence"].is_number_unsigned()) {
      return Status::Corruption("failover record: commit_sequence");
    }
    r.commit_sequence = j["commit_sequence"].get<uint64_t>();
    if (!j.contains("merged_disks") || !j["merged_disks"].is_array() || j["merged_disks"].size() > 64) {
      return Status::Corruption("failover record: merged_disks");
    }
    for (const auto& d : j["merged_disks"]) {
      if (!d.is_string() || d.get<std::string>().empty() || d.get<std::string>().size() > 64) {
        return Status::Corruption("failover record: merged_disks");
      }
      r.merged_disks.push_back(d.get<std::string>());
    }
    if ((r.phase == "committing" || r.phase == "committed" || r.phase == "reversed" || r.phase == "failed-back") !=
            (r.commit_sequence != 0) ||
        (r.commit_sequence != 0 && r.commit_sequence < r.sequence)) {
      return Status::Corruption("failover record: commit_sequence does not fit the phase");
    }
    if (!j.contains("exports") || !j["exports"].is_array() || j["exports"].size() > 64) {
      return Status::Corruption("failover record: exports");
    }
    const std::string prefix = r.vm_id + "/";
    const std::string suffix = "@" + std::to_string(r.sequence);
    for (const auto& e : j["exports"]) {
      if (!e.is_string()) return Status::Corruption("failover record: exports");
      std::string name = e.get<std::string>();
      if (name.rfind(prefix, 0) != 0 || name.size() <= prefix.size() + suffix.size() ||
          name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
        return Status::Corruption("failover record: export '" + name + "' is not of VM " + r.vm_id);
      }
      r.exports.push_back(std::move(name));
    }
    if (j.contains("replicated_sequence")) {
      if (!j["replicated_sequence"].is_number_unsigned() || r.commit_sequence == 0) {
        return Status::Corruption("failover record: replicated_sequence");
      }
      r.replicated_sequence = j["replicated_sequence"].get<uint64_t>();
    }
    if (j.contains("since_file")) {
      // Exactly <state>/failover/<vm id>.since.
      const std::string want =
          StateRootOf(run_root) + "/failover/" + r.vm_id + ".since";
      if (!j["since_file"].is_string() || j["since_file"].get<std::string>() != want || r.commit_sequence == 0) {
        return Status::Corruption("failover record: since_file");
      }
      r.since_file = want;
    }
    if (j.contains("instance_id")) {
      if (!j["instance_id"].is_string()) return Status::Corruption("failover record: instance_id");
      const std::string id = j["instance_id"].get<std::string>();
      if (id.empty() || id.size() > 128 ||
          !std::all_of(id.begin(), id.end(), [](unsigned char c) { return std::isalnum(c) || c == '-'; })) {
        return Status::Corruption("failover record: instance_id");
      }
      r.instance_id = id;
    }
    if (j.contains("wrappers")) {
      // Each exactly <state>/wrappers/<vm id>/<disk>.qcow2.
      const std::string dir = StateRootOf(run_root) + "/wrappers/" + r.vm_id + "/";
      if (!j["wrappers"].is_array() || j["wrappers"].size() > 64 || r.commit_sequence == 0) {
        return Status::Corruption("failover record: wrappers");
      }
      for (const auto& w : j["wrappers"]) {
        if (!w.is_string()) return Status::Corruption("failover record: wrappers");
        const std::string path = w.get<std::string>();
        const std::string leaf = path.size() > dir.size() ? path.substr(dir.size()) : "";
        if (path.rfind(dir, 0) != 0 || leaf.size() <= 6 || leaf.find('/') != std::string::npos ||
            leaf.compare(leaf.size() - 6, 6, ".qcow2") != 0) {
          return Status::Corruption("failover record: wrapper '" + path + "' is not inside " + dir);
        }
        r.wrappers.push_back(path);
      }
    }
    // The run directory must be ours: <state>/run/<one name>.
    const std::filesystem::path rd(r.run_dir);
    const std::string leaf = rd.filename().string();
    if (!rd.is_absolute() || rd.parent_path().string() != run_root ||
        (leaf.rfind("fo-", 0) != 0 && leaf.rfind("t-", 0) != 0)) {
      return Status::Corruption("failover record: run_dir '" + r.run_dir + "' is not inside " + run_root);
    }
    return r;
  }
};

struct FailoverManager::Active {
  std::mutex vm_mu;  // guards vm (VmLauncher is not thread-safe)
  Record rec;
  ReplicaStore* store = nullptr;  // AcquireLocal'd; released by TearDown
  std::unique_ptr<VmLauncher> vm;
};

// ---------------------------------------------------------------- setup

FailoverManager::FailoverManager(Catalog* catalog, JobEngine* jobs, ReplicaManager* replicas, FailoverOptions options)
    : catalog_(catalog),
      jobs_(jobs),
      replicas_(replicas),
      options_(std::move(options)),
      exports_(NbdServerOptions{options_.state_dir + "/run/points.sock", 256, 30000}) {}

FailoverManager::~FailoverManager() { Stop(); }

std::string FailoverManager::points_socket() const { return exports_.socket_path(); }

std::string FailoverManager::RecordPath(const std::string& vm_id, bool test) const {
  return options_.state_dir + "/failover/" + vm_id + (test ? ".test.json" : ".json");
}

std::string FailoverManager::RunDir(const std::string& vm_id, bool test) const {
  return options_.state_dir + "/run/" + (test ? "t-" : "fo-") + ShortId(vm_id);
}

Status FailoverManager::Start() {
  VMR_RETURN_IF_ERROR(MakeDirs(options_.state_dir + "/run", 0700));
  VMR_RETURN_IF_ERROR(MakeDirs(options_.state_dir + "/failover", 0700));
  VMR_RETURN_IF_ERROR(exports_.Start());
  {
    std::lock_guard<std::mutex> l(mu_);
    started_ = true;
  }
  std::error_code ec;
  std::vector<std::string> paths;
  for (const auto& e : std::filesystem::directory_iterator(options_.state_dir + "/failover", ec)) {
    const std::string name = e.path().filename().string();
    if (name.size() > 5 && name.compare(name.size() - 5, 5, ".json") == 0) paths.push_back(e.path().string());
  }
  if (ec) return Status::IOError("listing " + options_.state_dir + "/failover: " + ec.message());
  std::sort(paths.begin(), paths.end());
  for (const auto& p : paths) Resume(p);
  ResumeImports();
  return Status::Ok();
}

void FailoverManager::Stop() {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!started_) return;
    started_ = false;
    // The VMs keep running; their records stay for the next daemon.
    for (auto& [key, a] : active_) {
      if (a->store != nullptr) replicas_->ReleaseLocal(a->rec.vm_id);
      a->store = nullptr;
    }
    active_.clear();
  }
  exports_.Stop();
}

// Takes up one record at start (docs/failover.md section 3).
void FailoverManager::Resume(const std::string& path) {
  auto text = ReadFile(path, kMaxRecordBytes + 1);
  if (!text.ok()) {
    spdlog::error("failover: cannot read {}: {}", path, text.status().ToString());
    return;
  }
  auto rec = Record::Decode(*text, options_.state_dir + "/run");
  if (!rec.ok()) {
    spdlog::error("failover: {} left alone: {}", path, rec.status().ToString());
    return;
  }
  const bool test = rec->kind == "test";
  if (path != RecordPath(rec->vm_id, test) || rec->run_dir != RunDir(rec->vm_id, test)) {
    spdlog::error("failover: {} left alone: it names VM {} with run directory {}", path, rec->vm_id, rec->run_dir);
    return;
  }
  auto a = std::make_shared<Active>();
  a->rec = *rec;
  auto catalog_vm = catalog_->GetVm(rec->vm_id);
  auto catalog_rel = catalog_->GetRelationship(rec->vm_id, 0);
  const bool now_primary = catalog_vm.ok() && *catalog_vm && (*catalog_vm)->mode == ReplicationMode::kPrimary;
  const ReplicationState catalog_state =
      catalog_rel.ok() && *catalog_rel ? (*catalog_rel)->state : ReplicationState::kDisabled;
  if (!test && rec->phase == "committed" && now_primary) {
    // A crash inside a reverse's switch (section 13.1 step 3) after the
    // catalog transaction: rolled forward.
    spdlog::warn("failover: VM {}: the reverse's switch reached the catalog; it is completed", rec->vm_id);
    a->rec.phase = "reversed";
    Status w = WriteFileAtomic(path, a->rec.Encode(), 0600);
    if (!w.ok()) spdlog::error("failover: VM {}: {}", rec->vm_id, w.ToString());
    const std::string send_path = ReverseSendRecordPath(options_.state_dir, rec->vm_id);
    auto raw = ReadReverseRecord(send_path);
    auto send = raw.ok() ? ReverseSendRecord::Decode(*raw, options_.state_dir) : Result<ReverseSendRecord>(raw.status());
    if (send.ok() && send->purpose == "reverse" && send->phase == "peer" && send->claim) {
      send->phase = "switched";
      Status ws = WriteReverseRecord(send_path, send->Encode());
      if (!ws.ok()) spdlog::error("failover: VM {}: {}", rec->vm_id, ws.ToString());
    }
  }
  if (a->rec.phase == "reversed") {
    // The VM is a primary here now (section 13.1): no store to hold, only
    // its launcher (StartVm, stop) and its wrappers.
    auto vm = VmLauncher::Adopt(rec->run_dir);
    if (vm.ok()) a->vm = std::move(*vm);
    spdlog::info("failover: VM {}: reversed (a primary on its disk wrappers); its VM {}", rec->vm_id,
                 a->vm && a->vm->IsRunning() ? "runs" : "is not running");
    std::lock_guard<std::mutex> l(mu_);
    active_[rec->vm_id] = a;
    return;
  }
  auto store = replicas_->AcquireLocal(rec->vm_id);
  if (!store.ok()) {
    spdlog::error("failover: {}: the replica of VM {} cannot be opened: {}", path, rec->vm_id,
                  store.status().ToString());
    return;
  }
  a->store = *store;
  auto vm = VmLauncher::Adopt(rec->run_dir);
  if (vm.ok()) a->vm = std::move(*vm);

  if (rec->phase == "preparing") {
    // InitiateFailover was interrupted: undo it, as after an error.
    spdlog::warn("failover: VM {}: an interrupted failover is undone", rec->vm_id);
    Status s = TearDown(*a);
    if (s.ok()) s = SetState(rec->vm_id, static_cast<ReplicationState>(rec->previous_state));
    if (s.ok()) {
      ::unlink(path.c_str());
      FsyncParentDir(path).IgnoreError();
      replicas_->KickApply(rec->vm_id);
    } else {
      spdlog::error("failover: VM {}: undoing the interrupted failover: {}", rec->vm_id, s.ToString());
    }
    return;
  }
  if (rec->phase == "failed-over" && catalog_state == ReplicationState::kFailbackInProgress) {
    // A failback stopped before its commit began: back to 5.
    spdlog::warn("failover: VM {}: an interrupted failback is undone (state 5)", rec->vm_id);
    Status st = SetState(rec->vm_id, ReplicationState::kRecovered);
    if (!st.ok()) spdlog::error("failover: VM {}: {}", rec->vm_id, st.ToString());
  }
  if (rec->phase == "committed" && catalog_state == ReplicationState::kFailbackComplete) {
    // A failback whose last catalog write landed: its record catches up.
    a->rec.phase = "failed-back";
    Status w = WriteFileAtomic(path, a->rec.Encode(), 0600);
    if (!w.ok()) spdlog::error("failover: VM {}: {}", rec->vm_id, w.ToString());
  }
  if (a->rec.phase != "committed" && a->rec.phase != "failed-back") {
    for (const auto& name : rec->exports) {
      // "<vm id>/<disk>@<seq>"
      const size_t slash = name.find('/');
      const size_t at = name.rfind('@');
      auto e = exports_.Export(a->store, rec->sequence, name.substr(slash + 1, at - slash - 1));
      if (!e.ok()) {
        spdlog::error("failover: VM {}: export {} not restored: {}", rec->vm_id, name, e.status().ToString());
      }
    }
  } else if (a->rec.phase == "committed") {
    // The commit's last step may not have reached the catalog (or a
    // failback failed after its commit: 6 as well).
    Status st = SetState(rec->vm_id, ReplicationState::kCommitted);
    if (!st.ok()) spdlog::error("failover: VM {}: {}", rec->vm_id, st.ToString());
  }
  const bool running = a->vm && a->vm->IsRunning();
  spdlog::info("failover: VM {}: {} at point {} taken up ({})", rec->vm_id, rec->kind, rec->sequence,
               running ? "its VM runs" : "its VM is not running");
  {
    std::lock_guard<std::mutex> l(mu_);
    active_[rec->vm_id + (test ? ".test" : "")] = a;
  }
  if (rec->phase == "committing") {
    // "A crash in the middle resumes": the commit goes on as a new job.
    auto job = StartCommitJob(rec->vm_id, /*resumed=*/true);
    if (!job.ok()) {
      spdlog::error("failover: VM {}: the interrupted CommitFailover was not resumed: {}", rec->vm_id,
                    job.status().ToString());
    } else {
      spdlog::warn("failover: VM {}: the interrupted CommitFailover resumes as job {}", rec->vm_id, job->id);
    }
  }
}

// ---------------------------------------------------------------- helpers

Result<VmRecord> FailoverManager::ResolveReplicaVm(const std::string& vm) {
  if (vm.empty()) return Status::InvalidArgument("VM: a name or UUID is required");
  VMR_ASSIGN_OR_RETURN(auto by_id, catalog_->GetVm(vm));
  std::optional<VmRecord> found = by_id;
  if (!found) {
    auto by_name = catalog_->FindVmByName(vm);
    if (!by_name.ok()) {
      if (by_name.status().code() == Code::kFailedPrecondition) {
        return Status::InvalidArgument("VM: several VMs are named \"" + vm + "\"; use the UUID");
      }
      return by_name.status();
    }
    found = *by_name;
  }
  if (!found) return Status::NotFound("no VM named or with id '" + vm + "' on this host");
  return *found;
}

Status FailoverManager::SetState(const std::string& vm_id, ReplicationState state,
                                 std::optional<ReplicationType> failed_over_type) {
  return catalog_->RunInTransaction([&]() -> Status {
    VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, 0));
    if (!rel) return Status::NotFound("VM " + vm_id + " has no replication relationship");
    if (rel->state != state) spdlog::info("VM {}: state {} -> {}", vm_id, Name(rel->state), Name(state));
    rel->state = state;
    if (failed_over_type) rel->failed_over_replication_type = *failed_over_type;
    return catalog_->PutRelationship(*rel);
  });
}

Status FailoverManager::TearDown(Active& a) {
  std::lock_guard<std::mutex> vl(a.vm_mu);
  Status first;
  if (a.vm) {
    Status s = a.vm->Stop(options_.vm_stop_grace);
    if (s.ok()) s = a.vm->DropOverlays();
    if (!s.ok() && first.ok()) first = s.WithContext("stopping the VM in " + a.rec.run_dir);
    if (s.ok()) a.vm.reset();
  }
  if (first.ok()) {
    // Files of ours beside the launcher's (the seed), then the directory.
    const std::string seed = a.rec.run_dir + "/seed.iso";
    if (::unlink(seed.c_str()) != 0 && errno != ENOENT && first.ok()) first = Errno("unlink", seed);
    if (::rmdir(a.rec.run_dir.c_str()) != 0 && errno != ENOENT && first.ok()) first = Errno("rmdir", a.rec.run_dir);
  }
  for (const auto& name : a.rec.exports) {
    Status s = exports_.Unexport(name);
    if (!s.ok() && s.code() != Code::kNotFound && first.ok()) first = s;
  }
  if (first.ok() && a.store != nullptr) {
    replicas_->ReleaseLocal(a.rec.vm_id);
    a.store = nullptr;
  }
  return first;
}

namespace {

// The point to use: `point_id` from the catalog, or the store's latest.
struct ChosenPoint {
  uint64_t sequence = 0;
  std::string id;
  ReplicationType kind = ReplicationType::kRegular;
};

Result<ChosenPoint> ChoosePoint(Catalog* catalog, const ReplicaStore& store, const std::string& vm_id,
                                const std::string& point_id) {
  VMR_ASSIGN_OR_RETURN(auto points, catalog->ListRecoveryPoints(vm_id));
  const auto retained = store.ListPoints();
  auto in_store = [&](uint64_t seq) {
    return std::any_of(retained.begin(), retained.end(),
                       [&](const ReplicaPoint& p) { return p.sequence == seq && p.readable; });
  };
  ChosenPoint c;
  if (point_id.empty()) {
    c.sequence = store.latest_sequence();
    if (c.sequence == 0) {
      return Status::FailedPrecondition("VM " + vm_id + " has no recovery point yet (initial replication not applied)");
    }
    for (const auto& p : points) {
      if (p.sequence == c.sequence) {
        c.id = p.id;
        c.kind = static_cast<ReplicationType>(p.kind);
      }
    }
    if (c.id.empty()) c.id = "seq-" + std::to_string(c.sequence);
    return c;
  }
  for (const auto& p : points) {
    if (p.id != point_id) continue;
    if (p.sequence == 0 || !in_store(p.sequence)) break;
    c.sequence = p.sequence;
    c.id = p.id;
    c.kind = static_cast<ReplicationType>(p.kind);
    return c;
  }
  return Status::InvalidArgument("RecoveryPointIdentifier: '" + point_id + "' is not a recovery point of VM " +
                                 vm_id + " (see ListRecoveryPoints)");
}

// The stored definition, with only the disks the replica holds (in the
// store's order, which is the definition's order of the included disks).
Result<VmDefinition> DefinitionForStore(const VmRecord& vm, const ReplicaStore& store) {
  auto j = json::parse(vm.definition_json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::Corruption("VM " + vm.name + ": its stored definition is not JSON");
  auto def = VmDefinition::FromJson(j);
  if (!def.ok()) {
    return Status::FailedPrecondition("VM " + vm.name + ": its stored definition cannot be read (" +
                                      def.status().message() + ")");
  }
  std::vector<VmDiskSpec> disks;
  for (const auto& sd : store.disks()) {
    auto it = std::find_if(def->disks.begin(), def->disks.end(), [&](const VmDiskSpec& d) { return d.name == sd.name; });
    if (it == def->disks.end()) {
      return Status::FailedPrecondition("VM " + vm.name + ": replica disk " + sd.name + " is not in its definition");
    }
    VmDiskSpec d = *it;
    d.size_bytes = sd.size;
    disks.push_back(d);
  }
  def->disks = std::move(disks);
  return *def;
}

}  // namespace

VmLaunchSpec FailoverManager::LaunchSpec(const VmDefinition& def, const Active& a, VmNetworkMode network) const {
  VmLaunchSpec spec;
  spec.definition = def;
  spec.run_dir = a.rec.run_dir;
  for (size_t i = 0; i < a.rec.exports.size(); ++i) {
    VmLaunchDisk d;
    d.backing = exports_.Uri(a.rec.exports[i]);
    d.size_bytes = a.store->disks()[i].size;
    d.nbd_reconnect_delay_s = options_.nbd_reconnect_delay_s;
    spec.disks.push_back(d);
  }
  spec.network = network;
  spec.accel = options_.accel;
  spec.start_timeout = options_.vm_start_timeout;
  if (!def.boot_kernel.empty()) spec.kernel_boot = VmKernelBoot{def.boot_kernel, def.boot_initrd, def.boot_append};
  ChooseHypervisor(&spec);
  return spec;
}

bool FailoverManager::RunsUnderLibvirt(const VmDefinition& def) const {
  return options_.libvirt_vms_through_libvirt && def.kind == VmSourceKind::kLibvirt && !def.libvirt_uri.empty();
}

void FailoverManager::ChooseHypervisor(VmLaunchSpec* spec) const {
  if (RunsUnderLibvirt(spec->definition)) {
    spec->hypervisor = VmHypervisor::kLibvirt;
    spec->libvirt_uri = spec->definition.libvirt_uri;
  } else {
    spec->hypervisor = VmHypervisor::kQemu;
  }
}

Status FailoverManager::AttachSeed(VmLaunchSpec* spec, const VmRecord& vm, const std::string& instance_id) {
  VMR_ASSIGN_OR_RETURN(auto stored, catalog_->GetFailoverNetworkSettings(vm.id));
  if (stored.empty()) return Status::Ok();  // no settings: the guest keeps its own
  NoCloudSeed seed;
  seed.instance_id = instance_id;
  seed.local_hostname = HostNameFor(vm.name, vm.id);
  for (const auto& r : stored) {
    seed.network.push_back(FailoverNetworkAdapterSettings{r.adapter, r.ip_addresses, r.subnets, r.default_gateways,
                                                          r.dns_servers, r.dhcp_enabled});
  }
  const std::string iso = spec->run_dir + "/seed.iso";
  VMR_RETURN_IF_ERROR(WriteNoCloudSeedImage(seed, iso).WithContext("writing the failover network seed"));
  spec->extra_drives.push_back(VmExtraDrive{iso, "raw"});
  return Status::Ok();
}

Result<VmRecord> FailoverManager::CheckReplicaMethod(const std::string& vm_name, Operation op,
                                                     const std::string& point_id) {
  VMR_ASSIGN_OR_RETURN(VmRecord vm, ResolveReplicaVm(vm_name));
  if (vm.mode != ReplicationMode::kReplica && vm.mode != ReplicationMode::kExtendedReplica) {
    return Status::FailedPrecondition("VM " + vm.name + " is not a replica on this host (mode " +
                                      std::string(Name(vm.mode)) + "): " + std::string(Name(op)) +
                                      " runs on the replica server");
  }
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm.id, 0));
  if (!rel) return Status::FailedPrecondition("VM " + vm.name + " has no replication relationship");
  VMR_ASSIGN_OR_RETURN(TableMode mode, TableModeFor(vm.mode, 0));
  VMR_RETURN_IF_ERROR(CheckTransition(mode, rel->state, op).status());
  // The point is checked before any job starts (32773 at once).
  VMR_ASSIGN_OR_RETURN(ReplicaStore * store, replicas_->AcquireLocal(vm.id));
  auto chosen = ChoosePoint(catalog_, *store, vm.id, point_id);
  replicas_->ReleaseLocal(vm.id);
  VMR_RETURN_IF_ERROR(chosen.status());
  return vm;
}

// ---------------------------------------------------------------- InitiateFailover

Result<JobRecord> FailoverManager::InitiateFailover(const FailoverRequestParams& p) {
  VMR_ASSIGN_OR_RETURN(VmRecord vm, CheckReplicaMethod(p.vm, Operation::kInitiateFailover, p.point_id));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm.id, 0));
  if (!rel) return Status::FailedPrecondition("VM " + vm.name + " has no replication relationship");
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!started_) return Status::Unavailable("the failover service is not running");
    DropStaleReversedLocked(vm.id);
    if (busy_.count(vm.id) != 0 || active_.count(vm.id) != 0) {
      return Status::FailedPrecondition("VM " + vm.name + ": a failover is already in progress or active");
    }
    if (busy_.count(vm.id + ".test") != 0 || active_.count(vm.id + ".test") != 0) {
      return Status::Busy("VM " + vm.name + " has a test VM; remove it first (DestroySystem)");
    }
    busy_.insert(vm.id);
  }
  if (p.force) {
    spdlog::warn("InitiateFailover of VM {} ({}) with force: the operator accepted that the primary may still run",
                 vm.name, vm.id);
  } else {
    // Is the primary VM known to run? Asked over the link when reachable;
    // an unreachable primary is the case failover exists for.
    const std::string& address = rel->settings.primary_connection_point;
    if (address.empty() || !options_.ask_primary) {
      spdlog::warn("InitiateFailover of VM {}: the primary's address is unknown; not asked whether it runs", vm.name);
    } else {
      auto answer = options_.ask_primary(address, vm.id);
      const bool unreachable = !answer.ok() && (answer.status().code() == Code::kUnavailable ||
                                                answer.status().code() == Code::kTimeout);
      if (!answer.ok() && !unreachable) {
        // Reached but no usable answer (refused, not its VM, garbled): the
        // guard against two running copies must not switch itself off.
        std::lock_guard<std::mutex> l(mu_);
        busy_.erase(vm.id);
        return Status::FailedPrecondition("VM " + vm.name + ": the primary host " + address +
                                          " could not say whether the VM runs (" + answer.status().ToString() +
                                          "); check it, or force the failover (--force)");
      }
      if (unreachable) {
        spdlog::warn("InitiateFailover of VM {}: the primary at {} was not reached ({}): failing over", vm.name,
                     address, answer.status().ToString());
      } else if (answer->run_state == 1) {
        std::lock_guard<std::mutex> l(mu_);
        busy_.erase(vm.id);
        return Status::FailedPrecondition("VM " + vm.name + " still runs on its primary host " + address + " (" +
                                          answer->detail +
                                          "): shut it down, use a planned failover, or force the failover (--force) "
                                          "if you accept two running copies");
      } else {
        spdlog::info("InitiateFailover of VM {}: the primary at {} says: {} ({})", vm.name, address,
                     answer->run_state == 2 ? "not running" : "cannot tell", answer->detail);
      }
    }
  }
  json params = {{"vm", vm.id}, {"point", p.point_id}, {"force", p.force}, {"start", p.start_vm}};
  auto job = jobs_->Start(JobType::kFailover, vm.id, params.dump(), /*cancellable=*/false, /*resumable=*/false,
                          [this, id = vm.id, point = p.point_id, start = p.start_vm](JobContext& ctx) -> Status {
                            Status s = DoFailover(ctx, id, point, start);
                            std::lock_guard<std::mutex> l(mu_);
                            busy_.erase(id);
                            return s;
                          });
  if (!job.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    busy_.erase(vm.id);
  }
  return job;
}

Status FailoverManager::DoFailover(JobContext& job, const std::string& vm_id, const std::string& point_id,
                                   bool start_vm) {
  VMR_ASSIGN_OR_RETURN(auto vm, catalog_->GetVm(vm_id));
  if (!vm) return Status::NotFound("VM " + vm_id + " was removed");
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, 0));
  if (!rel) return Status::FailedPrecondition("VM " + vm->name + " has no replication relationship");
  VMR_ASSIGN_OR_RETURN(TableMode mode, TableModeFor(vm->mode, 0));
  VMR_RETURN_IF_ERROR(CheckTransition(mode, rel->state, Operation::kInitiateFailover).status());
  const ReplicationState previous = rel->state;

  // Logs received before the call are applied first: "latest" is the
  // latest the primary sent. Then the state holds further applies.
  Status w = replicas_->WaitApplied(vm_id, std::chrono::minutes(10));
  if (!w.ok() && w.code() != Code::kNotFound) return w.WithContext("applying the staged logs");
  job.SetProgress(10);

  auto a = std::make_shared<Active>();
  a->rec.kind = "failover";
  a->rec.vm_id = vm_id;
  a->rec.phase = "preparing";
  a->rec.previous_state = static_cast<int>(previous);
  a->rec.run_dir = RunDir(vm_id, false);
  const std::string record_path = RecordPath(vm_id, false);

  auto fail = [&](Status why) -> Status {
    Status t = TearDown(*a);
    if (!t.ok()) {
      spdlog::error("InitiateFailover of VM {}: cleaning up: {}", vm_id, t.ToString());
      return why.WithContext("failover failed, and cleaning up failed too (" + t.message() + ")");
    }
    ::unlink(record_path.c_str());
    FsyncParentDir(record_path).IgnoreError();
    Status r = SetState(vm_id, previous);
    if (!r.ok()) spdlog::error("InitiateFailover of VM {}: restoring state {}: {}", vm_id, Name(previous), r.ToString());
    replicas_->ReleaseApply(vm_id);
    return why;
  };

  auto store = replicas_->AcquireLocal(vm_id);
  if (!store.ok()) return store.status();
  a->store = *store;
  auto chosen = ChoosePoint(catalog_, *a->store, vm_id, point_id);
  if (!chosen.ok()) return fail(chosen.status());
  a->rec.sequence = chosen->sequence;
  a->rec.point_id = chosen->id;
  // The record before the state: a crash from here on is undone at the
  // next start (docs/failover.md section 3), never left in 12.
  Status s = MakeDirs(a->rec.run_dir, 0700);
  if (s.ok()) s = WriteFileAtomic(record_path, a->rec.Encode(), 0600);
  if (!s.ok()) return fail(s);
  s = SetState(vm_id, ReplicationState::kRecoveryInProgress);
  // No staged log is applied from here on (an apply already running ends
  // first): the store stays at the chosen point's history.
  if (s.ok()) s = replicas_->HoldApply(vm_id, std::chrono::minutes(10));
  if (!s.ok() && s.code() != Code::kNotFound) return fail(s);
  if (point_id.empty()) {
    chosen = ChoosePoint(catalog_, *a->store, vm_id, point_id);  // the latest, now that applies are held
    if (!chosen.ok()) return fail(chosen.status());
    a->rec.sequence = chosen->sequence;
    a->rec.point_id = chosen->id;
  }
  auto names = exports_.ExportPoint(a->store, chosen->sequence);
  if (!names.ok()) return fail(names.status().WithContext("exporting point " + std::to_string(chosen->sequence)));
  a->rec.exports = *names;
  s = WriteFileAtomic(record_path, a->rec.Encode(), 0600);
  if (!s.ok()) return fail(s);
  job.SetProgress(30);

  if (start_vm) {
    auto def = DefinitionForStore(*vm, *a->store);
    if (!def.ok()) return fail(def.status());
    VmLaunchSpec spec = LaunchSpec(*def, *a, VmNetworkMode::kIsolated);
    // The failover IP settings, as a cloud-init NoCloud seed (section 5),
    // with a new instance-id per failover.
    const int64_t now = options_.now_ms ? options_.now_ms() : SystemNowMs();
    a->rec.instance_id = "vmreplica-" + vm_id + "-" + std::to_string(chosen->sequence) + "-" + std::to_string(now);
    s = AttachSeed(&spec, *vm, a->rec.instance_id);
    if (!s.ok()) return fail(s);
    auto launched = VmLauncher::Start(spec);
    if (!launched.ok()) return fail(launched.status().WithContext("starting the failover VM"));
    a->vm = std::move(*launched);
    a->rec.started = true;
  }
  job.SetProgress(90);
  // The state first: a crash before the record says "failed-over" is undone
  // at the next start (the record still says "preparing").
  s = SetState(vm_id, ReplicationState::kRecovered, chosen->kind);
  a->rec.phase = "failed-over";
  if (s.ok()) s = WriteFileAtomic(record_path, a->rec.Encode(), 0600);
  if (!s.ok()) return fail(s);
  {
    std::lock_guard<std::mutex> l(mu_);
    active_[vm_id] = a;
  }
  job.SetResult(json{{"vm_id", vm_id},
                     {"recovery_point_id", chosen->id},
                     {"sequence", chosen->sequence},
                     {"exports", a->rec.exports},
                     {"started", a->rec.started}}
                    .dump());
  spdlog::info("VM {} failed over to point {} (sequence {}){}", vm->name, chosen->id, chosen->sequence,
               a->rec.started ? ", VM started" : "");
  return Status::Ok();
}

// ---------------------------------------------------------------- RevertFailover

Result<JobRecord> FailoverManager::RevertFailover(const std::string& vm_name) {
  VMR_ASSIGN_OR_RETURN(VmRecord vm, ResolveReplicaVm(vm_name));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm.id, 0));
  if (!rel) return Status::FailedPrecondition("VM " + vm.name + " has no replication relationship");
  VMR_ASSIGN_OR_RETURN(TableMode mode, TableModeFor(vm.mode, 0));
  VMR_RETURN_IF_ERROR(CheckTransition(mode, rel->state, Operation::kRevertFailover).status());
  if (mode == TableMode::kPrimary) {
    return Status::NotSupported("RevertFailover on the primary (cancelling a planned failover) is not built yet");
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    if (busy_.count(vm.id) != 0) return Status::FailedPrecondition("VM " + vm.name + ": a failover job is running");
    busy_.insert(vm.id);
  }
  auto job = jobs_->Start(JobType::kRevertFailover, vm.id, json{{"vm", vm.id}}.dump(), false, false,
                          [this, id = vm.id](JobContext& ctx) -> Status {
                            Status s = DoRevert(ctx, id);
                            std::lock_guard<std::mutex> l(mu_);
                            busy_.erase(id);
                            return s;
                          });
  if (!job.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    busy_.erase(vm.id);
  }
  return job;
}

Status FailoverManager::DoRevert(JobContext& job, const std::string& vm_id) {
  std::shared_ptr<Active> a;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = active_.find(vm_id);
    if (it != active_.end()) a = it->second;
  }
  if (!a && ::access(RecordPath(vm_id, false).c_str(), F_OK) == 0) {
    return Status::FailedPrecondition("VM " + vm_id + ": its failover record " + RecordPath(vm_id, false) +
                                      " was not taken up at the daemon's start (see the log); fix or remove it first");
  }
  if (a && a->rec.phase != "failed-over") {
    return Status::FailedPrecondition("VM " + vm_id + ": the failover is " + a->rec.phase + "; it cannot be reverted");
  }
  if (a) {
    VMR_RETURN_IF_ERROR(TearDown(*a).WithContext("RevertFailover"));
    {
      std::lock_guard<std::mutex> l(mu_);
      active_.erase(vm_id);
    }
  }
  job.SetProgress(70);
  const std::string path = RecordPath(vm_id, false);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Errno("unlink", path);
  FsyncParentDir(path).IgnoreError();
  VMR_RETURN_IF_ERROR(SetState(vm_id, ReplicationState::kReplicating, ReplicationType::kNone));
  replicas_->ReleaseApply(vm_id);
  spdlog::info("VM {}: failover reverted; replication continues", vm_id);
  return Status::Ok();
}

// ---------------------------------------------------------------- CommitFailover

namespace {

// The content of point `sequence` over `ranges` (the blocks changed since):
// applied as a new point, it rolls the latest image back to that point.
class RollbackSource final : public DeltaSource {
 public:
  RollbackSource(const ReplicaStore* store, uint64_t sequence, std::vector<ReplicaRange> ranges)
      : store_(store), sequence_(sequence), ranges_(std::move(ranges)) {}

  Result<std::optional<DeltaRecord>> Next() override {
    while (index_ < ranges_.size() && done_ == ranges_[index_].length) {
      ++index_;
      done_ = 0;
    }
    if (index_ == ranges_.size()) return std::optional<DeltaRecord>();
    const ReplicaRange& r = ranges_[index_];
    const uint64_t len = std::min<uint64_t>(r.length - done_, kRecordBytes);
    DeltaRecord rec;
    rec.disk = r.disk;
    rec.offset = r.offset + done_;
    rec.length = len;
    rec.data.resize(len);
    VMR_RETURN_IF_ERROR(store_->ReadPoint(sequence_, r.disk, rec.offset, len, rec.data.data()));
    if (std::all_of(rec.data.begin(), rec.data.end(), [](char c) { return c == 0; })) {
      rec.zero = true;
      rec.data.clear();
    }
    done_ += len;
    bytes_ += len;
    return std::optional<DeltaRecord>(std::move(rec));
  }
  uint64_t bytes() const { return bytes_; }

 private:
  static constexpr uint64_t kRecordBytes = 1u << 20;
  const ReplicaStore* const store_;
  const uint64_t sequence_;
  const std::vector<ReplicaRange> ranges_;
  size_t index_ = 0;
  uint64_t done_ = 0;
  uint64_t bytes_ = 0;
};

}  // namespace

Result<JobRecord> FailoverManager::CommitFailover(const std::string& vm_name) {
  VMR_ASSIGN_OR_RETURN(VmRecord vm, ResolveReplicaVm(vm_name));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm.id, 0));
  if (!rel) return Status::FailedPrecondition("VM " + vm.name + " has no replication relationship");
  VMR_ASSIGN_OR_RETURN(TableMode mode, TableModeFor(vm.mode, 0));
  VMR_RETURN_IF_ERROR(CheckTransition(mode, rel->state, Operation::kCommitFailover).status());
  {
    std::lock_guard<std::mutex> l(mu_);
    if (active_.count(vm.id) == 0) {
      return Status::FailedPrecondition("VM " + vm.name + " is in state Recovered but no failover is recorded here");
    }
    if (busy_.count(vm.id + ".test") != 0 || active_.count(vm.id + ".test") != 0) {
      return Status::Busy("VM " + vm.name + " has a test VM; remove it first (DestroySystem)");
    }
  }
  return StartCommitJob(vm.id, /*resumed=*/false);
}

Result<JobRecord> FailoverManager::StartCommitJob(const std::string& vm_id, bool resumed) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (busy_.count(vm_id) != 0) return Status::FailedPrecondition("VM " + vm_id + ": a failover job is running");
    busy_.insert(vm_id);
  }
  auto job = jobs_->Start(JobType::kCommitFailover, vm_id, json{{"vm", vm_id}, {"resumed", resumed}}.dump(), false,
                          false, [this, vm_id](JobContext& ctx) -> Status {
                            Status s = DoCommit(ctx, vm_id);
                            std::lock_guard<std::mutex> l(mu_);
                            busy_.erase(vm_id);
                            return s;
                          });
  if (!job.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    busy_.erase(vm_id);
  }
  return job;
}

Status FailoverManager::DoCommit(JobContext& job, const std::string& vm_id) {
  std::shared_ptr<Active> a;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = active_.find(vm_id);
    if (it == active_.end()) return Status::FailedPrecondition("VM " + vm_id + " has no failover recorded");
    a = it->second;
  }
  const std::string record_path = RecordPath(vm_id, false);
  ReplicaStore& store = *a->store;
  const uint64_t point = a->rec.sequence;
  // 1. Decide the rollback's sequence once, durably.
  if (a->rec.phase == "failed-over") {
    const uint64_t latest = store.latest_sequence();
    a->rec.commit_sequence = latest > point ? latest + 1 : point;
    a->rec.replicated_sequence = latest;
    a->rec.phase = "committing";
    VMR_RETURN_IF_ERROR(WriteFileAtomic(record_path, a->rec.Encode(), 0600));
  } else if (a->rec.phase != "committing") {
    return Status::FailedPrecondition("VM " + vm_id + ": the failover is " + a->rec.phase);
  }
  const uint64_t target = a->rec.commit_sequence;
  PointInfo info;
  for (const auto& p : store.ListPoints()) {
    if (p.sequence == point) info = PointInfo{p.time_ms, p.kind, p.generation_id};
  }
  // 2. Roll the base back to the point: its content over every block
  // changed since, applied as one crash-safe point.
  uint64_t rolled_back = 0;
  if (store.latest_sequence() < target) {
    if (store.latest_sequence() != target - 1) {
      return Status::FailedPrecondition("VM " + vm_id + ": the store moved past the commit's rollback point");
    }
    VMR_ASSIGN_OR_RETURN(auto ranges, store.ChangedSince(point));
    RollbackSource src(&store, point, std::move(ranges));
    VMR_RETURN_IF_ERROR(store.Apply(target, info, src).WithContext("rolling back to point " + std::to_string(point)));
    rolled_back = src.bytes();
  }
  job.SetProgress(40);
  // 3. The failover VM's writes into the base.
  bool running = false;
  {
    std::lock_guard<std::mutex> vl(a->vm_mu);
    running = a->vm && a->vm->IsRunning();
  }
  uint64_t merged = 0;
  if (running) {
    VMR_RETURN_IF_ERROR(MergeLive(job, *a));
  } else if (store.latest_sequence() == target) {
    std::lock_guard<std::mutex> vl(a->vm_mu);
    if (a->vm && !a->vm->overlays().empty()) {
      // Only disks not merged live before (their overlays are stale: the VM
      // wrote the replica's file directly after its pivot).
      std::vector<std::string> overlays;
      std::vector<uint32_t> disk_of;
      for (size_t i = 0; i < a->vm->overlays().size() && i < store.disks().size(); ++i) {
        const std::string& name = store.disks()[i].name;
        if (std::find(a->rec.merged_disks.begin(), a->rec.merged_disks.end(), name) != a->rec.merged_disks.end()) {
          continue;
        }
        overlays.push_back(a->vm->overlays()[i]);
        disk_of.push_back(static_cast<uint32_t>(i));
      }
      if (!overlays.empty()) {
        VMR_ASSIGN_OR_RETURN(auto writes, OverlayDeltaSource::Open(overlays));
        class Remap final : public DeltaSource {
         public:
          Remap(DeltaSource* inner, const std::vector<uint32_t>* disk_of) : inner_(inner), disk_of_(disk_of) {}
          Result<std::optional<DeltaRecord>> Next() override {
            VMR_ASSIGN_OR_RETURN(auto r, inner_->Next());
            if (r) {
              if (r->disk >= disk_of_->size()) return Status::Internal("overlay record of an unknown disk");
              r->disk = (*disk_of_)[r->disk];
            }
            return r;
          }

         private:
          DeltaSource* inner_;
          const std::vector<uint32_t>* disk_of_;
        } remapped(writes.get(), &disk_of);
        PointInfo now_info = info;
        now_info.time_ms = options_.now_ms ? options_.now_ms() : SystemNowMs();
        VMR_RETURN_IF_ERROR(
            store.Apply(target + 1, now_info, remapped).WithContext("merging the failover VM's writes"));
        merged = writes->stats().data_bytes + writes->stats().zero_bytes;
      }
      VMR_RETURN_IF_ERROR(a->vm->DropOverlays());
      a->vm.reset();
    }
  }
  job.SetProgress(80);
  // 4. Only the committed point stays.
  for (const auto& name : a->rec.exports) {
    Status u = exports_.Unexport(name);
    if (!u.ok() && u.code() != Code::kNotFound) return u;
  }
  // The history of changed blocks is kept before it is dropped: a reverse
  // later needs "every block that may differ between point C and the
  // committed image" (docs/failover.md section 10.3 step 3). Written again
  // after a crash while the store still has more than one point.
  // Also for a single point (a since list with no entries: nothing changed
  // after it), so that a reverse need not compare every block; not again
  // after a crash once written (the history may be gone by then).
  if (store.ListPoints().size() > 1 || a->rec.since_file.empty()) {
    VMR_RETURN_IF_ERROR(WriteSinceFile(*a, store));
  }
  // Every disk gets its wrapper (made now, bitmap empty, for a VM stopped
  // or never started: the store's files change no more after the commit).
  {
    std::vector<std::string> wrappers;
    for (uint32_t i = 0; i < store.disks().size(); ++i) {
      VMR_ASSIGN_OR_RETURN(std::string w, EnsureWrapper(vm_id, store, i));
      wrappers.push_back(w);
    }
    if (wrappers != a->rec.wrappers) {
      a->rec.wrappers = wrappers;
      VMR_RETURN_IF_ERROR(WriteFileAtomic(record_path, a->rec.Encode(), 0600));
    }
  }
  VMR_RETURN_IF_ERROR(store.DropAllButLatest());
  a->rec.phase = "committed";
  VMR_RETURN_IF_ERROR(WriteFileAtomic(record_path, a->rec.Encode(), 0600));
  VMR_RETURN_IF_ERROR(SetState(vm_id, ReplicationState::kCommitted));
  job.SetResult(json{{"vm_id", vm_id},
                     {"point_sequence", point},
                     {"committed_sequence", store.latest_sequence()},
                     {"rolled_back_bytes", rolled_back},
                     {"merged_offline_bytes", merged},
                     {"vm_running", running}}
                    .dump());
  spdlog::info("VM {}: failover committed at point {} ({} bytes rolled back); {}", vm_id, point, rolled_back,
               running ? "the VM runs on the replica's disks" : "the VM is not running");
  return Status::Ok();
}

// ---------------------------------------------------------------- StartVm

Status FailoverManager::StartVm(const std::string& vm_name) {
  VMR_ASSIGN_OR_RETURN(VmRecord vm, ResolveReplicaVm(vm_name));
  {
    std::lock_guard<std::mutex> l(mu_);
    if (busy_.count(vm.id) != 0) {
      return Status::FailedPrecondition("VM " + vm.name + ": a failover, reverse or failback job of it is running");
    }
  }
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm.id, 0));
  if (vm.mode == ReplicationMode::kPrimary || vm.mode == ReplicationMode::kNone) return StartReversedVm(vm);
  if (!rel || vm.mode != ReplicationMode::kReplica || rel->state != ReplicationState::kCommitted) {
    return Status::FailedPrecondition("VM " + vm.name + " has no committed failover on this host" +
                                      (rel ? " (state " + std::string(Name(rel->state)) + ")" : std::string()) +
                                      ": only a committed failover VM is started here");
  }
  std::shared_ptr<Active> a;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = active_.find(vm.id);
    if (it != active_.end()) a = it->second;
  }
  if (!a || a->rec.phase != "committed" || a->store == nullptr) {
    return Status::FailedPrecondition("VM " + vm.name + ": no committed failover is recorded on this host");
  }
  if (a->rec.wrappers.size() != a->store->disks().size()) {
    return Status::FailedPrecondition("VM " + vm.name +
                                      " was committed by an older vmreplica build: it has no disk wrappers to start on");
  }
  std::lock_guard<std::mutex> vl(a->vm_mu);
  if (a->vm && a->vm->IsRunning()) return Status::FailedPrecondition("VM " + vm.name + " already runs");
  if (a->vm) {
    // The launcher of the VM that ran before: its overlays are stale (the
    // commit merged them); its run directory is emptied for the new start.
    VMR_RETURN_IF_ERROR(a->vm->DropOverlays().WithContext("clearing the VM's previous run directory"));
    a->vm.reset();
  }
  VMR_RETURN_IF_ERROR(MakeDirs(a->rec.run_dir, 0700));
  VMR_ASSIGN_OR_RETURN(VmDefinition def, DefinitionForStore(vm, *a->store));
  VmLaunchSpec spec;
  spec.definition = def;
  spec.run_dir = a->rec.run_dir;
  for (size_t i = 0; i < a->rec.wrappers.size(); ++i) {
    VmLaunchDisk d;
    d.direct_image = a->rec.wrappers[i];
    d.size_bytes = a->store->disks()[i].size;
    spec.disks.push_back(d);
  }
  spec.network = VmNetworkMode::kIsolated;
  spec.accel = options_.accel;
  spec.start_timeout = options_.vm_start_timeout;
  if (!def.boot_kernel.empty()) spec.kernel_boot = VmKernelBoot{def.boot_kernel, def.boot_initrd, def.boot_append};
  ChooseHypervisor(&spec);
  // The failover IP settings with the instance-id the VM booted with at
  // its failover: cloud-init sees the same instance and applies nothing
  // again (a VM never started before gets its first one now).
  if (a->rec.instance_id.empty()) {
    const int64_t now = options_.now_ms ? options_.now_ms() : SystemNowMs();
    a->rec.instance_id =
        "vmreplica-" + vm.id + "-" + std::to_string(a->store->latest_sequence()) + "-" + std::to_string(now);
  }
  VMR_RETURN_IF_ERROR(AttachSeed(&spec, vm, a->rec.instance_id));
  VMR_ASSIGN_OR_RETURN(auto launched, VmLauncher::Start(spec));
  a->vm = std::move(launched);
  a->rec.started = true;
  VMR_RETURN_IF_ERROR(WriteFileAtomic(RecordPath(vm.id, false), a->rec.Encode(), 0600));
  spdlog::info("VM {}: started on its disk wrappers (committed failover)", vm.name);
  return Status::Ok();
}

Result<std::string> FailoverManager::EnsureWrapper(const std::string& vm_id, const ReplicaStore& store,
                                                   uint32_t disk) {
  if (disk >= store.disks().size()) return Status::InvalidArgument("no disk " + std::to_string(disk));
  const std::string dir = options_.state_dir + "/wrappers/" + vm_id;
  VMR_RETURN_IF_ERROR(MakeDirs(dir, 0700));
  const std::string path = dir + "/" + store.disks()[disk].name + ".qcow2";
  VMR_RETURN_IF_ERROR(MakeDiskWrapper(store.DiskPath(disk), path, store.disks()[disk].size, "vmr-" + vm_id + "-g1")
                          .WithContext("disk wrapper of " + store.disks()[disk].name));
  return path;
}

Status FailoverManager::WriteSinceFile(Active& a, const ReplicaStore& store) {
  VMR_ASSIGN_OR_RETURN(SinceList since, LabelChangedSince(store));
  // The last point received from the primary, not the rollback's point.
  if (a.rec.replicated_sequence != 0) since.replicated_sequence = a.rec.replicated_sequence;
  const std::string path = options_.state_dir + "/failover/" + a.rec.vm_id + ".since";
  VMR_RETURN_IF_ERROR(
      WriteRangeListFile(path, kRangeListSince, static_cast<uint32_t>(store.disks().size()), since)
          .WithContext("writing the since file"));
  a.rec.since_file = path;
  VMR_RETURN_IF_ERROR(WriteFileAtomic(RecordPath(a.rec.vm_id, false), a.rec.Encode(), 0600));
  uint64_t bytes = 0;
  for (const auto& e : since.entries) bytes += e.length;
  spdlog::info("VM {}: since file written: {} point(s), {} range(s), {} bytes changed after the oldest point",
               a.rec.vm_id, since.points.size(), since.entries.size(), bytes);
  return Status::Ok();
}

Status FailoverManager::MergeLive(JobContext& job, Active& a) {
  constexpr std::chrono::seconds kMergeQmpTimeout{30};
  std::lock_guard<std::mutex> vl(a.vm_mu);
  if (!a.vm) return Status::FailedPrecondition("the failover VM is gone");
  VMR_ASSIGN_OR_RETURN(std::unique_ptr<QmpChannel> qmp, a.vm->OpenQmp());
  const auto& disks = a.store->disks();
  // Which node each guest disk reads now (query-block by device id).
  auto inserted_node = [&](size_t i) -> Result<std::string> {
    VMR_ASSIGN_OR_RETURN(json blocks, qmp->Execute("query-block", nullptr, kMergeQmpTimeout));
    // The launcher's device id; under libvirt a user alias ("ua-").
    const std::string id = std::string(a.vm->hypervisor() == VmHypervisor::kLibvirt ? "ua-" : "") + "vmr-disk" +
                           std::to_string(i);
    if (!blocks.is_array()) return Status::Corruption("query-block: not an array");
    for (const auto& b : blocks) {
      if (!b.is_object() || !b.contains("qdev") || !b["qdev"].is_string()) continue;
      const std::string qdev = b["qdev"].get<std::string>();
      if (qdev != id && qdev.find("/" + id + "/") == std::string::npos) continue;
      if (b.contains("inserted") && b["inserted"].contains("node-name") && b["inserted"]["node-name"].is_string()) {
        return b["inserted"]["node-name"].get<std::string>();
      }
    }
    return Status::NotFound("query-block: no disk " + id);
  };
  auto job_of = [&](const std::string& id) -> Result<std::optional<json>> {
    VMR_ASSIGN_OR_RETURN(json jobs, qmp->Execute("query-block-jobs", nullptr, kMergeQmpTimeout));
    if (!jobs.is_array()) return Status::Corruption("query-block-jobs: not an array");
    for (const auto& j : jobs) {
      if (j.is_object() && j.contains("device") && j["device"] == id) return std::optional<json>(j);
    }
    return std::optional<json>();
  };
  for (size_t i = 0; i < disks.size(); ++i) {
    const std::string node = disks[i].name;  // the launcher's overlay node
    const std::string target = "vmr-commit-" + node;
    VMR_ASSIGN_OR_RETURN(std::string now, inserted_node(i));
    if (now == target) {  // merged before a restart
      if (std::find(a.rec.merged_disks.begin(), a.rec.merged_disks.end(), node) == a.rec.merged_disks.end()) {
        a.rec.merged_disks.push_back(node);
        VMR_RETURN_IF_ERROR(WriteFileAtomic(RecordPath(a.rec.vm_id, false), a.rec.Encode(), 0600));
      }
      continue;
    }
    VMR_ASSIGN_OR_RETURN(auto existing, job_of(target));
    if (!existing) {
      VMR_ASSIGN_OR_RETURN(json nodes, qmp->Execute("query-named-block-nodes", json{{"flat", true}}, kMergeQmpTimeout));
      bool have_target = false;
      for (const auto& n : nodes) have_target = have_target || (n.contains("node-name") && n["node-name"] == target);
      if (!have_target) {
        // The target is the disk's wrapper: the store's file as the data,
        // the tracking bitmap recording every block the mirror copies and
        // every later guest write (docs/failover.md section 10.3 step 2).
        VMR_ASSIGN_OR_RETURN(std::string wrapper, EnsureWrapper(a.rec.vm_id, *a.store, static_cast<uint32_t>(i)));
        VMR_RETURN_IF_ERROR(
            qmp->Execute("blockdev-add",
                         json{{"driver", "qcow2"},
                              {"node-name", target},
                              {"file", {{"driver", "file"}, {"filename", wrapper}}}},
                         kMergeQmpTimeout)
                .status()
                .WithContext("blockdev-add of " + target));
      }
      // sync "top": only what the overlay holds travels; the rest of the
      // target already is the point's content (the rollback made it so).
      VMR_RETURN_IF_ERROR(
          qmp->Execute("blockdev-mirror",
                       json{{"job-id", target}, {"device", now}, {"target", target}, {"sync", "top"}},
                       kMergeQmpTimeout)
              .status()
              .WithContext("blockdev-mirror of " + node + " (node " + now + ")"));
    }
    // Ready, then pivot.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::hours(6);
    for (;;) {
      VMR_ASSIGN_OR_RETURN(auto j, job_of(target));
      if (!j) return Status::Internal("the mirror job " + target + " vanished before it was ready");
      if ((*j).contains("ready") && (*j)["ready"] == true) break;
      if (std::chrono::steady_clock::now() > deadline) return Status::Timeout("mirror " + target + " not ready");
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    VMR_RETURN_IF_ERROR(qmp->Execute("block-job-complete", json{{"device", target}}, kMergeQmpTimeout).status());
    for (;;) {
      VMR_ASSIGN_OR_RETURN(auto j, job_of(target));
      if (!j) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    VMR_ASSIGN_OR_RETURN(now, inserted_node(i));
    if (now != target) {
      return Status::Internal("disk " + node + " did not pivot to the replica disk (it reads " + now + ")");
    }
    // From now on the VM writes this disk's file directly: its overlay is
    // stale and must never be merged again (a later offline merge skips it).
    a.rec.merged_disks.push_back(node);
    VMR_RETURN_IF_ERROR(WriteFileAtomic(RecordPath(a.rec.vm_id, false), a.rec.Encode(), 0600));
    job.SetProgress(40 + static_cast<uint32_t>(40 * (i + 1) / disks.size()));
  }
  return Status::Ok();
}

// ---------------------------------------------------------------- seeds

namespace {

// The size of a seed copy: a regular file's length or a block device's
// size. `field` names the parameter in errors.
Result<uint64_t> SeedSize(const std::string& path, const std::string& field) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return Status::NotFound(field + ": no such file '" + path + "'");
    return Status::InvalidArgument(field + ": cannot open '" + path + "': " + std::strerror(err));
  }
  struct stat st;
  uint64_t size = 0;
  Status s;
  if (::fstat(fd, &st) != 0) {
    s = Status::IOError(field + ": fstat '" + path + "': " + std::strerror(errno));
  } else if (S_ISREG(st.st_mode)) {
    size = static_cast<uint64_t>(st.st_size);
  } else if (S_ISBLK(st.st_mode)) {
    if (::ioctl(fd, BLKGETSIZE64, &size) != 0) {
      s = Status::IOError(field + ": size of block device '" + path + "': " + std::strerror(errno));
    }
  } else {
    s = Status::InvalidArgument(field + ": '" + path + "' is neither a regular file nor a block device");
  }
  ::close(fd);
  if (!s.ok()) return s;
  return size;
}

// Copies one seed into a replica disk file (CopyFileSparse); adds to `sum`.
Status CopySeed(const std::string& from, const std::string& to, uint64_t size, SparseCopyStats* sum,
                const std::function<void(uint64_t)>& progress, const std::function<bool()>& cancelled) {
  const int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) return Status::IOError("open '" + from + "': " + std::strerror(errno));
  const int out = ::open(to.c_str(), O_WRONLY | O_CLOEXEC);
  if (out < 0) {
    Status s = Status::IOError("open '" + to + "': " + std::strerror(errno));
    ::close(in);
    return s;
  }
  SparseCopyStats one;
  Status s = CopyFileSparse(in, out, size, &one, [&](uint64_t done, uint64_t) { progress(done); }, cancelled);
  ::close(in);
  ::close(out);
  if (!s.ok()) return s.WithContext("copying '" + from + "' into '" + to + "'");
  sum->data_bytes += one.data_bytes;
  sum->hole_bytes += one.hole_bytes;
  sum->kernel_bytes += one.kernel_bytes;
  return Status::Ok();
}

}  // namespace

Result<JobRecord> FailoverManager::MarkAsReplica(const std::string& vm_name, const std::vector<std::string>& seeds,
                                                bool move) {
  VMR_ASSIGN_OR_RETURN(VmRecord vm, ResolveReplicaVm(vm_name));
  if (vm.mode != ReplicationMode::kReplica) {
    return Status::FailedPrecondition("VM " + vm.name + " is not a replica on this host (mode " +
                                      std::string(Name(vm.mode)) + ")");
  }
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm.id, 0));
  if (!rel) return Status::FailedPrecondition("VM " + vm.name + " has no replication relationship");
  VMR_RETURN_IF_ERROR(CheckTransition(TableMode::kReplica, rel->state, Operation::kRequestMarkAsReplica).status());
  // Parse "disk=path" and check every disk is named once.
  VMR_ASSIGN_OR_RETURN(ReplicaStore * store, replicas_->AcquireLocal(vm.id));
  struct Seed {
    uint32_t disk;
    std::string path;
    uint64_t size;
  };
  auto check = [&]() -> Result<std::vector<Seed>> {
    if (store->latest_sequence() != 0) {
      return Status::FailedPrecondition("VM " + vm.name + ": the replica already holds replicated data (point " +
                                        std::to_string(store->latest_sequence()) + ")");
    }
    if (store->load_state()) {
      return Status::FailedPrecondition("VM " + vm.name + ": an initial replica is being loaded into it");
    }
    if (auto reserved = replicas_->ImportReservation(vm.id); !reserved.ok() || reserved->has_value()) {
      return Status::FailedPrecondition("VM " + vm.name +
                                        ": the replica waits for the import of an exported initial replica");
    }
    std::vector<Seed> out;
    for (size_t i = 0; i < seeds.size(); ++i) {
      const std::string f = "seed_disks[" + std::to_string(i) + "]";
      const size_t eq = seeds[i].find('=');
      if (eq == std::string::npos || eq == 0) return Status::InvalidArgument(f + ": not disk=path");
      const std::string name = seeds[i].substr(0, eq), path = seeds[i].substr(eq + 1);
      if (path.empty() || path[0] != '/' ||
          std::any_of(path.begin(), path.end(), [](unsigned char c) { return c < 0x20 || c == 0x7f; })) {
        return Status::InvalidArgument(f + ": '" + path + "' is not an absolute path");
      }
      const auto& disks = store->disks();
      auto it = std::find_if(disks.begin(), disks.end(), [&](const ReplicaDisk& d) { return d.name == name; });
      if (it == disks.end()) return Status::InvalidArgument(f + ": the replica has no disk '" + name + "'");
      const uint32_t d = static_cast<uint32_t>(it - disks.begin());
      if (std::any_of(out.begin(), out.end(), [&](const Seed& s) { return s.disk == d; })) {
        return Status::InvalidArgument(f + ": disk '" + name + "' is named twice");
      }
      // Read as raw bytes (a regular file or a block device): a format
      // guessed from its content could name a backing or data file
      // elsewhere on this host.
      VMR_ASSIGN_OR_RETURN(const uint64_t size, SeedSize(path, f));
      if (size != it->size) {
        return Status::InvalidArgument(f + ": the copy '" + path + "' is " + std::to_string(size) +
                                       " bytes, replica disk '" + name + "' " + std::to_string(it->size) + " bytes");
      }
      if (move) {
        // What AdoptSeedFile checks again under the store's lock, told now.
        struct stat st {}, dst {};
        const std::string disks_dir = std::filesystem::path(store->DiskPath(d)).parent_path().string();
        if (::lstat(path.c_str(), &st) != 0 || ::stat(disks_dir.c_str(), &dst) != 0) {
          return Status::InvalidArgument(f + ": cannot stat '" + path + "': " + std::strerror(errno));
        }
        if (!S_ISREG(st.st_mode)) return Status::InvalidArgument(f + ": '" + path + "' is not a regular file (move)");
        if (st.st_nlink != 1) {
          return Status::InvalidArgument(f + ": '" + path + "' has other hard links (move)");
        }
        if (st.st_dev != dst.st_dev) {
          return Status::InvalidArgument(f + ": '" + path +
                                         "' is on another file system than the replica store; copy it instead "
                                         "(without move)");
        }
      }
      out.push_back(Seed{d, path, size});
    }
    if (out.size() != store->disks().size()) {
      return Status::InvalidArgument("seed_disks: every replica disk needs a copy (" +
                                     std::to_string(store->disks().size()) + " disks, " +
                                     std::to_string(out.size()) + " given)");
    }
    return out;
  };
  auto checked = check();
  Status seeding = checked.ok() ? replicas_->SetSeeding(vm.id, true) : checked.status();
  if (!seeding.ok()) {
    replicas_->ReleaseLocal(vm.id);
    return seeding;
  }
  auto job = jobs_->Start(
      JobType::kStateChange, vm.id,
      json{{"vm", vm.id}, {"requested_state", 2}, {"seeds", seeds}, {"move", move}}.dump(), false, false,
      [this, id = vm.id, store, move, list = std::move(*checked)](JobContext& ctx) -> Status {
        // Copied in place (the store keeps its open disk files), sparse:
        // a reflink or an in-kernel copy where the file system allows it.
        // Not fsynced here: the first point's apply fsyncs every disk before
        // it commits (docs/replica_store.md), and until then the seeded
        // replication compares whatever the disks hold.
        const auto began = std::chrono::steady_clock::now();
        uint64_t total = 0, done_before = 0;
        for (const Seed& seed : list) total += seed.size;
        Status st;
        SparseCopyStats sum;
        for (size_t i = 0; move && i < list.size() && st.ok(); ++i) {
          st = store->AdoptSeedFile(list[i].disk, list[i].path);
          if (!st.ok()) st = st.WithContext("moving '" + list[i].path + "' into the replica store");
          ctx.SetProgress(static_cast<uint32_t>(99 * (i + 1) / list.size()));
        }
        for (size_t i = 0; !move && i < list.size() && st.ok(); ++i) {
          st = CopySeed(list[i].path, store->DiskPath(list[i].disk), list[i].size, &sum, [&](uint64_t done) {
            if (total > 0) ctx.SetProgress(static_cast<uint32_t>(99 * (done_before + done) / total));
          }, [&ctx] { return ctx.CancelRequested(); });
          done_before += list[i].size;
        }
        if (st.ok()) {
          ctx.SetResult(json{{"moved", move},
                             {"data_bytes", sum.data_bytes},
                             {"hole_bytes", sum.hole_bytes},
                             {"kernel_copied_bytes", sum.kernel_bytes},
                             {"duration_ms", std::chrono::duration_cast<std::chrono::milliseconds>(
                                                 std::chrono::steady_clock::now() - began)
                                                 .count()}}
                            .dump());
        }
        replicas_->SetSeeding(id, false).IgnoreError();
        replicas_->ReleaseLocal(id);
        if (st.ok() && move) {
          spdlog::info("replica {}: {} copy(ies) moved into the store as its disks; ready for a seeded initial "
                       "replication",
                       id, list.size());
        } else if (st.ok()) {
          spdlog::info("replica {}: seeded from {} copy(ies) ({} bytes of data, {} of them by the kernel; {} bytes of "
                       "holes); ready for a seeded initial replication",
                       id, list.size(), sum.data_bytes, sum.kernel_bytes, sum.hole_bytes);
        }
        return st;
      });
  if (!job.ok()) {
    replicas_->SetSeeding(vm.id, false).IgnoreError();
    replicas_->ReleaseLocal(vm.id);
  }
  return job;
}

// ---------------------------------------------------------------- test failover

Result<JobRecord> FailoverManager::TestReplicaSystem(const TestFailoverParams& p) {
  VMR_ASSIGN_OR_RETURN(VmRecord vm, CheckReplicaMethod(p.vm, Operation::kTestReplicaSystem, p.point_id));
  const std::string key = vm.id + ".test";
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!started_) return Status::Unavailable("the failover service is not running");
    if (busy_.count(key) != 0 || active_.count(key) != 0) {
      return Status::Busy("VM " + vm.name + " already has a test VM; remove it with DestroySystem first");
    }
    busy_.insert(key);
  }
  auto release = [&] {
    std::lock_guard<std::mutex> l(mu_);
    busy_.erase(key);
  };
  auto test_id = jobs_internal::NewUuidV4();
  if (!test_id.ok()) {
    release();
    return test_id.status();
  }
  json params = {{"vm", vm.id}, {"point", p.point_id}, {"test_vm_id", *test_id}};
  auto job = jobs_->Start(JobType::kTestReplica, vm.id, params.dump(), false, false,
                          [this, id = vm.id, p, key, tid = *test_id](JobContext& ctx) -> Status {
                            Status s = DoTest(ctx, id, p, tid);
                            std::lock_guard<std::mutex> l(mu_);
                            busy_.erase(key);
                            return s;
                          });
  if (!job.ok()) release();
  return job;
}

Status FailoverManager::DoTest(JobContext& job, const std::string& vm_id, const TestFailoverParams& p,
                               const std::string& test_id) {
  VMR_ASSIGN_OR_RETURN(auto vm, catalog_->GetVm(vm_id));
  if (!vm) return Status::NotFound("VM " + vm_id + " was removed");
  auto a = std::make_shared<Active>();
  a->rec.kind = "test";
  a->rec.vm_id = vm_id;
  a->rec.phase = "test";
  a->rec.test_vm_id = test_id;
  a->rec.run_dir = RunDir(vm_id, true);
  const std::string record_path = RecordPath(vm_id, true);
  auto fail = [&](Status why) -> Status {
    Status t = TearDown(*a);
    if (!t.ok()) {
      spdlog::error("TestReplicaSystem of VM {}: cleaning up: {}", vm_id, t.ToString());
      return why.WithContext("test failover failed, and cleaning up failed too (" + t.message() + ")");
    }
    catalog_->DeleteVm(test_id).IgnoreError();
    ::unlink(record_path.c_str());
    return why;
  };
  auto store = replicas_->AcquireLocal(vm_id);
  if (!store.ok()) return store.status();
  a->store = *store;
  auto chosen = ChoosePoint(catalog_, *a->store, vm_id, p.point_id);
  if (!chosen.ok()) return fail(chosen.status());
  a->rec.sequence = chosen->sequence;
  a->rec.point_id = chosen->id;
  auto def = DefinitionForStore(*vm, *a->store);
  if (!def.ok()) return fail(def.status());

  // The test VM's catalog row: mode TestReplica, its own id and name.
  VmRecord tv;
  tv.id = test_id;
  tv.name = vm->name + " - Test";
  tv.mode = ReplicationMode::kTestReplica;
  VmDefinition tdef = *def;
  tdef.name = tv.name.size() <= 128 ? tv.name : tv.name.substr(0, 128);
  tdef.uuid = test_id;
  tv.definition_json = tdef.ToJson().dump();
  tv.created_ms = options_.now_ms ? options_.now_ms() : SystemNowMs();
  Status s = catalog_->PutVm(tv);
  if (!s.ok()) return fail(s);

  auto names = exports_.ExportPoint(a->store, chosen->sequence);
  if (!names.ok()) return fail(names.status().WithContext("exporting point " + std::to_string(chosen->sequence)));
  a->rec.exports = *names;
  s = MakeDirs(a->rec.run_dir, 0700);
  if (s.ok()) s = WriteFileAtomic(record_path, a->rec.Encode(), 0600);
  if (!s.ok()) return fail(s);
  job.SetProgress(30);
  if (p.start_vm) {
    VmLaunchSpec spec =
        LaunchSpec(*def, *a, p.network == TestNetwork::kNone ? VmNetworkMode::kNone : VmNetworkMode::kIsolated);
    spec.name_override = tdef.name;
    spec.uuid_override = test_id;
    if (p.apply_network_settings) {
      s = AttachSeed(&spec, *vm, "vmreplica-test-" + test_id);
      if (!s.ok()) return fail(s);
    }
    auto launched = VmLauncher::Start(spec);
    if (!launched.ok()) return fail(launched.status().WithContext("starting the test VM"));
    a->vm = std::move(*launched);
    a->rec.started = true;
    s = WriteFileAtomic(record_path, a->rec.Encode(), 0600);
    if (!s.ok()) return fail(s);
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    active_[vm_id + ".test"] = a;
  }
  job.SetResult(json{{"vm_id", vm_id},
                     {"test_vm_id", test_id},
                     {"test_vm_name", tv.name},
                     {"recovery_point_id", chosen->id},
                     {"sequence", chosen->sequence},
                     {"exports", a->rec.exports},
                     {"started", a->rec.started}}
                    .dump());
  spdlog::info("test VM '{}' ({}) of VM {} from point {} (sequence {})", tv.name, test_id, vm->name, chosen->id,
               chosen->sequence);
  return Status::Ok();
}

Result<JobRecord> FailoverManager::DestroySystem(const std::string& vm_name) {
  VMR_ASSIGN_OR_RETURN(VmRecord vm, ResolveReplicaVm(vm_name));
  std::string replica_id;
  if (vm.mode == ReplicationMode::kTestReplica) {
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& [key, a] : active_) {
      if (a->rec.kind == "test" && a->rec.test_vm_id == vm.id) replica_id = a->rec.vm_id;
    }
    if (replica_id.empty()) {
      return Status::NotFound("test VM " + vm.name + " is not known to the failover service");
    }
  } else if (vm.mode == ReplicationMode::kReplica || vm.mode == ReplicationMode::kExtendedReplica) {
    replica_id = vm.id;
  } else {
    return Status::FailedPrecondition("VM " + vm.name + " is neither a test VM nor a replica (mode " +
                                      std::string(Name(vm.mode)) + ")");
  }
  const std::string key = replica_id + ".test";
  {
    std::lock_guard<std::mutex> l(mu_);
    if (active_.count(key) == 0) {
      return Status::FailedPrecondition("VM " + vm.name + " has no test VM");
    }
    if (busy_.count(key) != 0) return Status::Busy("VM " + vm.name + ": a test VM job is running");
    busy_.insert(key);
  }
  auto job = jobs_->Start(JobType::kRemoveTestReplica, replica_id, json{{"vm", replica_id}}.dump(), false, false,
                          [this, replica_id, key](JobContext& ctx) -> Status {
                            Status s = DoDestroy(ctx, replica_id);
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

Status FailoverManager::DoDestroy(JobContext& job, const std::string& vm_id) {
  const std::string key = vm_id + ".test";
  std::shared_ptr<Active> a;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = active_.find(key);
    if (it == active_.end()) return Status::FailedPrecondition("VM " + vm_id + " has no test VM");
    a = it->second;
  }
  VMR_RETURN_IF_ERROR(TearDown(*a).WithContext("DestroySystem"));
  job.SetProgress(60);
  VMR_RETURN_IF_ERROR(catalog_->DeleteVm(a->rec.test_vm_id));
  const std::string path = RecordPath(vm_id, true);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Errno("unlink", path);
  FsyncParentDir(path).IgnoreError();
  {
    std::lock_guard<std::mutex> l(mu_);
    active_.erase(key);
  }
  spdlog::info("test VM {} of VM {} destroyed", a->rec.test_vm_id, vm_id);
  return Status::Ok();
}

Result<FailoverManager::Running> FailoverManager::Describe(const std::string& vm_id, bool test) {
  std::shared_ptr<Active> a;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = active_.find(vm_id + (test ? ".test" : ""));
    if (it == active_.end()) return Status::NotFound("VM " + vm_id + (test ? " has no test VM" : " is not failed over"));
    a = it->second;
  }
  Running r;
  r.kind = a->rec.kind;
  r.vm_id = a->rec.vm_id;
  r.test_vm_id = a->rec.test_vm_id;
  r.sequence = a->rec.sequence;
  r.run_dir = a->rec.run_dir;
  r.exports = a->rec.exports;
  std::lock_guard<std::mutex> vl(a->vm_mu);
  r.vm_running = a->vm && a->vm->IsRunning();
  return r;
}

// ---------------------------------------------------------------- reverse

namespace {

// "host:port" or "[v6]:port" -> (host, port); nullopt when it is not one.
std::optional<std::pair<std::string, uint16_t>> SplitHostPort(const std::string& hp) {
  const size_t colon = hp.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 >= hp.size() || hp.size() - colon - 1 > 5) {
    return std::nullopt;
  }
  std::string host = hp.substr(0, colon);
  if (host.front() == '[') {
    if (host.size() < 3 || host.back() != ']') return std::nullopt;
    host = host.substr(1, host.size() - 2);
  }
  uint32_t port = 0;
  for (size_t i = colon + 1; i < hp.size(); ++i) {
    if (!std::isdigit(static_cast<unsigned char>(hp[i]))) return std::nullopt;
    port = port * 10 + static_cast<uint32_t>(hp[i] - '0');
  }
  if (port == 0 || port > 65535) return std::nullopt;
  return std::make_pair(host, static_cast<uint16_t>(port));
}

bool SameHost(std::string a, std::string b) {
  auto lower = [](std::string& t) {
    std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return std::tolower(c); });
  };
  lower(a);
  lower(b);
  return a == b;
}

}  // namespace

void FailoverManager::DropStaleReversedLocked(const std::string& vm_id) {
  auto it = active_.find(vm_id);
  if (it == active_.end() || it->second->rec.phase != "reversed") return;
  auto vm = catalog_->GetVm(vm_id);
  if (vm.ok() && *vm && (*vm)->mode == ReplicationMode::kPrimary) return;
  // A later reverse made this host the replica again and adopted the
  // wrappers' files: the entry is the past.
  spdlog::info("failover: VM {}: its reversed entry is dropped (this host is no longer its primary)", vm_id);
  {
    std::lock_guard<std::mutex> vl(it->second->vm_mu);
    auto& a = *it->second;
    if (!a.vm) {
      auto adopted = VmLauncher::Adopt(a.rec.run_dir);
      if (adopted.ok()) a.vm = std::move(*adopted);
    }
    // Its run directory must not block the next failover VM of this host.
    if (a.vm && !a.vm->IsRunning()) {
      Status d = a.vm->DropOverlays();
      if (!d.ok()) spdlog::warn("failover: VM {}: clearing {}: {}", vm_id, a.rec.run_dir, d.ToString());
      a.vm.reset();
    }
  }
  active_.erase(it);
}

Result<RelationshipSettings> FailoverManager::ReverseTarget(const VmRecord& vm, const RelationshipRecord& rel,
                                                            const RelationshipSettings& requested,
                                                            bool* other_server) {
  // The target: the old primary by default (api.md "Decisions").
  auto old_primary = SplitHostPort(rel.settings.primary_connection_point);
  RelationshipSettings settings = requested;
  if (settings.recovery_connection_point.empty() && settings.recovery_server_port == 0) {
    if (!old_primary) {
      return Status::InvalidArgument(
          "RecoveryConnectionPoint: the old primary's address is unknown (PrimaryConnectionPoint \"" +
          rel.settings.primary_connection_point + "\"); name the server");
    }
    settings.recovery_connection_point = old_primary->first;
    settings.recovery_server_port = old_primary->second;
  }
  settings.recovery_host_system.clear();
  settings.primary_connection_point.clear();
  settings.primary_host_system.clear();
  VMR_RETURN_IF_ERROR(ValidateRelationshipSettings(settings, /*extended=*/false));
  const bool other = !old_primary || !SameHost(settings.recovery_connection_point, old_primary->first) ||
                     settings.recovery_server_port != old_primary->second;
  if (other && (other_server == nullptr || !options_.create_relationship)) {
    return Status::NotSupported("failing back to a server other than the old primary (" +
                                rel.settings.primary_connection_point + ") is not supported");
  }
  if (other_server != nullptr) *other_server = other;
  VMR_ASSIGN_OR_RETURN(auto disks, catalog_->ListDisks(vm.id));
  for (const auto& name : settings.included_disks) {
    if (std::none_of(disks.begin(), disks.end(), [&](const DiskRecord& d) { return d.name == name; })) {
      return Status::InvalidArgument("IncludedDisks: " + name + " is not a disk of the replica");
    }
  }
  if (!settings.included_disks.empty() && settings.included_disks.size() != disks.size()) {
    return Status::InvalidArgument("IncludedDisks: the relationship back replicates every disk of the replica");
  }
  return settings;
}

Result<ReverseSendRecord> FailoverManager::BeginSendRecord(const std::string& vm_id, const std::string& purpose,
                                                           const RelationshipSettings& settings) {
  // The record first (section 15.2): a retry that did not finish keeps its
  // request id, so the old primary answers it again.
  const std::string record_path = ReverseSendRecordPath(options_.state_dir, vm_id);
  ReverseSendRecord record;
  auto existing = ReadReverseRecord(record_path);
  if (existing.ok()) {
    auto decoded = ReverseSendRecord::Decode(*existing, options_.state_dir);
    if (decoded.ok() && decoded->purpose == purpose && decoded->phase != "switched") record = *decoded;
  }
  if (record.request_id.empty()) {
    VMR_ASSIGN_OR_RETURN(record.request_id, jobs_internal::NewUuidV4());
    record.purpose = purpose;
    record.vm_id = vm_id;
    record.phase = "started";
  }
  record.target = (settings.recovery_connection_point.find(':') != std::string::npos
                       ? "[" + settings.recovery_connection_point + "]"
                       : settings.recovery_connection_point) +
                  ":" + std::to_string(settings.recovery_server_port);
  VMR_RETURN_IF_ERROR(MakeDirs(options_.state_dir + "/reverse", 0700));
  VMR_RETURN_IF_ERROR(WriteReverseRecord(record_path, record.Encode()));
  return record;
}

// The checks ReverseReplicationRelationship and InitiateFailback share
// (docs/failover.md section 13): the VM, its table, a failover recorded
// here, no test VM, a peer channel.
Result<std::pair<VmRecord, RelationshipRecord>> FailoverManager::CheckWayBack(const std::string& vm_name,
                                                                             Operation op) {
  VMR_ASSIGN_OR_RETURN(VmRecord vm, ResolveReplicaVm(vm_name));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm.id, 0));
  if (!rel) return Status::FailedPrecondition("VM " + vm.name + " has no replication relationship");
  VMR_ASSIGN_OR_RETURN(TableMode mode, TableModeFor(vm.mode, 0));
  VMR_RETURN_IF_ERROR(CheckTransition(mode, rel->state, op).status());
  if (mode != TableMode::kReplica) {
    return Status::FailedPrecondition("VM " + vm.name + " is not a failed-over replica on this host");
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!started_) return Status::Unavailable("the failover service is not running");
    auto it = active_.find(vm.id);
    if (it == active_.end() || (it->second->rec.phase != "failed-over" && it->second->rec.phase != "committing" &&
                                it->second->rec.phase != "committed")) {
      return Status::FailedPrecondition("no failover of VM " + vm.name + " is recorded on this host");
    }
    if (busy_.count(vm.id + ".test") != 0 || active_.count(vm.id + ".test") != 0) {
      return Status::Busy("VM " + vm.name + " has a test VM; remove it first (DestroySystem)");
    }
    if (busy_.count(vm.id) != 0) return Status::FailedPrecondition("VM " + vm.name + ": a failover job is running");
  }
  if (!options_.open_channel) {
    return Status::NotSupported("replicating back needs the daemon's peer channel (not configured)");
  }
  return std::make_pair(vm, *rel);
}

Result<JobRecord> FailoverManager::ReverseReplicationRelationship(const std::string& vm_name,
                                                                  const RelationshipSettings& requested) {
  VMR_ASSIGN_OR_RETURN(auto found, CheckWayBack(vm_name, Operation::kReverseReplicationRelationship));
  const VmRecord& vm = found.first;
  bool other_server = false;
  VMR_ASSIGN_OR_RETURN(RelationshipSettings settings, ReverseTarget(vm, found.second, requested, &other_server));
  // To the old primary: the send record first (section 15.2). To another
  // server there is no common copy: nothing to record, a full copy follows.
  ReverseSendRecord record;
  if (!other_server) {
    VMR_ASSIGN_OR_RETURN(record, BeginSendRecord(vm.id, "reverse", settings));
  } else {
    record.target = settings.recovery_connection_point + ":" + std::to_string(settings.recovery_server_port);
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    if (busy_.count(vm.id) != 0) return Status::FailedPrecondition("VM " + vm.name + ": a failover job is running");
    busy_.insert(vm.id);
  }
  auto job = jobs_->Start(JobType::kReverseReplication, vm.id,
                          json{{"vm", vm.id}, {"target", record.target}, {"request_id", record.request_id},
                               {"old_primary", !other_server}}
                              .dump(),
                          false, false, [this, id = vm.id, settings, other_server](JobContext& ctx) -> Status {
                            Status s = other_server ? DoReverseToNewServer(ctx, id, settings)
                                                    : DoReverse(ctx, id, settings);
                            std::lock_guard<std::mutex> l(mu_);
                            busy_.erase(id);
                            return s;
                          });
  if (!job.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    busy_.erase(vm.id);
  }
  return job;
}

Result<PrepareReverseAnswer> FailoverManager::AskOldPrimary(ReverseSendRecord& record, const VmRecord& vm,
                                                            const std::vector<ReplicaDisk>& disks,
                                                            const RelationshipSettings& settings, uint32_t purpose) {
  auto target = SplitHostPort(record.target);
  if (!target) return Status::Internal("reverse record: target " + record.target);
  VMR_ASSIGN_OR_RETURN(auto channel, options_.open_channel(target->first, target->second));
  ReplicaClient client(channel);
  PrepareReverseParams p;
  p.vm_id = vm.id;
  p.request_id = record.request_id;
  p.purpose = purpose;
  p.vm_name = vm.name;
  p.disks = disks;
  p.settings = settings;
  p.primary_address = options_.advertised_address ? options_.advertised_address() : "";
  const auto deadline = std::chrono::steady_clock::now() + options_.reverse_prepare_timeout;
  PrepareReverseAnswer answer;
  for (int attempt = 1;; ++attempt) {
    auto got = client.PrepareReverse(p);
    if (got.ok() && got->done) {
      answer = *got;
      break;
    }
    if (!got.ok() && got.status().code() != Code::kUnavailable && got.status().code() != Code::kTimeout) {
      return got.status().WithContext("the old primary " + record.target + " refused PrepareReverse");
    }
    if (std::chrono::steady_clock::now() > deadline) {
      return Status::Timeout("the old primary " + record.target + " did not finish adopting its disks in time" +
                             (got.ok() ? std::string() : " (" + got.status().message() + ")"));
    }
    if (attempt == 1 || attempt % 30 == 0) {
      spdlog::info("VM {}: waiting for the old primary {} to adopt its disks ({})", vm.name, record.target,
                   got.ok() ? "job " + got->job_id : got.status().ToString());
    }
    std::this_thread::sleep_for(std::chrono::seconds(2));
  }
  record.claim = answer.claim;
  record.phase = "peer";
  VMR_RETURN_IF_ERROR(WriteReverseRecord(ReverseSendRecordPath(options_.state_dir, vm.id), record.Encode()));
  return answer;
}

Status FailoverManager::CommitBeforeReverse(JobContext& job, const VmRecord& vm) {
  VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm.id, 0));
  if (!rel) return Status::NotFound("VM " + vm.id + " has no replication relationship");
  if (rel->state != ReplicationState::kRecovered) return Status::Ok();
  spdlog::info("VM {}: reverse replication: committing the failover first", vm.name);
  return DoCommit(job, vm.id).WithContext("committing the failover before the reverse");
}

Status FailoverManager::DoReverse(JobContext& job, const std::string& vm_id, const RelationshipSettings& settings) {
  const std::string record_path = ReverseSendRecordPath(options_.state_dir, vm_id);
  VMR_ASSIGN_OR_RETURN(auto raw, ReadReverseRecord(record_path));
  VMR_ASSIGN_OR_RETURN(ReverseSendRecord record, ReverseSendRecord::Decode(raw, options_.state_dir));
  VMR_ASSIGN_OR_RETURN(auto vm, catalog_->GetVm(vm_id));
  if (!vm) return Status::NotFound("VM " + vm_id + " is no longer in the catalog");
  // 1. A failover in 5 is committed first (its own record makes it resume).
  VMR_RETURN_IF_ERROR(CommitBeforeReverse(job, *vm));
  job.SetProgress(30);
  VMR_ASSIGN_OR_RETURN(std::shared_ptr<Active> a, CommittedEntry(vm_id, vm->name));
  // 2. The old primary adopts its disks as our replica (section 14.1).
  VMR_ASSIGN_OR_RETURN(PrepareReverseAnswer answer,
                       AskOldPrimary(record, *vm, a->store->disks(), settings, /*purpose=*/1));
  job.SetProgress(70);
  // 3. This host becomes the primary.
  VMR_RETURN_IF_ERROR(SwitchToPrimary(vm_id, settings));
  record.phase = "switched";
  VMR_RETURN_IF_ERROR(WriteReverseRecord(record_path, record.Encode()));
  job.SetResult(json{{"vm_id", vm_id},
                     {"target", record.target},
                     {"a_common_sequence", answer.claim.common_sequence},
                     {"a_tracking", answer.claim.tracking_intact ? 1 : 2},
                     {"a_candidate_bytes", answer.claim.candidate_bytes},
                     {"a_local_copy_bytes", answer.claim.local_copy_bytes},
                     {"a_generation", GenerationHex(answer.claim.generation)}}
                    .dump());
  spdlog::info("VM {}: reversed: this host is its primary now, {} its replica (common point {}, {} candidate bytes "
               "there, {} bytes copied locally there); StartReplication sends what differs",
               vm->name, record.target, answer.claim.common_sequence, answer.claim.candidate_bytes,
               answer.claim.local_copy_bytes);
  return Status::Ok();
}

Status FailoverManager::DoReverseToNewServer(JobContext& job, const std::string& vm_id,
                                            const RelationshipSettings& settings) {
  VMR_ASSIGN_OR_RETURN(auto vm, catalog_->GetVm(vm_id));
  if (!vm) return Status::NotFound("VM " + vm_id + " is no longer in the catalog");
  VMR_RETURN_IF_ERROR(CommitBeforeReverse(job, *vm));
  job.SetProgress(50);
  VMR_RETURN_IF_ERROR(SwitchToNewRelationship(vm_id, settings));
  job.SetResult(json{{"vm_id", vm_id},
                     {"target", settings.recovery_connection_point + ":" +
                                    std::to_string(settings.recovery_server_port)},
                     {"old_primary", false}}
                    .dump());
  spdlog::info("VM {}: reversed to {} (not the old primary: StartReplication makes a full initial copy)", vm->name,
               settings.recovery_connection_point);
  return Status::Ok();
}

Result<std::shared_ptr<FailoverManager::Active>> FailoverManager::CommittedEntry(const std::string& vm_id,
                                                                                const std::string& vm_name) {
  std::shared_ptr<Active> a;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = active_.find(vm_id);
    if (it != active_.end()) a = it->second;
  }
  if (!a || a->rec.phase != "committed" || a->store == nullptr) {
    return Status::FailedPrecondition("VM " + vm_name + ": no committed failover is recorded on this host");
  }
  if (a->rec.wrappers.size() != a->store->disks().size()) {
    return Status::FailedPrecondition("VM " + vm_name +
                                      " was committed by an older vmreplica build: it has no disk wrappers");
  }
  return a;
}

Result<VmDefinition> FailoverManager::WrapperDefinition(const VmRecord& vm, const Active& a) {
  if (a.store == nullptr) return Status::FailedPrecondition("VM " + vm.name + ": its replica store is not held");
  VMR_ASSIGN_OR_RETURN(VmDefinition def, DefinitionForStore(vm, *a.store));
  // A VM that runs under our launcher, directly on the wrappers: its QMP
  // socket, or the libvirt domain the launcher names after the VM (its
  // stored XML stays the template of the next start).
  // What the VM runs under now when it runs, else what a start would use.
  const bool libvirt = a.vm ? a.vm->hypervisor() == VmHypervisor::kLibvirt : RunsUnderLibvirt(def);
  def.qmp_socket.clear();
  def.nbd_socket.clear();
  def.qga_socket.clear();
  if (libvirt) {
    def.libvirt_domain = def.name;
  } else {
    def.kind = VmSourceKind::kQmp;
    def.qmp_socket = a.rec.run_dir + "/qmp.sock";
    def.libvirt_uri.clear();
    def.libvirt_domain.clear();
    def.libvirt_xml.clear();
  }
  for (size_t i = 0; i < def.disks.size(); ++i) {
    // libvirt names its nodes itself: AttachVm resolves them by device.
    def.disks[i].node_name = libvirt ? "" : "vmr-commit-" + def.disks[i].name;
    def.disks[i].path = a.rec.wrappers.at(i);
    def.disks[i].format = "qcow2";
    def.disks[i].size_bytes = a.store->disks()[i].size;
  }
  VMR_RETURN_IF_ERROR(def.Validate().WithContext("the definition of VM " + vm.name + " on its wrappers"));
  return def;
}

Status FailoverManager::SwitchToPrimary(const std::string& vm_id, const RelationshipSettings& settings) {
  return SwitchVm(vm_id, settings, /*keep_relationship=*/true);
}

Status FailoverManager::SwitchToNewRelationship(const std::string& vm_id, const RelationshipSettings& settings) {
  VMR_RETURN_IF_ERROR(SwitchVm(vm_id, settings, /*keep_relationship=*/false));
  // The replica side on the named server and the primary side here (state 1).
  return options_.create_relationship(vm_id, settings).WithContext("creating the relationship to " +
                                                                  settings.recovery_connection_point);
}

Status FailoverManager::SwitchVm(const std::string& vm_id, const RelationshipSettings& settings,
                                 bool keep_relationship) {
  VMR_ASSIGN_OR_RETURN(auto vm, catalog_->GetVm(vm_id));
  if (!vm) return Status::NotFound("VM " + vm_id + " is no longer in the catalog");
  VMR_ASSIGN_OR_RETURN(std::shared_ptr<Active> a, CommittedEntry(vm_id, vm->name));
  VMR_ASSIGN_OR_RETURN(VmDefinition def, WrapperDefinition(*vm, *a));
  std::vector<DiskRecord> disk_rows;
  for (const auto& disk : def.disks) {
    DiskRecord d;
    d.vm_id = vm_id;
    d.name = disk.name;
    d.size_bytes = disk.size_bytes;
    d.path = disk.path;
    d.node_name = disk.node_name;
    d.included = true;
    disk_rows.push_back(d);
  }
  // The store is closed here: its files are the VM's disks from now on.
  // Retired with our hold counted, so that a refusal (a delta still being
  // received) leaves the entry and its hold as they were for a retry.
  VMR_RETURN_IF_ERROR(replicas_->Retire(vm_id, /*holds_of_caller=*/1).WithContext("closing the replica store"));
  replicas_->ReleaseLocal(vm_id);  // no-op: the retired replica is gone
  a->store = nullptr;
  VMR_ASSIGN_OR_RETURN(auto points, catalog_->ListRecoveryPoints(vm_id));
  const int64_t now = options_.now_ms ? options_.now_ms() : SystemNowMs();
  VMR_RETURN_IF_ERROR(catalog_->RunInTransaction([&]() -> Status {
    VmRecord v = *vm;
    v.mode = keep_relationship ? ReplicationMode::kPrimary : ReplicationMode::kNone;
    v.definition_json = def.ToJson().dump();
    VMR_RETURN_IF_ERROR(catalog_->PutVm(v));
    VMR_RETURN_IF_ERROR(catalog_->PutDisks(vm_id, disk_rows));
    VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, 0));
    if (!rel) return Status::NotFound("VM " + vm_id + " has no replication relationship");
    std::vector<std::string> ids;
    for (const auto& pt : points) ids.push_back(pt.id);
    if (!ids.empty()) VMR_RETURN_IF_ERROR(catalog_->DeleteRecoveryPoints(ids));
    if (!keep_relationship) {
      // The new relationship is created afterwards, with its own replica.
      VMR_RETURN_IF_ERROR(catalog_->DeleteRelationship(vm_id, 0));
      return Status::Ok();
    }
    RelationshipRecord r;
    r.vm_id = vm_id;
    r.index = 0;
    r.local_mode = ReplicationMode::kPrimary;
    r.state = ReplicationState::kReadyForReplication;
    r.health = ReplicationHealth::kNormal;
    r.settings = settings;
    r.sequence = 1;
    r.initial_replication_type = InitialReplicationType::kNetwork;
    VMR_RETURN_IF_ERROR(catalog_->PutRelationship(r));
    return catalog_->ResetStatistics(vm_id, 0, now);
  }));
  a->rec.phase = "reversed";
  VMR_RETURN_IF_ERROR(WriteFileAtomic(RecordPath(vm_id, false), a->rec.Encode(), 0600));
  spdlog::info("VM {}: state {} -> {} as the primary of a reversed relationship to {}", vm->name,
               Name(ReplicationState::kCommitted), Name(ReplicationState::kReadyForReplication),
               settings.recovery_connection_point);
  return Status::Ok();
}

Status FailoverManager::StartReversedVm(const VmRecord& vm) {
  std::shared_ptr<Active> a;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = active_.find(vm.id);
    if (it != active_.end()) a = it->second;
  }
  if (!a || a->rec.phase != "reversed") {
    return Status::FailedPrecondition("VM " + vm.name +
                                      " is a primary that vmreplica does not run: start it as you always do");
  }
  auto j = json::parse(vm.definition_json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::Corruption("VM " + vm.name + ": its stored definition is not JSON");
  VMR_ASSIGN_OR_RETURN(VmDefinition def, VmDefinition::FromJson(j));
  std::lock_guard<std::mutex> vl(a->vm_mu);
  if (a->vm && a->vm->IsRunning()) return Status::FailedPrecondition("VM " + vm.name + " already runs");
  if (a->vm) {
    VMR_RETURN_IF_ERROR(a->vm->DropOverlays().WithContext("clearing the VM's previous run directory"));
    a->vm.reset();
  }
  VMR_RETURN_IF_ERROR(MakeDirs(a->rec.run_dir, 0700));
  VmLaunchSpec spec;
  spec.definition = def;
  spec.run_dir = a->rec.run_dir;
  for (const auto& d : def.disks) {
    VmLaunchDisk ld;
    ld.direct_image = d.path;
    ld.size_bytes = d.size_bytes;
    spec.disks.push_back(ld);
  }
  spec.network = VmNetworkMode::kIsolated;
  spec.accel = options_.accel;
  spec.start_timeout = options_.vm_start_timeout;
  if (!def.boot_kernel.empty()) spec.kernel_boot = VmKernelBoot{def.boot_kernel, def.boot_initrd, def.boot_append};
  // The stored definition of a reversed VM says how it runs (the engine
  // attaches by its kind), whatever [failover] hypervisor says now.
  if (def.kind == VmSourceKind::kLibvirt && !def.libvirt_uri.empty()) {
    spec.hypervisor = VmHypervisor::kLibvirt;
    spec.libvirt_uri = def.libvirt_uri;
  }
  if (!a->rec.instance_id.empty()) VMR_RETURN_IF_ERROR(AttachSeed(&spec, vm, a->rec.instance_id));
  // The engine's cycles of a VM that is off open its wrappers for a moment
  // (the proof that nothing writes them): a start that meets one waits.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  auto launched = VmLauncher::Start(spec);
  while (!launched.ok() && launched.status().message().find("in use by another process") != std::string::npos &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    launched = VmLauncher::Start(spec);
  }
  if (!launched.ok()) return launched.status();
  a->vm = std::move(*launched);
  a->rec.started = true;
  VMR_RETURN_IF_ERROR(WriteFileAtomic(RecordPath(vm.id, false), a->rec.Encode(), 0600));
  spdlog::info("VM {}: started on its disk wrappers (the primary of a reversed relationship)", vm.name);
  return Status::Ok();
}

// ---------------------------------------------------------------- failback

Result<JobRecord> FailoverManager::InitiateFailback(const std::string& vm_name, const RelationshipSettings& requested,
                                                    const std::string& point_id) {
  VMR_ASSIGN_OR_RETURN(auto found, CheckWayBack(vm_name, Operation::kInitiateFailback));
  const VmRecord& vm = found.first;
  const ReplicationState from = found.second.state;
  std::shared_ptr<Active> a;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = active_.find(vm.id);
    if (it == active_.end()) return Status::FailedPrecondition("no failover of VM " + vm.name + " is recorded on this host");
    a = it->second;
  }
  {
    std::lock_guard<std::mutex> vl(a->vm_mu);
    if (a->vm && a->vm->IsRunning()) {
      return Status::FailedPrecondition("VM " + vm.name +
                                        ": stop the failover VM first: a failback sends a frozen image");
    }
  }
  if (from == ReplicationState::kCommitted && !point_id.empty()) {
    return Status::InvalidArgument("RecoveryPointIdentifier: VM " + vm.name +
                                   " is committed: only the committed data exists; leave it empty");
  }
  if (!point_id.empty()) {
    if (a->store == nullptr) return Status::FailedPrecondition("VM " + vm.name + ": its replica store is not held");
    VMR_RETURN_IF_ERROR(ChoosePoint(catalog_, *a->store, vm.id, point_id).status());
  }
  VMR_ASSIGN_OR_RETURN(RelationshipSettings settings, ReverseTarget(vm, found.second, requested));
  VMR_ASSIGN_OR_RETURN(ReverseSendRecord record, BeginSendRecord(vm.id, "failback", settings));
  {
    std::lock_guard<std::mutex> l(mu_);
    if (busy_.count(vm.id) != 0) return Status::FailedPrecondition("VM " + vm.name + ": a failover job is running");
    busy_.insert(vm.id);
  }
  auto release = [&] {
    std::lock_guard<std::mutex> l(mu_);
    busy_.erase(vm.id);
  };
  if (Status st = SetState(vm.id, ReplicationState::kFailbackInProgress); !st.ok()) {
    release();
    return st;
  }
  auto job = jobs_->Start(
      JobType::kFailback, vm.id,
      json{{"vm", vm.id}, {"target", record.target}, {"point_id", point_id}, {"request_id", record.request_id}}.dump(),
      false, false, [this, id = vm.id, settings, point_id, from](JobContext& ctx) -> Status {
        bool committed = from == ReplicationState::kCommitted;
        Status s = DoFailback(ctx, id, settings, point_id, &committed);
        if (!s.ok()) {
          // Before the commit: back where it was; after it: committed (6).
          Status back = SetState(id, committed ? ReplicationState::kCommitted : from);
          if (!back.ok()) spdlog::error("VM {}: restoring the state after a failed failback: {}", id, back.ToString());
        }
        std::lock_guard<std::mutex> l(mu_);
        busy_.erase(id);
        return s;
      });
  if (!job.ok()) {
    Status back = SetState(vm.id, from);
    (void)back;
    release();
  }
  return job;
}

Status FailoverManager::DoFailback(JobContext& job, const std::string& vm_id, const RelationshipSettings& settings,
                                   const std::string& point_id, bool* committed) {
  const std::string record_path = ReverseSendRecordPath(options_.state_dir, vm_id);
  VMR_ASSIGN_OR_RETURN(auto raw, ReadReverseRecord(record_path));
  VMR_ASSIGN_OR_RETURN(ReverseSendRecord record, ReverseSendRecord::Decode(raw, options_.state_dir));
  VMR_ASSIGN_OR_RETURN(auto vm, catalog_->GetVm(vm_id));
  if (!vm) return Status::NotFound("VM " + vm_id + " is no longer in the catalog");
  // 1. The image to send becomes final: the chosen point (the failover VM's
  // writes are not part of it), or the current data (its writes merged).
  if (!*committed) {
    std::shared_ptr<Active> a;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = active_.find(vm_id);
      if (it != active_.end()) a = it->second;
    }
    if (!a || a->store == nullptr) return Status::FailedPrecondition("VM " + vm_id + ": no failover recorded");
    if (!point_id.empty() && a->rec.phase == "failed-over") {
      VMR_ASSIGN_OR_RETURN(ChosenPoint chosen, ChoosePoint(catalog_, *a->store, vm_id, point_id));
      {
        std::lock_guard<std::mutex> vl(a->vm_mu);
        if (a->vm) {
          VMR_RETURN_IF_ERROR(a->vm->DropOverlays().WithContext("dropping the failover VM's overlays"));
          a->vm.reset();
        }
      }
      for (const auto& name : a->rec.exports) {
        Status u = exports_.Unexport(name);
        if (!u.ok() && u.code() != Code::kNotFound) return u;
      }
      a->rec.exports.clear();
      a->rec.sequence = chosen.sequence;
      a->rec.point_id = chosen.id;
      VMR_RETURN_IF_ERROR(WriteFileAtomic(RecordPath(vm_id, false), a->rec.Encode(), 0600));
    }
    VMR_RETURN_IF_ERROR(DoCommit(job, vm_id).WithContext("committing the image to fail back"));
    *committed = true;
    VMR_RETURN_IF_ERROR(SetState(vm_id, ReplicationState::kFailbackInProgress));
  }
  job.SetProgress(30);
  VMR_ASSIGN_OR_RETURN(std::shared_ptr<Active> a, CommittedEntry(vm_id, vm->name));
  // 2. The old primary adopts its own disks as the receiving side.
  VMR_ASSIGN_OR_RETURN(PrepareReverseAnswer answer,
                       AskOldPrimary(record, *vm, a->store->disks(), settings, /*purpose=*/2));
  job.SetProgress(50);
  // 3. Only the blocks that differ travel, as a PlannedFailover log.
  VMR_ASSIGN_OR_RETURN(VmDefinition def, WrapperDefinition(*vm, *a));
  auto target = SplitHostPort(record.target);
  if (!target) return Status::Internal("failback record: target " + record.target);
  VMR_ASSIGN_OR_RETURN(auto channel, options_.open_channel(target->first, target->second));
  ReverseSyncParams p;
  p.vm_id = vm_id;
  p.definition = def;
  for (const auto& d : def.disks) p.disks.push_back(d.name);
  p.run_dir = options_.state_dir + "/run/fb-" + ShortId(vm_id);
  VMR_RETURN_IF_ERROR(MakeDirs(p.run_dir, 0700));
  p.channel = channel;
  p.claim = answer.claim;
  const std::string since_path = options_.state_dir + "/failover/" + vm_id + ".since";
  auto since = ReadRangeListFile(since_path, kRangeListSince, static_cast<uint32_t>(def.disks.size()));
  if (since.ok()) {
    p.since = std::move(*since);
  } else if (since.status().code() != Code::kNotFound) {
    spdlog::warn("VM {}: the since file cannot be used ({}): every block is a candidate", vm->name,
                 since.status().ToString());
  }
  p.kind = ReplicationType::kPlanned;
  p.compress = settings.compression_enabled;
  p.job = &job;
  VMR_ASSIGN_OR_RETURN(auto delivered, ReverseSyncDelivered(channel, vm_id));
  ReverseSyncReport rep;
  if (delivered) {
    spdlog::warn("VM {}: the old primary already holds log {} of this failback; it is finished", vm->name,
                 delivered->sequence);
    rep = *delivered;
  } else {
    VMR_ASSIGN_OR_RETURN(rep, RunReverseSync(p));
  }
  std::error_code ec;
  std::filesystem::remove_all(p.run_dir, ec);
  job.SetProgress(90);
  ReplicaClient client(channel);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(30);
  for (;;) {
    auto st = client.GetReplicaStatus(vm_id, 0);
    if (st.ok() && st->latest_applied >= rep.sequence) break;
    if (std::chrono::steady_clock::now() > deadline) {
      return Status::Timeout("the old primary " + record.target + " did not apply the failback log in time" +
                             (st.ok() ? std::string() : ": " + st.status().ToString()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  // 4. Failback complete (14): this host stays the replica side.
  VMR_RETURN_IF_ERROR(catalog_->RunInTransaction([&]() -> Status {
    VMR_ASSIGN_OR_RETURN(auto rel, catalog_->GetRelationship(vm_id, 0));
    if (!rel) return Status::NotFound("VM " + vm_id + " has no replication relationship");
    rel->state = ReplicationState::kFailbackComplete;
    rel->generation_id = GenerationHex(rep.generation);
    rel->sequence = rep.sequence;
    rel->settings.recovery_connection_point = settings.recovery_connection_point;
    rel->settings.recovery_server_port = settings.recovery_server_port;
    return catalog_->PutRelationship(*rel);
  }));
  a->rec.phase = "failed-back";
  VMR_RETURN_IF_ERROR(WriteFileAtomic(RecordPath(vm_id, false), a->rec.Encode(), 0600));
  for (const std::string& path : {record_path, since_path}) {
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) spdlog::warn("VM {}: removing {}", vm->name, path);
  }
  job.SetResult(json{{"vm_id", vm_id},
                     {"target", record.target},
                     {"a_sequence", rep.sequence},
                     {"candidate_bytes", rep.candidate_bytes},
                     {"data_bytes", rep.data_bytes},
                     {"zero_bytes", rep.zero_bytes},
                     {"wire_bytes", rep.wire_bytes},
                     {"records", rep.records},
                     {"whole_disks", rep.whole_disks},
                     {"a_tracking", answer.claim.tracking_intact ? 1 : 2},
                     {"a_candidate_bytes", answer.claim.candidate_bytes},
                     {"a_local_copy_bytes", answer.claim.local_copy_bytes}}
                    .dump());
  spdlog::info("VM {}: failback complete to {}: {} bytes of data and {} bytes of zeros sent, {} candidate bytes "
               "compared by hash{}",
               vm->name, record.target, rep.data_bytes, rep.zero_bytes, rep.candidate_bytes,
               rep.whole_disks ? " (every block was a candidate)" : "");
  return Status::Ok();
}

}  // namespace vmreplica
