#include "vmreplica/point_exports.h"

#include <spdlog/spdlog.h>

#include <shared_mutex>

#include "vmreplica/point_export.h"

namespace vmreplica {

// A PointExportSource that can be detached from its store: after Detach()
// returns no read reaches the store any more (connections still open on
// the export get an error), so the store may be closed.
class PointExports::Source final : public ExportSource {
 public:
  explicit Source(std::shared_ptr<PointExportSource> inner) : inner_(std::move(inner)), size_(inner_->size()) {}

  uint64_t size() const override { return size_; }
  Status Read(uint64_t offset, uint64_t length, char* out) override {
    std::shared_lock lk(mu_);
    if (!inner_) return Status::NotFound("the export has ended");
    return inner_->Read(offset, length, out);
  }
  Result<std::vector<Extent>> Extents(uint64_t offset, uint64_t length) override {
    std::shared_lock lk(mu_);
    if (!inner_) return Status::NotFound("the export has ended");
    return inner_->Extents(offset, length);
  }
  // Waits for reads in progress, then refuses new ones.
  void Detach() {
    std::unique_lock lk(mu_);
    inner_.reset();
  }

 private:
  std::shared_mutex mu_;
  std::shared_ptr<PointExportSource> inner_;  // guarded by mu_; null once detached
  const uint64_t size_;
};

PointExports::PointExports(NbdServerOptions options)
    : options_(std::move(options)), server_(std::make_unique<NbdServer>(options_)) {}

PointExports::~PointExports() { Stop(); }

Status PointExports::Start() { return server_->Start(); }

void PointExports::Stop() {
  {
    std::lock_guard lk(mu_);
    while (!exports_.empty()) EndLocked(exports_.begin());
  }
  server_->Stop();
}

std::string PointExports::ExportName(const std::string& vm_id, const std::string& disk, uint64_t sequence) {
  return vm_id + "/" + disk + "@" + std::to_string(sequence);
}

std::string PointExports::Uri(const std::string& export_name) const {
  return "nbd+unix:///" + export_name + "?socket=" + options_.socket_path;
}

Result<std::string> PointExports::Export(ReplicaStore* store, uint64_t sequence, const std::string& disk) {
  if (store == nullptr) return Status::InvalidArgument("PointExports::Export: no store");
  const std::vector<ReplicaDisk>& disks = store->disks();
  uint32_t index = 0;
  while (index < disks.size() && disks[index].name != disk) ++index;
  if (index == disks.size()) return Status::NotFound("no disk '" + disk + "' in the replica of " + store->vm_id());
  const std::string name = ExportName(store->vm_id(), disk, sequence);

  std::lock_guard lk(mu_);
  if (exports_.count(name) > 0) return Status::AlreadyExists("export " + name + " exists already");
  // Pin first: from here on retention keeps the point, so the check in
  // PointExportSource::Create cannot be overtaken by a prune.
  VMR_RETURN_IF_ERROR(store->PinPoint(sequence));
  Result<std::shared_ptr<PointExportSource>> inner = PointExportSource::Create(store, sequence, index);
  Status s = inner.status();
  std::shared_ptr<Source> source;
  if (s.ok()) {
    source = std::make_shared<Source>(std::move(inner).value());
    s = server_->AddExport(name, "recovery point " + std::to_string(sequence) + " of " + store->vm_id(), source);
  }
  if (!s.ok()) {
    store->UnpinPoint(sequence).IgnoreError();
    return s;
  }
  exports_[name] = Entry{store, sequence, std::move(source)};
  spdlog::info("point exports {}: exporting {}", options_.socket_path, name);
  return name;
}

Result<std::vector<std::string>> PointExports::ExportPoint(ReplicaStore* store, uint64_t sequence) {
  if (store == nullptr) return Status::InvalidArgument("PointExports::ExportPoint: no store");
  std::vector<std::string> names;
  for (const ReplicaDisk& d : store->disks()) {
    Result<std::string> name = Export(store, sequence, d.name);
    if (!name.ok()) {
      for (const std::string& n : names) Unexport(n).IgnoreError();
      return name.status();
    }
    names.push_back(std::move(name).value());
  }
  return names;
}

void PointExports::EndLocked(std::map<std::string, Entry>::iterator it) {
  Status s = server_->RemoveExport(it->first);
  if (!s.ok()) spdlog::warn("point exports {}: removing {}: {}", options_.socket_path, it->first, s.ToString());
  it->second.source->Detach();
  s = it->second.store->UnpinPoint(it->second.sequence);
  if (!s.ok()) spdlog::warn("point exports {}: unpinning {}: {}", options_.socket_path, it->first, s.ToString());
  spdlog::info("point exports {}: export {} ended", options_.socket_path, it->first);
  exports_.erase(it);
}

Status PointExports::Unexport(const std::string& name) {
  std::lock_guard lk(mu_);
  auto it = exports_.find(name);
  if (it == exports_.end()) return Status::NotFound("no export " + name);
  EndLocked(it);
  return Status::Ok();
}

void PointExports::UnexportStore(const ReplicaStore* store) {
  std::lock_guard lk(mu_);
  for (auto it = exports_.begin(); it != exports_.end();) {
    auto next = std::next(it);
    if (it->second.store == store) EndLocked(it);
    it = next;
  }
}

std::vector<std::string> PointExports::ListExports() const {
  std::lock_guard lk(mu_);
  std::vector<std::string> out;
  for (const auto& [name, e] : exports_) out.push_back(name);
  return out;
}

}  // namespace vmreplica
