#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <regex>
#include <set>
#include <thread>

#include "vmreplica/fileutil.h"
#include "vmreplica/tracker.h"

namespace vmreplica {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

std::string HashTag(const std::string& s) {
  uint32_t h = 2166136261u;  // FNV-1a, 32 bits: a short, stable tag for node names
  for (unsigned char c : s) {
    h ^= c;
    h *= 16777619u;
  }
  char buf[9];
  std::snprintf(buf, sizeof(buf), "%08x", h);
  return buf;
}

bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

// Runs a program (no shell) and returns IOError with its output on failure.
Status RunTool(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  std::vector<std::string> copy = args;
  for (auto& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) return Status::IOError(std::string("pipe: ") + std::strerror(errno));
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(pipefd[0]);
    ::close(pipefd[1]);
    return Status::IOError(std::string("fork: ") + std::strerror(errno));
  }
  if (pid == 0) {
    ResetSignalsForExec();
    ::dup2(pipefd[1], 1);
    ::dup2(pipefd[1], 2);
    ::execvp(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(pipefd[1]);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(pipefd[0], buf, sizeof(buf))) != 0) {
    if (n < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (out.size() < 8192) out.append(buf, static_cast<size_t>(n));
  }
  ::close(pipefd[0]);
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(st) && WEXITSTATUS(st) == 0) return Status::Ok();
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return Status::IOError(args[0] + " failed: " + out);
}

Status Resync(const std::string& reason) {
  return Status::FailedPrecondition("resynchronization required: " + reason);
}

}  // namespace

ChangeTracker::ChangeTracker(QmpChannel* qmp, std::string relationship_id, std::vector<TrackedDisk> disks,
                             TrackerOptions options)
    : qmp_(qmp),
      relationship_id_(std::move(relationship_id)),
      disks_(std::move(disks)),
      options_(std::move(options)),
      tag_(HashTag(relationship_id_)) {}

std::string ChangeTracker::BitmapName(uint64_t generation) const {
  return "vmr-" + relationship_id_ + "-g" + std::to_string(generation);
}

Status ChangeTracker::ValidateConfig() const {
  static const std::regex rel_re("[A-Za-z0-9_-]{1,64}");
  static const std::regex disk_re("[A-Za-z][A-Za-z0-9_]{0,31}");
  if (!std::regex_match(relationship_id_, rel_re)) {
    return Status::InvalidArgument("relationship id must match [A-Za-z0-9_-]{1,64}: " + relationship_id_);
  }
  if (disks_.empty()) return Status::InvalidArgument("no disks to track");
  if (disks_.size() > 999) return Status::InvalidArgument("too many disks");
  std::set<std::string> names, nodes;
  for (const auto& d : disks_) {
    if (!std::regex_match(d.name, disk_re)) return Status::InvalidArgument("bad disk name: " + d.name);
    if (d.node_name.empty()) return Status::InvalidArgument("disk " + d.name + ": empty node name");
    if (!names.insert(d.name).second) return Status::InvalidArgument("duplicate disk name: " + d.name);
    if (!nodes.insert(d.node_name).second) return Status::InvalidArgument("duplicate node: " + d.node_name);
  }
  uint32_t g = options_.granularity;
  if (g < 512 || g > (64u << 20) || (g & (g - 1)) != 0) {
    return Status::InvalidArgument("granularity must be a power of two in 512..64MiB");
  }
  return Status::Ok();
}

Result<json> ChangeTracker::Qmp(const std::string& cmd, const json& args) {
  return qmp_->Execute(cmd, args, options_.qmp_timeout);
}

Result<std::vector<ChangeTracker::NodeState>> ChangeTracker::QueryDisks() {
  VMR_ASSIGN_OR_RETURN(json nodes, Qmp("query-named-block-nodes", {{"flat", true}}));
  std::vector<NodeState> out(disks_.size());
  const std::regex bm_re("vmr-" + relationship_id_ + "-g([0-9]{1,18})");
  try {
    for (const auto& n : nodes) {
      const std::string node = n.value("node-name", "");
      for (size_t i = 0; i < disks_.size(); ++i) {
        if (disks_[i].node_name != node) continue;
        NodeState& st = out[i];
        st.found = true;
        if (n.contains("image")) st.size_bytes = n["image"].value("virtual-size", uint64_t{0});
        if (!n.contains("dirty-bitmaps")) continue;
        for (const auto& b : n["dirty-bitmaps"]) {
          std::smatch m;
          std::string name = b.value("name", "");
          if (!std::regex_match(name, m, bm_re)) continue;
          BitmapInfo bi;
          bi.name = name;
          bi.generation = std::stoull(m[1].str());
          bi.recording = b.value("recording", false);
          bi.inconsistent = b.value("inconsistent", false);
          bi.busy = b.value("busy", false);
          bi.count = b.value("count", uint64_t{0});
          st.bitmaps.push_back(bi);
        }
        std::sort(st.bitmaps.begin(), st.bitmaps.end(),
                  [](const BitmapInfo& a, const BitmapInfo& b) { return a.generation < b.generation; });
      }
    }
  } catch (const std::exception& e) {
    return Status::Corruption(std::string("unexpected query-named-block-nodes reply: ") + e.what());
  }
  return out;
}

Result<uint64_t> ChangeTracker::PendingBytes() {
  VMR_ASSIGN_OR_RETURN(auto states, QueryDisks());
  uint64_t total = 0;
  for (const auto& st : states) {
    for (const auto& b : st.bitmaps) total += b.count;
  }
  return total;
}

Status ChangeTracker::Enable() {
  VMR_RETURN_IF_ERROR(ValidateConfig());
  if (generation_ != 0) return Status::FailedPrecondition("tracking already enabled");
  VMR_ASSIGN_OR_RETURN(auto states, QueryDisks());
  json actions = json::array();
  for (size_t i = 0; i < disks_.size(); ++i) {
    const auto& d = disks_[i];
    if (!states[i].found) return Status::NotFound("disk " + d.name + ": no block node " + d.node_name);
    if (states[i].size_bytes != d.size_bytes) {
      return Status::InvalidArgument("disk " + d.name + ": size is " + std::to_string(states[i].size_bytes) +
                                     ", expected " + std::to_string(d.size_bytes));
    }
    if (!states[i].bitmaps.empty()) {
      return Status::AlreadyExists("disk " + d.name + " already has bitmap " + states[i].bitmaps.back().name);
    }
    actions.push_back({{"type", "block-dirty-bitmap-add"},
                       {"data",
                        {{"node", d.node_name},
                         {"name", BitmapName(1)},
                         {"granularity", options_.granularity},
                         {"persistent", d.qcow2}}}});
  }
  VMR_RETURN_IF_ERROR(Qmp("transaction", {{"actions", actions}}).status());
  generation_ = 1;
  spdlog::info("tracker {}: enabled, bitmap {} on {} disk(s), granularity {}", relationship_id_,
               BitmapName(1), disks_.size(), options_.granularity);
  return Status::Ok();
}

Status ChangeTracker::CheckTracking() {
  if (generation_ == 0 && reconciled_) {
    return Resync("no bitmap of relationship " + relationship_id_ +
                  " found (QEMU stopped before saving it, or the image was replaced)");
  }
  if (generation_ == 0) return Status::FailedPrecondition("tracking not enabled");
  VMR_ASSIGN_OR_RETURN(auto states, QueryDisks());
  const std::string current = BitmapName(generation_);
  for (size_t i = 0; i < disks_.size(); ++i) {
    const auto& d = disks_[i];
    const auto& st = states[i];
    if (!st.found) return Resync("disk " + d.name + ": block node " + d.node_name + " not found");
    if (st.size_bytes != d.size_bytes) {
      return Resync("disk " + d.name + ": size changed from " + std::to_string(d.size_bytes) + " to " +
                    std::to_string(st.size_bytes));
    }
    for (const auto& b : st.bitmaps) {
      if (b.inconsistent) {
        return Resync("disk " + d.name + ": bitmap " + b.name +
                      " is inconsistent (QEMU stopped without saving it)");
      }
    }
    auto it = std::find_if(st.bitmaps.begin(), st.bitmaps.end(),
                           [&](const BitmapInfo& b) { return b.name == current; });
    if (it == st.bitmaps.end()) return Resync("disk " + d.name + ": bitmap " + current + " is missing");
    if (!it->recording) return Resync("disk " + d.name + ": bitmap " + current + " is not recording");
  }
  return Status::Ok();
}

Status ChangeTracker::RestartTracking() {
  VMR_RETURN_IF_ERROR(ValidateConfig());
  if (cut_open_) return Status::FailedPrecondition("a cut is open");
  VMR_ASSIGN_OR_RETURN(auto states, QueryDisks());
  uint64_t next = generation_;
  json actions = json::array();
  for (size_t i = 0; i < disks_.size(); ++i) {
    if (!states[i].found) return Status::NotFound("disk " + disks_[i].name + ": no block node");
    for (const auto& b : states[i].bitmaps) {
      next = std::max(next, b.generation);
      actions.push_back({{"type", "block-dirty-bitmap-remove"},
                         {"data", {{"node", disks_[i].node_name}, {"name", b.name}}}});
    }
  }
  ++next;
  for (const auto& d : disks_) {
    actions.push_back({{"type", "block-dirty-bitmap-add"},
                       {"data",
                        {{"node", d.node_name},
                         {"name", BitmapName(next)},
                         {"granularity", options_.granularity},
                         {"persistent", d.qcow2}}}});
  }
  VMR_RETURN_IF_ERROR(Qmp("transaction", {{"actions", actions}}).status());
  generation_ = next;
  spdlog::warn("tracker {}: tracking restarted at generation {}", relationship_id_, next);
  return Status::Ok();
}

Status ChangeTracker::Disable() {
  VMR_RETURN_IF_ERROR(ValidateConfig());
  if (cut_open_) return Status::FailedPrecondition("a cut is open");
  VMR_ASSIGN_OR_RETURN(auto states, QueryDisks());
  json actions = json::array();
  for (size_t i = 0; i < disks_.size(); ++i) {
    for (const auto& b : states[i].bitmaps) {
      actions.push_back({{"type", "block-dirty-bitmap-remove"},
                         {"data", {{"node", disks_[i].node_name}, {"name", b.name}}}});
    }
  }
  if (!actions.empty()) VMR_RETURN_IF_ERROR(Qmp("transaction", {{"actions", actions}}).status());
  generation_ = 0;
  spdlog::info("tracker {}: tracking stopped, {} bitmap(s) dropped", relationship_id_, actions.size());
  return Status::Ok();
}

Status ChangeTracker::EnsureNbdServer(const std::string& socket_path) {
  if (nbd_started_ || !options_.nbd_socket.empty()) return Status::Ok();
  auto r = Qmp("nbd-server-start", {{"addr", {{"type", "unix"}, {"data", {{"path", socket_path}}}}}});
  if (!r.ok()) {
    struct stat sb;
    if (r.status().message().find("already running") != std::string::npos &&
        ::stat(socket_path.c_str(), &sb) == 0 && S_ISSOCK(sb.st_mode)) {
      // Started by an earlier tracker of ours on the same path (daemon restart).
      nbd_started_ = true;
      return Status::Ok();
    }
    return r.status().WithContext("starting the NBD server (set TrackerOptions.nbd_socket when one runs)");
  }
  nbd_started_ = true;
  return Status::Ok();
}

Result<Cut> ChangeTracker::TakeCut(const std::string& export_dir) {
  VMR_RETURN_IF_ERROR(ValidateConfig());
  if (generation_ == 0) return Status::FailedPrecondition("tracking not enabled");
  if (cut_open_) return Status::FailedPrecondition("a cut is already open");
  if (needs_reconcile_) VMR_RETURN_IF_ERROR(Reconcile().status());
  VMR_RETURN_IF_ERROR(CheckTracking());
  const uint64_t g = generation_;
  const std::string socket =
      options_.nbd_socket.empty() ? export_dir + "/vmr-" + tag_ + ".nbd.sock" : options_.nbd_socket;
  VMR_RETURN_IF_ERROR(EnsureNbdServer(socket));

  Cut cut;
  cut.relationship_id = relationship_id_;
  cut.generation = g;
  for (size_t i = 0; i < disks_.size(); ++i) {
    const auto& d = disks_[i];
    CutDisk cd;
    cd.disk = d.name;
    cd.export_name = "vmrx-" + tag_ + "-" + d.name;
    cd.socket_path = socket;
    cd.bitmap = BitmapName(g);
    cd.bitmap_context = "qemu:dirty-bitmap:" + cd.bitmap;
    cd.size_bytes = d.size_bytes;
    cd.generation = g;
    cd.fleece_node = "vmrf-" + tag_ + "-" + std::to_string(i);
    cd.job_id = "vmrj-" + tag_ + "-" + std::to_string(i);
    cd.overlay_path = export_dir + "/vmrf-" + tag_ + "-" + d.name + ".qcow2";
    cut.disks.push_back(cd);
  }

  bool transaction_done = false;
  size_t exports_added = 0;
  auto fail = [&](Status s) -> Status {
    spdlog::warn("tracker {}: cut of generation {} failed: {}", relationship_id_, g, s.ToString());
    // Remove only the exports this call added: an export id that was taken
    // already (the cause of the failure, maybe) is not ours to remove here.
    for (size_t i = exports_added; i < cut.disks.size(); ++i) cut.disks[i].export_name.clear();
    Status t = Teardown(cut);
    if (!t.ok()) spdlog::warn("tracker {}: teardown after failed cut: {}", relationship_id_, t.ToString());
    if (transaction_done) {
      cut_open_ = true;  // so Abort's checks pass; Abort clears it
      Status a = Abort(cut);
      if (!a.ok()) {
        // Bitmap g may still hold changes; the next TakeCut reconciles first.
        spdlog::error("tracker {}: abort after failed cut: {}", relationship_id_, a.ToString());
        cut_open_ = false;
        needs_reconcile_ = true;
      }
    }
    return s;
  };

  // 1. Overlays: empty qcow2 files, opened with the disk as backing node.
  for (const auto& cd : cut.disks) {
    ::unlink(cd.overlay_path.c_str());
    Status s = RunTool(
        {options_.qemu_img, "create", "-q", "-f", "qcow2", cd.overlay_path, std::to_string(cd.size_bytes)});
    if (!s.ok()) return fail(s);
  }
  for (size_t i = 0; i < disks_.size(); ++i) {
    const auto& cd = cut.disks[i];
    auto r = Qmp("blockdev-add", {{"driver", "qcow2"},
                                  {"node-name", cd.fleece_node},
                                  {"file", {{"driver", "file"}, {"filename", cd.overlay_path}}},
                                  {"backing", disks_[i].node_name}});
    if (!r.ok()) return fail(r.status());
  }

  // 2. The cut: one transaction over all disks.
  json actions = json::array();
  for (size_t i = 0; i < disks_.size(); ++i) {
    const auto& d = disks_[i];
    const auto& cd = cut.disks[i];
    actions.push_back({{"type", "block-dirty-bitmap-add"},
                       {"data",
                        {{"node", d.node_name},
                         {"name", BitmapName(g + 1)},
                         {"granularity", options_.granularity},
                         {"persistent", d.qcow2}}}});
    actions.push_back(
        {{"type", "block-dirty-bitmap-disable"}, {"data", {{"node", d.node_name}, {"name", BitmapName(g)}}}});
    actions.push_back(
        {{"type", "blockdev-backup"},
         {"data",
          {{"device", d.node_name}, {"target", cd.fleece_node}, {"sync", "none"}, {"job-id", cd.job_id}}}});
  }
  auto tr = Qmp("transaction", {{"actions", actions}});
  if (!tr.ok()) return fail(tr.status());
  transaction_done = true;
  generation_ = g + 1;

  // 3. Exports of the point-in-time views with bitmap g.
  for (size_t i = 0; i < disks_.size(); ++i) {
    const auto& cd = cut.disks[i];
    auto r = Qmp("block-export-add",
                 {{"type", "nbd"},
                  {"id", cd.export_name},
                  {"node-name", cd.fleece_node},
                  {"name", cd.export_name},
                  {"writable", false},
                  {"bitmaps", json::array({{{"node", disks_[i].node_name}, {"name", cd.bitmap}}})}});
    if (!r.ok()) return fail(r.status());
    ++exports_added;
  }
  cut_open_ = true;
  spdlog::info("tracker {}: cut of generation {} open, recording {}", relationship_id_, g, BitmapName(g + 1));
  return cut;
}

Status ChangeTracker::RemoveExport(const std::string& id) {
  if (id.empty()) return Status::Ok();
  auto deadline = Clock::now() + options_.teardown_timeout;
  bool asked = false;
  for (;;) {
    VMR_ASSIGN_OR_RETURN(json exports, Qmp("query-block-exports", json::object()));
    bool present = false;
    for (const auto& e : exports) {
      if (e.is_object() && e.value("id", "") == id) present = true;
    }
    if (!present) return Status::Ok();
    if (!asked) {
      auto r = Qmp("block-export-del", {{"id", id}, {"mode", "hard"}});
      // Already shutting down: keep waiting for it to vanish.
      if (!r.ok() && r.status().message().find("shutting down") == std::string::npos) return r.status();
      asked = true;
    }
    if (Clock::now() > deadline) return Status::Timeout("export " + id + " did not go away");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

Status ChangeTracker::CancelJob(const std::string& job_id) {
  auto deadline = Clock::now() + options_.teardown_timeout;
  bool asked = false;
  for (;;) {
    VMR_ASSIGN_OR_RETURN(json jobs, Qmp("query-jobs", json::object()));
    const json* job = nullptr;
    for (const auto& j : jobs) {
      if (j.is_object() && j.value("id", "") == job_id) job = &j;
    }
    if (job == nullptr) return Status::Ok();
    std::string st = job->value("status", "");
    if (st == "concluded") {
      VMR_RETURN_IF_ERROR(Qmp("job-dismiss", {{"id", job_id}}).status());
    } else if (!asked && st != "aborting" && st != "null") {
      // A job that ends on its own between the query and the cancel makes
      // job-cancel fail; the next query tells.
      auto r = Qmp("job-cancel", {{"id", job_id}});
      if (!r.ok() && r.status().code() == Code::kUnavailable) return r.status();
      asked = true;
    }
    if (Clock::now() > deadline) return Status::Timeout("job " + job_id + " did not end (" + st + ")");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

Status ChangeTracker::DeleteNode(const std::string& node_name) {
  VMR_ASSIGN_OR_RETURN(json nodes, Qmp("query-named-block-nodes", {{"flat", true}}));
  for (const auto& n : nodes) {
    if (n.is_object() && n.value("node-name", "") == node_name) {
      return Qmp("blockdev-del", {{"node-name", node_name}}).status();
    }
  }
  return Status::Ok();
}

Status ChangeTracker::Teardown(const Cut& cut) {
  Status first;
  auto note = [&](Status s) {
    if (!s.ok() && first.ok()) first = s;
  };
  for (const auto& cd : cut.disks) note(RemoveExport(cd.export_name));
  for (const auto& cd : cut.disks) note(CancelJob(cd.job_id));
  if (!first.ok()) return first;  // nodes are still in use
  for (const auto& cd : cut.disks) {
    Status s = DeleteNode(cd.fleece_node);
    note(s);
    if (s.ok() && ::unlink(cd.overlay_path.c_str()) != 0 && errno != ENOENT) {
      note(Status::IOError("unlink " + cd.overlay_path + ": " + std::strerror(errno)));
    }
  }
  return first;
}

Status ChangeTracker::Commit(const Cut& cut) {
  if (!cut_open_ || cut.relationship_id != relationship_id_ || cut.generation + 1 != generation_) {
    return Status::FailedPrecondition("no such open cut");
  }
  VMR_RETURN_IF_ERROR(Teardown(cut));
  VMR_ASSIGN_OR_RETURN(auto states, QueryDisks());
  json actions = json::array();
  for (size_t i = 0; i < disks_.size(); ++i) {
    for (const auto& b : states[i].bitmaps) {
      if (b.generation == cut.generation) {
        actions.push_back({{"type", "block-dirty-bitmap-remove"},
                           {"data", {{"node", disks_[i].node_name}, {"name", b.name}}}});
      }
    }
  }
  if (!actions.empty()) VMR_RETURN_IF_ERROR(Qmp("transaction", {{"actions", actions}}).status());
  cut_open_ = false;
  spdlog::info("tracker {}: cut of generation {} committed", relationship_id_, cut.generation);
  return Status::Ok();
}

Status ChangeTracker::Abort(const Cut& cut) {
  if (!cut_open_ || cut.relationship_id != relationship_id_ || cut.generation + 1 != generation_) {
    return Status::FailedPrecondition("no such open cut");
  }
  VMR_RETURN_IF_ERROR(Teardown(cut));
  VMR_ASSIGN_OR_RETURN(auto states, QueryDisks());
  const std::string target = BitmapName(generation_);
  json actions = json::array();
  for (size_t i = 0; i < disks_.size(); ++i) {
    bool has_target = false;
    for (const auto& b : states[i].bitmaps) has_target |= b.name == target;
    for (const auto& b : states[i].bitmaps) {
      if (b.generation != cut.generation) continue;
      if (!has_target)
        return Status::FailedPrecondition("disk " + disks_[i].name + ": bitmap " + target + " missing");
      actions.push_back(
          {{"type", "block-dirty-bitmap-merge"},
           {"data",
            {{"node", disks_[i].node_name}, {"target", target}, {"bitmaps", json::array({b.name})}}}});
      actions.push_back({{"type", "block-dirty-bitmap-remove"},
                         {"data", {{"node", disks_[i].node_name}, {"name", b.name}}}});
    }
  }
  if (!actions.empty()) VMR_RETURN_IF_ERROR(Qmp("transaction", {{"actions", actions}}).status());
  cut_open_ = false;
  spdlog::info("tracker {}: cut of generation {} aborted, merged into {}", relationship_id_, cut.generation,
               target);
  return Status::Ok();
}

Result<ReconcileReport> ChangeTracker::Reconcile() {
  VMR_RETURN_IF_ERROR(ValidateConfig());
  ReconcileReport report;
  // 1. Exports, jobs, fleecing nodes and overlay files of ours.
  VMR_ASSIGN_OR_RETURN(json exports, Qmp("query-block-exports", json::object()));
  for (const auto& e : exports) {
    std::string id = e.is_object() ? e.value("id", "") : "";
    if (!StartsWith(id, "vmrx-" + tag_ + "-")) continue;
    VMR_RETURN_IF_ERROR(RemoveExport(id));
    report.actions.push_back("removed NBD export " + id);
  }
  VMR_ASSIGN_OR_RETURN(json jobs, Qmp("query-jobs", json::object()));
  for (const auto& j : jobs) {
    std::string id = j.is_object() ? j.value("id", "") : "";
    if (!StartsWith(id, "vmrj-" + tag_ + "-")) continue;
    VMR_RETURN_IF_ERROR(CancelJob(id));
    report.actions.push_back("cancelled job " + id);
  }
  VMR_ASSIGN_OR_RETURN(json nodes, Qmp("query-named-block-nodes", {{"flat", true}}));
  for (const auto& n : nodes) {
    std::string node = n.is_object() ? n.value("node-name", "") : "";
    if (!StartsWith(node, "vmrf-" + tag_ + "-")) continue;
    // The overlay's path: "file" is a json: filename when the backing was
    // given as a node at blockdev-add.
    std::string file = n.value("file", "");
    if (StartsWith(file, "json:")) {
      try {
        file = json::parse(file.substr(5)).at("file").at("filename").get<std::string>();
      } catch (const json::exception&) {
        file.clear();
      }
    }
    VMR_RETURN_IF_ERROR(Qmp("blockdev-del", {{"node-name", node}}).status());
    report.actions.push_back("deleted fleecing node " + node);
    // Only files named by our scheme are deleted.
    std::string base = file.substr(file.find_last_of('/') + 1);
    if (!file.empty() && StartsWith(base, "vmrf-" + tag_ + "-") && ::unlink(file.c_str()) == 0) {
      report.actions.push_back("deleted overlay " + file);
    }
  }

  // 2. Bitmaps: fold older generations into the newest.
  VMR_ASSIGN_OR_RETURN(auto states, QueryDisks());
  uint64_t newest = 0;
  for (const auto& st : states) {
    for (const auto& b : st.bitmaps) newest = std::max(newest, b.generation);
  }
  json actions = json::array();
  const std::string target = BitmapName(newest);
  for (size_t i = 0; newest != 0 && i < disks_.size(); ++i) {
    const auto& node = disks_[i].node_name;
    auto it = std::find_if(states[i].bitmaps.begin(), states[i].bitmaps.end(),
                           [&](const BitmapInfo& b) { return b.generation == newest; });
    if (it == states[i].bitmaps.end() || it->inconsistent) {
      report.actions.push_back("disk " + disks_[i].name + ": bitmap " + target +
                               (it == states[i].bitmaps.end() ? " missing" : " inconsistent") +
                               ": resynchronization required");
      continue;
    }
    if (!it->recording) {
      actions.push_back(
          {{"type", "block-dirty-bitmap-enable"}, {"data", {{"node", node}, {"name", target}}}});
      report.actions.push_back("re-enabled bitmap " + target + " on " + disks_[i].name);
    }
    for (const auto& b : states[i].bitmaps) {
      if (b.generation == newest) continue;
      if (b.inconsistent) {
        report.actions.push_back("disk " + disks_[i].name + ": bitmap " + b.name +
                                 " inconsistent: resynchronization required");
        continue;
      }
      actions.push_back({{"type", "block-dirty-bitmap-merge"},
                         {"data", {{"node", node}, {"target", target}, {"bitmaps", json::array({b.name})}}}});
      actions.push_back(
          {{"type", "block-dirty-bitmap-remove"}, {"data", {{"node", node}, {"name", b.name}}}});
      report.actions.push_back("merged bitmap " + b.name + " into " + target + " on " + disks_[i].name);
    }
  }
  if (!actions.empty()) VMR_RETURN_IF_ERROR(Qmp("transaction", {{"actions", actions}}).status());
  if (newest == 0) report.actions.push_back("no bitmap of ours found: resynchronization required");
  generation_ = newest;
  cut_open_ = false;
  needs_reconcile_ = false;
  reconciled_ = true;
  report.generation = newest;
  for (const auto& a : report.actions) spdlog::info("tracker {}: reconcile: {}", relationship_id_, a);
  return report;
}

}  // namespace vmreplica
