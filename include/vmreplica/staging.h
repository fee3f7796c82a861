// The staging area of a replica: received delta logs are written here and
// made durable before they are acknowledged, then applied to the replica
// store strictly in sequence. Files and rules: docs/replica_store.md,
// section "Staging"; the log format: docs/log_format.md.
//
// Lifecycle of one log (sequence s):
//
//   BeginReceive(header s) --> <s>.vrl.part written by the LogWriter
//     --> writer->Finish() --> CommitReceived(s): verify, fsync,
//         rename to <s>.vrl, fsync dir, [catalog row: staged]
//         ==> ACK to the sender allowed
//     --> ApplyReady(store): VerifyLog(<s>.vrl) --> store.Apply(s)
//         --> unlink <s>.vrl --> [catalog row deleted]
//          \__ verification fails: moved to rejected/ [row: rejected],
//              Corruption, nothing of it applied; the relationship must
//              be resynced
//
// Read once: a log that CommitReceived verified in this process and whose
// file still has the identity it had then (device, inode, size, mtime) is
// applied without the VerifyLog pass: the apply's LogReader (complete mode)
// checks every record's checksums and bounds and the trailer (counts,
// chain, nothing after it) before the store commits, and the store rolls
// back on any error. If that apply fails, the log is verified in full: a
// failed check rejects it exactly as above. After a restart nothing is
// remembered and every staged log is verified first.
//
// Import reservation (docs section 17): ReserveImport writes "<dir>/IMPORT"
// while the store is at point 0 and nothing is staged. Log 1 then comes by
// ImportInitialReplica (ReplicaStore::BeginLoad .. FinishLoad), never over
// the link: BeginReceive expects 2, 3, ... and ApplyReady stops at the gap
// until the store reaches point 1 and ClearImportReservation removes IMPORT.
//
// Errors:
//   FailedPrecondition  a duplicate (already applied or already staged) or
//                       out-of-sequence log; the message names the expected
//                       and the received sequence; log 1 while it is
//                       reserved for an import; a reservation refused;
//   InvalidArgument     a header that breaks a field rule or does not match
//                       the store (relationship id, disk names and sizes);
//                       ApplyReady with another store than the one given to
//                       Open;
//   Corruption          a log failed a checksum or bound (the message names
//                       the file and the byte offset); a bad IMPORT file;
//   IOError             the OS refused; errors of ReplicaStore::Apply are
//                       passed through.
//
// Thread safety: one receiver at a time (BeginReceive .. CommitReceived of
// one log before the next BeginReceive), and ApplyReady calls serialised.
// The receiver and ApplyReady may run on different threads concurrently.
// ReserveImport / ClearImportReservation belong to the receiver's side: not
// while a receive is in progress.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "vmreplica/catalog.h"
#include "vmreplica/logformat.h"
#include "vmreplica/replica_store.h"
#include "vmreplica/status.h"

namespace vmreplica {

struct StagingOptions {
  // Options of the writers handed out by BeginReceive. CommitReceived
  // fsyncs the file itself, whatever writer.sync says.
  LogWriterOptions writer;
  // When set (it must outlive the Staging and should hold the store's VM),
  // the staged and rejected logs are mirrored into its staged_logs table
  // (docs/replica_store.md section 14): a row is added when CommitReceived
  // stages a log, deleted when the log is applied, turned into a rejected
  // row when it is rejected, and Open reconciles rows with the files. The
  // files are the truth: a failed catalog update is logged and repaired at
  // the next ApplyReady or Open, never returned as an error.
  Catalog* catalog = nullptr;
};

class Staging {
 public:
  // Opens (creates when missing) the staging directory `dir`, normally
  // "<store dir>/staging". `store` is the store the logs are applied to; it
  // must outlive the Staging. Unfinished receives (*.vrl.part) are deleted:
  // after a restart the sender resends the whole log. With a catalog, its
  // staged_logs rows are reconciled with the files (a row without its file
  // is deleted, a file without its row gets one); a catalog error here is
  // logged and the reconciliation retried at the next ApplyReady.
  static Result<std::unique_ptr<Staging>> Open(const std::string& dir, const ReplicaStore& store,
                                               StagingOptions options = {});

  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;
  ~Staging();

  // Starts receiving the log described by `header`: its sequence must be
  // the next expected one (see expected_sequence()). Creates
  // "<seq>.vrl.part" (replacing an unfinished one of the same sequence) and
  // answers the writer for it. The caller adds the records, calls Finish()
  // and then CommitReceived().
  Result<std::unique_ptr<LogWriter>> BeginReceive(const LogHeader& header);

  // Makes the received log `sequence` a staged log: verifies the whole
  // .part file in complete mode (on failure it is deleted and the error,
  // Corruption, returned: the sender must resend), fsyncs it, renames it to
  // "<seq>.vrl" and fsyncs the directory. Only after OK may the receiver
  // acknowledge the log.
  Status CommitReceived(uint64_t sequence);

  // Applies the staged logs to `store` (the one given to Open) in sequence,
  // from store.latest_sequence() + 1 until the next one is not staged (with
  // an import reservation and the store at 0: none, answering 0).
  // Each log is verified completely first (or, when CommitReceived verified
  // it in this process and the file is unchanged, by the apply's own reads:
  // see "Read once" above), so a log that fails a check is not applied at
  // all: it is moved to "rejected/" and Corruption returned.
  // A staged log whose sequence is already applied (a crash after the
  // apply, before the unlink) is deleted, not applied again. Answers how
  // many logs were applied; on an error the logs applied before it stay
  // applied (see store.latest_sequence()).
  Result<uint64_t> ApplyReady(ReplicaStore& store);

  // The sequence the next BeginReceive must carry: one past the latest
  // applied and every staged log that follows it without a gap. With an
  // import reservation while the store is at point 0 it starts at 2 (log 1
  // comes by import), then skips the staged logs the same way.
  Result<uint64_t> expected_sequence() const;

  // Writes <dir>/IMPORT {"version":1,"sequence":1,"generation":"<32 hex>"}
  // (temp/fsync/rename/fsync dir): log 1 will come by ImportInitialReplica,
  // not over the link. FailedPrecondition unless the store's latest is 0 and
  // nothing is staged; idempotent for the same generation (OK),
  // FailedPrecondition for another one. InvalidArgument unless
  // `generation_hex` is 32 hex digits.
  Status ReserveImport(const std::string& generation_hex);
  // The reserved generation, or nullopt. A corrupt IMPORT file -> Corruption
  // (Open validates it too).
  Result<std::optional<std::string>> import_reservation() const;
  // Removes IMPORT (fsync dir). OK when absent.
  Status ClearImportReservation();
  // Deletes every staged log (not the rejected ones): the primary gave up
  // an initial replication whose logs these are. FailedPrecondition unless
  // the store's latest point is 0. Not concurrent with ApplyReady or a
  // receive (the caller holds both off).
  Status DiscardStaged();
  // "<dir>/IMPORT"
  std::string ImportPath() const;

  const std::string& dir() const { return dir_; }
  // "<dir>/<20-digit seq>.vrl"
  std::string LogPath(uint64_t sequence) const;

 private:
  Staging(std::string dir, const ReplicaStore& store, StagingOptions options);
  Status CheckHeader(const LogHeader& header) const;
  // FailedPrecondition when `sequence` is reserved for an import.
  Status CheckNotReserved(uint64_t sequence) const;
  Status Reject(const std::string& path, const Status& why);
  // Catalog mirror (no-ops without a catalog). Failures are logged and set
  // catalog_dirty_, so that the next ApplyReady reconciles everything.
  void MirrorStaged(uint64_t sequence, StagedLogState state, const std::string& file_name);
  void MirrorDeleted(uint64_t sequence, StagedLogState state);
  // Makes the staged_logs rows of the store's VM match the files.
  Status ReconcileCatalog();
  // The identity of a staged file as CommitReceived left it.
  struct FileIdentity {
    uint64_t dev = 0;
    uint64_t ino = 0;
    uint64_t size = 0;
    int64_t mtime_ns = 0;
    bool operator==(const FileIdentity&) const = default;
  };
  static std::optional<FileIdentity> IdentityOf(const std::string& path);
  // Whether `path` is log `sequence` as CommitReceived verified it here.
  bool VerifiedHere(uint64_t sequence, const std::string& path);
  void ForgetVerified(uint64_t sequence);

  // Constant after construction.
  const std::string dir_;
  const ReplicaStore* const store_;
  const StagingOptions options_;

  // Set by either thread when a mirror update failed; read and cleared by
  // ApplyReady.
  std::atomic<bool> catalog_dirty_{false};

  // Logs verified by CommitReceived (receiver thread), consulted and
  // forgotten by ApplyReady (applier thread) and DiscardStaged. Memory
  // only: empty after a restart.
  std::mutex verified_mu_;
  std::map<uint64_t, FileIdentity> verified_;  // by sequence; GUARDED_BY(verified_mu_)
};

}  // namespace vmreplica
