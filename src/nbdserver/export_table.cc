#include "nbdserver/export_table.h"

#include "nbdserver/protocol.h"

namespace vmreplica::nbd {

Status ExportTable::Add(ExportEntry entry) {
  if (entry.name.empty() || entry.name.size() > kMaxNameLength ||
      entry.name.find('\0') != std::string::npos) {
    return Status::InvalidArgument("bad NBD export name");
  }
  if (entry.description.size() > kMaxNameLength) {
    return Status::InvalidArgument("NBD export description longer than 4096 bytes");
  }
  if (entry.source == nullptr) return Status::InvalidArgument("null export source");
  std::lock_guard<std::mutex> lock(mu_);
  if (exports_.count(entry.name) != 0) {
    return Status::AlreadyExists("NBD export " + entry.name + " exists");
  }
  std::string name = entry.name;
  exports_.emplace(std::move(name), std::move(entry));
  return Status::Ok();
}

Status ExportTable::Remove(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  if (exports_.erase(name) == 0) return Status::NotFound("no NBD export " + name);
  return Status::Ok();
}

std::optional<ExportEntry> ExportTable::Find(const std::string& name) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = exports_.find(name);
  if (it == exports_.end()) return std::nullopt;
  return it->second;
}

std::vector<ExportEntry> ExportTable::List() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<ExportEntry> out;
  out.reserve(exports_.size());
  for (const auto& [name, e] : exports_) out.push_back(e);
  return out;
}

}  // namespace vmreplica::nbd
