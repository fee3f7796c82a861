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
// Errors:
//   FailedPrecondition  a duplicate (already applied or already staged) or
//                       out-of-sequence log; the message names the expected
//                       and the received sequence;
//   InvalidArgument     a header that breaks a field rule or does not match
//                       the store (relationship id, disk names and sizes);
//                       ApplyReady with another store than the one given to
//                       Open;
//   Corruption          a log failed a checksum or bound (the message names
//                       the file and the byte offset);
//   IOError             the OS refused; errors of ReplicaStore::Apply are
//                       passed through.
//
// Thread safety: one receiver at a time (BeginReceive .. CommitReceived of
// one log before the next BeginReceive), and ApplyReady calls serialised.
// The receiver and ApplyReady may run on different threads concurrently.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
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
  // from store.latest_sequence() + 1 until the next one is not staged.
  // Each log is verified completely first, so a log that fails a check is
  // not applied at all: it is moved to "rejected/" and Corruption returned.
  // A staged log whose sequence is already applied (a crash after the
  // apply, before the unlink) is deleted, not applied again. Answers how
  // many logs were applied; on an error the logs applied before it stay
  // applied (see store.latest_sequence()).
  Result<uint64_t> ApplyReady(ReplicaStore& store);

  // The sequence the next BeginReceive must carry: one past the latest
  // applied and every staged log that follows it without a gap.
  Result<uint64_t> expected_sequence() const;

  const std::string& dir() const { return dir_; }
  // "<dir>/<20-digit seq>.vrl"
  std::string LogPath(uint64_t sequence) const;

 private:
  Staging(std::string dir, const ReplicaStore& store, StagingOptions options);
  Status CheckHeader(const LogHeader& header) const;
  Status Reject(const std::string& path, const Status& why);
  // Catalog mirror (no-ops without a catalog). Failures are logged and set
  // catalog_dirty_, so that the next ApplyReady reconciles everything.
  void MirrorStaged(uint64_t sequence, StagedLogState state, const std::string& file_name);
  void MirrorDeleted(uint64_t sequence, StagedLogState state);
  // Makes the staged_logs rows of the store's VM match the files.
  Status ReconcileCatalog();

  // Constant after construction.
  const std::string dir_;
  const ReplicaStore* const store_;
  const StagingOptions options_;

  // Set by either thread when a mirror update failed; read and cleared by
  // ApplyReady.
  std::atomic<bool> catalog_dirty_{false};
};

}  // namespace vmreplica
