// The set of exports an NbdServer offers, shared by all its sessions.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "vmreplica/nbd_server.h"

namespace vmreplica::nbd {

struct ExportEntry {
  std::string name;
  std::string description;
  std::shared_ptr<ExportSource> source;
};

// Thread-safe map name -> export. Lookups return copies (the source is
// shared), so an export removed while a client uses it stays alive.
class ExportTable {
 public:
  // InvalidArgument for an empty name, one longer than 4096 bytes or one with
  // NUL; also for a null source or a description longer than 4096 bytes.
  // AlreadyExists when taken.
  Status Add(ExportEntry entry);
  // NotFound when absent.
  Status Remove(const std::string& name);
  std::optional<ExportEntry> Find(const std::string& name) const;
  // In name order.
  std::vector<ExportEntry> List() const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, ExportEntry> exports_;  // guarded by mu_
};

}  // namespace vmreplica::nbd
