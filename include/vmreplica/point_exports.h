// The replica daemon's NBD exports of recovery points: one NbdServer on a
// unix socket serving any retained point of any open ReplicaStore, one
// export per disk and point. Names, pinning and the end of an export are
// specified in docs/replica_store.md section 15.
//
//   Export(store, seq, disk) --> store.PinPoint(seq) --> NbdServer::AddExport
//       "<vm id>/<disk>@<seq>"       (retention keeps the point from now on)
//   Unexport(name) / UnexportStore(store) / destructor
//       --> NbdServer::RemoveExport --> source detached (in-flight reads
//           finish; later reads on open connections fail with EIO)
//       --> store.UnpinPoint(seq)
//
// Errors: AlreadyExists (the name is exported), NotFound (no such point,
// disk or export), InvalidArgument (a null store), errors of the server.
//
// Thread safety: every method may be called from any thread; calls are
// serialised by an internal mutex. NBD connections run on the server's
// threads and read the stores concurrently with Apply (the store's reads
// are thread-safe). A store must stay open until UnexportStore(store) (or
// Unexport of its every export, or the destructor) has returned.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "vmreplica/nbd_server.h"
#include "vmreplica/replica_store.h"
#include "vmreplica/status.h"

namespace vmreplica {

class PointExports {
 public:
  // The server is not started yet; see Start().
  explicit PointExports(NbdServerOptions options);
  // Unexports everything (unpinning the points), then stops the server.
  ~PointExports();
  PointExports(const PointExports&) = delete;
  PointExports& operator=(const PointExports&) = delete;

  // Binds the socket and starts serving (NbdServer::Start()).
  Status Start();
  // Unexports everything and stops the server. Idempotent.
  void Stop();

  // "<vm id>/<disk name>@<sequence>" (sequence in decimal, no padding).
  static std::string ExportName(const std::string& vm_id, const std::string& disk, uint64_t sequence);
  // "nbd+unix:///<name>?socket=<socket path>": what qemu-img / nbdinfo take.
  std::string Uri(const std::string& export_name) const;
  const std::string& socket_path() const { return options_.socket_path; }

  // Exports disk `disk` (by name) of point `sequence` of `store`, pinning
  // the point. Answers the export name. NotFound: no such point / disk;
  // Corruption: the point is not readable; AlreadyExists: exported already.
  Result<std::string> Export(ReplicaStore* store, uint64_t sequence, const std::string& disk);
  // Exports every disk of the point (all or none); answers the names in
  // disk order.
  Result<std::vector<std::string>> ExportPoint(ReplicaStore* store, uint64_t sequence);
  // Ends one export and releases its pin. NotFound when not exported.
  Status Unexport(const std::string& name);
  // Ends every export of `store` (call it before closing the store).
  void UnexportStore(const ReplicaStore* store);

  // Names exported now, sorted.
  std::vector<std::string> ListExports() const;

 private:
  class Source;
  struct Entry {
    ReplicaStore* store = nullptr;
    uint64_t sequence = 0;
    std::shared_ptr<Source> source;
  };
  void EndLocked(std::map<std::string, Entry>::iterator it);  // mu_ held

  // Constant after construction.
  const NbdServerOptions options_;
  const std::unique_ptr<NbdServer> server_;

  mutable std::mutex mu_;
  std::map<std::string, Entry> exports_;  // guarded by mu_
};

}  // namespace vmreplica
